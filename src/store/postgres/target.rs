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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};
use std::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::url::{PgUrl, SessionAttrs};
use crate::error::{Error, Result};

/// The shortest time one host gets to accept a connection and answer the
/// session check (half of `--store-timeout` when that is longer).
const MIN_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Between two rounds of probing while no host qualifies, and at least
/// between any two rounds: a storm of failures probes the hosts five times
/// a second, not once per failure.
const RETRY_EVERY: Duration = Duration::from_millis(200);

pub struct PgTarget {
    url: PgUrl,
    hosts: Vec<PgConnectOptions>,
    /// Index into `hosts` the pools use now.
    current: AtomicUsize,
    pools: Mutex<Vec<PgPool>>,
    /// Microseconds after `epoch` at which the pools last moved to another host.
    moved_at_us: AtomicU64,
    /// How many times the pools moved: a LISTEN connection opened before a
    /// move listens to a server that no longer takes the writes.
    moves: AtomicU64,
    epoch: Instant,
    probe_timeout: Duration,
    watching: AtomicBool,
    suspect: Arc<Notify>,
    /// Ends the watcher when the last store holding this target is dropped.
    stop: CancellationToken,
    locating: tokio::sync::Mutex<()>,
}

impl PgTarget {
    /// Parses the URL; `customize` applies idemd's own settings to every host's options.
    pub fn new(
        url: &str,
        store_timeout: Duration,
        customize: impl Fn(PgConnectOptions) -> PgConnectOptions,
    ) -> Result<Arc<PgTarget>> {
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
            moved_at_us: AtomicU64::new(0),
            moves: AtomicU64::new(0),
            epoch: Instant::now(),
            probe_timeout: (store_timeout / 2).max(MIN_PROBE_TIMEOUT),
            watching: AtomicBool::new(false),
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
        let pool = self.checked(options).connect_lazy_with(self.options());
        if self.is_located() {
            self.pools.lock().unwrap_or_else(PoisonError::into_inner).push(pool.clone());
        }
        pool
    }

    /// A one-connection pool on the host in use now, with checked sessions,
    /// that does not follow later moves: for a LISTEN session, which is
    /// replaced as a whole when the primary moves. Whatever hangs in it (a
    /// silent host) holds nothing another caller needs.
    pub fn one_off_pool(self: &Arc<Self>, acquire_timeout: Duration) -> PgPool {
        let options = PgPoolOptions::new().max_connections(1).acquire_timeout(acquire_timeout);
        self.checked(options).connect_lazy_with(self.options())
    }

    fn checked(self: &Arc<Self>, options: PgPoolOptions) -> PgPoolOptions {
        if !self.is_located() {
            return options;
        }
        let attrs = self.url.attrs;
        let on_connect = Arc::downgrade(self);
        let on_acquire = Arc::downgrade(self);
        options
            .after_connect(move |connection, _| {
                let target = on_connect.clone();
                Box::pin(async move {
                    let verdict = session_qualifies(connection, attrs).await;
                    if !matches!(verdict, Ok(true)) {
                        nudge(&target);
                    }
                    match verdict {
                        Ok(true) => Ok(()),
                        // sqlx's hook can only refuse with one of its errors:
                        // to the pool this host is as good as unreachable.
                        Ok(false) => Err(sqlx::Error::Io(std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            format!("{} is not a writable primary", attrs_name(attrs)),
                        ))),
                        Err(error) => Err(error),
                    }
                })
            })
            // A connection older than the last move may lead to the old primary.
            .before_acquire(move |_, meta| {
                let fresh = on_acquire.upgrade().is_none_or(|target| meta.age < target.since_move());
                Box::pin(async move { Ok(fresh) })
            })
    }

    fn since_move(&self) -> Duration {
        let moved = Duration::from_micros(self.moved_at_us.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(moved)
    }

    /// How many times the pools moved to another host so far.
    pub fn moves(&self) -> u64 {
        self.moves.load(Ordering::Acquire)
    }

    /// The host at `index` as written, for logs.
    fn host_name(&self, index: usize) -> String {
        self.url.hosts.get(index).map(ToString::to_string).unwrap_or_else(|| "the default host".into())
    }

    /// A one-row, one-boolean query: whether this session may still be used
    /// (for readiness: a session that turned read-only is not ready).
    /// idemd writes, so a read-only session is never usable, whatever
    /// `target_session_attrs` says.
    pub fn usable_session_query(&self) -> &'static str {
        match self.url.attrs {
            SessionAttrs::Any | SessionAttrs::ReadWrite => "SELECT current_setting('transaction_read_only') = 'off'",
            SessionAttrs::Primary => {
                "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'"
            }
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
            match probe(options, self.url.attrs, self.probe_timeout).await {
                Ok(true) => {
                    let previous = self.current.swap(index, Ordering::AcqRel);
                    if previous != index {
                        // New options first, then the move's time: a connection
                        // opened with the old options is never younger than the move.
                        for pool in self.pools.lock().unwrap_or_else(PoisonError::into_inner).iter() {
                            pool.set_connect_options(options.clone());
                        }
                        let now_us = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
                        self.moved_at_us.store(now_us, Ordering::Release);
                        self.moves.fetch_add(1, Ordering::AcqRel);
                        tracing::warn!(host = %self.host_name(index), "database connections now go to this host");
                    }
                    return Ok(());
                }
                Ok(false) => tracing::debug!(host = %self.host_name(index), "host does not qualify"),
                Err(error) => {
                    tracing::debug!(host = %self.host_name(index), %error, "host unreachable");
                    last_error = Some(error);
                }
            }
        }
        tracing::warn!(url = %self.url.redacted(), "no host of the database URL qualifies ({})", attrs_name(self.url.attrs));
        Err(match last_error {
            Some(error) => Error::StoreUnavailable(error),
            None => Error::StoreLost(format!("no {}", attrs_name(self.url.attrs))),
        })
    }

    /// Locates at once, then again whenever a connection is suspected,
    /// retrying while no host qualifies. Ends with [`PgTarget::stop`] or
    /// when every store holding this target is gone.
    pub fn spawn_watcher(self: &Arc<Self>) {
        if !self.is_located() || self.watching.swap(true, Ordering::AcqRel) {
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
                    _ = tokio::time::sleep(RETRY_EVERY) => {}
                    _ = stop.cancelled() => return,
                }
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
async fn probe(options: &PgConnectOptions, attrs: SessionAttrs, timeout: Duration) -> Result<bool, sqlx::Error> {
    let check = async {
        let mut connection = PgConnection::connect_with(options).await?;
        let verdict = session_qualifies(&mut connection, attrs).await;
        let _ = connection.close().await;
        verdict
    };
    tokio::time::timeout(timeout, check).await.unwrap_or(Err(sqlx::Error::PoolTimedOut))
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
