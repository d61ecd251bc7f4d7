-- Credentials members delegated to the server (src/server/delegation.rs): the certificate chain
-- a member signed for a key the server made. The private key is not in the database: it is a
-- 0600 file data_dir/delegations/<id>.key (docs/security-model.md says why). `chain_pem` is
-- NULL while the delegation waits for the member's chain; `not_after` is then the time the
-- request lapses, afterwards the chain's; retention deletes the row and the key after it.
-- Keep in step with postgres/V3__delegation.sql.
CREATE TABLE delegations (
    id         TEXT PRIMARY KEY,
    owner_dn   TEXT NOT NULL,
    created_at TEXT NOT NULL,
    not_after  TEXT NOT NULL,
    chain_pem  TEXT,
    serial     TEXT,
    limited    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX delegations_owner ON delegations(owner_dn);
CREATE INDEX delegations_not_after ON delegations(not_after);
-- Every proxy signed for a delegation (the member's upload, and each worker-node proxy the
-- server signs): kept after the delegation is deleted, as the record of what was issued.
CREATE TABLE proxy_signings (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    delegation_id TEXT NOT NULL,
    payload_id    TEXT,
    signer_dn     TEXT NOT NULL,
    serial        TEXT NOT NULL,
    subject       TEXT NOT NULL,
    not_after     TEXT NOT NULL,
    signed_at     TEXT NOT NULL
);
CREATE INDEX proxy_signings_delegation ON proxy_signings(delegation_id, seq);
ALTER TABLE payloads ADD COLUMN delegation_id TEXT;
