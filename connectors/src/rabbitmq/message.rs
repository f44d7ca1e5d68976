//! AMQP deliveries in the `aws:rmq` shape Lambda hands to functions for RabbitMQ (Amazon MQ).
//! Lambda serializes the Java client's message with Gson, and the shape keeps Gson's habits:
//! string headers are `{"bytes": [...]}` objects of signed bytes, dates read like
//! `Jan 1, 1970, 12:33:41 AM`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Map, Value};

use crate::record::Record;
use crate::stream::json_or_null;

/// The `eventSource` of every RabbitMQ event.
pub const EVENT_SOURCE: &str = "aws:rmq";

/// The header quorum queues set to how many times a message was returned before.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// One delivery as the source hands it on, before it becomes a [`Record`].
pub(crate) struct Message<'a> {
    pub generation: u64,
    pub delivery_tag: u64,
    pub routing_key: &'a str,
    pub redelivered: bool,
    pub properties: &'a BasicProperties,
    pub data: &'a [u8],
}

impl Message<'_> {
    /// How the pipeline settles this delivery later: the tag is only valid on the connection
    /// (generation) that delivered it.
    pub fn handle(&self) -> String {
        format!("{}:{}", self.generation, self.delivery_tag)
    }

    /// 1 for a first delivery. Quorum queues count returns in `x-delivery-count`; classic
    /// queues only say `redelivered`, so 2 is the best lower bound.
    pub fn receive_count(&self) -> u32 {
        let counted = self
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(DELIVERY_COUNT_HEADER))
            .and_then(amqp_integer);
        match counted {
            Some(returns) => u32::try_from(returns).unwrap_or(u32::MAX).saturating_add(1),
            None if self.redelivered => 2,
            None => 1,
        }
    }

    /// The record, in Lambda's shape (one element of `rmqMessagesByQueue[...]`). Its filter
    /// view is built only `for_filters`: a mapping without filters never reads it, and building
    /// it (a copy of the record, the body parsed as JSON) would double the cost of a message.
    pub fn record(&self, now_ms: i64, for_filters: bool) -> Record {
        let lambda = object([
            (
                "basicProperties",
                basic_properties(self.properties, self.data.len()),
            ),
            ("redelivered", Value::Bool(self.redelivered)),
            ("data", Value::String(B64.encode(self.data))),
        ]);
        let filter_view = if for_filters {
            // Lambda's filters see `data` decoded when it is JSON.
            let mut view = lambda.clone();
            view["data"] = json_or_null(&Bytes::copy_from_slice(self.data));
            view
        } else {
            Value::Null
        };
        // The function can only name a record by what it sees: the message id (in
        // `batchItemFailures`). Without one, the delivery names itself. Deliveries that share a
        // message id within a batch share their outcome.
        let id = match self.properties.message_id() {
            Some(id) if !id.as_str().is_empty() => id.to_string(),
            _ => self.handle(),
        };
        let arrival_ms = match self.properties.timestamp() {
            Some(secs) => i64::try_from(*secs)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            None => now_ms,
        };
        Record {
            id,
            position: self.delivery_tag.to_string(),
            key: self.routing_key.to_string(),
            arrival_ms,
            size: self.data.len(),
            lambda,
            filter_view,
        }
    }
}

/// The key of `rmqMessagesByQueue`: `<queue>::<vhost>`.
pub fn queue_key(queue: &str, vhost: &str) -> String {
    format!("{queue}::{vhost}")
}

/// The invocation event for records of one queue.
pub fn envelope(source_arn: &str, queue_key: &str, records: &[&Record]) -> Value {
    let messages = Value::Array(records.iter().map(|r| r.lambda.clone()).collect());
    object([
        ("eventSource", Value::from(EVENT_SOURCE)),
        ("eventSourceArn", Value::from(source_arn)),
        ("rmqMessagesByQueue", object([(queue_key, messages)])),
    ])
}

/// A JSON object of these entries. Every message goes through here, so not `json!`: that runs
/// each value that is already a `Value` through serde's serializer again, a deep copy per level.
fn object<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Object(
        entries
            .into_iter()
            .map(|(key, value)| (key.to_string(), value))
            .collect(),
    )
}

fn basic_properties(p: &BasicProperties, body_size: usize) -> Value {
    let text =
        |s: &Option<ShortString>| s.as_ref().map_or(Value::Null, |s| Value::from(s.as_str()));
    object([
        ("contentType", text(p.content_type())),
        ("contentEncoding", text(p.content_encoding())),
        (
            "headers",
            p.headers()
                .as_ref()
                .map_or_else(|| Value::Object(Map::new()), table),
        ),
        // AMQP's defaults when the publisher left them out: transient, priority 0.
        ("deliveryMode", Value::from(p.delivery_mode().unwrap_or(1))),
        ("priority", Value::from(p.priority().unwrap_or(0))),
        ("correlationId", text(p.correlation_id())),
        ("replyTo", text(p.reply_to())),
        ("expiration", text(p.expiration())),
        ("messageId", text(p.message_id())),
        (
            "timestamp",
            p.timestamp()
                .and_then(gson_date)
                .map_or(Value::Null, Value::from),
        ),
        ("type", text(p.kind())),
        ("userId", text(p.user_id())),
        ("appId", text(p.app_id())),
        ("clusterId", text(p.cluster_id())),
        ("bodySize", Value::from(body_size)),
    ])
}

fn table(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.to_string(), header_value(v)))
            .collect(),
    )
}

/// A header value as Gson writes the Java client's: strings are `LongString` objects whose only
/// field is `bytes`, byte arrays are plain arrays, and Java bytes are signed.
fn header_value(v: &AMQPValue) -> Value {
    let signed = |b: &[u8]| Value::Array(b.iter().map(|&b| Value::from(b as i8)).collect());
    match v {
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Value::from(f64::from(*f)),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => {
            Value::from(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
        }
        AMQPValue::ShortString(s) => object([("bytes", signed(s.as_str().as_bytes()))]),
        AMQPValue::LongString(s) => object([("bytes", signed(s.as_bytes()))]),
        AMQPValue::ByteArray(b) => signed(b.as_slice()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(header_value).collect()),
        AMQPValue::Timestamp(t) => gson_date(*t).map_or(Value::Null, Value::from),
        AMQPValue::FieldTable(t) => table(t),
        AMQPValue::Void => Value::Null,
    }
}

fn amqp_integer(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

/// An AMQP timestamp (seconds since the epoch) as Gson's default date format, in UTC.
fn gson_date(secs: u64) -> Option<String> {
    let at = chrono::DateTime::from_timestamp(i64::try_from(secs).ok()?, 0)?;
    Some(at.format("%b %-d, %Y, %-I:%M:%S %p").to_string())
}

#[cfg(test)]
mod tests {
    use aws_lambda_events::event::rabbitmq::RabbitMqEvent;
    use lapin::types::{ByteArray, FieldArray, LongString};
    use serde_json::json;

    use super::*;

    fn headers() -> FieldTable {
        let mut h = FieldTable::default();
        h.insert(
            "header1".into(),
            AMQPValue::LongString(LongString::from("value1")),
        );
        h.insert("numberInHeader".into(), AMQPValue::LongInt(10));
        h.insert("é".into(), AMQPValue::LongString(LongString::from("é")));
        h.insert(
            "raw".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![1u8, 255])),
        );
        h.insert(
            "list".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::Boolean(true),
                AMQPValue::Void,
            ])),
        );
        h
    }

    fn message<'a>(
        properties: &'a BasicProperties,
        data: &'a [u8],
        redelivered: bool,
    ) -> Message<'a> {
        Message {
            generation: 3,
            delivery_tag: 17,
            routing_key: "orders.eu",
            redelivered,
            properties,
            data,
        }
    }

    #[test]
    fn the_envelope_is_a_rabbitmq_event() {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers())
            .with_delivery_mode(2)
            .with_priority(34)
            .with_expiration("60000".into())
            .with_message_id("m-1".into())
            .with_timestamp(2021)
            .with_user_id("guest".into());
        let record = message(&properties, br#"{"total": 12}"#, false).record(0, true);
        let other = message(&BasicProperties::default(), b"\x00 not json", true).record(0, true);
        let arn = "arn:aws:mq:us-east-1:000000000000:broker:localhost:/";
        let event = envelope(arn, &queue_key("orders", "/"), &[&record, &other]);

        let parsed: RabbitMqEvent =
            serde_json::from_value(event.clone()).expect("an aws:rmq event");
        assert_eq!(parsed.event_source.as_deref(), Some("aws:rmq"));
        assert_eq!(parsed.event_source_arn.as_deref(), Some(arn));
        let messages = &parsed.messages_by_queue["orders::/"];
        assert_eq!(messages.len(), 2);
        let first = &messages[0].basic_properties;
        assert_eq!(first.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            (first.delivery_mode, first.priority, first.body_size),
            (2, 34, 13)
        );
        assert_eq!(first.message_id.as_deref(), Some("m-1"));
        assert_eq!(first.timestamp.as_deref(), Some("Jan 1, 1970, 12:33:41 AM"));
        assert_eq!(
            first.headers["header1"],
            json!({"bytes": [118, 97, 108, 117, 101, 49]})
        );
        assert_eq!(first.headers["numberInHeader"], json!(10));
        assert_eq!(first.headers["é"], json!({"bytes": [-61, -87]}));
        assert_eq!(first.headers["raw"], json!([1, -1]));
        assert_eq!(first.headers["list"], json!([true, null]));
        assert_eq!(
            messages[0].data.as_deref(),
            Some(B64.encode(br#"{"total": 12}"#).as_str())
        );
        assert!(!messages[0].redelivered);
        // A publisher that sets nothing still gets AMQP's defaults, not nulls.
        let second = &messages[1].basic_properties;
        assert_eq!((second.delivery_mode, second.priority), (1, 0));
        assert!(second.headers.is_empty());
        assert!(messages[1].redelivered);
        // The key Lambda's `type` property has, not the Rust field name.
        assert!(
            event["rmqMessagesByQueue"]["orders::/"][0]["basicProperties"]
                .get("type")
                .is_some()
        );
    }

    #[test]
    fn a_record_names_its_delivery_and_decodes_json_for_filters() {
        let properties = BasicProperties::default().with_message_id("m-1".into());
        let record = message(&properties, br#"{"total": 12}"#, false).record(5, true);
        assert_eq!(
            record.id, "m-1",
            "a function names records by their message id"
        );
        assert_eq!(
            (record.position.as_str(), record.key.as_str()),
            ("17", "orders.eu")
        );
        assert_eq!((record.arrival_ms, record.size), (5, 13));
        assert_eq!(record.filter_view["data"], json!({"total": 12}));
        assert_eq!(record.filter_view["basicProperties"]["messageId"], "m-1");

        let anonymous = BasicProperties::default().with_timestamp(7);
        let record = message(&anonymous, b"\x00\x01", false).record(5, true);
        assert_eq!(record.arrival_ms, 7000);
        assert_eq!(record.filter_view["data"], Value::Null);
        assert_eq!(record.lambda["data"], B64.encode(b"\x00\x01"));
    }

    #[test]
    fn without_filters_a_record_skips_its_filter_view_and_nothing_else() {
        let properties = BasicProperties::default().with_message_id("m-1".into());
        let message = message(&properties, br#"{"total": 12}"#, false);
        let (with, without) = (message.record(5, true), message.record(5, false));
        assert_eq!(without.filter_view, Value::Null);
        assert_eq!(
            Record {
                filter_view: Value::Null,
                ..with
            },
            without
        );
    }

    #[test]
    fn receive_count_prefers_the_quorum_delivery_count() {
        let plain = BasicProperties::default();
        assert_eq!(message(&plain, b"", false).receive_count(), 1);
        assert_eq!(message(&plain, b"", true).receive_count(), 2);
        let mut h = FieldTable::default();
        h.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongLongInt(4));
        let counted = BasicProperties::default().with_headers(h);
        assert_eq!(message(&counted, b"", true).receive_count(), 5);
        assert_eq!(message(&counted, b"", false).handle(), "3:17");
    }
}
