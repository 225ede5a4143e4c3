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
//! [`PgTarget`], which re-probes the hosts of a multi-host URL.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgArguments, PgPool, PgRow};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Postgres};

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
        let result = match &self.pooled_begin {
            None => query.fetch_optional(&self.pool).await,
            Some(begin) => {
                async {
                    let mut transaction = self.pool.begin_with(AssertSqlSafe(Arc::clone(begin))).await?;
                    let row = query.persistent(false).fetch_optional(&mut *transaction).await?;
                    transaction.commit().await?;
                    Ok(row)
                }
                .await
            }
        };
        self.checked(result)
    }

    pub async fn fetch_all(&self, query: PgQuery<'_>) -> Result<Vec<PgRow>> {
        let result = match &self.pooled_begin {
            None => query.fetch_all(&self.pool).await,
            Some(begin) => {
                async {
                    let mut transaction = self.pool.begin_with(AssertSqlSafe(Arc::clone(begin))).await?;
                    let rows = query.persistent(false).fetch_all(&mut *transaction).await?;
                    transaction.commit().await?;
                    Ok(rows)
                }
                .await
            }
        };
        self.checked(result)
    }

    /// Rows affected.
    pub async fn execute(&self, query: PgQuery<'_>) -> Result<u64> {
        let result = match &self.pooled_begin {
            None => query.execute(&self.pool).await.map(|done| done.rows_affected()),
            Some(begin) => {
                async {
                    let mut transaction = self.pool.begin_with(AssertSqlSafe(Arc::clone(begin))).await?;
                    let done = query.persistent(false).execute(&mut *transaction).await?;
                    transaction.commit().await?;
                    Ok(done.rows_affected())
                }
                .await
            }
        };
        self.checked(result)
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
