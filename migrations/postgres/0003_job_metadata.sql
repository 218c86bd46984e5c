-- A job's `metadata` (the client's JSON object, as submitted) and its `options.not_before`
-- (milliseconds), which tells a scheduled job from a pending one in lists.
ALTER TABLE jobs ADD COLUMN metadata TEXT, ADD COLUMN not_before BIGINT;
