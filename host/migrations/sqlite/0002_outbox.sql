-- The outbox: documents the platform issued, one delivery per (document,
-- connection), every attempt, incidents that people are told about, the
-- mail outbox, and the per-connection request log that enforces provider
-- limits across daemons. Outbox times are Unix milliseconds.

CREATE TABLE documents (
    tenant_id               TEXT NOT NULL REFERENCES tenants(id),
    id                      TEXT NOT NULL,
    kind                    TEXT NOT NULL,
    number                  TEXT NOT NULL,
    credits_invoice_number  TEXT,
    body                    TEXT NOT NULL,
    body_hash               TEXT NOT NULL,
    note                    TEXT,
    received_at             INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX documents_by_number ON documents (tenant_id, number);

CREATE TABLE deliveries (
    id                  TEXT PRIMARY KEY,
    tenant_id           TEXT NOT NULL,
    document_id         TEXT NOT NULL,
    connection_id       TEXT NOT NULL,
    connector_id        TEXT NOT NULL,
    document_number     TEXT NOT NULL,
    document_kind       TEXT NOT NULL,
    state               TEXT NOT NULL,
    pause_reason        TEXT,
    pause_detail        TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     INTEGER NOT NULL,
    lease_owner         TEXT,
    lease_until         INTEGER,
    external_id         TEXT,
    external_url        TEXT,
    last_error          TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    delivered_at        INTEGER,
    UNIQUE (tenant_id, document_id, connection_id)
);
CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX deliveries_by_connection ON deliveries (connection_id, state);
CREATE INDEX deliveries_by_number ON deliveries (tenant_id, document_number);

CREATE TABLE delivery_attempts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id     TEXT NOT NULL,
    attempt         INTEGER NOT NULL,
    worker          TEXT NOT NULL,
    started_at      INTEGER NOT NULL,
    finished_at     INTEGER NOT NULL,
    outcome         TEXT NOT NULL,
    message         TEXT,
    details         TEXT,
    external_id     TEXT,
    external_url    TEXT
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, id);

CREATE TABLE incidents (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    connection_id   TEXT NOT NULL,
    kind            TEXT NOT NULL,
    documents       TEXT NOT NULL,
    details         TEXT NOT NULL,
    opened_at       INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    notify_after    INTEGER NOT NULL,
    notified_at     INTEGER,
    closed_at       INTEGER
);
CREATE INDEX incidents_open ON incidents (tenant_id, connection_id, kind, closed_at);

CREATE TABLE mail_outbox (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    incident_id     TEXT,
    recipients      TEXT NOT NULL,
    subject         TEXT NOT NULL,
    text_body       TEXT NOT NULL,
    html_body       TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    sent_at         INTEGER,
    last_error      TEXT
);
CREATE INDEX mail_outbox_due ON mail_outbox (sent_at, next_attempt_at);

CREATE TABLE rate_log (
    connection_id   TEXT NOT NULL,
    at              INTEGER NOT NULL
);
CREATE INDEX rate_log_by_connection ON rate_log (connection_id, at);
