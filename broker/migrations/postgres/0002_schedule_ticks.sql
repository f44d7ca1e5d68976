-- The last tick each schedule source fired, so that a `rate:` schedule's next tick follows the
-- last one across restarts instead of firing at every start.
CREATE TABLE schedule_ticks (
    source TEXT PRIMARY KEY,
    last_tick_ms BIGINT NOT NULL);
