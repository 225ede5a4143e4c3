//! The LISTEN relay: wake-ups of waiters on this replica for transitions
//! on any replica, following the primary when it moves.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::target::PgTarget;
use crate::error::{Error, Result};
use crate::wakeups::Wakeups;

/// The NOTIFY channel; the payload is `namespace/key`.
pub const WAKE_CHANNEL: &str = "idemd_wake";

/// Relays NOTIFYs from every replica to this replica's waiters until
/// shutdown. After any gap in listening it wakes every waiter, so a
/// notification lost meanwhile costs a re-check, never a stuck waiter.
pub(super) fn spawn(
    target: Arc<PgTarget>,
    store_timeout: Duration,
    wakeups: Arc<Wakeups>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
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
    })
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
