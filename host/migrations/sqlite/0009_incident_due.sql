-- An outcome people must hear about (a failure, a pause) is marked on its
-- delivery in the same transaction that records it: incident_due names the
-- incident's kind until the incident is recorded (which clears it in its
-- own transaction). A daemon that stops between the two, or an incident
-- write that fails, leaves the mark, and the dispatcher's sweep records
-- the incident later: no notice is lost.
ALTER TABLE deliveries ADD COLUMN incident_due TEXT;
CREATE INDEX deliveries_incident_due ON deliveries (updated_at) WHERE incident_due IS NOT NULL;

-- The retry ladder counts transient failures since the last time a person
-- fixed what held the delivery: a resumed pause sets ladder_base to the
-- attempts so far (attempts keeps counting every attempt, for the log and
-- the connector's attempt number).
ALTER TABLE deliveries ADD COLUMN ladder_base INTEGER NOT NULL DEFAULT 0;
