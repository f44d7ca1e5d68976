//! What the tests against moto_server share: where it is, SDK clients for it, unique names, and
//! reading a shard until something is there.

#![allow(dead_code)]

use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use sluice_connectors::record::Record;
use sluice_connectors::stream::{ShardRead, ShardReader};

pub const REGION: &str = "us-east-1";

/// The moto_server the tests share (`scripts/test` starts one and sets SLUICE_TEST_MOTO).
pub fn moto() -> String {
    std::env::var("SLUICE_TEST_MOTO").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_MOTO is not set: these tests need a moto_server. Run them with scripts/test, \
             which starts one, or start `moto_server -H 127.0.0.1 -p PORT` yourself and set \
             SLUICE_TEST_MOTO=http://127.0.0.1:PORT (with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             set to anything)"
        )
    })
}

/// An SDK configuration for moto, for the tests' own setup calls.
pub async fn sdk() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(moto())
        .region(Region::new(REGION))
        .load()
        .await
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Reads until `want` records came back or `within` passed, and returns what came, with the
/// last read (to look at `end_of_shard` or `millis_behind`).
pub async fn read_records(
    reader: &mut dyn ShardReader,
    want: usize,
    within: Duration,
) -> (Vec<Record>, ShardRead) {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    loop {
        let mut read = reader.next().await.expect("read the shard");
        got.append(&mut read.records);
        if got.len() >= want || read.end_of_shard || tokio::time::Instant::now() >= deadline {
            return (got, read);
        }
    }
}

/// Reads until the shard answers an empty read, and returns everything before it.
pub async fn read_to_tip(reader: &mut dyn ShardReader) -> Vec<Record> {
    let mut got = Vec::new();
    loop {
        let mut read = reader.next().await.expect("read the shard");
        if read.records.is_empty() {
            return got;
        }
        got.append(&mut read.records);
    }
}

pub fn positions(records: &[Record]) -> Vec<&str> {
    records.iter().map(|r| r.position.as_str()).collect()
}
