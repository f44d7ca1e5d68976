//! The state store on a full disk: a small tmpfs holds the SQLite state, is filled, written to,
//! and freed. Every write the store acknowledged must be found by a separate reader, after a
//! reopen too; writes during the episode fail visibly; and once space returns, the store
//! recovers by itself, without a restart.
//!
//! Needs root (mount a tmpfs); scripts/test runs as root on the development machines and CI.
//! Without it the tests fail saying so, rather than pass without having run.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{free_port, start, write};
use sluice::state::{Checkpoint, OpenOptions, QueuedEvent, SqliteStore, StateStore};

/// A tmpfs mounted on a new directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("dir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "THE DISK-FULL TESTS CANNOT RUN HERE: mounting a {size} tmpfs failed ({}). They need \
             root (or CAP_SYS_ADMIN) to mount one; run the test command as root.",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn event(id: &str) -> QueuedEvent {
    QueuedEvent {
        id: id.into(),
        function: "f".into(),
        qualifier: None,
        // Incompressible enough that the disk fills in a few hundred events.
        payload: (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect(),
        trace_id: "t".into(),
        received_at_ms: 1,
        next_attempt_ms: 1,
        attempts: vec![],
    }
}

/// Fills a file until the disk refuses more; returns it, to be removed to free the space.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("filler");
    let block = vec![7u8; 64 * 1024];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
    path
}

#[tokio::test]
async fn no_acknowledged_write_is_lost_to_a_full_disk_and_the_store_recovers_by_itself() {
    let disk = SmallDisk::mount("4m");
    let db = disk.path().join("state.db");
    let store = SqliteStore::open(&db).await.expect("open");
    let mut acked = Vec::new();
    let mut refused = 0;
    let mut n = 0;
    // Room for some events, then none.
    let filler = {
        for _ in 0..20 {
            n += 1;
            store
                .apply(&[event(&format!("e{n}"))], &[])
                .await
                .expect("room at first");
            acked.push(format!("e{n}"));
        }
        fill(disk.path())
    };
    for _ in 0..200 {
        n += 1;
        let id = format!("e{n}");
        match store.apply(&[event(&id)], &[]).await {
            Ok(()) => acked.push(id),
            Err(_) => refused += 1,
        }
        let c = Checkpoint {
            sequence: Some(n.to_string()),
            finished: false,
        };
        let _ = store.put_checkpoint("m", "s", &c).await;
    }
    assert!(
        refused > 0,
        "the disk never filled: the test proves nothing"
    );

    // Space returns: the same store, without a restart, takes writes again.
    std::fs::remove_file(&filler).expect("free the space");
    let mut recovered = false;
    for _ in 0..50 {
        n += 1;
        let id = format!("e{n}");
        if store.apply(&[event(&id)], &[]).await.is_ok() {
            acked.push(id);
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recovered, "the store did not recover once space was freed");
    for _ in 0..5 {
        n += 1;
        let id = format!("e{n}");
        store
            .apply(&[event(&id)], &[])
            .await
            .expect("writes go on after recovery");
        acked.push(id);
    }
    let last = Checkpoint {
        sequence: Some("last".into()),
        finished: true,
    };
    store
        .put_checkpoint("m", "s", &last)
        .await
        .expect("checkpoint after recovery");

    // A separate reader, while the store is still open, and after a reopen.
    let (reader, _) = SqliteStore::open_with(&db, OpenOptions::INSPECT)
        .await
        .expect("reader");
    assert_all_present(&reader, &acked).await;
    drop(reader);
    drop(store);
    let reopened = SqliteStore::open(&db).await.expect("reopen");
    assert_all_present(&reopened, &acked).await;
    assert_eq!(
        reopened.checkpoint("m", "s").await.expect("checkpoint"),
        Some(last)
    );
}

async fn assert_all_present(store: &dyn StateStore, acked: &[String]) {
    let due = store
        .due("f", 10, u32::try_from(acked.len() + 10).expect("count"))
        .await
        .expect("read the queue");
    let found: std::collections::HashSet<_> = due.iter().map(|e| e.id.clone()).collect();
    let lost: Vec<_> = acked.iter().filter(|id| !found.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events are not in the database: {lost:?}",
        lost.len(),
        acked.len()
    );
}

#[tokio::test]
async fn versions_and_concurrency_acknowledged_on_a_full_disk_are_there_after_a_reopen() {
    let disk = SmallDisk::mount("4m");
    let db = disk.path().join("state.db");
    let store = SqliteStore::open(&db).await.expect("open");
    let filler = fill(disk.path());
    let mut published = Vec::new();
    let mut concurrency = None;
    for i in 0..100u32 {
        let snapshot = "x".repeat(8192);
        if let Ok(v) = store
            .publish_version("f", &snapshot, &format!("sha{i}"), "")
            .await
        {
            published.push(v.version);
        }
        if store.put_concurrency("f", Some(i)).await.is_ok() {
            concurrency = Some(i);
        }
    }
    std::fs::remove_file(&filler).expect("free");
    let after = store
        .publish_version("f", "{}", "after", "")
        .await
        .expect("publishing works once space returns");
    published.push(after.version);
    drop(store);
    let reopened = SqliteStore::open(&db).await.expect("reopen");
    let versions: Vec<u32> = reopened
        .versions("f")
        .await
        .expect("versions")
        .iter()
        .map(|v| v.version)
        .collect();
    for v in &published {
        assert!(
            versions.contains(v),
            "acknowledged version {v} is gone: {versions:?}"
        );
    }
    if let Some(c) = concurrency {
        assert_eq!(reopened.concurrency("f").await.expect("c"), Some(Some(c)));
    }
}

/// An asynchronous invoke through the API: `Some(request id)` when answered 202.
async fn queue_event(http: &reqwest::Client, port: u16, n: u32) -> Option<String> {
    let response = http
        .post(format!(
            "http://127.0.0.1:{port}/2015-03-31/functions/held/invocations"
        ))
        .header("X-Amz-Invocation-Type", "Event")
        .body(format!(r#"{{"n":{n},"pad":"{}"}}"#, "p".repeat(2048)))
        .send()
        .await
        .expect("the API answers");
    match response.status().as_u16() {
        202 => Some(
            response
                .headers()
                .get("x-amzn-requestid")
                .and_then(|v| v.to_str().ok())
                .expect("a request id")
                .to_string(),
        ),
        500 | 503 => {
            let body = response.text().await.unwrap_or_default();
            assert!(
                body.contains("disk is full"),
                "the caller is told why: {body}"
            );
            None
        }
        other => panic!("unexpected answer {other}"),
    }
}

#[tokio::test]
async fn events_answered_202_on_a_full_disk_are_in_the_store_after_a_graceful_restart() {
    let disk = SmallDisk::mount("4m");
    let dir = tempfile::tempdir().expect("dir");
    // `held` has no concurrency, so its events stay queued where the test can count them.
    let config = write(
        dir.path(),
        "sluice.yaml",
        &format!(
            "state: sqlite://{}/state.db\nfunctions:\n  held: {{runtime: http, url: \"http://127.0.0.1:9/\", reserved_concurrency: 0}}\n",
            disk.path().display()
        ),
    );
    let port = free_port();
    let mut sluice = start(&config, port);
    let http = reqwest::Client::new();
    let mut acked = Vec::new();
    let mut refused = 0;
    for n in 0..10 {
        acked.push(queue_event(&http, port, n).await.expect("room at first"));
    }
    let filler = fill(disk.path());
    for n in 10..150 {
        match queue_event(&http, port, n).await {
            Some(id) => acked.push(id),
            None => refused += 1,
        }
    }
    assert!(
        refused > 0,
        "the disk never filled: the test proves nothing"
    );
    let metrics = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("sluice_state_errors_total{kind=\"disk_full\"}")
            && metrics.contains("sluice_state_failing 1"),
        "the episode is counted:\n{metrics}"
    );
    std::fs::remove_file(&filler).expect("free the space");
    for n in 150..160 {
        acked.push(
            queue_event(&http, port, n)
                .await
                .expect("accepted again once space returns, without a restart"),
        );
    }
    let db = disk.path().join("state.db");
    let (reader, _) = SqliteStore::open_with(&db, OpenOptions::INSPECT)
        .await
        .expect("reader");
    assert_all_queued(&reader, &acked).await;
    drop(reader);
    sluice.signal(libc::SIGTERM);
    assert!(
        sluice
            .wait_exit(std::time::Duration::from_secs(30))
            .success()
    );
    let reopened = SqliteStore::open(&db).await.expect("reopen");
    assert_all_queued(&reopened, &acked).await;
}

/// Every acknowledged request id is a queued event of `held`.
async fn assert_all_queued(store: &dyn StateStore, acked: &[String]) {
    let queued = store
        .due(
            "held",
            i64::MAX,
            u32::try_from(acked.len() + 100).expect("count"),
        )
        .await
        .expect("read the queue");
    let found: std::collections::HashSet<_> = queued.iter().map(|e| e.id.clone()).collect();
    let lost: Vec<_> = acked.iter().filter(|id| !found.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} events answered 202 are not in the store: {lost:?}",
        lost.len(),
        acked.len()
    );
}
