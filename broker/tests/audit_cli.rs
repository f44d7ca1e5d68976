//! `sluice audit` as an operator runs it beside a running Sluice: the configuration load with
//! its file's SHA-256, management calls, and the `--event`, `--since`, `--principal` and
//! `--limit` filters, read from the state store without disturbing the running instance.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{SLUICE, free_port, start, write};
use serde_json::Value;
use sha2::Digest;

fn audit(config: &Path, args: &[&str]) -> Vec<Value> {
    let out = Command::new(SLUICE)
        .arg("audit")
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .expect("sluice audit runs");
    assert!(
        out.status.success(),
        "sluice audit {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["eventName"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_audit_lists_and_filters_the_stored_events() {
    let dir = tempfile::tempdir().expect("dir");
    let text = "state: sqlite://./data/state.db\nfunctions:\n  hello: {runtime: http, url: \"http://127.0.0.1:9/\"}\n";
    let config = write(dir.path(), "sluice.yaml", text);
    let port = free_port();
    let _server = start(&config, port);
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let base = format!("http://127.0.0.1:{port}");
    let published = http
        .post(format!("{base}/2015-03-31/functions/hello/versions"))
        .body("{}")
        .send()
        .await
        .expect("publish");
    assert_eq!(published.status(), 201);
    let reserved = http
        .put(format!("{base}/2017-10-31/functions/hello/concurrency"))
        .body(r#"{"ReservedConcurrentExecutions": 2}"#)
        .send()
        .await
        .expect("concurrency");
    assert_eq!(reserved.status(), 200);

    let started = Instant::now();
    let all = loop {
        let all = audit(&config, &[]);
        if all.len() >= 3 || started.elapsed() > Duration::from_secs(10) {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        names(&all),
        [
            "LoadConfiguration",
            "PublishVersion",
            "PutFunctionConcurrency"
        ]
    );
    let loaded = audit(&config, &["--event", "LoadConfiguration"]);
    assert_eq!(loaded.len(), 1);
    let sha256: String = sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(loaded[0]["requestParameters"]["sha256"], sha256.as_str());
    assert_eq!(
        loaded[0]["requestParameters"]["path"],
        config.display().to_string().as_str()
    );
    assert_eq!(
        names(&audit(&config, &["--event", "PublishVersion"])),
        ["PublishVersion"]
    );
    assert_eq!(audit(&config, &["--since", "1h"]).len(), 3);
    assert_eq!(
        names(&audit(&config, &["--limit", "1"])),
        ["PutFunctionConcurrency"],
        "the newest"
    );

    // A call by a named principal (as the auth layer records one), to filter on.
    let db = dir.path().join("data/state.db");
    let old = chrono::Utc::now().timestamp_millis() - 2 * 3_600 * 1_000;
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .expect("connect");
        sqlx::query("INSERT INTO audit_events (event_id, event_time_ms, event_name, principal, event) VALUES ('p1', $1, 'UpdateAlias', 'deployer', '{\"eventName\":\"UpdateAlias\",\"userIdentity\":{\"userName\":\"deployer\"}}')")
            .bind(old)
            .execute(&mut conn)
            .await
            .expect("insert");
        conn.close().await.expect("close");
    }
    assert_eq!(
        names(&audit(&config, &["--principal", "deployer"])),
        ["UpdateAlias"]
    );
    assert!(audit(&config, &["--principal", "nobody"]).is_empty());
    assert_eq!(
        audit(&config, &["--since", "1h"]).len(),
        3,
        "two hours old is before --since 1h"
    );
    assert_eq!(audit(&config, &[]).len(), 4);
}
