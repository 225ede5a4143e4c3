-- One row per (namespace, key): the primary key is the UNIQUE constraint
-- that makes a duplicate acquisition impossible even if code were wrong.
-- Times are the database's clock (now()); durations are microseconds.
CREATE TABLE idemd_records (
    namespace        text        NOT NULL,
    key              text        NOT NULL,
    -- 1 IN_PROGRESS, 2 COMPLETED, 3 ABORTED
    state            smallint    NOT NULL CHECK (state IN (1, 2, 3)),
    attempt          integer     NOT NULL CHECK (attempt >= 1),
    fingerprint      bytea       NOT NULL,
    downstream_key   text        NOT NULL,
    -- the current attempt's token; kept after Complete/Abort so that a
    -- retried Complete or Abort by the same token is recognised
    lease_token      text        NOT NULL,
    attempt_nonce    text,
    -- the retention asked for by the latest acquisition; Complete uses it
    retention_us     bigint      NOT NULL CHECK (retention_us > 0),
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    lease_expires_at timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    completed_at     timestamptz,
    response         bytea,
    response_code    integer,
    content_type     text,
    abort_reason     text,
    -- 1 caller, 2 reaper
    aborted_by       smallint,
    PRIMARY KEY (namespace, key),
    -- there is never a COMPLETED record without its response
    CONSTRAINT completed_has_response
        CHECK (state <> 2 OR (response IS NOT NULL AND completed_at IS NOT NULL))
);

-- The reaper's scan: only in-flight leases.
CREATE INDEX idemd_records_live_leases ON idemd_records (lease_expires_at) WHERE state = 1;
-- The purger's scan.
CREATE INDEX idemd_records_expiry ON idemd_records (expires_at);
