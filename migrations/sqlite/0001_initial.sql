-- Jobs, their tasks and the callback outbox. Times are milliseconds since the Unix epoch.
-- Status codes: jobs 0 Pending, 1 Running, 2 Complete, 3 Failed, 4 Cancelled;
-- tasks 0 Pending, 1 Running, 2 Complete, 3 Failed, 4 Cancelled.

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
    n_cancelled    INTEGER NOT NULL DEFAULT 0,
    callback_url   TEXT,
    -- A digest of the API token that created the job (NULL without tokens).
    owner          TEXT,
    -- The client's Idempotency-Key and a hash of the body it came with.
    idempotency_key  TEXT,
    request_hash     TEXT,
    created_at     INTEGER NOT NULL,
    finished_at    INTEGER,
    -- When a claim last served this job: the round-robin order between jobs.
    last_claim_at  INTEGER NOT NULL DEFAULT 0
);

-- The claim reads only unfinished jobs.
CREATE INDEX jobs_active ON jobs (last_claim_at, seq) WHERE status IN (0, 1);
CREATE INDEX jobs_status ON jobs (status, seq);
CREATE INDEX jobs_owner ON jobs (owner, seq);
-- A key is unique per owner.
CREATE UNIQUE INDEX jobs_idempotency ON jobs (COALESCE(owner, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Retention: finished jobs by age.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

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
    -- 1, 2, 3, ... in the order this job's tasks failed: the events stream's cursor.
    fail_seq     INTEGER,
    PRIMARY KEY (job_seq, idx)
);

-- The claim: a job's due pending tasks, oldest due first, then by position.
CREATE INDEX tasks_due ON tasks (job_seq, status, run_at, idx);
CREATE INDEX tasks_failed ON tasks (job_seq, fail_seq) WHERE fail_seq IS NOT NULL;

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
