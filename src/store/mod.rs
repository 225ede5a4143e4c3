//! The `Store` trait: every state transition of a record, each one atomic
//! statement (or one short transaction) keyed by `(namespace, key)`.
//!
//! Implementations: [`postgres::PgStore`] (production; the database's clock
//! rules leases and expiry) and [`sqlite::SqliteStore`] (the embedded
//! default; this process's clock). The service above never decides a
//! transition: it validates, calls one method and encodes the result.

pub(crate) mod listing;
pub mod postgres;
pub(crate) mod rows;
pub mod sqlite;

use std::future::Future;
use std::time::Duration;

use crate::domain::{
    AbortRequest, BeginOutcome, BeginRequest, CompleteRequest, Completion, Event, ReapedLease, Record, RecordId,
    Timestamp, Verdict,
};
use crate::error::{Error, Result};
use crate::operator::{InvalidateRequest, ListQuery, ReleaseRequest, ResolveRequest};

/// How many times Begin re-runs its acquisition when the record changes
/// between the statement and the read of what won (abort, expiry, purge).
/// Each retry means another transition happened meanwhile, so this bound is
/// only reached under pathological churn.
pub const BEGIN_ROUNDS: usize = 8;

/// Rows per batch for the reaper and the purger.
pub const MAINTENANCE_BATCH: i64 = 500;

pub trait Store: Send + Sync + Clone + 'static {
    /// Begin's table in one atomic acquisition: acquires (creating,
    /// re-acquiring after an abort, taking over an expired lease), or reports
    /// the stored response, the live holder, or a fingerprint mismatch.
    /// Never waits: waiting is the service's job.
    fn begin(&self, request: &BeginRequest) -> impl Future<Output = Result<BeginOutcome>> + Send;

    /// Stores the response and COMPLETED in one statement when the token
    /// holds the live lease; a repeat by the same token answers the original
    /// timestamps. Wakes the key's waiters.
    fn complete(&self, request: &CompleteRequest) -> impl Future<Output = Result<Completion>> + Send;

    /// IN_PROGRESS → ABORTED (by the caller) when the token holds the live
    /// lease; a repeat by the same token is OK. Wakes the key's waiters.
    fn abort(&self, request: &AbortRequest) -> impl Future<Output = Result<()>> + Send;

    /// Marks `attempt` of the key as awaited before a Begin parks on it, so
    /// that the transition ending it wakes this replica. False when that
    /// attempt is no longer in flight: look again instead of parking. A store
    /// that wakes on every transition has nothing to mark.
    fn watch(&self, _id: &RecordId, _attempt: u32) -> impl Future<Output = Result<bool>> + Send {
        std::future::ready(Ok(true))
    }

    /// Extends a live lease to now + `lease_ttl`; returns the new expiry.
    fn heartbeat(
        &self,
        id: &RecordId,
        lease_token: &str,
        lease_ttl: Duration,
    ) -> impl Future<Output = Result<Timestamp>> + Send;

    /// Reads a live record.
    fn lookup(&self, id: &RecordId) -> impl Future<Output = Result<Record>> + Send;

    /// One page of a namespace's live records (one more than the page size
    /// when another page follows), responses left out.
    fn list_records(&self, query: &ListQuery) -> impl Future<Output = Result<Vec<Record>>> + Send;

    /// A key's events, oldest first; NOT_FOUND when it has none kept.
    fn history(&self, id: &RecordId) -> impl Future<Output = Result<Vec<Event>>> + Send;

    /// Admin.Resolve in one statement with its event; wakes the key's waiters.
    fn resolve(&self, request: &ResolveRequest) -> impl Future<Output = Result<Record>> + Send;

    /// Admin.Release in one statement with its event; wakes the key's waiters.
    fn release(&self, request: &ReleaseRequest) -> impl Future<Output = Result<Record>> + Send;

    /// Admin.Invalidate in one statement with its event.
    fn invalidate(&self, request: &InvalidateRequest) -> impl Future<Output = Result<()>> + Send;

    /// Aborts up to `limit` IN_PROGRESS records whose lease expired, safe
    /// with every replica doing it at once. Wakes their waiters.
    fn reap_expired_leases(&self, limit: i64) -> impl Future<Output = Result<Vec<ReapedLease>>> + Send;

    /// Deletes up to `limit` records past their `expires_at`; for each, how
    /// long past due it was (by the store's clock).
    fn purge_expired(&self, limit: i64) -> impl Future<Output = Result<Vec<Duration>>> + Send;

    /// Whether every transition that ends a lease wakes this replica's
    /// waiters at once (else they find out by re-checking, more often).
    fn wakes_waiters(&self) -> bool {
        true
    }

    /// Answers when the database answers: drives readiness.
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;

    /// How many of the migrations this binary knows the database has not
    /// applied: with `--no-migrate`, readiness waits for none.
    fn missing_migrations(&self) -> impl Future<Output = Result<usize>> + Send;

    /// Connections of the request pool, for the pool gauge.
    fn pool_stats(&self) -> crate::metrics::PoolStats;

    /// Closes the pool after the server has drained.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// Binds a Begin's acquisition parameters in the order both dialects'
/// `BEGIN_ACQUIRE` statements number them: namespace, key, fingerprint,
/// lease (µs), retention (µs), downstream key, lease token, nonce, the
/// principal for the history, and the reason an expired lease taken over
/// is recorded with.
pub(crate) fn bind_acquire<'q, DB>(
    query: sqlx::query::Query<'q, DB, DB::Arguments>,
    request: &BeginRequest,
    lease_token: &str,
) -> sqlx::query::Query<'q, DB, DB::Arguments>
where
    DB: sqlx::Database,
    for<'t> &'t str: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> &'t [u8]: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> Option<&'t str>: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> i64: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> String: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    query
        .bind(request.id.namespace.as_str())
        .bind(request.id.key.as_str())
        .bind(request.fingerprint.as_slice())
        .bind(crate::domain::micros(request.lease_ttl))
        .bind(crate::domain::micros(request.retention))
        .bind(crate::domain::new_downstream_key())
        .bind(lease_token)
        .bind(request.attempt_nonce.as_deref())
        .bind(request.principal.as_str())
        .bind(crate::domain::REAPER_REASON)
}

/// The loop both stores share: try the atomic acquisition; if it did not
/// acquire, read what holds the record and apply Begin's table to it. A read
/// that finds the record gone, aborted or expired means a transition happened
/// in between, so the acquisition is attempted again.
pub(crate) async fn begin_rounds<A, AFut, R, RFut>(
    request: &BeginRequest,
    mut try_acquire: A,
    mut read_current: R,
) -> Result<BeginOutcome>
where
    A: FnMut() -> AFut,
    AFut: Future<Output = Result<Option<BeginOutcome>>>,
    R: FnMut() -> RFut,
    RFut: Future<Output = Result<Option<crate::domain::CurrentRecord>>>,
{
    for _ in 0..BEGIN_ROUNDS {
        if let Some(acquired) = try_acquire().await? {
            return Ok(acquired);
        }
        let Some(current) = read_current().await? else {
            continue;
        };
        match current.verdict(request) {
            Verdict::Outcome(outcome) => return Ok(outcome),
            Verdict::Mismatch => return Err(Error::FingerprintMismatch),
            Verdict::TryAgain => continue,
        }
    }
    Err(Error::Contention("the record kept changing during Begin"))
}

/// Reads the state, lease token and timestamps of a record that a
/// Complete, Abort or Heartbeat statement did not change, to say why.
#[derive(Debug)]
pub(crate) struct TokenCheck {
    pub state: crate::domain::State,
    pub lease_token: String,
    pub aborted_by: Option<crate::domain::AbortedBy>,
    pub completed_at: Option<Timestamp>,
    pub expires_at: Timestamp,
}

/// A Complete, Abort or Heartbeat whose statement changed nothing: the
/// record's token check says why (a retry of the holder's own call answers
/// as the first did; anything else is LEASE_LOST), and no record is NOT_FOUND.
pub(crate) fn why_unchanged<T>(check: Option<TokenCheck>, explain: impl FnOnce(TokenCheck) -> Result<T>) -> Result<T> {
    check.map_or(Err(Error::NotFound), explain)
}

impl TokenCheck {
    /// A Heartbeat only ever extends a live lease of its own token: one that
    /// changed nothing lost it.
    pub fn repeated_heartbeat(self) -> Result<Timestamp> {
        Err(Error::LeaseLost)
    }

    /// A Complete that changed nothing: OK again for the token that completed
    /// the record, LEASE_LOST for anyone else.
    pub fn repeated_complete(self, token: &str) -> Result<Completion> {
        match (self.state, self.completed_at) {
            (crate::domain::State::Completed, Some(completed_at)) if self.lease_token == token => {
                Ok(Completion { completed_at, expires_at: self.expires_at })
            }
            _ => Err(Error::LeaseLost),
        }
    }

    /// An Abort that changed nothing: OK again for the token whose caller
    /// aborted it, LEASE_LOST otherwise (including a reaper's abort).
    pub fn repeated_abort(self, token: &str) -> Result<()> {
        if self.state == crate::domain::State::Aborted
            && self.aborted_by == Some(crate::domain::AbortedBy::Caller)
            && self.lease_token == token
        {
            Ok(())
        } else {
            Err(Error::LeaseLost)
        }
    }
}

/// Of `migrator`'s migrations, how many are not among the `applied` versions
/// (sqlx's `_sqlx_migrations` rows that succeeded).
fn not_applied(migrator: &sqlx::migrate::Migrator, applied: &[i64]) -> usize {
    migrator.iter().filter(|migration| !applied.contains(&migration.version)).count()
}

/// The query that lists the applied migrations, the same on both stores.
const APPLIED_MIGRATIONS: &str = "SELECT version FROM _sqlx_migrations WHERE success";
