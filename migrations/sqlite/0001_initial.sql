-- Jobs, their tasks and the callback outbox. Times are milliseconds since the Unix epoch.
-- Status codes: jobs 0 Pending, 1 Running, 2 Complete, 3 Failed, 4 Cancelled;
-- tasks 0 Pending, 1 Running, 2 Complete, 3 Failed.

CREATE TABLE jobs (
    seq            INTEGER PRIMARY KEY,
    id             TEXT    NOT NULL UNIQUE,
    status         INTEGER NOT NULL,
    options        TEXT    NOT NULL,
    concurrency    INTEGER,
    tolerated      INTEGER NOT NULL,
    total          INTEGER NOT NULL,
    n_running      INTEGER NOT NULL DEFAULT 0,
    n_complete     INTEGER NOT NULL DEFAULT 0,
    n_failed       INTEGER NOT NULL DEFAULT 0,
    callback_url   TEXT,
    created_at     INTEGER NOT NULL,
    finished_at    INTEGER,
    -- When a claim last served this job: the round-robin order between jobs.
    last_claim_at  INTEGER NOT NULL DEFAULT 0
);

-- The claim reads only unfinished jobs.
CREATE INDEX jobs_active ON jobs (last_claim_at, seq) WHERE status IN (0, 1);
CREATE INDEX jobs_status ON jobs (status, seq);

CREATE TABLE tasks (
    job_seq      INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    idx          INTEGER NOT NULL,
    status       INTEGER NOT NULL DEFAULT 0,
    attempts     INTEGER NOT NULL DEFAULT 0,
    run_at       INTEGER NOT NULL,
    endpoint     TEXT    NOT NULL,
    params       TEXT    NOT NULL,
    result       TEXT,
    error        TEXT,
    latency_ms   INTEGER,
    finished_at  INTEGER,
    PRIMARY KEY (job_seq, idx)
);

-- The claim: a job's due pending tasks, oldest due first, then by position.
CREATE INDEX tasks_due ON tasks (job_seq, status, run_at, idx);

-- One row per finished job that has a callback URL: the outbox.
CREATE TABLE callbacks (
    job_seq          INTEGER PRIMARY KEY REFERENCES jobs (seq) ON DELETE CASCADE,
    state            INTEGER NOT NULL,  -- 1 pending, 2 delivered, 3 failed
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER,
    last_error       TEXT,
    delivered_at     INTEGER
);

CREATE INDEX callbacks_due ON callbacks (next_attempt_at) WHERE state = 1;
