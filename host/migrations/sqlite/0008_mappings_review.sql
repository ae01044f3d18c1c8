-- A connection switched to another organisation of the provider keeps the
-- tenant's account mappings (they are remembered across disconnects), but
-- they were chosen from the other organisation's chart of accounts:
-- nothing is sent until an admin has confirmed them (saved the page's
-- form, or confirmed them through the API), each checked against the new
-- chart. mappings_review is 1 while that is due; mappings_org names the
-- organisation the mappings were made for, so switching back to it ends
-- the review.
ALTER TABLE connections ADD COLUMN mappings_review INTEGER NOT NULL DEFAULT 0;
ALTER TABLE connections ADD COLUMN mappings_org TEXT;
