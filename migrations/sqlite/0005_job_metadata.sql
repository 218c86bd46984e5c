-- A job's `metadata` (the client's JSON object, as submitted) and its `options.not_before`
-- (milliseconds), which tells a scheduled job from a pending one in lists.
ALTER TABLE jobs ADD COLUMN metadata TEXT;
ALTER TABLE jobs ADD COLUMN not_before INTEGER;
