//! The Admin service's statements on Postgres: listing, history, and the
//! operator's actions, each one statement that changes the record and
//! appends its event together.

use super::PgStore;
use super::statements::{notify_if_awaited, record_columns};
use crate::domain::{Event, Record, RecordId, new_lease_token};
use crate::error::{Error, Result};
use crate::operator::{InvalidateRequest, ListQuery, ReleaseRequest, ResolveRequest, Standing, act};
use crate::store::listing::{Dialect, ListValue, list_statement};
use crate::store::rows;

/// Where a record stands, read when an action changed nothing.
pub(super) const STANDING: &str = r#"
SELECT state, attempt, lease_expires_at > now() AS lease_live
FROM idemd_records
WHERE namespace = $1 AND key = $2 AND expires_at > now()
"#;

/// An ABORTED record, or an IN_PROGRESS one whose lease expired, of the
/// given attempt becomes COMPLETED as if that attempt had completed it. A
/// fresh lease token ($9) means the former holder's late Complete is
/// LEASE_LOST, not taken for its own.
pub(super) const RESOLVE: &str = concat!(
    r#"
WITH done AS (
    UPDATE idemd_records
    SET state = 2, response = $4, response_code = $5, content_type = $6, lease_token = $9,
        completed_at = now(), updated_at = now(),
        expires_at = now() + retention_us * interval '1 microsecond',
        history_seq = history_seq + 1
    WHERE namespace = $1 AND key = $2 AND expires_at > now() AND attempt = $3
      AND (state = 3 OR (state = 1 AND lease_expires_at <= now()))
    RETURNING "#,
    record_columns!(),
    r#", waiters, history_seq
), history AS (
    INSERT INTO idemd_events (namespace, key, seq, at, kind, attempt, principal, reason, response_code, outcome_unknown)
    SELECT namespace, key, history_seq, now(), 6, attempt, $8, $7, response_code, false FROM done
)
SELECT "#,
    record_columns!(),
    ", ",
    notify_if_awaited!(),
    r#"
FROM done
"#
);

pub(super) const RELEASE: &str = concat!(
    r#"
WITH released AS (
    UPDATE idemd_records
    SET state = 3, aborted_by = 3, abort_reason = $4, outcome_unknown = $5, ended_at = now(),
        updated_at = now(), history_seq = history_seq + 1
    WHERE namespace = $1 AND key = $2 AND expires_at > now() AND attempt = $3 AND state = 1
    RETURNING "#,
    record_columns!(),
    r#", waiters, history_seq
), history AS (
    INSERT INTO idemd_events (namespace, key, seq, at, kind, attempt, principal, reason, outcome_unknown)
    SELECT namespace, key, history_seq, now(), 5, attempt, $6, $4, $5 FROM released
)
SELECT "#,
    record_columns!(),
    ", ",
    notify_if_awaited!(),
    r#"
FROM released
"#
);

/// The record becomes a tombstone: absent to every call from now on
/// (`expires_at = now()`), its response dropped, kept with its history
/// until the removed record's own `expires_at`.
pub(super) const INVALIDATE: &str = concat!(
    r#"
WITH removed AS (
    UPDATE idemd_records
    SET tombstone_until = greatest(expires_at, tombstone_until), expires_at = now(), updated_at = now(),
        state = 3, response = NULL, response_code = NULL, content_type = NULL, completed_at = NULL,
        history_seq = history_seq + 1
    WHERE namespace = $1 AND key = $2 AND expires_at > now()
      AND NOT (state = 1 AND lease_expires_at > now())
    RETURNING namespace, key, attempt, waiters, history_seq
), history AS (
    INSERT INTO idemd_events (namespace, key, seq, at, kind, attempt, principal, reason, outcome_unknown)
    SELECT namespace, key, history_seq, now(), 7, attempt, $4, $3, false FROM removed
)
SELECT "#,
    notify_if_awaited!(),
    r#"
FROM removed
"#
);

/// A key's events while its record is live or its tombstone kept.
pub(super) const HISTORY: &str = r#"
SELECT at, kind, attempt, principal, reason, response_code, outcome_unknown
FROM idemd_events
WHERE namespace = $1 AND key = $2
  AND EXISTS (SELECT 1 FROM idemd_records r
              WHERE r.namespace = $1 AND r.key = $2 AND (r.expires_at > now() OR r.tombstone_until > now()))
ORDER BY seq
"#;

const DIALECT: Dialect =
    Dialect { placeholder: '$', now: "now()", starts_with: "starts_with(key, {})", no_response: "NULL::bytea" };

impl PgStore {
    pub(super) async fn list_page(&self, query: &ListQuery) -> Result<Vec<Record>> {
        let (sql, values) = list_statement(query, &DIALECT);
        let rows = self
            .single
            .session()
            .fetch_all(|| {
                // Audited: fixed fragments and numbered placeholders; every value is bound.
                values.iter().fold(sqlx::query(sqlx::AssertSqlSafe(sql.as_str())), |statement, value| match value {
                    ListValue::Text(text) => statement.bind(*text),
                    ListValue::Time(time) => statement.bind(*time),
                    ListValue::Int(int) => statement.bind(*int),
                })
            })
            .await?;
        rows.iter().map(rows::record).collect()
    }

    pub(super) async fn events(&self, id: &RecordId) -> Result<Vec<Event>> {
        let rows = self
            .single
            .session()
            .fetch_all(|| sqlx::query(HISTORY).bind(id.namespace.as_str()).bind(id.key.as_str()))
            .await?;
        if rows.is_empty() {
            return Err(Error::NotFound);
        }
        rows.iter().map(rows::event).collect()
    }

    async fn standing(&self, id: &RecordId) -> Result<Option<Standing>> {
        let row = self
            .single
            .session()
            .fetch_optional(|| sqlx::query(STANDING).bind(id.namespace.as_str()).bind(id.key.as_str()))
            .await?;
        row.as_ref().map(rows::standing).transpose()
    }

    pub(super) async fn resolve_record(&self, request: &ResolveRequest) -> Result<Record> {
        let (id, attempt) = (&request.id, fencing_attempt(request.attempt)?);
        let resolve = || async {
            let row = self
                .single
                .session()
                .fetch_optional(|| {
                    sqlx::query(RESOLVE)
                        .bind(id.namespace.as_str())
                        .bind(id.key.as_str())
                        .bind(attempt)
                        .bind(request.response.as_slice())
                        .bind(request.response_code)
                        .bind(request.content_type.as_str())
                        .bind(request.reason.as_str())
                        .bind(request.principal.as_str())
                        .bind(new_lease_token())
                })
                .await?;
            row.as_ref().map(rows::record).transpose()
        };
        let record =
            act(resolve, || self.standing(id), |standing| Standing::why_not_resolved(standing, request.attempt))
                .await?;
        self.woke(id);
        Ok(record)
    }

    pub(super) async fn release_record(&self, request: &ReleaseRequest) -> Result<Record> {
        let (id, attempt) = (&request.id, fencing_attempt(request.attempt)?);
        let release = || async {
            let row = self
                .single
                .session()
                .fetch_optional(|| {
                    sqlx::query(RELEASE)
                        .bind(id.namespace.as_str())
                        .bind(id.key.as_str())
                        .bind(attempt)
                        .bind(request.reason.as_str())
                        .bind(request.outcome_unknown)
                        .bind(request.principal.as_str())
                })
                .await?;
            row.as_ref().map(rows::record).transpose()
        };
        let record =
            act(release, || self.standing(id), |standing| Standing::why_not_released(standing, request.attempt))
                .await?;
        self.woke(id);
        Ok(record)
    }

    pub(super) async fn invalidate_record(&self, request: &InvalidateRequest) -> Result<()> {
        let id = &request.id;
        let invalidate = || async {
            let row = self
                .single
                .session()
                .fetch_optional(|| {
                    sqlx::query(INVALIDATE)
                        .bind(id.namespace.as_str())
                        .bind(id.key.as_str())
                        .bind(request.reason.as_str())
                        .bind(request.principal.as_str())
                })
                .await?;
            Ok(row.map(|_| ()))
        };
        act(invalidate, || self.standing(id), Standing::why_not_invalidated).await?;
        self.woke(id);
        Ok(())
    }
}

/// The attempt as Postgres's `integer` column holds it.
fn fencing_attempt(attempt: u32) -> Result<i32> {
    i32::try_from(attempt).map_err(|_| Error::invalid("attempt", "attempt is out of range"))
}
