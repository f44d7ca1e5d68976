//! Upgrades of real stores: the first release's SQLite file (made by that release's code,
//! under `broker/tests/fixtures/`) is migrated in place and keeps every row; stores from the
//! future are refused; a migration that fails leaves the store as it was; several instances
//! migrate one fresh PostgreSQL database at once. The first release's PostgreSQL dump is
//! upgraded end to end in `integration-tests/tests/state_upgrade.rs`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use sqlx::Connection;
use sqlx::migrate::{Migration, MigrationType};

use super::migrations::{self, latest_version};
use super::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A copy of the first release's SQLite store, in a directory of its own.
fn first_release_sqlite() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("state.db");
    std::fs::copy(fixture("state-v0.sqlite"), &path).expect("copy the fixture");
    (dir, path)
}

/// A migration that creates a table and then fails, as a broken upgrade would.
fn failing_migration() -> Migration {
    Migration::new(
        latest_version() + 1,
        Cow::Borrowed("fails halfway"),
        MigrationType::Simple,
        Cow::Borrowed("CREATE TABLE half_done (x BIGINT); INSERT INTO no_such_table VALUES (1);"),
        false,
    )
}

/// What the fixtures hold, read through the store as Sluice reads it.
async fn assert_first_release_rows(store: &dyn StateStore) {
    let versions = store.versions("greet").await.expect("versions");
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.version, v.description.as_str()))
            .collect::<Vec<_>>(),
        [(1, "first"), (2, "second")]
    );
    assert!(versions[0].snapshot.contains("greet_v1"));
    let aliases = store.aliases("greet").await.expect("aliases");
    assert_eq!(
        aliases
            .iter()
            .map(|a| (a.name.as_str(), a.version.as_str(), a.revision_id.as_str()))
            .collect::<Vec<_>>(),
        [("beta", "2", "rev-beta"), ("live", "1", "rev-live")]
    );
    assert_eq!(store.concurrency("greet").await.expect("c"), Some(Some(7)));
    assert_eq!(store.queued().await.expect("queued"), 3);
    let due = store.due("greet", 1, 10).await.expect("due");
    assert_eq!(
        due.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["fixture-event-1", "fixture-event-2", "fixture-event-3"]
    );
    assert_eq!(due[1].attempts.len(), 1);
    assert_eq!(due[2].qualifier.as_deref(), Some("live"));
    assert_eq!(due[0].payload, br#"{"n":1}"#);
    assert_eq!(
        store
            .checkpoint("orders", "shardId-000000000000")
            .await
            .expect("checkpoint"),
        Some(Checkpoint {
            sequence: Some("3".into()),
            finished: false
        })
    );
    assert_eq!(
        store
            .checkpoint("retired", "shardId-000000000007")
            .await
            .expect("checkpoint"),
        Some(Checkpoint {
            sequence: Some("42".into()),
            finished: true
        })
    );
}

#[tokio::test]
async fn upgrades_a_first_release_sqlite_store_in_place_keeping_every_row() {
    let (_dir, path) = first_release_sqlite();
    let before = status(&format!("sqlite://{}", path.display()), Path::new("."))
        .await
        .expect("status");
    assert!(
        before.unversioned && before.applied.is_empty(),
        "{before:?}"
    );
    let (store, applied) = SqliteStore::open_with(&path, OpenOptions::INSTANCE)
        .await
        .expect("upgrade");
    assert_eq!(
        applied.iter().map(|m| m.version).collect::<Vec<_>>(),
        (1..=latest_version()).collect::<Vec<_>>()
    );
    assert_first_release_rows(&store).await;
    // The new table is there and works.
    store
        .put_schedule_tick("nightly", 1234)
        .await
        .expect("tick");
    assert_eq!(
        store.schedule_tick("nightly").await.expect("tick"),
        Some(1234)
    );
    // Function policies (0003): a compare-and-swap on the revision id.
    assert!(
        store
            .swap_function_policy("f", None, Some(("{}", "r1")))
            .await
            .expect("add")
    );
    assert!(
        !store
            .swap_function_policy("f", None, Some(("{}", "r2")))
            .await
            .expect("stale")
    );
    assert!(
        store
            .swap_function_policy("f", Some("r1"), Some(("{\"a\":1}", "r2")))
            .await
            .expect("swap")
    );
    assert_eq!(
        store.function_policy("f").await.expect("read"),
        Some(("{\"a\":1}".to_owned(), "r2".to_owned()))
    );
    assert!(
        !store
            .swap_function_policy("f", Some("r1"), None)
            .await
            .expect("stale remove")
    );
    assert!(
        store
            .swap_function_policy("f", Some("r2"), None)
            .await
            .expect("remove")
    );
    assert_eq!(store.function_policy("f").await.expect("read"), None);
    drop(store);
    // Opening again applies nothing.
    let (_, again) = SqliteStore::open_with(&path, OpenOptions::INSTANCE)
        .await
        .expect("reopen");
    assert!(again.is_empty(), "{again:?}");
}

#[tokio::test]
async fn no_migrate_refuses_an_outdated_store_and_leaves_it_alone() {
    let (_dir, path) = first_release_sqlite();
    let e = SqliteStore::open_with(&path, OpenOptions::NO_MIGRATE)
        .await
        .err()
        .expect("an outdated store is refused");
    let message = e.to_string();
    assert!(
        message.contains(&format!(
            "schema is at version 0 and this Sluice needs version {}",
            latest_version()
        )) && message.contains("sluice state migrate"),
        "{message}"
    );
    let after = status(&format!("sqlite://{}", path.display()), Path::new("."))
        .await
        .expect("status");
    assert!(after.applied.is_empty() && after.unversioned, "{after:?}");
}

#[tokio::test]
async fn a_store_stamped_with_a_future_version_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("state.db");
    drop(SqliteStore::open(&path).await.expect("create"));
    let future = latest_version() + 5;
    {
        let mut conn = sqlx::SqliteConnection::connect_with(&sqlite_options(&path).expect("o"))
            .await
            .expect("connect");
        sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES ($1, 'from the future', TRUE, x'00', 0)")
            .bind(future)
            .execute(&mut conn)
            .await
            .expect("stamp");
        conn.close().await.expect("close");
    }
    for options in [OpenOptions::INSTANCE, OpenOptions::NO_MIGRATE] {
        let message = SqliteStore::open_with(&path, options)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(
            message.contains(&format!("schema is at version {future}, newer than this Sluice understands (up to version {})", latest_version())),
            "{message}"
        );
    }
}

#[tokio::test]
async fn a_migration_failing_halfway_leaves_the_previous_schema_and_rows_intact() {
    let (_dir, path) = first_release_sqlite();
    let options = sqlite_options(&path).expect("options");
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("connect");
    let e = migrations::apply_sqlite(&mut conn, vec![failing_migration()])
        .await
        .expect_err("the injected migration fails");
    let message = e.to_string();
    assert!(
        message.contains(&format!(
            "migration {} (injected) failed, and the store was left unchanged at schema version 0",
            latest_version() + 1
        )) && message.contains("no_such_table"),
        "{message}"
    );
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .expect("tables");
    assert_eq!(
        tables,
        [
            "aliases",
            "async_events",
            "checkpoints",
            "function_concurrency",
            "versions"
        ],
        "the first release's tables and nothing else"
    );
    conn.close().await.expect("close");
    // Nothing was lost, and a good upgrade still works afterwards.
    let (store, applied) = SqliteStore::open_with(&path, OpenOptions::INSTANCE)
        .await
        .expect("upgrade");
    assert_eq!(applied.len(), latest_version() as usize);
    assert_first_release_rows(&store).await;
}

#[tokio::test]
async fn one_process_shares_its_claim_on_a_sqlite_file_and_releases_it_with_the_last_handle() {
    // Another process is refused: broker/tests/state_cli.rs runs a second `sluice run`.
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("state.db");
    let lock = dir.path().join("state.db.lock");
    let first = SqliteStore::open(&path).await.expect("first");
    let again = SqliteStore::open(&path)
        .await
        .expect("the same process may reopen");
    assert_eq!(
        std::fs::read_to_string(&lock).expect("lock file"),
        std::process::id().to_string()
    );
    let other = std::fs::File::open(&lock).expect("open the lock file");
    assert!(other.try_lock().is_err(), "held while a handle lives");
    drop(first);
    assert!(other.try_lock().is_err(), "held while a handle lives");
    drop(again);
    other.try_lock().expect("released with the last handle");
}

/// A new database on the test PostgreSQL server; dropped by [`drop_database`].
async fn postgres_database() -> String {
    let admin_url = std::env::var("SLUICE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let db = format!("sluice_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("PostgreSQL at SLUICE_TEST_POSTGRES (run scripts/test)");
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    let _ = admin.close().await;
    match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => panic!("no database in {admin_url}"),
    }
}

async fn drop_database(url: &str) {
    let admin_url = std::env::var("SLUICE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    if let (Some((_, db)), Ok(mut admin)) = (
        url.rsplit_once('/'),
        sqlx::PgConnection::connect(&admin_url).await,
    ) {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
}

#[tokio::test]
async fn eight_instances_starting_at_once_on_a_fresh_postgres_database_all_come_up() {
    let url = postgres_database().await;
    let opened = futures::future::join_all(
        (0..8).map(|_| PostgresStore::open_with(&url, OpenOptions::INSTANCE)),
    )
    .await;
    let mut applied_by = 0;
    for result in opened {
        let (store, applied) = result.expect("every instance comes up");
        if !applied.is_empty() {
            applied_by += 1;
            assert_eq!(applied.len(), latest_version() as usize);
        }
        store.queued().await.expect("usable");
    }
    assert_eq!(applied_by, 1, "one instance migrates, the others wait");
    let after = status(&url, Path::new(".")).await.expect("status");
    assert_eq!(after.applied, (1..=latest_version()).collect::<Vec<_>>());
    drop_database(&url).await;
}

#[tokio::test]
async fn a_failing_postgres_migration_leaves_the_previous_schema_and_releases_the_lock() {
    let url = postgres_database().await;
    let (store, _) = PostgresStore::open_with(&url, OpenOptions::INSTANCE)
        .await
        .expect("create");
    store.apply(&[], &[]).await.expect("usable");
    store
        .put_checkpoint(
            "m",
            "s",
            &Checkpoint {
                sequence: Some("9".into()),
                finished: false,
            },
        )
        .await
        .expect("a row to keep");
    drop(store);
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let message = migrations::apply_postgres(&mut conn, vec![failing_migration()])
        .await
        .expect_err("the injected migration fails")
        .to_string();
    // The lock is still held by this connection; closing it is what frees it.
    let _ = conn.close().await;
    assert!(
        message.contains(&format!(
            "left unchanged at schema version {}",
            latest_version()
        )) && message.contains("no_such_table"),
        "{message}"
    );
    let after = status(&url, Path::new(".")).await.expect("status");
    assert_eq!(after.applied, (1..=latest_version()).collect::<Vec<_>>());
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let half_done: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'half_done'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("tables");
    let _ = conn.close().await;
    assert_eq!(
        half_done, 0,
        "the failed migration's first statement was rolled back"
    );
    // The lock died with the failed connection: the next start is not blocked.
    let store = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        PostgresStore::open(&url),
    )
    .await
    .expect("not blocked by a stale lock")
    .expect("reopen");
    assert_eq!(
        store.checkpoint("m", "s").await.expect("checkpoint"),
        Some(Checkpoint {
            sequence: Some("9".into()),
            finished: false
        })
    );
    drop(store);
    drop_database(&url).await;
}

#[tokio::test]
async fn a_postgres_store_from_the_future_is_refused() {
    let url = postgres_database().await;
    drop(PostgresStore::open(&url).await.expect("create"));
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES ($1, 'from the future', TRUE, '\\x00', 0)")
        .bind(latest_version() + 1)
        .execute(&mut conn)
        .await
        .expect("stamp");
    let _ = conn.close().await;
    let message = PostgresStore::open(&url)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        message.contains(&format!(
            "version {}, newer than this Sluice understands (up to version {})",
            latest_version() + 1,
            latest_version()
        )),
        "{message}"
    );
    drop_database(&url).await;
}
