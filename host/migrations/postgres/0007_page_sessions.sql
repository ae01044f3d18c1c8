-- Sign-ins to the Integrations page. The platform asks (server to server,
-- with the tenant's key) for a one-time sign-in link for a named admin and
-- role; opening it turns its ticket into a session. The browser never sees
-- the tenant's key, and the admin and role it acts as are kept here, not in
-- a cookie it could edit. Only SHA-256 hashes of tickets and session tokens
-- are stored. Revoking the key that asked for a session ends it.
CREATE TABLE page_sessions (
    token_hash  TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    admin       TEXT NOT NULL,
    role        TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX page_sessions_by_expiry ON page_sessions (expires_at);
