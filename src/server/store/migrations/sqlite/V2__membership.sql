-- The membership registry of reference 002: registration data, AUP acceptance, requests as
-- records and notifications. Keep in step with postgres/V2__membership.sql.
-- `registration`: the personal registration data as JSON (name, institute, email, phone,
-- the responsible person of a host, service or robot); NULL once purged.
-- `ended_at`: when the membership ended (removed, or a registration refused); expiry of an
-- unrenewed membership is `renewal_due` itself.
ALTER TABLE members ADD COLUMN kind TEXT NOT NULL DEFAULT 'person';
ALTER TABLE members ADD COLUMN registration TEXT;
ALTER TABLE members ADD COLUMN grid_aup_version TEXT;
ALTER TABLE members ADD COLUMN vo_aup_version TEXT;
ALTER TABLE members ADD COLUMN aup_accepted_at TEXT;
ALTER TABLE members ADD COLUMN ended_at TEXT;
ALTER TABLE members ADD COLUMN suspension TEXT;
CREATE TABLE membership_requests (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    kind         TEXT NOT NULL,
    subject_dn   TEXT NOT NULL,
    requester_dn TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    details      TEXT NOT NULL,
    state        TEXT NOT NULL,
    decided_by   TEXT,
    decided_at   TEXT,
    verification TEXT,
    note         TEXT
);
CREATE INDEX membership_requests_subject ON membership_requests(subject_dn, seq);
CREATE INDEX membership_requests_state ON membership_requests(state, seq);
CREATE TABLE membership_notifications (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at   TEXT NOT NULL,
    recipient_dn TEXT NOT NULL,
    subject_dn   TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    message      TEXT NOT NULL,
    delivery     TEXT
);
CREATE INDEX membership_notifications_subject ON membership_notifications(subject_dn);
