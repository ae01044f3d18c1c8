-- An incident names at most 200 documents; the rest are counted
-- (store::outbox::MAX_INCIDENT_DOCUMENTS): 20,000 deliveries paused behind
-- one told incident rewrote an ever longer list 20,000 times. Incidents
-- not told yet are found by when they are due, by an index of those only.
ALTER TABLE incidents ADD COLUMN documents_more BIGINT NOT NULL DEFAULT 0;
CREATE INDEX incidents_untold ON incidents (notify_after) WHERE notified_at IS NULL AND closed_at IS NULL;
