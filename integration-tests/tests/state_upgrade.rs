//! A Sluice upgraded over a store made by its first release keeps using everything in it:
//! the queued async events are invoked, the Kinesis checkpoint resumes where it stood, the
//! published versions and aliases answer, and the concurrency set through the API holds. The
//! stores are the fixtures the first release's code wrote (`broker/tests/fixtures/`: a SQLite
//! file and a `pg_dump` of the same rows), upgraded in place by the migrations at start.
//!
//! Needs moto (SLUICE_TEST_MOTO) and PostgreSQL (SLUICE_TEST_POSTGRES); scripts/test provides
//! both.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::primitives::Blob;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::{drop_postgres_database, moto_url, new_postgres_database, quoted, start_on_state};
use serde_json::{Value, json};
use sluice::NativeRegistry;
use sluice_integration_tests::unique_name;
use sqlx::Connection;

const PATIENCE: Duration = Duration::from_secs(60);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../broker/tests/fixtures")
        .join(name)
}

/// What the functions saw: `(handler, event)`.
type Seen = Arc<Mutex<Vec<(&'static str, Value)>>>;

/// `greet` ($LATEST) and the handlers its two published versions name in the fixture
/// (`greet_v1`, `greet_v2`), plus `consumer` for the Kinesis mapping; each answers its name.
fn registry(seen: &Seen) -> NativeRegistry {
    let mut registry = NativeRegistry::new();
    for handler in ["greet", "greet_v1", "greet_v2", "consumer"] {
        let seen = seen.clone();
        registry.register(handler, move |event: Value, _ctx| {
            seen.lock().expect("seen").push((handler, event));
            async move { Ok(json!({ "handler": handler })) }
        });
    }
    registry
}

fn kinesis() -> aws_sdk_kinesis::Client {
    aws_sdk_kinesis::Client::from_conf(
        aws_sdk_kinesis::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(moto_url())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
            .build(),
    )
}

/// A one-shard stream holding records `{"n": 1}` … `{"n": 6}`. moto numbers a new shard's
/// records 1, 2, 3 …, so the fixture's checkpoint at sequence number 3 ("orders",
/// `shardId-000000000000`) stands after the third.
async fn stream_of_six() -> String {
    let client = kinesis();
    let name = unique_name("sluice-upgrade");
    client
        .create_stream()
        .stream_name(&name)
        .shard_count(1)
        .send()
        .await
        .expect("create the stream");
    for n in 1..=6 {
        let put = client
            .put_record()
            .stream_name(&name)
            .partition_key("k")
            .data(Blob::new(json!({ "n": n }).to_string()))
            .send()
            .await
            .expect("put a record");
        assert_eq!(put.sequence_number(), n.to_string(), "moto's numbering");
    }
    name
}

fn yaml(stream: &str) -> String {
    format!(
        "functions:\n  greet: {{runtime: native}}\n  consumer: {{runtime: native}}\nsources:\n  orders:\n    type: kinesis\n    function: consumer\n    stream: {}\n    endpoint_url: {}\n    region: us-east-1\n    starting_position: trim_horizon\n",
        quoted(stream),
        quoted(&moto_url())
    )
}

/// The `n` of each Kinesis record `consumer` received, in order.
fn kinesis_numbers(seen: &Seen) -> Vec<u64> {
    seen.lock()
        .expect("seen")
        .iter()
        .filter(|(h, _)| *h == "consumer")
        .flat_map(|(_, event)| event["Records"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            let data = B64
                .decode(r["kinesis"]["data"].as_str().expect("data"))
                .expect("base64");
            serde_json::from_slice::<Value>(&data).expect("json")["n"]
                .as_u64()
                .expect("n")
        })
        .collect()
}

/// The async events the fixture queued: `(handler, n)`.
fn async_deliveries(seen: &Seen) -> Vec<(&'static str, u64)> {
    let mut got: Vec<_> = seen
        .lock()
        .expect("seen")
        .iter()
        .filter(|(h, _)| *h != "consumer")
        .filter_map(|(h, event)| event["n"].as_u64().map(|n| (*h, n)))
        .collect();
    got.sort_by_key(|(_, n)| *n);
    got
}

async fn invoke(addr: std::net::SocketAddr, target: &str) -> Value {
    reqwest::Client::new()
        .post(format!(
            "http://{addr}/2015-03-31/functions/{target}/invocations"
        ))
        .body("{}")
        .send()
        .await
        .expect("invoke")
        .json()
        .await
        .expect("json")
}

/// Runs an upgraded Sluice on `state` and checks that it uses every kind of row the fixture
/// holds.
async fn assert_upgraded_store_is_used(state: &str, data_dir: &Path) {
    let stream = stream_of_six().await;
    let seen: Seen = Arc::default();
    let running = start_on_state(state, data_dir, &yaml(&stream), registry(&seen)).await;

    common::wait_until(
        "the events queued before the upgrade ran",
        PATIENCE,
        async || async_deliveries(&seen).len() >= 3,
    )
    .await;
    // Events 1 and 2 were queued for $LATEST, event 3 for the alias `live` (version 1).
    assert_eq!(
        async_deliveries(&seen),
        [("greet", 1), ("greet", 2), ("greet_v1", 3)]
    );

    common::wait_until(
        "the mapping resumed after the checkpoint",
        PATIENCE,
        async || kinesis_numbers(&seen).len() >= 3,
    )
    .await;
    assert_eq!(
        kinesis_numbers(&seen),
        [4, 5, 6],
        "resumed after the fixture's checkpoint at sequence number 3, nothing before it"
    );

    let addr = running.api_addr();
    assert_eq!(invoke(addr, "greet:live").await["handler"], "greet_v1");
    assert_eq!(invoke(addr, "greet:beta").await["handler"], "greet_v2");
    assert_eq!(invoke(addr, "greet:2").await["handler"], "greet_v2");
    let concurrency: Value = reqwest::get(format!(
        "http://{addr}/2019-09-30/functions/greet/concurrency"
    ))
    .await
    .expect("concurrency")
    .json()
    .await
    .expect("json");
    assert_eq!(concurrency["ReservedConcurrentExecutions"], 7);
    running.shutdown().await;
}

#[tokio::test]
async fn an_upgraded_first_release_sqlite_store_is_used_row_by_row() {
    let dir = tempfile::tempdir().expect("dir");
    let db = dir.path().join("state.db");
    std::fs::copy(fixture("state-v0.sqlite"), &db).expect("copy the fixture");
    assert_upgraded_store_is_used(&format!("sqlite://{}", db.display()), dir.path()).await;
}

#[tokio::test]
async fn an_upgraded_first_release_postgres_store_is_used_row_by_row() {
    let url = new_postgres_database().await;
    // The dump as pg_dump wrote it, less psql's meta-commands (`\restrict`), which are not SQL.
    let dump = std::fs::read_to_string(fixture("state-v0.postgres.sql")).expect("the dump");
    let sql: String = dump
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql(&sql)
        .execute(&mut conn)
        .await
        .expect("load the dump");
    conn.close().await.expect("close");
    let dir = tempfile::tempdir().expect("dir");
    assert_upgraded_store_is_used(&url, dir.path()).await;
    drop_postgres_database(&url).await;
}
