//! How one statement reaches Postgres.
//!
//! Directly (the default), each statement is a named prepared statement,
//! cached per connection: one round trip.
//!
//! Through a transaction-mode pooler (`--db-pooler transaction`, PgBouncer),
//! a server connection is ours only inside a transaction and may be another
//! one for the next. So each statement is unnamed (nothing outlives its
//! transaction) and runs in an explicit transaction whose first line sets the
//! statement timeout (poolers refuse the startup `options` that carry it
//! otherwise). That costs three round trips more per statement; the
//! statement itself, and so every rule of the proto, is the same.
//!
//! Either way a failure that suggests the primary moved tells the
//! [`PgTarget`], which re-probes the hosts of a multi-host URL, and a
//! statement cut short closes its connection rather than returning it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnection, PgPool, PgRow};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Connection, Postgres};

use super::target::PgTarget;
use crate::error::{DatabaseErrorClass, Result, classify};

pub type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

/// How many times in all a statement runs when Postgres keeps answering
/// with a serialization failure or a deadlock.
pub const CONTENTION_ATTEMPTS: u32 = 3;

/// Runs `once` again while it fails for contention, at most
/// [`CONTENTION_ATTEMPTS`] times in all.
async fn retry_contention<T, Fut>(once: impl Fn() -> Fut) -> Result<T, sqlx::Error>
where
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 1;
    loop {
        let result = once().await;
        if attempt >= CONTENTION_ATTEMPTS || !is_contention(&result) {
            return result;
        }
        attempt += 1;
        // A few milliseconds apart, so that the statements that met do not meet again.
        tokio::time::sleep(Duration::from_millis(rand::random_range(1..=5) * u64::from(attempt))).await;
    }
}

fn is_contention<T>(result: &Result<T, sqlx::Error>) -> bool {
    matches!(result, Err(sqlx::Error::Database(error)) if classify(error.as_ref()) == DatabaseErrorClass::Contention)
}

#[derive(Clone)]
pub struct PgSession {
    pool: PgPool,
    target: Arc<PgTarget>,
    /// `Some(BEGIN; SET LOCAL statement_timeout …)` through a transaction pooler.
    pooled_begin: Option<Arc<str>>,
}

impl std::fmt::Debug for PgSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSession").field("through_pooler", &self.pooled_begin.is_some()).finish()
    }
}

impl PgSession {
    pub fn new(pool: PgPool, target: Arc<PgTarget>, through_pooler: bool, statement_timeout: Duration) -> Self {
        let pooled_begin = through_pooler
            .then(|| Arc::from(format!("BEGIN; SET LOCAL statement_timeout = {}", statement_timeout.as_millis())));
        PgSession { pool, target, pooled_begin }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn target(&self) -> &Arc<PgTarget> {
        &self.target
    }

    pub async fn fetch_optional<'q>(&self, query: impl Fn() -> PgQuery<'q>) -> Result<Option<PgRow>> {
        self.retrying(|| {
            self.run(async |connection, pooled| match pooled {
                None => query().fetch_optional(connection).await,
                Some(begin) => {
                    let mut transaction = connection.begin_with(AssertSqlSafe(begin)).await?;
                    let row = query().persistent(false).fetch_optional(&mut *transaction).await?;
                    transaction.commit().await?;
                    Ok(row)
                }
            })
        })
        .await
    }

    pub async fn fetch_all<'q>(&self, query: impl Fn() -> PgQuery<'q>) -> Result<Vec<PgRow>> {
        self.retrying(|| {
            self.run(async |connection, pooled| match pooled {
                None => query().fetch_all(connection).await,
                Some(begin) => {
                    let mut transaction = connection.begin_with(AssertSqlSafe(begin)).await?;
                    let rows = query().persistent(false).fetch_all(&mut *transaction).await?;
                    transaction.commit().await?;
                    Ok(rows)
                }
            })
        })
        .await
    }

    /// Runs a statement, again after a serialization failure or a deadlock
    /// (Postgres rolled it back, so it took no effect), at most
    /// [`CONTENTION_ATTEMPTS`] times in all; what still fails then is
    /// UNAVAILABLE for contention.
    async fn retrying<T, Fut>(&self, once: impl Fn() -> Fut) -> Result<T>
    where
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.checked(retry_contention(once).await)
    }

    /// Runs `work` on a pooled connection. The connection goes back to the
    /// pool only when the work finished (or Postgres answered it with an
    /// error); a statement cut short (the caller's timeout, a failed socket)
    /// closes it instead, within sqlx's 5 s close timeout. Returned, sqlx
    /// would first check it with a round trip that has no timeout: against a
    /// host that went silent that holds the pool slot until TCP gives up.
    async fn run<T>(
        &self,
        work: impl AsyncFnOnce(&mut PgConnection, Option<Arc<str>>) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let mut guard = CloseUnlessReturned(Some(self.pool.acquire().await?));
        let connection = guard.0.as_deref_mut().ok_or(sqlx::Error::PoolClosed)?;
        let result = work(connection, self.pooled_begin.clone()).await;
        if matches!(result, Ok(_) | Err(sqlx::Error::Database(_))) {
            drop(guard.0.take());
        }
        result
    }
    fn checked<T>(&self, result: Result<T, sqlx::Error>) -> Result<T> {
        if let Err(error) = &result
            && primary_may_have_moved(error)
        {
            self.target.suspect();
        }
        Ok(result?)
    }
}

/// Holds a connection that is closed, not returned, if dropped while still held.
struct CloseUnlessReturned(Option<PoolConnection<Postgres>>);

impl Drop for CloseUnlessReturned {
    fn drop(&mut self) {
        if let Some(connection) = self.0.as_mut() {
            connection.close_on_drop();
        }
    }
}

/// Failures after which the server we write to may no longer be the primary.
pub fn primary_may_have_moved(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol { .. } | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            // connection exceptions, operator intervention (shutdown, crash
            // recovery), read_only_sql_transaction
            code.starts_with("08") || code.starts_with("57P") || code == "25006"
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::error::Error;

    /// A database error with a given SQLSTATE.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn failing(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Sqlstate(code)))
    }

    #[tokio::test(start_paused = true)]
    async fn serialization_failures_and_deadlocks_are_retried_a_bounded_number_of_times() {
        for code in ["40001", "40P01"] {
            let runs = AtomicU32::new(0);
            let result = retry_contention(|| async {
                runs.fetch_add(1, Ordering::Relaxed);
                Err::<(), _>(failing(code))
            })
            .await;
            assert_eq!(runs.load(Ordering::Relaxed), CONTENTION_ATTEMPTS);
            let error = Error::from(result.expect_err("still failing"));
            assert_eq!((error.reason(), error.store_kind()), ("STORE_UNAVAILABLE", Some("contention")), "{error}");
            // Once it goes through, the retry's answer is the answer.
            let runs = AtomicU32::new(0);
            let result = retry_contention(|| async {
                match runs.fetch_add(1, Ordering::Relaxed) {
                    0 => Err(failing(code)),
                    _ => Ok(7),
                }
            })
            .await;
            assert_eq!(result.expect("the retry succeeded"), 7);
        }
    }

    #[tokio::test]
    async fn other_database_errors_are_answered_at_once_and_classified() {
        for (code, reason, kind) in [
            ("23514", "INTERNAL", Some("internal")),
            ("42601", "INTERNAL", Some("internal")),
            ("22001", "INTERNAL", Some("internal")),
            ("XX000", "INTERNAL", Some("internal")),
            ("08006", "STORE_UNAVAILABLE", Some("unavailable")),
            ("57P01", "STORE_UNAVAILABLE", Some("unavailable")),
            ("53300", "STORE_UNAVAILABLE", Some("unavailable")),
            ("25006", "STORE_UNAVAILABLE", Some("unavailable")),
        ] {
            let runs = AtomicU32::new(0);
            let result = retry_contention(|| async {
                runs.fetch_add(1, Ordering::Relaxed);
                Err::<(), _>(failing(code))
            })
            .await;
            assert_eq!(runs.load(Ordering::Relaxed), 1, "{code}");
            let error = Error::from(result.expect_err("failing"));
            assert_eq!((error.reason(), error.store_kind()), (reason, kind), "{code}");
        }
    }
}
