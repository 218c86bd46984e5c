-- Database-wide settings. `task_token_key` signs the tokens of attempts that report their
-- outcome later (a 202 answer); every process on the database uses the same one.
CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  BLOB NOT NULL
);
INSERT INTO settings (name, value) VALUES ('task_token_key', randomblob(32));
