-- The reaper's index, restated so that only the reaper is planned on it.
--
-- Every transition of an in-flight attempt (Complete, Abort, Heartbeat, a
-- waiter's mark) finds its row by the primary key and also says
-- `state = 1`, which implied the old predicate: Postgres could plan such a
-- one-key statement as a walk of this index instead, and did whenever its
-- statistics made live leases look rare (taken while none was in flight,
-- or with lease_expires_at's histogram behind now()). That walk visits every
-- lease in flight to change one row, a cost that grows with the load.
--
-- `completed_at IS NULL` holds for every in-flight record (an acquisition
-- clears it) and no transition states it; the reaper does.
DROP INDEX idemd_records_live_leases;
CREATE INDEX idemd_records_live_leases ON idemd_records (lease_expires_at)
    WHERE state = 1 AND completed_at IS NULL;
