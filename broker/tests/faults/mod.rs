//! What the fault campaign (`fault_campaign.rs`) is built from: a recording function served by
//! the test itself (Sluice calls it as a `runtime: http` function, so every delivery is counted
//! in memory, even across kills of Sluice), the tally that turns sent, delivered and
//! dead-lettered record ids into one table row, the AWS JSON protocol spoken to moto, private
//! servers (a moto_server, a PostgreSQL cluster, a tansu) the campaign may stop and start
//! without disturbing the tests that share the common ones, and a TCP link that can be cut.
//!
//! Every record of the campaign carries an id `fc:<scenario>:<n>` in its payload; the tally
//! finds ids anywhere in an event or a dead letter (plain, or base64 as Kinesis, RabbitMQ and
//! Kafka records carry their data), so one recorder serves every source.

#![allow(dead_code)]

use crate::common::{Server, free_port};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;

/// The prefix of every record id of the campaign.
pub const ID_PREFIX: &str = "fc:";

/// Every campaign id in `value`: strings that are ids, or base64 of an id, at any depth.
pub fn ids_in(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::String(s) => {
            if let Some(id) = id_of(s) {
                out.insert(id);
            } else if let Ok(bytes) = B64.decode(s.as_bytes())
                && let Ok(text) = String::from_utf8(bytes)
            {
                if let Some(id) = id_of(&text) {
                    out.insert(id);
                } else if let Ok(inner) = serde_json::from_str::<Value>(&text) {
                    ids_in(&inner, out);
                }
            } else if s.starts_with('{')
                && let Ok(inner) = serde_json::from_str::<Value>(s)
            {
                ids_in(&inner, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| ids_in(v, out)),
        Value::Object(map) => map.values().for_each(|v| ids_in(v, out)),
        _ => {}
    }
}

fn id_of(text: &str) -> Option<String> {
    let text = text.trim_matches('"');
    (text.starts_with(ID_PREFIX) && !text.contains(char::is_whitespace)).then(|| text.to_string())
}

/// The records of one scenario, as far as the test can see them.
#[derive(Default)]
pub struct Tally {
    /// Ids the source accepted (a confirmed publish, a 202, a successful put).
    pub sent: BTreeSet<String>,
    /// Ids whose send got no answer (Sluice killed mid-request): they may or may not be in.
    pub uncertain: BTreeSet<String>,
    /// How many successful invocations carried each id.
    pub delivered: BTreeMap<String, usize>,
    /// Ids found in the dead letter destination.
    pub dead: BTreeSet<String>,
}

/// One line of the campaign's table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub records_in: usize,
    pub delivered: usize,
    pub dead_lettered: usize,
    pub lost: usize,
    pub duplicates: usize,
    /// What else the scenario saw (kills, errors while a server was down), for the report.
    pub note: String,
    /// Records not delivered for a known reason outside Sluice (`KNOWN STALL`), printed, and
    /// not counted as lost once shown to be still owed by the source.
    pub known_stall: Option<String>,
}

impl Tally {
    /// Ids that were sent and reached no final outcome.
    pub fn missing(&self) -> Vec<String> {
        self.sent
            .iter()
            .filter(|id| !self.delivered.contains_key(*id) && !self.dead.contains(*id))
            .cloned()
            .collect()
    }

    pub fn row(&self, scenario: &str, note: String) -> Row {
        // An id sent without an answer that did arrive was taken after all.
        let records_in: BTreeSet<&String> = self
            .sent
            .iter()
            .chain(
                self.uncertain
                    .iter()
                    .filter(|id| self.delivered.contains_key(*id) || self.dead.contains(*id)),
            )
            .collect();
        let delivered = records_in
            .iter()
            .filter(|id| self.delivered.contains_key(**id))
            .count();
        let dead_lettered = records_in
            .iter()
            .filter(|id| !self.delivered.contains_key(**id) && self.dead.contains(**id))
            .count();
        let duplicates = self.delivered.values().map(|n| n - 1).sum();
        Row {
            scenario: scenario.to_string(),
            records_in: records_in.len(),
            delivered,
            dead_lettered,
            lost: self.missing().len(),
            duplicates,
            note,
            known_stall: None,
        }
    }
}

/// What the recording function does with one invocation's ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Succeed,
    /// HTTP 500: a function error, so the batch is retried or dead-lettered.
    Fail,
}

type Rule = Arc<dyn Fn(&BTreeSet<String>) -> Answer + Send + Sync>;

struct Route {
    delivered: BTreeMap<String, usize>,
    invocations: usize,
    delay: Duration,
    rule: Rule,
}

/// The recording function: `POST /<scenario>` with a Lambda event. It answers after the
/// scenario's delay; on success it counts every id of the event once.
#[derive(Clone)]
pub struct Recorder {
    routes: Arc<Mutex<BTreeMap<String, Route>>>,
    pub addr: SocketAddr,
}

impl Recorder {
    pub async fn start() -> Recorder {
        let routes: Arc<Mutex<BTreeMap<String, Route>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the recorder");
        let addr = listener.local_addr().expect("recorder address");
        let state = routes.clone();
        let app = axum::Router::new()
            .route(
                "/{*scenario}",
                axum::routing::post(
                    move |axum::extract::Path(scenario): axum::extract::Path<String>,
                          body: axum::body::Bytes| {
                        let routes = state.clone();
                        async move { record(&routes, &scenario, &body).await }
                    },
                ),
            )
            .layer(axum::extract::DefaultBodyLimit::max(16 << 20));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Recorder { routes, addr }
    }

    /// Registers a scenario; the function URL to put in its configuration.
    pub fn route(
        &self,
        scenario: &str,
        delay: Duration,
        rule: impl Fn(&BTreeSet<String>) -> Answer + Send + Sync + 'static,
    ) -> String {
        self.routes.lock().expect("routes").insert(
            scenario.to_string(),
            Route {
                delivered: BTreeMap::new(),
                invocations: 0,
                delay,
                rule: Arc::new(rule),
            },
        );
        format!("http://{}/{scenario}", self.addr)
    }

    pub fn delivered(&self, scenario: &str) -> BTreeMap<String, usize> {
        self.routes.lock().expect("routes")[scenario]
            .delivered
            .clone()
    }

    pub fn invocations(&self, scenario: &str) -> usize {
        self.routes.lock().expect("routes")[scenario].invocations
    }
}

async fn record(
    routes: &Mutex<BTreeMap<String, Route>>,
    scenario: &str,
    body: &[u8],
) -> (axum::http::StatusCode, String) {
    let event: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut ids = BTreeSet::new();
    ids_in(&event, &mut ids);
    let (delay, rule) = {
        let mut routes = routes.lock().expect("routes");
        let Some(route) = routes.get_mut(scenario) else {
            return (axum::http::StatusCode::NOT_FOUND, String::new());
        };
        route.invocations += 1;
        (route.delay, route.rule.clone())
    };
    tokio::time::sleep(delay).await;
    match rule(&ids) {
        Answer::Succeed => {
            let mut routes = routes.lock().expect("routes");
            if let Some(route) = routes.get_mut(scenario) {
                for id in ids {
                    *route.delivered.entry(id).or_default() += 1;
                }
            }
            (axum::http::StatusCode::OK, "{}".to_string())
        }
        Answer::Fail => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "refused by the campaign".to_string(),
        ),
    }
}

/// The ids in a JSON Lines file (a `file` dead letter); a torn last line is left for later.
pub fn ids_in_lines(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let mut ids = BTreeSet::new();
    for line in complete.lines() {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("{}: a line that is not JSON ({e}): {line}", path.display())
        });
        ids_in(&value, &mut ids);
    }
    ids
}

/// How many lines of a JSON Lines file carry each id (a function's own record of successes).
pub fn id_counts_in_lines(path: &Path) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let mut counts = BTreeMap::new();
    for line in complete.lines() {
        let mut ids = BTreeSet::new();
        if let Ok(value) = serde_json::from_str::<Value>(line) {
            ids_in(&value, &mut ids);
        }
        for id in ids {
            *counts.entry(id).or_default() += 1;
        }
    }
    counts
}

/// A small xorshift generator: the campaign's random instants, from a seed it prints.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    /// A duration in `[lo, hi)`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span))
    }
}

/// Waits until `done` answers true, every 50 ms; false after `limit`.
pub async fn wait_for<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut done: impl FnMut() -> F,
) -> bool {
    let started = Instant::now();
    loop {
        if done().await {
            return true;
        }
        if started.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client")
}

/// One call in an AWS JSON protocol (SQS, Kinesis, DynamoDB) to moto at `endpoint`. moto tells
/// the service from the Authorization header's credential scope and checks no signature.
pub async fn aws(
    http: &reqwest::Client,
    endpoint: &str,
    service: &str,
    target: &str,
    body: Value,
) -> Result<Value, String> {
    let (prefix, content_type) = match service {
        "sqs" => ("AmazonSQS", "application/x-amz-json-1.0"),
        "kinesis" => ("Kinesis_20131202", "application/x-amz-json-1.1"),
        "dynamodb" => ("DynamoDB_20120810", "application/x-amz-json-1.0"),
        other => panic!("no JSON protocol for {other}"),
    };
    let response = http
        .post(endpoint)
        .header("X-Amz-Target", format!("{prefix}.{target}"))
        .header("Content-Type", content_type)
        .header(
            "Authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0"
            ),
        )
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("{target}: {e}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(format!("{target}: {status}: {text}"));
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).map_err(|e| format!("{target}: {e}: {text}"))
}

/// Waits until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16, limit: Duration) -> bool {
    wait_for(limit, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await
}

/// A moto_server of the campaign's own, from the test virtualenv (`SLUICE_TEST_VENV`).
pub struct PrivateMoto {
    pub child: Server,
    pub url: String,
}

impl PrivateMoto {
    pub async fn start(log: &Path) -> PrivateMoto {
        let venv = std::env::var("SLUICE_TEST_VENV").unwrap_or_else(|_| {
            panic!("SLUICE_TEST_VENV is not set: run the campaign with scripts/test")
        });
        let port = free_port();
        let log = std::fs::File::create(log).expect("moto log");
        let child = std::process::Command::new(Path::new(&venv).join("bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start a private moto_server");
        let child = Server(child);
        // moto imports all of its services at start: seconds on a quiet machine, far more on a
        // loaded one.
        assert!(
            wait_for_port(port, Duration::from_secs(90)).await,
            "the private moto_server did not listen within 90 s"
        );
        PrivateMoto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

/// A TCP link between Sluice and a server that the campaign can cut: while cut, every open
/// connection is dropped and new ones are closed as soon as they are accepted (the server
/// looks down to Sluice; the server itself, and what it holds, are untouched).
#[derive(Clone)]
pub struct Link {
    pub port: u16,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Link {
    pub async fn start(upstream: SocketAddr) -> Link {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the link");
        let port = listener.local_addr().expect("link address").port();
        let (cut, _) = tokio::sync::watch::channel(false);
        let cut = Arc::new(cut);
        let watch = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *watch.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut cut = watch.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Link { port, cut }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// A PostgreSQL cluster of the campaign's own (initdb + pg_ctl from the installed server, run
/// as the `postgres` user), on a free port, in a temporary directory; stopped when dropped.
pub struct PrivatePostgres {
    pub dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
}

impl PrivatePostgres {
    /// Fails with the reason when no PostgreSQL server binaries are installed or the cluster
    /// does not start.
    pub fn start() -> Result<PrivatePostgres, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("/usr/lib/postgresql: {e}"))?
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .ok_or("no /usr/lib/postgresql/*/bin/initdb")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        // The postgres user must own the cluster and reach it through the temp directory.
        let chown = |path: &Path| {
            std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(path)
                .status()
        };
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(|e| e.to_string())?;
        chown(dir.path()).map_err(|e| e.to_string())?;
        let port = free_port();
        let pg = PrivatePostgres { dir, port, bin };
        pg.as_postgres(
            "initdb",
            &[
                "-D",
                &pg.data().to_string_lossy(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )?;
        pg.pg_ctl_start()?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn as_postgres(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .map_err(|e| format!("runuser {program}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} {args:?}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn pg_ctl_start(&self) -> Result<(), String> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-l",
                &self.dir.path().join("log").to_string_lossy(),
                "-o",
                &options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        )
    }

    /// Stops the server the hard way (`immediate`: no checkpoint, connections cut), as a crash
    /// or a failover would.
    pub fn pg_ctl_stop(&self) -> Result<(), String> {
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl_stop();
    }
}

/// The peak resident memory (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
