//! Warm invocations through the Lambda Runtime API path, next to a direct in-process call of
//! the same handler, measured in the same run.
//!
//! `cargo bench -p sluice-integration-tests --bench runtime_api`
//! Figures are printed, never asserted: these machines are noisy, so compare the rows of one
//! run with each other rather than with a fixed number.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::Invocation;

fn payload() -> bytes::Bytes {
    bytes::Bytes::from_static(br#"{"op":"noop","n":1}"#)
}

const WARMUP: usize = 2_000;
const PER_ROW: usize = 40_000;

/// (warm-up, measured) invocations per row. `cargo bench` passes `--bench`; `cargo test
/// --all-targets` runs this binary without it, and then a short smoke run is enough.
fn counts() -> (usize, usize) {
    if std::env::args().any(|arg| arg == "--bench") {
        (WARMUP, PER_ROW)
    } else {
        (20, 200)
    }
}

struct Row {
    label: String,
    calls: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Row {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i]
    }

    fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn measure<F, Fut>(label: String, concurrency: usize, total: usize, call: F) -> Row
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let per_task = total / concurrency;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                call().await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for t in tasks {
        latencies.extend(t.await.expect("bench task"));
    }
    Row {
        label,
        calls: per_task * concurrency,
        elapsed: started.elapsed(),
        latencies,
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
    let dir = tempfile::tempdir().expect("package dir");
    let yaml = format!(
        "functions:\n  noop:\n    runtime: process\n    package: {}\n    command: [{}]\n    memory_mb: 256\n    timeout: 30s\n",
        dir.path().display(),
        env!("CARGO_BIN_EXE_fn-noop"),
    );
    let config =
        sluice_config::parse_str(&yaml, "bench.yaml", dir.path(), &|_| None).expect("bench config");
    let running = sluice::start(
        config,
        sluice::StartOptions {
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            ..Default::default()
        },
    )
    .await
    .expect("sluice starts");
    let (warmup, per_row) = counts();
    let function = running.functions().get("noop").expect("noop").clone();
    let arn = function.arn.clone();

    println!(
        "runtime_api bench: {per_row} warm invocations per row, no-op Rust function (lambda_runtime), payload {} bytes",
        payload().len()
    );
    println!(
        "{:<44} {:>12} {:>10} {:>10} {:>12}",
        "path", "invocations/s", "p50 µs", "p99 µs", "vs direct"
    );

    let mut rows = Vec::new();
    for concurrency in [1usize, 2, 4] {
        // Direct: the same handler, called in-process, as the baseline of this row.
        let direct = measure(
            format!("direct in-process call, {concurrency} caller(s)"),
            concurrency,
            per_row,
            || async {
                let event: serde_json::Value = serde_json::from_slice(&payload()).expect("json");
                let out = sluice_integration_tests::noop_handler(event).await;
                std::hint::black_box(serde_json::to_vec(&out).expect("json"));
            },
        )
        .await;

        // Warm up as many environments as callers, then measure.
        let f = function.clone();
        let a = arn.clone();
        let call = move || {
            let f = f.clone();
            let a = a.clone();
            async move {
                let instance = f.latest().clone();
                let outcome = f
                    .invoke(&instance, Invocation::new(payload(), a))
                    .await
                    .expect("not throttled");
                assert!(outcome.result.is_ok(), "noop failed: {:?}", outcome.result);
            }
        };
        let _ = measure(String::new(), concurrency, warmup, call.clone()).await;
        let via = measure(
            format!("Runtime API, {concurrency} environment(s)"),
            concurrency,
            per_row,
            call,
        )
        .await;

        for row in [&direct, &via] {
            println!(
                "{:<44} {:>12.0} {:>10.1} {:>10.1} {:>12}",
                row.label,
                row.rate(),
                us(row.percentile(0.50)),
                us(row.percentile(0.99)),
                if std::ptr::eq(row, &direct) {
                    "baseline".to_string()
                } else {
                    format!("{:.3}x", row.rate() / direct.rate())
                }
            );
        }
        println!(
            "{:<44} {:>12} {:>10.1} {:>10.1}",
            "  added latency (Runtime API - direct)",
            "",
            us(via.percentile(0.50)) - us(direct.percentile(0.50)),
            us(via.percentile(0.99)) - us(direct.percentile(0.99)),
        );
        rows.push((direct, via));
    }
    running.shutdown().await;
}
