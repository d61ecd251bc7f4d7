-- postgres/V1 is sqlite/V1 in PostgreSQL's words: the same tables, columns, order and
-- indexes. Every integer is BIGINT (the store reads and binds 64-bit integers on both
-- engines), every REAL a DOUBLE PRECISION; timestamps stay fixed-width RFC 3339 text so the
-- store's comparisons are the same string comparisons on both (COLLATE "C": byte order,
-- whatever the database's locale).
CREATE TABLE members (
    dn            TEXT COLLATE "C" PRIMARY KEY,
    vo            TEXT NOT NULL,
    fqans         TEXT NOT NULL,
    status        TEXT NOT NULL,
    registered_at TEXT COLLATE "C" NOT NULL,
    renewal_due   TEXT COLLATE "C" NOT NULL
);
CREATE TABLE payloads (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT NOT NULL UNIQUE,
    owner_dn          TEXT NOT NULL,
    vo                TEXT NOT NULL,
    state             TEXT NOT NULL,
    argv              TEXT NOT NULL,
    env               TEXT NOT NULL,
    jobtag            TEXT,
    cores             BIGINT NOT NULL,
    memory_bytes      BIGINT NOT NULL,
    walltime_seconds  BIGINT NOT NULL,
    outputs           TEXT NOT NULL,
    bundle_sha256     TEXT,
    submitted_at      TEXT COLLATE "C" NOT NULL,
    updated_at        TEXT COLLATE "C",
    pilot_dn          TEXT,
    pilot_id          TEXT,
    host              TEXT,
    batch_job_id      TEXT,
    account           TEXT,
    uid               BIGINT,
    exit_code         BIGINT,
    signal            BIGINT,
    cpu_seconds       DOUBLE PRECISION,
    peak_memory_bytes BIGINT,
    wall_seconds      DOUBLE PRECISION,
    reason            TEXT,
    denial_class      TEXT,
    has_output        BIGINT NOT NULL DEFAULT 0,
    outputs_skipped   TEXT,
    requeues          BIGINT NOT NULL DEFAULT 0,
    lost_by_server    BIGINT NOT NULL DEFAULT 0,
    files_deleted_at  TEXT COLLATE "C"
);
CREATE INDEX payloads_queue ON payloads(state, seq);
CREATE INDEX payloads_owner ON payloads(owner_dn, seq);
CREATE INDEX payloads_vo_state ON payloads(vo, state);
CREATE TABLE commands (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload_id TEXT NOT NULL,
    command    TEXT NOT NULL,
    delivered  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX commands_pending ON commands(payload_id, delivered);
