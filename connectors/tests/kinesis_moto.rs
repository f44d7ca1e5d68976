//! The Kinesis source against moto_server: listing, every start position, order within a shard,
//! resharding during a read, and recovery from a refused iterator.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_sdk_kinesis::primitives::Blob;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::{REGION, moto, positions, read_records, read_to_tip, unique};
use serde_json::json;
use sluice_connectors::kinesis::KinesisSource;
use sluice_connectors::record::Record;
use sluice_connectors::stream::{ReadError, StartAt, StreamSource, sequence_cmp};

const WAIT: Duration = Duration::from_secs(10);

async fn new_stream(shards: i32) -> (aws_sdk_kinesis::Client, String) {
    let client = aws_sdk_kinesis::Client::new(&common::sdk().await);
    let name = unique("sluice-kinesis");
    client
        .create_stream()
        .stream_name(&name)
        .shard_count(shards)
        .send()
        .await
        .expect("create the stream");
    (client, name)
}

/// Puts one record and answers its shard and sequence number.
async fn put(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    key: &str,
    data: &[u8],
) -> (String, String) {
    let out = client
        .put_record()
        .stream_name(stream)
        .partition_key(key)
        .data(Blob::new(data))
        .send()
        .await
        .expect("put a record");
    (
        out.shard_id().to_string(),
        out.sequence_number().to_string(),
    )
}

async fn source(stream: &str) -> KinesisSource {
    KinesisSource::connect(stream, Some(&moto()), Some(REGION))
        .await
        .expect("connect to the stream")
}

fn data(record: &Record) -> String {
    let encoded = record.lambda["kinesis"]["data"]
        .as_str()
        .expect("data is base64 text");
    String::from_utf8(B64.decode(encoded).expect("base64")).expect("utf-8")
}

fn datas(records: &[Record]) -> Vec<String> {
    records.iter().map(data).collect()
}

#[tokio::test]
async fn lists_every_shard_of_a_stream_named_by_name_or_arn() {
    let (_client, name) = new_stream(3).await;
    let by_name = source(&name).await;
    assert!(
        by_name.stream_arn().ends_with(&format!(":stream/{name}")),
        "{}",
        by_name.stream_arn()
    );
    // The region comes from the ARN when none is given.
    let by_arn = KinesisSource::connect(by_name.stream_arn(), Some(&moto()), None)
        .await
        .expect("connect by ARN");
    assert_eq!(by_arn.stream_arn(), by_name.stream_arn());
    assert_eq!(by_arn.region(), REGION);
    assert_eq!(by_name.batch_info_key(), "KinesisBatchInfo");

    let shards = by_name.shards().await.expect("list shards");
    let ids: Vec<_> = shards.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "shardId-000000000000",
            "shardId-000000000001",
            "shardId-000000000002"
        ]
    );
    assert!(
        shards.iter().all(|s| s.parent.is_none()
            && s.adjacent_parent.is_none()
            && s.ending_sequence.is_none())
    );
}

#[tokio::test]
async fn a_missing_stream_or_shard_is_not_found() {
    let missing =
        KinesisSource::connect(&unique("sluice-missing"), Some(&moto()), Some(REGION)).await;
    let Err(err) = missing else {
        panic!("connected to a stream that does not exist")
    };
    assert!(
        matches!(err, ReadError::NotFound(_)) && !err.is_retriable(),
        "{err:?}"
    );

    let (_client, name) = new_stream(1).await;
    let source = source(&name).await;
    let Err(err) = source
        .open("shardId-000000000042", StartAt::TrimHorizon)
        .await
    else {
        panic!("opened a shard that does not exist")
    };
    assert!(matches!(err, ReadError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn reads_each_shard_from_the_trim_horizon_in_put_order() {
    let (client, name) = new_stream(2).await;
    let mut put_order: BTreeMap<String, Vec<(String, i32)>> = BTreeMap::new();
    for n in 0..40 {
        let body = json!({ "n": n }).to_string();
        let (shard, seq) = put(
            &client,
            &name,
            &format!("customer-{}", n % 7),
            body.as_bytes(),
        )
        .await;
        put_order.entry(shard).or_default().push((seq, n));
    }
    let source = source(&name).await;
    let shards = source.shards().await.expect("list shards");
    assert_eq!(shards.len(), 2);
    let mut delivered = 0;
    for shard in &shards {
        let expected = put_order.get(&shard.id).cloned().unwrap_or_default();
        let mut reader = source
            .open(&shard.id, StartAt::TrimHorizon)
            .await
            .expect("open the shard");
        let (got, _) =
            read_records(reader.as_mut(), expected.len() + 1, Duration::from_secs(2)).await;
        let want: Vec<_> = expected.iter().map(|(seq, _)| seq.as_str()).collect();
        assert_eq!(positions(&got), want, "{}", shard.id);
        for (record, (seq, n)) in got.iter().zip(&expected) {
            let body = json!({ "n": n }).to_string();
            assert_eq!(record.id, *seq);
            assert_eq!(record.key, format!("customer-{}", n % 7));
            assert_eq!(record.size, body.len());
            assert_eq!(data(record), body);
            assert_eq!(record.filter_view["data"], json!({ "n": n }));
            assert_eq!(record.lambda["eventID"], format!("{}:{seq}", shard.id));
            assert_eq!(record.lambda["eventSourceARN"], source.stream_arn());
            assert_eq!(record.lambda["awsRegion"], REGION);
            let age = chrono::Utc::now().timestamp_millis() - record.arrival_ms;
            assert!(
                (0..60_000).contains(&age),
                "arrival {} is {age} ms old",
                record.arrival_ms
            );
        }
        if let [first, second, ..] = got.as_slice() {
            let event: KinesisEvent =
                serde_json::from_value(source.envelope(&[first, second])).expect("a Kinesis event");
            assert_eq!(event.records.len(), 2);
            assert_eq!(event.records[0].kinesis.sequence_number, first.id);
        }
        delivered += got.len();
    }
    assert_eq!(delivered, 40);
}

#[tokio::test]
async fn latest_reads_only_what_follows_the_open() {
    let (client, name) = new_stream(1).await;
    put(&client, &name, "k", b"before").await;
    let source = source(&name).await;
    let mut reader = source
        .open("shardId-000000000000", StartAt::Latest)
        .await
        .expect("open at LATEST");
    put(&client, &name, "k", b"after-1").await;
    put(&client, &name, "k", b"after-2").await;
    let (got, _) = read_records(reader.as_mut(), 2, WAIT).await;
    assert_eq!(datas(&got), ["after-1", "after-2"]);
}

#[tokio::test]
async fn at_timestamp_starts_at_the_first_record_at_or_after_it() {
    let (client, name) = new_stream(1).await;
    put(&client, &name, "k", b"old").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let at = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(100)).await;
    put(&client, &name, "k", b"new-1").await;
    put(&client, &name, "k", b"new-2").await;
    let source = source(&name).await;

    let mut reader = source
        .open("shardId-000000000000", StartAt::AtTimestamp(at))
        .await
        .expect("open at a time");
    let (got, _) = read_records(reader.as_mut(), 3, Duration::from_secs(2)).await;
    assert_eq!(datas(&got), ["new-1", "new-2"]);

    let mut earlier = source
        .open("shardId-000000000000", StartAt::AtTimestamp(at - 60_000))
        .await
        .expect("open at an earlier time");
    let (got, _) = read_records(earlier.as_mut(), 3, WAIT).await;
    assert_eq!(datas(&got), ["old", "new-1", "new-2"]);
}

#[tokio::test]
async fn after_a_sequence_number_resumes_after_the_checkpoint() {
    let (client, name) = new_stream(1).await;
    let mut seqs = Vec::new();
    for n in 0..5 {
        seqs.push(put(&client, &name, "k", format!("r{n}").as_bytes()).await.1);
    }
    let source = source(&name).await;
    let mut reader = source
        .open(
            "shardId-000000000000",
            StartAt::AfterSequence(seqs[1].clone()),
        )
        .await
        .expect("open after a checkpoint");
    let (got, _) = read_records(reader.as_mut(), 4, Duration::from_secs(2)).await;
    assert_eq!(positions(&got), seqs[2..]);
    assert_eq!(datas(&got), ["r2", "r3", "r4"]);
}

#[tokio::test]
async fn a_split_during_a_read_ends_the_parent_after_its_last_record_and_links_two_children() {
    let (client, name) = new_stream(1).await;
    let parent = "shardId-000000000000";
    let mut seqs = Vec::new();
    for n in 0..4 {
        seqs.push(
            put(
                &client,
                &name,
                &format!("key-{n}"),
                format!("r{n}").as_bytes(),
            )
            .await
            .1,
        );
    }
    let source = source(&name).await.with_read_limit(2);
    let mut reader = source
        .open(parent, StartAt::TrimHorizon)
        .await
        .expect("open the parent");
    let first = reader.next().await.expect("read the parent");
    assert_eq!(positions(&first.records), seqs[..2]);
    assert!(!first.end_of_shard);

    client
        .split_shard()
        .stream_name(&name)
        .shard_to_split(parent)
        // The middle of the hash key range, 2^127.
        .new_starting_hash_key("170141183460469231731687303715884105728")
        .send()
        .await
        .expect("split the shard");
    // No record is put after the split: moto routes it to the closed parent all the same.

    let (rest, last) = read_records(reader.as_mut(), usize::MAX, Duration::from_secs(15)).await;
    assert!(last.end_of_shard, "the closed parent never ended");
    assert_eq!(
        positions(&rest),
        seqs[2..],
        "the parent's records after the split, then its end"
    );
    let again = reader.next().await.expect("read past the end");
    assert!(again.end_of_shard && again.records.is_empty());

    let shards = source.shards().await.expect("list shards");
    let closed = shards
        .iter()
        .find(|s| s.id == parent)
        .expect("the parent is still listed");
    let ending = closed
        .ending_sequence
        .as_deref()
        .expect("the parent is closed");
    assert!(
        sequence_cmp(&seqs[3], ending).is_le(),
        "last record {} after the end {ending}",
        seqs[3]
    );
    let children: Vec<_> = shards.iter().filter(|s| s.id != parent).collect();
    assert_eq!(children.len(), 2);
    for child in children {
        assert_eq!(child.parent.as_deref(), Some(parent));
        assert_eq!(child.ending_sequence, None);
        let mut reader = source
            .open(&child.id, StartAt::TrimHorizon)
            .await
            .expect("open a child");
        let read = reader.next().await.expect("read a child");
        assert!(!read.end_of_shard, "an open child ended");
    }
}

#[tokio::test]
async fn recovers_from_a_refused_iterator_without_loss_or_duplicates() {
    let (client, name) = new_stream(1).await;
    let mut seqs = Vec::new();
    for n in 0..6 {
        seqs.push(put(&client, &name, "k", format!("r{n}").as_bytes()).await.1);
    }
    let source = source(&name).await.with_read_limit(2);
    let mut reader = source
        .open_shard("shardId-000000000000", StartAt::TrimHorizon)
        .await
        .expect("open the shard");
    let first = reader_next(&mut reader).await;
    assert_eq!(positions(&first), seqs[..2]);
    // moto answers an iterator it cannot decode with an HTTP 500 page.
    reader.replace_iterator("bm90LWFuLWl0ZXJhdG9y");
    let second = reader_next(&mut reader).await;
    assert_eq!(positions(&second), seqs[2..4]);
    let rest = read_to_tip(&mut reader).await;
    assert_eq!(positions(&rest), seqs[4..]);
}

async fn reader_next(reader: &mut dyn sluice_connectors::stream::ShardReader) -> Vec<Record> {
    reader.next().await.expect("read the shard").records
}
