//! `type: rabbitmq`: a queue consumed over AMQP 0-9-1 with manual acknowledgements, its
//! messages handed on in the `aws:rmq` shape Lambda delivers.
//!
//! A background task owns the connection, its channel and the consumer, and feeds deliveries
//! into a bounded channel that [`RabbitMqSource::receive`] drains. When the broker or the
//! network drops the connection, the task connects again with an exponential backoff and
//! resumes consuming. Each connection is a new *generation*: a delivery's handle names the
//! generation and the delivery tag, because a tag means nothing on another connection. The
//! broker requeues whatever a dead connection left unacknowledged, so settling a delivery of an
//! older generation is skipped, not an error, and nothing is lost.

mod message;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ErrorKind};
use sluice_config::RabbitMqConfig;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

use self::message::Message;
pub use self::message::{EVENT_SOURCE, envelope, queue_key};
use crate::backoff::Backoff;
use crate::queue::{Delivery, QueueSource, Redelivery};
use crate::record::Record;
use crate::stream::ReadError;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A connection that lived this long was healthy: the next outage starts the backoff over.
const HEALTHY: Duration = MAX_BACKOFF;

/// A RabbitMQ queue.
pub struct RabbitMqSource {
    link: Arc<Mutex<Link>>,
    deliveries: tokio::sync::Mutex<mpsc::Receiver<Received>>,
    source_arn: String,
    queue_key: String,
    /// Stops the connection task (which closes the connection, so the broker requeues what is
    /// unacknowledged) when the source is dropped.
    _stop: DropGuard,
}

/// The connection the task currently consumes on, shared with the calls that settle.
#[derive(Default)]
struct Link {
    generation: u64,
    channel: Option<Channel>,
    /// Delivery tags of this generation handed out and not settled yet, so that an ack with
    /// `multiple` never covers someone else's delivery.
    unsettled: BTreeSet<u64>,
    /// Why the last connection or attempt failed, while there is no connection.
    last_error: Option<String>,
}

struct Received {
    generation: u64,
    delivery: Delivery,
}

/// Where the task connects and what it consumes.
#[derive(Clone)]
struct Target {
    uri: String,
    queue: String,
    prefetch: u16,
    connection_name: String,
    source_arn: String,
    queue_key: String,
    /// Whether records carry their filter view (see [`Message::record`]).
    filter_views: bool,
}

impl RabbitMqSource {
    /// Connects to `uri` (`amqp://` or `amqps://`, the vhost in its path: `%2f` for `/`) and
    /// starts consuming `queue` with at most `prefetch` unacknowledged messages. The first
    /// connection is made here, so a wrong address, credentials or queue fail now.
    pub async fn connect(uri: &str, queue: &str, prefetch: u16) -> Result<Self, ReadError> {
        Self::connect_as(uri, queue, prefetch, &format!("sluice {queue}")).await
    }

    /// Builds the source a `type: rabbitmq` entry declares. Its records carry a filter view
    /// only when the mapping has filters to match it against.
    pub async fn from_config(config: &RabbitMqConfig) -> Result<Self, ReadError> {
        let filter_views = !config.mapping.filters.is_empty();
        Self::start(
            &config.uri,
            &config.queue,
            config.prefetch,
            &format!("sluice {}", config.queue),
            filter_views,
        )
        .await
    }

    /// As [`connect`](Self::connect), naming the connection (`connection_name`, as the
    /// management UI and `rabbitmqctl list_connections client_properties` show it).
    pub async fn connect_as(
        uri: &str,
        queue: &str,
        prefetch: u16,
        connection_name: &str,
    ) -> Result<Self, ReadError> {
        Self::start(uri, queue, prefetch, connection_name, true).await
    }

    async fn start(
        uri: &str,
        queue: &str,
        prefetch: u16,
        connection_name: &str,
        filter_views: bool,
    ) -> Result<Self, ReadError> {
        let parsed: AMQPUri = uri
            .parse()
            .map_err(|e| ReadError::Other(format!("invalid RabbitMQ uri: {e}")))?;
        let source_arn = broker_arn(&parsed.authority.host, &parsed.vhost);
        let queue_key = queue_key(queue, &parsed.vhost);
        let target = Target {
            uri: uri.to_string(),
            queue: queue.to_string(),
            prefetch,
            connection_name: connection_name.to_string(),
            source_arn: source_arn.clone(),
            queue_key: queue_key.clone(),
            filter_views,
        };
        let opened = open(&target).await.map_err(|e| classify(&target, &e))?;
        let (tx, rx) = mpsc::channel(usize::from(prefetch).max(1));
        // Connected from the start, so that an early `receive` waits instead of reporting an outage.
        let link = Arc::new(Mutex::new(Link {
            channel: Some(opened.channel.clone()),
            ..Link::default()
        }));
        let stop = CancellationToken::new();
        tokio::spawn(run(target, opened, link.clone(), tx, stop.clone()));
        Ok(Self {
            link,
            deliveries: tokio::sync::Mutex::new(rx),
            source_arn,
            queue_key,
            _stop: stop.drop_guard(),
        })
    }

    /// The connection generation now consuming; it grows by one per reconnection.
    pub fn generation(&self) -> u64 {
        lock(&self.link).generation
    }

    /// Settles `deliveries` on the current connection; those of older connections are skipped
    /// (the broker already requeued them).
    async fn settle(&self, deliveries: &[&Delivery], how: Settle) -> Result<(), ReadError> {
        let mut tags = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            tags.push(parse_handle(&d.handle)?);
        }
        let (channel, plan) = {
            let mut link = lock(&self.link);
            let generation = link.generation;
            let mut current: Vec<u64> = tags
                .iter()
                .filter(|(g, _)| *g == generation)
                .map(|(_, t)| *t)
                .collect();
            current.sort_unstable();
            current.dedup();
            let skipped = tags.len() - current.len();
            if skipped > 0 {
                debug!(queue = %self.queue_key, skipped, "not settling deliveries of a closed connection; the broker requeued them");
            }
            let Some(channel) = link.channel.clone() else {
                return Ok(());
            };
            let Some(&last) = current.last() else {
                return Ok(());
            };
            // `multiple` settles every unsettled tag up to `last`: only when those are exactly
            // ours (a contiguous run from the oldest unsettled delivery, or one whose gaps are
            // already settled). Another batch's deliveries may sit below.
            let covered = link.unsettled.range(..=last).count();
            let multiple = how != Settle::Reject && current.len() > 1 && covered == current.len();
            let plan = if multiple {
                Plan::UpTo(last)
            } else {
                Plan::Each(current.clone())
            };
            for tag in &current {
                link.unsettled.remove(tag);
            }
            (channel, plan)
        };
        if !channel.status().connected() {
            debug!(queue = %self.queue_key, "the channel is closed; the broker requeues its deliveries");
            return Ok(());
        }
        let result = match plan {
            Plan::UpTo(tag) => how.send(&channel, tag, true).await,
            Plan::Each(tags) => {
                let mut result = Ok(());
                for tag in tags {
                    result = how.send(&channel, tag, false).await;
                    if result.is_err() {
                        break;
                    }
                }
                result
            }
        };
        result.map_err(|e| {
            ReadError::Other(format!("cannot {} on {}: {e}", how.verb(), self.queue_key))
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    Release,
    Reject,
}

enum Plan {
    UpTo(u64),
    Each(Vec<u64>),
}

impl Settle {
    async fn send(self, channel: &Channel, tag: u64, multiple: bool) -> lapin::Result<()> {
        match self {
            Settle::Ack => channel.basic_ack(tag, BasicAckOptions { multiple }).await,
            Settle::Release => {
                channel
                    .basic_nack(
                        tag,
                        BasicNackOptions {
                            multiple,
                            requeue: true,
                        },
                    )
                    .await
            }
            Settle::Reject => {
                channel
                    .basic_reject(tag, BasicRejectOptions { requeue: false })
                    .await
            }
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Settle::Ack => "acknowledge",
            Settle::Release => "requeue",
            Settle::Reject => "reject",
        }
    }
}

#[async_trait]
impl QueueSource for RabbitMqSource {
    fn source_arn(&self) -> &str {
        &self.source_arn
    }

    fn redelivery(&self) -> Redelivery {
        Redelivery::InPlace
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, ReadError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        let Ok(mut rx) = tokio::time::timeout_at(deadline, self.deliveries.lock()).await else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        while out.len() < max {
            let next = if out.is_empty() {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(next)) => next,
                    Ok(None) => {
                        return Err(ReadError::Other(format!(
                            "the consumer of {} stopped",
                            self.queue_key
                        )));
                    }
                    Err(_) => break,
                }
            } else {
                match rx.try_recv() {
                    Ok(next) => next,
                    Err(_) => break,
                }
            };
            // Buffered before its connection died: the broker has requeued it already.
            if next.generation == lock(&self.link).generation {
                out.push(next.delivery);
            }
        }
        if out.is_empty() {
            let link = lock(&self.link);
            if link.channel.is_none() {
                let why = link.last_error.as_deref().unwrap_or("connecting");
                return Err(ReadError::Other(format!(
                    "not connected to {}: {why}",
                    self.source_arn
                )));
            }
        }
        Ok(out)
    }

    async fn ack(&self, deliveries: &[&Delivery]) -> Result<(), ReadError> {
        self.settle(deliveries, Settle::Ack).await
    }

    async fn release(&self, deliveries: &[&Delivery]) -> Result<(), ReadError> {
        self.settle(deliveries, Settle::Release).await
    }

    async fn reject(&self, deliveries: &[&Delivery]) -> Result<(), ReadError> {
        self.settle(deliveries, Settle::Reject).await
    }

    fn envelope(&self, records: &[&Record]) -> serde_json::Value {
        envelope(&self.source_arn, &self.queue_key, records)
    }

    fn batch_info_key(&self) -> &'static str {
        "RabbitMQBatchInfo"
    }
}

/// An ARN-like name for a broker outside AWS, in Amazon MQ's shape.
pub fn broker_arn(host: &str, vhost: &str) -> String {
    format!("arn:aws:mq:us-east-1:000000000000:broker:{host}:{vhost}")
}

fn parse_handle(handle: &str) -> Result<(u64, u64), ReadError> {
    handle
        .split_once(':')
        .and_then(|(g, t)| Some((g.parse().ok()?, t.parse().ok()?)))
        .ok_or_else(|| ReadError::Other(format!("not a RabbitMQ delivery handle: {handle:?}")))
}

fn lock(link: &Mutex<Link>) -> MutexGuard<'_, Link> {
    link.lock().unwrap_or_else(|p| p.into_inner())
}

fn classify(target: &Target, e: &lapin::Error) -> ReadError {
    let text = format!(
        "cannot consume {} at {}: {e}",
        target.queue_key, target.source_arn
    );
    match e.kind() {
        ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)) =>
        {
            ReadError::NotFound(text)
        }
        _ => ReadError::Other(text),
    }
}

struct Opened {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
}

async fn open(target: &Target) -> lapin::Result<Opened> {
    let properties = ConnectionProperties::default()
        .with_connection_name(target.connection_name.as_str().into());
    let connection = Connection::connect(&target.uri, properties).await?;
    let consume = async {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(target.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                target.queue.as_str().into(),
                // The server names the consumer.
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((channel, consumer))
    };
    match consume.await {
        Ok((channel, consumer)) => Ok(Opened {
            connection,
            channel,
            consumer,
        }),
        Err(e) => {
            let _ = connection.close(200, "cannot consume".into()).await;
            Err(e)
        }
    }
}

enum Ended {
    Stopped,
    Lost(String),
}

/// Owns the connection: consumes until it breaks, then connects again, until stopped.
async fn run(
    target: Target,
    first: Opened,
    link: Arc<Mutex<Link>>,
    tx: mpsc::Sender<Received>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    let mut next = Some(first);
    loop {
        let opened = match next.take() {
            Some(opened) => opened,
            None => {
                let attempt = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = open(&target) => r,
                };
                match attempt {
                    Ok(opened) => opened,
                    Err(e) => {
                        warn!(queue = %target.queue_key, error = %e, retry_in = ?backoff.delay(), "cannot reconnect to RabbitMQ");
                        lock(&link).last_error = Some(e.to_string());
                        if backoff.wait(&stop).await {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        let Opened {
            connection,
            channel,
            consumer,
        } = opened;
        let generation = {
            let mut l = lock(&link);
            l.generation += 1;
            l.channel = Some(channel.clone());
            l.unsettled.clear();
            l.last_error = None;
            l.generation
        };
        info!(queue = %target.queue_key, generation, "consuming");
        let since = Instant::now();
        let ended = consume(&target, consumer, generation, &link, &tx, &stop).await;
        {
            let mut l = lock(&link);
            l.channel = None;
            l.unsettled.clear();
            if let Ended::Lost(why) = &ended {
                l.last_error = Some(why.clone());
            }
        }
        let _ = connection.close(200, "closing".into()).await;
        match ended {
            Ended::Stopped => return,
            Ended::Lost(why) => {
                warn!(queue = %target.queue_key, generation, error = %why, "lost the RabbitMQ connection; reconnecting");
            }
        }
        if since.elapsed() >= HEALTHY {
            backoff.reset();
        }
        if backoff.wait(&stop).await {
            return;
        }
    }
}

async fn consume(
    target: &Target,
    mut consumer: Consumer,
    generation: u64,
    link: &Mutex<Link>,
    tx: &mpsc::Sender<Received>,
    stop: &CancellationToken,
) -> Ended {
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return Ended::Stopped,
            next = consumer.next() => next,
        };
        let d = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Ended::Lost(e.to_string()),
            None => return Ended::Lost("the broker cancelled the consumer".to_string()),
        };
        let message = Message {
            generation,
            delivery_tag: d.delivery_tag,
            routing_key: d.routing_key.as_str(),
            redelivered: d.redelivered,
            properties: &d.properties,
            data: &d.data,
        };
        let delivery = Delivery {
            record: message.record(chrono::Utc::now().timestamp_millis(), target.filter_views),
            handle: message.handle(),
            receive_count: message.receive_count(),
            group: None,
        };
        // Registered before anyone can see it, in tag order: `settle` relies on both.
        lock(link).unsettled.insert(d.delivery_tag);
        let sent = tokio::select! {
            _ = stop.cancelled() => return Ended::Stopped,
            sent = tx.send(Received { generation, delivery }) => sent,
        };
        if sent.is_err() {
            return Ended::Stopped;
        }
        debug!(queue = %target.queue_key, generation, tag = d.delivery_tag, "delivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_reject_garbage() {
        assert_eq!(parse_handle("3:17").expect("handle"), (3, 17));
        assert!(parse_handle("17").is_err());
        assert!(parse_handle("a:1").is_err());
    }

    #[test]
    fn the_arn_names_host_and_vhost() {
        let uri: AMQPUri = "amqp://guest:secret@mq.internal:5672/%2f"
            .parse()
            .expect("uri");
        assert_eq!(
            broker_arn(&uri.authority.host, &uri.vhost),
            "arn:aws:mq:us-east-1:000000000000:broker:mq.internal:/"
        );
    }
}
