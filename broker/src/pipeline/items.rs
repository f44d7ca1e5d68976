//! Partial batch responses: `{"batchItemFailures": [{"itemIdentifier": "…"}]}`.

use std::collections::HashSet;

use serde_json::Value;

/// The failed item identifiers of a function's response. `null`, `{}`, an empty list or a
/// response without the key mean that every item succeeded. A response Lambda would call
/// malformed (an identifier that is missing, empty, not a string or not in the batch) fails
/// the whole batch, with a message saying why.
pub fn parse(body: &[u8], batch_ids: &HashSet<&str>) -> Result<Vec<String>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        // A function that returns something that is not JSON reports no failures.
        Err(_) => return Ok(Vec::new()),
    };
    let failures = match &value {
        Value::Null => return Ok(Vec::new()),
        Value::Object(map) => match map.get("batchItemFailures") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(other) => return Err(format!("batchItemFailures must be a list, not {other}")),
        },
        _ => return Ok(Vec::new()),
    };
    let mut ids = Vec::with_capacity(failures.len());
    for item in failures {
        let id = match item.get("itemIdentifier") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            // Lambda's Kafka form: `{"partition": "topic-partition", "offset": N}`.
            Some(Value::Object(o)) => match (
                o.get("partition").and_then(Value::as_str),
                o.get("offset").and_then(Value::as_i64),
            ) {
                (Some(p), Some(off)) => format!("{p}@{off}"),
                _ => {
                    return Err(format!(
                        "invalid itemIdentifier {item} in batchItemFailures"
                    ));
                }
            },
            Some(other) => {
                return Err(format!(
                    "invalid itemIdentifier {other} in batchItemFailures"
                ));
            }
            None => return Err("an entry of batchItemFailures has no itemIdentifier".to_string()),
        };
        if !batch_ids.contains(id.as_str()) {
            return Err(format!("itemIdentifier {id} is not in the batch"));
        }
        ids.push(id);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> HashSet<&'static str> {
        ["1", "2", "3"].into_iter().collect()
    }

    #[test]
    fn empty_answers_mean_all_succeeded() {
        for body in [
            "",
            "null",
            "{}",
            r#"{"batchItemFailures": []}"#,
            r#"{"batchItemFailures": null}"#,
            r#""ok""#,
            "not json",
        ] {
            assert_eq!(parse(body.as_bytes(), &ids()), Ok(vec![]), "{body}");
        }
    }

    #[test]
    fn failed_identifiers_are_returned_in_order() {
        let body = br#"{"batchItemFailures": [{"itemIdentifier": "3"}, {"itemIdentifier": "2"}]}"#;
        assert_eq!(
            parse(body, &ids()),
            Ok(vec!["3".to_string(), "2".to_string()])
        );
    }

    #[test]
    fn kafka_identifiers_may_be_partition_and_offset_objects() {
        let ids: HashSet<&str> = ["orders-0@5", "orders-0@6"].into_iter().collect();
        let body = br#"{"batchItemFailures": [{"itemIdentifier": {"partition": "orders-0", "offset": 6}}]}"#;
        assert_eq!(parse(body, &ids), Ok(vec!["orders-0@6".to_string()]));
    }

    #[test]
    fn malformed_answers_fail_the_batch() {
        for body in [
            r#"{"batchItemFailures": [{"itemIdentifier": ""}]}"#,
            r#"{"batchItemFailures": [{"id": "1"}]}"#,
            r#"{"batchItemFailures": [{"itemIdentifier": "9"}]}"#,
            r#"{"batchItemFailures": "1"}"#,
            r#"{"batchItemFailures": [{"itemIdentifier": null}]}"#,
        ] {
            assert!(parse(body.as_bytes(), &ids()).is_err(), "{body}");
        }
    }
}
