//! The file's schema: which keys exist, their types, ranges and defaults.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::cron_expr::parse_cron;
use crate::dead_letter::decode_dead_letter;
use crate::decode::{Decoder, Field, Fields, Names, child, closest, index};
use crate::interpolate::is_variable_name;
use crate::mapping::{MappingContext, PollType, decode_poll_source};
use crate::secret::secret;
use crate::shell::split_words;
use crate::units::{parse_duration, parse_rate, parse_size};
use crate::yaml::{self, Kind, Node};
use crate::{
    AliasConfig, ConcurrencyConfig, Config, FunctionConfig, HttpSourceConfig, Limits, Runtime,
    Schedule, ScheduleConfig, SourceConfig, SourceKind, WebhookAuth, defaults,
};

const TOP_KEYS: &[&str] = &[
    "api",
    "state",
    "limits",
    "concurrency",
    "shutdown",
    "functions",
    "sources",
    "dead_letters",
    "roles",
    "audit",
];
const API_KEYS: &[&str] = &[
    "listen",
    "max_connections",
    "header_read_timeout",
    "auth",
    "principals",
    "tls",
    "metrics_token",
    "metrics_token_file",
];
const PRINCIPAL_KEYS: &[&str] = &[
    "access_key_id",
    "secret_access_key",
    "secret_file",
    "policy",
];
const TLS_KEYS: &[&str] = &["cert", "key"];
const AUDIT_KEYS: &[&str] = &["path", "max_file_size", "max_files", "retention"];
const AUDIT_MAX_FILES: std::ops::RangeInclusive<i128> = 1..=1_000;
/// Below a few kilobytes a single event (a large alias update) could not fit in one file.
const AUDIT_MIN_FILE_SIZE: u64 = 4_096;
const AUDIT_RETENTION: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(3_600)..=Duration::from_secs(10 * 366 * 24 * 3_600);
const WEBHOOK_AUTH_TYPES: &[&str] = &["none", "hmac_sha256", "bearer", "aws_iam"];
const HMAC_AUTH_KEYS: &[&str] = &["type", "secret", "secret_file", "header"];
const BEARER_AUTH_KEYS: &[&str] = &["type", "token", "token_file"];
/// GitHub's header; other senders are named with `header:`.
const DEFAULT_SIGNATURE_HEADER: &str = "X-Hub-Signature-256";
const MAX_CONNECTIONS: std::ops::RangeInclusive<i128> = 1..=1_000_000;
const HEADER_READ_TIMEOUT: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3_600);
const LIMITS_KEYS: &[&str] = &[
    "package_zipped",
    "package_unpacked",
    "environment_starts",
    "idle_timeout",
];
const CONCURRENCY_KEYS: &[&str] = &["limit"];
const SHUTDOWN_KEYS: &[&str] = &["grace"];
const FUNCTION_KEYS: &[&str] = &[
    "runtime",
    "package",
    "command",
    "handler",
    "memory_mb",
    "timeout",
    "environment",
    "reserved_concurrency",
    "environment_starts",
    "ephemeral_storage",
    "description",
    "tags",
    "url",
    "max_retry_attempts",
    "max_event_age",
    "retry_delay",
    "on_success",
    "on_failure",
    "aliases",
    "role",
    "run_as",
    "network",
];
const ALIAS_KEYS: &[&str] = &["version", "additional_version_weights", "description"];
const SCHEDULE_KEYS: &[&str] = &["type", "function", "enabled", "rate", "cron", "input"];
const HTTP_KEYS: &[&str] = &[
    "type",
    "function",
    "enabled",
    "path",
    "invocation",
    "methods",
    "max_body",
    "auth",
];
/// Every source `type:` the schema knows.
pub const SOURCE_TYPES: &[&str] = &[
    "kafka",
    "rabbitmq",
    "sqs",
    "kinesis",
    "dynamodb_streams",
    "http",
    "schedule",
];
const RUNTIMES: &[&str] = &["process", "http", "native"];
const INVOCATIONS: &[&str] = &["sync", "async"];
const HTTP_METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];
/// Where Sluice's own API lives: the Lambda Invoke API and its siblings, the Runtime API,
/// metrics and health. A webhook there would shadow it or be shadowed.
const RESERVED_HTTP_PATHS: &[&str] = &[
    "/2015-03-31",
    "/2017-10-31",
    "/2019-09-30",
    "/2018-06-01",
    "/metrics",
    "/healthz",
];

/// Variables the runtime sets for every function; a function may not override them.
const RESERVED_ENV: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
    "AWS_LAMBDA_RUNTIME_API",
];
const RESERVED_ENV_PREFIX: &str = "AWS_LAMBDA_";

const MEMORY_MB: std::ops::RangeInclusive<i128> = 128..=10_240;
const TIMEOUT_MIN: Duration = Duration::from_secs(1);
const TIMEOUT_MAX: Duration = Duration::from_secs(900);
const CONCURRENCY_LIMIT: std::ops::RangeInclusive<i128> = 1..=100_000;
const ENVIRONMENT_STARTS: std::ops::RangeInclusive<i128> = 1..=1_000;
const IDLE_TIMEOUT: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(12 * 3_600);
const EPHEMERAL_STORAGE: std::ops::RangeInclusive<u64> = 1_000_000..=10_240 * 1024 * 1024;
const DESCRIPTION_MAX_CHARS: usize = 256;
const FUNCTION_NAME_MAX: usize = 64;
const DEAD_LETTER_NAME_MAX: usize = 64;
const ALIAS_NAME_MAX: usize = 128;
const MAX_RETRY_ATTEMPTS: std::ops::RangeInclusive<i128> = 0..=2;
const MAX_EVENT_AGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(60)..=Duration::from_secs(6 * 3_600);
const RETRY_DELAY: std::ops::RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(900);
const SHUTDOWN_GRACE: std::ops::RangeInclusive<Duration> =
    Duration::ZERO..=Duration::from_secs(900);

/// The names a destination (`on_success`, `on_failure`) can point at.
struct Destinations<'a> {
    functions: &'a Names<'a>,
    dead_letters: &'a Names<'a>,
    /// Not a destination, but a name a function refers to all the same.
    roles: &'a Names<'a>,
}

pub(crate) fn decode(d: &mut Decoder<'_>, root: Option<&Node>, base_dir: &Path) -> Config {
    let mut config = Config {
        base_dir: base_dir.to_path_buf(),
        ..Config::default()
    };
    let Some(root) = root else {
        return config;
    };
    if !matches!(root.kind, Kind::Mapping(_)) && !root.is_null() {
        d.error(
            "",
            format!(
                "expected a mapping at the top level (keys such as `functions:`), found {}",
                root.type_name()
            ),
        );
        return config;
    }
    let Some(top) = d.mapping(root, "", Some(TOP_KEYS)) else {
        return config;
    };

    if let Some(api) = d.section(&top, "api", API_KEYS) {
        config.api.listen = d
            .parse(&api, "listen", "an address", parse_listen)
            .or(config.api.listen);
        config.api.max_connections = d
            .int(&api, "max_connections", MAX_CONNECTIONS, "")
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(config.api.max_connections);
        config.api.header_read_timeout = d
            .parse(&api, "header_read_timeout", "a duration", |text| {
                bounded_duration(
                    text,
                    "header_read_timeout",
                    &HEADER_READ_TIMEOUT,
                    "between 100ms and 1h",
                )
            })
            .or(config.api.header_read_timeout);
        decode_api_auth(d, &api, &mut config.api, base_dir);
        if api.get("tls").is_some()
            && let Some(tls) = d.section(&api, "tls", TLS_KEYS)
        {
            config.api.tls = decode_tls(d, &tls, base_dir);
        }
        config.api.metrics_token =
            crate::secret::secret(d, &api, "metrics_token", "metrics_token_file", base_dir).ok();
    }
    if let Some(audit) = d.section(&top, "audit", AUDIT_KEYS) {
        config.audit.path = d
            .string(&audit, "path")
            .ok()
            .map(|path| base_dir.join(path));
        config.audit.max_file_size = d
            .parse(&audit, "max_file_size", "a size", |text| {
                let size = parse_size(text)?;
                if size < AUDIT_MIN_FILE_SIZE {
                    return Err(format!(
                        "max_file_size must be at least {AUDIT_MIN_FILE_SIZE} bytes, found `{text}`"
                    ));
                }
                Ok(size)
            })
            .or(config.audit.max_file_size);
        config.audit.max_files = d
            .int(&audit, "max_files", AUDIT_MAX_FILES, "")
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(config.audit.max_files);
        config.audit.retention = d
            .parse(&audit, "retention", "a duration", |text| {
                bounded_duration(text, "retention", &AUDIT_RETENTION, "between 1h and 3660d")
            })
            .or(config.audit.retention);
    }
    config.state = d
        .string(&top, "state")
        .ok()
        .and_then(|state| check_state(d, &top.path_of("state"), state))
        .unwrap_or(config.state);
    if let Some(limits) = d.section(&top, "limits", LIMITS_KEYS) {
        config.limits = Limits {
            package_zipped: d
                .parse(&limits, "package_zipped", "a size", parse_positive_size)
                .or(config.limits.package_zipped),
            package_unpacked: d
                .parse(&limits, "package_unpacked", "a size", parse_positive_size)
                .or(config.limits.package_unpacked),
            environment_starts: d
                .int(&limits, "environment_starts", ENVIRONMENT_STARTS, "")
                .ok()
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(config.limits.environment_starts),
            idle_timeout: d
                .parse(&limits, "idle_timeout", "a duration", |text| {
                    bounded_duration(text, "idle_timeout", &IDLE_TIMEOUT, "between 1s and 12h")
                })
                .or(config.limits.idle_timeout),
        };
    }
    if let Some(concurrency) = d.section(&top, "concurrency", CONCURRENCY_KEYS) {
        let limit = d.int(&concurrency, "limit", CONCURRENCY_LIMIT, "");
        config.concurrency = ConcurrencyConfig {
            limit: limit
                .ok()
                .and_then(|limit| u32::try_from(limit).ok())
                .unwrap_or(config.concurrency.limit),
        };
    }

    if let Some(shutdown) = d.section(&top, "shutdown", SHUTDOWN_KEYS) {
        config.shutdown_grace = d
            .parse(&shutdown, "grace", "a duration", |text| {
                bounded_duration(text, "grace", &SHUTDOWN_GRACE, "between 0s and 15m")
            })
            .or(config.shutdown_grace);
    }

    let dead_letters = d.entries(&top, "dead_letters");
    let dead_letter_names = Names::new(dead_letters.iter().map(|entry| entry.key).collect());
    for entry in &dead_letters {
        let path = child(&top.path_of("dead_letters"), entry.key);
        if !is_function_name(entry.key) {
            d.error_at(
                &path,
                Some(entry.key_location),
                format!(
                    "invalid dead letter name `{}`: use 1 to {DEAD_LETTER_NAME_MAX} letters, digits, `-` or `_`",
                    entry.key
                ),
            );
        }
        if let Some(dead_letter) = decode_dead_letter(d, entry.value, &path, &config.base_dir) {
            config
                .dead_letters
                .insert(entry.key.to_owned(), dead_letter);
        }
    }

    let roles = d.entries(&top, "roles");
    // Every declared role can be referred to, also one with an error of its own.
    let role_names = Names::new(roles.iter().map(|entry| entry.key).collect());
    config.roles =
        crate::isolation::decode_roles(d, &roles, &top.path_of("roles"), &config.base_dir);
    let functions = d.entries(&top, "functions");
    let declared = Names::new(functions.iter().map(|entry| entry.key).collect());
    let destinations = Destinations {
        functions: &declared,
        dead_letters: &dead_letter_names,
        roles: &role_names,
    };
    for entry in &functions {
        let path = child(&top.path_of("functions"), entry.key);
        if !is_function_name(entry.key) {
            d.error_at(
                &path,
                Some(entry.key_location),
                format!(
                    "invalid function name `{}`: use 1 to {FUNCTION_NAME_MAX} letters, digits, `-` or `_`",
                    entry.key
                ),
            );
        }
        if let Some(function) =
            decode_function(d, entry.key, entry.value, &path, &config, &destinations)
        {
            config.functions.insert(entry.key.to_owned(), function);
        }
    }

    // Webhook paths taken so far, with the source that took each.
    let mut http_paths = BTreeMap::new();
    for entry in d.entries(&top, "sources") {
        let path = child(&top.path_of("sources"), entry.key);
        // Source names label metrics and key checkpoints in the state store, like function
        // names do, so they follow the same rule.
        if !is_function_name(entry.key) {
            d.error_at(
                &path,
                Some(entry.key_location),
                format!(
                    "invalid source name `{}`: use 1 to {FUNCTION_NAME_MAX} letters, digits, `-` or `_`",
                    entry.key
                ),
            );
        }
        let context = SourceContext {
            name: entry.key,
            destinations: &destinations,
            base_dir: &config.base_dir,
        };
        if let Some(source) = decode_source(d, entry.value, &path, &context, &mut http_paths) {
            if let crate::SourceKind::Http(http) = &source.kind
                && http.auth == WebhookAuth::AwsIam
                && config.api.principals.is_empty()
            {
                d.error(
                    &child(&path, "auth"),
                    "`aws_iam` checks the request's signature against `api.principals`, which declares nobody: declare the principals that may call this webhook",
                );
            }
            config.sources.insert(entry.key.to_owned(), source);
        }
    }
    config
}

/// `api.auth` and `api.principals`: the default follows the address (a loopback listener may
/// go without authentication, any other may not), and `sigv4` with nobody to sign is refused.
fn decode_api_auth(
    d: &mut Decoder<'_>,
    api: &Fields<'_>,
    config: &mut crate::ApiConfig,
    base_dir: &Path,
) {
    let loopback = config.listen.ip().to_canonical().is_loopback();
    let auth = d.parse(api, "auth", "`sigv4` or `none`", |text| match text {
        "sigv4" => Ok(crate::ApiAuth::Sigv4),
        "none" => Ok(crate::ApiAuth::None),
        other => Err(format!(
            "unknown auth `{other}`, expected `sigv4` or `none`"
        )),
    });
    let written = auth.is_present();
    config.auth = auth.ok().unwrap_or(if loopback {
        crate::ApiAuth::None
    } else {
        crate::ApiAuth::Sigv4
    });
    if config.auth == crate::ApiAuth::None && !loopback && written {
        d.error(
            &api.path_of("auth"),
            format!(
                "`auth: none` is allowed on a loopback address only, and the API listens on {}: anyone who could reach it could invoke and change every function",
                config.listen
            ),
        );
    }
    let mut by_key: BTreeMap<String, String> = BTreeMap::new();
    for entry in d.entries(api, "principals") {
        let path = child(&api.path_of("principals"), entry.key);
        let Some(fields) = d.mapping(entry.value, &path, Some(PRINCIPAL_KEYS)) else {
            continue;
        };
        let key_id = d.parse(&fields, "access_key_id", "an access key id", |text| {
            let ok = (16..=128).contains(&text.len())
                && text.bytes().all(|b| b.is_ascii_alphanumeric());
            if ok {
                Ok(text.to_owned())
            } else {
                Err(format!("invalid access key id `{text}`: use 16 to 128 letters and digits, like `AKIASLUICEDEPLOY01`"))
            }
        });
        let key_id = d.required(key_id, &path, "a principal needs `access_key_id`");
        let secret = secret(d, &fields, "secret_access_key", "secret_file", base_dir);
        let secret = d.required(
            secret,
            &path,
            "a principal needs `secret_access_key` (or `secret_file`)",
        );
        let policy = match fields.get("policy") {
            Some(node) => crate::policy::decode_policy(d, node, &fields.path_of("policy")),
            None => Some(crate::Policy::default()),
        };
        if let Some(id) = &key_id {
            if let Some(first) = by_key.get(id) {
                d.error(
                    &fields.path_of("access_key_id"),
                    format!("access key id `{id}` is already the key of principal `{first}`"),
                );
                continue;
            }
            by_key.insert(id.clone(), entry.key.to_owned());
        }
        if let (Some(access_key_id), Some(secret_access_key), Some(policy)) =
            (key_id, secret, policy)
        {
            config.principals.insert(
                entry.key.to_owned(),
                crate::Principal {
                    access_key_id,
                    secret_access_key,
                    policy,
                },
            );
        }
    }
    if config.auth == crate::ApiAuth::Sigv4 && by_key.is_empty() {
        let at = if written {
            api.path_of("auth")
        } else {
            api.path_of("listen")
        };
        let why = if written {
            "`auth: sigv4`".to_owned()
        } else {
            format!(
                "the API listens on {}, off loopback, so it takes `auth: sigv4` by default",
                config.listen
            )
        };
        d.error(
            &at,
            format!("{why}, but `api.principals` declares nobody: nobody could call the API. Declare a principal (access_key_id, secret_access_key, policy), or listen on 127.0.0.1"),
        );
    }
}

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Some(port) = text.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    text.parse().map_err(|_| {
        format!("invalid address `{text}`: expected IP:PORT, like `127.0.0.1:9000` or `[::1]:9000`")
    })
}

fn check_state(d: &mut Decoder<'_>, path: &str, state: String) -> Option<String> {
    let rest = ["sqlite://", "postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| state.strip_prefix(scheme));
    match rest {
        Some("") => {
            d.error(
                path,
                format!("state URL `{state}` names no database, like `sqlite://./data/sluice.db`"),
            );
            None
        }
        Some(_) => Some(state),
        None => {
            d.error(
                path,
                format!(
                    "unsupported state URL `{state}`: expected `sqlite://PATH` or `postgres://…`"
                ),
            );
            None
        }
    }
}

fn parse_positive_size(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err(format!("invalid size `{text}`: must be greater than zero")),
        size => Ok(size),
    }
}

/// Lambda's rule for function names, which dead letter names follow too.
fn is_function_name(name: &str) -> bool {
    is_word(name, FUNCTION_NAME_MAX)
}

/// 1 to `max` letters, digits, `-` or `_`.
fn is_word(name: &str, max: usize) -> bool {
    (1..=max).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// What is wrong with an alias name, by Lambda's rule: 1 to 128 letters, digits, `-` or `_`,
/// not only digits (that would read as a version).
fn alias_name_problem(name: &str) -> Option<String> {
    if name == "$LATEST" {
        Some("`$LATEST` is a version, not an alias name".to_owned())
    } else if !is_word(name, ALIAS_NAME_MAX) {
        Some(format!(
            "invalid alias name `{name}`: use 1 to {ALIAS_NAME_MAX} letters, digits, `-` or `_`"
        ))
    } else if name.bytes().all(|b| b.is_ascii_digit()) {
        Some(format!(
            "invalid alias name `{name}`: a name of only digits would read as a version number"
        ))
    } else {
        None
    }
}

/// A published version number: 1, 2, …
fn is_version_number(text: &str) -> bool {
    !text.is_empty() && !text.starts_with('0') && text.bytes().all(|b| b.is_ascii_digit())
}

fn parse_runtime(text: &str) -> Result<Runtime, String> {
    match text {
        "process" => Ok(Runtime::Process),
        "http" => Ok(Runtime::Http),
        "native" => Ok(Runtime::Native),
        other => Err(with_suggestion(
            format!(
                "unknown runtime `{other}`, expected one of: {}",
                RUNTIMES.join(", ")
            ),
            other,
            RUNTIMES,
        )),
    }
}

pub(crate) fn with_suggestion(mut message: String, word: &str, candidates: &[&str]) -> String {
    if let Some(near) = closest(word, candidates) {
        message.push_str(&format!("; did you mean `{near}`?"));
    }
    message
}

fn decode_function(
    d: &mut Decoder<'_>,
    name: &str,
    node: &Node,
    path: &str,
    config: &Config,
    destinations: &Destinations<'_>,
) -> Option<FunctionConfig> {
    let fields = d.mapping(node, path, Some(FUNCTION_KEYS))?;
    // An unreadable runtime leaves the runtime-specific rules unchecked rather than checking
    // them against a guess.
    let runtime = match d.parse(&fields, "runtime", "a runtime", parse_runtime) {
        Field::Value(runtime) => Some(runtime),
        Field::Absent => Some(Runtime::Process),
        Field::Invalid => None,
    };

    let package = d.string(&fields, "package").and_then_check(|package| {
        if package.is_empty() {
            Err("must not be empty".to_owned())
        } else {
            Ok(resolve(&config.base_dir, &package))
        }
    });
    let package = report(d, &fields, "package", package);
    let command = decode_command(d, &fields);
    let url = d.parse(&fields, "url", "a URL", check_url);
    match runtime {
        Some(Runtime::Process) => {
            if !package.is_present() {
                d.error(
                    path,
                    "missing field `package` (required for runtime `process`)",
                );
            }
            if url.is_present() {
                only_for(d, &fields, "url", "http", Runtime::Process);
            }
        }
        Some(other @ (Runtime::Http | Runtime::Native)) => {
            if package.is_present() {
                only_for(d, &fields, "package", "process", other);
            }
            if command.is_present() {
                only_for(d, &fields, "command", "process", other);
            }
            if other == Runtime::Http && !url.is_present() {
                d.error(path, "missing field `url` (required for runtime `http`)");
            }
            if other == Runtime::Native && url.is_present() {
                only_for(d, &fields, "url", "http", other);
            }
        }
        None => {}
    }

    let handler = d.string(&fields, "handler").ok();
    let memory_mb = d
        .int(&fields, "memory_mb", MEMORY_MB, "")
        .ok()
        .and_then(|mb| u32::try_from(mb).ok())
        .unwrap_or(defaults::MEMORY_MB);
    let timeout = d
        .parse(&fields, "timeout", "a duration", parse_timeout)
        .or(defaults::TIMEOUT);
    let environment = decode_environment(d, &fields);
    let limit = i128::from(config.concurrency.limit);
    let reserved_concurrency = d
        .int(
            &fields,
            "reserved_concurrency",
            0..=limit,
            " (`concurrency.limit`)",
        )
        .ok()
        .and_then(|n| u32::try_from(n).ok());
    let environment_starts = d
        .int(&fields, "environment_starts", ENVIRONMENT_STARTS, "")
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(defaults::FUNCTION_ENVIRONMENT_STARTS);
    let ephemeral_storage = d
        .parse(&fields, "ephemeral_storage", "a size", |text| {
            let size = parse_size(text)?;
            if EPHEMERAL_STORAGE.contains(&size) {
                Ok(size)
            } else {
                Err(format!(
                    "ephemeral_storage `{text}` is out of range: must be between 1MB and 10GiB"
                ))
            }
        })
        .or(defaults::EPHEMERAL_STORAGE);
    let description = decode_description(d, &fields);
    let tags = decode_tags(d, &fields);
    let max_retry_attempts = d
        .int(&fields, "max_retry_attempts", MAX_RETRY_ATTEMPTS, "")
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(defaults::MAX_RETRY_ATTEMPTS);
    let max_event_age = d
        .parse(&fields, "max_event_age", "a duration", |text| {
            bounded_duration(text, "max_event_age", &MAX_EVENT_AGE, "between 1m and 6h")
        })
        .or(defaults::MAX_EVENT_AGE);
    let retry_delay = d
        .parse(&fields, "retry_delay", "a duration", |text| {
            bounded_duration(text, "retry_delay", &RETRY_DELAY, "between 0s and 15m")
        })
        .or(defaults::RETRY_DELAY);
    let on_success = decode_destination(d, &fields, "on_success", name, destinations);
    let on_failure = decode_destination(d, &fields, "on_failure", name, destinations);
    let aliases = decode_aliases(d, &fields);
    let role = crate::isolation::decode_role_reference(d, &fields, destinations.roles);
    let run_as = crate::isolation::decode_run_as(d, &fields);
    let network = crate::isolation::decode_network(d, &fields);
    if runtime.is_some_and(|r| r != Runtime::Process) {
        for key in ["role", "run_as", "network"] {
            if fields.get(key).is_some() {
                d.error(
                    &fields.path_of(key),
                    format!("`{key}` applies to runtime `process` only: the function runs inside Sluice or behind its URL"),
                );
            }
        }
    }

    let runtime = runtime?;
    // A command given wrong stays unset rather than defaulting: the partial configuration
    // `check_str` returns must not have `validate` look for a `./bootstrap` nobody asked for.
    let command = match command {
        Field::Value(command) => Some(command),
        Field::Absent => (runtime == Runtime::Process).then(|| vec![defaults::COMMAND.to_owned()]),
        Field::Invalid => None,
    };
    let handler = handler.or_else(|| (runtime == Runtime::Native).then(|| name.to_owned()));
    Some(FunctionConfig {
        runtime,
        package: package.ok(),
        command,
        handler,
        memory_mb,
        timeout,
        environment,
        reserved_concurrency,
        environment_starts,
        ephemeral_storage,
        description,
        tags,
        url: url.ok(),
        max_retry_attempts,
        max_event_age,
        retry_delay,
        on_success,
        on_failure,
        aliases,
        role,
        run_as,
        network,
    })
}

/// `description`, at most 256 characters as in Lambda.
fn decode_description(d: &mut Decoder<'_>, fields: &Fields<'_>) -> Option<String> {
    let description =
        d.string(fields, "description")
            .and_then_check(|description| match description.chars().count() {
                n if n > DESCRIPTION_MAX_CHARS => Err(format!(
                    "is {n} characters long; at most {DESCRIPTION_MAX_CHARS} are allowed"
                )),
                _ => Ok(description),
            });
    report(d, fields, "description", description).ok()
}

/// `on_success` / `on_failure`: the name of another function or of a dead letter, and not a
/// name that is both.
fn decode_destination(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    key: &str,
    function: &str,
    destinations: &Destinations<'_>,
) -> Option<String> {
    let target = d.string(fields, key).ok()?;
    let is_function = destinations.functions.contains(&target);
    let is_dead_letter = destinations.dead_letters.contains(&target);
    let problem = if is_function && is_dead_letter {
        format!(
            "`{target}` names both a function and a dead letter: rename one of them so that the destination is clear"
        )
    } else if is_dead_letter {
        return Some(target);
    } else if target == function {
        format!(
            "`{target}` is this function itself: a destination must be another function or a dead letter"
        )
    } else if is_function {
        return Some(target);
    } else {
        let candidates: Vec<&str> = destinations
            .functions
            .as_slice()
            .iter()
            .chain(destinations.dead_letters.as_slice())
            .copied()
            .filter(|candidate| *candidate != function)
            .collect();
        with_suggestion(
            format!(
                "unknown destination `{target}`: it is neither a function under `functions` nor a dead letter under `dead_letters`"
            ),
            &target,
            &candidates,
        )
    };
    d.error(&fields.path_of(key), problem);
    None
}

fn decode_aliases(d: &mut Decoder<'_>, fields: &Fields<'_>) -> BTreeMap<String, AliasConfig> {
    let path = fields.path_of("aliases");
    let mut aliases = BTreeMap::new();
    for entry in d.entries(fields, "aliases") {
        let alias_path = child(&path, entry.key);
        if let Some(problem) = alias_name_problem(entry.key) {
            d.error_at(&alias_path, Some(entry.key_location), problem);
        }
        if let Some(alias) = decode_alias(d, entry.value, &alias_path) {
            aliases.insert(entry.key.to_owned(), alias);
        }
    }
    aliases
}

fn decode_alias(d: &mut Decoder<'_>, node: &Node, path: &str) -> Option<AliasConfig> {
    let fields = d.mapping(node, path, Some(ALIAS_KEYS))?;
    // An unquoted `version: 3` is a YAML integer; its text is the version all the same.
    let version = match fields.get("version") {
        Some(node) => d
            .text_node(node, &fields.path_of("version"), "a version")
            .and_then_check(|version| {
                if version == "$LATEST" || is_version_number(&version) {
                    Ok(version)
                } else {
                    Err(format!(
                        "invalid version `{version}`: expected `$LATEST` or a version number, like `1`"
                    ))
                }
            }),
        None => Checked::Field(Field::Absent),
    };
    let version = report(d, &fields, "version", version);
    if matches!(version, Field::Absent) {
        d.error(
            path,
            "missing field `version` (`$LATEST` or a version number, like `1`)",
        );
    }
    let version = version.ok();
    let additional_version_weights = decode_weights(d, &fields, version.as_deref());
    let description = decode_description(d, &fields);
    Some(AliasConfig {
        version: version?,
        additional_version_weights,
        description,
    })
}

/// `additional_version_weights: { "2": 0.1 }`: one other published version and its share.
fn decode_weights(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    version: Option<&str>,
) -> BTreeMap<String, f64> {
    let path = fields.path_of("additional_version_weights");
    let mut weights = BTreeMap::new();
    for (i, entry) in d
        .entries(fields, "additional_version_weights")
        .iter()
        .enumerate()
    {
        let weight_path = child(&path, entry.key);
        let key_problem = if i > 0 {
            Some(
                "at most one additional version is allowed: an alias splits its traffic between two versions"
                    .to_owned(),
            )
        } else if entry.key == "$LATEST" {
            Some(
                "the additional version must be a published version number, not `$LATEST`"
                    .to_owned(),
            )
        } else if !is_version_number(entry.key) {
            Some(format!(
                "invalid version `{}`: expected a version number, like `2`",
                entry.key
            ))
        } else if version == Some("$LATEST") {
            // As in Lambda: the unpublished `$LATEST` changes under the split.
            Some(
                "an alias that points at `$LATEST` cannot split its traffic: point `version` at a published version"
                    .to_owned(),
            )
        } else if version == Some(entry.key) {
            Some(format!(
                "version `{}` is already the alias's `version`: the additional version must be another one",
                entry.key
            ))
        } else {
            None
        };
        if let Some(problem) = key_problem {
            d.error_at(&weight_path, Some(entry.key_location), problem);
            continue;
        }
        if let Some(weight) = decode_weight(d, entry.value, &weight_path) {
            weights.insert(entry.key.to_owned(), weight);
        }
    }
    weights
}

/// A share of invocations, strictly between 0 and 1.
fn decode_weight(d: &mut Decoder<'_>, node: &Node, path: &str) -> Option<f64> {
    match d.scalar(node, path, "a number") {
        Field::Value((text, plain)) => {
            let weight = if plain {
                yaml::float_value(&text)
            } else {
                None
            };
            match weight {
                Some(weight) if weight > 0.0 && weight < 1.0 => Some(weight),
                Some(_) => {
                    d.error(
                        path,
                        format!("weight must be greater than 0 and less than 1, got {text}"),
                    );
                    None
                }
                None => {
                    let found = yaml::scalar_type(&text, plain);
                    d.error(
                        path,
                        format!("expected a weight between 0 and 1, found {found} (`{text}`)"),
                    );
                    None
                }
            }
        }
        Field::Absent => {
            d.error(
                path,
                "missing weight: give the share of invocations for this version, like `0.1`",
            );
            None
        }
        Field::Invalid => None,
    }
}

/// A value that was read but failed a check, with the message for its node.
pub(crate) enum Checked<T> {
    Field(Field<T>),
    Failed(String),
}

pub(crate) trait AndThenCheck<T> {
    fn and_then_check<U>(self, check: impl FnOnce(T) -> Result<U, String>) -> Checked<U>;
}

impl<T> AndThenCheck<T> for Field<T> {
    fn and_then_check<U>(self, check: impl FnOnce(T) -> Result<U, String>) -> Checked<U> {
        match self {
            Field::Value(value) => match check(value) {
                Ok(value) => Checked::Field(Field::Value(value)),
                Err(message) => Checked::Failed(message),
            },
            Field::Absent => Checked::Field(Field::Absent),
            Field::Invalid => Checked::Field(Field::Invalid),
        }
    }
}

pub(crate) fn report<T>(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    key: &str,
    checked: Checked<T>,
) -> Field<T> {
    match checked {
        Checked::Field(field) => field,
        Checked::Failed(message) => {
            d.error(&fields.path_of(key), message);
            Field::Invalid
        }
    }
}

fn only_for(d: &mut Decoder<'_>, fields: &Fields<'_>, key: &str, wanted: &str, got: Runtime) {
    d.error(
        &fields.path_of(key),
        format!("`{key}` is only for runtime `{wanted}`, not `{got}`"),
    );
}

/// Joins a relative path onto `base`, dropping `.` components so that error messages and logs
/// show `/srv/functions/resize`, not `/srv/./functions/resize`.
pub(crate) fn resolve(base: &Path, path: &str) -> PathBuf {
    let joined = base.join(path);
    joined
        .components()
        .filter(|component| !matches!(component, Component::CurDir))
        .collect()
}

fn decode_command(d: &mut Decoder<'_>, fields: &Fields<'_>) -> Field<Vec<String>> {
    let Some(node) = fields.get("command") else {
        return Field::Absent;
    };
    let path = fields.path_of("command");
    let argv = match &node.kind {
        Kind::Sequence(items) => {
            let mut argv = Vec::with_capacity(items.len());
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                match d.text_node(item, &index(&path, i), "a string") {
                    Field::Value(arg) => argv.push(arg),
                    Field::Absent => {
                        d.error(&index(&path, i), "expected a string, found nothing");
                        ok = false;
                    }
                    Field::Invalid => ok = false,
                }
            }
            if !ok {
                return Field::Invalid;
            }
            argv
        }
        _ => match d.parse_node(node, &path, "a string or a list of strings", split_words) {
            Field::Value(argv) => argv,
            other => return other,
        },
    };
    if argv.is_empty() {
        d.error(&path, "must not be empty: give the program to start");
        return Field::Invalid;
    }
    Field::Value(argv)
}

pub(crate) fn check_url(text: &str) -> Result<String, String> {
    let uri: http::Uri = text
        .parse()
        .map_err(|e| format!("invalid URL `{text}`: {e}"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let host_ok = uri.host().is_some_and(|host| !host.is_empty());
    if scheme_ok && host_ok {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "invalid URL `{text}`: expected an http:// or https:// URL with a host"
        ))
    }
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    bounded_duration(
        text,
        "timeout",
        &(TIMEOUT_MIN..=TIMEOUT_MAX),
        "between 1s and 900s (15m)",
    )
}

/// A duration within `range`; `bounds` says the range in the error message.
pub(crate) fn bounded_duration(
    text: &str,
    what: &str,
    range: &std::ops::RangeInclusive<Duration>,
    bounds: &str,
) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if range.contains(&duration) {
        Ok(duration)
    } else {
        Err(format!("{what} `{text}` is out of range: must be {bounds}"))
    }
}

fn decode_environment(d: &mut Decoder<'_>, fields: &Fields<'_>) -> BTreeMap<String, String> {
    let path = fields.path_of("environment");
    let mut environment = BTreeMap::new();
    for entry in d.entries(fields, "environment") {
        let var_path = child(&path, entry.key);
        let name = entry.key;
        let problem = if !is_variable_name(name) {
            Some(format!(
                "invalid environment variable name `{name}`: must match [A-Za-z_][A-Za-z0-9_]*"
            ))
        } else if name.starts_with(RESERVED_ENV_PREFIX) {
            Some(format!(
                "environment variable `{name}` is reserved: names starting with `{RESERVED_ENV_PREFIX}` are set by the runtime"
            ))
        } else if RESERVED_ENV.contains(&name) {
            Some(format!(
                "environment variable `{name}` is reserved: the runtime sets it"
            ))
        } else {
            None
        };
        if let Some(message) = problem {
            d.error_at(&var_path, Some(entry.key_location), message);
        }
        let value = match d.text_node(entry.value, &var_path, "a string, number or boolean") {
            Field::Value(value) => value,
            // `NAME:` with nothing after it sets the variable to the empty string.
            Field::Absent => String::new(),
            Field::Invalid => continue,
        };
        environment.insert(name.to_owned(), value);
    }
    let size: usize = environment
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    if size > ENVIRONMENT_MAX_BYTES {
        d.error(
            &path,
            format!(
                "the environment variables take {size} bytes (names and values), over Lambda's limit of {ENVIRONMENT_MAX_BYTES} bytes (4 KB)"
            ),
        );
    }
    environment
}

/// Lambda's limit on a function's environment variables: 4 KB for all names and values
/// together, counted in bytes.
const ENVIRONMENT_MAX_BYTES: usize = 4096;

fn decode_tags(d: &mut Decoder<'_>, fields: &Fields<'_>) -> BTreeMap<String, String> {
    let path = fields.path_of("tags");
    let mut tags = BTreeMap::new();
    for entry in d.entries(fields, "tags") {
        let tag_path = child(&path, entry.key);
        match d.string_node(entry.value, &tag_path) {
            Field::Value(value) => {
                tags.insert(entry.key.to_owned(), value);
            }
            Field::Absent => {
                tags.insert(entry.key.to_owned(), String::new());
            }
            Field::Invalid => {}
        }
    }
    tags
}

/// The `type` of a source or dead letter, when it is one of `supported`; reports a missing or
/// unsupported one.
pub(crate) fn decode_type(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    path: &str,
    what: &str,
    supported: &[&str],
) -> Option<String> {
    let kind = match d.string(fields, "type") {
        Field::Value(kind) => kind,
        Field::Absent => {
            d.error(
                path,
                format!(
                    "missing field `type` (supported types are: {})",
                    supported.join(", ")
                ),
            );
            return None;
        }
        Field::Invalid => return None,
    };
    if !supported.contains(&kind.as_str()) {
        // The other keys belong to a schema this version does not know, so they are not
        // checked: one clear error beats a screenful of "unknown field".
        let message = with_suggestion(
            format!(
                "unsupported {what} type `{kind}`: supported types are: {}",
                supported.join(", ")
            ),
            &kind,
            supported,
        );
        d.error(&fields.path_of("type"), message);
        return None;
    }
    Some(kind)
}

/// What a source is checked against, besides its own fields.
struct SourceContext<'a> {
    name: &'a str,
    destinations: &'a Destinations<'a>,
    base_dir: &'a Path,
}

/// Every key a source of type `kind` takes.
fn source_keys(kind: &str) -> Vec<&'static str> {
    match kind {
        "http" => HTTP_KEYS.to_vec(),
        "schedule" => SCHEDULE_KEYS.to_vec(),
        other => PollType::from_name(other)
            .map(PollType::keys)
            .unwrap_or_default(),
    }
}

fn decode_source(
    d: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    context: &SourceContext<'_>,
    http_paths: &mut BTreeMap<String, String>,
) -> Option<SourceConfig> {
    let fields = d.mapping(node, path, None)?;
    let kind = decode_type(d, &fields, path, "source", SOURCE_TYPES)?;
    let known: Vec<&str> = SOURCE_TYPES.iter().flat_map(|t| source_keys(t)).collect();
    d.check_typed_keys(
        &fields,
        &source_keys(&kind),
        &known,
        &format!("`{kind}` sources"),
    );

    let functions = context.destinations.functions;
    let function = match d.string(&fields, "function") {
        Field::Value(function) => {
            check_function_ref(d, &fields.path_of("function"), function, functions)
        }
        Field::Absent => {
            d.error(path, "missing field `function`");
            None
        }
        Field::Invalid => None,
    };
    let enabled = d.boolean(&fields, "enabled").or(true);
    let kind = match kind.as_str() {
        "http" => SourceKind::Http(decode_http(d, &fields, path, context, http_paths)?),
        "schedule" => SourceKind::Schedule(decode_schedule(d, &fields, path)?),
        other => {
            let mapping = MappingContext {
                enabled,
                functions,
                dead_letters: context.destinations.dead_letters,
                base_dir: context.base_dir,
            };
            decode_poll_source(d, PollType::from_name(other)?, &fields, path, &mapping)?
        }
    };
    Some(SourceConfig {
        function: function?,
        enabled,
        kind,
    })
}

fn decode_schedule(d: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) -> Option<ScheduleConfig> {
    let rate = d.parse(fields, "rate", "a rate", parse_rate);
    let cron = d.parse(fields, "cron", "a cron expression", parse_cron);
    let input = fields
        .get("input")
        .and_then(|node| to_json(d, node, &fields.path_of("input")))
        .filter(|value| !value.is_null());
    let schedule = match (rate, cron) {
        (Field::Value(rate), Field::Absent) => Schedule::Rate(rate),
        (Field::Absent, Field::Value(cron)) => Schedule::Cron {
            expression: cron.expression,
            cron: cron.cron,
        },
        (Field::Absent, Field::Absent) => {
            d.error(
                path,
                "missing field `rate` or `cron` (a schedule needs one, like `rate: 5 minutes` or `cron: 0 12 * * ? *`)",
            );
            return None;
        }
        (rate, cron) => {
            if rate.is_present() && cron.is_present() {
                d.error(
                    path,
                    "both `rate` and `cron` are given: a schedule takes one of them",
                );
            }
            return None;
        }
    };
    Some(ScheduleConfig { schedule, input })
}

fn decode_http(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    path: &str,
    context: &SourceContext<'_>,
    http_paths: &mut BTreeMap<String, String>,
) -> Option<HttpSourceConfig> {
    let name = context.name;
    let url_path = match d.parse(fields, "path", "a path", check_http_path) {
        Field::Value(url_path) => match http_paths.get(&url_path) {
            Some(first) => {
                d.error(
                    &fields.path_of("path"),
                    format!("path `{url_path}` is already used by source `{first}`"),
                );
                None
            }
            None => {
                http_paths.insert(url_path.clone(), name.to_owned());
                Some(url_path)
            }
        },
        Field::Absent => {
            d.error(
                path,
                "missing field `path` (where the webhook listens, like `/hooks/orders`)",
            );
            None
        }
        Field::Invalid => None,
    };
    let asynchronous = d
        .parse(
            fields,
            "invocation",
            "`sync` or `async`",
            |text| match text {
                "sync" => Ok(false),
                "async" => Ok(true),
                other => Err(with_suggestion(
                    format!(
                        "unknown invocation `{other}`, expected one of: {}",
                        INVOCATIONS.join(", ")
                    ),
                    other,
                    INVOCATIONS,
                )),
            },
        )
        .or(false);
    let methods = match decode_methods(d, fields) {
        Field::Value(methods) => Some(methods),
        Field::Absent => Some(
            defaults::HTTP_METHODS
                .iter()
                .map(|method| (*method).to_owned())
                .collect(),
        ),
        Field::Invalid => None,
    };
    let max_body = d
        .parse(fields, "max_body", "a size", parse_positive_size)
        .or(crate::defaults::HTTP_MAX_BODY);
    let auth = decode_webhook_auth(d, fields, context.base_dir);
    Some(HttpSourceConfig {
        path: url_path?,
        asynchronous,
        methods: methods?,
        max_body,
        auth: auth?,
    })
}

/// `auth:` of an `http` source: `none`, or a mapping with its `type`. `None` when invalid
/// (the error is reported).
fn decode_webhook_auth(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    base_dir: &Path,
) -> Option<WebhookAuth> {
    let path = fields.path_of("auth");
    let Some(node) = fields.get("auth") else {
        return Some(WebhookAuth::None);
    };
    if !matches!(node.kind, Kind::Mapping(_)) {
        return match d.string_node(node, &path) {
            Field::Value(text) if text == "none" => Some(WebhookAuth::None),
            Field::Absent => Some(WebhookAuth::None),
            Field::Value(other) => {
                d.error(
                    &path,
                    format!(
                        "unknown webhook auth `{other}`: give `none` or a mapping with `type:` (one of: {})",
                        WEBHOOK_AUTH_TYPES.join(", ")
                    ),
                );
                None
            }
            Field::Invalid => None,
        };
    }
    let auth = d.mapping(node, &path, None)?;
    let kind = decode_type(d, &auth, &path, "webhook auth", WEBHOOK_AUTH_TYPES)?;
    match kind.as_str() {
        "none" => {
            d.check_keys(&auth, &["type"]);
            Some(WebhookAuth::None)
        }
        "aws_iam" => {
            d.check_keys(&auth, &["type"]);
            Some(WebhookAuth::AwsIam)
        }
        "hmac_sha256" => {
            d.check_keys(&auth, HMAC_AUTH_KEYS);
            let secret = crate::secret::secret(d, &auth, "secret", "secret_file", base_dir);
            let header = match d.string(&auth, "header") {
                Field::Value(h) if http::HeaderName::from_bytes(h.as_bytes()).is_ok() => Some(h),
                Field::Value(h) => {
                    d.error(
                        &auth.path_of("header"),
                        format!("`{h}` is not a valid HTTP header name"),
                    );
                    None
                }
                Field::Absent => Some(DEFAULT_SIGNATURE_HEADER.to_owned()),
                Field::Invalid => None,
            };
            let secret = match secret {
                Field::Value(s) => Some(s),
                Field::Absent => {
                    d.error(&path, "missing field `secret` (or `secret_file`)");
                    None
                }
                Field::Invalid => None,
            };
            Some(WebhookAuth::HmacSha256 {
                secret: secret?,
                header: header?,
            })
        }
        _ => {
            d.check_keys(&auth, BEARER_AUTH_KEYS);
            match crate::secret::secret(d, &auth, "token", "token_file", base_dir) {
                Field::Value(token) => Some(WebhookAuth::Bearer { token }),
                Field::Absent => {
                    d.error(&path, "missing field `token` (or `token_file`)");
                    None
                }
                Field::Invalid => None,
            }
        }
    }
}

/// `api.tls`: both files named, each readable. Their PEM is parsed when the listener starts.
fn decode_tls(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    base_dir: &Path,
) -> Option<crate::TlsConfig> {
    let file = |d: &mut Decoder<'_>, key: &str, what: &str| -> Option<PathBuf> {
        match d.string(fields, key) {
            Field::Value(path) => {
                let full = base_dir.join(&path);
                match std::fs::File::open(&full) {
                    Ok(_) => Some(full),
                    Err(e) => {
                        d.error(
                            &fields.path_of(key),
                            format!("cannot read the {what} `{}`: {e}", full.display()),
                        );
                        None
                    }
                }
            }
            Field::Absent => {
                d.error(
                    &fields.path,
                    format!("missing field `{key}` (the {what}, a PEM file)"),
                );
                None
            }
            Field::Invalid => None,
        }
    };
    let cert = file(d, "cert", "certificate chain");
    let key = file(d, "key", "private key");
    Some(crate::TlsConfig {
        cert: cert?,
        key: key?,
    })
}

fn check_http_path(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err(format!("invalid path `{text}`: must start with `/`"));
    }
    if let Some(c) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "/_.~-".contains(*c)))
    {
        return Err(format!(
            "invalid path `{text}`: `{c}` is not allowed; use letters, digits and `/`, `_`, `.`, `~`, `-`"
        ));
    }
    // `..` would let `/x/../metrics` past the reserved check; `//` and `.` are mistakes.
    let segments: Vec<&str> = text[1..].split('/').collect();
    let last = segments.len() - 1;
    if segments
        .iter()
        .enumerate()
        .any(|(i, segment)| matches!(*segment, "." | "..") || (segment.is_empty() && i != last))
    {
        return Err(format!(
            "invalid path `{text}`: empty, `.` and `..` segments are not allowed"
        ));
    }
    // By whole segments: `/metrics` and `/metrics/x` are Sluice's, `/metrics-in` is free.
    if let Some(reserved) = RESERVED_HTTP_PATHS.iter().find(|reserved| {
        text.strip_prefix(**reserved)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }) {
        return Err(format!(
            "path `{text}` is reserved: Sluice's own API is served under `{reserved}`"
        ));
    }
    Ok(text.to_owned())
}

fn decode_methods(d: &mut Decoder<'_>, fields: &Fields<'_>) -> Field<Vec<String>> {
    let Some(node) = fields.get("methods") else {
        return Field::Absent;
    };
    let path = fields.path_of("methods");
    let items = match &node.kind {
        Kind::Sequence(items) => items,
        _ if node.is_null() => return Field::Absent,
        _ => {
            d.error(
                &path,
                format!(
                    "expected a list of methods, like `[POST, PUT]`, found {}",
                    node.type_name()
                ),
            );
            return Field::Invalid;
        }
    };
    if items.is_empty() {
        d.error(
            &path,
            "must not be empty: give at least one method, like `[POST]`",
        );
        return Field::Invalid;
    }
    let mut methods: Vec<String> = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = index(&path, i);
        let method = match d.string_node(item, &item_path) {
            Field::Value(method) => method,
            Field::Absent => {
                d.error(&item_path, "expected a method, found nothing");
                ok = false;
                continue;
            }
            Field::Invalid => {
                ok = false;
                continue;
            }
        };
        let upper = method.to_ascii_uppercase();
        let problem = if methods.contains(&method) {
            Some(format!("duplicate method `{method}`"))
        } else if HTTP_METHODS.contains(&method.as_str()) {
            None
        } else if HTTP_METHODS.contains(&upper.as_str()) {
            Some(format!("methods are written in uppercase: `{upper}`"))
        } else {
            Some(with_suggestion(
                format!(
                    "unsupported method `{method}`, expected one of: {}",
                    HTTP_METHODS.join(", ")
                ),
                &method,
                HTTP_METHODS,
            ))
        };
        match problem {
            Some(problem) => {
                d.error(&item_path, problem);
                ok = false;
            }
            None => methods.push(method),
        }
    }
    if ok {
        Field::Value(methods)
    } else {
        Field::Invalid
    }
}

/// Checks `name[:qualifier]` against the declared functions.
fn check_function_ref(
    d: &mut Decoder<'_>,
    path: &str,
    reference: String,
    declared: &Names<'_>,
) -> Option<String> {
    let (name, qualifier) = match reference.split_once(':') {
        Some((name, qualifier)) => (name, Some(qualifier)),
        None => (reference.as_str(), None),
    };
    if qualifier == Some("") {
        d.error(
            path,
            format!("missing qualifier after `:` in `{reference}`: give a version or an alias, like `{name}:live`"),
        );
        return None;
    }
    if let Some(qualifier) = qualifier {
        let valid = (1..=128).contains(&qualifier.len())
            && qualifier
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'$'));
        if !valid {
            d.error(
                path,
                format!(
                    "invalid qualifier `{qualifier}` in `{reference}`: expected a version or an alias, like `resize:live` or `resize:3`"
                ),
            );
            return None;
        }
    }
    if !declared.contains(name) {
        let message = with_suggestion(
            format!("unknown function `{name}`: it is not declared under `functions`"),
            name,
            declared.as_slice(),
        );
        d.error(path, message);
        return None;
    }
    Some(reference)
}

/// Converts any node to JSON, typing plain scalars as YAML does. Errors are reported per
/// scalar; `None` when any part failed.
pub(crate) fn to_json(d: &mut Decoder<'_>, node: &Node, path: &str) -> Option<serde_json::Value> {
    use serde_json::Value;
    match &node.kind {
        Kind::Sequence(items) => {
            let mut values = Vec::with_capacity(items.len());
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                match to_json(d, item, &index(path, i)) {
                    Some(value) => values.push(value),
                    None => ok = false,
                }
            }
            ok.then_some(Value::Array(values))
        }
        Kind::Mapping(_) => {
            let fields = d.mapping(node, path, None)?;
            let mut object = serde_json::Map::new();
            let mut ok = true;
            for (key, value) in fields.iter() {
                match to_json(d, value, &fields.path_of(key)) {
                    Some(json) => {
                        object.insert(key.to_owned(), json);
                    }
                    None => ok = false,
                }
            }
            ok.then_some(Value::Object(object))
        }
        Kind::Scalar { .. } => match d.scalar(node, path, "a value") {
            Field::Value((text, false)) => Some(Value::String(text)),
            Field::Value((text, true)) => scalar_json(d, path, text),
            Field::Absent => Some(Value::Null),
            Field::Invalid => None,
        },
    }
}

fn scalar_json(d: &mut Decoder<'_>, path: &str, text: String) -> Option<serde_json::Value> {
    use serde_json::Value;
    if let Some(value) = yaml::bool_value(&text) {
        return Some(Value::Bool(value));
    }
    if let Some(value) = yaml::int_value(&text) {
        if let Ok(value) = i64::try_from(value) {
            return Some(Value::from(value));
        }
        if let Ok(value) = u64::try_from(value) {
            return Some(Value::from(value));
        }
    }
    if let Some(value) = yaml::float_value(&text) {
        return match serde_json::Number::from_f64(value) {
            Some(number) => Some(Value::Number(number)),
            None => {
                d.error(path, format!("`{text}` cannot be represented in JSON"));
                None
            }
        };
    }
    Some(Value::String(text))
}
