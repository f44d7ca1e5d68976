//! The file's schema: which keys exist, their types, ranges and defaults.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::decode::{Decoder, Field, Fields, child, closest, index};
use crate::interpolate::is_variable_name;
use crate::shell::split_words;
use crate::units::{parse_duration, parse_rate, parse_size};
use crate::yaml::{self, Kind, Node};
use crate::{
    ConcurrencyConfig, Config, FunctionConfig, Limits, Runtime, Schedule, ScheduleConfig,
    SourceConfig, SourceKind, defaults,
};

const TOP_KEYS: &[&str] = &[
    "api",
    "state",
    "limits",
    "concurrency",
    "functions",
    "sources",
];
const API_KEYS: &[&str] = &["listen"];
const LIMITS_KEYS: &[&str] = &["package_zipped", "package_unpacked"];
const CONCURRENCY_KEYS: &[&str] = &["limit"];
const FUNCTION_KEYS: &[&str] = &[
    "runtime",
    "package",
    "command",
    "handler",
    "memory_mb",
    "timeout",
    "environment",
    "reserved_concurrency",
    "description",
    "tags",
    "url",
];
const SCHEDULE_KEYS: &[&str] = &["type", "function", "enabled", "rate", "cron", "input"];
const SOURCE_TYPES: &[&str] = &["schedule"];
const RUNTIMES: &[&str] = &["process", "http", "native"];

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
const DESCRIPTION_MAX_CHARS: usize = 256;
const FUNCTION_NAME_MAX: usize = 64;

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

    let functions = d.entries(&top, "functions");
    let declared: Vec<&str> = functions.iter().map(|entry| entry.key).collect();
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
        if let Some(function) = decode_function(d, entry.key, entry.value, &path, &config) {
            config.functions.insert(entry.key.to_owned(), function);
        }
    }

    for entry in d.entries(&top, "sources") {
        let path = child(&top.path_of("sources"), entry.key);
        if let Some(source) = decode_source(d, entry.value, &path, &declared) {
            config.sources.insert(entry.key.to_owned(), source);
        }
    }
    config
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

/// Lambda's rule for function names.
fn is_function_name(name: &str) -> bool {
    (1..=FUNCTION_NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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

fn with_suggestion(mut message: String, word: &str, candidates: &[&str]) -> String {
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
    let description = d
        .string(&fields, "description")
        .and_then_check(|description| match description.chars().count() {
            n if n > DESCRIPTION_MAX_CHARS => Err(format!(
                "is {n} characters long; at most {DESCRIPTION_MAX_CHARS} are allowed"
            )),
            _ => Ok(description),
        });
    let description = report(d, &fields, "description", description).ok();
    let tags = decode_tags(d, &fields);

    let runtime = runtime?;
    let command = command
        .ok()
        .or_else(|| (runtime == Runtime::Process).then(|| vec![defaults::COMMAND.to_owned()]));
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
        description,
        tags,
        url: url.ok(),
    })
}

/// A value that was read but failed a check, with the message for its node.
enum Checked<T> {
    Field(Field<T>),
    Failed(String),
}

trait AndThenCheck<T> {
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

fn report<T>(d: &mut Decoder<'_>, fields: &Fields<'_>, key: &str, checked: Checked<T>) -> Field<T> {
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
fn resolve(base: &Path, path: &str) -> PathBuf {
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

fn check_url(text: &str) -> Result<String, String> {
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
    let timeout = parse_duration(text)?;
    if (TIMEOUT_MIN..=TIMEOUT_MAX).contains(&timeout) {
        Ok(timeout)
    } else {
        Err(format!(
            "timeout `{text}` is out of range: must be between 1s and 900s (15m)"
        ))
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
    environment
}

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

fn decode_source(
    d: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    declared: &[&str],
) -> Option<SourceConfig> {
    let fields = d.mapping(node, path, None)?;
    let kind = match d.string(&fields, "type") {
        Field::Value(kind) => kind,
        Field::Absent => {
            d.error(
                path,
                format!(
                    "missing field `type` (supported types are: {})",
                    SOURCE_TYPES.join(", ")
                ),
            );
            return None;
        }
        Field::Invalid => return None,
    };
    if kind != "schedule" {
        // The other keys belong to a schema this version does not know, so they are not
        // checked: one clear error beats a screenful of "unknown field".
        let message = with_suggestion(
            format!(
                "unsupported source type `{kind}`: supported types are: {}",
                SOURCE_TYPES.join(", ")
            ),
            &kind,
            SOURCE_TYPES,
        );
        d.error(&fields.path_of("type"), message);
        return None;
    }
    d.check_keys(&fields, SCHEDULE_KEYS);

    let function = match d.string(&fields, "function") {
        Field::Value(function) => {
            check_function_ref(d, &fields.path_of("function"), function, declared)
        }
        Field::Absent => {
            d.error(path, "missing field `function`");
            None
        }
        Field::Invalid => None,
    };
    let enabled = d.boolean(&fields, "enabled").or(true);
    let rate = d.parse(&fields, "rate", "a rate", parse_rate);
    if fields.get("cron").is_some() {
        d.error(
            &fields.path_of("cron"),
            "cron schedules are not supported yet; use rate",
        );
    } else if !rate.is_present() {
        d.error(
            path,
            "missing field `rate` (a schedule needs one, like `rate: 5 minutes`)",
        );
    }
    let input = fields
        .get("input")
        .and_then(|node| to_json(d, node, &fields.path_of("input")))
        .filter(|value| !value.is_null());

    Some(SourceConfig {
        function: function?,
        enabled,
        kind: SourceKind::Schedule(ScheduleConfig {
            schedule: Schedule::Rate(rate.ok()?),
            input,
        }),
    })
}

/// Checks `name[:qualifier]` against the declared functions.
fn check_function_ref(
    d: &mut Decoder<'_>,
    path: &str,
    reference: String,
    declared: &[&str],
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
    if !declared.contains(&name) {
        let message = with_suggestion(
            format!("unknown function `{name}`: it is not declared under `functions`"),
            name,
            declared,
        );
        d.error(path, message);
        return None;
    }
    Some(reference)
}

/// Converts any node to JSON, typing plain scalars as YAML does. Errors are reported per
/// scalar; `None` when any part failed.
fn to_json(d: &mut Decoder<'_>, node: &Node, path: &str) -> Option<serde_json::Value> {
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
