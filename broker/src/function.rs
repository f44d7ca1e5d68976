//! Functions as the rest of Sluice sees them: `$LATEST` and published versions, each a
//! runtime with its own warm environments; aliases that route between versions; and
//! Lambda's concurrency limits, metrics and log lines around every invocation.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::{Counter, Gauge, Histogram};
use serde::{Deserialize, Serialize};
use sluice_config::{Config, ConfigError, FunctionConfig, Runtime};
use thiserror::Error;
use tokio::sync::Semaphore;

use crate::concurrency::Concurrency;
pub use crate::concurrency::Throttle;
use crate::invocation::{FunctionError, Invocation, REGION, function_arn};
use crate::metrics as m;
use crate::runtime::memory::MemoryCap;
use crate::runtime::native::{NativeRegistry, NativeRunner};
use crate::runtime::package::{self, SizeLimits};
use crate::runtime::process::{Lifecycle, ProcessRunner, ProcessSpec};
use crate::runtime::{Runner, http::HttpRunner};
use crate::state::{AliasRecord, StateError, StateStore, VersionRecord};

pub const LATEST: &str = "$LATEST";

/// The result of one invocation that ran.
#[derive(Debug)]
pub struct InvokeOutcome {
    pub request_id: String,
    pub result: Result<Bytes, FunctionError>,
    /// Lambda's log for this invocation: START, the function's output, END and REPORT; empty
    /// unless the invocation asked for it (`Invocation::want_log`).
    pub log: Vec<u8>,
    pub duration: Duration,
    pub executed_version: String,
}

/// What a version runs: the part of a function's configuration a published version freezes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionConfig {
    pub runtime: String,
    /// The directory the function runs in (for `$LATEST` the package, unpacked if it was a
    /// zip; for a published version its own copy).
    pub task_root: Option<PathBuf>,
    pub command: Option<Vec<String>>,
    pub handler: Option<String>,
    pub memory_mb: u32,
    pub timeout_ms: u64,
    pub environment: BTreeMap<String, String>,
    pub url: Option<String>,
    pub description: Option<String>,
    /// The size of the function's `/tmp`; versions published before it existed get the
    /// default.
    #[serde(default = "default_ephemeral_storage")]
    pub ephemeral_storage: u64,
}

fn default_ephemeral_storage() -> u64 {
    sluice_config::defaults::EPHEMERAL_STORAGE
}

impl VersionConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

struct VersionMetrics {
    invocations: Counter,
    errors: Counter,
    duration: Histogram,
    concurrent: Gauge,
}

impl VersionMetrics {
    fn new(name: &str, version: &str) -> Self {
        let labels = [
            ("function", name.to_string()),
            ("version", version.to_string()),
        ];
        Self {
            invocations: metrics::counter!(m::FUNCTION_INVOCATIONS, &labels),
            errors: metrics::counter!(m::FUNCTION_ERRORS, &labels),
            duration: metrics::histogram!(m::FUNCTION_DURATION, &labels),
            concurrent: metrics::gauge!(m::FUNCTION_CONCURRENT_EXECUTIONS, &labels),
        }
    }
}

/// One runnable version of a function (`$LATEST` or a number).
pub struct Instance {
    pub version: String,
    pub config: VersionConfig,
    pub code_sha256: String,
    pub description: String,
    pub last_modified: String,
    runner: Runner,
    metrics: VersionMetrics,
}

/// How runners are made, shared by `$LATEST` and published versions.
struct RunnerFactory {
    memory: MemoryCap,
    native: NativeRegistry,
    lifecycle: Arc<Lifecycle>,
    /// Each function's start slots, shared by all its versions.
    function_starts: HashMap<String, Arc<Semaphore>>,
    /// What each `process` function may reach, the same for all its versions: a role's keys
    /// are not snapshotted into the state store with a version.
    isolation: HashMap<String, Isolation>,
}

/// What a function's environments may reach: its role's keys, its user, its network.
#[derive(Debug, Clone, Default)]
struct Isolation {
    credentials: Vec<(&'static str, sluice_config::Secret)>,
    user: Option<crate::runtime::user::UserIds>,
    network: sluice_config::Network,
}

/// The isolation of every `process` function, with an error for each `run_as` that cannot be
/// honoured. Dynamic users go to functions in the order of their names (see `runtime::user`).
fn isolation_of(config: &Config, errors: &mut Vec<ConfigError>) -> HashMap<String, Isolation> {
    use crate::runtime::user;
    let root = user::running_as_root();
    let mut resolved = HashMap::new();
    for (name, fc) in &config.functions {
        let Some(run_as) = &fc.run_as else { continue };
        let at = format!("functions.{name}.run_as");
        if !root {
            // SAFETY: geteuid has no preconditions.
            let uid = unsafe { libc::geteuid() };
            errors.push(config.error_at(&at, format!(
                "run_as needs Sluice to run as root, and it runs as uid {uid}: it cannot change users, so every function runs as uid {uid}; remove run_as"
            )));
            continue;
        }
        match user::resolve(&run_as.user, run_as.group.as_deref()) {
            Ok(ids) => {
                resolved.insert(name.clone(), ids);
            }
            Err(message) => errors.push(config.error_at(&at, message)),
        }
    }
    let mut dynamic = user::DynamicIds::new(resolved.values().map(|ids| ids.uid).collect());
    let mut isolation = HashMap::new();
    for (name, fc) in &config.functions {
        if fc.runtime != Runtime::Process {
            continue;
        }
        if fc.network == sluice_config::Network::None && !root {
            errors.push(config.error_at(
                &format!("functions.{name}.network"),
                "network: none needs Sluice to run as root (a network namespace of the function's own needs CAP_SYS_ADMIN); use network: host",
            ));
        }
        let user = match resolved.get(name) {
            Some(ids) => Some(*ids),
            None if root && fc.run_as.is_none() => {
                let ids = dynamic.allocate();
                if ids.is_none() {
                    errors.push(config.error_at(
                        &format!("functions.{name}"),
                        format!(
                            "no free user id left in {}–{} for this function: give it a run_as",
                            user::DYNAMIC_IDS.start(),
                            user::DYNAMIC_IDS.end()
                        ),
                    ));
                }
                ids
            }
            None => None,
        };
        let mut credentials = Vec::new();
        if let Some(role) = fc.role.as_ref().and_then(|r| config.roles.get(r)) {
            credentials.push((
                "AWS_ACCESS_KEY_ID",
                sluice_config::Secret::new(role.access_key_id.clone()),
            ));
            credentials.push(("AWS_SECRET_ACCESS_KEY", role.secret_access_key.clone()));
            if let Some(token) = &role.session_token {
                credentials.push(("AWS_SESSION_TOKEN", token.clone()));
            }
        }
        isolation.insert(
            name.clone(),
            Isolation {
                credentials,
                user,
                network: fc.network,
            },
        );
    }
    isolation
}

impl RunnerFactory {
    fn runner(&self, name: &str, version: &str, vc: &VersionConfig) -> Result<Runner, String> {
        match vc.runtime.as_str() {
            "process" => {
                let task_root = vc
                    .task_root
                    .clone()
                    .ok_or("missing field `package` (required for runtime `process`)")?;
                let isolation = self.isolation.get(name).cloned().unwrap_or_default();
                let spec = ProcessSpec {
                    function_name: name.to_string(),
                    version: version.to_string(),
                    memory_mb: vc.memory_mb,
                    timeout: vc.timeout(),
                    task_root,
                    argv: vc
                        .command
                        .clone()
                        .unwrap_or_else(|| vec!["./bootstrap".to_string()]),
                    handler: vc.handler.clone().unwrap_or_default(),
                    environment: vc.environment.clone(),
                    region: REGION.to_string(),
                    ephemeral_storage: vc.ephemeral_storage,
                    credentials: isolation.credentials,
                    user: isolation.user,
                    network: isolation.network,
                };
                let starts = self
                    .function_starts
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Semaphore::new(1)));
                Ok(Runner::Process(ProcessRunner::new(
                    spec,
                    self.memory.clone(),
                    self.lifecycle.clone(),
                    starts,
                )))
            }
            "http" => {
                let url = vc
                    .url
                    .clone()
                    .ok_or("missing field `url` (required for runtime `http`)")?;
                HttpRunner::new(url, vc.timeout())
                    .map(Runner::Http)
                    .map_err(|e| format!("cannot build an HTTP client: {e}"))
            }
            "native" => {
                let handler = vc.handler.clone().unwrap_or_else(|| name.to_string());
                self.native
                    .get(&handler)
                    .map(|h| {
                        Runner::Native(NativeRunner::new(
                            h,
                            name.to_string(),
                            vc.memory_mb,
                            vc.timeout(),
                        ))
                    })
                    .ok_or_else(|| format!("no native handler named `{handler}` is registered"))
            }
            other => Err(format!("unknown runtime `{other}`")),
        }
    }

    fn instance(
        &self,
        name: &str,
        version: &str,
        config: VersionConfig,
        code_sha256: String,
        last_modified: String,
    ) -> Result<Instance, String> {
        let runner = self.runner(name, version, &config)?;
        Ok(Instance {
            version: version.to_string(),
            description: config.description.clone().unwrap_or_default(),
            config,
            code_sha256,
            last_modified,
            runner,
            metrics: VersionMetrics::new(name, version),
        })
    }
}

pub struct Function {
    pub name: String,
    pub arn: String,
    pub config: FunctionConfig,
    latest: Arc<Instance>,
    versions: RwLock<BTreeMap<u32, Arc<Instance>>>,
    aliases: RwLock<BTreeMap<String, AliasRecord>>,
    concurrency: Arc<Concurrency>,
    throttles: Counter,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// A uniform number in [0, 1) for weighted alias routing.
fn unit_random() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

impl Function {
    /// The instance a qualifier names: nothing or `$LATEST`, a version number, or an alias
    /// (picking the alias's second version with its weight).
    pub fn resolve(&self, qualifier: Option<&str>) -> Option<Arc<Instance>> {
        match qualifier {
            None | Some(LATEST) => Some(self.latest.clone()),
            Some(q) if q.bytes().all(|b| b.is_ascii_digit()) => {
                read(&self.versions).get(&q.parse().ok()?).cloned()
            }
            Some(alias) => {
                let target = {
                    let aliases = read(&self.aliases);
                    let a = aliases.get(alias)?;
                    let mut target = a.version.clone();
                    let mut roll = unit_random();
                    for (version, weight) in &a.weights {
                        if roll < *weight {
                            target = version.clone();
                            break;
                        }
                        roll -= weight;
                    }
                    target
                };
                self.resolve(Some(&target))
            }
        }
    }

    pub fn latest(&self) -> &Arc<Instance> {
        &self.latest
    }

    pub fn versions(&self) -> Vec<Arc<Instance>> {
        read(&self.versions).values().cloned().collect()
    }

    pub fn aliases(&self) -> Vec<AliasRecord> {
        read(&self.aliases).values().cloned().collect()
    }

    pub fn alias(&self, name: &str) -> Option<AliasRecord> {
        read(&self.aliases).get(name).cloned()
    }

    pub fn reserved_concurrency(&self) -> Option<u32> {
        self.concurrency.reserved(&self.name)
    }

    /// How many more invocations could start now.
    pub fn available_concurrency(&self) -> u32 {
        self.concurrency.available(&self.name)
    }

    /// Runs one invocation on `instance`, or refuses it when a concurrency limit is reached.
    pub async fn invoke(
        &self,
        instance: &Instance,
        inv: Invocation,
    ) -> Result<InvokeOutcome, Throttle> {
        let _permit = self
            .concurrency
            .try_acquire(&self.name)
            .inspect_err(|_| self.throttles.increment(1))?;
        let metrics = &instance.metrics;
        let running = crate::concurrency::RunningInvocation::start(
            metrics.concurrent.clone(),
            metrics.invocations.clone(),
        );
        let started = Instant::now();
        let executed = instance.runner.invoke(&inv, &instance.version).await;
        let elapsed = started.elapsed();
        let executed = match executed {
            Ok(executed) => {
                drop(running);
                executed
            }
            Err(throttle) => {
                running.throttled();
                self.throttles.increment(1);
                return Err(throttle);
            }
        };
        let duration = elapsed.saturating_sub(executed.init_duration.unwrap_or_default());
        metrics.duration.record(duration.as_secs_f64());
        if let Err(e) = &executed.result {
            metrics.errors.increment(1);
            tracing::warn!(function = %self.name, version = %instance.version, request_id = %inv.request_id,
                error_type = %e.error_type, error = %e.error_message, "invocation failed");
        }
        if !executed.output.is_empty() {
            for line in String::from_utf8_lossy(&executed.output).lines() {
                tracing::info!(function = %self.name, request_id = %inv.request_id, "{line}");
            }
        }
        let log = if inv.want_log {
            lambda_log(
                &inv.request_id,
                &instance.version,
                &executed.output,
                duration,
                instance.config.memory_mb,
                executed.max_memory_bytes,
                executed.init_duration,
            )
        } else {
            Vec::new()
        };
        Ok(InvokeOutcome {
            request_id: inv.request_id,
            result: executed.result,
            log,
            duration,
            executed_version: instance.version.clone(),
        })
    }

    fn shutdown(&self) {
        self.latest.runner.shutdown();
        for v in read(&self.versions).values() {
            v.runner.shutdown();
        }
    }
}

/// Lambda's log lines around a function's own output.
fn lambda_log(
    request_id: &str,
    version: &str,
    output: &[u8],
    duration: Duration,
    memory_mb: u32,
    max_memory_bytes: Option<u64>,
    init_duration: Option<Duration>,
) -> Vec<u8> {
    let mut log = Vec::with_capacity(output.len() + 256);
    log.extend_from_slice(format!("START RequestId: {request_id} Version: {version}\n").as_bytes());
    log.extend_from_slice(output);
    if !output.is_empty() && !output.ends_with(b"\n") {
        log.push(b'\n');
    }
    log.extend_from_slice(format!("END RequestId: {request_id}\n").as_bytes());
    let ms = duration.as_secs_f64() * 1000.0;
    let billed = ms.ceil().max(1.0) as u64;
    let used_mb = max_memory_bytes.map_or(0, |b| b.div_ceil(1024 * 1024));
    let mut report = format!(
        "REPORT RequestId: {request_id}\tDuration: {ms:.2} ms\tBilled Duration: {billed} ms\tMemory Size: {memory_mb} MB\tMax Memory Used: {used_mb} MB\t"
    );
    if let Some(init) = init_duration {
        report.push_str(&format!(
            "Init Duration: {:.2} ms\t",
            init.as_secs_f64() * 1000.0
        ));
    }
    report.push('\n');
    log.extend_from_slice(report.as_bytes());
    log
}

/// Why the functions of a configuration could not be built.
#[derive(Debug, Error)]
#[error("{}", .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct BuildError {
    pub errors: Vec<ConfigError>,
}

/// A refused management request, mapped one to one onto Lambda's error types.
#[derive(Debug, Error)]
pub enum ManageError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Io(String),
}

/// All functions of a configuration, by name.
pub struct Functions {
    by_name: HashMap<String, Arc<Function>>,
    concurrency: Arc<Concurrency>,
    factory: RunnerFactory,
    data_dir: PathBuf,
    limits: SizeLimits,
    store: OnceLock<Arc<dyn StateStore>>,
}

fn snapshot_of(fc: &FunctionConfig, task_root: Option<PathBuf>) -> VersionConfig {
    VersionConfig {
        runtime: match fc.runtime {
            Runtime::Process => "process",
            Runtime::Http => "http",
            Runtime::Native => "native",
        }
        .to_string(),
        task_root,
        command: fc.command.clone(),
        handler: fc.handler.clone(),
        memory_mb: fc.memory_mb,
        timeout_ms: u64::try_from(fc.timeout.as_millis()).unwrap_or(u64::MAX),
        environment: fc.environment.clone(),
        url: fc.url.clone(),
        description: fc.description.clone(),
        ephemeral_storage: fc.ephemeral_storage,
    }
}

fn now_text() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3f+0000")
        .to_string()
}

impl Functions {
    /// Builds every function, reporting all problems together: missing packages, unknown
    /// native handlers, concurrency reservations that leave too little unreserved.
    pub fn build(
        config: &Config,
        native: &NativeRegistry,
        data_dir: &Path,
    ) -> Result<Self, BuildError> {
        let mut errors = Vec::new();
        let isolation = isolation_of(config, &mut errors);
        let factory = RunnerFactory {
            memory: MemoryCap::detect(),
            native: native.clone(),
            lifecycle: Arc::new(Lifecycle {
                starts: Arc::new(Semaphore::new(config.limits.environment_starts as usize)),
                idle_timeout: config.limits.idle_timeout,
                scratch: data_dir.join("tmp"),
            }),
            function_starts: config
                .functions
                .iter()
                .map(|(name, fc)| {
                    let starts = fc.environment_starts.min(config.limits.environment_starts);
                    (name.clone(), Arc::new(Semaphore::new(starts as usize)))
                })
                .collect(),
            isolation,
        };
        tracing::debug!(memory = %factory.memory.describe(), "memory caps");
        crate::runtime::sandbox::remove_stale(&factory.lifecycle.scratch);
        let concurrency = Concurrency::new(config.concurrency.limit);
        let limits = SizeLimits {
            zipped: config.limits.package_zipped,
            unpacked: config.limits.package_unpacked,
        };
        let mut by_name = HashMap::new();
        for (name, fc) in &config.functions {
            if let Err(message) = concurrency.set_reserved(name, fc.reserved_concurrency) {
                errors.push(config.error_at(
                    &format!("functions.{name}.reserved_concurrency"),
                    format!(
                        "{message} (concurrency.limit is {})",
                        config.concurrency.limit
                    ),
                ));
            }
            let task_root = match (&fc.runtime, &fc.package) {
                (Runtime::Process, Some(pkg)) => {
                    match package::prepare(pkg, limits, &data_dir.join("packages")) {
                        Ok(dir) => Some(dir),
                        Err(e) => {
                            errors.push(
                                config
                                    .error_at(&format!("functions.{name}.package"), e.to_string()),
                            );
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let snapshot = snapshot_of(fc, task_root);
            let code_sha256 = snapshot
                .task_root
                .as_deref()
                .and_then(|root| package::tree_sha256(root, limits.unpacked).ok())
                .unwrap_or_default();
            let latest = match factory.instance(name, LATEST, snapshot, code_sha256, now_text()) {
                Ok(i) => i,
                Err(message) => {
                    let at = if fc.runtime == Runtime::Native && fc.handler.is_some() {
                        format!("functions.{name}.handler")
                    } else {
                        format!("functions.{name}")
                    };
                    errors.push(config.error_at(&at, message));
                    continue;
                }
            };
            let labels = [("function", name.clone())];
            by_name.insert(
                name.clone(),
                Arc::new(Function {
                    name: name.clone(),
                    arn: function_arn(name),
                    config: fc.clone(),
                    latest: Arc::new(latest),
                    versions: RwLock::new(BTreeMap::new()),
                    aliases: RwLock::new(BTreeMap::new()),
                    concurrency: concurrency.clone(),
                    throttles: metrics::counter!(m::FUNCTION_THROTTLES, &labels),
                }),
            );
        }
        if errors.is_empty() {
            let in_use: Vec<&Path> = by_name
                .values()
                .filter_map(|f: &Arc<Function>| f.latest.config.task_root.as_deref())
                .collect();
            package::remove_unused(&data_dir.join("packages"), &in_use);
            Ok(Self {
                by_name,
                concurrency,
                factory,
                data_dir: data_dir.to_path_buf(),
                limits,
                store: OnceLock::new(),
            })
        } else {
            Err(BuildError { errors })
        }
    }

    /// Brings in what the state store remembers: published versions, aliases made through the
    /// API, concurrency set through the API; then applies the aliases the file declares.
    pub async fn attach_store(
        &self,
        store: Arc<dyn StateStore>,
        config: &Config,
    ) -> Result<(), BuildError> {
        let _ = self.store.set(store.clone());
        let mut errors = Vec::new();
        let state_error = |e: StateError| config.error_at("state", e.to_string());
        for f in self.by_name.values() {
            let versions = match store.versions(&f.name).await {
                Ok(v) => v,
                Err(e) => {
                    errors.push(state_error(e));
                    continue;
                }
            };
            for record in versions {
                match self.instance_from_record(&record) {
                    Ok(instance) => {
                        write(&f.versions).insert(record.version, Arc::new(instance));
                    }
                    Err(message) => errors.push(config.error_at(
                        &format!("functions.{}", f.name),
                        format!("published version {} cannot run: {message}", record.version),
                    )),
                }
            }
            match store.aliases(&f.name).await {
                Ok(aliases) => {
                    let mut map = write(&f.aliases);
                    for a in aliases {
                        map.insert(a.name.clone(), a);
                    }
                }
                Err(e) => errors.push(state_error(e)),
            }
            match store.concurrency(&f.name).await {
                Ok(Some(reserved)) => {
                    if let Err(message) = self.concurrency.set_reserved(&f.name, reserved) {
                        tracing::warn!(function = %f.name, "reserved concurrency set through the API no longer fits: {message}");
                    }
                }
                Ok(None) => {}
                Err(e) => errors.push(state_error(e)),
            }
            for (alias, ac) in &f.config.aliases {
                let at = format!("functions.{}.aliases.{alias}", f.name);
                let weights: Vec<(String, f64)> = ac
                    .additional_version_weights
                    .iter()
                    .map(|(v, w)| (v.clone(), *w))
                    .collect();
                // The file declares where the alias should point; a version not yet published
                // makes the alias answer "not found" until it is, rather than keep Sluice
                // from starting (nothing can be published before the first start).
                for v in std::iter::once(&ac.version).chain(weights.iter().map(|(v, _)| v)) {
                    if f.resolve(Some(v)).is_none() {
                        tracing::warn!(function = %f.name, alias = %alias, version = %v,
                            "{at} points at version {v}, which is not published yet: publish it (`sluice publish {}`)", f.name);
                    }
                }
                let record = AliasRecord {
                    function: f.name.clone(),
                    name: alias.clone(),
                    version: ac.version.clone(),
                    weights,
                    description: ac.description.clone().unwrap_or_default(),
                    revision_id: uuid::Uuid::new_v4().to_string(),
                };
                if let Err(e) = store.put_alias(&record).await {
                    errors.push(state_error(e));
                }
                write(&f.aliases).insert(alias.clone(), record);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(BuildError { errors })
        }
    }

    fn instance_from_record(&self, record: &VersionRecord) -> Result<Instance, String> {
        let config: VersionConfig =
            serde_json::from_str(&record.snapshot).map_err(|e| e.to_string())?;
        self.factory.instance(
            &record.function,
            &record.version.to_string(),
            config,
            record.code_sha256.clone(),
            record.created_at.clone(),
        )
    }

    fn store(&self) -> Result<&Arc<dyn StateStore>, ManageError> {
        self.store
            .get()
            .ok_or_else(|| ManageError::InvalidParameter("no state store is attached".into()))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Function>> {
        self.by_name.get(name)
    }

    fn function(&self, name: &str) -> Result<&Arc<Function>, ManageError> {
        self.get(name).ok_or_else(|| {
            ManageError::NotFound(format!("Function not found: {}", function_arn(name)))
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Function>> {
        self.by_name.values()
    }

    pub fn account_limit(&self) -> u32 {
        self.concurrency.limit()
    }

    /// Publishes `$LATEST` as a new immutable version: its code is copied and its
    /// configuration frozen. As in Lambda, publishing again without a change returns the last
    /// version instead of making a new one. With `expected_sha256`, publishes only if the code
    /// of `$LATEST` still has that hash.
    pub async fn publish_version(
        &self,
        name: &str,
        description: Option<&str>,
        expected_sha256: Option<&str>,
    ) -> Result<Arc<Instance>, ManageError> {
        let f = self.function(name)?;
        let store = self.store()?.clone();
        let latest = f.latest.clone();
        // The package of $LATEST may have changed on disk since start: hash it as it is now.
        let code_sha256 = match latest.config.task_root.clone() {
            Some(root) => {
                let limit = self.limits.unpacked;
                tokio::task::spawn_blocking(move || package::tree_sha256(&root, limit))
                    .await
                    .map_err(|e| ManageError::Io(e.to_string()))?
                    .map_err(|e| package_error(name, e))?
            }
            None => String::new(),
        };
        if let Some(expected) = expected_sha256.filter(|e| *e != code_sha256) {
            return Err(ManageError::InvalidParameter(format!(
                "CodeSHA256 ({expected}) is different from current CodeSHA256 in $LATEST ({code_sha256}). Please try again with the CodeSHA256 in $LATEST."
            )));
        }
        if let Some(last) = f.versions().last() {
            let same_config = VersionConfig {
                task_root: None,
                ..last.config.clone()
            } == VersionConfig {
                task_root: None,
                description: last.config.description.clone(),
                ..latest.config.clone()
            };
            if same_config && last.code_sha256 == code_sha256 {
                return Ok(last.clone());
            }
        }
        let mut frozen = latest.config.clone();
        if let Some(root) = &latest.config.task_root {
            let target = self
                .data_dir
                .join("versions")
                .join(name)
                .join(uuid::Uuid::new_v4().simple().to_string());
            let (src, dst, limit) = (root.clone(), target.clone(), self.limits.unpacked);
            tokio::task::spawn_blocking(move || {
                let copied = package::copy_tree(&src, &dst, limit);
                if copied.is_err() {
                    // A half-made copy is of no use to anyone.
                    package::remove_tree(&dst);
                }
                copied
            })
            .await
            .map_err(|e| ManageError::Io(e.to_string()))?
            .map_err(|e| package_error(name, e))?;
            frozen.task_root = Some(target);
        }
        if let Some(d) = description {
            frozen.description = Some(d.to_string());
        }
        let snapshot =
            serde_json::to_string(&frozen).map_err(|e| ManageError::Io(e.to_string()))?;
        let record = store
            .publish_version(
                name,
                &snapshot,
                &code_sha256,
                description.unwrap_or_default(),
            )
            .await?;
        let instance = Arc::new(
            self.instance_from_record(&record)
                .map_err(ManageError::InvalidParameter)?,
        );
        write(&f.versions).insert(record.version, instance.clone());
        Ok(instance)
    }

    fn check_alias_target(
        f: &Function,
        version: &str,
        weights: &[(String, f64)],
    ) -> Result<(), ManageError> {
        for v in std::iter::once(version).chain(weights.iter().map(|(v, _)| v.as_str())) {
            if f.resolve(Some(v)).is_none()
                || !(v == LATEST || v.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(ManageError::NotFound(format!(
                    "Function not found: {}:{v}",
                    f.arn
                )));
            }
        }
        if weights.len() > 1
            || weights
                .iter()
                .any(|(v, w)| !(0.0..=1.0).contains(w) || v == version || v == LATEST)
        {
            return Err(ManageError::InvalidParameter(
                "RoutingConfig takes one additional version, other than the alias's own and not $LATEST, with a weight between 0.0 and 1.0".into(),
            ));
        }
        Ok(())
    }

    pub async fn create_alias(
        &self,
        name: &str,
        alias: &str,
        version: &str,
        weights: Vec<(String, f64)>,
        description: &str,
    ) -> Result<AliasRecord, ManageError> {
        let f = self.function(name)?;
        if !valid_alias_name(alias) {
            return Err(ManageError::InvalidParameter(format!(
                "1 validation error detected: Value '{alias}' at 'name' failed to satisfy constraint: Member must satisfy regular expression pattern: (?!^[0-9]+$)([a-zA-Z0-9-_]+)"
            )));
        }
        if f.alias(alias).is_some() {
            return Err(ManageError::Conflict(format!(
                "Alias already exists: {}:{alias}",
                f.arn
            )));
        }
        Self::check_alias_target(f, version, &weights)?;
        let record = AliasRecord {
            function: name.to_string(),
            name: alias.to_string(),
            version: version.to_string(),
            weights,
            description: description.to_string(),
            revision_id: uuid::Uuid::new_v4().to_string(),
        };
        self.store()?.put_alias(&record).await?;
        write(&f.aliases).insert(alias.to_string(), record.clone());
        Ok(record)
    }

    pub fn get_alias(&self, name: &str, alias: &str) -> Result<AliasRecord, ManageError> {
        let f = self.function(name)?;
        f.alias(alias)
            .ok_or_else(|| ManageError::NotFound(format!("Alias not found: {}:{alias}", f.arn)))
    }

    pub async fn update_alias(
        &self,
        name: &str,
        alias: &str,
        version: Option<&str>,
        weights: Option<Vec<(String, f64)>>,
        description: Option<&str>,
    ) -> Result<AliasRecord, ManageError> {
        let f = self.function(name)?;
        let mut record = self.get_alias(name, alias)?;
        if let Some(v) = version {
            record.version = v.to_string();
        }
        if let Some(w) = weights {
            record.weights = w;
        }
        if let Some(d) = description {
            record.description = d.to_string();
        }
        Self::check_alias_target(f, &record.version, &record.weights)?;
        record.revision_id = uuid::Uuid::new_v4().to_string();
        self.store()?.put_alias(&record).await?;
        write(&f.aliases).insert(alias.to_string(), record.clone());
        Ok(record)
    }

    pub async fn delete_alias(&self, name: &str, alias: &str) -> Result<(), ManageError> {
        let f = self.function(name)?;
        self.store()?.delete_alias(name, alias).await?;
        write(&f.aliases).remove(alias);
        Ok(())
    }

    pub async fn put_concurrency(
        &self,
        name: &str,
        reserved: Option<u32>,
    ) -> Result<(), ManageError> {
        let f = self.function(name)?;
        self.concurrency
            .set_reserved(&f.name, reserved)
            .map_err(ManageError::InvalidParameter)?;
        self.store()?.put_concurrency(name, reserved).await?;
        Ok(())
    }

    /// Retires every idle execution environment.
    pub fn shutdown(&self) {
        for f in self.by_name.values() {
            f.shutdown();
        }
    }
}

/// A package that cannot be published: its own fault (a link leaving it, a FIFO, too large)
/// is the caller's to fix; a failing disk is Sluice's.
fn package_error(name: &str, e: package::PackageError) -> ManageError {
    match e {
        package::PackageError::Io { .. } => {
            ManageError::Io(format!("cannot read the package of {name}: {e}"))
        }
        other => ManageError::InvalidParameter(other.to_string()),
    }
}

fn valid_alias_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.bytes().all(|b| b.is_ascii_digit())
}

impl Functions {
    /// Invokes `name` or `name:qualifier` synchronously, as a source does.
    pub fn invoke<'a>(
        &'a self,
        function: &'a str,
        payload: Bytes,
    ) -> sluice_connectors::DispatchFuture<'a> {
        use sluice_connectors::DispatchError;
        Box::pin(async move {
            let (name, qualifier) = match function.split_once(':') {
                Some((n, q)) => (n, Some(q)),
                None => (function, None),
            };
            let not_found = || DispatchError::NotFound(function.to_string());
            let f = self.get(name).ok_or_else(not_found)?;
            let instance = f.resolve(qualifier).ok_or_else(not_found)?;
            let arn = match qualifier {
                Some(q) => format!("{}:{q}", f.arn),
                None => f.arn.clone(),
            };
            let outcome = f
                .invoke(&instance, Invocation::new(payload, arn))
                .await
                .map_err(|t| DispatchError::Throttled(t.reason().to_string()))?;
            outcome.result.map_err(|e| DispatchError::Function {
                error_type: e.error_type,
                message: e.error_message,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_has_lambdas_lines_around_the_output() {
        let log = lambda_log(
            "abc",
            "$LATEST",
            b"hello\nworld",
            Duration::from_micros(1500),
            128,
            Some(20 * 1024 * 1024),
            Some(Duration::from_millis(12)),
        );
        let text = String::from_utf8(log).expect("utf8");
        assert_eq!(
            text,
            "START RequestId: abc Version: $LATEST\nhello\nworld\nEND RequestId: abc\nREPORT RequestId: abc\tDuration: 1.50 ms\tBilled Duration: 2 ms\tMemory Size: 128 MB\tMax Memory Used: 20 MB\tInit Duration: 12.00 ms\t\n"
        );
    }

    #[test]
    fn alias_names_follow_lambdas_pattern() {
        assert!(valid_alias_name("live"));
        assert!(valid_alias_name("blue-2_x"));
        assert!(!valid_alias_name("123"));
        assert!(!valid_alias_name("$LATEST"));
        assert!(!valid_alias_name(""));
    }

    #[test]
    fn tree_hash_depends_on_content_and_mode_not_location() {
        use std::os::unix::fs::PermissionsExt;
        let a = tempfile::tempdir().expect("a");
        let b = tempfile::tempdir().expect("b");
        for d in [a.path(), b.path()] {
            std::fs::write(d.join("bootstrap"), "#!/bin/sh\n").expect("write");
            std::fs::set_permissions(d.join("bootstrap"), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        assert_eq!(
            package::tree_sha256(a.path(), u64::MAX).expect("a"),
            package::tree_sha256(b.path(), u64::MAX).expect("b")
        );
        std::fs::set_permissions(
            b.path().join("bootstrap"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        assert_ne!(
            package::tree_sha256(a.path(), u64::MAX).expect("a"),
            package::tree_sha256(b.path(), u64::MAX).expect("b")
        );
    }
}
