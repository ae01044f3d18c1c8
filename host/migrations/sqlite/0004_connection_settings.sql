-- Connector settings per tenant and connector (what a connection overrides
-- of its manifest's defaults, e.g. Xero's bill status or a webhook's
-- signing secret). Keyed like mappings, not by connection, so they outlive
-- a disconnect and are found again on reconnect. Every value is an
-- AES-256-GCM ciphertext ("lp1:<key id>:<base64>"), never plaintext; key_id
-- names the key that made it (for rotation). Times are Unix seconds.

CREATE TABLE connection_settings (
    tenant_id       TEXT NOT NULL,
    connector_id    TEXT NOT NULL,
    key             TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    value           TEXT NOT NULL,
    updated_by      TEXT,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, connector_id, key)
);
