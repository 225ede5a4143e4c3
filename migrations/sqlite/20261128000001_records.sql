-- One row per (namespace, key): the primary key is the UNIQUE constraint
-- that makes a duplicate acquisition impossible even if code were wrong.
-- Times are microseconds since the Unix epoch by SQLite's clock (unixepoch).
CREATE TABLE idemd_records (
    namespace        TEXT    NOT NULL,
    key              TEXT    NOT NULL,
    -- 1 IN_PROGRESS, 2 COMPLETED, 3 ABORTED
    state            INTEGER NOT NULL CHECK (state IN (1, 2, 3)),
    attempt          INTEGER NOT NULL CHECK (attempt >= 1),
    fingerprint      BLOB    NOT NULL,
    downstream_key   TEXT    NOT NULL,
    lease_token      TEXT    NOT NULL,
    attempt_nonce    TEXT,
    retention_us     INTEGER NOT NULL CHECK (retention_us > 0),
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    lease_expires_at INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    completed_at     INTEGER,
    response         BLOB,
    response_code    INTEGER,
    content_type     TEXT,
    abort_reason     TEXT,
    aborted_by       INTEGER,
    PRIMARY KEY (namespace, key),
    CONSTRAINT completed_has_response
        CHECK (state <> 2 OR (response IS NOT NULL AND completed_at IS NOT NULL))
) STRICT;

CREATE INDEX idemd_records_live_leases ON idemd_records (lease_expires_at) WHERE state = 1;
CREATE INDEX idemd_records_expiry ON idemd_records (expires_at);
