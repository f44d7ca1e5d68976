//! The DynamoDB Streams source against moto_server: a table's changes as Lambda delivers them,
//! in order, from every start position, and recovery from a refused iterator.

mod common;

use std::time::Duration;

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ScalarAttributeType, StreamSpecification, StreamViewType,
};
use common::{REGION, moto, positions, read_records, read_to_tip, unique};
use serde_json::{Value, json};
use sluice_connectors::dynamodb_streams::DynamoDbStreamsSource;
use sluice_connectors::record::Record;
use sluice_connectors::stream::{ReadError, ShardReader, StartAt, StreamSource};

const WAIT: Duration = Duration::from_secs(10);

async fn new_table(stream: Option<StreamViewType>) -> (aws_sdk_dynamodb::Client, String) {
    let client = aws_sdk_dynamodb::Client::new(&common::sdk().await);
    let name = unique("sluice-table");
    let mut request = client
        .create_table()
        .table_name(&name)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("attribute definition"),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(KeyType::Hash)
                .build()
                .expect("key schema"),
        )
        .billing_mode(BillingMode::PayPerRequest);
    if let Some(view) = stream {
        request = request.stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(view)
                .build()
                .expect("stream specification"),
        );
    }
    request.send().await.expect("create the table");
    (client, name)
}

async fn put_item(client: &aws_sdk_dynamodb::Client, table: &str, id: &str, total: u32) {
    client
        .put_item()
        .table_name(table)
        .item("id", AttributeValue::S(id.into()))
        .item("total", AttributeValue::N(total.to_string()))
        .send()
        .await
        .expect("put an item");
}

async fn source(table: &str) -> DynamoDbStreamsSource {
    DynamoDbStreamsSource::connect(table, Some(&moto()), Some(REGION))
        .await
        .expect("connect to the table's stream")
}

async fn only_shard(source: &DynamoDbStreamsSource) -> String {
    let shards = source.shards().await.expect("describe the stream");
    assert!(!shards.is_empty(), "a stream with no shard");
    assert!(
        shards.iter().all(|s| s.ending_sequence.is_none()),
        "{shards:?}"
    );
    shards[0].id.clone()
}

fn names(records: &[Record]) -> Vec<&str> {
    records
        .iter()
        .map(|r| r.lambda["eventName"].as_str().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn reads_insert_modify_remove_in_order_with_old_and_new_images() {
    let (client, table) = new_table(Some(StreamViewType::NewAndOldImages)).await;
    let source = source(&table).await;
    assert_eq!(source.batch_info_key(), "DDBStreamBatchInfo");
    let shard = only_shard(&source).await;
    let mut reader = source
        .open(&shard, StartAt::TrimHorizon)
        .await
        .expect("open the shard");

    put_item(&client, &table, "o-1", 12).await;
    client
        .update_item()
        .table_name(&table)
        .key("id", AttributeValue::S("o-1".into()))
        .update_expression("SET #t = :t")
        .expression_attribute_names("#t", "total")
        .expression_attribute_values(":t", AttributeValue::N("15".into()))
        .return_values(ReturnValue::None)
        .send()
        .await
        .expect("update the item");
    client
        .delete_item()
        .table_name(&table)
        .key("id", AttributeValue::S("o-1".into()))
        .send()
        .await
        .expect("delete the item");

    let (got, _) = read_records(reader.as_mut(), 3, WAIT).await;
    assert_eq!(names(&got), ["INSERT", "MODIFY", "REMOVE"]);
    let seqs = positions(&got);
    assert!(
        seqs.windows(2)
            .all(|w| sluice_connectors::stream::sequence_cmp(w[0], w[1]).is_lt()),
        "{seqs:?}"
    );

    let (insert, modify, remove) = (
        &got[0].lambda["dynamodb"],
        &got[1].lambda["dynamodb"],
        &got[2].lambda["dynamodb"],
    );
    let item = |total: &str| json!({ "id": { "S": "o-1" }, "total": { "N": total } });
    assert_eq!(insert["NewImage"], item("12"));
    assert_eq!(insert.get("OldImage"), None);
    assert_eq!(modify["OldImage"], item("12"));
    assert_eq!(modify["NewImage"], item("15"));
    assert_eq!(remove["OldImage"], item("15"));
    assert_eq!(remove.get("NewImage"), None);
    for record in &got {
        let change = &record.lambda["dynamodb"];
        assert_eq!(change["Keys"], json!({ "id": { "S": "o-1" } }));
        assert_eq!(change["StreamViewType"], "NEW_AND_OLD_IMAGES");
        assert_eq!(change["SequenceNumber"], Value::from(record.id.clone()));
        assert!(change["ApproximateCreationDateTime"].is_number());
        assert_eq!(record.lambda["eventSource"], "aws:dynamodb");
        assert_eq!(record.lambda["eventVersion"], "1.1");
        assert_eq!(record.lambda["eventSourceARN"], source.stream_arn());
        assert_eq!(record.key, r#"{"S":"o-1"}"#);
        assert_eq!(record.filter_view, record.lambda);
        let parsed: EventRecord =
            serde_json::from_value(record.lambda.clone()).expect("an aws:dynamodb record");
        assert_eq!(
            parsed.change.sequence_number.as_deref(),
            Some(record.id.as_str())
        );
        let age = chrono::Utc::now().timestamp_millis() - record.arrival_ms;
        assert!((0..60_000).contains(&age), "created {age} ms ago");
    }
    let records: Vec<_> = got.iter().collect();
    let event: Event = serde_json::from_value(source.envelope(&records)).expect("a DynamoDB event");
    assert_eq!(event.records.len(), 3);
}

#[tokio::test]
async fn connects_by_stream_arn_or_table_name() {
    let (client, table) = new_table(Some(StreamViewType::KeysOnly)).await;
    let described = client
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .expect("describe the table");
    let arn = described
        .table()
        .and_then(|t| t.latest_stream_arn())
        .expect("the table's stream");
    let by_table = source(&table).await;
    assert_eq!(by_table.stream_arn(), arn);
    // The region comes from the ARN when none is given.
    let by_arn = DynamoDbStreamsSource::connect(arn, Some(&moto()), None)
        .await
        .expect("connect by ARN");
    assert_eq!((by_arn.stream_arn(), by_arn.region()), (arn, REGION));
}

#[tokio::test]
async fn a_table_without_a_stream_or_a_missing_table_is_not_found() {
    let (_client, table) = new_table(None).await;
    let Err(err) = DynamoDbStreamsSource::connect(&table, Some(&moto()), Some(REGION)).await else {
        panic!("connected to a table without a stream")
    };
    assert!(
        matches!(err, ReadError::NotFound(_)) && !err.is_retriable(),
        "{err:?}"
    );
    let Err(err) =
        DynamoDbStreamsSource::connect(&unique("sluice-missing"), Some(&moto()), Some(REGION))
            .await
    else {
        panic!("connected to a table that does not exist")
    };
    assert!(matches!(err, ReadError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn latest_and_after_a_sequence_number_skip_what_came_before() {
    let (client, table) = new_table(Some(StreamViewType::NewImage)).await;
    put_item(&client, &table, "a", 1).await;
    let source = source(&table).await;
    let shard = only_shard(&source).await;
    let mut latest = source
        .open(&shard, StartAt::Latest)
        .await
        .expect("open at LATEST");
    put_item(&client, &table, "b", 2).await;
    let (got, _) = read_records(latest.as_mut(), 1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].lambda["dynamodb"]["Keys"],
        json!({ "id": { "S": "b" } })
    );

    let mut all = source
        .open(&shard, StartAt::TrimHorizon)
        .await
        .expect("open at TRIM_HORIZON");
    let everything = read_to_tip(all.as_mut()).await;
    assert_eq!(everything.len(), 2);
    let mut after = source
        .open(
            &shard,
            StartAt::AfterSequence(everything[0].position.clone()),
        )
        .await
        .expect("open after a checkpoint");
    let (got, _) = read_records(after.as_mut(), 2, Duration::from_secs(2)).await;
    assert_eq!(positions(&got), [everything[1].position.as_str()]);
}

#[tokio::test]
async fn at_timestamp_is_emulated_from_the_trim_horizon() {
    let (client, table) = new_table(Some(StreamViewType::NewImage)).await;
    put_item(&client, &table, "old", 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let at = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(100)).await;
    put_item(&client, &table, "new", 2).await;
    let source = source(&table).await;
    let shard = only_shard(&source).await;
    let mut reader = source
        .open(&shard, StartAt::AtTimestamp(at))
        .await
        .expect("open at a time");
    let (got, _) = read_records(reader.as_mut(), 2, Duration::from_secs(2)).await;
    let keys: Vec<_> = got
        .iter()
        .map(|r| r.lambda["dynamodb"]["Keys"]["id"]["S"].clone())
        .collect();
    assert_eq!(keys, ["new"]);
}

#[tokio::test]
async fn recovers_from_a_refused_iterator_without_loss_or_duplicates() {
    let (client, table) = new_table(Some(StreamViewType::NewImage)).await;
    for (n, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
        put_item(&client, &table, id, n as u32).await;
    }
    let source = source(&table).await.with_read_limit(1);
    let shard = only_shard(&source).await;
    let mut reader = source
        .open_shard(&shard, StartAt::TrimHorizon)
        .await
        .expect("open the shard");
    let id = |records: &[Record]| -> Vec<Value> {
        records
            .iter()
            .map(|r| r.lambda["dynamodb"]["Keys"]["id"]["S"].clone())
            .collect()
    };
    let first = reader.next().await.expect("read").records;
    assert_eq!(id(&first), ["a"]);
    // moto keeps its iterators in a table and answers an unknown one with an HTTP 500 page.
    reader.replace_iterator("not-an-iterator");
    let second = reader.next().await.expect("read after the refusal").records;
    assert_eq!(id(&second), ["b"]);
    let rest = read_to_tip(&mut reader).await;
    assert_eq!(id(&rest), ["c", "d"]);
}
