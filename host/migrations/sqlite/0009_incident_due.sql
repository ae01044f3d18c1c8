-- An outcome people must hear about (a failure, a pause) is marked on its
-- delivery in the same transaction that records it: incident_due names the
-- incident's kind until the incident is recorded (which clears it in its
-- own transaction). A daemon that stops between the two, or an incident
-- write that fails, leaves the mark, and the dispatcher's sweep records
-- the incident later: no notice is lost.
ALTER TABLE deliveries ADD COLUMN incident_due TEXT;
CREATE INDEX deliveries_incident_due ON deliveries (updated_at) WHERE incident_due IS NOT NULL;
