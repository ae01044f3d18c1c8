-- A connection switched to another organisation of the provider keeps the
-- tenant's account mappings (they are remembered across disconnects), but
-- they were chosen from the other organisation's chart of accounts:
-- nothing is sent until an admin has looked at them and saved them again.
-- 1 while that review is due.
ALTER TABLE connections ADD COLUMN mappings_review BIGINT NOT NULL DEFAULT 0;
