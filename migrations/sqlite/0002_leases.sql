-- Leases: the node whose call a running task is (a random number per process start) and
-- until when. An outcome is stored only from the node that holds the lease; a lease that
-- runs out is taken back (see Store::tasks_expire). Both are NULL unless the task is running.
ALTER TABLE tasks ADD COLUMN node INTEGER;
ALTER TABLE tasks ADD COLUMN lease_until INTEGER;
