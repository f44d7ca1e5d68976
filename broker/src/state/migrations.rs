//! Versioned schema migrations for the state store, so that upgrading Sluice keeps every
//! checkpoint, queued event, version and alias a store already holds.
//!
//! The migrations are SQL files under `broker/migrations/{sqlite,postgres}/`, embedded in the
//! binary and applied with sqlx's migrator, which records each applied version with a checksum
//! in `_sqlx_migrations`. Around it, three rules sqlx leaves to its user:
//! - All pending migrations run in one transaction, so a migration that fails leaves the store
//!   exactly as it was, at its previous version (SQLite and PostgreSQL both have
//!   transactional DDL).
//! - On PostgreSQL, several instances may start at once on a fresh database: the migrations run
//!   under a session advisory lock taken *outside* that transaction, on a connection of their
//!   own, so the lock is held until the commit and dies with the connection if anything fails.
//!   (sqlx's own lock is released before an enclosing transaction commits, which would let a
//!   waiting instance run the same DDL again.)
//! - A store newer than the binary is refused with both versions named, instead of sqlx's
//!   "previously applied but missing" error.

use std::borrow::Cow;

use futures::future::BoxFuture;
use sqlx::Connection;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

use super::StateError;

/// One migration, written for each back end (their SQL differs in types and upserts).
struct Step {
    version: i64,
    description: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

macro_rules! step {
    ($version:literal, $description:literal, $file:literal) => {
        Step {
            version: $version,
            description: $description,
            sqlite: include_str!(concat!("../../migrations/sqlite/", $file)),
            postgres: include_str!(concat!("../../migrations/postgres/", $file)),
        }
    };
}

/// Every migration, oldest first. Never edit one that has shipped: its checksum is recorded
/// in users' stores. Add a new one instead.
const STEPS: &[Step] = &[
    step!(1, "initial schema", "0001_initial.sql"),
    step!(2, "schedule ticks", "0002_schedule_ticks.sql"),
    step!(3, "function policies", "0003_function_policies.sql"),
    step!(4, "audit events", "0004_audit_events.sql"),
];

/// The session advisory lock that serialises migrations on one PostgreSQL database
/// (advisory locks are scoped to the database, so other databases on the server are free).
const PG_MIGRATION_LOCK: i64 = 0x736c_7569_6365_0001;

/// The table that marks a store made before versioned migrations existed.
const FIRST_RELEASE_TABLE: &str = "async_events";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// The schema version this binary brings its stores to.
pub fn latest_version() -> i64 {
    STEPS.last().map_or(0, |s| s.version)
}

/// A migration this binary knows: its version and what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationInfo {
    pub version: i64,
    pub description: &'static str,
}

/// Where a store's schema stands against this binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// The versions recorded as applied in the store, oldest first.
    pub applied: Vec<i64>,
    /// The store has the first release's tables but no record of migrations: it was made
    /// before versioned migrations and is adopted as version 1.
    pub unversioned: bool,
    /// The newest version this binary knows.
    pub latest: i64,
}

impl SchemaStatus {
    /// The store's version: the newest applied migration, 0 for an empty store.
    pub fn version(&self) -> i64 {
        self.applied.last().copied().unwrap_or(0)
    }

    /// What this binary would apply, oldest first.
    pub fn pending(&self) -> Vec<MigrationInfo> {
        STEPS
            .iter()
            .filter(|s| !self.applied.contains(&s.version))
            .map(|s| MigrationInfo {
                version: s.version,
                description: s.description,
            })
            .collect()
    }

    /// Refuses a store that a newer Sluice has migrated: its data may be in shapes this binary
    /// would misread.
    pub fn check_not_newer(&self) -> Result<(), StateError> {
        let unknown = self
            .applied
            .iter()
            .copied()
            .filter(|v| !STEPS.iter().any(|s| s.version == *v))
            .max();
        match unknown {
            Some(store) => Err(StateError::TooNew {
                store,
                binary: self.latest,
            }),
            None => Ok(()),
        }
    }

    /// Refuses to go on with pending migrations (for `sluice run --no-migrate`).
    pub fn check_current(&self) -> Result<(), StateError> {
        let pending = self.pending();
        if pending.is_empty() {
            return Ok(());
        }
        Err(StateError::Outdated {
            store: self.version(),
            binary: self.latest,
            pending: describe(&pending),
        })
    }
}

/// `2 (schedule ticks), 3 (…)`.
pub fn describe(migrations: &[MigrationInfo]) -> String {
    migrations
        .iter()
        .map(|m| format!("{} ({})", m.version, m.description))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The embedded migrations, as sqlx's migrator takes them.
#[derive(Debug)]
struct Embedded(Vec<Migration>);

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move { Ok(self.0) })
    }
}

fn migrations(backend: Backend) -> Vec<Migration> {
    STEPS
        .iter()
        .map(|s| {
            let sql = match backend {
                Backend::Sqlite => s.sqlite,
                Backend::Postgres => s.postgres,
            };
            Migration::new(
                s.version,
                Cow::Borrowed(s.description),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect()
}

async fn migrator(extra: Vec<Migration>, backend: Backend) -> Result<Migrator, StateError> {
    let mut all = migrations(backend);
    all.extend(extra);
    let mut migrator = Migrator::new(Embedded(all))
        .await
        .map_err(StateError::Migrate)?;
    // The caller holds the lock (PostgreSQL) or the store's instance lock (SQLite).
    migrator.set_locking(false);
    Ok(migrator)
}

macro_rules! status_of {
    ($conn:expr, $exists:literal, $latest:expr) => {{
        let versioned = sqlx::query_scalar::<_, i64>($exists)
            .bind("_sqlx_migrations")
            .fetch_one(&mut *$conn)
            .await?
            > 0;
        let applied: Vec<i64> = if versioned {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(&mut *$conn)
                .await?
        } else {
            Vec::new()
        };
        let unversioned = !versioned
            && sqlx::query_scalar::<_, i64>($exists)
                .bind(FIRST_RELEASE_TABLE)
                .fetch_one(&mut *$conn)
                .await?
                > 0;
        Ok::<_, StateError>(SchemaStatus {
            applied,
            unversioned,
            latest: $latest,
        })
    }};
}

pub(crate) async fn sqlite_status(
    conn: &mut sqlx::SqliteConnection,
) -> Result<SchemaStatus, StateError> {
    status_of!(
        conn,
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
        latest_version()
    )
}

pub(crate) async fn postgres_status(
    conn: &mut sqlx::PgConnection,
) -> Result<SchemaStatus, StateError> {
    status_of!(
        conn,
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = $1",
        latest_version()
    )
}

/// Applies what is pending, all or nothing, and returns what it applied. `extra` migrations
/// follow the embedded ones (tests use it to inject a failure).
pub(crate) async fn apply_sqlite(
    conn: &mut sqlx::SqliteConnection,
    extra: Vec<Migration>,
) -> Result<Vec<MigrationInfo>, StateError> {
    let before = sqlite_status(conn).await?;
    before.check_not_newer()?;
    let pending = pending_with(&before, &extra);
    if pending.is_empty() {
        return Ok(pending);
    }
    announce(&before, &pending);
    let migrator = migrator(extra, Backend::Sqlite).await?;
    let mut tx = conn.begin().await?;
    let outcome = migrator.run(&mut *tx).await;
    finish(tx, outcome, &before, &pending).await
}

/// As [`apply_sqlite`], under PostgreSQL's advisory lock. `conn` must be a connection of its
/// own: closing it is what releases the lock when anything fails.
pub(crate) async fn apply_postgres(
    conn: &mut sqlx::PgConnection,
    extra: Vec<Migration>,
) -> Result<Vec<MigrationInfo>, StateError> {
    let quick = postgres_status(conn).await?;
    quick.check_not_newer()?;
    if pending_with(&quick, &extra).is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(PG_MIGRATION_LOCK)
        .execute(&mut *conn)
        .await?;
    // Another instance may have migrated while this one waited: look again under the lock.
    let before = postgres_status(conn).await?;
    before.check_not_newer()?;
    let pending = pending_with(&before, &extra);
    if !pending.is_empty() {
        announce(&before, &pending);
        let migrator = migrator(extra, Backend::Postgres).await?;
        let mut tx = conn.begin().await?;
        let outcome = migrator.run(&mut *tx).await;
        finish(tx, outcome, &before, &pending).await?;
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(PG_MIGRATION_LOCK)
        .execute(&mut *conn)
        .await?;
    Ok(pending)
}

fn pending_with(status: &SchemaStatus, extra: &[Migration]) -> Vec<MigrationInfo> {
    let mut pending = status.pending();
    pending.extend(
        extra
            .iter()
            .filter(|m| !status.applied.contains(&m.version))
            .map(|m| MigrationInfo {
                version: m.version,
                description: "injected",
            }),
    );
    pending
}

fn announce(before: &SchemaStatus, pending: &[MigrationInfo]) {
    if before.unversioned {
        tracing::info!(
            "the state store was made before versioned migrations: adopting it as schema version 1"
        );
    }
    tracing::info!(
        from = before.version(),
        "migrating the state store: {}",
        describe(pending)
    );
}

async fn finish<DB: sqlx::Database>(
    tx: sqlx::Transaction<'_, DB>,
    outcome: Result<(), sqlx::migrate::MigrateError>,
    before: &SchemaStatus,
    pending: &[MigrationInfo],
) -> Result<Vec<MigrationInfo>, StateError> {
    match outcome {
        Ok(()) => {
            tx.commit().await?;
            Ok(pending.to_vec())
        }
        Err(source) => {
            // Dropping the transaction would roll back too; saying so keeps the order plain.
            let _ = tx.rollback().await;
            let failed = match &source {
                sqlx::migrate::MigrateError::ExecuteMigration(_, v) => Some(*v),
                _ => None,
            };
            let failed = failed
                .and_then(|v| pending.iter().find(|m| m.version == v))
                .map_or_else(
                    || "a migration".to_string(),
                    |m| describe(std::slice::from_ref(m)),
                );
            Err(StateError::MigrationFailed {
                failed,
                left_at: before.version(),
                source,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_from_one() {
        for (i, s) in STEPS.iter().enumerate() {
            assert_eq!(s.version, i as i64 + 1, "{}", s.description);
        }
    }

    #[test]
    fn a_store_with_an_unknown_version_is_newer() {
        let status = SchemaStatus {
            applied: vec![1, 2, latest_version() + 1],
            unversioned: false,
            latest: latest_version(),
        };
        let e = status.check_not_newer().expect_err("newer");
        assert!(e.to_string().contains(&format!(
            "schema is at version {}, newer than this Sluice",
            latest_version() + 1
        )));
    }

    #[test]
    fn an_empty_store_has_everything_pending() {
        let status = SchemaStatus {
            applied: vec![],
            unversioned: false,
            latest: latest_version(),
        };
        assert_eq!(status.version(), 0);
        assert_eq!(status.pending().len(), STEPS.len());
        assert!(status.check_current().is_err());
    }
}
