//! The embedded store (the default without a Postgres URL): one SQLite file
//! in WAL mode for a laptop, a demo or one small instance. Same transitions
//! as Postgres, each one statement; time is SQLite's own clock (this
//! machine's), read inside each statement, in microseconds since the Unix
//! epoch. Waiters are woken in-process.

mod admin;

use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};

use super::rows::{self, StoredRow};
use super::{Store, TokenCheck, begin_rounds, bind_acquire, why_unchanged};
use crate::config::DatabaseConfig;
use crate::domain::{
    AbortRequest, BeginOutcome, BeginRequest, CompleteRequest, Completion, Event, EventKind, REAPER_PRINCIPAL,
    REAPER_REASON, ReapedLease, Record, RecordId, Timestamp, micros, new_lease_token,
};
use crate::error::{Error, Result};
use crate::operator::{InvalidateRequest, ListQuery, ReleaseRequest, ResolveRequest};
use crate::wakeups::Wakeups;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    wakeups: Arc<Wakeups>,
}

/// SQLite's clock in microseconds since the Unix epoch, written `$now` in
/// the statements below. SQLite reads the clock once per statement, so every
/// use within one statement agrees, and it reads it when the statement runs,
/// after any wait for a connection or for the write lock.
pub(super) const NOW: &str = "CAST(unixepoch('subsec') * 1000000 AS INTEGER)";

pub(super) fn with_clock(sql: &str) -> String {
    sql.replace("$now", NOW)
}

impl SqliteStore {
    /// Runs a Complete or Abort statement to its end in a task of its own
    /// and wakes the key's waiters when it changed the record. SQLite
    /// finishes a statement it has started even when the call that sent it
    /// is dropped (the caller's deadline, a hang-up, the store timeout while
    /// the write lock is busy); the wake-up must not be dropped with that
    /// call, or the waiters would sit until their safety-net re-check.
    async fn settle<F>(&self, id: &RecordId, statement: F) -> Result<Option<SqliteRow>>
    where
        F: Future<Output = Result<Option<SqliteRow>>> + Send + 'static,
    {
        let (wakeups, id) = (Arc::clone(&self.wakeups), id.clone());
        let settled = tokio::spawn(async move {
            let row = statement.await?;
            if row.is_some() {
                wakeups.wake(&id);
            }
            Ok::<_, Error>(row)
        });
        settled.await.map_err(|error| Error::Internal(format!("a store task ended early: {error}")))?
    }

    pub async fn connect(config: &DatabaseConfig, wakeups: Arc<Wakeups>) -> Result<Self> {
        let url = config.database_url.expose();
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let options = SqliteConnectOptions::from_str(url)
            .map_err(Error::StoreUnavailable)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit acknowledged to a caller survives a power loss.
            .synchronous(SqliteSynchronous::Full)
            // Writers queue on SQLite's single write lock for at most this long.
            .busy_timeout(config.store_timeout)
            .log_statements(tracing::log::LevelFilter::Trace);
        let mut pool =
            SqlitePoolOptions::new().max_connections(config.db_max_connections).acquire_timeout(config.store_timeout);
        if in_memory {
            // Each connection to :memory: is its own database: keep exactly one, forever.
            pool = pool.max_connections(1).min_connections(1).idle_timeout(None).max_lifetime(None);
        }
        let pool = pool.connect_with(options).await?;
        Ok(SqliteStore { pool, wakeups })
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    async fn token_check(&self, id: &RecordId) -> Result<Option<TokenCheck>> {
        let row = sqlx::query(TOKEN_CHECK.as_str())
            .bind(id.namespace.as_str())
            .bind(id.key.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::token_check).transpose()
    }
}

const BEGIN_ACQUIRE_SQL: &str = r#"
INSERT INTO idemd_records
    (namespace, key, state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce,
     retention_us, created_at, updated_at, lease_expires_at, expires_at, history_seq)
VALUES (?1, ?2, 1, 1, ?3, ?6, ?7, ?8, ?5, $now, $now, $now + ?4, $now + max(?4, ?5), 1)
ON CONFLICT (namespace, key) DO UPDATE SET
    attempt          = CASE WHEN idemd_records.expires_at <= $now THEN 1 ELSE idemd_records.attempt + 1 END,
    downstream_key   = CASE WHEN idemd_records.expires_at <= $now THEN excluded.downstream_key
                            ELSE idemd_records.downstream_key END,
    created_at       = CASE WHEN idemd_records.expires_at <= $now THEN $now ELSE idemd_records.created_at END,
    expires_at       = CASE WHEN idemd_records.expires_at <= $now THEN excluded.expires_at
                            ELSE max(idemd_records.expires_at, excluded.expires_at) END,
    fingerprint      = excluded.fingerprint,
    state            = 1,
    lease_token      = excluded.lease_token,
    attempt_nonce    = excluded.attempt_nonce,
    retention_us     = excluded.retention_us,
    updated_at       = $now,
    lease_expires_at = excluded.lease_expires_at,
    completed_at = NULL, response = NULL, response_code = NULL, content_type = NULL,
    taken_over       = idemd_records.expires_at > $now AND idemd_records.state = 1,
    aborted_by       = CASE WHEN idemd_records.expires_at <= $now THEN NULL
                            WHEN idemd_records.state = 1 THEN 2 ELSE idemd_records.aborted_by END,
    abort_reason     = CASE WHEN idemd_records.expires_at <= $now THEN NULL
                            WHEN idemd_records.state = 1 THEN ?10 ELSE idemd_records.abort_reason END,
    outcome_unknown  = CASE WHEN idemd_records.expires_at <= $now THEN 0
                            WHEN idemd_records.state = 1 THEN 1 ELSE idemd_records.outcome_unknown END,
    ended_at         = CASE WHEN idemd_records.expires_at <= $now THEN NULL
                            WHEN idemd_records.state = 1 THEN idemd_records.lease_expires_at
                            ELSE idemd_records.ended_at END,
    history_seq      = idemd_records.history_seq
                       + CASE WHEN idemd_records.expires_at > $now AND idemd_records.state = 1 THEN 2 ELSE 1 END
WHERE idemd_records.expires_at <= $now
   OR (idemd_records.fingerprint = excluded.fingerprint
       AND (idemd_records.state = 3 OR (idemd_records.state = 1 AND idemd_records.lease_expires_at <= $now)))
RETURNING namespace, key, attempt, lease_expires_at, downstream_key, updated_at, history_seq, taken_over,
          aborted_by, abort_reason, outcome_unknown, ended_at, ?9 AS principal
"#;

const BEGIN_READ_SQL: &str = r#"
SELECT state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce, lease_expires_at,
       response, response_code, content_type, completed_at, expires_at,
       aborted_by, abort_reason, outcome_unknown, ended_at, $now AS now
FROM idemd_records
WHERE namespace = ?1 AND key = ?2 AND expires_at > $now
"#;

const COMPLETE_SQL: &str = r#"
UPDATE idemd_records
SET state = 2, response = ?4, response_code = ?5, content_type = ?6,
    completed_at = $now, updated_at = $now, expires_at = $now + retention_us, history_seq = history_seq + 1
WHERE namespace = ?1 AND key = ?2 AND state = 1 AND lease_token = ?3
  AND lease_expires_at > $now AND expires_at > $now
RETURNING completed_at, expires_at, namespace, key, attempt, updated_at, history_seq, response_code,
          ?7 AS principal
"#;

const ABORT_SQL: &str = r#"
UPDATE idemd_records
SET state = 3, aborted_by = 1, abort_reason = ?4, outcome_unknown = ?5, ended_at = $now, updated_at = $now,
    history_seq = history_seq + 1
WHERE namespace = ?1 AND key = ?2 AND state = 1 AND lease_token = ?3
  AND lease_expires_at > $now AND expires_at > $now
RETURNING namespace, key, attempt, updated_at, history_seq, abort_reason, outcome_unknown, ?6 AS principal
"#;

const HEARTBEAT_SQL: &str = r#"
UPDATE idemd_records
SET lease_expires_at = $now + ?4,
    expires_at = max(expires_at, $now + retention_us, $now + ?4),
    updated_at = $now
WHERE namespace = ?1 AND key = ?2 AND state = 1 AND lease_token = ?3
  AND lease_expires_at > $now AND expires_at > $now
RETURNING lease_expires_at
"#;

const TOKEN_CHECK_SQL: &str = r#"
SELECT state, lease_token, aborted_by, completed_at, expires_at
FROM idemd_records
WHERE namespace = ?1 AND key = ?2 AND expires_at > $now
"#;

const LOOKUP_SQL: &str = r#"
SELECT namespace, key, state, attempt, fingerprint, downstream_key, created_at, updated_at,
       lease_expires_at, completed_at, expires_at, response, response_code, content_type,
       abort_reason, aborted_by, outcome_unknown
FROM idemd_records
WHERE namespace = ?1 AND key = ?2 AND expires_at > $now
"#;

// One statement: SQLite has a single writer, so the batch cannot race
// another reaper; the re-check in WHERE keeps a concurrent takeover safe.
const REAP_SQL: &str = r#"
UPDATE idemd_records
SET state = 3, aborted_by = 2, abort_reason = ?2, outcome_unknown = 1, ended_at = lease_expires_at,
    updated_at = $now, history_seq = history_seq + 1
WHERE state = 1 AND lease_expires_at <= $now AND expires_at > $now
  AND rowid IN (SELECT rowid FROM idemd_records
                WHERE state = 1 AND lease_expires_at <= $now AND expires_at > $now
                ORDER BY lease_expires_at LIMIT ?1)
RETURNING namespace, key, attempt, updated_at, history_seq, abort_reason, outcome_unknown, 'reaper' AS principal,
    lease_expires_at
"#;

/// Expired records (an invalidated one at its `tombstone_until`) and then
/// the history no record holds any more, in one transaction.
const PURGE_SQL: &str = r#"
DELETE FROM idemd_records
WHERE expires_at <= $now AND (tombstone_until IS NULL OR tombstone_until <= $now)
  AND rowid IN (SELECT rowid FROM idemd_records
                WHERE expires_at <= $now AND (tombstone_until IS NULL OR tombstone_until <= $now)
                ORDER BY expires_at LIMIT ?1)
RETURNING namespace, key, max(expires_at, coalesce(tombstone_until, expires_at)) AS due_at, $now AS purged_at
"#;

const PURGE_HISTORY_SQL: &str = "DELETE FROM idemd_events WHERE namespace = ?1 AND key = ?2";

/// One event, numbered and timed by the transition's row.
const EVENT_SQL: &str = r#"
INSERT INTO idemd_events (namespace, key, seq, at, kind, attempt, principal, reason, response_code, outcome_unknown)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
"#;

/// Runs one transition statement and, when it changed the record, writes
/// its events from the row it returned, in one transaction: SQLite has no
/// writable CTEs, and the history must never hold an event without its
/// transition or miss one.
pub(super) async fn transition<'q>(
    pool: &SqlitePool,
    statement: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    kind: EventKind,
) -> Result<Option<SqliteRow>> {
    let mut transaction = pool.begin().await?;
    let row = statement.fetch_optional(&mut *transaction).await?;
    if let Some(row) = &row {
        for event in events_of(row, kind)? {
            event.write(&mut transaction).await?;
        }
    }
    transaction.commit().await?;
    Ok(row)
}

/// An event to append, numbered by the record's `history_seq`.
struct NewEvent {
    namespace: String,
    key: String,
    at: i64,
    seq: i64,
    kind: EventKind,
    attempt: i64,
    principal: String,
    reason: String,
    response_code: Option<i64>,
    outcome_unknown: bool,
}

impl NewEvent {
    async fn write(&self, connection: &mut sqlx::SqliteConnection) -> Result<()> {
        sqlx::query(EVENT_SQL)
            .bind(self.namespace.as_str())
            .bind(self.key.as_str())
            .bind(self.seq)
            .bind(self.at)
            .bind(self.kind as i64)
            .bind(self.attempt)
            .bind(self.principal.as_str())
            .bind(self.reason.as_str())
            .bind(self.response_code)
            .bind(self.outcome_unknown)
            .execute(connection)
            .await?;
        Ok(())
    }
}

/// The events of a transition, from the row its statement returned:
/// `namespace`, `key`, `attempt`, `updated_at` (the event's time),
/// `history_seq`, `principal`, and what the kind records (`abort_reason`
/// and `outcome_unknown` of an abort, `response_code` of a completion,
/// `event_reason` of an operator's action). An acquisition that took over
/// an expired lease also writes that lease's REAPED, just before.
fn events_of(row: &SqliteRow, kind: EventKind) -> Result<Vec<NewEvent>> {
    let (namespace, key) = (row.text("namespace")?, row.text("key")?);
    let at = row.int("updated_at")?;
    let seq = row.int("history_seq")?;
    let attempt = row.int("attempt")?;
    let event = |reason: String, response_code: Option<i64>, outcome_unknown: bool| -> Result<NewEvent> {
        Ok(NewEvent {
            namespace: namespace.clone(),
            key: key.clone(),
            at,
            seq,
            kind,
            attempt,
            principal: row.text("principal")?,
            reason,
            response_code,
            outcome_unknown,
        })
    };
    Ok(match kind {
        EventKind::Acquired if row.flag("taken_over")? => vec![
            NewEvent {
                namespace: namespace.clone(),
                key: key.clone(),
                at,
                seq: seq - 1,
                kind: EventKind::Reaped,
                attempt: attempt - 1,
                principal: REAPER_PRINCIPAL.to_string(),
                reason: REAPER_REASON.to_string(),
                response_code: None,
                outcome_unknown: true,
            },
            event(String::new(), None, false)?,
        ],
        EventKind::Acquired => vec![event(String::new(), None, false)?],
        EventKind::Completed => vec![event(String::new(), row.opt_int("response_code")?, false)?],
        EventKind::Aborted | EventKind::Reaped | EventKind::Released => {
            vec![event(row.opt_text("abort_reason")?.unwrap_or_default(), None, row.flag("outcome_unknown")?)?]
        }
        EventKind::Resolved => vec![event(row.text("event_reason")?, row.opt_int("response_code")?, false)?],
        EventKind::Invalidated => vec![event(row.text("event_reason")?, None, false)?],
    })
}

static BEGIN_ACQUIRE: LazyLock<String> = LazyLock::new(|| with_clock(BEGIN_ACQUIRE_SQL));
static BEGIN_READ: LazyLock<String> = LazyLock::new(|| with_clock(BEGIN_READ_SQL));
static COMPLETE: LazyLock<String> = LazyLock::new(|| with_clock(COMPLETE_SQL));
static ABORT: LazyLock<String> = LazyLock::new(|| with_clock(ABORT_SQL));
static HEARTBEAT: LazyLock<String> = LazyLock::new(|| with_clock(HEARTBEAT_SQL));
static TOKEN_CHECK: LazyLock<String> = LazyLock::new(|| with_clock(TOKEN_CHECK_SQL));
static LOOKUP: LazyLock<String> = LazyLock::new(|| with_clock(LOOKUP_SQL));
static REAP: LazyLock<String> = LazyLock::new(|| with_clock(REAP_SQL));
static PURGE: LazyLock<String> = LazyLock::new(|| with_clock(PURGE_SQL));

impl Store for SqliteStore {
    async fn begin(&self, request: &BeginRequest) -> Result<BeginOutcome> {
        let id = &request.id;
        let acquire = || async {
            let token = new_lease_token();
            let statement = bind_acquire(sqlx::query(BEGIN_ACQUIRE.as_str()), request, &token);
            let row = transition(&self.pool, statement, EventKind::Acquired).await?;
            row.map(|row| Ok(BeginOutcome::Acquired(rows::acquired_lease(&row, token)?))).transpose()
        };
        let read = || async {
            let row = sqlx::query(BEGIN_READ.as_str())
                .bind(id.namespace.as_str())
                .bind(id.key.as_str())
                .fetch_optional(&self.pool)
                .await?;
            row.map(|row| rows::current_record(&row)).transpose()
        };
        begin_rounds(request, acquire, read).await
    }

    async fn complete(&self, request: &CompleteRequest) -> Result<Completion> {
        let id = &request.id;
        let (pool, owned) = (self.pool.clone(), request.clone());
        let statement = async move {
            let statement = sqlx::query(COMPLETE.as_str())
                .bind(owned.id.namespace.as_str())
                .bind(owned.id.key.as_str())
                .bind(owned.lease_token.as_str())
                .bind(owned.response.as_slice())
                .bind(owned.response_code)
                .bind(owned.content_type.as_str())
                .bind(owned.principal.as_str());
            transition(&pool, statement, EventKind::Completed).await
        };
        if let Some(row) = self.settle(id, statement).await? {
            return Ok(Completion { completed_at: row.time("completed_at")?, expires_at: row.time("expires_at")? });
        }
        why_unchanged(self.token_check(id).await?, |check| check.repeated_complete(&request.lease_token))
    }

    async fn abort(&self, request: &AbortRequest) -> Result<()> {
        let (pool, owned) = (self.pool.clone(), request.clone());
        let statement = async move {
            let statement = sqlx::query(ABORT.as_str())
                .bind(owned.id.namespace.as_str())
                .bind(owned.id.key.as_str())
                .bind(owned.lease_token.as_str())
                .bind(owned.reason.as_str())
                .bind(owned.outcome_unknown)
                .bind(owned.principal.as_str());
            transition(&pool, statement, EventKind::Aborted).await
        };
        if self.settle(&request.id, statement).await?.is_some() {
            return Ok(());
        }
        why_unchanged(self.token_check(&request.id).await?, |check| check.repeated_abort(&request.lease_token))
    }

    async fn heartbeat(&self, id: &RecordId, lease_token: &str, lease_ttl: Duration) -> Result<Timestamp> {
        let row = sqlx::query(HEARTBEAT.as_str())
            .bind(id.namespace.as_str())
            .bind(id.key.as_str())
            .bind(lease_token)
            .bind(micros(lease_ttl))
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            return row.time("lease_expires_at");
        }
        why_unchanged(self.token_check(id).await?, TokenCheck::repeated_heartbeat)
    }

    async fn lookup(&self, id: &RecordId) -> Result<Record> {
        let row = sqlx::query(LOOKUP.as_str())
            .bind(id.namespace.as_str())
            .bind(id.key.as_str())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(Error::NotFound)?;
        rows::record(&row)
    }

    async fn list_records(&self, query: &ListQuery) -> Result<Vec<Record>> {
        self.list_page(query).await
    }

    async fn history(&self, id: &RecordId) -> Result<Vec<Event>> {
        self.events(id).await
    }

    async fn resolve(&self, request: &ResolveRequest) -> Result<Record> {
        self.resolve_record(request).await
    }

    async fn release(&self, request: &ReleaseRequest) -> Result<Record> {
        self.release_record(request).await
    }

    async fn invalidate(&self, request: &InvalidateRequest) -> Result<()> {
        self.invalidate_record(request).await
    }

    async fn reap_expired_leases(&self, limit: i64) -> Result<Vec<ReapedLease>> {
        let mut transaction = self.pool.begin().await?;
        let rows = sqlx::query(REAP.as_str()).bind(limit).bind(REAPER_REASON).fetch_all(&mut *transaction).await?;
        for row in &rows {
            for event in events_of(row, EventKind::Reaped)? {
                event.write(&mut transaction).await?;
            }
        }
        transaction.commit().await?;
        let reaped = rows.iter().map(rows::reaped_lease).collect::<Result<Vec<_>>>()?;
        for lease in &reaped {
            self.wakeups.wake(&RecordId::stored(lease.namespace.clone(), lease.key.clone()));
        }
        Ok(reaped)
    }

    async fn purge_expired(&self, limit: i64) -> Result<Vec<Duration>> {
        let mut transaction = self.pool.begin().await?;
        let gone = sqlx::query(PURGE.as_str()).bind(limit).fetch_all(&mut *transaction).await?;
        for row in &gone {
            sqlx::query(PURGE_HISTORY_SQL)
                .bind(row.text("namespace")?)
                .bind(row.text("key")?)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        gone.iter().map(rows::purged_overdue).collect()
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn missing_migrations(&self) -> Result<usize> {
        let applied: Vec<i64> = sqlx::query_scalar(super::APPLIED_MIGRATIONS).fetch_all(&self.pool).await?;
        Ok(super::not_applied(&MIGRATOR, &applied))
    }

    fn pool_stats(&self) -> crate::metrics::PoolStats {
        let idle = self.pool.num_idle() as u64;
        let max = u64::from(self.pool.options().get_max_connections());
        crate::metrics::PoolStats { in_use: u64::from(self.pool.size()).saturating_sub(idle), idle, max }
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
