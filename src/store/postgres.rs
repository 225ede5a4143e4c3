//! The production store. Every transition is one statement keyed by
//! `(namespace, key)`, timed by Postgres's own `now()` so replicas with
//! skewed clocks agree. Complete, Abort and the reaper `NOTIFY` the key in the
//! same statement; every replica's listener relays it to its waiters.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Row};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::group_commit::GroupCommit;
use super::pg_session::PgSession;
use super::pg_target::PgTarget;
use super::{Store, TokenCheck, begin_rounds, bind_acquire};
use crate::config::{DatabaseConfig, DbPooler};
use crate::domain::{
    AbortedBy, BeginOutcome, BeginRequest, CompleteRequest, Completion, CurrentRecord, Lease, ReapedLease, Record,
    RecordId, State, StoredResponse, Timestamp, micros, new_lease_token,
};
use crate::error::{Error, Result};
use crate::wakeups::Wakeups;

/// How long a readiness ping waits before it also suspects the primary moved.
const PING_PATIENCE: Duration = Duration::from_secs(1);

/// The NOTIFY channel; the payload is `namespace/key`.
pub const WAKE_CHANNEL: &str = "idemd_wake";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone, Debug)]
pub struct PgStore {
    session: PgSession,
    /// Group commit of Begins and Completes, when `--group-commit-max-batch` > 1.
    batchers: Option<Arc<GroupCommit>>,
    /// Straight to Postgres, outside the request pool: a one-connection pool
    /// for migrations, and the target LISTEN sessions connect to. None
    /// behind a transaction pooler without `--direct-database-url`.
    direct: Option<(PgPool, Arc<PgTarget>)>,
    /// Without LISTEN, this replica's own transitions wake its waiters here.
    local_wakeups: Option<Arc<Wakeups>>,
    store_timeout: Duration,
}

impl PgStore {
    /// Builds the pools. Connections are opened on demand, so a database
    /// that is down at start-up surfaces as an error of the first use.
    /// `wakeups` is woken directly when no LISTEN connection can relay.
    pub fn connect_lazy(config: &DatabaseConfig, wakeups: Arc<Wakeups>) -> Result<Self> {
        let through_pooler = config.db_pooler == DbPooler::Transaction;
        let store_timeout = config.store_timeout;
        let direct_options = move |options: PgConnectOptions| {
            options
                .application_name("idemd")
                // The database abandons what the service already gave up on.
                .options([("statement_timeout", store_timeout.as_millis().to_string())])
                .log_statements(tracing::log::LevelFilter::Trace)
        };
        let pooled_options = move |options: PgConnectOptions| {
            // PgBouncer refuses startup parameters it does not track; the
            // timeout is set inside each transaction instead (pg_session.rs).
            options.application_name("idemd").extra_float_digits(None).log_statements(tracing::log::LevelFilter::Trace)
        };
        let target = if through_pooler {
            PgTarget::new(config.database_url.expose(), store_timeout, pooled_options)?
        } else {
            PgTarget::new(config.database_url.expose(), store_timeout, direct_options)?
        };
        let pool = target.pool(
            PgPoolOptions::new()
                .max_connections(config.db_max_connections)
                // Shorter than the call's own bound, so a pool that cannot
                // connect says so (and a multi-host target re-probes) before
                // the call gives up.
                .acquire_timeout(config.store_timeout.mul_f64(0.75))
                // No ping before every statement: it doubled the round trips of
                // the hot path. A connection that died is found by its statement
                // failing (the caller gets UNAVAILABLE and retries) and dropped.
                .test_before_acquire(false),
        );
        target.spawn_watcher();
        let session = PgSession::new(pool, Arc::clone(&target), through_pooler, config.store_timeout);
        let direct_target = match (&config.direct_database_url, through_pooler) {
            (Some(url), _) => Some(PgTarget::new(url.expose(), store_timeout, direct_options)?),
            (None, false) => Some(target),
            (None, true) => None,
        };
        let direct = direct_target.map(|target| {
            // Used for migrations at start-up, then idle: its connection is let go.
            let options = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(config.store_timeout)
                .idle_timeout(Duration::from_secs(30));
            let pool = target.pool(options);
            target.spawn_watcher();
            (pool, target)
        });
        let local_wakeups = direct.is_none().then_some(wakeups);
        let store = PgStore { session, direct, local_wakeups, batchers: None, store_timeout };
        if config.group_commit_max_batch <= 1 {
            return Ok(store);
        }
        // Workers run on a store without batchers: their one-key fallbacks go straight to SQL.
        let workers = config.group_commit_in_flight;
        let batchers =
            GroupCommit::start(store.clone(), workers, config.group_commit_max_batch, config.group_commit_window);
        Ok(PgStore { batchers: Some(batchers), ..store })
    }

    /// Applies pending migrations over the direct connection; concurrent
    /// replicas serialise on sqlx's advisory lock, which a transaction
    /// pooler would not keep.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let Some((pool, target)) = &self.direct else {
            anyhow::bail!(
                "migrations cannot run through a transaction pooler: set --direct-database-url \
                 (IDEMD_DIRECT_DATABASE_URL), or run `idemd migrate` against Postgres itself and serve with --no-migrate"
            );
        };
        target.locate().await?;
        MIGRATOR.run(pool).await?;
        Ok(())
    }

    /// Relays NOTIFYs from every replica to this replica's waiters until
    /// shutdown. After any gap in listening it wakes every waiter, so a
    /// notification lost meanwhile costs a re-check, never a stuck waiter.
    /// Without a direct connection there is nothing to relay.
    pub fn spawn_wakeup_listener(&self, wakeups: Arc<Wakeups>, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
        let (_, target) = self.direct.clone()?;
        let store_timeout = self.store_timeout;
        Some(tokio::spawn(async move {
            let mut backoff = LISTENER_BACKOFF;
            while !shutdown.is_cancelled() {
                let started = tokio::time::Instant::now();
                // A pool of its own per session: a session that hangs on a
                // silent host (sqlx sends UNLISTEN when it is dropped) holds
                // no connection that migrations or the next session need.
                let pool = target.one_off_pool(store_timeout);
                match listen_until_error(&pool, &target, &wakeups, &shutdown).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::warn!(%error, "wake-up listener lost its connection; reconnecting");
                        if error.primary_may_have_moved() {
                            target.suspect();
                        }
                        wakeups.wake_all();
                    }
                }
                if started.elapsed() > LISTENER_CHECK_EVERY * 2 {
                    backoff = LISTENER_BACKOFF;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }))
    }

    /// How long one call, or one group commit batch, may take in the database.
    pub(super) fn store_timeout(&self) -> Duration {
        self.store_timeout
    }

    /// This replica's own transition, when no LISTEN relays it.
    fn woke(&self, id: &RecordId) {
        if let Some(wakeups) = &self.local_wakeups {
            wakeups.wake(id);
        }
    }
}

/// How long the listener may sit idle before it checks its connection: a
/// connection that died silently would otherwise lose every NOTIFY.
const LISTENER_CHECK_EVERY: Duration = Duration::from_secs(5);

/// The first pause before the listener reconnects.
const LISTENER_BACKOFF: Duration = Duration::from_millis(100);

/// Listens until the connection fails, stops answering, turns read-only or
/// the target moves to another host; each of those returns an error, after
/// which the caller wakes every waiter (NOTIFYs may have been missed) and
/// listens anew. sqlx's own silent reconnect is off for that reason.
async fn listen_until_error(
    pool: &PgPool,
    target: &PgTarget,
    wakeups: &Wakeups,
    shutdown: &CancellationToken,
) -> Result<()> {
    let moves = target.moves();
    let mut listener = PgListener::connect_with(pool).await?;
    listener.eager_reconnect(false);
    listener.listen(WAKE_CHANNEL).await?;
    // Anything that finished while we were not listening.
    wakeups.wake_all();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            notification = listener.try_recv() => match notification? {
                Some(notification) => wakeups.wake_payload(notification.payload()),
                None => return Err(Error::StoreLost("the LISTEN connection closed".into())),
            },
            _ = tokio::time::sleep(LISTENER_CHECK_EVERY) => {
                if target.moves() != moves {
                    return Err(Error::StoreLost("the database primary moved".into()));
                }
                use sqlx::Executor;
                let check = (&mut listener).fetch_one(target.usable_session_query());
                let Ok(row) = tokio::time::timeout(LISTENER_CHECK_EVERY, check).await else {
                    return Err(Error::StoreLost("the LISTEN connection stopped answering".into()));
                };
                if !row?.try_get::<bool, _>(0)? {
                    return Err(Error::StoreLost("the LISTEN session is read-only".into()));
                }
            }
        }
    }
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

const BEGIN_ACQUIRE: &str = concat!(
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

const BEGIN_READ: &str = r#"
SELECT state, attempt, fingerprint, downstream_key, lease_token, attempt_nonce, lease_expires_at,
       response, response_code, content_type, completed_at, expires_at, now() AS now
FROM idemd_records
WHERE namespace = $1 AND key = $2 AND expires_at > now()
"#;

/// A waiter's mark on the attempt it waits for. True when the mark is
/// there (set now, or by another waiter before); false when the attempt is
/// no longer in flight, and the waiter should look again. A transition after
/// a true answer locks the row after the mark and so sees it.
const WATCH: &str = r#"
WITH marked AS (
    UPDATE idemd_records SET waiters = true
    WHERE namespace = $1 AND key = $2 AND state = 1 AND attempt = $3 AND NOT waiters
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM marked)
    OR EXISTS (SELECT 1 FROM idemd_records
               WHERE namespace = $1 AND key = $2 AND state = 1 AND attempt = $3 AND waiters) AS watched
"#;

const COMPLETE: &str = concat!(
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

const ABORT: &str = concat!(
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

const HEARTBEAT: &str = r#"
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

const TOKEN_CHECK: &str = r#"
SELECT state, lease_token, aborted_by, completed_at, expires_at
FROM idemd_records
WHERE namespace = $1 AND key = $2 AND expires_at > now()
"#;

const LOOKUP: &str = r#"
SELECT namespace, key, state, attempt, fingerprint, downstream_key, created_at, updated_at,
       lease_expires_at, completed_at, expires_at, response, response_code, content_type,
       abort_reason, aborted_by
FROM idemd_records
WHERE namespace = $1 AND key = $2 AND expires_at > now()
"#;

const REAP: &str = concat!(
    r#"
WITH due AS (
    SELECT namespace, key FROM idemd_records
    WHERE state = 1 AND lease_expires_at <= now()
    ORDER BY lease_expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), reaped AS (
    UPDATE idemd_records r
    SET state = 3, aborted_by = 2, abort_reason = 'lease expired', updated_at = now()
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

const PURGE: &str = r#"
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

pub(super) fn attempt_of(row: &PgRow) -> Result<u32> {
    let attempt: i32 = row.try_get("attempt")?;
    u32::try_from(attempt).map_err(|_| Error::Internal(format!("negative attempt {attempt}")))
}

fn state_of(row: &PgRow) -> Result<State> {
    State::from_code(i64::from(row.try_get::<i16, _>("state")?))
}

fn aborted_by_of(row: &PgRow) -> Result<Option<AbortedBy>> {
    Ok(AbortedBy::from_code(row.try_get::<Option<i16>, _>("aborted_by")?.map(i64::from)))
}

fn token_check(row: &PgRow) -> Result<TokenCheck> {
    Ok(TokenCheck {
        state: state_of(row)?,
        lease_token: row.try_get("lease_token")?,
        aborted_by: aborted_by_of(row)?,
        completed_at: row.try_get("completed_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

impl PgStore {
    pub(super) fn session(&self) -> &PgSession {
        &self.session
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
        match self.token_check(id).await? {
            Some(check) => check.repeated_complete(&request.lease_token),
            None => Err(Error::NotFound),
        }
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
                    attempt: attempt_of(&row)?,
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
            row.map(|row| current_record(&row)).transpose()
        };
        begin_rounds(request, acquire, read).await
    }

    async fn token_check(&self, id: &RecordId) -> Result<Option<TokenCheck>> {
        let row = self
            .session
            .fetch_optional(|| sqlx::query(TOKEN_CHECK).bind(id.namespace.as_str()).bind(id.key.as_str()))
            .await?;
        row.as_ref().map(token_check).transpose()
    }
}

impl Store for PgStore {
    async fn begin(&self, request: &BeginRequest) -> Result<BeginOutcome> {
        match &self.batchers {
            Some(batchers) => batchers.begin.submit(request.clone()).await,
            None => self.begin_single(request).await,
        }
    }

    async fn complete(&self, request: &CompleteRequest) -> Result<Completion> {
        let completion = match &self.batchers {
            Some(batchers) => batchers.complete.submit(request.clone()).await,
            None => self.complete_single(request).await,
        }?;
        self.woke(&request.id);
        Ok(completion)
    }

    async fn abort(&self, id: &RecordId, lease_token: &str, reason: &str) -> Result<()> {
        let row = self
            .session
            .fetch_optional(|| {
                sqlx::query(ABORT).bind(id.namespace.as_str()).bind(id.key.as_str()).bind(lease_token).bind(reason)
            })
            .await?;
        if row.is_some() {
            self.woke(id);
            return Ok(());
        }
        match self.token_check(id).await? {
            Some(check) => check.repeated_abort(lease_token),
            None => Err(Error::NotFound),
        }
    }

    async fn watch(&self, id: &RecordId, attempt: u32) -> Result<bool> {
        let attempt = i32::try_from(attempt).map_err(|_| Error::Internal(format!("attempt {attempt} out of range")))?;
        let row = self
            .session
            .fetch_optional(|| sqlx::query(WATCH).bind(id.namespace.as_str()).bind(id.key.as_str()).bind(attempt))
            .await?;
        Ok(match row {
            Some(row) => row.try_get("watched")?,
            None => false,
        })
    }

    async fn heartbeat(&self, id: &RecordId, lease_token: &str, lease_ttl: Duration) -> Result<Timestamp> {
        let row = self
            .session
            .fetch_optional(|| {
                sqlx::query(HEARTBEAT)
                    .bind(id.namespace.as_str())
                    .bind(id.key.as_str())
                    .bind(lease_token)
                    .bind(micros(lease_ttl))
            })
            .await?;
        if let Some(row) = row {
            return Ok(row.try_get("lease_expires_at")?);
        }
        match self.token_check(id).await? {
            Some(_) => Err(Error::LeaseLost),
            None => Err(Error::NotFound),
        }
    }

    async fn lookup(&self, id: &RecordId) -> Result<Record> {
        let row = self
            .session
            .fetch_optional(|| sqlx::query(LOOKUP).bind(id.namespace.as_str()).bind(id.key.as_str()))
            .await?
            .ok_or(Error::NotFound)?;
        Ok(Record {
            namespace: row.try_get("namespace")?,
            key: row.try_get("key")?,
            state: state_of(&row)?,
            attempt: attempt_of(&row)?,
            fingerprint: row.try_get("fingerprint")?,
            downstream_key: row.try_get("downstream_key")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            lease_expires_at: row.try_get("lease_expires_at")?,
            completed_at: row.try_get("completed_at")?,
            expires_at: row.try_get("expires_at")?,
            response: row.try_get("response")?,
            response_code: row.try_get("response_code")?,
            content_type: row.try_get("content_type")?,
            abort_reason: row.try_get("abort_reason")?,
            aborted_by: aborted_by_of(&row)?,
        })
    }

    async fn reap_expired_leases(&self, limit: i64) -> Result<Vec<ReapedLease>> {
        let rows = self.session.fetch_all(|| sqlx::query(REAP).bind(limit)).await?;
        let reaped = rows
            .iter()
            .map(|row| {
                Ok(ReapedLease {
                    namespace: row.try_get("namespace")?,
                    key: row.try_get("key")?,
                    attempt: attempt_of(row)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(wakeups) = &self.local_wakeups {
            for lease in &reaped {
                wakeups.wake(&RecordId::stored(lease.namespace.clone(), lease.key.clone()));
            }
        }
        Ok(reaped)
    }

    async fn purge_expired(&self, limit: i64) -> Result<u64> {
        self.session.execute(|| sqlx::query(PURGE).bind(limit)).await
    }

    /// Only with LISTEN: through a transaction pooler without a direct URL,
    /// other replicas' transitions reach nobody here.
    fn wakes_waiters(&self) -> bool {
        self.direct.is_some()
    }

    async fn ping(&self) -> Result<()> {
        let target = self.session.target();
        let check = self.session.fetch_optional(|| sqlx::query(target.usable_session_query()));
        // A ping that hangs (connections refused, a host gone silent) also
        // makes a multi-host target look for the primary again.
        match tokio::time::timeout(PING_PATIENCE, check).await {
            Ok(Ok(Some(row))) if row.try_get::<bool, _>(0)? => Ok(()),
            Ok(Ok(_)) => {
                target.suspect();
                Err(Error::StoreLost("the database session is read-only".into()))
            }
            Ok(Err(error)) => Err(error),
            Err(_) => {
                target.suspect();
                Err(Error::StoreTimeout)
            }
        }
    }

    fn pool_stats(&self) -> crate::metrics::PoolStats {
        let pool = self.session.pool();
        let idle = pool.num_idle() as u64;
        crate::metrics::PoolStats { in_use: u64::from(pool.size()).saturating_sub(idle), idle }
    }

    async fn close(&self) {
        self.session.target().stop();
        self.session.pool().close().await;
        if let Some((pool, target)) = &self.direct {
            target.stop();
            pool.close().await;
        }
    }
}

pub(super) fn current_record(row: &PgRow) -> Result<CurrentRecord> {
    let state = state_of(row)?;
    let attempt = attempt_of(row)?;
    let stored = match (state, row.try_get::<Option<Vec<u8>>, _>("response")?) {
        (State::Completed, Some(response)) => Some(StoredResponse {
            response,
            response_code: row.try_get::<Option<i32>, _>("response_code")?.unwrap_or(0),
            content_type: row.try_get::<Option<String>, _>("content_type")?.unwrap_or_default(),
            completed_at: row
                .try_get::<Option<Timestamp>, _>("completed_at")?
                .ok_or_else(|| Error::Internal("completed record without completed_at".into()))?,
            expires_at: row.try_get("expires_at")?,
            attempt,
        }),
        _ => None,
    };
    Ok(CurrentRecord {
        state,
        attempt,
        fingerprint: row.try_get("fingerprint")?,
        downstream_key: row.try_get("downstream_key")?,
        lease_token: row.try_get("lease_token")?,
        attempt_nonce: row.try_get("attempt_nonce")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        stored,
        now: row.try_get("now")?,
    })
}
