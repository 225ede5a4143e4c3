-- Outcome unknown and history (API.md, "Outcome unknown, history and the
-- Admin service").
--
-- abort_reason, aborted_by, outcome_unknown and ended_at describe the latest
-- attempt that ended without completing: while ABORTED that attempt, while
-- IN_PROGRESS with attempt > 1 the attempt before (Acquired.previous). An
-- acquisition that takes over an expired lease writes them as the reaper
-- would have, and sets taken_over so that its history gets REAPED too.
ALTER TABLE idemd_records
    ADD COLUMN outcome_unknown boolean     NOT NULL DEFAULT false,
    ADD COLUMN ended_at        timestamptz,
    ADD COLUMN taken_over      boolean     NOT NULL DEFAULT false,
    -- the seq of the record's latest event; every transition adds to it
    -- under the row's lock, so a key's events are numbered in the order
    -- they happened
    ADD COLUMN history_seq     integer     NOT NULL DEFAULT 0,
    -- set by Invalidate: the removed record stays as a row that every call
    -- sees as absent (expires_at = the Invalidate), so that its events are
    -- kept until the purger removes both at this time
    ADD COLUMN tombstone_until timestamptz;

-- aborted_by gains 3: an operator (Admin.Release).

-- One row per transition of a record, written in the same statement.
CREATE TABLE idemd_events (
    namespace       text        NOT NULL,
    key             text        NOT NULL,
    seq             integer     NOT NULL,
    at              timestamptz NOT NULL,
    -- 1 ACQUIRED, 2 COMPLETED, 3 ABORTED, 4 REAPED, 5 RELEASED, 6 RESOLVED, 7 INVALIDATED
    kind            smallint    NOT NULL CHECK (kind BETWEEN 1 AND 7),
    attempt         integer     NOT NULL,
    principal       text        NOT NULL,
    reason          text        NOT NULL,
    response_code   integer,
    outcome_unknown boolean     NOT NULL,
    PRIMARY KEY (namespace, key, seq)
);

-- ListRecords: a namespace's records, newest first, ties by key.
CREATE INDEX idemd_records_recent ON idemd_records (namespace, updated_at DESC, key);
-- The same for aborted records only: what on-call lists during an outage,
-- found without walking past the completed ones.
CREATE INDEX idemd_records_recent_aborted ON idemd_records (namespace, updated_at DESC, key) WHERE state = 3;
