-- sqlite/V4__live_usage.sql in PostgreSQL's words.
ALTER TABLE payloads ADD COLUMN memory_bytes_now BIGINT;
ALTER TABLE payloads ADD COLUMN usage_at TEXT COLLATE "C";
CREATE TABLE information (
    request_id   TEXT COLLATE "C" PRIMARY KEY,
    payload_id   TEXT NOT NULL,
    requester_dn TEXT NOT NULL,
    requested_at TEXT COLLATE "C" NOT NULL,
    answered_at  TEXT COLLATE "C",
    answer       TEXT
);
CREATE INDEX information_payload ON information(payload_id);
