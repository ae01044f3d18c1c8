-- What a connection missed while it was disconnected (store::missed) is
-- found by time: the connection's first disconnect (its events, by
-- connection), then the tenant's documents received since (by tenant and
-- time, so neither scan reads a document's body, which may hold a PDF).
CREATE INDEX documents_by_received ON documents (tenant_id, received_at);
CREATE INDEX connection_events_by_connection ON connection_events (connection_id, kind);
