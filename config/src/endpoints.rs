//! How sources and dead letters reach their systems: AWS connections, AMQP URIs, Kafka brokers,
//! topics and client properties. Checking them is pure: nothing here touches the network.

use std::collections::{BTreeMap, HashSet};

use crate::AwsConnection;
use crate::decode::{Decoder, Field, Fields, child, index};
use crate::schema::check_url;
use crate::yaml::Kind;

const REGION_MAX: usize = 64;
const KINESIS_STREAM_NAME_MAX: usize = 128;
const DYNAMODB_TABLE_NAME: std::ops::RangeInclusive<usize> = 3..=255;
const KAFKA_TOPIC_MAX: usize = 249;
/// AMQP short strings (queue, exchange and routing key names) hold at most 255 bytes.
const AMQP_NAME_MAX: usize = 255;

/// `endpoint_url` and `region`, directly under the source or dead letter.
pub(crate) fn decode_aws(d: &mut Decoder<'_>, fields: &Fields<'_>) -> AwsConnection {
    AwsConnection {
        endpoint_url: d.parse(fields, "endpoint_url", "a URL", check_url).ok(),
        region: d.parse(fields, "region", "a region", check_region).ok(),
    }
}

fn is_region(text: &str) -> bool {
    (1..=REGION_MAX).contains(&text.len())
        && text.starts_with(|c: char| c.is_ascii_lowercase())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_region(text: &str) -> Result<String, String> {
    if is_region(text) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "invalid region `{text}`: expected a region name, like `eu-west-1`"
        ))
    }
}

/// The resource part of `arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE` when the rest is
/// well-formed and names `service`.
fn arn_resource<'t>(text: &'t str, service: &str) -> Option<&'t str> {
    let mut parts = text.splitn(6, ':');
    let prefix = parts.next()?;
    let partition = parts.next()?;
    let arn_service = parts.next()?;
    let region = parts.next()?;
    let account = parts.next()?;
    let resource = parts.next()?;
    let well_formed = prefix == "arn"
        && partition.starts_with("aws")
        && arn_service == service
        && is_region(region)
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit());
    well_formed.then_some(resource)
}

/// 1 to `max` letters, digits, `_`, `-` or `.`: AWS's names for streams and tables.
fn is_aws_name(text: &str, lengths: std::ops::RangeInclusive<usize>) -> bool {
    lengths.contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A Kinesis stream name or stream ARN.
pub(crate) fn check_kinesis_stream(text: &str) -> Result<String, String> {
    let valid = if text.starts_with("arn:") {
        arn_resource(text, "kinesis")
            .and_then(|resource| resource.strip_prefix("stream/"))
            .is_some_and(|name| is_aws_name(name, 1..=KINESIS_STREAM_NAME_MAX))
    } else {
        is_aws_name(text, 1..=KINESIS_STREAM_NAME_MAX)
    };
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "invalid stream `{text}`: expected a stream name (1 to {KINESIS_STREAM_NAME_MAX} letters, digits, `_`, `-` or `.`) or an ARN, like `arn:aws:kinesis:eu-west-1:123456789012:stream/orders`"
        ))
    }
}

/// A DynamoDB stream ARN: `arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE/stream/LABEL`.
pub(crate) fn check_dynamodb_stream_arn(text: &str) -> Result<String, String> {
    let valid = arn_resource(text, "dynamodb")
        .and_then(|resource| resource.strip_prefix("table/"))
        .and_then(|rest| rest.split_once("/stream/"))
        .is_some_and(|(table, label)| is_aws_name(table, DYNAMODB_TABLE_NAME) && !label.is_empty());
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "invalid stream ARN `{text}`: expected `arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE/stream/LABEL`"
        ))
    }
}

pub(crate) fn check_dynamodb_table(text: &str) -> Result<String, String> {
    if is_aws_name(text, DYNAMODB_TABLE_NAME) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "invalid table name `{text}`: use {} to {} letters, digits, `_`, `-` or `.`",
            DYNAMODB_TABLE_NAME.start(),
            DYNAMODB_TABLE_NAME.end()
        ))
    }
}

/// An SQS queue URL: http(s), with the queue's name as the last path segment.
pub(crate) fn check_queue_url(text: &str) -> Result<String, String> {
    let url = check_url(text)?;
    let names_a_queue = text
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| uri.path().rsplit('/').next().map(|last| !last.is_empty()))
        .unwrap_or(false);
    if names_a_queue {
        Ok(url)
    } else {
        Err(format!(
            "invalid queue URL `{text}`: it names no queue; expected a URL like `https://sqs.eu-west-1.amazonaws.com/123456789012/orders`"
        ))
    }
}

/// An `amqp://` or `amqps://` URI. It usually holds a password, so messages never repeat it.
pub(crate) fn check_amqp_uri(text: &str) -> Result<String, String> {
    const SHAPE: &str = "expected `amqp://USER:PASSWORD@HOST:PORT/VHOST` or `amqps://…`";
    let Some((scheme, _)) = text.split_once("://") else {
        return Err(format!("invalid URI: {SHAPE}"));
    };
    if !matches!(scheme.to_ascii_lowercase().as_str(), "amqp" | "amqps") {
        return Err(format!("unsupported URI scheme `{scheme}`: {SHAPE}"));
    }
    match text.parse::<http::Uri>() {
        Ok(uri) if uri.host().is_some_and(|host| !host.is_empty()) => Ok(text.to_owned()),
        _ => Err(format!(
            "invalid URI (not shown: it may hold a password): {SHAPE}"
        )),
    }
}

/// An AMQP queue, exchange or routing key name.
pub(crate) fn check_amqp_name(text: String) -> Result<String, String> {
    if text.len() > AMQP_NAME_MAX {
        Err(format!(
            "is {} bytes long; AMQP allows at most {AMQP_NAME_MAX}",
            text.len()
        ))
    } else {
        Ok(text)
    }
}

fn check_broker(text: &str) -> Result<String, String> {
    let valid = text.rsplit_once(':').is_some_and(|(host, port)| {
        let host_ok = match host.strip_prefix('[') {
            Some(v6) => v6.strip_suffix(']').is_some_and(|v6| !v6.is_empty()),
            None => !host.is_empty() && !host.contains([':', '/']),
        };
        host_ok && port.parse::<u16>().is_ok_and(|port| port > 0)
    });
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "invalid broker `{text}`: expected HOST:PORT, like `127.0.0.1:9092`"
        ))
    }
}

fn check_topic(text: &str) -> Result<String, String> {
    let valid = (1..=KAFKA_TOPIC_MAX).contains(&text.len())
        && text != "."
        && text != ".."
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "invalid topic `{text}`: use 1 to {KAFKA_TOPIC_MAX} letters, digits, `.`, `_` or `-`"
        ))
    }
}

/// A Kafka topic given as one scalar (`topic: orders-dlq`).
pub(crate) fn decode_topic(d: &mut Decoder<'_>, fields: &Fields<'_>, key: &str) -> Field<String> {
    match fields.get(key) {
        // A topic named `2024` is still a topic: any scalar is text.
        Some(node) => match d.text_node(node, &fields.path_of(key), "a topic") {
            Field::Value(topic) => match check_topic(&topic) {
                Ok(topic) => Field::Value(topic),
                Err(message) => {
                    d.error(&fields.path_of(key), message);
                    Field::Invalid
                }
            },
            other => other,
        },
        None => Field::Absent,
    }
}

/// `brokers`: a list of `HOST:PORT`, or one comma-separated string (as `${KAFKA_BROKERS}`
/// usually is).
pub(crate) fn decode_brokers(d: &mut Decoder<'_>, fields: &Fields<'_>) -> Field<Vec<String>> {
    decode_names(
        d,
        fields,
        "brokers",
        ("broker", "[127.0.0.1:9092]"),
        check_broker,
    )
}

/// `topics`: a list of topic names, or one comma-separated string.
pub(crate) fn decode_topics(d: &mut Decoder<'_>, fields: &Fields<'_>) -> Field<Vec<String>> {
    decode_names(d, fields, "topics", ("topic", "[orders]"), check_topic)
}

/// A non-empty list of distinct names, each checked by `check`; a scalar is split on commas.
/// Messages use `noun` for one name and `example` for a whole list.
fn decode_names(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    key: &str,
    (noun, example): (&str, &str),
    check: fn(&str) -> Result<String, String>,
) -> Field<Vec<String>> {
    let Some(node) = fields.get(key) else {
        return Field::Absent;
    };
    let path = fields.path_of(key);
    // Each name with the path its errors go to.
    let mut given: Vec<(String, String)> = Vec::new();
    let mut ok = true;
    match &node.kind {
        Kind::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_path = index(&path, i);
                match d.text_node(item, &item_path, &format!("a {noun}")) {
                    Field::Value(name) => given.push((name, item_path)),
                    Field::Absent => {
                        d.error(&item_path, format!("expected a {noun}, found nothing"));
                        ok = false;
                    }
                    Field::Invalid => ok = false,
                }
            }
        }
        Kind::Scalar { .. } => match d.text_node(node, &path, &format!("a list of {noun}s")) {
            Field::Value(text) => given.extend(
                text.split(',')
                    .map(str::trim)
                    .filter(|name| !name.is_empty())
                    .map(|name| (name.to_owned(), path.clone())),
            ),
            other => return other.map(|_| Vec::new()),
        },
        Kind::Mapping(_) => {
            d.error(
                &path,
                format!("expected a list of {noun}s, like `{example}`, found a mapping"),
            );
            return Field::Invalid;
        }
    }
    let mut names: Vec<String> = Vec::with_capacity(given.len());
    // A set beside the list: a list of a hundred thousand names must not cost a scan per name.
    let mut seen: HashSet<String> = HashSet::with_capacity(given.len());
    for (name, name_path) in given {
        if seen.contains(&name) {
            d.error(&name_path, format!("duplicate {noun} `{name}`"));
            ok = false;
            continue;
        }
        match check(&name) {
            Ok(name) => {
                seen.insert(name.clone());
                names.push(name);
            }
            Err(message) => {
                d.error(&name_path, message);
                ok = false;
            }
        }
    }
    if !ok {
        return Field::Invalid;
    }
    if names.is_empty() {
        d.error(
            &path,
            format!("must not be empty: give at least one {noun}, like `{example}`"),
        );
        return Field::Invalid;
    }
    Field::Value(names)
}

/// `properties`: raw librdkafka properties, any scalar as text. `refused` names the properties
/// Sluice sets itself, each with the reason shown when one is given anyway.
pub(crate) fn decode_properties(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    refused: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let path = fields.path_of("properties");
    let mut properties = BTreeMap::new();
    for entry in d.entries(fields, "properties") {
        let property_path = child(&path, entry.key);
        if let Some((_, reason)) = refused.iter().find(|(name, _)| *name == entry.key) {
            d.error_at(
                &property_path,
                Some(entry.key_location),
                format!("property `{}` cannot be set here: {reason}", entry.key),
            );
            continue;
        }
        match d.text_node(entry.value, &property_path, "a string, number or boolean") {
            Field::Value(value) => {
                properties.insert(entry.key.to_owned(), value);
            }
            Field::Absent => d.error(
                &property_path,
                "missing value: give the property a value or leave it out",
            ),
            Field::Invalid => {}
        }
    }
    properties
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brokers_take_a_host_and_a_port() {
        for good in ["127.0.0.1:9092", "kafka-1.internal:9093", "[::1]:9092"] {
            assert_eq!(check_broker(good), Ok(good.to_owned()), "{good}");
        }
        for bad in [
            "127.0.0.1",
            ":9092",
            "host:0",
            "host:99999",
            "::1:9092",
            "tcp://h:1",
        ] {
            assert!(check_broker(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_names_and_arns() {
        assert!(check_kinesis_stream("orders").is_ok());
        assert!(
            check_kinesis_stream("arn:aws:kinesis:eu-west-1:123456789012:stream/orders").is_ok()
        );
        assert!(check_kinesis_stream("arn:aws:kinesis:eu-west-1:1234:stream/orders").is_err());
        assert!(check_kinesis_stream("arn:aws:sqs:eu-west-1:123456789012:stream/x").is_err());
        assert!(check_kinesis_stream("has space").is_err());
        assert!(
            check_dynamodb_stream_arn(
                "arn:aws:dynamodb:us-east-1:123456789012:table/Orders/stream/2024-05-01T00:00:00.000"
            )
            .is_ok()
        );
        assert!(
            check_dynamodb_stream_arn("arn:aws:dynamodb:us-east-1:123456789012:table/Orders")
                .is_err()
        );
        assert!(check_dynamodb_table("ab").is_err());
    }

    #[test]
    fn amqp_uri_errors_never_show_the_uri() {
        assert!(check_amqp_uri("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        assert!(check_amqp_uri("amqps://broker.example.com").is_ok());
        for bad in [
            "http://u:secret@host/",
            "u:secret@host",
            "amqp://u:secret@/",
        ] {
            let message = check_amqp_uri(bad).unwrap_err();
            assert!(!message.contains("secret"), "{message}");
        }
    }

    #[test]
    fn queue_urls_name_a_queue() {
        assert!(check_queue_url("http://127.0.0.1:5000/123456789012/orders").is_ok());
        assert!(check_queue_url("https://sqs.eu-west-1.amazonaws.com/").is_err());
        assert!(check_queue_url("sqs://orders").is_err());
    }
}
