-- postgres/V3 is sqlite/V3 in PostgreSQL's words (see postgres/V1__initial.sql).
CREATE TABLE delegations (
    id         TEXT PRIMARY KEY,
    owner_dn   TEXT NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL,
    not_after  TEXT COLLATE "C" NOT NULL,
    chain_pem  TEXT,
    serial     TEXT,
    limited    BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX delegations_owner ON delegations(owner_dn);
CREATE INDEX delegations_not_after ON delegations(not_after);
CREATE TABLE proxy_signings (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delegation_id TEXT NOT NULL,
    payload_id    TEXT,
    signer_dn     TEXT NOT NULL,
    serial        TEXT NOT NULL,
    subject       TEXT NOT NULL,
    not_after     TEXT COLLATE "C" NOT NULL,
    signed_at     TEXT COLLATE "C" NOT NULL
);
CREATE INDEX proxy_signings_delegation ON proxy_signings(delegation_id, seq);
ALTER TABLE payloads ADD COLUMN delegation_id TEXT;
