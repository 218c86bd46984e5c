-- Attempts a task made in its job's earlier runs (a retried job's): the attempt budget of
-- the run in progress counts from here, while `attempts` keeps counting.
ALTER TABLE tasks ADD COLUMN attempt_base INTEGER NOT NULL DEFAULT 0;
