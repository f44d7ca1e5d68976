//! The asynchronous queue across stops, with the `sluice` binary on a SQLite state file: an
//! event answered with 202 is invoked, or dead-lettered when it keeps failing, even when Sluice
//! is killed (SIGKILL) while events wait and run; a graceful stop (SIGTERM) keeps what is still
//! queued for the next start.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Server, bootstrap, free_port, start, write};
use serde_json::{Value, json};
use sluice::state::{OpenOptions, SqliteStore, StateStore};

/// Appends `{"id", "request_id"}` to `$SEEN` for every event it is given, sleeps `sleep`
/// seconds, then fails when the event says `fail` and succeeds otherwise.
const RECORDING_FUNCTION: &str = r#"#!/usr/bin/env python3
import json, os, time, urllib.request
API = f"http://{os.environ['AWS_LAMBDA_RUNTIME_API']}/2018-06-01/runtime"
while True:
    with urllib.request.urlopen(f"{API}/invocation/next") as r:
        rid = r.headers["Lambda-Runtime-Aws-Request-Id"]; event = json.loads(r.read())
    with open(os.environ["SEEN"], "a") as f:
        f.write(json.dumps({"id": event["id"], "request_id": rid}) + "\n")
    time.sleep(event.get("sleep", 0))
    if event.get("fail"):
        kind, body = "error", {"errorType": "Planned", "errorMessage": f"event {event['id']} fails"}
    else:
        kind, body = "response", {"ok": event["id"]}
    request = urllib.request.Request(f"{API}/invocation/{rid}/{kind}", data=json.dumps(body).encode(), method="POST")
    urllib.request.urlopen(request).close()
"#;

/// Concurrent executions of the function: also the most invocations a crash can cut short.
const RESERVED: usize = 4;
const LIMIT: Duration = Duration::from_secs(60);

struct Setup {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

impl Setup {
    fn new(max_retry_attempts: u32) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        bootstrap(dir.path(), RECORDING_FUNCTION);
        let seen = dir.path().join("seen.jsonl");
        let config = write(
            dir.path(),
            "sluice.yaml",
            &format!(
                "state: sqlite://./data/state.db
functions:
  recorder:
    package: ./fn
    timeout: 10s
    environment: {{SEEN: {seen}}}
    reserved_concurrency: {RESERVED}
    max_retry_attempts: {max_retry_attempts}
    retry_delay: 100ms
    on_failure: dlq
dead_letters:
  dlq: {{type: file, path: ./dlq.jsonl}}
",
                seen = Value::from(seen.to_string_lossy()),
            ),
        );
        Self { dir, config }
    }

    fn start(&self) -> (Server, String) {
        let port = free_port();
        (
            start(&self.config, port),
            format!("http://127.0.0.1:{port}"),
        )
    }

    /// How many times the function was given each event id.
    fn seen(&self) -> BTreeMap<u64, usize> {
        let mut seen = BTreeMap::new();
        for line in lines(&self.dir.path().join("seen.jsonl")) {
            *seen.entry(line["id"].as_u64().expect("id")).or_default() += 1;
        }
        seen
    }

    /// The dead letters, by event id.
    fn dead(&self) -> BTreeMap<u64, Vec<Value>> {
        let mut dead: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
        for record in lines(&self.dir.path().join("dlq.jsonl")) {
            let id = record["requestPayload"]["id"]
                .as_u64()
                .expect("requestPayload.id");
            dead.entry(id).or_default().push(record);
        }
        dead
    }

    async fn queued(&self) -> u64 {
        let store =
            SqliteStore::open_with(&self.dir.path().join("data/state.db"), OpenOptions::INSPECT)
                .await
                .expect("state")
                .0;
        store.queued().await.expect("queued")
    }
}

/// The complete JSON lines of a file. A line still being written (no newline yet) is left
/// for the next look.
fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// Sends one asynchronous invoke; whether Sluice answered 202.
async fn send_event(http: &reqwest::Client, url: &str, event: &Value) -> bool {
    let response = http
        .post(format!("{url}/2015-03-31/functions/recorder/invocations"))
        .header("X-Amz-Invocation-Type", "Event")
        .body(event.to_string())
        .send()
        .await;
    matches!(response, Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED)
}

/// Sends `events` from `senders` concurrent clients; returns the ids answered with 202.
async fn send_events(url: &str, events: Vec<Value>, senders: usize) -> BTreeSet<u64> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let events = Arc::new(std::sync::Mutex::new(events.into_iter()));
    let mut tasks = Vec::new();
    for _ in 0..senders {
        let (http, url, events) = (http.clone(), url.to_string(), events.clone());
        tasks.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            loop {
                let Some(event) = events.lock().expect("events").next() else {
                    break;
                };
                if send_event(&http, &url, &event).await {
                    accepted.push(event["id"].as_u64().expect("id"));
                }
            }
            accepted
        }));
    }
    let mut accepted = BTreeSet::new();
    for task in tasks {
        accepted.extend(task.await.expect("sender"));
    }
    accepted
}

/// Waits until `done` holds, or fails saying `what`.
async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < LIMIT,
            "{what} did not happen within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_events_queued_and_running_loses_no_accepted_event() {
    const EVENTS: u64 = 200;
    let fails = |id: u64| id % 7 == 3;
    let setup = Setup::new(2);
    let (mut server, url) = setup.start();
    let events: Vec<Value> = (0..EVENTS)
        .map(|id| json!({"id": id, "fail": fails(id), "sleep": 0.05}))
        .collect();

    // Kill Sluice once the function is busy, whether or not every send is done: a send cut
    // short by the kill was never accepted and is not owed.
    let sending = tokio::spawn({
        let url = url.clone();
        async move { send_events(&url, events, 4).await }
    });
    wait_until("20 invocations before the kill", async || {
        setup.seen().len() >= 20
    })
    .await;
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(10));
    let accepted = sending.await.expect("senders");
    let seen_before = setup.seen();
    let dead_before = setup.dead();
    let finished_before = accepted
        .iter()
        .filter(|id| {
            if fails(**id) {
                dead_before.contains_key(id)
            } else {
                seen_before.contains_key(id)
            }
        })
        .count();
    assert!(
        accepted.len() >= 20,
        "only {} events accepted",
        accepted.len()
    );
    assert!(
        finished_before < accepted.len(),
        "the kill came after everything was done; the test proves nothing"
    );

    let (_server, _url) = setup.start();
    let owed = |seen: &BTreeMap<u64, usize>, dead: &BTreeMap<u64, Vec<Value>>| {
        accepted
            .iter()
            .filter(|id| {
                if fails(**id) {
                    !dead.contains_key(id)
                } else {
                    !seen.contains_key(id)
                }
            })
            .count()
    };
    wait_until("every accepted event's outcome", async || {
        owed(&setup.seen(), &setup.dead()) == 0
    })
    .await;
    wait_until("an empty queue", async || setup.queued().await == 0).await;

    let seen = setup.seen();
    let dead = setup.dead();
    for (id, records) in &dead {
        assert!(
            fails(*id),
            "event {id} succeeds, yet was dead-lettered: {records:?}"
        );
        // Only a kill between the write and the removal from the queue writes one twice.
        assert!(
            records.len() <= 2,
            "event {id} dead-lettered {} times",
            records.len()
        );
        for record in records {
            let context = &record["requestContext"];
            assert_eq!(context["condition"], "RetriesExhausted", "{record}");
            assert_eq!(context["approximateInvokeCount"], 3, "{record}");
            let attempts = record["sluice"]["attempts"].as_array().expect("attempts");
            assert_eq!(attempts.len(), 3, "{record}");
            for attempt in attempts {
                assert_eq!(attempt["errorType"], "Planned", "{record}");
                assert_eq!(
                    attempt["errorMessage"],
                    format!("event {id} fails"),
                    "{record}"
                );
            }
        }
        assert!(
            seen.get(id).copied().unwrap_or(0) >= 3,
            "event {id} was tried {:?} times",
            seen.get(id)
        );
    }
    // At least once, and duplicates bounded by what can be in flight at the kill.
    let duplicates: usize = accepted
        .iter()
        .filter(|id| !fails(**id))
        .map(|id| seen[id] - 1)
        .sum();
    assert!(
        duplicates <= 4 * RESERVED,
        "{duplicates} repeated invocations after one crash: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_queued_events_for_the_next_start() {
    const EVENTS: u64 = 12;
    let setup = Setup::new(0);
    let (mut server, url) = setup.start();
    let events: Vec<Value> = (0..EVENTS)
        .map(|id| json!({"id": id, "sleep": 0.3}))
        .collect();
    let accepted = send_events(&url, events, 2).await;
    assert_eq!(accepted.len() as u64, EVENTS, "every event is accepted");
    wait_until("the first invocation", async || !setup.seen().is_empty()).await;
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(15));
    assert!(
        status.success(),
        "a graceful stop exits cleanly: {status:?}"
    );
    let before = setup.seen();
    assert!(
        (before.len() as u64) < EVENTS,
        "events were still queued at the stop: {before:?}"
    );
    assert!(setup.queued().await > 0, "what did not run stays queued");

    let (_server, _url) = setup.start();
    wait_until("every event", async || setup.seen().len() as u64 == EVENTS).await;
    wait_until("an empty queue", async || setup.queued().await == 0).await;
    let seen = setup.seen();
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..EVENTS).collect::<Vec<_>>()
    );
    // In-flight invocations finished before the stop, so nothing ran twice.
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    assert!(
        !setup.dir.path().join("dlq.jsonl").exists(),
        "nothing failed"
    );
}
