-- Groups of jobs (`options.group`). Each job's group in a column of its own, so that a
-- claim counts a group's calls in flight over its unfinished jobs (Pending, Running,
-- Paused); and each group's own limits, with the next start its rate allows.
ALTER TABLE jobs ADD COLUMN group_name TEXT;
UPDATE jobs SET group_name = json_extract(options, '$.group') WHERE options LIKE '%"group":%';
CREATE INDEX jobs_group ON jobs (group_name) WHERE group_name IS NOT NULL AND status IN (0, 1, 5);
CREATE TABLE groups (
    -- The owner's token digest; '' for a server without tokens.
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    concurrency INTEGER,
    rate REAL,
    -- When the rate's next call may start, in milliseconds; 0 before the first.
    next_start REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, name)
) WITHOUT ROWID;
