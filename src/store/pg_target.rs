//! Which server of a multi-host `DATABASE_URL` idemd's pools connect to, and
//! moving them when the primary moves (a Patroni failover, say).
//!
//! Three rules keep writes on the primary without a restart:
//! - every new connection checks the session it got (`after_connect`), so a
//!   pool never keeps a connection to a standby, whatever its options say;
//! - when a connection fails, is refused, or lands on a standby, the locator
//!   probes the hosts in order and points the pools at the first one that
//!   qualifies; until then acquisitions keep retrying (sqlx re-reads the
//!   options on each attempt) and readiness reports NOT_SERVING;
//! - connections opened before the move are discarded when next acquired.
//!
//! With one host and no `target_session_attrs` none of this runs: sqlx's
//! own connection handling is used unchanged.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pg_url::{PgUrl, SessionAttrs};
use crate::error::{Error, Result};

/// The longest one host may take to accept a connection and answer the session check.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Between two rounds of probing while no host qualifies.
const RETRY_EVERY: Duration = Duration::from_millis(200);

pub struct PgTarget {
    url: PgUrl,
    hosts: Vec<PgConnectOptions>,
    /// Index into `hosts` the pools use now.
    current: AtomicUsize,
    pools: Mutex<Vec<PgPool>>,
    /// Milliseconds after `epoch` at which the pools last moved to another host.
    moved_at_ms: AtomicU64,
    epoch: Instant,
    suspect: Arc<Notify>,
    /// Ends the watcher when the last store holding this target is dropped.
    stop: CancellationToken,
    locating: tokio::sync::Mutex<()>,
}

impl PgTarget {
    /// Parses the URL; `customize` applies idemd's own settings to every host's options.
    pub fn new(url: &str, customize: impl Fn(PgConnectOptions) -> PgConnectOptions) -> Result<Arc<PgTarget>> {
        let url = PgUrl::parse(url).map_err(|e| Error::StoreUnavailable(sqlx::Error::Configuration(e.into())))?;
        let hosts = url
            .per_host_urls()
            .iter()
            .map(|one| PgConnectOptions::from_str(one).map(&customize))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::StoreUnavailable)?;
        Ok(Arc::new(PgTarget {
            url,
            hosts,
            current: AtomicUsize::new(0),
            pools: Mutex::new(Vec::new()),
            moved_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            suspect: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
            locating: tokio::sync::Mutex::new(()),
        }))
    }

    /// Whether this target chooses among hosts (and checks sessions) at all.
    pub fn is_located(&self) -> bool {
        self.url.needs_locating()
    }

    /// Options of the host in use now.
    pub fn options(&self) -> PgConnectOptions {
        self.hosts[self.current.load(Ordering::Acquire)].clone()
    }

    /// A pool that follows this target: checked sessions, moved with the primary.
    pub fn pool(self: &Arc<Self>, options: PgPoolOptions) -> PgPool {
        if !self.is_located() {
            return options.connect_lazy_with(self.options());
        }
        let attrs = self.url.attrs;
        let on_connect = Arc::downgrade(self);
        let on_acquire = Arc::downgrade(self);
        let pool = options
            .after_connect(move |connection, _| {
                let target = on_connect.clone();
                Box::pin(async move {
                    let verdict = session_qualifies(connection, attrs).await;
                    if !matches!(verdict, Ok(true)) {
                        nudge(&target);
                    }
                    match verdict {
                        Ok(true) => Ok(()),
                        Ok(false) => {
                            Err(sqlx::Error::Protocol(format!("{} is not a writable primary", attrs_name(attrs))))
                        }
                        Err(error) => Err(error),
                    }
                })
            })
            // A connection older than the last move may lead to the old primary.
            .before_acquire(move |_, meta| {
                let fresh = on_acquire.upgrade().is_none_or(|target| meta.age < target.since_move());
                Box::pin(async move { Ok(fresh) })
            })
            .connect_lazy_with(self.options());
        self.pools.lock().unwrap_or_else(PoisonError::into_inner).push(pool.clone());
        pool
    }

    fn since_move(&self) -> Duration {
        let moved = Duration::from_millis(self.moved_at_ms.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(moved)
    }

    /// A one-row, one-boolean query: whether this session may still be used
    /// (for readiness: a session that turned read-only is not ready).
    pub fn usable_session_query(&self) -> &'static str {
        match self.url.attrs {
            SessionAttrs::Any => "SELECT true",
            SessionAttrs::ReadWrite => "SELECT current_setting('transaction_read_only') = 'off'",
            SessionAttrs::Primary => "SELECT NOT pg_is_in_recovery()",
        }
    }

    /// Something suggests the primary moved: a failed or refused connection,
    /// a read-only session. The watcher probes the hosts again.
    pub fn suspect(&self) {
        if self.is_located() {
            self.suspect.notify_one();
        }
    }

    /// Probes the hosts in order and points every pool at the first that
    /// qualifies. Concurrent calls share one probe.
    pub async fn locate(&self) -> Result<()> {
        if !self.is_located() {
            return Ok(());
        }
        let _one_at_a_time = self.locating.lock().await;
        let mut last_error = None;
        for (index, options) in self.hosts.iter().enumerate() {
            match probe(options, self.url.attrs).await {
                Ok(true) => {
                    let previous = self.current.swap(index, Ordering::AcqRel);
                    if previous != index {
                        let now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                        self.moved_at_ms.store(now_ms, Ordering::Release);
                        for pool in self.pools.lock().unwrap_or_else(PoisonError::into_inner).iter() {
                            pool.set_connect_options(options.clone());
                        }
                        tracing::warn!(host = %self.url.hosts[index], "database connections now go to this host");
                    }
                    return Ok(());
                }
                Ok(false) => tracing::debug!(host = %self.url.hosts[index], "host does not qualify"),
                Err(error) => {
                    tracing::debug!(host = %self.url.hosts[index], %error, "host unreachable");
                    last_error = Some(error);
                }
            }
        }
        tracing::warn!(url = %self.url.redacted(), "no host of the database URL qualifies ({})", attrs_name(self.url.attrs));
        Err(match last_error {
            Some(error) => Error::StoreUnavailable(error),
            None => Error::StoreUnavailable(sqlx::Error::Protocol(format!("no {}", attrs_name(self.url.attrs)))),
        })
    }

    /// Locates at once, then again whenever a connection is suspected,
    /// retrying while no host qualifies. Ends with [`PgTarget::stop`] or
    /// when every store holding this target is gone.
    pub fn spawn_watcher(self: &Arc<Self>) {
        if !self.is_located() {
            return;
        }
        let target = Arc::downgrade(self);
        let stop = self.stop.clone();
        let suspect = Arc::clone(&self.suspect);
        tokio::spawn(async move {
            loop {
                let Some(this) = target.upgrade() else { return };
                while this.locate().await.is_err() {
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_EVERY) => {}
                        _ = stop.cancelled() => return,
                    }
                }
                drop(this);
                tokio::select! {
                    _ = suspect.notified() => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = &self.url.hosts.get(self.current.load(Ordering::Acquire));
        f.debug_struct("PgTarget").field("url", &self.url.redacted()).field("current", current).finish()
    }
}

impl Drop for PgTarget {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn nudge(target: &Weak<PgTarget>) {
    if let Some(target) = target.upgrade() {
        target.suspect();
    }
}

fn attrs_name(attrs: SessionAttrs) -> &'static str {
    match attrs {
        SessionAttrs::Any => "reachable host",
        SessionAttrs::ReadWrite => "read-write host",
        SessionAttrs::Primary => "primary (a host not in recovery)",
    }
}

/// Opens one connection to a host and checks its session; bounded in time.
async fn probe(options: &PgConnectOptions, attrs: SessionAttrs) -> Result<bool, sqlx::Error> {
    let check = async {
        let mut connection = PgConnection::connect_with(options).await?;
        let verdict = session_qualifies(&mut connection, attrs).await;
        let _ = connection.close().await;
        verdict
    };
    tokio::time::timeout(PROBE_TIMEOUT, check).await.unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

/// libpq's checks: `SHOW transaction_read_only` for read-write,
/// `pg_is_in_recovery()` for primary. Simple-protocol queries, so they also
/// work through a transaction pooler.
async fn session_qualifies(connection: &mut PgConnection, attrs: SessionAttrs) -> Result<bool, sqlx::Error> {
    use sqlx::Executor;
    match attrs {
        SessionAttrs::Any => Ok(true),
        SessionAttrs::ReadWrite => {
            let row = connection.fetch_one("SHOW transaction_read_only").await?;
            Ok(row.try_get::<String, _>(0)? == "off")
        }
        SessionAttrs::Primary => {
            let row = connection.fetch_one("SELECT pg_is_in_recovery()").await?;
            Ok(!row.try_get::<bool, _>(0)?)
        }
    }
}
