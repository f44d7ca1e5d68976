//! Asynchronous invocation (`X-Amz-Invocation-Type: Event`) through the Invoke API, against a
//! native no-op function with the queue on a SQLite state file:
//!
//! - accepted per second: concurrent clients send events as fast as they are answered; every
//!   202 means the event is on disk. The same row says how soon the function had run them all.
//! - latency at a steady rate: from the send, and from the 202, to the handler's entry.
//!
//! `cargo bench -p sluice-integration-tests --bench async_invoke`
//! Figures are printed, never asserted: compare the rows of one run with each other rather
//! than with a fixed number.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// What a run sends. `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
/// binary without it, and then a short smoke run is enough.
struct Counts {
    /// Events per throughput row.
    per_row: usize,
    clients: &'static [usize],
    /// Steady-rate events per second, and for how long.
    rate: u32,
    seconds: f64,
}

fn counts() -> Counts {
    if std::env::args().any(|arg| arg == "--bench") {
        Counts {
            per_row: 5_000,
            clients: &[1, 8, 32],
            rate: 500,
            seconds: 10.0,
        }
    } else {
        Counts {
            per_row: 40,
            clients: &[1, 4],
            rate: 100,
            seconds: 0.5,
        }
    }
}

/// A generous bound on the time for the function to catch up: past it the queue is stuck,
/// which is a bug rather than slowness.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// What the native handler saw: per request id, when it started and when its event was sent,
/// both in microseconds since the clock's start.
#[derive(Default)]
struct Seen {
    count: AtomicU64,
    entries: Mutex<HashMap<String, (u64, u64)>>,
}

struct Clock(Instant);

impl Clock {
    fn us(&self) -> u64 {
        self.0.elapsed().as_micros() as u64
    }
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() as f64 - 1.0) * p).round() as usize]
}

struct Target {
    http: reqwest::Client,
    url: String,
    clock: Arc<Clock>,
    seen: Arc<Seen>,
}

impl Target {
    /// Sends one event; returns its request id when it was accepted.
    async fn send(&self) -> Option<String> {
        let body = json!({"sent_us": self.clock.us()}).to_string();
        let response = self
            .http
            .post(&self.url)
            .header("X-Amz-Invocation-Type", "Event")
            .body(body)
            .send()
            .await
            .ok()?;
        if response.status() != reqwest::StatusCode::ACCEPTED {
            return None;
        }
        response
            .headers()
            .get("x-amzn-requestid")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Waits until the handler has seen `total` events in all.
    async fn drained(&self, total: u64) {
        let started = Instant::now();
        while self.seen.count.load(Ordering::Relaxed) < total {
            assert!(
                started.elapsed() < DRAIN_LIMIT,
                "the queue did not drain: {} of {total} events invoked",
                self.seen.count.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run());
}

async fn run() {
    let counts = counts();
    let clock = Arc::new(Clock(Instant::now()));
    let seen = Arc::new(Seen::default());
    let mut native = sluice::NativeRegistry::new();
    {
        let (clock, seen) = (clock.clone(), seen.clone());
        native.register("noop", move |event: Value, ctx: sluice::Context| {
            let entered = clock.us();
            let sent = event["sent_us"].as_u64().unwrap_or(entered);
            seen.entries
                .lock()
                .expect("entries")
                .insert(ctx.request_id, (entered, sent));
            seen.count.fetch_add(1, Ordering::Relaxed);
            async { Ok(Value::Null) }
        });
    }
    let dir = tempfile::tempdir().expect("state dir");
    let yaml = format!(
        "state: sqlite://{}/state.db\nfunctions:\n  noop:\n    runtime: native\n    timeout: 30s\n",
        dir.path().display()
    );
    let config =
        sluice_config::parse_str(&yaml, "bench.yaml", dir.path(), &|_| None).expect("bench config");
    let running = sluice::start(
        config,
        sluice::StartOptions {
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            native,
            data_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
    )
    .await
    .expect("sluice starts");
    let target = Arc::new(Target {
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client"),
        url: format!(
            "http://{}/2015-03-31/functions/noop/invocations",
            running.api_addr()
        ),
        clock,
        seen,
    });

    println!(
        "async_invoke bench: native no-op function, queue on SQLite ({} events per row)",
        counts.per_row
    );
    println!(
        "{:<36} {:>12} {:>12} {:>12} {:>14}",
        "clients", "accepted/s", "202 p50 ms", "202 p99 ms", "all run in s"
    );
    let mut total = 0u64;
    for &clients in counts.clients {
        let per_client = counts.per_row / clients;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let target = target.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let t = Instant::now();
                    target.send().await.expect("event accepted");
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
                latencies
            }));
        }
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.expect("client"));
        }
        let accepting = started.elapsed();
        total += latencies.len() as u64;
        target.drained(total).await;
        let all_run = started.elapsed();
        println!(
            "{:<36} {:>12.0} {:>12.2} {:>12.2} {:>14.2}",
            format!("{clients} concurrent client(s)"),
            latencies.len() as f64 / accepting.as_secs_f64(),
            percentile(&mut latencies, 0.50),
            percentile(&mut latencies, 0.99),
            all_run.as_secs_f64(),
        );
    }

    // Steady rate: one send per tick, each on its own task so that a slow answer never delays
    // the next send.
    let events = (f64::from(counts.rate) * counts.seconds) as usize;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(counts.rate)));
    let mut sends = Vec::with_capacity(events);
    for _ in 0..events {
        ticker.tick().await;
        let target = target.clone();
        sends.push(tokio::spawn(async move {
            let id = target.send().await.expect("event accepted");
            (id, target.clock.us())
        }));
    }
    let mut accepted_at = HashMap::with_capacity(events);
    for send in sends {
        let (id, at) = send.await.expect("send");
        accepted_at.insert(id, at);
    }
    total += events as u64;
    target.drained(total).await;
    let (mut from_send, mut from_202) = {
        let entries = target.seen.entries.lock().expect("entries");
        let mut from_send = Vec::with_capacity(events);
        let mut from_202 = Vec::with_capacity(events);
        for (id, accepted) in &accepted_at {
            let (entered, sent) = entries[id];
            from_send.push((entered as f64 - sent as f64) / 1e3);
            // Negative when the worker picked the event up before the client read its 202.
            from_202.push((entered as f64 - *accepted as f64) / 1e3);
        }
        (from_send, from_202)
    };
    println!();
    println!(
        "steady rate: {} events/s for {} s ({events} events)",
        counts.rate, counts.seconds
    );
    println!(
        "{:<36} {:>12} {:>12} {:>12}",
        "to the handler's entry", "p50 ms", "p99 ms", "max ms"
    );
    for (label, values) in [
        ("from the send", &mut from_send),
        ("from the 202", &mut from_202),
    ] {
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        println!(
            "{:<36} {:>12.2} {:>12.2} {:>12.2}",
            label,
            percentile(values, 0.50),
            percentile(values, 0.99),
            max
        );
    }
    running.shutdown().await;
}
