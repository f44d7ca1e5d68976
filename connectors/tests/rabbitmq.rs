//! `RabbitMqSource` against the RabbitMQ server on 127.0.0.1:5672 (guest/guest) that
//! `scripts/test` starts. Every test declares its own queues under unique names and deletes
//! them at the end, so tests share the server.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aws_lambda_events::event::rabbitmq::RabbitMqEvent;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use sluice_connectors::queue::{Delivery, QueueSource, Redelivery};
use sluice_connectors::rabbitmq::RabbitMqSource;
use sluice_connectors::stream::ReadError;

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn unique(what: &str) -> String {
    format!("sluice-test-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// A plain lapin connection the tests use to declare, publish and inspect.
struct Admin {
    _connection: Connection,
    channel: Channel,
}

impl Admin {
    async fn new() -> Self {
        let connection = Connection::connect(URI, ConnectionProperties::default())
            .await
            .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        Self {
            _connection: connection,
            channel,
        }
    }

    async fn declare(&self, queue: &str, arguments: FieldTable) {
        self.channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments)
            .await
            .expect("declare queue");
    }

    async fn publish(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("publish");
    }

    async fn publish_numbered(&self, queue: &str, count: usize) {
        for n in 0..count {
            self.publish(queue, n.to_string().as_bytes(), BasicProperties::default())
                .await;
        }
    }

    /// Ready messages and consumers of `queue`.
    async fn counts(&self, queue: &str) -> (u32, u32) {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        (q.message_count(), q.consumer_count())
    }

    /// Waits until nobody consumes `queue` (a dropped source's connection is closed) and the
    /// broker has requeued what that consumer held, then returns the ready count.
    async fn settled_count(&self, queue: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.counts(queue).await.1 > 0 {
            assert!(Instant::now() < deadline, "the source's consumer went away");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The broker requeues right as the consumer ends; give it a moment all the same.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.counts(queue).await.0
    }

    async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
    }

    async fn delete(&self, queue: &str) {
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .expect("delete queue");
    }
}

/// Receives until `count` deliveries arrived or `within` passed.
async fn take(source: &RabbitMqSource, count: usize, within: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match source.receive(count - got.len(), left).await {
            Ok(d) => got.extend(d),
            Err(e) => {
                assert!(e.is_retriable(), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    got
}

fn body(d: &Delivery) -> String {
    use base64::Engine;
    let data = d.record.lambda["data"].as_str().expect("data");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .expect("base64");
    String::from_utf8(bytes).expect("utf-8")
}

fn refs(deliveries: &[Delivery]) -> Vec<&Delivery> {
    deliveries.iter().collect()
}

/// Closes the connection the source named itself with, from the server side.
fn close_connection(name: &str) {
    // The table form: the json formatter writes pids in a form close_connection rejects.
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "--no-table-headers",
            "--quiet",
        ])
        .output()
        .expect("rabbitmqctl");
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    let pid = list
        .lines()
        .find(|line| line.contains(name))
        .and_then(|line| line.split_whitespace().next())
        .unwrap_or_else(|| panic!("connection {name} is listed: {list}"))
        .to_string();
    let status = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", &pid, "test"])
        .status()
        .expect("rabbitmqctl");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_lambda_shaped_records_and_an_ack_removes_them() {
    let admin = Admin::new().await;
    let queue = unique("ack");
    admin.declare(&queue, FieldTable::default()).await;
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    let first = BasicProperties::default()
        .with_message_id("order-1".into())
        .with_content_type("application/json".into())
        .with_headers(headers);
    admin.publish(&queue, br#"{"total": 12}"#, first).await;
    admin.publish_numbered(&queue, 2).await;

    let source = RabbitMqSource::connect(URI, &queue, 10)
        .await
        .expect("source");
    assert_eq!(source.redelivery(), Redelivery::InPlace);
    assert_eq!(source.batch_info_key(), "RabbitMQBatchInfo");
    assert_eq!(
        source.source_arn(),
        "arn:aws:mq:us-east-1:000000000000:broker:127.0.0.1:/"
    );
    let got = take(&source, 3, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].record.id, "order-1");
    assert_eq!(
        got[0].record.filter_view["data"],
        serde_json::json!({"total": 12})
    );
    assert_eq!(
        got[0].record.key, queue,
        "the default exchange routes by queue name"
    );
    assert_eq!(
        got[1].record.id, got[1].handle,
        "without a message id the delivery names itself"
    );
    assert_ne!(got[1].record.id, got[2].record.id);
    assert!(
        got.iter()
            .all(|d| d.receive_count == 1 && d.group.is_none())
    );

    let event = source.envelope(&got.iter().map(|d| &d.record).collect::<Vec<_>>());
    let parsed: RabbitMqEvent = serde_json::from_value(event).expect("an aws:rmq event");
    let messages = &parsed.messages_by_queue[&format!("{queue}::/")];
    assert_eq!(messages.len(), 3);
    assert_eq!(
        messages[0].basic_properties.headers["tenant"],
        serde_json::json!({"bytes": [97, 99, 109, 101]})
    );
    assert_eq!(
        messages[0].basic_properties.message_id.as_deref(),
        Some("order-1")
    );

    source.ack(&refs(&got)).await.expect("ack");
    assert!(
        take(&source, 1, Duration::from_millis(300))
            .await
            .is_empty()
    );
    drop(source);
    assert_eq!(
        admin.settled_count(&queue).await,
        0,
        "acknowledged messages do not come back"
    );
    assert!(
        admin.get(&queue).await.is_none(),
        "a second consumer sees nothing"
    );
    admin.delete(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acking_a_later_run_leaves_earlier_deliveries_unacked() {
    let admin = Admin::new().await;
    let queue = unique("ack-run");
    admin.declare(&queue, FieldTable::default()).await;
    admin.publish_numbered(&queue, 6).await;

    let source = RabbitMqSource::connect(URI, &queue, 10)
        .await
        .expect("source");
    let got = take(&source, 6, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 6);
    // A contiguous run, but not from the oldest unsettled delivery: `multiple` would ack 0–2 too.
    source
        .ack(&refs(&got[3..]))
        .await
        .expect("ack the later half");
    drop(source);
    assert_eq!(admin.settled_count(&queue).await, 3);
    let mut left = Vec::new();
    while let Some(m) = admin.get(&queue).await {
        left.push(String::from_utf8(m.delivery.data).expect("utf-8"));
    }
    assert_eq!(left, ["0", "1", "2"]);
    admin.delete(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_puts_a_message_back_for_another_try() {
    let admin = Admin::new().await;
    let queue = unique("release");
    admin.declare(&queue, FieldTable::default()).await;
    admin
        .publish(&queue, b"again", BasicProperties::default())
        .await;

    let source = RabbitMqSource::connect(URI, &queue, 10)
        .await
        .expect("source");
    let first = take(&source, 1, Duration::from_secs(10)).await;
    assert_eq!((first.len(), first[0].receive_count), (1, 1));
    source.release(&refs(&first)).await.expect("release");
    let second = take(&source, 1, Duration::from_secs(10)).await;
    assert_eq!(second.len(), 1, "the released message comes back");
    assert_eq!(body(&second[0]), "again");
    assert_eq!(second[0].record.lambda["redelivered"], true);
    assert_eq!(
        second[0].receive_count, 2,
        "a classic queue only says it was redelivered"
    );
    assert_ne!(second[0].handle, first[0].handle, "a new delivery tag");
    source.ack(&refs(&second)).await.expect("ack");
    drop(source);
    assert_eq!(admin.settled_count(&queue).await, 0);
    admin.delete(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_counts_every_delivery() {
    let admin = Admin::new().await;
    let queue = unique("quorum");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    admin.declare(&queue, arguments).await;
    admin
        .publish(&queue, b"counted", BasicProperties::default())
        .await;

    let source = RabbitMqSource::connect(URI, &queue, 10)
        .await
        .expect("source");
    for expected in 1..=3 {
        let got = take(&source, 1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].receive_count, expected, "from x-delivery-count");
        if expected < 3 {
            source.release(&refs(&got)).await.expect("release");
        } else {
            source.ack(&refs(&got)).await.expect("ack");
        }
    }
    drop(source);
    assert_eq!(admin.settled_count(&queue).await, 0);
    admin.delete(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_hands_the_message_to_the_queues_dead_letter_exchange() {
    let admin = Admin::new().await;
    let queue = unique("reject");
    let dead = unique("reject-dead");
    let exchange = unique("reject-dlx");
    admin
        .channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare exchange");
    admin.declare(&dead, FieldTable::default()).await;
    admin
        .channel
        .queue_bind(
            dead.as_str().into(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(exchange.as_str())),
    );
    admin.declare(&queue, arguments).await;
    admin
        .publish(&queue, b"good", BasicProperties::default())
        .await;
    admin
        .publish(&queue, b"poison", BasicProperties::default())
        .await;

    let source = RabbitMqSource::connect(URI, &queue, 10)
        .await
        .expect("source");
    let got = take(&source, 2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2);
    let (poison, good): (Vec<&Delivery>, Vec<&Delivery>) =
        got.iter().partition(|d| body(d) == "poison");
    source.reject(&poison).await.expect("reject");
    source.ack(&good).await.expect("ack");
    drop(source);
    assert_eq!(
        admin.settled_count(&queue).await,
        0,
        "neither comes back to the queue"
    );
    let mut dead_lettered = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while dead_lettered.is_none() && Instant::now() < deadline {
        dead_lettered = admin.get(&dead).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dead_lettered = dead_lettered.expect("the rejected message reached the dead-letter queue");
    assert_eq!(dead_lettered.delivery.data, b"poison");
    let headers = dead_lettered
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    assert!(
        headers.contains_key("x-death"),
        "the broker dead-lettered it: {headers:?}"
    );
    assert!(admin.get(&dead).await.is_none(), "only the rejected one");
    admin.delete(&queue).await;
    admin.delete(&dead).await;
    admin
        .channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .expect("delete exchange");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_bounds_the_unacknowledged_deliveries() {
    let admin = Admin::new().await;
    let queue = unique("prefetch");
    admin.declare(&queue, FieldTable::default()).await;
    admin.publish_numbered(&queue, 10).await;

    let source = RabbitMqSource::connect(URI, &queue, 3)
        .await
        .expect("source");
    let first = take(&source, 10, Duration::from_secs(2)).await;
    assert_eq!(
        first.len(),
        3,
        "no more than prefetch while none is acknowledged"
    );
    source.ack(&refs(&first)).await.expect("ack");
    let second = take(&source, 10, Duration::from_secs(2)).await;
    assert_eq!(second.len(), 3, "acking frees exactly prefetch slots");
    let bodies: Vec<String> = first.iter().chain(&second).map(body).collect();
    assert_eq!(bodies, ["0", "1", "2", "3", "4", "5"]);
    source.ack(&refs(&second)).await.expect("ack");
    drop(source);
    assert_eq!(admin.settled_count(&queue).await, 4);
    admin.delete(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_server_closes_the_connection_and_loses_nothing() {
    const MESSAGES: usize = 200;
    let admin = Admin::new().await;
    let queue = unique("reconnect");
    admin.declare(&queue, FieldTable::default()).await;
    admin.publish_numbered(&queue, MESSAGES).await;

    let name = unique("reconnect-connection");
    let source = RabbitMqSource::connect_as(URI, &queue, 20, &name)
        .await
        .expect("source");
    let mut seen = BTreeSet::new();
    let mut deliveries = 0;
    // Settle a few batches on the first connection.
    while seen.len() < 50 {
        let got = take(&source, 10, Duration::from_secs(10)).await;
        assert!(!got.is_empty());
        deliveries += got.len();
        seen.extend(got.iter().map(body));
        source.ack(&refs(&got)).await.expect("ack");
    }
    // A batch in flight when the broker closes the connection.
    let in_flight = take(&source, 10, Duration::from_secs(10)).await;
    assert!(!in_flight.is_empty());
    deliveries += in_flight.len();
    close_connection(&name);
    let deadline = Instant::now() + Duration::from_secs(15);
    while source.generation() < 2 {
        assert!(Instant::now() < deadline, "the source reconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its tags mean nothing on the new connection: skipped, and the broker redelivers them.
    source
        .ack(&refs(&in_flight))
        .await
        .expect("acks of a closed connection are skipped");
    let unconfirmed: BTreeSet<String> = in_flight.iter().map(body).collect();

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut redelivered = BTreeSet::new();
    while seen.len() < MESSAGES && Instant::now() < deadline {
        let got = take(&source, 10, Duration::from_secs(2)).await;
        deliveries += got.len();
        for d in &got {
            let b = body(d);
            if unconfirmed.contains(&b) {
                assert_eq!(d.record.lambda["redelivered"], true);
                redelivered.insert(b.clone());
            }
            seen.insert(b);
        }
        source.ack(&refs(&got)).await.expect("ack");
    }
    let want: BTreeSet<String> = (0..MESSAGES).map(|n| n.to_string()).collect();
    assert_eq!(seen, want, "every published message was received");
    assert_eq!(
        redelivered, unconfirmed,
        "the batch whose acks were skipped came back"
    );
    assert!(
        deliveries >= MESSAGES + in_flight.len(),
        "{deliveries} deliveries"
    );
    drop(source);
    assert_eq!(
        admin.settled_count(&queue).await,
        0,
        "and every one was acknowledged"
    );
    admin.delete(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_not_found() {
    let err = RabbitMqSource::connect(URI, &unique("missing"), 10)
        .await
        .err()
        .expect("no such queue");
    assert!(matches!(err, ReadError::NotFound(_)), "{err}");
    assert!(!err.to_string().contains("guest:guest"), "{err}");
}
