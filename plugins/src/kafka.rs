//! `type: kafka`: dead letters produced to a Kafka topic by an idempotent producer
//! (`enable.idempotence=true`, `acks=all`); `write` returns only once the broker has confirmed
//! every record it produced.
//!
//! What is produced depends on where the failed records came from:
//!
//! - **From a Kafka mapping** (the on-failure record's `sluice.records` are Lambda's Kafka
//!   records): one Kafka record per failed record, with the *original* key, value and headers,
//!   so that the dead-letter topic can be replayed into the source topic as it is. The story
//!   rides in headers: `sluice-condition`, `sluice-source`, `sluice-function`,
//!   `sluice-error-type`, `sluice-error-message`, the original `sluice-topic`,
//!   `sluice-partition` and `sluice-offset`, and `sluice-failure`: the whole on-failure record
//!   (attempts, function version, request ids) without the records themselves.
//! - **From anything else**: one Kafka record whose value is the on-failure JSON, keyed by the
//!   source's name, with the same story headers.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

use crate::{DeadLetterError, DeadLetterSink};

/// How long a delivery may take, retries included, before `write` fails (and is retried by
/// the mapping, the source records staying unacknowledged).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct KafkaDeadLetter {
    topic: String,
    brokers: String,
    producer: Result<FutureProducer, KafkaError>,
}

/// librdkafka's producer configuration for a dead letter: idempotent, every in-sync replica;
/// the raw `properties` last (the config loader refuses an `acks` weaker than `all`).
pub fn client_config(brokers: &[String], properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers.join(","))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            DELIVERY_TIMEOUT.as_millis().to_string(),
        );
    for (key, value) in properties {
        c.set(key, value);
    }
    c
}

impl KafkaDeadLetter {
    /// Creates the producer now; if librdkafka refuses the configuration, every write fails
    /// with that error (a `dead_letters` entry is built infallibly).
    pub fn new(brokers: &[String], topic: &str, properties: &BTreeMap<String, String>) -> Self {
        let producer = client_config(brokers, properties).create();
        Self {
            topic: topic.to_string(),
            brokers: brokers.join(","),
            producer,
        }
    }

    fn error(&self, source: KafkaError) -> DeadLetterError {
        DeadLetterError::Kafka {
            topic: self.topic.clone(),
            source,
        }
    }
}

#[async_trait]
impl DeadLetterSink for KafkaDeadLetter {
    async fn write(&self, record: &Value) -> Result<(), DeadLetterError> {
        let producer = self.producer.as_ref().map_err(|e| self.error(e.clone()))?;
        let outgoing = outgoing(record)?;
        // Queue every record first so that they travel together, then wait for each report.
        let mut deliveries = Vec::with_capacity(outgoing.len());
        for out in &outgoing {
            let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
            for (name, value) in &out.headers {
                headers = headers.insert(Header {
                    key: name.as_str(),
                    value: Some(value.as_slice()),
                });
            }
            let mut produced = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
            if let Some(key) = &out.key {
                produced = produced.key(key.as_slice());
            }
            if let Some(value) = &out.value {
                produced = produced.payload(value.as_slice());
            }
            let delivery = producer
                .send_result(produced)
                .map_err(|(error, _)| self.error(error))?;
            deliveries.push(delivery);
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Err(self.error(error)),
                Err(_canceled) => return Err(self.error(KafkaError::Canceled)),
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("kafka topic {} at {}", self.topic, self.brokers)
    }
}

/// One Kafka record to produce.
#[derive(Debug, Clone, PartialEq)]
struct Outgoing {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

/// The story headers every dead letter carries, from the on-failure record.
fn story(record: &Value) -> Vec<(String, Vec<u8>)> {
    [
        ("sluice-condition", "/requestContext/condition"),
        ("sluice-source", "/sluice/source"),
        ("sluice-function", "/sluice/function"),
        ("sluice-error-type", "/sluice/error/errorType"),
        ("sluice-error-message", "/sluice/error/errorMessage"),
    ]
    .into_iter()
    .filter_map(|(name, pointer)| {
        let text = match record.pointer(pointer)? {
            Value::String(s) => s.clone(),
            Value::Null => return None,
            other => other.to_string(),
        };
        Some((name.to_string(), text.into_bytes()))
    })
    .collect()
}

/// A Lambda Kafka record of `sluice.records`, decoded; `None` when it is not one.
fn kafka_record(r: &Value) -> Option<Outgoing> {
    let topic = r.get("topic")?.as_str()?;
    let partition = r.get("partition")?.as_i64()?;
    let offset = r.get("offset")?.as_i64()?;
    let bytes = |field: &str| -> Option<Option<Vec<u8>>> {
        match r.get(field) {
            None | Some(Value::Null) => Some(None),
            Some(Value::String(text)) => BASE64.decode(text).ok().map(Some),
            Some(_) => None,
        }
    };
    let key = bytes("key")?;
    let value = bytes("value")?;
    let mut headers = Vec::new();
    for header in r
        .get("headers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for (name, value) in header.as_object()? {
            let value: Vec<u8> = value
                .as_array()?
                .iter()
                .map(|n| n.as_i64().map(|n| n as i8 as u8))
                .collect::<Option<_>>()?;
            headers.push((name.clone(), value));
        }
    }
    headers.push(("sluice-topic".into(), topic.as_bytes().to_vec()));
    headers.push((
        "sluice-partition".into(),
        partition.to_string().into_bytes(),
    ));
    headers.push(("sluice-offset".into(), offset.to_string().into_bytes()));
    Some(Outgoing {
        key,
        value,
        headers,
    })
}

/// The records to produce for one on-failure record.
fn outgoing(record: &Value) -> Result<Vec<Outgoing>, DeadLetterError> {
    let story = story(record);
    let originals: Option<Vec<Outgoing>> = record
        .pointer("/sluice/records")
        .and_then(Value::as_array)
        .filter(|records| !records.is_empty())
        .and_then(|records| records.iter().map(kafka_record).collect());
    if let Some(originals) = originals {
        let mut without_records = record.clone();
        if let Some(sluice) = without_records
            .get_mut("sluice")
            .and_then(Value::as_object_mut)
        {
            sluice.remove("records");
        }
        let failure = serde_json::to_vec(&without_records)?;
        return Ok(originals
            .into_iter()
            .map(|mut out| {
                out.headers.extend(story.iter().cloned());
                out.headers.push(("sluice-failure".into(), failure.clone()));
                out
            })
            .collect());
    }
    let key = record
        .pointer("/sluice/source")
        .and_then(Value::as_str)
        .map(|s| s.as_bytes().to_vec());
    Ok(vec![Outgoing {
        key,
        value: Some(serde_json::to_vec(record)?),
        headers: story,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn failure(records: Value) -> Value {
        json!({
            "requestContext": {"condition": "RetryAttemptsExhausted", "approximateInvokeCount": 3},
            "responseContext": {"executedVersion": "$LATEST"},
            "sluice": {
                "source": "orders",
                "function": "resize",
                "error": {"errorType": "Poison", "errorMessage": "bad record"},
                "attempts": [{"errorType": "Poison"}],
                "records": records,
            },
        })
    }

    fn header<'a>(out: &'a Outgoing, name: &str) -> Option<&'a [u8]> {
        out.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    #[test]
    fn kafka_records_keep_their_key_value_and_headers() {
        let record = failure(json!([
            {"topic": "orders", "partition": 2, "offset": 7, "timestamp": 1, "timestampType": "CREATE_TIME",
             "key": BASE64.encode(b"k"), "value": BASE64.encode(b"\x00raw"), "headers": [{"trace": [97, -1]}]},
            {"topic": "orders", "partition": 2, "offset": 8, "timestamp": 1, "timestampType": "CREATE_TIME",
             "value": BASE64.encode(b"v2"), "headers": []},
        ]));
        let out = outgoing(&record).expect("outgoing");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(out[0].value.as_deref(), Some(&b"\x00raw"[..]));
        assert_eq!(header(&out[0], "trace"), Some(&[97u8, 255][..]));
        assert_eq!(
            header(&out[0], "sluice-condition"),
            Some(&b"RetryAttemptsExhausted"[..])
        );
        assert_eq!(header(&out[0], "sluice-source"), Some(&b"orders"[..]));
        assert_eq!(header(&out[0], "sluice-error-type"), Some(&b"Poison"[..]));
        assert_eq!(
            header(&out[0], "sluice-error-message"),
            Some(&b"bad record"[..])
        );
        assert_eq!(header(&out[0], "sluice-offset"), Some(&b"7"[..]));
        assert_eq!(header(&out[1], "sluice-offset"), Some(&b"8"[..]));
        assert_eq!(out[1].key, None);
        let story: Value =
            serde_json::from_slice(header(&out[0], "sluice-failure").expect("story"))
                .expect("json");
        assert_eq!(story["sluice"]["attempts"][0]["errorType"], "Poison");
        assert_eq!(
            story["sluice"].get("records"),
            None,
            "the records travel as themselves"
        );
    }

    #[test]
    fn other_records_go_as_json_with_the_story_in_headers() {
        let record = failure(json!([{"messageId": "m-1", "body": "hello"}]));
        let out = outgoing(&record).expect("outgoing");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key.as_deref(), Some(&b"orders"[..]));
        let value: Value =
            serde_json::from_slice(out[0].value.as_deref().expect("value")).expect("json");
        assert_eq!(value, record);
        assert_eq!(
            header(&out[0], "sluice-condition"),
            Some(&b"RetryAttemptsExhausted"[..])
        );
        assert_eq!(header(&out[0], "sluice-error-type"), Some(&b"Poison"[..]));
    }

    #[test]
    fn the_producer_is_idempotent_and_waits_for_every_replica() {
        let mut properties = BTreeMap::new();
        properties.insert("linger.ms".to_string(), "1".to_string());
        let c = client_config(&["a:9092".into(), "b:9092".into()], &properties);
        assert_eq!(c.get("bootstrap.servers"), Some("a:9092,b:9092"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("linger.ms"), Some("1"));
    }
}
