-- Live usage from the pilots' heartbeats (memory charged now, and when usage was last
-- reported; cpu_seconds and peak_memory_bytes take the heartbeats' values until the final
-- report), and the VO's `information` requests with the helper's answers
-- (docs/protocol.md). Keep in step with postgres/V4__live_usage.sql.
ALTER TABLE payloads ADD COLUMN memory_bytes_now INTEGER;
ALTER TABLE payloads ADD COLUMN usage_at TEXT;
CREATE TABLE information (
    request_id   TEXT PRIMARY KEY,
    payload_id   TEXT NOT NULL,
    requester_dn TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    answered_at  TEXT,
    answer       TEXT
);
CREATE INDEX information_payload ON information(payload_id);
