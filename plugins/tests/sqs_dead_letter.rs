//! The SQS dead letter against a real SQS API (moto_server at `SLUICE_TEST_MOTO`, which
//! scripts/test starts): which failures it reports as worth retrying. A missing queue and a
//! message over SQS's size limit are not (a mapping stops retrying them in a busy loop and is
//! marked failed); an endpoint that does not answer is.

use aws_config::{BehaviorVersion, Region};
use serde_json::json;
use sluice_plugins::DeadLetterSink;
use sluice_plugins::sqs::SqsDeadLetter;

fn moto() -> String {
    std::env::var("SLUICE_TEST_MOTO")
        .unwrap_or_else(|_| panic!("SLUICE_TEST_MOTO is not set: run the tests with scripts/test"))
}

fn sink(queue_url: &str, endpoint: &str) -> SqsDeadLetter {
    SqsDeadLetter::new(
        queue_url.to_owned(),
        Some(endpoint.to_owned()),
        Some("us-east-1".to_owned()),
    )
}

#[tokio::test]
async fn a_missing_queue_is_not_worth_retrying() {
    let endpoint = moto();
    let url = format!(
        "{endpoint}/000000000000/sluice-dlq-missing-{}",
        std::process::id()
    );
    let error = sink(&url, &endpoint)
        .write(&json!({"k": "v"}))
        .await
        .expect_err("the queue does not exist");
    assert!(!error.is_retriable(), "{error}");
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_not_worth_retrying() {
    let endpoint = moto();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&endpoint)
        .load()
        .await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    let name = format!("sluice-dlq-size-{}", std::process::id());
    let url = sqs
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .expect("create the queue")
        .queue_url
        .expect("a queue url");
    let dead = sink(&url, &endpoint);
    dead.write(&json!({"small": true}))
        .await
        .expect("a small record is written");
    let error = dead
        .write(&json!({ "big": "x".repeat(2 * 1024 * 1024) }))
        .await
        .expect_err("2 MiB is over SQS's limit");
    assert!(!error.is_retriable(), "{error}");
}

#[tokio::test]
async fn an_endpoint_that_does_not_answer_is_worth_retrying() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let url = format!("{endpoint}/000000000000/q");
    let error = sink(&url, &endpoint)
        .write(&json!({"k": "v"}))
        .await
        .expect_err("nothing listens there");
    assert!(error.is_retriable(), "{error}");
}
