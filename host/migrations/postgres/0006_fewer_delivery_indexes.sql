-- Two indexes on deliveries that no query needs any more: every query by
-- state (the claim's lapsed leases and live counts, paused deliveries, the
-- incident check by connection and state) is served by the leading columns
-- of deliveries_pending_by_connection (state, connection_id, ...). Each
-- was written on every insert and every change of state (three per
-- delivered document); `store::outbox::tests::delivery_queries_use_indexes` keeps
-- the query plans honest.
DROP INDEX IF EXISTS deliveries_due;
DROP INDEX IF EXISTS deliveries_by_connection;
