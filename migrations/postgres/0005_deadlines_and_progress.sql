-- When a job's time budget (`options.deadline_ms`) runs out, in milliseconds; NULL without
-- one. The deadline sweep reads the unfinished jobs (Pending, Running, Paused) by it.
ALTER TABLE jobs ADD COLUMN deadline_at BIGINT;
CREATE INDEX jobs_deadline ON jobs (deadline_at) WHERE deadline_at IS NOT NULL AND status IN (0, 1, 5);
-- The last progress a task's attempt reported with a heartbeat (JSON text).
ALTER TABLE tasks ADD COLUMN progress TEXT;
