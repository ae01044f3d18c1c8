-- Tenants, OAuth connections (encrypted tokens), connection events, pending
-- OAuth flows, account mappings and the per-connection kv store.
-- Times are Unix seconds (INTEGER). Secrets are AES-256-GCM ciphertexts
-- ("lp1:<key id>:<base64>") and never plaintext.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE tenant_emails (
    tenant_id   TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    email       TEXT NOT NULL,
    PRIMARY KEY (tenant_id, email)
);

CREATE TABLE connections (
    id                      TEXT PRIMARY KEY,
    tenant_id               TEXT NOT NULL REFERENCES tenants(id),
    connector_id            TEXT NOT NULL,
    state                   TEXT NOT NULL,
    external_tenant_id      TEXT,
    external_tenant_name    TEXT,
    external_connection_id  TEXT,
    auth_event_id           TEXT,
    scopes                  TEXT NOT NULL DEFAULT '',
    connected_by            TEXT,
    connected_at            INTEGER,
    disconnected_at         INTEGER,
    state_reason            TEXT,
    updated_at              INTEGER NOT NULL,
    UNIQUE (tenant_id, connector_id)
);

CREATE TABLE connection_tokens (
    connection_id   TEXT PRIMARY KEY REFERENCES connections(id) ON DELETE CASCADE,
    key_id          TEXT NOT NULL,
    access_token    TEXT NOT NULL,
    refresh_token   TEXT,
    expires_at      INTEGER NOT NULL,
    refreshed_at    INTEGER NOT NULL,
    generation      INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE connection_events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    connection_id   TEXT NOT NULL,
    tenant_id       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    detail          TEXT NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL,
    handled_at      INTEGER
);
CREATE INDEX connection_events_unhandled ON connection_events (handled_at, id);

CREATE TABLE oauth_states (
    state_hash      TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    connector_id    TEXT NOT NULL,
    admin           TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    pkce_verifier   TEXT,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    used_at         INTEGER
);

CREATE TABLE oauth_pending (
    pick_hash       TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    connector_id    TEXT NOT NULL,
    admin           TEXT NOT NULL,
    scopes          TEXT NOT NULL,
    auth_event_id   TEXT,
    organisations   TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    access_token    TEXT NOT NULL,
    refresh_token   TEXT,
    expires_at      INTEGER NOT NULL,
    pick_expires_at INTEGER NOT NULL,
    used_at         INTEGER
);

CREATE TABLE mappings (
    tenant_id       TEXT NOT NULL,
    connector_id    TEXT NOT NULL,
    kind            TEXT NOT NULL,
    account_code    TEXT NOT NULL,
    tax_type        TEXT,
    updated_by      TEXT,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, connector_id, kind)
);

CREATE TABLE kv (
    connection_id   TEXT NOT NULL,
    key             TEXT NOT NULL,
    value           BLOB NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (connection_id, key)
);
