//! The state store: the durable async-invocation queue, published versions, aliases,
//! concurrency settings, checkpoints and schedule ticks, behind one trait. SQLite (a file) is
//! the embedded default; PostgreSQL is shared by several instances.
//!
//! Opening a store brings its schema up to date through versioned migrations
//! ([`migrations`]), unless the caller asks it not to. A SQLite store serves one Sluice
//! process at a time: a second one is refused by a lock file beside the database, since two
//! processes would both claim its async events and checkpoints.

#[cfg(test)]
mod migration_tests;
pub mod migrations;

use std::fs::TryLockError;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use thiserror::Error;

pub use migrations::{MigrationInfo, SchemaStatus};

#[derive(Debug, Error)]
pub enum StateError {
    #[error("unsupported state store `{0}`: use sqlite://PATH or postgres://…")]
    Unsupported(String),
    #[error("state store: {0}")]
    Db(#[from] sqlx::Error),
    #[error("state store: corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("cannot create the state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock the state store with {path}: {source}")]
    LockFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the state store {path} is in use by another Sluice process{holder}: a SQLite store serves one instance at a time; to run several instances, give them a shared PostgreSQL store (`state: postgres://…`)"
    )]
    InUse { path: PathBuf, holder: String },
    #[error("there is no state store at {0}")]
    Missing(PathBuf),
    #[error(
        "the state store's schema is at version {store}, newer than this Sluice understands (up to version {binary}): run the Sluice release that upgraded it, or a newer one"
    )]
    TooNew { store: i64, binary: i64 },
    #[error(
        "the state store's schema is at version {store} and this Sluice needs version {binary} (pending: {pending}): run `sluice state migrate`, or start without --no-migrate"
    )]
    Outdated {
        store: i64,
        binary: i64,
        pending: String,
    },
    #[error(
        "state store migration {failed} failed, and the store was left unchanged at schema version {left_at}: {source}"
    )]
    MigrationFailed {
        failed: String,
        left_at: i64,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("state store migrations: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// One try of an asynchronous event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    /// RFC 3339.
    pub time: String,
    pub executed_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    pub duration_ms: f64,
}

/// An accepted asynchronous event, waiting for its (next) try.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedEvent {
    /// The request id handed to the caller; it stays the same across retries, as in Lambda.
    pub id: String,
    pub function: String,
    pub qualifier: Option<String>,
    pub payload: Vec<u8>,
    pub trace_id: String,
    pub received_at_ms: i64,
    pub next_attempt_ms: i64,
    pub attempts: Vec<AttemptRecord>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VersionRecord {
    pub function: String,
    pub version: u32,
    /// The configuration snapshot, as the broker serialized it.
    pub snapshot: String,
    pub code_sha256: String,
    pub description: String,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AliasRecord {
    pub function: String,
    pub name: String,
    pub version: String,
    /// `{version: weight}`, at most one entry.
    pub weights: Vec<(String, f64)>,
    pub description: String,
    pub revision_id: String,
}

/// How far a mapping got in one shard or partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last position whose record, and every one before it, has a final outcome.
    pub sequence: Option<String>,
    /// The shard is closed and fully processed; its children may start.
    pub finished: bool,
}

#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    async fn checkpoint(&self, source: &str, shard: &str)
    -> Result<Option<Checkpoint>, StateError>;
    async fn put_checkpoint(
        &self,
        source: &str,
        shard: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), StateError>;

    /// Durably records new events and forgets finished ones, in one transaction: on disk
    /// when this returns.
    async fn apply(&self, inserts: &[QueuedEvent], removes: &[String]) -> Result<(), StateError>;
    /// Events of `function` due at `now_ms`, oldest first.
    async fn due(
        &self,
        function: &str,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<QueuedEvent>, StateError>;
    /// When the next event of `function` due strictly after `after_ms` falls due.
    async fn next_due(&self, function: &str, after_ms: i64) -> Result<Option<i64>, StateError>;
    async fn reschedule(
        &self,
        id: &str,
        attempts: &[AttemptRecord],
        next_attempt_ms: i64,
    ) -> Result<(), StateError>;
    async fn queued(&self) -> Result<u64, StateError>;
    /// Queued events per function name, for the functions that have any.
    async fn queued_by_function(&self) -> Result<Vec<(String, u64)>, StateError>;

    /// Records a new version with the next number and returns it.
    async fn publish_version(
        &self,
        function: &str,
        snapshot: &str,
        code_sha256: &str,
        description: &str,
    ) -> Result<VersionRecord, StateError>;
    async fn versions(&self, function: &str) -> Result<Vec<VersionRecord>, StateError>;
    async fn put_alias(&self, alias: &AliasRecord) -> Result<(), StateError>;
    async fn delete_alias(&self, function: &str, name: &str) -> Result<bool, StateError>;
    async fn aliases(&self, function: &str) -> Result<Vec<AliasRecord>, StateError>;
    /// Reserved concurrency set through the API (`None`: removed), which overrides the file.
    async fn put_concurrency(
        &self,
        function: &str,
        reserved: Option<u32>,
    ) -> Result<(), StateError>;
    /// `None` when the API never set it; `Some(None)` when it was removed through the API.
    async fn concurrency(&self, function: &str) -> Result<Option<Option<u32>>, StateError>;

    /// When the schedule `source` last fired (ms since the epoch), if it ever did.
    async fn schedule_tick(&self, source: &str) -> Result<Option<i64>, StateError>;
    async fn put_schedule_tick(&self, source: &str, tick_ms: i64) -> Result<(), StateError>;

    /// The resource-based policy of `function` (`f` or `f:qualifier`): its JSON document and
    /// revision id, if it has one.
    async fn function_policy(&self, function: &str)
    -> Result<Option<(String, String)>, StateError>;
    /// Replaces the policy of `function` if its revision is still `expected` (`None`: it has
    /// none yet) with `new` (document, revision id), or removes it when `new` is `None`.
    /// `false` when another change came first, so that concurrent AddPermission calls never
    /// lose a statement.
    async fn swap_function_policy(
        &self,
        function: &str,
        expected: Option<&str>,
        new: Option<(&str, &str)>,
    ) -> Result<bool, StateError>;
    /// Records audit events, all or none.
    async fn put_audit_events(&self, events: &[AuditRecord]) -> Result<(), StateError>;
    /// Forgets audit events older than `before_ms`; returns how many.
    async fn purge_audit_events(&self, before_ms: i64) -> Result<u64, StateError>;
}

/// One audit event as the store keeps it: the event's JSON with the fields it is looked up by.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub event_id: String,
    pub event_time_ms: i64,
    pub event_name: String,
    /// The principal's name; `None` for anonymous callers and Sluice's own events.
    pub principal: Option<String>,
    /// The CloudTrail-style JSON event.
    pub event: String,
}

/// Which audit events `sluice audit` lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditQuery {
    pub since_ms: Option<i64>,
    pub principal: Option<String>,
    pub event_name: Option<String>,
    /// The newest `limit` matching events are returned, oldest first.
    pub limit: u32,
}

/// The newest events of `query`, oldest first. `$1`: since, `$2`: principal, `$3`: name,
/// `$4`: limit; a NULL filter matches everything.
const AUDIT_QUERY_SQL: &str = "SELECT event_id, event_time_ms, event_name, principal, event FROM (
    SELECT * FROM audit_events
    WHERE event_time_ms >= $1 AND ($2 IS NULL OR principal = $2) AND ($3 IS NULL OR event_name = $3)
    ORDER BY event_time_ms DESC, event_id DESC LIMIT $4) AS newest
    ORDER BY event_time_ms, event_id";

macro_rules! audit_query {
    ($conn:expr, $query:expr) => {{
        let rows = sqlx::query(AUDIT_QUERY_SQL)
            .bind($query.since_ms.unwrap_or(i64::MIN))
            .bind(&$query.principal)
            .bind(&$query.event_name)
            .bind(i64::from($query.limit))
            .fetch_all(&mut $conn)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(AuditRecord {
                    event_id: row.try_get("event_id")?,
                    event_time_ms: row.try_get("event_time_ms")?,
                    event_name: row.try_get("event_name")?,
                    principal: row.try_get("principal")?,
                    event: row.try_get("event")?,
                })
            })
            .collect::<Result<Vec<_>, StateError>>()
    }};
}

/// The audit events `query` selects, read without claiming or changing the store (beside a
/// running Sluice, as `sluice state version` reads it).
pub async fn audit_events(
    url: &str,
    base_dir: &Path,
    query: &AuditQuery,
) -> Result<Vec<AuditRecord>, StateError> {
    match Location::parse(url, base_dir)? {
        Location::Sqlite(path) => {
            if !path.exists() {
                return Err(StateError::Missing(path));
            }
            let options = sqlite_options(&path)?.read_only(true);
            let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
            let events = audit_query!(conn, query);
            let _ = conn.close().await;
            events
        }
        Location::Postgres(url) => {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            let events = audit_query!(conn, query);
            let _ = conn.close().await;
            events
        }
    }
}

impl StateError {
    /// What went wrong, as the `kind` label of `sluice_state_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            StateError::Db(sqlx::Error::Database(e)) => match e.code().as_deref() {
                // SQLITE_FULL; PostgreSQL's disk_full.
                Some("13") | Some("53100") => "disk_full",
                // SQLITE_BUSY, SQLITE_LOCKED.
                Some("5") | Some("6") => "locked",
                _ => "other",
            },
            StateError::Db(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_),
            ) => "unavailable",
            _ => "other",
        }
    }
}

/// The store as the rest of Sluice uses it: every refused read or write is counted, and an
/// episode of failures (a full disk, a database that went away) is logged once when it starts
/// and once when the store works again, rather than once per caller.
struct Observed<S> {
    inner: S,
    failing: std::sync::atomic::AtomicBool,
}

impl<S> Observed<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            failing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn watch<T>(&self, outcome: Result<T, StateError>) -> Result<T, StateError> {
        use std::sync::atomic::Ordering::Relaxed;
        match &outcome {
            Ok(_) => {
                if self.failing.swap(false, Relaxed) {
                    metrics::gauge!(crate::metrics::STATE_FAILING).set(0.0);
                    tracing::info!("the state store works again");
                }
            }
            Err(e) => {
                metrics::counter!(crate::metrics::STATE_ERRORS, "kind" => e.kind()).increment(1);
                if !self.failing.swap(true, Relaxed) {
                    metrics::gauge!(crate::metrics::STATE_FAILING).set(1.0);
                    tracing::error!(error = %e, kind = e.kind(),
                        "the state store refuses reads or writes: callers get errors, nothing is acknowledged, until it works again");
                }
            }
        }
        outcome
    }
}

macro_rules! observed {
    ($($method:ident($($arg:ident: $ty:ty),*) -> $out:ty;)*) => {
        #[async_trait]
        impl<S: StateStore> StateStore for Observed<S> {
            $(
                async fn $method(&self, $($arg: $ty),*) -> Result<$out, StateError> {
                    self.watch(self.inner.$method($($arg),*).await)
                }
            )*
        }
    };
}

observed! {
    checkpoint(source: &str, shard: &str) -> Option<Checkpoint>;
    put_checkpoint(source: &str, shard: &str, checkpoint: &Checkpoint) -> ();
    apply(inserts: &[QueuedEvent], removes: &[String]) -> ();
    due(function: &str, now_ms: i64, limit: u32) -> Vec<QueuedEvent>;
    next_due(function: &str, after_ms: i64) -> Option<i64>;
    reschedule(id: &str, attempts: &[AttemptRecord], next_attempt_ms: i64) -> ();
    queued() -> u64;
    queued_by_function() -> Vec<(String, u64)>;
    publish_version(function: &str, snapshot: &str, code_sha256: &str, description: &str) -> VersionRecord;
    versions(function: &str) -> Vec<VersionRecord>;
    put_alias(alias: &AliasRecord) -> ();
    delete_alias(function: &str, name: &str) -> bool;
    aliases(function: &str) -> Vec<AliasRecord>;
    put_concurrency(function: &str, reserved: Option<u32>) -> ();
    concurrency(function: &str) -> Option<Option<u32>>;
    schedule_tick(source: &str) -> Option<i64>;
    put_schedule_tick(source: &str, tick_ms: i64) -> ();
    function_policy(function: &str) -> Option<(String, String)>;
    swap_function_policy(function: &str, expected: Option<&str>, new: Option<(&str, &str)>) -> bool;
    put_audit_events(events: &[AuditRecord]) -> ();
    purge_audit_events(before_ms: i64) -> u64;
}

/// Schedule ticks kept in the state store, for `type: schedule` sources.
pub struct ScheduleTicks(pub std::sync::Arc<dyn StateStore>);

#[async_trait]
impl sluice_connectors::schedule::TickStore for ScheduleTicks {
    async fn last_tick(
        &self,
        source: &str,
    ) -> Result<Option<i64>, sluice_connectors::schedule::TickStoreError> {
        Ok(self.0.schedule_tick(source).await?)
    }

    async fn record_tick(
        &self,
        source: &str,
        tick_ms: i64,
    ) -> Result<(), sluice_connectors::schedule::TickStoreError> {
        Ok(self.0.put_schedule_tick(source, tick_ms).await?)
    }
}

/// How long a read or write waits for a connection to the PostgreSQL store before it fails.
const STORE_UNREACHABLE_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// How a store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Apply pending migrations (otherwise a store that needs them is refused).
    pub migrate: bool,
    /// Claim the store for this process (SQLite: one Sluice process per file).
    pub exclusive: bool,
}

impl OpenOptions {
    /// A running Sluice: claims the store and brings its schema up to date.
    pub const INSTANCE: Self = Self {
        migrate: true,
        exclusive: true,
    };
    /// A running Sluice started with `--no-migrate`: refuses a store that needs migrations.
    pub const NO_MIGRATE: Self = Self {
        migrate: false,
        exclusive: true,
    };
    /// A reader beside a running Sluice (tools, tests): no claim, no schema change.
    pub const INSPECT: Self = Self {
        migrate: false,
        exclusive: false,
    };
}

/// Where `state:` points.
enum Location<'a> {
    Sqlite(PathBuf),
    Postgres(&'a str),
}

impl<'a> Location<'a> {
    /// `sqlite://PATH` (relative to `base_dir`) or `postgres://…`.
    fn parse(url: &'a str, base_dir: &Path) -> Result<Self, StateError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            Ok(Location::Sqlite(if Path::new(path).is_absolute() {
                PathBuf::from(path)
            } else {
                base_dir.join(path)
            }))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Location::Postgres(url))
        } else {
            Err(StateError::Unsupported(url.to_string()))
        }
    }
}

/// Opens the store named by `state:` as a running Sluice does ([`OpenOptions::INSTANCE`]).
pub async fn open(url: &str, base_dir: &Path) -> Result<Box<dyn StateStore>, StateError> {
    open_with(url, base_dir, OpenOptions::INSTANCE).await
}

pub async fn open_with(
    url: &str,
    base_dir: &Path,
    options: OpenOptions,
) -> Result<Box<dyn StateStore>, StateError> {
    Ok(match Location::parse(url, base_dir)? {
        Location::Sqlite(path) => Box::new(Observed::new(
            SqliteStore::open_with(&path, options).await?.0,
        )),
        Location::Postgres(url) => Box::new(Observed::new(
            PostgresStore::open_with(url, options).await?.0,
        )),
    })
}

/// Where the store's schema stands, without changing or claiming anything (a store that does
/// not exist yet is at version 0).
pub async fn status(url: &str, base_dir: &Path) -> Result<SchemaStatus, StateError> {
    match Location::parse(url, base_dir)? {
        Location::Sqlite(path) => {
            if !path.exists() {
                return Ok(SchemaStatus {
                    applied: Vec::new(),
                    unversioned: false,
                    latest: migrations::latest_version(),
                });
            }
            let options = sqlite_options(&path)?.read_only(true);
            let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
            let status = migrations::sqlite_status(&mut conn).await;
            let _ = conn.close().await;
            status
        }
        Location::Postgres(url) => {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            let status = migrations::postgres_status(&mut conn).await;
            let _ = conn.close().await;
            status
        }
    }
}

/// Claims the store and applies its pending migrations (`sluice state migrate`); returns what
/// was applied.
pub async fn migrate(url: &str, base_dir: &Path) -> Result<Vec<MigrationInfo>, StateError> {
    Ok(match Location::parse(url, base_dir)? {
        Location::Sqlite(path) => {
            SqliteStore::open_with(&path, OpenOptions::INSTANCE)
                .await?
                .1
        }
        Location::Postgres(url) => {
            PostgresStore::open_with(url, OpenOptions::INSTANCE)
                .await?
                .1
        }
    })
}

pub struct SqliteStore {
    pool: SqlitePool,
    /// Held for as long as the store is open; the OS releases it if the process dies.
    _lock: Option<InstanceLock>,
}

fn sqlite_options(path: &Path) -> Result<SqliteConnectOptions, StateError> {
    Ok(SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: an accepted event survives a power cut, not only a crash of Sluice.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(std::time::Duration::from_secs(10)))
}

impl SqliteStore {
    /// Opens the store at `path` as a running Sluice does ([`OpenOptions::INSTANCE`]).
    pub async fn open(path: &Path) -> Result<Self, StateError> {
        Ok(Self::open_with(path, OpenOptions::INSTANCE).await?.0)
    }

    /// Opens the store, returning the migrations it applied.
    pub async fn open_with(
        path: &Path,
        options: OpenOptions,
    ) -> Result<(Self, Vec<MigrationInfo>), StateError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StateError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let lock = if options.exclusive {
            Some(InstanceLock::acquire(path)?)
        } else {
            None
        };
        if !options.migrate && !path.exists() {
            return Err(StateError::Missing(path.to_path_buf()));
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(sqlite_options(path)?.create_if_missing(options.migrate))
            .await?;
        let mut conn = pool.acquire().await?;
        let applied = if options.migrate {
            migrations::apply_sqlite(&mut conn, Vec::new()).await?
        } else {
            let status = migrations::sqlite_status(&mut conn).await?;
            status.check_not_newer()?;
            status.check_current()?;
            Vec::new()
        };
        drop(conn);
        Ok((Self { pool, _lock: lock }, applied))
    }
}

/// A claim on a SQLite store for this process: an exclusive `flock` on `<database>.lock`,
/// which names the holder's pid inside. Another process is refused; within this process the
/// claim is shared, so that an embedding program (or a test) may stop and start Sluice on the
/// same file while the old handle is still being dropped.
#[derive(Clone)]
struct InstanceLock {
    _file: std::sync::Arc<std::fs::File>,
}

/// The claims this process holds, by lock-file path.
static HELD: std::sync::Mutex<Vec<(PathBuf, std::sync::Weak<std::fs::File>)>> =
    std::sync::Mutex::new(Vec::new());

impl InstanceLock {
    fn acquire(db: &Path) -> Result<Self, StateError> {
        let mut lock_path = db.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|(_, file)| file.strong_count() > 0);
        if let Some(file) = held
            .iter()
            .find(|(path, _)| *path == lock_path)
            .and_then(|(_, file)| file.upgrade())
        {
            return Ok(Self { _file: file });
        }
        let lock_error = |source| StateError::LockFile {
            path: lock_path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(lock_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let holder = match pid.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {pid})"),
                };
                return Err(StateError::InUse {
                    path: db.to_path_buf(),
                    holder,
                });
            }
            Err(TryLockError::Error(source)) => return Err(lock_error(source)),
        }
        file.set_len(0).map_err(lock_error)?;
        file.rewind().map_err(lock_error)?;
        write!(file, "{}", std::process::id()).map_err(lock_error)?;
        let file = std::sync::Arc::new(file);
        held.push((lock_path, std::sync::Arc::downgrade(&file)));
        Ok(Self { _file: file })
    }
}

/// The shared store, for several Sluice instances (and the choice of ops who run PostgreSQL).
pub struct PostgresStore {
    pool: sqlx::PgPool,
}

impl PostgresStore {
    /// Opens the store at `url` as a running Sluice does ([`OpenOptions::INSTANCE`]).
    pub async fn open(url: &str) -> Result<Self, StateError> {
        Ok(Self::open_with(url, OpenOptions::INSTANCE).await?.0)
    }

    /// Opens the store, returning the migrations it applied. Several instances are expected
    /// to share it, so `exclusive` claims nothing here.
    pub async fn open_with(
        url: &str,
        options: OpenOptions,
    ) -> Result<(Self, Vec<MigrationInfo>), StateError> {
        // Migrations run on a connection of their own, outside the pool: closing it releases
        // the migration lock whatever happened.
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let applied = if options.migrate {
            migrations::apply_postgres(&mut conn, Vec::new()).await
        } else {
            migrations::postgres_status(&mut conn)
                .await
                .and_then(|status| {
                    status.check_not_newer()?;
                    status.check_current()
                })
                .map(|()| Vec::new())
        };
        let _ = conn.close().await;
        let applied = applied?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            // While the server is down, a caller hears so within seconds (an async invoke
            // gets its 500 and the SDK retries) instead of waiting out sqlx's default 30 s.
            .acquire_timeout(STORE_UNREACHABLE_AFTER)
            .connect(url)
            .await?;
        Ok((Self { pool }, applied))
    }
}

/// After an error inside a transaction, a connection may be out of step with its database:
/// after `SQLITE_FULL`, SQLite rolls the transaction back on its own while sqlx still counts it
/// open, so the connection's later "commits" only release savepoints of a transaction that
/// never ends — writes answered as done that never reach the disk, and a write lock that keeps
/// every other connection out. Such a connection is closed instead of going back to the pool.
fn discard_on_error<DB: sqlx::Database, T>(
    conn: &mut sqlx::pool::PoolConnection<DB>,
    outcome: &Result<T, StateError>,
) {
    if outcome.is_err() {
        conn.close_on_drop();
    }
}

/// The SQL is the same for SQLite and PostgreSQL (`$N` placeholders, `ON CONFLICT` upserts),
/// so one body serves both stores.
macro_rules! sql_store {
    ($store:ident, $row:ty) => {
        impl $store {
        fn event_from_row(row: &$row) -> Result<QueuedEvent, StateError> {
    let attempts: String = row.try_get("attempts")?;
    Ok(QueuedEvent {
        id: row.try_get("id")?,
        function: row.try_get("function")?,
        qualifier: row.try_get("qualifier")?,
        payload: row.try_get("payload")?,
        trace_id: row.try_get("trace_id")?,
        received_at_ms: row.try_get("received_at_ms")?,
        next_attempt_ms: row.try_get("next_attempt_ms")?,
        attempts: serde_json::from_str(&attempts)?,
    })
}

        fn version_from_row(row: &$row) -> Result<VersionRecord, StateError> {
    let version: i64 = row.try_get("version")?;
    Ok(VersionRecord {
        function: row.try_get("function")?,
        version: u32::try_from(version).unwrap_or(0),
        snapshot: row.try_get("snapshot")?,
        code_sha256: row.try_get("code_sha256")?,
        description: row.try_get("description")?,
        created_at: row.try_get("created_at")?,
    })
}

        }

        #[async_trait]
impl StateStore for $store {
    async fn checkpoint(&self, source: &str, shard: &str) -> Result<Option<Checkpoint>, StateError> {
        let row = sqlx::query("SELECT sequence, finished FROM checkpoints WHERE source = $1 AND shard = $2")
            .bind(source)
            .bind(shard)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            None => Ok(None),
            Some(row) => Ok(Some(Checkpoint {
                sequence: row.try_get("sequence")?,
                finished: row.try_get::<i64, _>("finished")? != 0,
            })),
        }
    }

    async fn put_checkpoint(&self, source: &str, shard: &str, c: &Checkpoint) -> Result<(), StateError> {
        sqlx::query("INSERT INTO checkpoints (source, shard, sequence, finished) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (source, shard) DO UPDATE SET sequence = excluded.sequence, finished = excluded.finished")
            .bind(source)
            .bind(shard)
            .bind(&c.sequence)
            .bind(i64::from(c.finished))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn apply(&self, inserts: &[QueuedEvent], removes: &[String]) -> Result<(), StateError> {
        let mut conn = self.pool.acquire().await?;
        let outcome = async {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            for id in removes {
                sqlx::query("DELETE FROM async_events WHERE id = $1").bind(id).execute(&mut *tx).await?;
            }
            for e in inserts {
                sqlx::query("INSERT INTO async_events (id, function, qualifier, payload, trace_id, received_at_ms, next_attempt_ms, attempts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
                    .bind(&e.id)
                    .bind(&e.function)
                    .bind(&e.qualifier)
                    .bind(&e.payload)
                    .bind(&e.trace_id)
                    .bind(e.received_at_ms)
                    .bind(e.next_attempt_ms)
                    .bind(serde_json::to_string(&e.attempts)?)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        }
        .await;
        discard_on_error(&mut conn, &outcome);
        outcome
    }

    async fn due(&self, function: &str, now_ms: i64, limit: u32) -> Result<Vec<QueuedEvent>, StateError> {
        let rows = sqlx::query("SELECT * FROM async_events WHERE function = $1 AND next_attempt_ms <= $2 ORDER BY next_attempt_ms, received_at_ms LIMIT $3")
            .bind(function)
            .bind(now_ms)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::event_from_row).collect()
    }

    async fn next_due(&self, function: &str, after_ms: i64) -> Result<Option<i64>, StateError> {
        let row = sqlx::query("SELECT MIN(next_attempt_ms) AS t FROM async_events WHERE function = $1 AND next_attempt_ms > $2")
            .bind(function)
            .bind(after_ms)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>("t")?)
    }

    async fn reschedule(&self, id: &str, attempts: &[AttemptRecord], next_attempt_ms: i64) -> Result<(), StateError> {
        sqlx::query("UPDATE async_events SET attempts = $1, next_attempt_ms = $2 WHERE id = $3")
            .bind(serde_json::to_string(attempts)?)
            .bind(next_attempt_ms)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn queued(&self) -> Result<u64, StateError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM async_events").fetch_one(&self.pool).await?;
        Ok(u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0))
    }

    async fn queued_by_function(&self) -> Result<Vec<(String, u64)>, StateError> {
        let rows = sqlx::query("SELECT function, COUNT(*) AS n FROM async_events GROUP BY function ORDER BY function")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("function")?, u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0))))
            .collect()
    }

    async fn publish_version(&self, function: &str, snapshot: &str, code_sha256: &str, description: &str) -> Result<VersionRecord, StateError> {
        let mut conn = self.pool.acquire().await?;
        let created_at = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3f+0000").to_string();
        let outcome = async {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            let row = sqlx::query("SELECT COALESCE(MAX(version), 0) + 1 AS v FROM versions WHERE function = $1")
                .bind(function)
                .fetch_one(&mut *tx)
                .await?;
            let version: i64 = row.try_get("v")?;
            sqlx::query("INSERT INTO versions (function, version, snapshot, code_sha256, description, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(function)
                .bind(version)
                .bind(snapshot)
                .bind(code_sha256)
                .bind(description)
                .bind(&created_at)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(version)
        }
        .await;
        discard_on_error(&mut conn, &outcome);
        let version = outcome?;
        Ok(VersionRecord {
            function: function.to_string(),
            version: u32::try_from(version).unwrap_or(0),
            snapshot: snapshot.to_string(),
            code_sha256: code_sha256.to_string(),
            description: description.to_string(),
            created_at,
        })
    }

    async fn versions(&self, function: &str) -> Result<Vec<VersionRecord>, StateError> {
        let rows = sqlx::query("SELECT * FROM versions WHERE function = $1 ORDER BY version")
            .bind(function)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::version_from_row).collect()
    }

    async fn put_alias(&self, a: &AliasRecord) -> Result<(), StateError> {
        let weights = serde_json::to_string(&a.weights)?;
        sqlx::query("INSERT INTO aliases (function, name, version, weights, description, revision_id) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (function, name) DO UPDATE SET version = excluded.version, weights = excluded.weights, description = excluded.description, revision_id = excluded.revision_id")
            .bind(&a.function)
            .bind(&a.name)
            .bind(&a.version)
            .bind(weights)
            .bind(&a.description)
            .bind(&a.revision_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_alias(&self, function: &str, name: &str) -> Result<bool, StateError> {
        let done = sqlx::query("DELETE FROM aliases WHERE function = $1 AND name = $2")
            .bind(function)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn aliases(&self, function: &str) -> Result<Vec<AliasRecord>, StateError> {
        let rows = sqlx::query("SELECT * FROM aliases WHERE function = $1 ORDER BY name")
            .bind(function)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let weights: String = row.try_get("weights")?;
                Ok(AliasRecord {
                    function: row.try_get("function")?,
                    name: row.try_get("name")?,
                    version: row.try_get("version")?,
                    weights: serde_json::from_str(&weights)?,
                    description: row.try_get("description")?,
                    revision_id: row.try_get("revision_id")?,
                })
            })
            .collect()
    }

    async fn put_concurrency(&self, function: &str, reserved: Option<u32>) -> Result<(), StateError> {
        sqlx::query("INSERT INTO function_concurrency (function, reserved) VALUES ($1, $2) ON CONFLICT (function) DO UPDATE SET reserved = excluded.reserved")
            .bind(function)
            .bind(reserved.map(i64::from))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn concurrency(&self, function: &str) -> Result<Option<Option<u32>>, StateError> {
        let row = sqlx::query("SELECT reserved FROM function_concurrency WHERE function = $1")
            .bind(function)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            None => Ok(None),
            Some(row) => Ok(Some(row.try_get::<Option<i64>, _>("reserved")?.and_then(|r| u32::try_from(r).ok()))),
        }
    }

    async fn schedule_tick(&self, source: &str) -> Result<Option<i64>, StateError> {
        Ok(sqlx::query_scalar("SELECT last_tick_ms FROM schedule_ticks WHERE source = $1")
            .bind(source)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn put_schedule_tick(&self, source: &str, tick_ms: i64) -> Result<(), StateError> {
        sqlx::query("INSERT INTO schedule_ticks (source, last_tick_ms) VALUES ($1, $2) ON CONFLICT (source) DO UPDATE SET last_tick_ms = excluded.last_tick_ms")
            .bind(source)
            .bind(tick_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn function_policy(&self, function: &str) -> Result<Option<(String, String)>, StateError> {
        let row = sqlx::query("SELECT policy, revision_id FROM function_policies WHERE function = $1")
            .bind(function)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            None => Ok(None),
            Some(row) => Ok(Some((row.try_get("policy")?, row.try_get("revision_id")?))),
        }
    }

    async fn swap_function_policy(&self, function: &str, expected: Option<&str>, new: Option<(&str, &str)>) -> Result<bool, StateError> {
        let done = match (expected, new) {
            (None, None) => return Ok(true),
            (None, Some((policy, revision))) => sqlx::query("INSERT INTO function_policies (function, policy, revision_id) VALUES ($1, $2, $3) ON CONFLICT (function) DO NOTHING")
                .bind(function)
                .bind(policy)
                .bind(revision)
                .execute(&self.pool)
                .await?,
            (Some(old), Some((policy, revision))) => sqlx::query("UPDATE function_policies SET policy = $1, revision_id = $2 WHERE function = $3 AND revision_id = $4")
                .bind(policy)
                .bind(revision)
                .bind(function)
                .bind(old)
                .execute(&self.pool)
                .await?,
            (Some(old), None) => sqlx::query("DELETE FROM function_policies WHERE function = $1 AND revision_id = $2")
                .bind(function)
                .bind(old)
                .execute(&self.pool)
                .await?,
        };
        Ok(done.rows_affected() == 1)
    }

    async fn put_audit_events(&self, events: &[AuditRecord]) -> Result<(), StateError> {
        let mut conn = self.pool.acquire().await?;
        let outcome = async {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            for e in events {
                // An event id is unique; one written again (a retried batch) is kept once.
                sqlx::query("INSERT INTO audit_events (event_id, event_time_ms, event_name, principal, event) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING")
                    .bind(&e.event_id)
                    .bind(e.event_time_ms)
                    .bind(&e.event_name)
                    .bind(&e.principal)
                    .bind(&e.event)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        }
        .await;
        discard_on_error(&mut conn, &outcome);
        outcome
    }

    async fn purge_audit_events(&self, before_ms: i64) -> Result<u64, StateError> {
        Ok(sqlx::query("DELETE FROM audit_events WHERE event_time_ms < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}

    };
}

sql_store!(SqliteStore, sqlx::sqlite::SqliteRow);
sql_store!(PostgresStore, sqlx::postgres::PgRow);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, function: &str, next: i64) -> QueuedEvent {
        QueuedEvent {
            id: id.into(),
            function: function.into(),
            qualifier: None,
            payload: b"{}".to_vec(),
            trace_id: "t".into(),
            received_at_ms: 1,
            next_attempt_ms: next,
            attempts: vec![],
        }
    }

    #[tokio::test]
    async fn queued_events_survive_reopening_and_fall_due_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s.db");
        {
            let store = SqliteStore::open(&path).await.expect("open");
            store
                .apply(
                    &[event("b", "f", 20), event("a", "f", 10), event("c", "g", 0)],
                    &[],
                )
                .await
                .expect("enqueue");
        }
        let store = SqliteStore::open(&path).await.expect("reopen");
        assert_eq!(store.queued().await.expect("count"), 3);
        let due: Vec<_> = store
            .due("f", 15, 10)
            .await
            .expect("due")
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(due, ["a"]);
        assert_eq!(store.next_due("f", 0).await.expect("next"), Some(10));
        assert_eq!(store.next_due("f", 10).await.expect("next"), Some(20));
        let attempt = AttemptRecord {
            time: "now".into(),
            executed_version: "$LATEST".into(),
            error_type: Some("E".into()),
            error_message: Some("m".into()),
            duration_ms: 1.0,
        };
        store
            .reschedule("a", std::slice::from_ref(&attempt), 30)
            .await
            .expect("reschedule");
        let due = store.due("f", 100, 10).await.expect("due");
        assert_eq!(
            due.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        assert_eq!(due[1].attempts, vec![attempt]);
        store.apply(&[], &["b".to_string()]).await.expect("remove");
        assert_eq!(store.queued().await.expect("count"), 2);
    }

    #[tokio::test]
    async fn checkpoints_are_per_source_and_shard() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(&dir.path().join("s.db"))
            .await
            .expect("open");
        assert_eq!(store.checkpoint("m", "s1").await.expect("none"), None);
        let c = Checkpoint {
            sequence: Some("42".into()),
            finished: false,
        };
        store.put_checkpoint("m", "s1", &c).await.expect("put");
        store
            .put_checkpoint(
                "other",
                "s1",
                &Checkpoint {
                    sequence: None,
                    finished: true,
                },
            )
            .await
            .expect("put");
        assert_eq!(store.checkpoint("m", "s1").await.expect("some"), Some(c));
        let done = Checkpoint {
            sequence: Some("99".into()),
            finished: true,
        };
        store
            .put_checkpoint("m", "s1", &done)
            .await
            .expect("update");
        assert_eq!(store.checkpoint("m", "s1").await.expect("some"), Some(done));
    }

    /// Publishes a version with an empty snapshot and returns its number.
    async fn published(store: &dyn StateStore, function: &str, description: &str) -> u32 {
        store
            .publish_version(function, "{}", "sha", description)
            .await
            .expect("publish")
            .version
    }

    #[tokio::test]
    async fn versions_number_up_per_function_and_aliases_upsert() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(&dir.path().join("s.db"))
            .await
            .expect("open");
        assert_eq!(published(&store, "f", "one").await, 1);
        assert_eq!(published(&store, "f", "two").await, 2);
        assert_eq!(published(&store, "g", "").await, 1);
        assert_eq!(store.versions("f").await.expect("list").len(), 2);
        let mut alias = AliasRecord {
            function: "f".into(),
            name: "live".into(),
            version: "1".into(),
            weights: vec![("2".into(), 0.25)],
            description: String::new(),
            revision_id: "r1".into(),
        };
        store.put_alias(&alias).await.expect("put");
        alias.version = "2".into();
        alias.weights.clear();
        store.put_alias(&alias).await.expect("update");
        assert_eq!(store.aliases("f").await.expect("aliases"), vec![alias]);
        assert!(store.delete_alias("f", "live").await.expect("delete"));
        assert!(!store.delete_alias("f", "live").await.expect("delete again"));
        assert_eq!(store.concurrency("f").await.expect("none"), None);
        store.put_concurrency("f", Some(5)).await.expect("put");
        assert_eq!(store.concurrency("f").await.expect("some"), Some(Some(5)));
        store.put_concurrency("f", None).await.expect("remove");
        assert_eq!(store.concurrency("f").await.expect("removed"), Some(None));
    }

    fn audit_record(id: &str, time_ms: i64, name: &str, principal: Option<&str>) -> AuditRecord {
        AuditRecord {
            event_id: id.into(),
            event_time_ms: time_ms,
            event_name: name.into(),
            principal: principal.map(Into::into),
            event: format!("{{\"eventID\":\"{id}\"}}"),
        }
    }

    /// Writes three events through `store`, reads them back as `sluice audit` does (a
    /// read-only connection to `url`), then purges the older two.
    async fn audit_events_are_filtered_and_purged(store: &dyn StateStore, url: &str) {
        let base = Path::new("/");
        let events = [
            audit_record("e1", 1_000, "PublishVersion", Some("alice")),
            audit_record("e2", 2_000, "UpdateAlias", None),
            audit_record("e3", 3_000, "PublishVersion", Some("bob")),
        ];
        store.put_audit_events(&events).await.expect("put");
        // A batch written again (a retry) is kept once.
        store
            .put_audit_events(&events[..1])
            .await
            .expect("put again");
        let ids = |q: AuditQuery| async move {
            audit_events(url, base, &q)
                .await
                .expect("query")
                .into_iter()
                .map(|e| e.event_id)
                .collect::<Vec<_>>()
        };
        let all = AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        };
        assert_eq!(ids(all.clone()).await, ["e1", "e2", "e3"]);
        let since = AuditQuery {
            since_ms: Some(1_500),
            ..all.clone()
        };
        assert_eq!(ids(since).await, ["e2", "e3"]);
        let alice = AuditQuery {
            principal: Some("alice".into()),
            ..all.clone()
        };
        assert_eq!(ids(alice).await, ["e1"]);
        let publishes = AuditQuery {
            event_name: Some("PublishVersion".into()),
            ..all.clone()
        };
        assert_eq!(ids(publishes).await, ["e1", "e3"]);
        let newest = AuditQuery {
            limit: 2,
            ..all.clone()
        };
        assert_eq!(ids(newest).await, ["e2", "e3"], "the newest, oldest first");
        assert_eq!(store.purge_audit_events(2_500).await.expect("purge"), 2);
        assert_eq!(ids(all).await, ["e3"]);
    }

    #[tokio::test]
    async fn sqlite_audit_events_are_filtered_and_purged() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path).await.expect("open");
        audit_events_are_filtered_and_purged(&store, &format!("sqlite://{}", path.display())).await;
    }

    /// The same behaviour from the PostgreSQL store, on the server the test command provides
    /// (`SLUICE_TEST_POSTGRES`, default the local trust-auth server), in a database of its own.
    #[tokio::test]
    async fn postgres_store_keeps_checkpoints_queue_and_versions() {
        let admin_url = std::env::var("SLUICE_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let db = format!("sluice_test_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(&admin_url)
            .await
            .expect("PostgreSQL at SLUICE_TEST_POSTGRES (run scripts/test)");
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&admin)
            .await
            .expect("create database");
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{db}"),
            None => panic!("no database in {admin_url}"),
        };
        {
            let store = open(&url, Path::new(".")).await.expect("open");
            store
                .put_checkpoint(
                    "m",
                    "s1",
                    &Checkpoint {
                        sequence: Some("7".into()),
                        finished: false,
                    },
                )
                .await
                .expect("put");
            store
                .apply(&[event("a", "f", 10), event("b", "f", 20)], &[])
                .await
                .expect("enqueue");
            assert_eq!(published(store.as_ref(), "f", "").await, 1);
            assert!(
                store
                    .swap_function_policy("f:live", None, Some(("{}", "r1")))
                    .await
                    .expect("policy")
            );
        }
        // A second handle, as a second Sluice instance would have, sees the same state.
        let other = open(&url, Path::new(".")).await.expect("reopen");
        assert_eq!(
            other.checkpoint("m", "s1").await.expect("checkpoint"),
            Some(Checkpoint {
                sequence: Some("7".into()),
                finished: false
            })
        );
        let due: Vec<String> = other
            .due("f", 15, 10)
            .await
            .expect("due")
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(due, ["a"]);
        assert_eq!(other.queued().await.expect("count"), 2);
        assert_eq!(published(other.as_ref(), "f", "").await, 2);
        // A policy changed by another instance is a stale revision here.
        assert!(
            !other
                .swap_function_policy("f:live", None, Some(("{}", "r2")))
                .await
                .expect("stale")
        );
        assert!(
            other
                .swap_function_policy("f:live", Some("r1"), None)
                .await
                .expect("remove")
        );
        assert_eq!(other.function_policy("f:live").await.expect("read"), None);
        audit_events_are_filtered_and_purged(other.as_ref(), &url).await;
        drop(other);
        let _ = sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .execute(&admin)
            .await;
    }
}
