//! The one-key statements and the decoding of their rows: what every
//! transition runs when it runs alone, and what a batch falls back to.
//! The SQL is Postgres's; each transition is one statement keyed by
//! `(namespace, key)`, timed by the database's `now()`.

use std::time::Duration;

use sqlx::Row;

use super::session::PgSession;
use crate::domain::{BeginOutcome, BeginRequest, CompleteRequest, Completion, RecordId, new_lease_token};
use crate::error::Result;
use crate::store::{TokenCheck, begin_rounds, bind_acquire, rows, why_unchanged};

/// The one-key statements over a session: what `PgStore` runs when a call
/// is alone, and what group commit's batches fall back to.
#[derive(Clone, Debug)]
pub(super) struct SingleKey {
    session: PgSession,
    store_timeout: Duration,
}

/// What a transition ending an attempt selects last: the NOTIFY on
/// [`WAKE_CHANNEL`] (payload `namespace/key`), only when a waiter marked the
/// attempt (see `WATCH`). Shared by Complete, Abort, the reaper and the
/// batched Complete; each returns `waiters` from its UPDATE.
macro_rules! notify_if_awaited {
    () => {
        "CASE WHEN waiters THEN pg_notify('idemd_wake', namespace || '/' || key)::text END AS notified"
    };
}

/// What Lookup and the Admin service read of a record (the response
/// included: lists select their own columns).
macro_rules! record_columns {
    () => {
        "namespace, key, state, attempt, fingerprint, downstream_key, created_at, updated_at, \
         lease_expires_at, completed_at, expires_at, response, response_code, content_type, \
         abort_reason, aborted_by, outcome_unknown"
    };
}

pub(super) use {notify_if_awaited, record_columns};

/// Begin's conflict rule, shared by the one-key and the batched statement.
macro_rules! begin_on_conflict {
    () => {
        r#"
ON CONFLICT (namespace, key) DO UPDATE SET
    attempt          = CASE WHEN r.expires_at <= now() THEN 1 ELSE r.attempt + 1 END,
    downstream_key   = CASE WHEN r.expires_at <= now() THEN EXCLUDED.downstream_key ELSE r.downstream_key END,
    created_at       = CASE WHEN r.expires_at <= now() THEN now() ELSE r.created_at END,
    expires_at       = CASE WHEN r.expires_at <= now() THEN EXCLUDED.expires_at
                            ELSE greatest(r.expires_at, EXCLUDED.expires_at) END,
    fingerprint      = EXCLUDED.fingerprint,
    state            = 1,
    lease_token      = EXCLUDED.lease_token,
    attempt_nonce    = EXCLUDED.attempt_nonce,
    retention_us     = EXCLUDED.retention_us,
    updated_at       = now(),
    lease_expires_at = EXCLUDED.lease_expires_at,
    completed_at = NULL, response = NULL, response_code = NULL, content_type = NULL,
    waiters          = false,
    -- How the previous attempt ended (Acquired.previous): as it was aborted,
    -- or, for an expired lease taken over here, as the reaper would write it.
    taken_over       = r.expires_at > now() AND r.state = 1,
    aborted_by       = CASE WHEN r.expires_at <= now() THEN NULL WHEN r.state = 1 THEN 2 ELSE r.aborted_by END,
    abort_reason     = CASE WHEN r.expires_at <= now() THEN NULL WHEN r.state = 1 THEN $10 ELSE r.abort_reason END,
    outcome_unknown  = CASE WHEN r.expires_at <= now() THEN false WHEN r.state = 1 THEN true ELSE r.outcome_unknown END,
    ended_at         = CASE WHEN r.expires_at <= now() THEN NULL WHEN r.state = 1 THEN r.lease_expires_at ELSE r.ended_at END,
    history_seq      = r.history_seq + CASE WHEN r.expires_at > now() AND r.state = 1 THEN 2 ELSE 1 END
WHERE r.expires_at <= now()
   OR (r.fingerprint = EXCLUDED.fingerprint
       AND (r.state = 3 OR (r.state = 1 AND r.lease_expires_at <= now())))
RETURNING namespace, key, attempt, lease_expires_at, downstream_key, history_seq, taken_over,
          aborted_by, abort_reason, outcome_unknown, ended_at
"#
    };
}

/// The events of an acquisition, from its `acquired` rows and a
/// `principals` relation of (namespace, key, principal): REAPED for an
/// expired lease it took over, then ACQUIRED.
macro_rules! acquisition_events {
    () => {
        r#"
, acquired_history AS (
    INSERT INTO idemd_events (namespace, key, seq, at, kind, attempt, principal, reason, outcome_unknown)
    SELECT a.namespace, a.key, a.history_seq - 1, now(), 4, a.attempt - 1, 'reaper', a.abort_reason, true
    FROM acquired a WHERE a.taken_over
    UNION ALL
    SELECT a.namespace, a.key, a.history_seq, now(), 1, a.attempt, p.principal, '', false
    FROM acquired a JOIN principals p ON p.namespace = a.namespace AND p.key = a.key
)"#
    };
}

/// What an acquisition returns, from its `acquired` rows.
macro_rules! acquired_columns {
    () => {
        "namespace, key, attempt, lease_expires_at, downstream_key, aborted_by, abort_reason, outcome_unknown, ended_at"
    };
}

/// The COMPLETED events of the rows a Complete returned as `done`.
macro_rules! completion_events {
    () => {
        r#"
, completed_history AS (
    INSERT INTO idemd_events (namespace, key, seq, at, kind, attempt, principal, reason, response_code, outcome_unknown)
    SELECT namespace, key, history_seq, now(), 2, attempt, principal, '', response_code, false FROM done
)"#
    };
}

pub(super) const BEGIN_ACQUIRE: &str = concat!(
    r#"
WITH principals AS (SELECT $1::text AS namespace, $2::text AS key, $9::text AS principal),
acquired AS (
INSERT INTO idemd_records AS r
    (namespace, key, state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce,
     retention_us, created_at, updated_at, lease_expires_at, expires_at, history_seq)
VALUES ($1, $2, 1, 1, $3, $6, $7, $8, $5, now(), now(),
        now() + $4::bigint * interval '1 microsecond',
        now() + greatest($4::bigint, $5::bigint) * interval '1 microsecond', 1)
"#,
    begin_on_conflict!(),
    ")",
    acquisition_events!(),
    "\nSELECT ",
    acquired_columns!(),
    " FROM acquired\n"
);

/// Group commit of Begins: many keys (distinct, sorted so concurrent
/// batches lock rows in one order) acquired in one statement, as CTEs
/// `principals`, `acquired` and their history. Parameters $1 to $10.
macro_rules! acquire_batch_ctes {
    () => {
        concat!(
            r#"
principals AS (
    SELECT * FROM unnest($1::text[], $2::text[], $9::text[]) AS p(namespace, key, principal)
), acquired AS (
INSERT INTO idemd_records AS r
    (namespace, key, state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce,
     retention_us, created_at, updated_at, lease_expires_at, expires_at, history_seq)
SELECT b.namespace, b.key, 1, 1, b.fingerprint, b.downstream_key, b.lease_token, b.attempt_nonce,
       b.retention_us, now(), now(),
       now() + b.lease_us * interval '1 microsecond',
       now() + greatest(b.lease_us, b.retention_us) * interval '1 microsecond', 1
FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bigint[], $5::bigint[], $6::text[], $7::text[], $8::text[])
     AS b(namespace, key, fingerprint, lease_us, retention_us, downstream_key, lease_token, attempt_nonce)
ORDER BY b.namespace, b.key
"#,
            begin_on_conflict!(),
            ")",
            acquisition_events!()
        )
    };
}

/// One row per key acquired, `kind` 1 as in [`BEGIN_COMPLETE_BATCH`].
pub(super) const BEGIN_ACQUIRE_BATCH: &str =
    concat!("WITH ", acquire_batch_ctes!(), "\nSELECT 1 AS kind, ", acquired_columns!(), " FROM acquired\n");

/// Group commit of Completes: the CTEs after `completing`, the batch's
/// (namespace, key, lease_token, response, response_code, content_type,
/// principal), in key order: `done` and its history.
macro_rules! complete_batch_ctes {
    () => {
        concat!(
            r#"
, done AS (
    UPDATE idemd_records r
    SET state = 2, response = c.response, response_code = c.response_code, content_type = c.content_type,
        completed_at = now(), updated_at = now(),
        expires_at = now() + r.retention_us * interval '1 microsecond',
        history_seq = r.history_seq + 1
    FROM completing c
    WHERE r.namespace = c.namespace AND r.key = c.key
      AND r.state = 1 AND r.lease_token = c.lease_token
      AND r.lease_expires_at > now() AND r.expires_at > now()
    RETURNING r.namespace, r.key, r.completed_at, r.expires_at, r.waiters, r.history_seq, r.attempt,
              r.response_code, c.principal
)"#,
            completion_events!()
        )
    };
}

/// The batch of Completes as a relation, from seven arrays starting at the
/// given parameter.
macro_rules! completing {
    ($ns:literal, $key:literal, $token:literal, $response:literal, $code:literal, $type:literal, $principal:literal) => {
        concat!(
            "completing AS (\n    SELECT * FROM unnest(",
            $ns,
            "::text[], ",
            $key,
            "::text[], ",
            $token,
            "::text[], ",
            $response,
            "::bytea[], ",
            $code,
            "::int[], ",
            $type,
            "::text[], ",
            $principal,
            "::text[])\n",
            "        AS c(namespace, key, lease_token, response, response_code, content_type, principal)\n)"
        )
    };
}

/// Group commit of Completes: distinct keys, in key order. One row per key
/// completed, `kind` 2 as in [`BEGIN_COMPLETE_BATCH`].
pub(super) const COMPLETE_BATCH: &str = concat!(
    "WITH ",
    completing!("$1", "$2", "$3", "$4", "$5", "$6", "$7"),
    complete_batch_ctes!(),
    "\nSELECT 2 AS kind, namespace, key, completed_at, expires_at, ",
    notify_if_awaited!(),
    "\nFROM done\n"
);

/// Group commit of Begins and Completes together, one statement and one
/// commit: the Begins' parameters are $1 to $10 as in
/// [`BEGIN_ACQUIRE_BATCH`], the Completes' $11 to $17 in
/// [`COMPLETE_BATCH`]'s order. No key is in both. One row per key acquired
/// (`kind` 1) or completed (`kind` 2), with the columns of the statement
/// it stands for.
pub(super) const BEGIN_COMPLETE_BATCH: &str = concat!(
    "WITH ",
    acquire_batch_ctes!(),
    ", ",
    completing!("$11", "$12", "$13", "$14", "$15", "$16", "$17"),
    complete_batch_ctes!(),
    "\nSELECT 1 AS kind, ",
    acquired_columns!(),
    r#", NULL::timestamptz AS completed_at, NULL::timestamptz AS expires_at, NULL::text AS notified
FROM acquired
UNION ALL
SELECT 2, namespace, key, NULL, NULL, NULL, NULL, NULL, NULL, NULL, completed_at, expires_at, "#,
    notify_if_awaited!(),
    "\nFROM done\n"
);

/// What holds the keys of a batch that did not acquire.
pub(super) const BEGIN_READ_BATCH: &str = r#"
SELECT r.namespace, r.key, state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce,
       lease_expires_at, response, response_code, content_type, completed_at, expires_at,
       aborted_by, abort_reason, outcome_unknown, ended_at, now() AS now
FROM idemd_records r
JOIN unnest($1::text[], $2::text[]) AS k(namespace, key) ON r.namespace = k.namespace AND r.key = k.key
WHERE r.expires_at > now()
"#;

pub(super) const BEGIN_READ: &str = r#"
SELECT state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce, lease_expires_at,
       response, response_code, content_type, completed_at, expires_at,
       aborted_by, abort_reason, outcome_unknown, ended_at, now() AS now
FROM idemd_records
WHERE namespace = $1 AND key = $2 AND expires_at > now()
"#;

/// A waiter's mark on the attempt it waits for. True when the mark is
/// there (set now, or by another waiter before); false when the attempt is
/// no longer in flight, and the waiter should look again. A transition after
/// a true answer locks the row after the mark and so sees it.
pub(super) const WATCH: &str = r#"
WITH marked AS (
    UPDATE idemd_records SET waiters = true
    WHERE namespace = $1 AND key = $2 AND state = 1 AND attempt = $3 AND NOT waiters
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM marked)
    OR EXISTS (SELECT 1 FROM idemd_records
               WHERE namespace = $1 AND key = $2 AND state = 1 AND attempt = $3 AND waiters) AS watched
"#;

pub(super) const COMPLETE: &str = concat!(
    r#"
WITH done AS (
    UPDATE idemd_records
    SET state = 2, response = $4, response_code = $5, content_type = $6,
        completed_at = now(), updated_at = now(),
        expires_at = now() + retention_us * interval '1 microsecond',
        history_seq = history_seq + 1
    WHERE namespace = $1 AND key = $2 AND state = 1 AND lease_token = $3
      AND lease_expires_at > now() AND expires_at > now()
    RETURNING namespace, key, completed_at, expires_at, waiters, history_seq, attempt, response_code,
              $7::text AS principal
)"#,
    completion_events!(),
    r#"
SELECT completed_at, expires_at, "#,
    notify_if_awaited!(),
    r#"
FROM done
"#
);

pub(super) const ABORT: &str = concat!(
    r#"
WITH aborted AS (
    UPDATE idemd_records
    SET state = 3, aborted_by = 1, abort_reason = $4, outcome_unknown = $5, ended_at = now(),
        updated_at = now(), history_seq = history_seq + 1
    WHERE namespace = $1 AND key = $2 AND state = 1 AND lease_token = $3
      AND lease_expires_at > now() AND expires_at > now()
    RETURNING namespace, key, waiters, history_seq, attempt
), history AS (
    INSERT INTO idemd_events (namespace, key, seq, at, kind, attempt, principal, reason, outcome_unknown)
    SELECT namespace, key, history_seq, now(), 3, attempt, $6, $4, $5 FROM aborted
)
SELECT "#,
    notify_if_awaited!(),
    r#" FROM aborted
"#
);

pub(super) const HEARTBEAT: &str = r#"
UPDATE idemd_records
SET lease_expires_at = now() + $4::bigint * interval '1 microsecond',
    expires_at = greatest(expires_at,
                          now() + retention_us * interval '1 microsecond',
                          now() + $4::bigint * interval '1 microsecond'),
    updated_at = now()
WHERE namespace = $1 AND key = $2 AND state = 1 AND lease_token = $3
  AND lease_expires_at > now() AND expires_at > now()
RETURNING lease_expires_at
"#;

pub(super) const TOKEN_CHECK: &str = r#"
SELECT state, lease_token, aborted_by, completed_at, expires_at
FROM idemd_records
WHERE namespace = $1 AND key = $2 AND expires_at > now()
"#;

pub(super) const LOOKUP: &str = concat!(
    r#"
SELECT "#,
    record_columns!(),
    r#"
FROM idemd_records
WHERE namespace = $1 AND key = $2 AND expires_at > now()
"#
);

pub(super) const REAP: &str = concat!(
    r#"
WITH due AS (
    SELECT namespace, key FROM idemd_records
    -- completed_at IS NULL: the live-leases index's predicate (see its migration)
    WHERE state = 1 AND completed_at IS NULL AND lease_expires_at <= now() AND expires_at > now()
    ORDER BY lease_expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), reaped AS (
    UPDATE idemd_records r
    SET state = 3, aborted_by = 2, abort_reason = $2, outcome_unknown = true, ended_at = r.lease_expires_at,
        updated_at = now(), history_seq = r.history_seq + 1
    FROM due
    WHERE r.namespace = due.namespace AND r.key = due.key
      AND r.state = 1 AND r.lease_expires_at <= now() AND r.expires_at > now()
    RETURNING r.namespace, r.key, r.attempt, r.waiters, r.history_seq, r.lease_expires_at, r.updated_at
), history AS (
    INSERT INTO idemd_events (namespace, key, seq, at, kind, attempt, principal, reason, outcome_unknown)
    SELECT namespace, key, history_seq, now(), 4, attempt, 'reaper', $2, true FROM reaped
)
SELECT namespace, key, attempt, lease_expires_at, updated_at, "#,
    notify_if_awaited!(),
    r#"
FROM reaped
"#
);

/// Expired records and their history; an invalidated record's row and
/// history stay until its `tombstone_until`. A record past `expires_at` is
/// never changed by a transition but its re-creation (the reaper skips it),
/// so the history deleted here is all of the row's. One row per record
/// deleted, with when it was due, for the purger's lag.
pub(super) const PURGE: &str = r#"
WITH due AS (
    SELECT namespace, key FROM idemd_records
    WHERE expires_at <= now() AND (tombstone_until IS NULL OR tombstone_until <= now())
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM idemd_records r
    USING due
    WHERE r.namespace = due.namespace AND r.key = due.key
      AND r.expires_at <= now() AND (r.tombstone_until IS NULL OR r.tombstone_until <= now())
    RETURNING r.namespace, r.key, greatest(r.expires_at, r.tombstone_until) AS due_at
), history AS (
    DELETE FROM idemd_events e USING gone WHERE e.namespace = gone.namespace AND e.key = gone.key
)
SELECT due_at, now() AS purged_at FROM gone
"#;

impl SingleKey {
    pub(super) fn new(session: PgSession, store_timeout: Duration) -> Self {
        SingleKey { session, store_timeout }
    }

    pub(super) fn session(&self) -> &PgSession {
        &self.session
    }

    /// How long one call, or one batch, may take in the database.
    pub(super) fn store_timeout(&self) -> Duration {
        self.store_timeout
    }

    /// Complete for one key: the conditional update, then (if it changed
    /// nothing) a read that says why.
    pub(super) async fn complete_single(&self, request: &CompleteRequest) -> Result<Completion> {
        let id = &request.id;
        let row = self
            .session
            .fetch_optional(|| {
                sqlx::query(COMPLETE)
                    .bind(id.namespace.as_str())
                    .bind(id.key.as_str())
                    .bind(request.lease_token.as_str())
                    .bind(request.response.as_slice())
                    .bind(request.response_code)
                    .bind(request.content_type.as_str())
                    .bind(request.principal.as_str())
            })
            .await?;
        if let Some(row) = row {
            return Ok(Completion {
                completed_at: row.try_get("completed_at")?,
                expires_at: row.try_get("expires_at")?,
            });
        }
        why_unchanged(self.token_check(id).await?, |check| check.repeated_complete(&request.lease_token))
    }

    /// Begin for one key: the atomic acquisition, then (if it did not
    /// acquire) a read of what holds the key.
    pub(super) async fn begin_single(&self, request: &BeginRequest) -> Result<BeginOutcome> {
        let id = &request.id;
        let acquire = || async {
            let token = new_lease_token();
            let row = self.session.fetch_optional(|| bind_acquire(sqlx::query(BEGIN_ACQUIRE), request, &token)).await?;
            row.map(|row| Ok(BeginOutcome::Acquired(rows::acquired_lease(&row, token)?))).transpose()
        };
        let read = || async {
            let row = self
                .session
                .fetch_optional(|| sqlx::query(BEGIN_READ).bind(id.namespace.as_str()).bind(id.key.as_str()))
                .await?;
            row.map(|row| rows::current_record(&row)).transpose()
        };
        begin_rounds(request, acquire, read).await
    }

    pub(super) async fn token_check(&self, id: &RecordId) -> Result<Option<TokenCheck>> {
        let row = self
            .session
            .fetch_optional(|| sqlx::query(TOKEN_CHECK).bind(id.namespace.as_str()).bind(id.key.as_str()))
            .await?;
        row.as_ref().map(rows::token_check).transpose()
    }
}
