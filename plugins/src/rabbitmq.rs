//! `type: rabbitmq`: one persistent JSON message per dead letter, published with publisher
//! confirms. `write` returns once the broker has confirmed the message, which for a durable
//! queue means it is on disk. Publishing is `mandatory`, so a message that no queue takes
//! comes back as an error instead of vanishing.

use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::{DeadLetterError, DeadLetterSink};

/// How long a publish may wait for the broker's confirm (a broker under a memory alarm blocks
/// publishers) before the write fails and the connection is replaced.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RabbitMqDeadLetter {
    uri: String,
    exchange: String,
    routing_key: String,
    connection_name: String,
    destination: String,
    /// Opened on the first write and again on the write after a failure.
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    /// Connections opened so far; names each one, so that a late `forget` of a replaced
    /// connection cannot drop its successor.
    opened: u64,
    link: Option<Link>,
}

struct Link {
    generation: u64,
    connection: Connection,
    channel: Channel,
}

impl RabbitMqDeadLetter {
    /// Publishes to `exchange` (`""`: the default exchange, which routes to the queue named
    /// `routing_key`) on the broker at `uri`. Connects on the first write.
    pub fn new(uri: String, exchange: String, routing_key: String) -> Self {
        // The uri holds the password: name the broker by host and vhost only.
        let at = match uri.parse::<AMQPUri>() {
            Ok(u) => format!("{}:{}/{}", u.authority.host, u.authority.port, u.vhost),
            Err(_) => "an invalid uri".to_string(),
        };
        let destination =
            format!("rabbitmq exchange {exchange:?} routing key {routing_key:?} at {at}");
        Self {
            uri,
            exchange,
            routing_key,
            connection_name: "sluice dead letters".to_string(),
            destination,
            slot: Mutex::new(Slot::default()),
        }
    }

    /// Names the connection as `rabbitmqctl list_connections client_properties` shows it.
    pub fn with_connection_name(mut self, name: &str) -> Self {
        self.connection_name = name.to_string();
        self
    }

    fn remote(&self, message: impl Into<String>) -> DeadLetterError {
        DeadLetterError::Remote {
            destination: self.destination.clone(),
            message: message.into(),
        }
    }

    fn amqp(&self, source: lapin::Error) -> DeadLetterError {
        DeadLetterError::RabbitMq {
            destination: self.destination.clone(),
            source,
        }
    }

    /// The open confirm-mode channel, connecting first when there is none or it broke.
    async fn channel(&self) -> Result<(u64, Channel), DeadLetterError> {
        let mut slot = self.slot.lock().await;
        if let Some(link) = &slot.link
            && link.channel.status().connected()
        {
            return Ok((link.generation, link.channel.clone()));
        }
        if let Some(old) = slot.link.take() {
            let _ = old
                .connection
                .close(200, "replacing a broken channel".into())
                .await;
        }
        let properties = ConnectionProperties::default()
            .with_connection_name(self.connection_name.as_str().into());
        let connection = Connection::connect(&self.uri, properties)
            .await
            .map_err(|e| self.amqp(e))?;
        let open = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        };
        let channel = match open.await {
            Ok(channel) => channel,
            Err(e) => {
                let _ = connection.close(200, "cannot open a channel".into()).await;
                return Err(self.amqp(e));
            }
        };
        slot.opened += 1;
        let generation = slot.opened;
        slot.link = Some(Link {
            generation,
            connection,
            channel: channel.clone(),
        });
        Ok((generation, channel))
    }

    /// Drops the connection a failed publish used, so that the next write opens a new one.
    async fn forget(&self, generation: u64) {
        let mut slot = self.slot.lock().await;
        if slot
            .link
            .as_ref()
            .is_some_and(|l| l.generation == generation)
            && let Some(old) = slot.link.take()
        {
            let _ = old.connection.close(200, "publish failed".into()).await;
        }
    }
}

#[async_trait]
impl DeadLetterSink for RabbitMqDeadLetter {
    async fn write(&self, record: &serde_json::Value) -> Result<(), DeadLetterError> {
        let body = serde_json::to_vec(record)?;
        let exchange = ShortString::try_new(self.exchange.as_str())
            .map_err(|e| self.remote(format!("exchange: {e}")))?;
        let routing_key = ShortString::try_new(self.routing_key.as_str())
            .map_err(|e| self.remote(format!("routing key: {e}")))?;
        let (generation, channel) = self.channel().await?;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let publish = async {
            channel
                .basic_publish(exchange, routing_key, options, &body, properties)
                .await?
                .await
        };
        let confirmation = match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
            Ok(Ok(confirmation)) => confirmation,
            Ok(Err(e)) => {
                self.forget(generation).await;
                return Err(self.amqp(e));
            }
            Err(_) => {
                self.forget(generation).await;
                return Err(self.remote(format!("no publisher confirm within {CONFIRM_TIMEOUT:?}")));
            }
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(self.remote(format!(
                "no queue took the message ({} {})",
                returned.reply_code, returned.reply_text
            ))),
            Confirmation::Nack(_) => {
                Err(self.remote("the broker refused the message (basic.nack)"))
            }
            Confirmation::NotRequested => Err(self.remote("the channel is not in confirm mode")),
        }
    }

    fn describe(&self) -> String {
        self.destination.clone()
    }
}

#[cfg(test)]
mod tests {
    //! Against the RabbitMQ server on 127.0.0.1:5672 (guest/guest) that `scripts/test` starts.

    use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::FieldTable;

    use super::*;

    const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    fn unique(what: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("sluice-test-{what}-{}-{nanos}", std::process::id())
    }

    async fn admin() -> (Connection, Channel) {
        let connection = Connection::connect(URI, ConnectionProperties::default())
            .await
            .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        (connection, channel)
    }

    async fn declare(channel: &Channel, queue: &str) {
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .expect("declare");
    }

    async fn get(channel: &Channel, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
    }

    /// Closes the named connection from the server side, as an operator or a failover would.
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
    async fn a_confirmed_write_is_a_persistent_json_message_in_the_target_queue() {
        let (_admin, channel) = admin().await;
        let queue = unique("dlq");
        declare(&channel, &queue).await;
        let sink = RabbitMqDeadLetter::new(URI.to_string(), String::new(), queue.clone());
        let record =
            serde_json::json!({"requestContext": {"condition": "RetryAttemptsExhausted"}, "n": 1});
        sink.write(&record).await.expect("confirmed");

        let message = get(&channel, &queue)
            .await
            .expect("the dead letter is in the queue");
        let body: serde_json::Value =
            serde_json::from_slice(&message.delivery.data).expect("json body");
        assert_eq!(body, record);
        let properties = &message.delivery.properties;
        assert_eq!(*properties.delivery_mode(), Some(2));
        assert_eq!(
            properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert!(get(&channel, &queue).await.is_none(), "exactly one message");
        assert!(
            !sink.describe().contains("guest:guest"),
            "{}",
            sink.describe()
        );
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unroutable_write_fails_retriably_and_succeeds_once_the_queue_exists() {
        let (_admin, channel) = admin().await;
        let queue = unique("dlq-missing");
        let sink = RabbitMqDeadLetter::new(URI.to_string(), String::new(), queue.clone());
        let err = sink
            .write(&serde_json::json!({"n": 1}))
            .await
            .expect_err("no queue takes it");
        assert!(err.is_retriable(), "{err}");
        assert!(err.to_string().contains("NO_ROUTE"), "{err}");

        declare(&channel, &queue).await;
        sink.write(&serde_json::json!({"n": 2}))
            .await
            .expect("confirmed now");
        let message = get(&channel, &queue).await.expect("delivered");
        assert_eq!(message.delivery.data, br#"{"n":2}"#);
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_exchange_fails_retriably_and_a_later_write_opens_a_new_channel() {
        let (_admin, channel) = admin().await;
        let queue = unique("dlq-exchange");
        let exchange = unique("dlx");
        declare(&channel, &queue).await;
        let sink = RabbitMqDeadLetter::new(URI.to_string(), exchange.clone(), "failed".to_string());
        // A 404 on publish closes the channel: the next write must not reuse it.
        let err = sink
            .write(&serde_json::json!({"n": 1}))
            .await
            .expect_err("no such exchange");
        assert!(err.is_retriable(), "{err}");
        assert!(err.to_string().contains("NOT_FOUND"), "{err}");

        channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Direct,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exchange");
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "failed".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        sink.write(&serde_json::json!({"n": 2}))
            .await
            .expect("confirmed");
        let message = get(&channel, &queue)
            .await
            .expect("routed through the exchange");
        assert_eq!(message.delivery.data, br#"{"n":2}"#);
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
        channel
            .exchange_delete(
                exchange.as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await
            .expect("delete exchange");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_the_server_closes_the_connection_the_next_writes_reconnect() {
        let (_admin, channel) = admin().await;
        let queue = unique("dlq-reconnect");
        declare(&channel, &queue).await;
        let name = unique("dead-letter-connection");
        let sink = RabbitMqDeadLetter::new(URI.to_string(), String::new(), queue.clone())
            .with_connection_name(&name);
        sink.write(&serde_json::json!({"n": 1}))
            .await
            .expect("first");
        close_connection(&name);

        // A write racing the close may fail (retriably); the one after it reconnects.
        let mut failures = 0;
        for n in 2..=4 {
            match sink.write(&serde_json::json!({ "n": n })).await {
                Ok(()) => break,
                Err(e) => {
                    assert!(e.is_retriable(), "{e}");
                    failures += 1;
                }
            }
        }
        assert!(failures <= 1, "reconnects on the write after a failure");
        let mut delivered = 0;
        while get(&channel, &queue).await.is_some() {
            delivered += 1;
        }
        assert_eq!(
            delivered, 2,
            "the first and the first successful write after the close"
        );
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
    }
}
