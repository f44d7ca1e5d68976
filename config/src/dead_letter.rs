//! `dead_letters`: durable places for events that failed for good.

use std::path::Path;

use crate::decode::{Decoder, Field, Fields, child};
use crate::endpoints::{
    check_amqp_name, check_amqp_uri, check_queue_url, decode_aws, decode_brokers,
    decode_properties, decode_topic,
};
use crate::schema::{AndThenCheck, decode_type, report, resolve};
use crate::yaml::Node;
use crate::{DeadLetterConfig, DeadLetterKind};

const DEAD_LETTER_TYPES: &[&str] = &["file", "sqs", "rabbitmq", "kafka"];
const FILE_KEYS: &[&str] = &["type", "path"];
const SQS_KEYS: &[&str] = &["type", "queue_url", "endpoint_url", "region"];
const RABBITMQ_KEYS: &[&str] = &["type", "uri", "exchange", "routing_key"];
const KAFKA_KEYS: &[&str] = &["type", "brokers", "topic", "properties"];

/// librdkafka producer properties that would break the dead letter's promise.
const KAFKA_REFUSED: &[(&str, &str)] = &[("bootstrap.servers", "it comes from `brokers`")];
/// A dead letter is written only when every in-sync replica has it; weaker `acks` would let a
/// record be acknowledged at its source and then lost.
const KAFKA_ACKS: &[&str] = &["all", "-1"];

fn keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "file" => FILE_KEYS,
        "sqs" => SQS_KEYS,
        "rabbitmq" => RABBITMQ_KEYS,
        _ => KAFKA_KEYS,
    }
}

pub(crate) fn decode_dead_letter(
    d: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    base_dir: &Path,
) -> Option<DeadLetterConfig> {
    let fields = d.mapping(node, path, None)?;
    let kind = decode_type(d, &fields, path, "dead letter", DEAD_LETTER_TYPES)?;
    let known: Vec<&str> = DEAD_LETTER_TYPES
        .iter()
        .flat_map(|kind| keys(kind))
        .copied()
        .collect();
    d.check_typed_keys(
        &fields,
        keys(&kind),
        &known,
        &format!("`{kind}` dead letters"),
    );
    let kind = match kind.as_str() {
        "file" => decode_file(d, &fields, path, base_dir)?,
        "sqs" => {
            let queue_url = d.parse(&fields, "queue_url", "a URL", check_queue_url);
            let queue_url = d.required(
                queue_url,
                path,
                "missing field `queue_url` (the queue dead letters are sent to)",
            );
            DeadLetterKind::Sqs {
                queue_url: queue_url?,
                aws: decode_aws(d, &fields),
            }
        }
        "rabbitmq" => decode_rabbitmq(d, &fields, path)?,
        _ => decode_kafka(d, &fields, path)?,
    };
    Some(DeadLetterConfig { kind })
}

fn decode_file(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    path: &str,
    base_dir: &Path,
) -> Option<DeadLetterKind> {
    let file = d.string(fields, "path").and_then_check(|file| {
        if file.is_empty() {
            Err("must not be empty".to_owned())
        } else {
            Ok(resolve(base_dir, &file))
        }
    });
    let file = report(d, fields, "path", file);
    let file = d.required(
        file,
        path,
        "missing field `path` (the JSON Lines file dead letters are appended to)",
    );
    Some(DeadLetterKind::File { path: file? })
}

fn decode_rabbitmq(d: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) -> Option<DeadLetterKind> {
    let uri = d.parse(fields, "uri", "a URI", check_amqp_uri);
    let uri = d.required(
        uri,
        path,
        "missing field `uri` (like `amqp://guest:guest@127.0.0.1:5672/%2f`, best from `${RABBITMQ_URI}`)",
    );
    let exchange = d.string(fields, "exchange").and_then_check(check_amqp_name);
    let exchange = report(d, fields, "exchange", exchange);
    let routing_key = d
        .string(fields, "routing_key")
        .and_then_check(check_amqp_name);
    let routing_key = report(d, fields, "routing_key", routing_key);
    let exchange = match exchange {
        Field::Value(exchange) => Some(exchange),
        Field::Absent => Some(String::new()),
        Field::Invalid => None,
    };
    let routing_key = match (exchange.as_deref(), routing_key) {
        (_, Field::Value(routing_key)) => Some(routing_key),
        // The default exchange routes by queue name: without a key nothing would arrive.
        (Some(""), Field::Absent) => {
            d.error(
                path,
                "missing field `routing_key` (with the default exchange, the name of the queue dead letters go to)",
            );
            None
        }
        (_, Field::Absent) => Some(String::new()),
        (_, Field::Invalid) => None,
    };
    Some(DeadLetterKind::RabbitMq {
        uri: uri?,
        exchange: exchange?,
        routing_key: routing_key?,
    })
}

fn decode_kafka(d: &mut Decoder<'_>, fields: &Fields<'_>, path: &str) -> Option<DeadLetterKind> {
    let brokers = decode_brokers(d, fields);
    let brokers = d.required(
        brokers,
        path,
        "missing field `brokers` (the bootstrap servers, like `[127.0.0.1:9092]`)",
    );
    let topic = decode_topic(d, fields, "topic");
    let topic = d.required(
        topic,
        path,
        "missing field `topic` (the topic dead letters are produced to)",
    );
    let properties = decode_properties(d, fields, KAFKA_REFUSED);
    if let Some(acks) = properties.get("acks")
        && !KAFKA_ACKS.contains(&acks.as_str())
    {
        d.error(
            &child(&fields.path_of("properties"), "acks"),
            format!(
                "property `acks` must be `all` (or `-1`), not `{acks}`: a dead letter counts as written only once every in-sync replica has it"
            ),
        );
    }
    Some(DeadLetterKind::Kafka {
        brokers: brokers?,
        topic: topic?,
        properties,
    })
}
