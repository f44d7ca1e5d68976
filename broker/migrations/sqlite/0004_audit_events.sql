-- The audit trail: one row per recorded API call or configuration load, as the CloudTrail-style
-- JSON event in `event`, with the columns `sluice audit` filters on. Rows older than
-- `audit.retention` are purged.
CREATE TABLE audit_events (
    event_id TEXT PRIMARY KEY,
    event_time_ms BIGINT NOT NULL,
    event_name TEXT NOT NULL,
    principal TEXT,
    event TEXT NOT NULL);
CREATE INDEX audit_events_by_time ON audit_events (event_time_ms);
