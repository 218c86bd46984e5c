-- A job's `options.priority` (-10 to 10), in a column of its own: when more jobs are
-- claimable than a claim looks at, it looks at the highest priorities too.
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_active_priority ON jobs (priority DESC, last_claim_at, seq) WHERE status IN (0, 1);
