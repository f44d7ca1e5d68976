//! Invoke API throughput and latency: requests per second and p50/p99 for a no-op native
//! function through Sluice's whole HTTP path, next to a bare hyper server answering the same
//! request on the same machine in the same run (the baseline: what HTTP alone costs here),
//! with `api.auth: none` and with `api.auth: sigv4` (every request's signature verified and
//! the principal's identity policy evaluated).
//!
//! The signed case sends one request signed once with aws-sigv4 again and again (a signature
//! stays valid for 5 minutes, as in AWS), so its row measures the server's verification, not
//! the client's signing.
//!
//! `cargo bench -p sluice-integration-tests --bench invoke_api` runs each case for 5 s (SLUICE_BENCH_SECS to
//! change it) over 32 keep-alive connections (SLUICE_BENCH_CONNECTIONS). Under `cargo test`
//! (no `--bench` argument) each case runs for a fraction of a second, so the suite proves the
//! benchmark still works without timing anything.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde_json::Value;
use sluice::{NativeRegistry, StartOptions};
use tokio::net::{TcpListener, TcpStream};

const FUNCTION: &str = "noop";
const PAYLOAD: &[u8] = br#"{"key":"value"}"#;

/// One request to send again and again: its path and extra headers.
#[derive(Clone)]
struct Shape {
    path: String,
    headers: Vec<(String, String)>,
}

struct Figures {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Figures {
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }

    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let benching = std::env::args().any(|a| a == "--bench");
    let secs: f64 = std::env::var("SLUICE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if benching { 5.0 } else { 0.3 });
    let connections: usize = std::env::var("SLUICE_BENCH_CONNECTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let duration = Duration::from_secs_f64(secs);
    let invoke = Shape {
        path: format!("/2015-03-31/functions/{FUNCTION}/invocations"),
        headers: vec![("content-type".into(), "application/json".into())],
    };

    println!(
        "invoke_api: {connections} connections, {secs} s per case, payload {} bytes",
        PAYLOAD.len()
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>8}",
        "case", "req/s", "p50", "p99", "errors"
    );

    let bare = bare_server().await?;
    let baseline = load(bare, &invoke, connections, duration).await;
    report("bare hyper (baseline)", &baseline);

    let dir = tempfile::tempdir()?;
    let running = start_sluice(dir.path(), AUTH_NONE).await?;
    let plain = load(running.api_addr(), &invoke, connections, duration).await;
    report("sluice, auth none", &plain);
    running.shutdown_within(Duration::from_secs(5)).await;

    let dir = tempfile::tempdir()?;
    let running = start_sluice(dir.path(), AUTH_SIGV4).await?;
    let signed_shape = signed(&invoke, running.api_addr())?;
    let signed = load(running.api_addr(), &signed_shape, connections, duration).await;
    report("sluice, auth sigv4", &signed);
    running.shutdown_within(Duration::from_secs(5)).await;

    println!(
        "sigv4 verification costs {:.1} % of auth-none throughput",
        100.0 * (1.0 - signed.rate() / plain.rate())
    );
    for (case, figures) in [
        ("baseline", &baseline),
        ("auth none", &plain),
        ("auth sigv4", &signed),
    ] {
        anyhow::ensure!(
            figures.errors == 0 && figures.requests > 0,
            "{case}: {} requests failed, {} completed: the figures are not worth reading",
            figures.errors,
            figures.requests
        );
    }
    Ok(())
}

const ACCESS_KEY_ID: &str = "AKIASLUICEBENCH00001";
const SECRET_ACCESS_KEY: &str = "bench/secret/key/for/sigv4/verification/only";

const AUTH_NONE: &str = "api: {auth: none}\n";
const AUTH_SIGV4: &str = concat!(
    "api:\n",
    "  auth: sigv4\n",
    "  principals:\n",
    "    bench:\n",
    "      access_key_id: AKIASLUICEBENCH00001\n",
    "      secret_access_key: ${BENCH_SECRET}\n",
    "      policy: {Statement: [{Effect: Allow, Action: \"lambda:InvokeFunction\", Resource: \"*\"}]}\n",
);

/// `shape` with the headers of a SigV4 signature by the bench principal, made now.
fn signed(shape: &Shape, addr: SocketAddr) -> anyhow::Result<Shape> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    use aws_sigv4::sign::v4;

    let identity = aws_credential_types::Credentials::new(
        ACCESS_KEY_ID,
        SECRET_ACCESS_KEY,
        None,
        None,
        "bench",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("lambda")
        .time(std::time::SystemTime::now())
        .settings(SigningSettings::default())
        .build()?
        .into();
    let uri = format!("http://{addr}{}", shape.path);
    let host = addr.to_string();
    let mut headers: Vec<(String, String)> = shape.headers.clone();
    headers.push(("host".into(), host));
    let signable = SignableRequest::new(
        "POST",
        &uri,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(PAYLOAD),
    )?;
    let (instructions, _) = sign(signable, &params)?.into_parts();
    let mut out = shape.clone();
    for (name, value) in instructions.headers() {
        out.headers.push((name.to_owned(), value.to_owned()));
    }
    Ok(out)
}

fn report(case: &str, f: &Figures) {
    println!(
        "{case:<28} {:>10.0} {:>10.2?} {:>10.2?} {:>8}",
        f.rate(),
        f.percentile(0.50),
        f.percentile(0.99),
        f.errors
    );
}

async fn start_sluice(dir: &std::path::Path, api: &str) -> anyhow::Result<sluice::Running> {
    let yaml = format!(
        "{api}state: sqlite://{}/state.db\nfunctions:\n  {FUNCTION}: {{runtime: native}}\n",
        dir.display()
    );
    let env = |name: &str| (name == "BENCH_SECRET").then(|| SECRET_ACCESS_KEY.to_owned());
    let config = sluice_config::parse_str(&yaml, "<bench>", dir, &env)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut native = NativeRegistry::new();
    native.register(FUNCTION, |event: Value, _ctx| async move { Ok(event) });
    let running = sluice::start(
        config,
        StartOptions {
            listen: Some("127.0.0.1:0".parse()?),
            native,
            data_dir: Some(dir.to_path_buf()),
            ..Default::default()
        },
    )
    .await?;
    Ok(running)
}

/// A hyper server that answers every request with the payload, as Sluice's no-op function
/// would, after reading the body.
async fn bare_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(body)))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// `connections` keep-alive connections each sending `shape` back to back for `duration`.
async fn load(addr: SocketAddr, shape: &Shape, connections: usize, duration: Duration) -> Figures {
    let shape = Arc::new(shape.clone());
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let shape = shape.clone();
        tasks.push(tokio::spawn(async move {
            connection(addr, &shape, deadline).await
        }));
    }
    let mut figures = Figures {
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for task in tasks {
        match task.await {
            Ok((latencies, errors)) => {
                figures.requests += latencies.len();
                figures.errors += errors;
                figures.latencies.extend(latencies);
            }
            Err(_) => figures.errors += 1,
        }
    }
    figures.elapsed = start.elapsed();
    figures.latencies.sort_unstable();
    figures
}

async fn connection(addr: SocketAddr, shape: &Shape, deadline: Instant) -> (Vec<Duration>, usize) {
    let mut latencies = Vec::new();
    let mut errors = 0;
    let Ok(stream) = TcpStream::connect(addr).await else {
        return (latencies, 1);
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
    else {
        return (latencies, 1);
    };
    tokio::spawn(conn);
    while Instant::now() < deadline {
        let mut request = Request::post(shape.path.as_str()).header("host", addr.to_string());
        for (name, value) in &shape.headers {
            request = request.header(name, value);
        }
        let Ok(request) = request.body(Full::new(Bytes::from_static(PAYLOAD))) else {
            return (latencies, errors + 1);
        };
        let begun = Instant::now();
        match sender.send_request(request).await {
            Ok(response) => {
                let ok = response.status().is_success();
                let _ = response.into_body().collect().await;
                if ok {
                    latencies.push(begun.elapsed());
                } else {
                    errors += 1;
                }
            }
            Err(_) => return (latencies, errors + 1),
        }
    }
    (latencies, errors)
}
