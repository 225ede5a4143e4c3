//! The Admin service's statements on SQLite: listing, history, and the
//! operator's actions, each a statement and its event in one transaction.

use std::sync::LazyLock;

use super::{NOW, SqliteStore, transition, with_clock};
use crate::domain::{Event, EventKind, Record, RecordId, new_lease_token};
use crate::error::{Error, Result};
use crate::operator::{InvalidateRequest, ListQuery, ReleaseRequest, ResolveRequest, Standing, act};
use crate::store::listing::{Dialect, ListValue, list_statement};
use crate::store::rows;

/// What the actions return: the record, and what their event is made of.
const ACTED: &str = "namespace, key, state, attempt, fingerprint, downstream_key, created_at, updated_at, \
     lease_expires_at, completed_at, expires_at, response, response_code, content_type, abort_reason, aborted_by, \
     outcome_unknown, history_seq";

static STANDING: LazyLock<String> = LazyLock::new(|| {
    with_clock(
        "SELECT state, attempt, lease_expires_at > $now AS lease_live FROM idemd_records \
         WHERE namespace = ?1 AND key = ?2 AND expires_at > $now",
    )
});

/// See the Postgres statement of the same name.
static RESOLVE: LazyLock<String> = LazyLock::new(|| {
    with_clock(&format!(
        "UPDATE idemd_records \
         SET state = 2, response = ?4, response_code = ?5, content_type = ?6, lease_token = ?9, \
             completed_at = $now, updated_at = $now, expires_at = $now + retention_us, history_seq = history_seq + 1 \
         WHERE namespace = ?1 AND key = ?2 AND expires_at > $now AND attempt = ?3 \
           AND (state = 3 OR (state = 1 AND lease_expires_at <= $now)) \
         RETURNING {ACTED}, ?7 AS event_reason, ?8 AS principal"
    ))
});

static RELEASE: LazyLock<String> = LazyLock::new(|| {
    with_clock(&format!(
        "UPDATE idemd_records \
         SET state = 3, aborted_by = 3, abort_reason = ?4, outcome_unknown = ?5, ended_at = $now, \
             updated_at = $now, history_seq = history_seq + 1 \
         WHERE namespace = ?1 AND key = ?2 AND expires_at > $now AND attempt = ?3 AND state = 1 \
         RETURNING {ACTED}, ?6 AS principal"
    ))
});

/// See the Postgres statement of the same name.
static INVALIDATE: LazyLock<String> = LazyLock::new(|| {
    with_clock(
        "UPDATE idemd_records \
         SET tombstone_until = max(expires_at, coalesce(tombstone_until, expires_at)), expires_at = $now, \
             updated_at = $now, state = 3, response = NULL, response_code = NULL, content_type = NULL, \
             completed_at = NULL, history_seq = history_seq + 1 \
         WHERE namespace = ?1 AND key = ?2 AND expires_at > $now AND NOT (state = 1 AND lease_expires_at > $now) \
         RETURNING namespace, key, attempt, updated_at, history_seq, ?3 AS event_reason, ?4 AS principal",
    )
});

static HISTORY: LazyLock<String> = LazyLock::new(|| {
    with_clock(
        "SELECT at, kind, attempt, principal, reason, response_code, outcome_unknown FROM idemd_events \
         WHERE namespace = ?1 AND key = ?2 \
           AND EXISTS (SELECT 1 FROM idemd_records r WHERE r.namespace = ?1 AND r.key = ?2 \
                       AND (r.expires_at > $now OR r.tombstone_until > $now)) \
         ORDER BY seq",
    )
});

const DIALECT: Dialect =
    Dialect { placeholder: '?', now: NOW, starts_with: "substr(key, 1, length({})) = {}", no_response: "NULL" };

impl SqliteStore {
    pub(super) async fn list_page(&self, query: &ListQuery) -> Result<Vec<Record>> {
        let (sql, values) = list_statement(query, &DIALECT);
        // Audited: fixed fragments and numbered placeholders; every value is bound.
        let statement = values.iter().fold(sqlx::query(sqlx::AssertSqlSafe(sql)), |statement, value| match value {
            ListValue::Text(text) => statement.bind(*text),
            ListValue::Time(time) => statement.bind(time.timestamp_micros()),
            ListValue::Int(int) => statement.bind(*int),
        });
        let rows = statement.fetch_all(&self.pool).await?;
        rows.iter().map(rows::record).collect()
    }

    pub(super) async fn events(&self, id: &RecordId) -> Result<Vec<Event>> {
        let rows = sqlx::query(HISTORY.as_str())
            .bind(id.namespace.as_str())
            .bind(id.key.as_str())
            .fetch_all(&self.pool)
            .await?;
        if rows.is_empty() {
            return Err(Error::NotFound);
        }
        rows.iter().map(rows::event).collect()
    }

    async fn standing(&self, id: &RecordId) -> Result<Option<Standing>> {
        let row = sqlx::query(STANDING.as_str())
            .bind(id.namespace.as_str())
            .bind(id.key.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::standing).transpose()
    }

    pub(super) async fn resolve_record(&self, request: &ResolveRequest) -> Result<Record> {
        let resolve = || async {
            let (pool, owned) = (self.pool.clone(), request.clone());
            let statement = async move {
                let statement = sqlx::query(RESOLVE.as_str())
                    .bind(owned.id.namespace.as_str())
                    .bind(owned.id.key.as_str())
                    .bind(i64::from(owned.attempt))
                    .bind(owned.response.as_slice())
                    .bind(owned.response_code)
                    .bind(owned.content_type.as_str())
                    .bind(owned.reason.as_str())
                    .bind(owned.principal.as_str())
                    .bind(new_lease_token());
                transition(&pool, statement, EventKind::Resolved).await
            };
            self.settle(&request.id, statement).await?.as_ref().map(rows::record).transpose()
        };
        let why = |standing| Standing::why_not_resolved(standing, request.attempt);
        act(resolve, || self.standing(&request.id), why).await
    }

    pub(super) async fn release_record(&self, request: &ReleaseRequest) -> Result<Record> {
        let release = || async {
            let (pool, owned) = (self.pool.clone(), request.clone());
            let statement = async move {
                let statement = sqlx::query(RELEASE.as_str())
                    .bind(owned.id.namespace.as_str())
                    .bind(owned.id.key.as_str())
                    .bind(i64::from(owned.attempt))
                    .bind(owned.reason.as_str())
                    .bind(owned.outcome_unknown)
                    .bind(owned.principal.as_str());
                transition(&pool, statement, EventKind::Released).await
            };
            self.settle(&request.id, statement).await?.as_ref().map(rows::record).transpose()
        };
        let why = |standing| Standing::why_not_released(standing, request.attempt);
        act(release, || self.standing(&request.id), why).await
    }

    pub(super) async fn invalidate_record(&self, request: &InvalidateRequest) -> Result<()> {
        let invalidate = || async {
            let (pool, owned) = (self.pool.clone(), request.clone());
            let statement = async move {
                let statement = sqlx::query(INVALIDATE.as_str())
                    .bind(owned.id.namespace.as_str())
                    .bind(owned.id.key.as_str())
                    .bind(owned.reason.as_str())
                    .bind(owned.principal.as_str());
                transition(&pool, statement, EventKind::Invalidated).await
            };
            Ok(self.settle(&request.id, statement).await?.map(|_| ()))
        };
        act(invalidate, || self.standing(&request.id), Standing::why_not_invalidated).await
    }
}
