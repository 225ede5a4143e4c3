//! The production store. Every transition is one statement keyed by
//! `(namespace, key)`, timed by Postgres's own `now()` so replicas with
//! skewed clocks agree. Complete, Abort and the reaper `NOTIFY` the key in the
//! same statement; every replica's listener relays it to its waiters.
//!
//! - `statements`: the one-key statements and their rows;
//! - `batches`: group commit, built on the one-key statements;
//! - `session`: how a statement reaches Postgres (directly or through a
//!   transaction pooler), with retries on contention;
//! - `target`: the multi-host URL's writable primary, followed on failover;
//!   `url` parses such URLs;
//! - `listen`: the LISTEN relay of wake-ups.

mod admin;
mod batches;
mod listen;
pub(crate) mod session;
mod statements;
pub(crate) mod target;
pub(crate) mod url;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Row};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::batches::GroupCommit;
use self::session::PgSession;
use self::statements::*;
use self::target::PgTarget;
use super::{Store, TokenCheck, rows, why_unchanged};
use crate::config::{DatabaseConfig, DbPooler};
use crate::domain::Event;
use crate::domain::{
    AbortRequest, BeginOutcome, BeginRequest, CompleteRequest, Completion, REAPER_REASON, ReapedLease, Record,
    RecordId, Timestamp, micros,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::operator::{InvalidateRequest, ListQuery, ReleaseRequest, ResolveRequest};
use crate::wakeups::Wakeups;

/// How long a readiness ping waits before it also suspects the primary moved.
const PING_PATIENCE: Duration = Duration::from_secs(1);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone, Debug)]
pub struct PgStore {
    single: SingleKey,
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
    /// `wakeups` is woken directly when no LISTEN connection can relay;
    /// `metrics`, when given, counts the group-commit batches.
    pub fn connect_lazy(config: &DatabaseConfig, wakeups: Arc<Wakeups>, metrics: Option<Arc<Metrics>>) -> Result<Self> {
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
            // timeout is set inside each transaction instead (session.rs).
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
        let single = SingleKey::new(session, store_timeout);
        let batchers = (config.group_commit_max_batch > 1).then(|| {
            GroupCommit::start(
                single.clone(),
                config.group_commit_in_flight,
                config.group_commit_max_batch,
                config.group_commit_window,
                metrics,
            )
        });
        Ok(PgStore { single, direct, local_wakeups, batchers, store_timeout })
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
    /// shutdown (see `listen.rs`). Without a direct connection there is
    /// nothing to relay.
    pub fn spawn_wakeup_listener(&self, wakeups: Arc<Wakeups>, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
        let (_, target) = self.direct.clone()?;
        Some(listen::spawn(target, self.store_timeout, wakeups, shutdown))
    }

    /// This replica's own transition, when no LISTEN relays it.
    fn woke(&self, id: &RecordId) {
        if let Some(wakeups) = &self.local_wakeups {
            wakeups.wake(id);
        }
    }
}

impl Store for PgStore {
    async fn begin(&self, request: &BeginRequest) -> Result<BeginOutcome> {
        match &self.batchers {
            Some(batchers) => batchers.begin(request.clone()).await,
            None => self.single.begin_single(request).await,
        }
    }

    async fn complete(&self, request: &CompleteRequest) -> Result<Completion> {
        let completion = match &self.batchers {
            Some(batchers) => batchers.complete(request.clone()).await,
            None => self.single.complete_single(request).await,
        }?;
        self.woke(&request.id);
        Ok(completion)
    }

    async fn abort(&self, request: &AbortRequest) -> Result<()> {
        let id = &request.id;
        let row = self
            .single
            .session()
            .fetch_optional(|| {
                sqlx::query(ABORT)
                    .bind(id.namespace.as_str())
                    .bind(id.key.as_str())
                    .bind(request.lease_token.as_str())
                    .bind(request.reason.as_str())
                    .bind(request.outcome_unknown)
                    .bind(request.principal.as_str())
            })
            .await?;
        if row.is_some() {
            self.woke(id);
            return Ok(());
        }
        why_unchanged(self.single.token_check(id).await?, |check| check.repeated_abort(&request.lease_token))
    }

    async fn watch(&self, id: &RecordId, attempt: u32) -> Result<bool> {
        let attempt = i32::try_from(attempt).map_err(|_| Error::Internal(format!("attempt {attempt} out of range")))?;
        let row = self
            .single
            .session()
            .fetch_optional(|| sqlx::query(WATCH).bind(id.namespace.as_str()).bind(id.key.as_str()).bind(attempt))
            .await?;
        Ok(match row {
            Some(row) => row.try_get("watched")?,
            None => false,
        })
    }

    async fn heartbeat(&self, id: &RecordId, lease_token: &str, lease_ttl: Duration) -> Result<Timestamp> {
        let row = self
            .single
            .session()
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
        why_unchanged(self.single.token_check(id).await?, TokenCheck::repeated_heartbeat)
    }

    async fn lookup(&self, id: &RecordId) -> Result<Record> {
        let row = self
            .single
            .session()
            .fetch_optional(|| sqlx::query(LOOKUP).bind(id.namespace.as_str()).bind(id.key.as_str()))
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
        let rows = self.single.session().fetch_all(|| sqlx::query(REAP).bind(limit).bind(REAPER_REASON)).await?;
        let reaped = rows.iter().map(rows::reaped_lease).collect::<Result<Vec<_>>>()?;
        if let Some(wakeups) = &self.local_wakeups {
            for lease in &reaped {
                wakeups.wake(&RecordId::stored(lease.namespace.clone(), lease.key.clone()));
            }
        }
        Ok(reaped)
    }

    async fn purge_expired(&self, limit: i64) -> Result<Vec<Duration>> {
        let rows = self.single.session().fetch_all(|| sqlx::query(PURGE).bind(limit)).await?;
        rows.iter().map(rows::purged_overdue).collect()
    }

    /// Only with LISTEN: through a transaction pooler without a direct URL,
    /// other replicas' transitions reach nobody here.
    fn wakes_waiters(&self) -> bool {
        self.direct.is_some()
    }

    async fn missing_migrations(&self) -> Result<usize> {
        let rows = self.single.session().fetch_all(|| sqlx::query(super::APPLIED_MIGRATIONS)).await?;
        let applied = rows.iter().map(|row| row.try_get::<i64, _>(0)).collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(super::not_applied(&MIGRATOR, &applied))
    }

    async fn ping(&self) -> Result<()> {
        let target = self.single.session().target();
        let check = self.single.session().fetch_optional(|| sqlx::query(target.usable_session_query()));
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
        let pool = self.single.session().pool();
        let idle = pool.num_idle() as u64;
        let max = u64::from(pool.options().get_max_connections());
        crate::metrics::PoolStats { in_use: u64::from(pool.size()).saturating_sub(idle), idle, max }
    }

    async fn close(&self) {
        self.single.session().target().stop();
        self.single.session().pool().close().await;
        if let Some((pool, target)) = &self.direct {
            target.stop();
            pool.close().await;
        }
    }
}
