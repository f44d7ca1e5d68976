//! The API under hostile or careless clients: huge bodies, idle and slowloris connections,
//! callers that hang up mid-invocation, malformed payloads, operations Sluice does not
//! implement, a second Sluice that cannot bind its port, and a burst of slow invocations. Real
//! sockets and real clients (raw TCP, reqwest, boto3) against a Sluice running in-process.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Function, Sluice, quoted, wait_until};
use serde_json::{Value, json};
use sluice_integration_tests::unique_name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A native handler that sleeps `sleep_ms` (from the event) and then counts itself in `done`.
fn counting_sleeper(name: &str, done: Arc<AtomicUsize>) -> sluice::NativeRegistry {
    let mut registry = sluice::NativeRegistry::new();
    registry.register(name, move |event: Value, _ctx| {
        let done = done.clone();
        async move {
            let ms = event.get("sleep_ms").and_then(Value::as_u64).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            done.fetch_add(1, Ordering::SeqCst);
            Ok(json!({"slept": ms}))
        }
    });
    registry
}

async fn start_native(name: &str, extra_yaml: &str, done: Arc<AtomicUsize>) -> Sluice {
    Sluice::start_native_in(
        Sluice::new_dir(),
        &[Function::native(name).set("timeout", "30s")],
        extra_yaml,
        counting_sleeper(name, done),
    )
    .await
}

fn host_port(sluice: &Sluice) -> String {
    sluice.url.trim_start_matches("http://").to_owned()
}

/// Sends `head` (and optionally some body bytes) on a fresh connection and returns what the
/// server answered before closing or `limit` passed.
async fn raw_exchange(sluice: &Sluice, head: &str, body: &[u8], limit: Duration) -> String {
    let mut stream = TcpStream::connect(host_port(sluice))
        .await
        .expect("connect");
    stream.write_all(head.as_bytes()).await.expect("send head");
    let _ = stream.write_all(body).await;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let started = Instant::now();
    // The answer is complete once its JSON body is (all of these are small JSON errors).
    while started.elapsed() < limit {
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&chunk[..n]),
            Err(_) if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") => {
                break;
            }
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_management_body_is_refused_413_without_being_read() {
    let name = unique_name("bigmanage");
    let sluice = start_native(&name, "", Arc::default()).await;
    // Declared 1.5 GB, to a function that does not exist: answered at once, not buffered.
    let started = Instant::now();
    let answer = raw_exchange(
        &sluice,
        "POST /2015-03-31/functions/nope/versions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1500000000\r\n\r\n",
        &[b'x'; 65536],
        Duration::from_secs(5),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "a declared 1.5 GB body is refused: {answer:?}"
    );
    assert!(
        answer.contains("x-amzn-errortype: RequestTooLargeException"),
        "{answer}"
    );
    assert!(
        answer.contains("for the PublishVersion operation"),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Chunked, with no declared length: refused once past the limit.
    let mut chunked = Vec::new();
    for _ in 0..32 {
        chunked.extend_from_slice(format!("{:x}\r\n", 65536).as_bytes());
        chunked.extend_from_slice(&[b' '; 65536]);
        chunked.extend_from_slice(b"\r\n");
    }
    let answer = raw_exchange(
        &sluice,
        &format!("PUT /2017-10-31/functions/{name}/concurrency HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"),
        &chunked,
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert!(answer.contains("PutFunctionConcurrency"), "{answer}");
    // A small body still works.
    let put = sluice
        .http
        .put(format!(
            "{}/2017-10-31/functions/{name}/concurrency",
            sluice.url
        ))
        .body(r#"{"ReservedConcurrentExecutions": 5}"#)
        .send()
        .await
        .expect("put concurrency");
    assert_eq!(put.status(), 200);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_body_over_max_body_is_refused_413() {
    let name = unique_name("hookcap");
    let done = Arc::new(AtomicUsize::new(0));
    let path = format!("/hooks/{name}");
    let yaml = format!(
        "sources:\n  {}:\n    type: http\n    function: {}\n    path: {}\n    max_body: 1KiB\n",
        quoted(&name),
        quoted(&name),
        quoted(&path)
    );
    let sluice = start_native(&name, &yaml, done.clone()).await;
    let url = format!("{}{path}", sluice.url);
    let big = sluice
        .http
        .post(&url)
        .body(vec![b'a'; 2048])
        .send()
        .await
        .expect("big webhook");
    assert_eq!(big.status(), 413);
    assert!(big.text().await.unwrap_or_default().contains("1024 bytes"));
    let small = sluice
        .http
        .post(&url)
        .body(vec![b'a'; 1024])
        .send()
        .await
        .expect("small webhook");
    assert_eq!(small.status(), 200);
    assert_eq!(done.load(Ordering::SeqCst), 1, "only the small one ran");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_dropped_at_the_header_read_timeout() {
    let name = unique_name("slowloris");
    let sluice = start_native(&name, "api:\n  header_read_timeout: 1s\n", Arc::default()).await;
    let mut stream = TcpStream::connect(host_port(&sluice))
        .await
        .expect("connect");
    let head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n";
    let started = Instant::now();
    let mut dropped = None;
    for byte in head.iter().cycle().take(600) {
        if stream.write_all(&[*byte]).await.is_err() {
            dropped = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 1024];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(20), stream.read(&mut buf)).await
        {
            // Closed (0), or an error response before closing: either way it is dropped.
            let _ = n;
            dropped = Some(started.elapsed());
            break;
        }
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    let dropped = dropped.expect("the slowloris connection was never dropped");
    assert!(
        dropped < Duration::from_secs(3),
        "dropped after {dropped:?}, want about 1 s"
    );
    let metrics = sluice.get("/metrics").await.1;
    assert!(
        metrics.contains("sluice_api_header_timeouts_total{listener=\"api\"}"),
        "{metrics}"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_once_idle_connections_past_the_cap_time_out() {
    let name = unique_name("idlecap");
    let sluice = start_native(
        &name,
        "api:\n  max_connections: 16\n  header_read_timeout: 1s\n",
        Arc::default(),
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..48 {
        idle.push(
            TcpStream::connect(host_port(&sluice))
                .await
                .expect("connect"),
        );
    }
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(Duration::from_secs(6), sluice.get("/healthz"))
        .await
        .expect("/healthz answered within 6 s");
    assert_eq!((status, body.as_str()), (200, "ok"));
    // The cap held: /healthz waited for idle connections to time out (1 s after their accept)
    // rather than being served beside them.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(6),
        "answered after {waited:?}"
    );
    let metrics = sluice.get("/metrics").await.1;
    let timeouts: f64 = metrics
        .lines()
        .find(|l| l.starts_with("sluice_api_header_timeouts_total{listener=\"api\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no header timeouts counted: {metrics}"));
    assert!(timeouts >= 1.0, "{timeouts} idle connections timed out");
    drop(idle);
    sluice.shutdown().await;
}

/// A gauge or counter of `function` as `/metrics` shows it.
fn metric(metrics: &str, name: &str, function: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("function=\"{function}\"")))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_hang_up_do_not_cut_invocations_short_nor_leak_the_gauge() {
    let name = unique_name("hangup");
    let done = Arc::new(AtomicUsize::new(0));
    let sluice = start_native(&name, "", done.clone()).await;
    const CALLERS: usize = 24;
    let body = r#"{"sleep_ms": 600}"#;
    let head = format!(
        "POST /2015-03-31/functions/{name}/invocations HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let addr = host_port(&sluice);
        let head = head.clone();
        callers.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(head.as_bytes()).await.expect("send");
            tokio::time::sleep(Duration::from_millis(150)).await;
            drop(stream);
        }));
    }
    for c in callers {
        c.await.expect("caller");
    }
    wait_until(
        "every abandoned invocation finished",
        Duration::from_secs(10),
        async || done.load(Ordering::SeqCst) == CALLERS,
    )
    .await;
    // The last guard drops a moment after the handler's own count.
    let want = [
        ("sluice_function_concurrent_executions", 0.0),
        ("sluice_function_invocations_total", CALLERS as f64),
        ("sluice_api_caller_disconnects_total", CALLERS as f64),
    ];
    let mut metrics = String::new();
    let settled = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            metrics = sluice.get("/metrics").await.1;
            if want
                .iter()
                .all(|(m, v)| metric(&metrics, m, &name) == Some(*v))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(settled.is_ok(), "want {want:?} for {name}:\n{metrics}");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_refuses_invalid_utf8_and_nesting_deeper_than_lambda_allows() {
    let name = unique_name("badjson");
    let done = Arc::new(AtomicUsize::new(0));
    let sluice = start_native(&name, "", done.clone()).await;
    let refused = |r: &common::Invoked, what: &str| {
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(
            r.header("x-amzn-errortype").as_deref(),
            Some("InvalidRequestContentException"),
            "{what}"
        );
        let body = r.json();
        let message = body["Message"].as_str().unwrap_or_default().to_owned();
        assert!(
            message.starts_with("Could not parse request body into json: "),
            "{what}: {message}"
        );
        message
    };
    let mut bad_utf8 = br#"{"name": "caf"#.to_vec();
    bad_utf8.extend_from_slice(&[0xc3, 0x28, b'"', b'}']);
    let r = sluice.invoke_raw(&name, bad_utf8, &[]).await;
    let message = refused(&r, "invalid UTF-8 in a string");
    assert!(message.contains("UTF-8"), "{message}");

    let deep = format!("{}{}", "[".repeat(1001), "]".repeat(1001));
    let r = sluice.invoke_raw(&name, deep.into_bytes(), &[]).await;
    let message = refused(&r, "1001 levels");
    assert!(message.contains("nesting depth (1001)"), "{message}");
    // A million levels cost no more than a pass over the bytes.
    let started = Instant::now();
    let deeper = format!("{}{}", "{\"a\":".repeat(1_000_000), "}".repeat(1_000_000));
    let r = sluice.invoke_raw(&name, deeper.into_bytes(), &[]).await;
    refused(&r, "a million levels");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Brackets inside strings are not nesting, and 1000 levels are what Lambda accepts.
    let ok = format!(
        "{}\"{}\"{}",
        "[".repeat(1000),
        "[".repeat(5000),
        "]".repeat(1000)
    );
    let r = sluice.invoke_raw(&name, ok.into_bytes(), &[]).await;
    assert_eq!(r.status, 200, "1000 levels are accepted: {}", r.text());
    assert_eq!(done.load(Ordering::SeqCst), 0, "nothing refused ran");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_operations_raise_a_lambda_client_error_in_boto3() {
    let name = unique_name("unsupported");
    let sluice = start_native(&name, "", Arc::default()).await;
    let calls = json!([
        {"op": "list_layers", "args": {}},
        {"op": "get_function_url_config", "args": {"FunctionName": name}},
        {"op": "delete_function", "args": {"FunctionName": name}},
        {"op": "get_function", "args": {"FunctionName": name}},
    ]);
    let results = common::boto3_calls(&sluice, calls.as_array().expect("a list")).await;
    for (i, op) in ["ListLayers", "GetFunctionUrlConfig", "DeleteFunction"]
        .iter()
        .enumerate()
    {
        let r = &results[i];
        assert_eq!(r["exception"], "UnsupportedOperationException", "{op}: {r}");
        let message = r["error"]["Error"]["Message"].as_str().unwrap_or_default();
        assert!(message.ends_with("is not supported by Sluice"), "{op}: {r}");
        let status = r["error"]["ResponseMetadata"]["HTTPStatusCode"].as_u64();
        assert!(status.is_none_or(|s| (400..500).contains(&s)), "{op}: {r}");
    }
    assert_eq!(
        results[3]["Configuration"]["FunctionName"], name,
        "a supported call still works: {}",
        results[3]
    );

    let (status, body) = sluice.get("/no/such/thing").await;
    assert_eq!(status, 404);
    let body: Value = serde_json::from_str(&body).expect("a JSON 404");
    assert_eq!(body["Type"], "User");
    assert!(body["message"].as_str().is_some(), "{body}");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sluice_that_cannot_bind_its_port_takes_no_queued_event() {
    let name = unique_name("nobind");
    let dir = tempfile::tempdir().expect("dir");
    let state = format!("sqlite://{}", dir.path().join("state.db").display());
    let store = sluice::state::open(&state, std::path::Path::new("."))
        .await
        .expect("open the state");
    let now = chrono_now_ms();
    let events: Vec<_> = (0..5)
        .map(|i| sluice::state::QueuedEvent {
            id: format!("{name}-{i}"),
            function: name.clone(),
            qualifier: None,
            payload: b"{}".to_vec(),
            trace_id: "Root=1-00000000-000000000000000000000000;Parent=0000000000000000;Sampled=0"
                .to_owned(),
            received_at_ms: now,
            next_attempt_ms: now,
            attempts: Vec::new(),
        })
        .collect();
    store.apply(&events, &[]).await.expect("queue events");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let yaml = format!(
        "state: {}\nfunctions:\n  {}:\n    runtime: native\n",
        quoted(&state),
        quoted(&name)
    );
    let config =
        sluice_config::parse_str(&yaml, "test.yaml", dir.path(), &|_| None).expect("config");
    let done = Arc::new(AtomicUsize::new(0));
    let options = sluice::StartOptions {
        listen: Some(format!("127.0.0.1:{port}").parse().expect("address")),
        data_dir: Some(dir.path().to_path_buf()),
        native: counting_sleeper(&name, done.clone()),
        ..Default::default()
    };
    let started = sluice::start(config, options).await;
    assert!(
        matches!(started, Err(sluice::StartError::Bind { .. })),
        "the taken port is reported"
    );
    // Whatever was spawned before the failure would have taken the events by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(done.load(Ordering::SeqCst), 0, "no queued event ran");
    assert_eq!(
        store.queued().await.expect("queued"),
        5,
        "every event is still queued"
    );
    drop(taken);
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_management_answer_while_slow_invocations_hold_every_connection() {
    let name = unique_name("burst");
    let done = Arc::new(AtomicUsize::new(0));
    // 20 connections at once: a burst of 100 slow invocations holds all of them for 3 s.
    let sluice = start_native(&name, "api:\n  max_connections: 20\n", done.clone()).await;
    const BURST: usize = 100;
    let mut burst = Vec::new();
    for _ in 0..BURST {
        let url = sluice.invocations_url(&name);
        burst.push(tokio::spawn(async move {
            // A client of its own per caller: nothing shared with the polling below.
            let http = reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client");
            http.post(url)
                .body(r#"{"sleep_ms": 3000}"#)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut slowest = Duration::ZERO;
    let polling = Instant::now();
    while polling.elapsed() < Duration::from_secs(2) {
        for path in ["/healthz", &format!("/2015-03-31/functions/{name}")] {
            let started = Instant::now();
            let (status, _) = tokio::time::timeout(Duration::from_secs(5), sluice.get(path))
                .await
                .unwrap_or_else(|_| panic!("{path} did not answer within 5 s"));
            assert_eq!(status, 200, "{path}");
            slowest = slowest.max(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        slowest < Duration::from_secs(2),
        "the slowest answer took {slowest:?}"
    );
    let mut ran = 0;
    for b in burst {
        match b.await.expect("caller").expect("invoke") {
            200 => ran += 1,
            429 => {}
            other => panic!("an invocation answered {other}"),
        }
    }
    assert!(
        ran >= 20,
        "the connections served ran their invocations: {ran}"
    );
    assert_eq!(done.load(Ordering::SeqCst), ran);
    sluice.shutdown().await;
}
