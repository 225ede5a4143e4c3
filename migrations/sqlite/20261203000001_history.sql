-- Outcome unknown and history: see the Postgres migration of the same name
-- for what each column means.
ALTER TABLE idemd_records ADD COLUMN outcome_unknown INTEGER NOT NULL DEFAULT 0;
ALTER TABLE idemd_records ADD COLUMN ended_at INTEGER;
ALTER TABLE idemd_records ADD COLUMN taken_over INTEGER NOT NULL DEFAULT 0;
ALTER TABLE idemd_records ADD COLUMN history_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE idemd_records ADD COLUMN tombstone_until INTEGER;

CREATE TABLE idemd_events (
    namespace       TEXT    NOT NULL,
    key             TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    at              INTEGER NOT NULL,
    kind            INTEGER NOT NULL CHECK (kind BETWEEN 1 AND 7),
    attempt         INTEGER NOT NULL,
    principal       TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    response_code   INTEGER,
    outcome_unknown INTEGER NOT NULL,
    PRIMARY KEY (namespace, key, seq)
) STRICT, WITHOUT ROWID;

CREATE INDEX idemd_records_recent ON idemd_records (namespace, updated_at DESC, key);
CREATE INDEX idemd_records_recent_aborted ON idemd_records (namespace, updated_at DESC, key) WHERE state = 3;
