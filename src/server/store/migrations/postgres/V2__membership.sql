-- postgres/V2 is sqlite/V2 in PostgreSQL's words (see sqlite/V2__membership.sql).
ALTER TABLE members ADD COLUMN kind TEXT NOT NULL DEFAULT 'person';
ALTER TABLE members ADD COLUMN registration TEXT;
ALTER TABLE members ADD COLUMN grid_aup_version TEXT;
ALTER TABLE members ADD COLUMN vo_aup_version TEXT;
ALTER TABLE members ADD COLUMN aup_accepted_at TEXT COLLATE "C";
ALTER TABLE members ADD COLUMN ended_at TEXT COLLATE "C";
ALTER TABLE members ADD COLUMN suspension TEXT;
CREATE TABLE membership_requests (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    kind         TEXT NOT NULL,
    subject_dn   TEXT COLLATE "C" NOT NULL,
    requester_dn TEXT NOT NULL,
    requested_at TEXT COLLATE "C" NOT NULL,
    details      TEXT NOT NULL,
    state        TEXT NOT NULL,
    decided_by   TEXT,
    decided_at   TEXT COLLATE "C",
    verification TEXT,
    note         TEXT
);
CREATE INDEX membership_requests_subject ON membership_requests(subject_dn, seq);
CREATE INDEX membership_requests_state ON membership_requests(state, seq);
CREATE TABLE membership_notifications (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at   TEXT COLLATE "C" NOT NULL,
    recipient_dn TEXT NOT NULL,
    subject_dn   TEXT COLLATE "C" NOT NULL,
    request_id   TEXT NOT NULL,
    message      TEXT NOT NULL,
    delivery     TEXT
);
CREATE INDEX membership_notifications_subject ON membership_notifications(subject_dn);
