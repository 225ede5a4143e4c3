-- Set by a Begin that parks on this attempt; reset by the next acquisition.
-- Complete, Abort and the reaper NOTIFY only when it is set: a NOTIFY takes
-- a database-wide lock until its transaction has committed, so notifying
-- on every Complete would serialise every Complete's commit.
ALTER TABLE idemd_records ADD COLUMN IF NOT EXISTS waiters boolean NOT NULL DEFAULT false;
