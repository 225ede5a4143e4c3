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
//! statement itself, and so every rule of API.md, is the same.
//!
//! Either way a failure that suggests the primary moved tells the
//! [`PgTarget`], which re-probes the hosts of a multi-host URL, and a
//! statement cut short closes its connection rather than returning it.

use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnection, PgPool, PgRow};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Connection, Postgres};

use super::pg_target::PgTarget;
use crate::error::Result;

pub type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

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

    pub async fn fetch_optional(&self, query: PgQuery<'_>) -> Result<Option<PgRow>> {
        let result = self.run(async |connection, pooled| match pooled {
            None => query.fetch_optional(connection).await,
            Some(begin) => {
                let mut transaction = connection.begin_with(AssertSqlSafe(begin)).await?;
                let row = query.persistent(false).fetch_optional(&mut *transaction).await?;
                transaction.commit().await?;
                Ok(row)
            }
        });
        self.checked(result.await)
    }

    pub async fn fetch_all(&self, query: PgQuery<'_>) -> Result<Vec<PgRow>> {
        let result = self.run(async |connection, pooled| match pooled {
            None => query.fetch_all(connection).await,
            Some(begin) => {
                let mut transaction = connection.begin_with(AssertSqlSafe(begin)).await?;
                let rows = query.persistent(false).fetch_all(&mut *transaction).await?;
                transaction.commit().await?;
                Ok(rows)
            }
        });
        self.checked(result.await)
    }

    /// Rows affected.
    pub async fn execute(&self, query: PgQuery<'_>) -> Result<u64> {
        let result = self.run(async |connection, pooled| match pooled {
            None => query.execute(connection).await.map(|done| done.rows_affected()),
            Some(begin) => {
                let mut transaction = connection.begin_with(AssertSqlSafe(begin)).await?;
                let done = query.persistent(false).execute(&mut *transaction).await?;
                transaction.commit().await?;
                Ok(done.rows_affected())
            }
        });
        self.checked(result.await)
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
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            // connection exceptions, operator intervention (shutdown, crash
            // recovery), read_only_sql_transaction
            code.starts_with("08") || code.starts_with("57P") || code == "25006"
        }),
        _ => false,
    }
}
