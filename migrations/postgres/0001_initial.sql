-- Jobs, their tasks and the callback outbox: the SQLite schema (migrations/sqlite) with
-- leases from the start. Times are milliseconds since the Unix epoch, compared across nodes,
-- so the nodes' clocks must agree.
-- Status codes: jobs 0 Pending, 1 Running, 2 Complete, 3 Failed, 4 Cancelled;
-- tasks 0 Pending, 1 Running, 2 Complete, 3 Failed, 4 Cancelled.
-- JSON (options, params, result, error) is TEXT, never jsonb: jsonb reorders keys and
-- respells numbers, and the API promises parameters and results byte for byte.

CREATE TABLE jobs (
    seq              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               UUID     NOT NULL UNIQUE,
    status           SMALLINT NOT NULL,
    options          TEXT     NOT NULL,
    concurrency      BIGINT,
    tolerated        BIGINT   NOT NULL,
    total            BIGINT   NOT NULL,
    -- Running counts every node's calls: the claim checks it against `concurrency` under
    -- the job row's lock, so a job's concurrency holds across the cluster.
    n_running        BIGINT   NOT NULL DEFAULT 0,
    n_complete       BIGINT   NOT NULL DEFAULT 0,
    n_failed         BIGINT   NOT NULL DEFAULT 0,
    n_cancelled      BIGINT   NOT NULL DEFAULT 0,
    callback_url     TEXT,
    -- A digest of the API token that created the job (NULL without tokens).
    owner            TEXT,
    -- The client's Idempotency-Key and a hash of the body it came with.
    idempotency_key  TEXT,
    request_hash     TEXT,
    created_at       BIGINT   NOT NULL,
    finished_at      BIGINT,
    -- When a claim last served this job: the round-robin order between jobs.
    last_claim_at    BIGINT   NOT NULL DEFAULT 0
);

-- The claim reads only unfinished jobs, least recently served first.
CREATE INDEX jobs_active ON jobs (last_claim_at, seq) WHERE status IN (0, 1);
CREATE INDEX jobs_status ON jobs (status, seq);
CREATE INDEX jobs_owner ON jobs (owner, seq);
-- A key is unique per owner.
CREATE UNIQUE INDEX jobs_idempotency ON jobs (COALESCE(owner, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Retention: finished jobs by age.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE tasks (
    job_seq      BIGINT   NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    idx          BIGINT   NOT NULL,
    status       SMALLINT NOT NULL DEFAULT 0,
    attempts     INTEGER  NOT NULL DEFAULT 0,
    run_at       BIGINT   NOT NULL,
    -- The node whose call a running task is (a random number per process start) and until
    -- when its lease lasts; NULL unless the task is running. An outcome is stored only
    -- from the node that holds the lease; a lease that runs out is taken back by any node.
    -- An attempt awaiting its report (its endpoint answered 202) is running with no node,
    -- and `lease_until` is its deadline.
    node         BIGINT,
    lease_until  BIGINT,
    endpoint     TEXT     NOT NULL,
    params       TEXT     NOT NULL,
    result       TEXT,
    error        TEXT,
    latency_ms   BIGINT,
    finished_at  BIGINT,
    -- 1, 2, 3, ... in the order this job's tasks failed: the events stream's cursor.
    fail_seq     BIGINT,
    PRIMARY KEY (job_seq, idx)
);

-- The claim: a job's due pending tasks, oldest due first, then by position; a short walk
-- of this index per job.
CREATE INDEX tasks_due ON tasks (job_seq, run_at, idx) WHERE status = 0;
CREATE INDEX tasks_failed ON tasks (job_seq, fail_seq) WHERE fail_seq IS NOT NULL;
-- Running tasks by lease or deadline (the sweeps that take back expired leases and time
-- out awaited attempts) and by node (renewal).
CREATE INDEX tasks_leased ON tasks (lease_until) WHERE status = 1;
CREATE INDEX tasks_node ON tasks (node) WHERE status = 1;

-- One row per finished job that has a callback URL: the outbox.
CREATE TABLE callbacks (
    job_seq          BIGINT   PRIMARY KEY REFERENCES jobs (seq) ON DELETE CASCADE,
    state            SMALLINT NOT NULL,  -- 1 pending, 2 delivered, 3 failed
    attempts         INTEGER  NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT,
    last_error       TEXT,
    delivered_at     BIGINT
);

CREATE INDEX callbacks_due ON callbacks (next_attempt_at) WHERE state = 1;

-- Database-wide settings. `task_token_key` signs the tokens of attempts that report their
-- outcome later (a 202 answer); every node on the database uses the same one. 32 bytes
-- from the server's strong random source (two version 4 UUIDs: 244 random bits).
CREATE TABLE settings (
    name   TEXT  PRIMARY KEY,
    value  BYTEA NOT NULL
);
INSERT INTO settings (name, value) VALUES ('task_token_key',
    decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
