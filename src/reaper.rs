//! The reaper (aborts leases whose caller died) and the purger (deletes
//! expired records). Both run on every replica at once: the store's
//! statements skip rows another replica is already handling. Each reports
//! its last good pass and how late it handled each row, which is what
//! tells someone on call that it stopped or fell behind.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{MAINTENANCE_BATCH, Store};

/// Longest pause after repeated store errors.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Batches per purge tick: bounds one tick's work, the rest waits a tick.
const PURGE_BATCHES_PER_TICK: usize = 20;

/// `loop { select! { tick => work, shutdown => break } }`, doubling the
/// pause after each failed tick and resetting it after a good one. The
/// start counts as a good pass, so "no good pass for N minutes" means the
/// same on a replica that just started as on one that ran for days.
fn every<F, Fut>(
    name: &'static str,
    interval: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    mut work: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = crate::error::Result<()>> + Send,
{
    metrics.maintenance_succeeded(name);
    tokio::spawn(async move {
        let mut pause = interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => break,
            }
            pause = match work().await {
                Ok(()) => {
                    metrics.maintenance_succeeded(name);
                    interval
                }
                Err(error) => {
                    tracing::warn!(task = name, %error, "background task failed; backing off");
                    (pause * 2).min(MAX_BACKOFF.max(interval))
                }
            };
        }
    })
}

pub fn spawn_reaper<S: Store>(
    store: S,
    metrics: Arc<Metrics>,
    interval: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    every("reaper", interval, Arc::clone(&metrics), shutdown, move || {
        let store = store.clone();
        let metrics = Arc::clone(&metrics);
        async move {
            loop {
                let reaped = store.reap_expired_leases(MAINTENANCE_BATCH).await?;
                metrics.reaped(reaped.len() as u64);
                for lease in &reaped {
                    metrics.maintenance_lag("reaper", lease.overdue);
                    // A reaped lease means a caller died mid-operation.
                    tracing::warn!(
                        namespace = ?lease.namespace,
                        // Debug-quoted: a key cannot forge other log fields.
                        key = ?lease.key,
                        attempt = lease.attempt,
                        "lease expired without Complete or Abort; aborted by the reaper"
                    );
                }
                if (reaped.len() as i64) < MAINTENANCE_BATCH {
                    return Ok(());
                }
            }
        }
    })
}

pub fn spawn_purger<S: Store>(
    store: S,
    metrics: Arc<Metrics>,
    interval: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    every("purger", interval, Arc::clone(&metrics), shutdown, move || {
        let store = store.clone();
        let metrics = Arc::clone(&metrics);
        async move {
            let mut purged = 0;
            for _ in 0..PURGE_BATCHES_PER_TICK {
                let batch = store.purge_expired(MAINTENANCE_BATCH).await?;
                metrics.purged(batch.len() as u64);
                for overdue in &batch {
                    metrics.maintenance_lag("purger", *overdue);
                }
                purged += batch.len();
                if (batch.len() as i64) < MAINTENANCE_BATCH {
                    break;
                }
            }
            if purged > 0 {
                tracing::info!(purged, "purged expired records");
            }
            Ok(())
        }
    })
}
