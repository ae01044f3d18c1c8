-- The outbox claim finds each connection's earliest due delivery by index
-- (a loose index scan over connections, then a few rows per connection)
-- instead of ranking every pending delivery: with a backlog of 100,000 the
-- old ranking took over 100 ms per claim, inside the write lock.
CREATE INDEX deliveries_pending_by_connection ON deliveries (state, connection_id, next_attempt_at, id);
