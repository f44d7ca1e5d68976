-- The schema of the first release, exactly as it created it at start (`IF NOT EXISTS`), so that
-- a store made by that release is recognised and adopted as version 1, not recreated.
CREATE TABLE IF NOT EXISTS async_events (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    qualifier TEXT,
    payload BLOB NOT NULL,
    trace_id TEXT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    attempts TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS async_events_due ON async_events (function, next_attempt_ms);
CREATE TABLE IF NOT EXISTS versions (
    function TEXT NOT NULL,
    version BIGINT NOT NULL,
    snapshot TEXT NOT NULL,
    code_sha256 TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (function, version));
CREATE TABLE IF NOT EXISTS aliases (
    function TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    weights TEXT NOT NULL,
    description TEXT NOT NULL,
    revision_id TEXT NOT NULL,
    PRIMARY KEY (function, name));
CREATE TABLE IF NOT EXISTS checkpoints (
    source TEXT NOT NULL,
    shard TEXT NOT NULL,
    sequence TEXT,
    finished BIGINT NOT NULL,
    PRIMARY KEY (source, shard));
CREATE TABLE IF NOT EXISTS function_concurrency (
    function TEXT PRIMARY KEY,
    reserved BIGINT);
