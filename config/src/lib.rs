//! Sluice's configuration: the YAML schema, loading, `${VAR}` interpolation and validation.
//!
//! Loading is pure: it reads the file and the environment, never the network. Every problem in
//! a file is reported at once, each with its path (`functions.resize.timeout`) and its line and
//! column, before anything starts.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod cron_expr;
mod dead_letter;
mod decode;
mod encoding;
mod endpoints;
mod error;
pub mod filter;
mod host;
mod interpolate;
mod isolation;
mod mapping;
mod policy;
mod schema;
mod secret;
mod shell;
mod units;
mod yaml;

pub use encoding::MAX_FILE_SIZE;
pub use error::{ConfigError, ConfigErrors};
pub use host::{FUNCTION_PATH, check_host, on_function_path};
pub use isolation::{Network, RoleConfig, RunAs};
pub use policy::{Effect, Patterns, Policy, Statement, parse_policy_json};
pub use schema::SOURCE_TYPES;
pub use secret::Secret;
pub use units::{parse_duration, parse_size};

/// Every default in one place.
pub mod defaults {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    pub const LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9000);
    pub const STATE: &str = "sqlite://./data/sluice.db";
    /// Lambda's limit for a zipped deployment package, 50 MB.
    pub const PACKAGE_ZIPPED: u64 = 50_000_000;
    /// Lambda's limit for an unpacked deployment package, 250 MB.
    pub const PACKAGE_UNPACKED: u64 = 250_000_000;
    /// Execution environments starting at once, across all functions.
    pub const ENVIRONMENT_STARTS: u32 = 16;
    /// Execution environments of one function starting at once.
    pub const FUNCTION_ENVIRONMENT_STARTS: u32 = 8;
    /// How long an idle execution environment is kept warm.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    /// Lambda's default ephemeral storage (`/tmp`), 512 MiB.
    pub const EPHEMERAL_STORAGE: u64 = 512 * 1024 * 1024;
    /// Lambda's default account-wide concurrency.
    pub const CONCURRENCY_LIMIT: u32 = 1000;
    pub const MEMORY_MB: u32 = 128;
    pub const TIMEOUT: Duration = Duration::from_secs(3);
    /// What a `process` function runs when it gives no `command`, as Lambda's custom runtimes do.
    pub const COMMAND: &str = "./bootstrap";
    /// Lambda's default for asynchronous invocation: two retries after the first attempt.
    pub const MAX_RETRY_ATTEMPTS: u32 = 2;
    /// Retries of a failed batch from a requeueing queue (RabbitMQ) unless `retry.max_attempts`
    /// says otherwise; streams and SQS default to -1 (until the record expires), as Lambda.
    pub const QUEUE_MAX_ATTEMPTS: u32 = 4;
    /// Lambda's default maximum age of an asynchronous event, 6 hours.
    pub const MAX_EVENT_AGE: Duration = Duration::from_secs(6 * 3_600);
    /// Delay before the first asynchronous retry; it doubles for each later one.
    pub const RETRY_DELAY: Duration = Duration::from_secs(60);
    /// How long SIGTERM waits for in-flight invocations before stopping anyway.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    /// Methods an `http` source accepts when it names none.
    pub const HTTP_METHODS: &[&str] = &["POST"];
    /// The largest webhook body accepted: Lambda's 6 MB synchronous payload limit (6 MiB).
    pub const HTTP_MAX_BODY: u64 = 6 * 1024 * 1024;
    /// Connections the API listener serves at once.
    pub const MAX_CONNECTIONS: u32 = 4096;
    /// How long a client may take to send a request's headers (or keep a connection idle).
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Records per batch for every poll-based source but `sqs`, as in Lambda.
    pub const BATCH_SIZE: u32 = 100;
    /// Messages per batch for `sqs` sources, as in Lambda.
    pub const SQS_BATCH_SIZE: u32 = 10;
    /// How long a poller gathers records before invoking with a batch that is not full.
    pub const BATCH_WINDOW: Duration = Duration::ZERO;
    /// Lambda's limit for a synchronous invocation payload: "6 MB", enforced as 6 MiB.
    pub const BATCH_MAX_BYTES: u64 = 6 * 1024 * 1024;
    /// Batches processed at once per shard or partition.
    pub const PARALLELIZATION: u32 = 1;
    /// Unacknowledged messages a RabbitMQ consumer may hold (`basic.qos`).
    pub const RABBITMQ_PREFETCH: u16 = 100;
    /// The audit file is rotated before it grows past this.
    pub const AUDIT_MAX_FILE_SIZE: u64 = 100_000_000;
    /// Rotated audit files kept.
    pub const AUDIT_MAX_FILES: u32 = 5;
    /// How long the state store keeps audit events: CloudTrail's Event history window.
    pub const AUDIT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3_600);
}

/// Reads and checks the configuration file at `path`, substituting `${VAR}` from the process
/// environment. Relative paths in the file are resolved against the file's directory.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    let bytes = read_capped(path).map_err(|(location, message)| ConfigError {
        origin: origin.clone(),
        path: String::new(),
        location,
        message,
    })?;
    let mut config = parse_bytes(&bytes, &origin, &base_dir_of(path), &|name| {
        std::env::var(name).ok()
    })?;
    config.source_sha256 = Some(sha256_hex(&bytes));
    Ok(config)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The directory relative paths in the file at `path` are resolved against: the file's own,
/// made absolute so that package paths stay right if the process changes directory later.
pub fn base_dir_of(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// The file's bytes, never more than [`MAX_FILE_SIZE`] of them: the size is checked before
/// reading and the read is bounded too (a pipe or `/dev/zero` has no size to check).
fn read_capped(path: &Path) -> Result<Vec<u8>, (Option<Location>, String)> {
    use std::io::Read as _;
    let unreadable = |e: std::io::Error| (None, format!("cannot read the file: {e}"));
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let size = file.metadata().map_err(unreadable)?.len();
    if size > MAX_FILE_SIZE {
        let error = encoding::too_large(size);
        return Err((error.location, error.message));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        let error = encoding::too_large(bytes.len() as u64);
        return Err((error.location, error.message));
    }
    Ok(bytes)
}

/// Like [`parse_str`] for the raw bytes of a file: text that is too large, not UTF-8, or
/// UTF-16/UTF-32 is reported as such, with where.
pub fn parse_bytes(
    bytes: &[u8],
    origin: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    match encoding::decode(bytes) {
        Ok(text) => parse_str(text, origin, base_dir, env),
        Err(error) => Err(encoding_error(origin, error).into()),
    }
}

fn encoding_error(origin: &str, error: encoding::EncodingError) -> ConfigError {
    ConfigError {
        origin: origin.to_owned(),
        path: String::new(),
        location: error.location,
        message: error.message,
    }
}

/// Parses and checks configuration text. `origin` names it in errors; `env` looks up
/// `${VAR}`s (pass a fixed map in tests). Every problem is reported, in file order.
pub fn parse_str(
    text: &str,
    origin: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    match check_str(text, origin, base_dir, env) {
        (Some(config), errors) if errors.is_empty() => Ok(config),
        (_, errors) => Err(ConfigErrors { errors }),
    }
}

/// Like [`parse_str`], but the configuration comes back with its errors: what could be
/// decoded, with defaults where a value was wrong. `sluice validate` checks packages and
/// commands of this partial configuration, so that one run reports every problem. `None`
/// when the text could not be read as YAML at all: then there is nothing to check further.
pub fn check_str(
    text: &str,
    origin: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> (Option<Config>, Vec<ConfigError>) {
    let root = match encoding::check_size(text).and_then(|()| encoding::check_nul(text)) {
        Ok(()) => yaml::parse(text),
        Err(error) => return (None, vec![encoding_error(origin, error)]),
    };
    let root = match root {
        Ok(root) => root,
        Err(e) => {
            let error = ConfigError {
                origin: origin.to_owned(),
                path: String::new(),
                location: Some(e.location),
                message: format!("invalid YAML: {}", e.message),
            };
            return (None, vec![error]);
        }
    };
    let mut decoder = decode::Decoder::new(origin, env);
    if let Some(root) = &root {
        decoder.record_locations(root, "", None);
    }
    if decoder.over_budget {
        return (None, decoder.errors);
    }
    let mut config = schema::decode(&mut decoder, root.as_ref(), base_dir);
    config.origin = origin.to_owned();
    config.locations = std::mem::take(&mut decoder.locations);
    let mut errors = decoder.errors;
    // Decoding goes field by field; readers want the file's order. Unplaced errors go last.
    sort_errors(&mut errors);
    if decoder.found > errors.len() {
        errors.push(ConfigError {
            origin: origin.to_owned(),
            path: String::new(),
            location: None,
            message: format!(
                "{} more errors not listed: only the first {} found are",
                decoder.found - errors.len(),
                errors.len()
            ),
        });
    }
    (Some(config), errors)
}

/// Puts errors in file order (the order a reader goes through the file); errors with no
/// position go last, in the order they came.
pub fn sort_errors(errors: &mut [ConfigError]) {
    errors.sort_by_key(|e| {
        e.location
            .map_or((usize::MAX, usize::MAX), |l| (l.line, l.column))
    });
}

/// Like [`load_file`], but the configuration comes back with its errors (see [`check_str`]);
/// `None` when the file could not be read, is not text or is not YAML.
pub fn check_file(path: &Path) -> (Option<Config>, Vec<ConfigError>) {
    let origin = path.display().to_string();
    let failed = |location, message| ConfigError {
        origin: origin.clone(),
        path: String::new(),
        location,
        message,
    };
    let bytes = match read_capped(path) {
        Ok(bytes) => bytes,
        Err((location, message)) => return (None, vec![failed(location, message)]),
    };
    let text = match encoding::decode(&bytes) {
        Ok(text) => text,
        Err(error) => return (None, vec![encoding_error(&origin, error)]),
    };
    let env = |name: &str| std::env::var(name).ok();
    check_str(text, &origin, &base_dir_of(path), &env)
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub api: ApiConfig,
    /// State store URL: `sqlite://PATH` (the embedded default) or `postgres://…`.
    pub state: String,
    pub limits: Limits,
    pub concurrency: ConcurrencyConfig,
    /// Functions by name, in file order is not kept: names are sorted.
    pub functions: BTreeMap<String, FunctionConfig>,
    /// Sources (push and poll-based mappings) by name.
    pub sources: BTreeMap<String, SourceConfig>,
    /// `dead_letters`: where failed events are written, by name. Functions name them in
    /// `on_success` / `on_failure`, poll-based sources in `on_failure`.
    pub dead_letters: BTreeMap<String, DeadLetterConfig>,
    /// `roles`: execution roles by name, whose credentials the functions naming them get.
    pub roles: BTreeMap<String, RoleConfig>,
    /// `shutdown.grace`: how long SIGTERM lets in-flight invocations finish, 0 s–15 min,
    /// default 30 s.
    pub shutdown_grace: Duration,
    /// `audit`: the audit trail's file and retention.
    pub audit: AuditConfig,
    /// The SHA-256 (hex) of the file the configuration was read from, for the audit trail's
    /// `LoadConfiguration` event; `None` when it was not read from a file.
    pub source_sha256: Option<String>,
    /// Where every node of the file stood, by path (`functions.resize.package`), so that errors
    /// found after loading (a missing package, say) can still name the line and column.
    /// Scalars are placed at their value; mappings, lists and empty values at their key, so
    /// that `functions.resize` points at the line `resize:`.
    pub locations: BTreeMap<String, Location>,
    /// The file the configuration came from (`<string>` when parsed from memory).
    pub origin: String,
    /// Relative paths in the file are resolved against this directory.
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    /// `api.listen`, default `127.0.0.1:9000`.
    pub listen: SocketAddr,
    /// `api.max_connections`: connections served at once; more wait in the listen backlog.
    /// Default 4096, above the default account concurrency, so that invocations alone cannot
    /// fill it.
    pub max_connections: u32,
    /// `api.header_read_timeout`: how long a connection may take to send a request's headers,
    /// and how long a kept-alive connection may stay idle. Default 10 s.
    pub header_read_timeout: Duration,
    /// `api.auth`: how callers of the API are authenticated. Default `sigv4` when `listen` is
    /// not a loopback address, `none` on loopback; `none` off loopback is refused.
    pub auth: ApiAuth,
    /// `api.principals`: who may call the API under `sigv4`, by name (sorted).
    pub principals: BTreeMap<String, Principal>,
    /// `api.tls`: serve the API over HTTPS with this certificate chain and key (PEM).
    pub tls: Option<TlsConfig>,
    /// `api.metrics_token` (or `metrics_token_file`): when set, `/metrics` answers only
    /// requests with `Authorization: Bearer <token>`.
    pub metrics_token: Option<Secret>,
}

/// `api.auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiAuth {
    /// Every request to Lambda's API must carry an AWS Signature Version 4 of a principal.
    Sigv4,
    /// No authentication: anyone who reaches the listener may call every operation.
    None,
}

/// One caller of the API (`api.principals.NAME`): its access key and what it may do.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub access_key_id: String,
    /// `secret_access_key` (normally `${ENV}`) or the content of `secret_file`.
    pub secret_access_key: Secret,
    /// Its IAM identity policy; empty (so nothing is allowed but what functions' resource
    /// policies grant) when absent.
    pub policy: Policy,
}

/// `api.tls`: PEM files, resolved against the configuration file's directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// `cert`: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// `key`: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `audit`: where the record of every API change goes besides the state store.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    /// `audit.path`: a JSON Lines file of audit events, rotated by size; none by default
    /// (the state store keeps them either way).
    pub path: Option<PathBuf>,
    /// `audit.max_file_size`: the file is rotated before it grows past this, default 100 MB.
    pub max_file_size: u64,
    /// `audit.max_files`: rotated files kept (`audit.jsonl.1` …), default 5.
    pub max_files: u32,
    /// `audit.retention`: how long the state store keeps events, default 90 days.
    pub retention: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// `limits.package_zipped`, default 50 MB.
    pub package_zipped: u64,
    /// `limits.package_unpacked`, default 250 MB.
    pub package_unpacked: u64,
    /// `limits.environment_starts`: execution environments starting at once across all
    /// functions, default 16. A burst beyond it waits for a warm or new environment.
    pub environment_starts: u32,
    /// `limits.idle_timeout`: an execution environment idle this long is stopped, 1 s–12 h,
    /// default 5 min.
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConcurrencyConfig {
    /// `concurrency.limit`: account-wide concurrent executions, default 1000.
    pub limit: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// Start the package's program and serve it the Lambda Runtime API.
    Process,
    /// POST the event to `url`; the response body is the result.
    Http,
    /// A Rust handler registered in-process under `handler` (default: the function's name).
    Native,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FunctionConfig {
    pub runtime: Runtime,
    /// Directory or `.zip`, resolved against `Config::base_dir`. Required for `process`.
    pub package: Option<PathBuf>,
    /// argv of the program to start; a string is split on whitespace (quotes group words).
    /// Default for `process`: `["./bootstrap"]`, run inside the package directory.
    pub command: Option<Vec<String>>,
    /// Exported to the program as `_HANDLER`.
    pub handler: Option<String>,
    /// 128–10240, default 128.
    pub memory_mb: u32,
    /// 1 s–900 s, default 3 s.
    pub timeout: Duration,
    pub environment: BTreeMap<String, String>,
    pub reserved_concurrency: Option<u32>,
    /// `environment_starts`: this function's execution environments starting at once, 1–1000,
    /// default 8 (and never more than `limits.environment_starts`).
    pub environment_starts: u32,
    /// `ephemeral_storage`: the size of the function's own `/tmp`, 1 MB–10 GiB, default
    /// 512 MiB as in Lambda.
    pub ephemeral_storage: u64,
    pub description: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// Required for `http`: where the event is POSTed.
    pub url: Option<String>,
    /// Asynchronous invocation: retries after a failed first attempt, 0–2, default 2.
    pub max_retry_attempts: u32,
    /// Asynchronous invocation: an event older than this is not invoked again but sent to
    /// `on_failure`, 60 s–6 h, default 6 h.
    pub max_event_age: Duration,
    /// Asynchronous invocation: delay before the first retry, doubled for each later retry,
    /// 0 s–15 min, default 1 min.
    pub retry_delay: Duration,
    /// Where the result of a successful asynchronous invocation goes: the name of another
    /// function or of a dead letter (`Config::dead_letters`).
    pub on_success: Option<String>,
    /// Where an asynchronous event goes after its last failed attempt or past its maximum age:
    /// the name of another function or of a dead letter.
    pub on_failure: Option<String>,
    /// Aliases by name (`live`), each pointing at a version.
    pub aliases: BTreeMap<String, AliasConfig>,
    /// `role`: the execution role under `roles` whose credentials the function gets; without
    /// one it gets no AWS credentials at all.
    pub role: Option<String>,
    /// `run_as`: the user and group the function's processes run as (Sluice as root only).
    pub run_as: Option<RunAs>,
    /// `network`: `host` (default) or `none`.
    pub network: Network,
}

/// A named pointer to a function version, optionally sending a share of the invocations to a
/// second version (Lambda's weighted alias).
#[derive(Debug, Clone, PartialEq)]
pub struct AliasConfig {
    /// `version`: `$LATEST` or a version number as text (`"1"`).
    pub version: String,
    /// `additional_version_weights`: at most one other version number and the share of
    /// invocations it gets, strictly between 0 and 1.
    pub additional_version_weights: BTreeMap<String, f64>,
    /// At most 256 characters.
    pub description: Option<String>,
}

/// A durable place for events that failed for good (or, as an `on_success` destination, for
/// results).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterConfig {
    pub kind: DeadLetterKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeadLetterKind {
    /// `type: file`, `path:` (resolved against base_dir): JSON Lines.
    File { path: PathBuf },
    /// `type: sqs`: one message per dead letter, sent to `queue_url`.
    Sqs {
        queue_url: String,
        aws: AwsConnection,
    },
    /// `type: rabbitmq`: one persistent message per dead letter, published with publisher
    /// confirms.
    RabbitMq {
        /// `uri`: `amqp://…` or `amqps://…`.
        uri: String,
        /// `exchange`: `""` (the default) is AMQP's default exchange, which routes by queue name.
        exchange: String,
        /// `routing_key`: with the default exchange, the queue's name (then required).
        routing_key: String,
    },
    /// `type: kafka`: one record per dead letter, produced to `topic`.
    Kafka {
        brokers: Vec<String>,
        topic: String,
        /// `properties`: raw librdkafka producer properties.
        properties: BTreeMap<String, String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    /// `function`: a name with an optional qualifier (`resize`, `resize:live`, `resize:3`).
    pub function: String,
    pub enabled: bool,
    pub kind: SourceKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    /// `type: schedule`
    Schedule(ScheduleConfig),
    /// `type: http`: a webhook on Sluice's own listener.
    Http(HttpSourceConfig),
    /// `type: kinesis`
    Kinesis(KinesisConfig),
    /// `type: dynamodb_streams`
    DynamoDbStreams(DynamoDbStreamsConfig),
    /// `type: sqs`
    Sqs(SqsConfig),
    /// `type: rabbitmq`
    RabbitMq(RabbitMqConfig),
    /// `type: kafka`
    Kafka(KafkaConfig),
}

impl SourceKind {
    /// The `type:` spelling.
    pub fn type_name(&self) -> &'static str {
        match self {
            SourceKind::Schedule(_) => "schedule",
            SourceKind::Http(_) => "http",
            SourceKind::Kinesis(_) => "kinesis",
            SourceKind::DynamoDbStreams(_) => "dynamodb_streams",
            SourceKind::Sqs(_) => "sqs",
            SourceKind::RabbitMq(_) => "rabbitmq",
            SourceKind::Kafka(_) => "kafka",
        }
    }

    /// The batching, filtering and retry settings of a poll-based source; `None` for the push
    /// sources (`schedule`, `http`).
    pub fn mapping(&self) -> Option<&MappingConfig> {
        match self {
            SourceKind::Schedule(_) | SourceKind::Http(_) => None,
            SourceKind::Kinesis(c) => Some(&c.mapping),
            SourceKind::DynamoDbStreams(c) => Some(&c.mapping),
            SourceKind::Sqs(c) => Some(&c.mapping),
            SourceKind::RabbitMq(c) => Some(&c.mapping),
            SourceKind::Kafka(c) => Some(&c.mapping),
        }
    }
}

/// What an event source mapping does with the records a poll-based source reads. The keys sit
/// directly under the source (`batch:`, `retry:`, `filters:`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct MappingConfig {
    /// `starting_position`: where reading starts when there is no checkpoint yet, default
    /// `trim_horizon`. Only for `kinesis`, `dynamodb_streams` and `kafka`.
    pub starting_position: StartingPosition,
    /// `batch: { size, window, max_bytes }`
    pub batch: BatchConfig,
    /// `filters`: at most 5 Lambda filter patterns, as JSON; a record that matches none is
    /// filtered out (final, acknowledged, not invoked). Empty: every record is delivered.
    pub filters: Vec<serde_json::Value>,
    /// `parallelization`: batches processed at once per shard or partition, 1–10, default 1
    /// (records with the same key stay in order). Only for `kinesis`, `dynamodb_streams` and
    /// `kafka`.
    pub parallelization: u32,
    /// `retry: { max_attempts, max_record_age }`
    pub retry: RetryConfig,
    /// `bisect_on_error`: split a failing batch in two and retry the halves, to isolate a
    /// poison record. Only for `kinesis`, `dynamodb_streams` and `kafka`.
    pub bisect_on_error: bool,
    /// `report_batch_item_failures`: the function answers `batchItemFailures` and only those
    /// records are retried.
    pub report_batch_item_failures: bool,
    /// `on_failure`: the dead letter (under `dead_letters`) a record goes to once its retries
    /// are spent.
    pub on_failure: Option<String>,
    /// Mirrors [`SourceConfig::enabled`].
    pub enabled: bool,
}

/// Where a stream or topic is read from when there is no checkpoint yet.
#[derive(Debug, Clone, PartialEq)]
pub enum StartingPosition {
    /// `trim_horizon`: the oldest record still kept.
    TrimHorizon,
    /// `latest`: only records written from now on.
    Latest,
    /// `at_timestamp` with `starting_position_timestamp` (RFC 3339): milliseconds since the
    /// Unix epoch.
    AtTimestamp(i64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    /// `size`: the most records per invocation, 1–10000; default 100, and 10 for `sqs`. An
    /// `sqs` batch of more than 10 needs a `window`, as in Lambda.
    pub size: u32,
    /// `window`: how long to gather records before invoking with a batch that is not full,
    /// 0 s–300 s, default 0 s.
    pub window: Duration,
    /// `max_bytes`: the most payload bytes per invocation, 1 B–6 MiB, default 6 MiB (Lambda's
    /// payload limit).
    pub max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RetryConfig {
    /// `max_attempts`: retries of a failed batch, 0–10000; `-1` (the default) is `None`: retry
    /// until the record expires.
    pub max_attempts: Option<u32>,
    /// `max_record_age`: a record older than this is not retried again, 60 s–7 d; `-1` (the
    /// default) is `None`: no limit.
    pub max_record_age: Option<Duration>,
}

/// How to reach an AWS service (or a local stand-in such as moto).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AwsConnection {
    /// `endpoint_url`: an http(s) URL to use instead of the service's AWS endpoint.
    pub endpoint_url: Option<String>,
    /// `region`, like `eu-west-1`; otherwise the SDK's usual lookup (environment, profile).
    pub region: Option<String>,
}

/// `type: kinesis`
#[derive(Debug, Clone, PartialEq)]
pub struct KinesisConfig {
    /// `stream`: a stream name or an `arn:aws:kinesis:…:stream/NAME` ARN.
    pub stream: String,
    pub aws: AwsConnection,
    pub mapping: MappingConfig,
}

/// `type: dynamodb_streams`: exactly one of `stream_arn` and `table`.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamoDbStreamsConfig {
    /// `stream_arn`: `arn:aws:dynamodb:…:table/TABLE/stream/LABEL`.
    pub stream_arn: Option<String>,
    /// `table`: a table whose current stream is read.
    pub table: Option<String>,
    pub aws: AwsConnection,
    pub mapping: MappingConfig,
}

/// `type: sqs`
#[derive(Debug, Clone, PartialEq)]
pub struct SqsConfig {
    /// `queue_url`: the queue's http(s) URL.
    pub queue_url: String,
    pub aws: AwsConnection,
    /// `maximum_concurrency`: the most concurrent invocations this source causes, 2–1000;
    /// `None`: bounded only by the function's concurrency.
    pub maximum_concurrency: Option<u32>,
    pub mapping: MappingConfig,
}

/// `type: rabbitmq`
#[derive(Debug, Clone, PartialEq)]
pub struct RabbitMqConfig {
    /// `uri`: `amqp://…` or `amqps://…`, usually from `${ENV}` since it holds the password.
    pub uri: String,
    /// `queue`: the queue consumed.
    pub queue: String,
    /// `prefetch`: unacknowledged messages held at once, 1–65535, default 100.
    pub prefetch: u16,
    pub mapping: MappingConfig,
}

/// `type: kafka`
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConfig {
    /// `brokers`: bootstrap servers, `HOST:PORT` each (a list, or one comma-separated string).
    pub brokers: Vec<String>,
    /// `topics`: the topics read. Exactly one of `topics` and `topic_pattern` is given.
    pub topics: Vec<String>,
    /// `topic_pattern`: a regular expression (it compiles with the `regex` crate); every topic
    /// it matches is read.
    pub topic_pattern: Option<String>,
    /// `group_id`: the consumer group, which also keeps the committed offsets.
    pub group_id: String,
    pub security: KafkaSecurity,
    /// `properties`: raw librdkafka properties; scalars become text. Those Sluice sets itself
    /// (`bootstrap.servers`, `group.id`, offset commits, security) are refused.
    pub properties: BTreeMap<String, String>,
    pub mapping: MappingConfig,
}

/// `security: { protocol, sasl_mechanism, username, password, ca_location }` of a Kafka source.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KafkaSecurity {
    /// `protocol`: `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`; `None` is plaintext.
    pub protocol: Option<String>,
    /// `sasl_mechanism`: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; required with a `sasl_*`
    /// protocol, refused otherwise.
    pub sasl_mechanism: Option<String>,
    /// `username` and `password`: given together, and only with a `sasl_*` protocol.
    pub username: Option<String>,
    pub password: Option<String>,
    /// `ca_location`: CA certificates to verify the brokers with (resolved against base_dir);
    /// only with `ssl` or `sasl_ssl`.
    pub ca_location: Option<PathBuf>,
}

impl Default for MappingConfig {
    fn default() -> Self {
        MappingConfig {
            starting_position: StartingPosition::TrimHorizon,
            batch: BatchConfig::default(),
            filters: Vec::new(),
            parallelization: defaults::PARALLELIZATION,
            retry: RetryConfig::default(),
            bisect_on_error: false,
            report_batch_item_failures: false,
            on_failure: None,
            enabled: true,
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            size: defaults::BATCH_SIZE,
            window: defaults::BATCH_WINDOW,
            max_bytes: defaults::BATCH_MAX_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpSourceConfig {
    /// `path`: where the webhook listens, like `/hooks/orders`. Unique among http sources and
    /// outside the paths of Sluice's own API.
    pub path: String,
    /// `invocation: async` answers 202 once the event is queued; `sync` (the default) waits
    /// for the function and answers with its result.
    pub asynchronous: bool,
    /// `methods`: uppercase HTTP methods accepted, default `["POST"]`.
    pub methods: Vec<String>,
    /// `max_body`: the largest request body accepted, default 6 MiB (Lambda's synchronous
    /// payload limit); larger ones are answered 413 without being read.
    pub max_body: u64,
    /// `auth`: how a request proves it comes from the sender, default `none`.
    pub auth: WebhookAuth,
}

/// `auth:` of an `http` source.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum WebhookAuth {
    /// `none`: any request is accepted (put the webhook behind something that checks).
    #[default]
    None,
    /// `{ type: hmac_sha256, secret | secret_file, header }`: the named header carries the
    /// HMAC-SHA256 of the raw body under the shared secret, as hex, optionally prefixed
    /// `sha256=` (GitHub's `X-Hub-Signature-256`).
    HmacSha256 { secret: Secret, header: String },
    /// `{ type: bearer, token | token_file }`: `Authorization: Bearer <token>`.
    Bearer { token: Secret },
    /// `{ type: aws_iam }`, as a Function URL's `AWS_IAM` auth type: the request carries a
    /// Signature Version 4 of one of `api.principals` (service `lambda`), whose policies must
    /// allow `lambda:InvokeFunctionUrl` on the function.
    AwsIam,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleConfig {
    pub schedule: Schedule,
    /// `input`: a JSON/YAML value delivered instead of the scheduled-event payload.
    pub input: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// `rate: 5 minutes`, `rate(5 minutes)`, `rate: 10 seconds`.
    Rate(Duration),
    /// `cron: "0 12 * * ? *"` or `cron: cron(0 12 * * ? *)`: EventBridge's six fields
    /// (minutes hours day-of-month month day-of-week year).
    Cron {
        /// The six EventBridge fields as written, without the `cron(…)` wrapper.
        expression: String,
        /// The same schedule in the `cron` crate's seven-field syntax (seconds first, `?`
        /// written `*`), ready for `cron::Schedule::from_str`.
        cron: String,
    },
}

/// Why serving the API on `listen` without authentication is refused, or `None` on a
/// loopback address, where `auth: none` is allowed.
pub fn unauthenticated_api_error(listen: SocketAddr) -> Option<String> {
    if listen.ip().to_canonical().is_loopback() {
        return None;
    }
    Some(format!(
        "the API would listen on {listen}, which is not a loopback address, with `api.auth: none`: anyone who can reach {listen} could invoke, reconfigure and change every function. Set `api.auth: sigv4` and declare `api.principals`, or listen on 127.0.0.1 or [::1]"
    ))
}

impl Config {
    /// What is allowed but dangerous in this configuration, one line each, placed like errors
    /// (`sluice.yaml:2:11: api.listen: …`). `sluice validate` and `sluice run` print them.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        // The loopback default is quiet; a `none` written down is a choice worth a word.
        if self.api.auth == ApiAuth::None && self.locations.contains_key("api.auth") {
            let message = format!(
                "`auth: none`: every process that can reach {} may invoke, reconfigure and change every function without signing its requests; use `auth: sigv4` with `principals` to require signatures",
                self.api.listen
            );
            warnings.push(self.error_at("api.auth", message).to_string());
        }
        warnings
    }

    /// Where the node at `path` (`functions.resize.package`) stood in the file.
    pub fn location(&self, path: &str) -> Option<Location> {
        self.locations.get(path).copied()
    }

    /// An error about the node at `path` found after loading (a package directory that does
    /// not exist, say), placed at that node's line and column.
    pub fn error_at(&self, path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            origin: self.origin.clone(),
            path: path.to_owned(),
            location: self.location(path),
            message: message.into(),
        }
    }
}

/// The configuration of an empty file: every default and no functions or sources.
impl Default for Config {
    fn default() -> Self {
        Config {
            api: ApiConfig::default(),
            state: defaults::STATE.to_owned(),
            limits: Limits::default(),
            concurrency: ConcurrencyConfig::default(),
            functions: BTreeMap::new(),
            sources: BTreeMap::new(),
            dead_letters: BTreeMap::new(),
            roles: BTreeMap::new(),
            shutdown_grace: defaults::SHUTDOWN_GRACE,
            audit: AuditConfig::default(),
            source_sha256: None,
            locations: BTreeMap::new(),
            origin: "<default>".to_owned(),
            base_dir: PathBuf::from("."),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: defaults::LISTEN,
            max_connections: defaults::MAX_CONNECTIONS,
            header_read_timeout: defaults::HEADER_READ_TIMEOUT,
            auth: ApiAuth::None,
            principals: BTreeMap::new(),
            tls: None,
            metrics_token: None,
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: None,
            max_file_size: defaults::AUDIT_MAX_FILE_SIZE,
            max_files: defaults::AUDIT_MAX_FILES,
            retention: defaults::AUDIT_RETENTION,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            package_zipped: defaults::PACKAGE_ZIPPED,
            package_unpacked: defaults::PACKAGE_UNPACKED,
            environment_starts: defaults::ENVIRONMENT_STARTS,
            idle_timeout: defaults::IDLE_TIMEOUT,
        }
    }
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        ConcurrencyConfig {
            limit: defaults::CONCURRENCY_LIMIT,
        }
    }
}

impl Runtime {
    /// The spelling used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Process => "process",
            Runtime::Http => "http",
            Runtime::Native => "native",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A position in the configuration file, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let env = |name: &str| match name {
            "MEMORY" => Some("512".to_owned()),
            "TIMEOUT" => Some("45s".to_owned()),
            _ => None,
        };
        parse_str(text, "test.yaml", Path::new("/base"), &env)
    }

    #[test]
    fn a_minimal_process_function_gets_lambda_defaults() {
        let config = parse("functions:\n  f:\n    package: pkg\n").unwrap();
        let f = &config.functions["f"];
        assert_eq!(f.runtime, Runtime::Process);
        assert_eq!(f.package.as_deref(), Some(Path::new("/base/pkg")));
        assert_eq!(f.command, Some(vec!["./bootstrap".to_owned()]));
        assert_eq!(f.handler, None);
        assert_eq!(f.memory_mb, 128);
        assert_eq!(f.timeout, Duration::from_secs(3));
        assert!(f.environment.is_empty() && f.tags.is_empty());
        assert_eq!(
            (f.reserved_concurrency, &f.description, &f.url),
            (None, &None, &None)
        );
        assert_eq!(f.max_retry_attempts, 2);
        assert_eq!(f.max_event_age, Duration::from_secs(21_600));
        assert_eq!(f.retry_delay, Duration::from_secs(60));
        assert_eq!((&f.on_success, &f.on_failure), (&None, &None));
        assert!(f.aliases.is_empty());
    }

    #[test]
    fn an_http_source_defaults_to_synchronous_post() {
        let config = parse(
            "functions:\n  f:\n    package: p\nsources:\n  s:\n    type: http\n    function: f\n    path: /in\n",
        )
        .unwrap();
        assert_eq!(
            config.sources["s"].kind,
            SourceKind::Http(HttpSourceConfig {
                path: "/in".to_owned(),
                asynchronous: false,
                methods: vec!["POST".to_owned()],
                max_body: defaults::HTTP_MAX_BODY,
                auth: WebhookAuth::None,
            })
        );
    }

    #[test]
    fn a_destination_may_be_declared_after_the_function_that_names_it() {
        let config = parse(
            "functions:\n  a:\n    package: p\n    on_failure: b\n    on_success: dlq\n  b:\n    package: p\ndead_letters:\n  dlq: { type: file, path: dead.jsonl }\n",
        )
        .unwrap();
        let a = &config.functions["a"];
        assert_eq!(
            (a.on_failure.as_deref(), a.on_success.as_deref()),
            (Some("b"), Some("dlq"))
        );
    }

    #[test]
    fn interpolation_happens_before_typing() {
        let config = parse(
            "functions:\n  f:\n    package: p\n    memory_mb: ${MEMORY}\n    timeout: ${TIMEOUT}\n",
        )
        .unwrap();
        assert_eq!(config.functions["f"].memory_mb, 512);
        assert_eq!(config.functions["f"].timeout, Duration::from_secs(45));
    }

    #[test]
    fn an_empty_substitution_falls_back_to_the_default() {
        let config = parse("functions:\n  f:\n    package: p\n    timeout: ${UNSET:-}\n").unwrap();
        assert_eq!(config.functions["f"].timeout, Duration::from_secs(3));
    }

    #[test]
    fn errors_come_in_file_order_whatever_the_decoding_order() {
        let errors = parse("sources:\n  s:\n    type: nope\nstate: bad\n").unwrap_err();
        let lines: Vec<usize> = errors
            .errors
            .iter()
            .map(|e| e.location.unwrap().line)
            .collect();
        assert_eq!(lines, [3, 4]);
    }

    #[test]
    fn a_string_where_a_mapping_belongs_is_reported_once() {
        let errors = parse("functions: resize\n").unwrap_err();
        assert_eq!(
            errors.to_string(),
            "test.yaml:1:12: functions: expected a mapping, found a string"
        );
    }

    #[test]
    fn auth_none_written_down_is_warned_about_where_it_is_set() {
        let config = parse("api:\n  auth: none\n").unwrap();
        assert_eq!(
            config.warnings(),
            [
                "test.yaml:2:9: api.auth: `auth: none`: every process that can reach 127.0.0.1:9000 may invoke, reconfigure and change every function without signing its requests; use `auth: sigv4` with `principals` to require signatures"
            ]
        );
        for quiet in [
            "",
            "api:\n  listen: 127.0.0.1:9000\n",
            "api:\n  listen: '[::1]:9000'\n",
        ] {
            let config = parse(quiet).unwrap();
            assert_eq!(config.api.auth, ApiAuth::None, "{quiet:?}");
            assert!(config.warnings().is_empty(), "{quiet:?}");
        }
        assert!(unauthenticated_api_error("[::ffff:127.0.0.1]:9000".parse().unwrap()).is_none());
        assert!(unauthenticated_api_error("192.168.1.5:9000".parse().unwrap()).is_some());
        assert!(unauthenticated_api_error("[::]:9000".parse().unwrap()).is_some());
    }

    #[test]
    fn principals_carry_their_keys_and_policies_in_yaml_or_json() {
        let config = parse(
            "api:\n  listen: 0.0.0.0:9000\n  principals:\n    deployer:\n      access_key_id: AKIASLUICEDEPLOY01\n      secret_access_key: s3cret\n      policy:\n        Statement: [{ Effect: Allow, Action: 'lambda:*', Resource: '*' }]\n    ci:\n      access_key_id: AKIASLUICECI000001\n      secret_access_key: other\n      policy: '{\"Statement\":{\"Effect\":\"Deny\",\"Action\":\"lambda:Invoke*\",\"Resource\":\"*\"}}'\n",
        )
        .unwrap();
        assert_eq!(config.api.auth, ApiAuth::Sigv4);
        let deployer = &config.api.principals["deployer"];
        assert_eq!(deployer.access_key_id, "AKIASLUICEDEPLOY01");
        assert_eq!(deployer.secret_access_key.expose(), "s3cret");
        assert_eq!(deployer.policy.statements[0].effect, Effect::Allow);
        assert_eq!(
            config.api.principals["ci"].policy.statements[0].actions,
            Patterns::Only(vec!["lambda:Invoke*".into()])
        );
    }
}
