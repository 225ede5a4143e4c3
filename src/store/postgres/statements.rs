//! The one-key statements and the decoding of their rows: what every
//! transition runs when it runs alone, and what a batch falls back to.
//! The SQL is Postgres's; each transition is one statement keyed by
//! `(namespace, key)`, timed by the database's `now()`.

use std::time::Duration;

use sqlx::Row;

use super::session::PgSession;
use crate::domain::{BeginOutcome, BeginRequest, CompleteRequest, Completion, Lease, RecordId, new_lease_token};
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
    abort_reason = NULL, aborted_by = NULL,
    waiters          = false
WHERE r.expires_at <= now()
   OR (r.fingerprint = EXCLUDED.fingerprint
       AND (r.state = 3 OR (r.state = 1 AND r.lease_expires_at <= now())))
RETURNING namespace, key, attempt, lease_expires_at, downstream_key
"#
    };
}

pub(super) const BEGIN_ACQUIRE: &str = concat!(
    r#"
INSERT INTO idemd_records AS r
    (namespace, key, state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce,
     retention_us, created_at, updated_at, lease_expires_at, expires_at)
VALUES ($1, $2, 1, 1, $3, $6, $7, $8, $5, now(), now(),
        now() + $4::bigint * interval '1 microsecond',
        now() + greatest($4::bigint, $5::bigint) * interval '1 microsecond')
"#,
    begin_on_conflict!()
);

/// Group commit: many keys (distinct, sorted so concurrent batches lock rows
/// in one order) in one statement, one transaction.
pub(super) const BEGIN_ACQUIRE_BATCH: &str = concat!(
    r#"
INSERT INTO idemd_records AS r
    (namespace, key, state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce,
     retention_us, created_at, updated_at, lease_expires_at, expires_at)
SELECT b.namespace, b.key, 1, 1, b.fingerprint, b.downstream_key, b.lease_token, b.attempt_nonce,
       b.retention_us, now(), now(),
       now() + b.lease_us * interval '1 microsecond',
       now() + greatest(b.lease_us, b.retention_us) * interval '1 microsecond'
FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bigint[], $5::bigint[], $6::text[], $7::text[], $8::text[])
     AS b(namespace, key, fingerprint, lease_us, retention_us, downstream_key, lease_token, attempt_nonce)
ORDER BY b.namespace, b.key
"#,
    begin_on_conflict!()
);

/// Group commit of Completes: distinct keys, rows locked in key order.
pub(super) const COMPLETE_BATCH: &str = concat!(
    r#"
WITH b AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::int[], $6::text[])
        AS b(namespace, key, lease_token, response, response_code, content_type)
), locked AS MATERIALIZED (
    SELECT r.namespace, r.key FROM idemd_records r
    JOIN b ON r.namespace = b.namespace AND r.key = b.key
    ORDER BY r.namespace, r.key
    FOR UPDATE OF r
), done AS (
    UPDATE idemd_records r
    SET state = 2, response = b.response, response_code = b.response_code, content_type = b.content_type,
        completed_at = now(), updated_at = now(),
        expires_at = now() + r.retention_us * interval '1 microsecond'
    FROM b, locked l
    WHERE r.namespace = b.namespace AND r.key = b.key AND l.namespace = r.namespace AND l.key = r.key
      AND r.state = 1 AND r.lease_token = b.lease_token
      AND r.lease_expires_at > now() AND r.expires_at > now()
    RETURNING r.namespace, r.key, r.completed_at, r.expires_at, r.waiters
)
SELECT namespace, key, completed_at, expires_at, "#,
    notify_if_awaited!(),
    r#"
FROM done
"#
);

/// What holds the keys of a batch that did not acquire.
pub(super) const BEGIN_READ_BATCH: &str = r#"
SELECT r.namespace, r.key, state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce,
       lease_expires_at, response, response_code, content_type, completed_at, expires_at, now() AS now
FROM idemd_records r
JOIN unnest($1::text[], $2::text[]) AS k(namespace, key) ON r.namespace = k.namespace AND r.key = k.key
WHERE r.expires_at > now()
"#;

pub(super) const BEGIN_READ: &str = r#"
SELECT state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce, lease_expires_at,
       response, response_code, content_type, completed_at, expires_at, now() AS now
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
        expires_at = now() + retention_us * interval '1 microsecond'
    WHERE namespace = $1 AND key = $2 AND state = 1 AND lease_token = $3
      AND lease_expires_at > now() AND expires_at > now()
    RETURNING namespace, key, completed_at, expires_at, waiters
)
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
    SET state = 3, aborted_by = 1, abort_reason = $4, updated_at = now()
    WHERE namespace = $1 AND key = $2 AND state = 1 AND lease_token = $3
      AND lease_expires_at > now() AND expires_at > now()
    RETURNING namespace, key, waiters
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

pub(super) const LOOKUP: &str = r#"
SELECT namespace, key, state, attempt, fingerprint, downstream_key, created_at, updated_at,
       lease_expires_at, completed_at, expires_at, response, response_code, content_type,
       abort_reason, aborted_by
FROM idemd_records
WHERE namespace = $1 AND key = $2 AND expires_at > now()
"#;

pub(super) const REAP: &str = concat!(
    r#"
WITH due AS (
    SELECT namespace, key FROM idemd_records
    WHERE state = 1 AND lease_expires_at <= now()
    ORDER BY lease_expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), reaped AS (
    UPDATE idemd_records r
    SET state = 3, aborted_by = 2, abort_reason = $2, updated_at = now()
    FROM due
    WHERE r.namespace = due.namespace AND r.key = due.key
      AND r.state = 1 AND r.lease_expires_at <= now()
    RETURNING r.namespace, r.key, r.attempt, r.waiters
)
SELECT namespace, key, attempt, "#,
    notify_if_awaited!(),
    r#"
FROM reaped
"#
);

pub(super) const PURGE: &str = r#"
WITH due AS (
    SELECT namespace, key FROM idemd_records
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
DELETE FROM idemd_records r
USING due
WHERE r.namespace = due.namespace AND r.key = due.key AND r.expires_at <= now()
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
            row.map(|row| {
                Ok(BeginOutcome::Acquired(Lease {
                    lease_token: token,
                    attempt: rows::attempt_of(&row)?,
                    lease_expires_at: row.try_get("lease_expires_at")?,
                    downstream_key: row.try_get("downstream_key")?,
                }))
            })
            .transpose()
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
