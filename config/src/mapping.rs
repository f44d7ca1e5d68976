//! Poll-based sources (`kinesis`, `dynamodb_streams`, `sqs`, `rabbitmq`, `kafka`) and the event
//! source mapping settings they share: starting position, batching, filters, retries.

use std::path::Path;
use std::time::Duration;

use crate::decode::{Decoder, Field, Fields, Names, child, index};
use crate::endpoints::{
    check_amqp_name, check_amqp_uri, check_dynamodb_stream_arn, check_dynamodb_table,
    check_kinesis_stream, check_queue_url, decode_aws, decode_brokers, decode_properties,
    decode_topics,
};
use crate::filter::FilterPattern;
use crate::schema::{AndThenCheck, bounded_duration, report, resolve, to_json, with_suggestion};
use crate::units::parse_size;
use crate::yaml::Kind;
use crate::{
    BatchConfig, DynamoDbStreamsConfig, KafkaConfig, KafkaSecurity, KinesisConfig, MappingConfig,
    RabbitMqConfig, RetryConfig, SourceKind, SqsConfig, StartingPosition, defaults,
};

/// Keys of every source.
const COMMON_KEYS: &[&str] = &["type", "function", "enabled"];
/// Mapping keys of the sources with shards or partitions, which are read from a position and
/// keep order.
const STREAM_MAPPING_KEYS: &[&str] = &[
    "starting_position",
    "starting_position_timestamp",
    "batch",
    "filters",
    "parallelization",
    "retry",
    "bisect_on_error",
    "report_batch_item_failures",
    "on_failure",
];
/// DynamoDB Streams has no timestamp iterator, so `starting_position_timestamp` is left out.
const DYNAMODB_MAPPING_KEYS: &[&str] = &[
    "starting_position",
    "batch",
    "filters",
    "parallelization",
    "retry",
    "bisect_on_error",
    "report_batch_item_failures",
    "on_failure",
];
/// Mapping keys of the queues, which have neither positions nor order to keep.
const QUEUE_MAPPING_KEYS: &[&str] = &[
    "batch",
    "filters",
    "retry",
    "report_batch_item_failures",
    "on_failure",
];
const KINESIS_KEYS: &[&str] = &["stream", "endpoint_url", "region"];
const DYNAMODB_KEYS: &[&str] = &["stream_arn", "table", "endpoint_url", "region"];
const SQS_KEYS: &[&str] = &["queue_url", "endpoint_url", "region", "maximum_concurrency"];
const RABBITMQ_KEYS: &[&str] = &["uri", "queue", "prefetch"];
const KAFKA_KEYS: &[&str] = &[
    "brokers",
    "topics",
    "topic_pattern",
    "group_id",
    "security",
    "properties",
];
const BATCH_KEYS: &[&str] = &["size", "window", "max_bytes"];
const RETRY_KEYS: &[&str] = &["max_attempts", "max_record_age"];
const SECURITY_KEYS: &[&str] = &[
    "protocol",
    "sasl_mechanism",
    "username",
    "password",
    "ca_location",
];
const STARTING_POSITIONS: &[&str] = &["trim_horizon", "latest", "at_timestamp"];
const KAFKA_PROTOCOLS: &[&str] = &["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
const SASL_MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// librdkafka properties that other keys of a Kafka source set.
const KAFKA_SOURCE_REFUSED: &[(&str, &str)] = &[
    ("bootstrap.servers", "it comes from `brokers`"),
    ("group.id", "it comes from `group_id`"),
    ("auto.offset.reset", "it comes from `starting_position`"),
    (
        "enable.auto.commit",
        "Sluice commits offsets itself, only once a record's outcome is final",
    ),
    (
        "enable.auto.offset.store",
        "Sluice commits offsets itself, only once a record's outcome is final",
    ),
    ("security.protocol", "it comes from `security.protocol`"),
    ("sasl.mechanism", "it comes from `security.sasl_mechanism`"),
    ("sasl.mechanisms", "it comes from `security.sasl_mechanism`"),
    ("sasl.username", "it comes from `security.username`"),
    ("sasl.password", "it comes from `security.password`"),
    ("ssl.ca.location", "it comes from `security.ca_location`"),
];

const BATCH_SIZE: std::ops::RangeInclusive<i128> = 1..=10_000;
/// Above this an `sqs` batch needs a window, and a FIFO queue takes no more, as in Lambda.
const SQS_UNWINDOWED_BATCH_MAX: u32 = 10;
const BATCH_WINDOW: std::ops::RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(300);
const BATCH_MAX_BYTES: std::ops::RangeInclusive<u64> = 1..=defaults::BATCH_MAX_BYTES;
/// Lambda allows 5 filters per event source mapping unless the quota is raised.
const MAX_FILTERS: usize = 5;
const PARALLELIZATION: std::ops::RangeInclusive<i128> = 1..=10;
const MAX_ATTEMPTS: std::ops::RangeInclusive<i128> = -1..=10_000;
const MAX_RECORD_AGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(60)..=Duration::from_secs(7 * 86_400);
const SQS_MAXIMUM_CONCURRENCY: std::ops::RangeInclusive<i128> = 2..=1_000;
const RABBITMQ_PREFETCH: std::ops::RangeInclusive<i128> = 1..=65_535;

/// A poll-based source type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PollType {
    Kinesis,
    DynamoDbStreams,
    Sqs,
    RabbitMq,
    Kafka,
}

impl PollType {
    pub(crate) fn from_name(name: &str) -> Option<PollType> {
        match name {
            "kinesis" => Some(PollType::Kinesis),
            "dynamodb_streams" => Some(PollType::DynamoDbStreams),
            "sqs" => Some(PollType::Sqs),
            "rabbitmq" => Some(PollType::RabbitMq),
            "kafka" => Some(PollType::Kafka),
            _ => None,
        }
    }

    /// Shards or partitions: read from a starting position, in order, checkpointed.
    fn has_order(self) -> bool {
        !matches!(self, PollType::Sqs | PollType::RabbitMq)
    }

    /// Every key a source of this type takes, in the order messages list them.
    pub(crate) fn keys(self) -> Vec<&'static str> {
        let (own, mapping) = match self {
            PollType::Kinesis => (KINESIS_KEYS, STREAM_MAPPING_KEYS),
            PollType::DynamoDbStreams => (DYNAMODB_KEYS, DYNAMODB_MAPPING_KEYS),
            PollType::Sqs => (SQS_KEYS, QUEUE_MAPPING_KEYS),
            PollType::RabbitMq => (RABBITMQ_KEYS, QUEUE_MAPPING_KEYS),
            PollType::Kafka => (KAFKA_KEYS, STREAM_MAPPING_KEYS),
        };
        [COMMON_KEYS, own, mapping].concat()
    }
}

/// What a mapping's settings are checked against.
pub(crate) struct MappingContext<'a> {
    pub(crate) enabled: bool,
    pub(crate) functions: &'a Names<'a>,
    pub(crate) dead_letters: &'a Names<'a>,
    pub(crate) base_dir: &'a Path,
}

/// The type-specific part of a poll-based source; its keys have been checked already.
pub(crate) fn decode_poll_source(
    d: &mut Decoder<'_>,
    poll: PollType,
    fields: &Fields<'_>,
    path: &str,
    context: &MappingContext<'_>,
) -> Option<SourceKind> {
    let mapping = decode_mapping(d, poll, fields, path, context);
    let kind = match poll {
        PollType::Kinesis => {
            let stream = d.parse(fields, "stream", "a stream", check_kinesis_stream);
            let stream = d.required(
                stream,
                path,
                "missing field `stream` (a stream name or ARN, like `orders`)",
            );
            SourceKind::Kinesis(KinesisConfig {
                stream: stream?,
                aws: decode_aws(d, fields),
                mapping,
            })
        }
        PollType::DynamoDbStreams => {
            let stream_arn = d.parse(fields, "stream_arn", "an ARN", check_dynamodb_stream_arn);
            let table = d.parse(fields, "table", "a table name", check_dynamodb_table);
            let aws = decode_aws(d, fields);
            match (stream_arn, table) {
                (Field::Value(stream_arn), Field::Absent) => {
                    SourceKind::DynamoDbStreams(DynamoDbStreamsConfig {
                        stream_arn: Some(stream_arn),
                        table: None,
                        aws,
                        mapping,
                    })
                }
                (Field::Absent, Field::Value(table)) => {
                    SourceKind::DynamoDbStreams(DynamoDbStreamsConfig {
                        stream_arn: None,
                        table: Some(table),
                        aws,
                        mapping,
                    })
                }
                (Field::Absent, Field::Absent) => {
                    d.error(
                        path,
                        "missing field `stream_arn` or `table` (the stream to read, by its ARN or by its table's name)",
                    );
                    return None;
                }
                (stream_arn, table) => {
                    if stream_arn.is_present() && table.is_present() {
                        d.error(
                            path,
                            "both `stream_arn` and `table` are given: a `dynamodb_streams` source takes one of them",
                        );
                    }
                    return None;
                }
            }
        }
        PollType::Sqs => {
            let queue_url = d.parse(fields, "queue_url", "a URL", check_queue_url);
            let queue_url = d.required(
                queue_url,
                path,
                "missing field `queue_url` (like `https://sqs.eu-west-1.amazonaws.com/123456789012/orders`)",
            );
            if let Some(url) = &queue_url
                && url.ends_with(".fifo")
                && mapping.batch.size > SQS_UNWINDOWED_BATCH_MAX
            {
                d.error(
                    &child(&fields.path_of("batch"), "size"),
                    format!(
                        "a FIFO queue takes at most {SQS_UNWINDOWED_BATCH_MAX} messages per batch, as in Lambda"
                    ),
                );
            }
            let maximum_concurrency = d
                .int(fields, "maximum_concurrency", SQS_MAXIMUM_CONCURRENCY, "")
                .ok()
                .and_then(|n| u32::try_from(n).ok());
            SourceKind::Sqs(SqsConfig {
                queue_url: queue_url?,
                aws: decode_aws(d, fields),
                maximum_concurrency,
                mapping,
            })
        }
        PollType::RabbitMq => {
            let uri = d.parse(fields, "uri", "a URI", check_amqp_uri);
            let uri = d.required(
                uri,
                path,
                "missing field `uri` (like `amqp://guest:guest@127.0.0.1:5672/%2f`, best from `${RABBITMQ_URI}`)",
            );
            let queue = d.string(fields, "queue").and_then_check(|queue| {
                if queue.is_empty() {
                    Err("must not be empty".to_owned())
                } else {
                    check_amqp_name(queue)
                }
            });
            let queue = report(d, fields, "queue", queue);
            let queue = d.required(queue, path, "missing field `queue` (the queue to consume)");
            let prefetch = d
                .int(fields, "prefetch", RABBITMQ_PREFETCH, "")
                .ok()
                .and_then(|n| u16::try_from(n).ok())
                .unwrap_or(defaults::RABBITMQ_PREFETCH);
            SourceKind::RabbitMq(RabbitMqConfig {
                uri: uri?,
                queue: queue?,
                prefetch,
                mapping,
            })
        }
        PollType::Kafka => SourceKind::Kafka(decode_kafka(d, fields, path, context, mapping)?),
    };
    Some(kind)
}

fn decode_kafka(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    path: &str,
    context: &MappingContext<'_>,
    mapping: MappingConfig,
) -> Option<KafkaConfig> {
    let brokers = decode_brokers(d, fields);
    let brokers = d.required(
        brokers,
        path,
        "missing field `brokers` (the bootstrap servers, like `[127.0.0.1:9092]`)",
    );
    let topics = decode_topics(d, fields);
    let topic_pattern = d.parse(
        fields,
        "topic_pattern",
        "a regular expression",
        check_topic_pattern,
    );
    let (topics, topic_pattern) = match (topics, topic_pattern) {
        (Field::Value(topics), Field::Absent) => (Some(topics), Some(None)),
        (Field::Absent, Field::Value(pattern)) => (Some(Vec::new()), Some(Some(pattern))),
        (Field::Absent, Field::Absent) => {
            d.error(
                path,
                "missing field `topics` or `topic_pattern` (the topics to read, like `topics: [orders]`)",
            );
            (None, None)
        }
        (topics, topic_pattern) => {
            if topics.is_present() && topic_pattern.is_present() {
                d.error(
                    path,
                    "both `topics` and `topic_pattern` are given: a `kafka` source takes one of them",
                );
            }
            (None, None)
        }
    };
    let group_id = d.string(fields, "group_id").and_then_check(|group_id| {
        if group_id.is_empty() {
            Err("must not be empty".to_owned())
        } else {
            Ok(group_id)
        }
    });
    let group_id = report(d, fields, "group_id", group_id);
    let group_id = d.required(
        group_id,
        path,
        "missing field `group_id` (the consumer group, which keeps this source's offsets)",
    );
    let security = decode_security(d, fields, context.base_dir);
    let properties = decode_properties(d, fields, KAFKA_SOURCE_REFUSED);
    Some(KafkaConfig {
        brokers: brokers?,
        topics: topics?,
        topic_pattern: topic_pattern?,
        group_id: group_id?,
        security: security?,
        properties,
        mapping,
    })
}

/// A topic pattern must compile; `regex`'s own message spans several lines (the pattern with a
/// caret under the problem), so only its last line, the reason, is kept.
fn check_topic_pattern(text: &str) -> Result<String, String> {
    match regex::Regex::new(text) {
        Ok(_) => Ok(text.to_owned()),
        Err(e) => {
            let full = e.to_string();
            let reason = full.lines().last().unwrap_or_default();
            let reason = reason.strip_prefix("error: ").unwrap_or(reason);
            Err(format!("invalid topic pattern `{text}`: {reason}"))
        }
    }
}

/// `security`; `None` when something in it is wrong (already reported).
fn decode_security(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    base_dir: &Path,
) -> Option<KafkaSecurity> {
    let security = d.section(fields, "security", SECURITY_KEYS)?;
    let errors_before = d.found;
    let protocol = d.parse(&security, "protocol", "a protocol", |text| {
        one_of(text, "protocol", KAFKA_PROTOCOLS, str::to_ascii_lowercase)
    });
    let sasl_mechanism = d.parse(&security, "sasl_mechanism", "a SASL mechanism", |text| {
        one_of(
            text,
            "SASL mechanism",
            SASL_MECHANISMS,
            str::to_ascii_uppercase,
        )
    });
    // Credentials are taken as text whatever they look like, and never repeated in messages.
    let username = match security.get("username") {
        Some(node) => d.text_node(node, &security.path_of("username"), "a user name"),
        None => Field::Absent,
    };
    let password = match security.get("password") {
        Some(node) => d.text_node(node, &security.path_of("password"), "a password"),
        None => Field::Absent,
    };
    let ca_location = d.string(&security, "ca_location").and_then_check(|file| {
        if file.is_empty() {
            Err("must not be empty".to_owned())
        } else {
            Ok(resolve(base_dir, &file))
        }
    });
    let ca_location = report(d, &security, "ca_location", ca_location);

    // With an unreadable protocol, the rules that depend on it are not checked against a guess.
    if !matches!(protocol, Field::Invalid) {
        let shown = match &protocol {
            Field::Value(protocol) => format!(", not `{protocol}`"),
            _ => " (the default is `plaintext`)".to_owned(),
        };
        let protocol = match &protocol {
            Field::Value(protocol) => protocol.as_str(),
            _ => "plaintext",
        };
        let sasl = protocol.starts_with("sasl_");
        if sasl {
            if !sasl_mechanism.is_present() {
                d.error(
                    &security.path,
                    format!(
                        "missing field `sasl_mechanism` (required for protocol `{protocol}`: one of {})",
                        SASL_MECHANISMS.join(", ")
                    ),
                );
            }
            if !username.is_present() && !password.is_present() {
                d.error(
                    &security.path,
                    format!(
                        "missing fields `username` and `password` (required for protocol `{protocol}`)"
                    ),
                );
            }
        } else {
            for (key, present) in [
                ("sasl_mechanism", sasl_mechanism.is_present()),
                ("username", username.is_present()),
                ("password", password.is_present()),
            ] {
                if present {
                    d.error(
                        &security.path_of(key),
                        format!("`{key}` needs protocol `sasl_plaintext` or `sasl_ssl`{shown}"),
                    );
                }
            }
        }
        if ca_location.is_present() && !protocol.ends_with("ssl") {
            d.error(
                &security.path_of("ca_location"),
                format!("`ca_location` needs protocol `ssl` or `sasl_ssl`{shown}"),
            );
        }
    }
    match (username.is_present(), password.is_present()) {
        (true, false) => d.error(
            &security.path,
            "`username` and `password` go together: `password` is missing",
        ),
        (false, true) => d.error(
            &security.path,
            "`username` and `password` go together: `username` is missing",
        ),
        _ => {}
    }
    if d.found > errors_before {
        return None;
    }
    Some(KafkaSecurity {
        protocol: protocol.ok(),
        sasl_mechanism: sasl_mechanism.ok(),
        username: username.ok(),
        password: password.ok(),
        ca_location: ca_location.ok(),
    })
}

/// `text` as one of `allowed` once put in their case by `normalize`.
fn one_of(
    text: &str,
    what: &str,
    allowed: &[&str],
    normalize: fn(&str) -> String,
) -> Result<String, String> {
    let normalized = normalize(text);
    if allowed.contains(&normalized.as_str()) {
        return Ok(normalized);
    }
    Err(with_suggestion(
        format!(
            "unknown {what} `{text}`, expected one of: {}",
            allowed.join(", ")
        ),
        &normalized,
        allowed,
    ))
}

/// The settings every poll-based source shares. A value that is wrong is reported and its
/// default used, so that the rest can still be checked.
fn decode_mapping(
    d: &mut Decoder<'_>,
    poll: PollType,
    fields: &Fields<'_>,
    path: &str,
    context: &MappingContext<'_>,
) -> MappingConfig {
    let ordered = poll.has_order();
    let starting_position = if ordered {
        decode_starting_position(d, poll, fields, path)
    } else {
        StartingPosition::TrimHorizon
    };
    let batch = decode_batch(d, poll, fields);
    let filters = decode_filters(d, fields);
    let parallelization = if ordered {
        d.int(fields, "parallelization", PARALLELIZATION, "")
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(defaults::PARALLELIZATION)
    } else {
        defaults::PARALLELIZATION
    };
    // A queue that requeues has no retention to end a poison message's retries, so its
    // retries are bounded unless the file says -1.
    let default_attempts = (poll == PollType::RabbitMq).then_some(defaults::QUEUE_MAX_ATTEMPTS);
    let retry = decode_retry(d, fields, default_attempts);
    let bisect_on_error = ordered && d.boolean(fields, "bisect_on_error").or(false);
    let report_batch_item_failures = d.boolean(fields, "report_batch_item_failures").or(false);
    let on_failure = decode_on_failure(d, fields, context);
    MappingConfig {
        starting_position,
        batch,
        filters,
        parallelization,
        retry,
        bisect_on_error,
        report_batch_item_failures,
        on_failure,
        enabled: context.enabled,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Position {
    TrimHorizon,
    Latest,
    AtTimestamp,
}

fn parse_position(text: &str) -> Result<Position, String> {
    match text {
        "trim_horizon" => Ok(Position::TrimHorizon),
        "latest" => Ok(Position::Latest),
        "at_timestamp" => Ok(Position::AtTimestamp),
        other => {
            // Lambda's API spells them `TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP`.
            let lower = other.to_ascii_lowercase();
            if STARTING_POSITIONS.contains(&lower.as_str()) {
                return Err(format!(
                    "starting positions are written in lowercase: `{lower}`"
                ));
            }
            Err(with_suggestion(
                format!(
                    "unknown starting position `{other}`, expected one of: {}",
                    STARTING_POSITIONS.join(", ")
                ),
                other,
                STARTING_POSITIONS,
            ))
        }
    }
}

/// An RFC 3339 date and time, as milliseconds since the Unix epoch.
fn parse_timestamp(text: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|time| time.timestamp_millis())
        .map_err(|_| {
            format!(
                "invalid timestamp `{text}`: expected an RFC 3339 date and time with its offset, like `2024-05-01T12:00:00Z`"
            )
        })
}

fn decode_starting_position(
    d: &mut Decoder<'_>,
    poll: PollType,
    fields: &Fields<'_>,
    path: &str,
) -> StartingPosition {
    let position = d.parse(
        fields,
        "starting_position",
        "a starting position",
        parse_position,
    );
    if poll == PollType::DynamoDbStreams {
        // Its key check already refused `starting_position_timestamp`.
        return match position {
            Field::Value(Position::AtTimestamp) => {
                d.error(
                    &fields.path_of("starting_position"),
                    "`at_timestamp` is not available for `dynamodb_streams` sources: DynamoDB Streams can only start at `trim_horizon` or `latest`",
                );
                StartingPosition::TrimHorizon
            }
            Field::Value(Position::Latest) => StartingPosition::Latest,
            _ => StartingPosition::TrimHorizon,
        };
    }
    let timestamp = d.parse(
        fields,
        "starting_position_timestamp",
        "a timestamp",
        parse_timestamp,
    );
    match position {
        Field::Value(Position::AtTimestamp) => match timestamp {
            Field::Value(ms) => StartingPosition::AtTimestamp(ms),
            Field::Absent => {
                d.error(
                    path,
                    "missing field `starting_position_timestamp` (required for `starting_position: at_timestamp`, like `2024-05-01T12:00:00Z`)",
                );
                StartingPosition::TrimHorizon
            }
            Field::Invalid => StartingPosition::TrimHorizon,
        },
        Field::Invalid => StartingPosition::TrimHorizon,
        position => {
            if timestamp.is_present() {
                d.error(
                    &fields.path_of("starting_position_timestamp"),
                    "`starting_position_timestamp` is only for `starting_position: at_timestamp`",
                );
            }
            match position {
                Field::Value(Position::Latest) => StartingPosition::Latest,
                _ => StartingPosition::TrimHorizon,
            }
        }
    }
}

fn decode_batch(d: &mut Decoder<'_>, poll: PollType, fields: &Fields<'_>) -> BatchConfig {
    let default_size = if poll == PollType::Sqs {
        defaults::SQS_BATCH_SIZE
    } else {
        defaults::BATCH_SIZE
    };
    let defaults = BatchConfig {
        size: default_size,
        ..BatchConfig::default()
    };
    let Some(batch) = d.section(fields, "batch", BATCH_KEYS) else {
        return defaults;
    };
    let size = d
        .int(&batch, "size", BATCH_SIZE, "")
        .map(|n| u32::try_from(n).unwrap_or(default_size));
    let window = d.parse(&batch, "window", "a duration", |text| {
        bounded_duration(text, "window", &BATCH_WINDOW, "between 0s and 300s (5m)")
    });
    let max_bytes = d.parse(&batch, "max_bytes", "a size", |text| {
        let bytes = parse_size(text)?;
        if BATCH_MAX_BYTES.contains(&bytes) {
            Ok(bytes)
        } else {
            Err(format!(
                "max_bytes `{text}` is out of range: must be between 1B and 6MiB (Lambda's payload limit)"
            ))
        }
    });
    if poll == PollType::Sqs
        && let Field::Value(size) = size
        && size > SQS_UNWINDOWED_BATCH_MAX
        && matches!(window, Field::Absent | Field::Value(Duration::ZERO))
    {
        d.error(
            &batch.path_of("size"),
            format!(
                "a batch of more than {SQS_UNWINDOWED_BATCH_MAX} messages needs a `window` greater than 0s, as in Lambda (like `window: 1s`)"
            ),
        );
    }
    BatchConfig {
        size: size.or(default_size),
        window: window.or(defaults.window),
        max_bytes: max_bytes.or(defaults.max_bytes),
    }
}

fn decode_filters(d: &mut Decoder<'_>, fields: &Fields<'_>) -> Vec<serde_json::Value> {
    const EXAMPLE: &str = "{ body: { status: [shipped] } }";
    let Some(node) = fields.get("filters") else {
        return Vec::new();
    };
    let path = fields.path_of("filters");
    let items = match &node.kind {
        Kind::Sequence(items) => items,
        _ if node.is_null() => return Vec::new(),
        _ => {
            d.error(
                &path,
                format!(
                    "expected a list of filter patterns, like `[{EXAMPLE}]`, found {}",
                    node.type_name()
                ),
            );
            return Vec::new();
        }
    };
    if items.len() > MAX_FILTERS {
        d.error(
            &path,
            format!(
                "at most {MAX_FILTERS} filter patterns are allowed, as in Lambda; found {}",
                items.len()
            ),
        );
    }
    let mut filters = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let item_path = index(&path, i);
        if !matches!(item.kind, Kind::Mapping(_)) {
            d.error(
                &item_path,
                format!(
                    "expected a filter pattern (a mapping, like `{EXAMPLE}`), found {}",
                    item.type_name()
                ),
            );
            continue;
        }
        let Some(pattern) = to_json(d, item, &item_path) else {
            continue;
        };
        match FilterPattern::parse(&pattern) {
            Ok(_) => filters.push(pattern),
            Err(message) => d.error(&item_path, message),
        }
    }
    filters
}

fn decode_retry(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    default_attempts: Option<u32>,
) -> RetryConfig {
    let Some(retry) = d.section(fields, "retry", RETRY_KEYS) else {
        return RetryConfig {
            max_attempts: default_attempts,
            ..RetryConfig::default()
        };
    };
    let max_attempts = match d.int(
        &retry,
        "max_attempts",
        MAX_ATTEMPTS,
        " (-1 retries until the record expires)",
    ) {
        Field::Absent => default_attempts,
        other => other.ok().and_then(|n| u32::try_from(n).ok()),
    };
    let max_record_age = d
        .parse(&retry, "max_record_age", "a duration", parse_record_age)
        .ok()
        .flatten();
    RetryConfig {
        max_attempts,
        max_record_age,
    }
}

/// `-1` (no limit) or a duration in Lambda's range.
fn parse_record_age(text: &str) -> Result<Option<Duration>, String> {
    const BOUNDS: &str = "-1 (no limit) or between 1m and 7d";
    match text.trim() {
        "-1" => Ok(None),
        negative if negative.starts_with('-') => Err(format!(
            "max_record_age `{text}` is out of range: must be {BOUNDS}"
        )),
        _ => bounded_duration(text, "max_record_age", &MAX_RECORD_AGE, BOUNDS).map(Some),
    }
}

/// A mapping's `on_failure` names a dead letter: a function is not a place to keep records.
fn decode_on_failure(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    context: &MappingContext<'_>,
) -> Option<String> {
    let target = d.string(fields, "on_failure").ok()?;
    if context.dead_letters.contains(&target) {
        return Some(target);
    }
    let message = if context.functions.contains(&target) {
        format!(
            "`{target}` is a function: a source's `on_failure` must name a dead letter under `dead_letters`"
        )
    } else {
        with_suggestion(
            format!("unknown dead letter `{target}`: it is not declared under `dead_letters`"),
            &target,
            context.dead_letters.as_slice(),
        )
    };
    d.error(&fields.path_of("on_failure"), message);
    None
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::{Config, ConfigErrors, SourceKind, parse_str};

    fn parse(sources: &str) -> Result<Config, ConfigErrors> {
        let text = format!(
            "functions:\n  f:\n    package: p\ndead_letters:\n  dlq: {{ type: file, path: d }}\nsources:\n{sources}"
        );
        parse_str(&text, "test.yaml", Path::new("/base"), &|_| None)
    }

    #[test]
    fn an_sqs_source_batches_ten_messages_by_default() {
        let config =
            parse("  q:\n    type: sqs\n    function: f\n    queue_url: http://h/1/q\n").unwrap();
        let mapping = config.sources["q"].kind.mapping().unwrap();
        assert_eq!(mapping.batch.size, 10);
        assert_eq!(mapping.batch.window, std::time::Duration::ZERO);
    }

    #[test]
    fn a_rabbitmq_source_prefetches_a_hundred_and_batches_a_hundred() {
        let config =
            parse("  r:\n    type: rabbitmq\n    function: f\n    uri: amqp://h\n    queue: q\n")
                .unwrap();
        let SourceKind::RabbitMq(rabbitmq) = &config.sources["r"].kind else {
            panic!("not rabbitmq");
        };
        assert_eq!((rabbitmq.prefetch, rabbitmq.mapping.batch.size), (100, 100));
    }

    #[test]
    fn a_disabled_source_says_so_in_its_mapping() {
        let config = parse(
            "  k:\n    type: kinesis\n    function: f\n    stream: s\n    enabled: false\n    on_failure: dlq\n",
        )
        .unwrap();
        let mapping = config.sources["k"].kind.mapping().unwrap();
        assert!(!mapping.enabled);
        assert_eq!(mapping.on_failure.as_deref(), Some("dlq"));
    }

    #[test]
    fn a_windowed_sqs_batch_may_hold_more_than_ten() {
        let ok = "  q:\n    type: sqs\n    function: f\n    queue_url: http://h/1/q\n    batch: { size: 11, window: 1ms }\n";
        assert_eq!(
            parse(ok).unwrap().sources["q"]
                .kind
                .mapping()
                .unwrap()
                .batch
                .size,
            11
        );
        let unwindowed = ok.replace("window: 1ms", "window: 0ms");
        assert!(parse(&unwindowed).is_err());
    }

    #[test]
    fn record_age_takes_minus_one_or_lambdas_range() {
        assert_eq!(super::parse_record_age("-1"), Ok(None));
        assert_eq!(
            super::parse_record_age("60s"),
            Ok(Some(std::time::Duration::from_secs(60)))
        );
        assert!(super::parse_record_age("59s").is_err());
        assert!(super::parse_record_age("-2").is_err());
        assert!(super::parse_record_age("7d1s").is_err());
    }

    #[test]
    fn a_bad_topic_pattern_is_reported_on_one_line() {
        let message = super::check_topic_pattern("a(b").unwrap_err();
        assert_eq!(message, "invalid topic pattern `a(b`: unclosed group");
    }
}
