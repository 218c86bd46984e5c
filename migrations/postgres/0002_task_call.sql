-- A task's own call settings (method, headers, sealed secret headers, AWS signing,
-- per-task options) as JSON text; NULL for a task that has none, which is most.
ALTER TABLE tasks ADD COLUMN call TEXT;
