//! The one error type of idemd and its single mapping to `tonic::Status`.
//!
//! Every status carries a `google.rpc.ErrorInfo` (domain `idemd`) with the
//! reason the proto documents; INVALID_ARGUMENT also carries `google.rpc.BadRequest`
//! field violations. Store failures are logged here and never echoed.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every idemd error.
pub const ERROR_DOMAIN: &str = "idemd";

/// Every `idemd_store_errors` kind [`Error::store_kind`] can give.
pub const STORE_ERROR_KINDS: [&str; 4] = ["unavailable", "timeout", "contention", "internal"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// INVALID_ARGUMENT, reason `INVALID_FIELD`, with a field violation.
    #[error("invalid {field}: {description}")]
    InvalidField { field: String, description: String },
    /// FAILED_PRECONDITION, reason `FINGERPRINT_MISMATCH`: the key is bound to
    /// another request.
    #[error("fingerprint differs from the one this key was first used with")]
    FingerprintMismatch,
    /// FAILED_PRECONDITION, reason `LEASE_LOST`: the token is not (or no
    /// longer) the live holder's.
    #[error("lease_token does not hold a live lease on this key")]
    LeaseLost,
    /// FAILED_PRECONDITION, reason `ATTEMPT_MISMATCH`: an Admin action named
    /// an attempt that is not the record's current one.
    #[error("attempt {given} is not the record's current attempt {current}")]
    AttemptMismatch { given: u32, current: u32 },
    /// FAILED_PRECONDITION, reason `LEASE_LIVE`: an Admin action that needs
    /// the attempt to have ended found its lease live.
    #[error("the current attempt holds a live lease: Release it first, or wait for it to end")]
    LeaseLive,
    /// FAILED_PRECONDITION, reason `ALREADY_COMPLETED`: Resolve of a
    /// completed record.
    #[error("the record is already COMPLETED")]
    AlreadyCompleted,
    /// FAILED_PRECONDITION, reason `NOT_IN_PROGRESS`: Release of a record
    /// that is not IN_PROGRESS.
    #[error("the record is not IN_PROGRESS")]
    NotInProgress,
    /// PERMISSION_DENIED, reason `ADMIN_REQUIRES_AUTH`: auth is off and the
    /// Admin service was called from a peer that is not on loopback.
    #[error("with auth off the Admin service answers loopback callers only")]
    AdminRequiresAuth,
    /// NOT_FOUND, reason `NOT_FOUND`: absent or expired.
    #[error("no record for this namespace and key")]
    NotFound,
    /// UNAVAILABLE, reason `STORE_UNAVAILABLE`: the database did not answer.
    #[error("store unavailable: {0}")]
    StoreUnavailable(#[source] sqlx::Error),
    /// UNAVAILABLE, reason `STORE_UNAVAILABLE`: idemd cannot use the
    /// database now for a reason of its own (no host of the URL is a
    /// writable primary, the session turned read-only, the LISTEN connection
    /// was lost, the connection of a batch failed): the primary may have
    /// moved; safe to retry.
    #[error("store unavailable: {0}")]
    StoreLost(String),
    /// UNAVAILABLE, reason `STORE_UNAVAILABLE`: the store kept changing under
    /// a Begin; safe to retry.
    #[error("store contention: {0}")]
    Contention(&'static str),
    /// UNAVAILABLE, reason `STORE_UNAVAILABLE`: the database did not answer
    /// within `--store-timeout`. Whether the statement took effect is
    /// unknown, so the caller must not proceed (fail closed).
    #[error("store did not answer in time")]
    StoreTimeout,
    /// DEADLINE_EXCEEDED, reason `DEADLINE_EXCEEDED`: the caller's deadline
    /// passed before the store answered.
    #[error("deadline exceeded before the store answered")]
    DeadlineExceeded,
    /// UNAUTHENTICATED, reason `UNAUTHENTICATED`: auth is on and the call
    /// carries no known token or client certificate.
    #[error("missing or unknown credentials: send `authorization: Bearer <token>`")]
    Unauthenticated,
    /// PERMISSION_DENIED, reason `NAMESPACE_DENIED`: the credentials do not
    /// grant this namespace. Says nothing about whether the key exists.
    #[error("these credentials do not grant this namespace")]
    NamespaceDenied,
    /// RESOURCE_EXHAUSTED, reason `TOO_MANY_WAITERS`: no room to park one
    /// more `wait_timeout` waiter (overall or in this namespace).
    #[error("too many waiting Begin calls in {0}; retry after retry_after or without wait_timeout")]
    TooManyWaiters(&'static str),
    /// RESOURCE_EXHAUSTED, reason `RATE_LIMITED`: the request rate limit of
    /// the namespace or of the credentials was reached.
    #[error("request rate limit of {0} reached; retry with backoff")]
    RateLimited(&'static str),
    /// DEADLINE_EXCEEDED, reason `REQUEST_READ_TIMEOUT`: the request's body
    /// (or one message of a stream) did not arrive within
    /// `--request-read-timeout`, whatever the caller's own deadline.
    #[error("the request did not arrive within {0:?} (--request-read-timeout)")]
    RequestReadTimeout(std::time::Duration),
    /// RESOURCE_EXHAUSTED, reason `UNAUTHENTICATED_BYTES`: calls that need no
    /// credentials (health, reflection) hold too many request bytes on this
    /// connection at once.
    #[error("calls without credentials hold more than {0} request bytes on this connection")]
    UnauthenticatedBytes(usize),
    /// UNIMPLEMENTED, reason `UNIMPLEMENTED`: no such method, or a request
    /// compression idemd does not accept.
    #[error("{0}")]
    Unimplemented(String),
    /// INTERNAL, reason `INTERNAL`: the database refused a statement as a
    /// data or programming error (Postgres SQLSTATE classes 22, 23, 42 and
    /// XX; SQLite constraint and SQL errors). Retrying cannot help, so it is
    /// never UNAVAILABLE; logged at ERROR, not echoed.
    #[error("the database refused a statement ({code}): {message}")]
    DatabaseBug { code: String, message: String },
    /// INTERNAL: a bug or an impossible row; logged, not echoed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidField { field: field.into(), description: description.into() }
    }

    /// The one table of what an error means on the wire and in metrics:
    /// its gRPC code, its `ErrorInfo.reason`, its metric outcome label
    /// (`idemd.outcome` on the span) and, for a store failure, its
    /// `idemd_store_errors` kind.
    fn describe(&self) -> (Code, &'static str, &'static str, Option<&'static str>) {
        use Code::*;
        match self {
            Error::InvalidField { .. } => (InvalidArgument, "INVALID_FIELD", "invalid_field", None),
            Error::FingerprintMismatch => (FailedPrecondition, "FINGERPRINT_MISMATCH", "fingerprint_mismatch", None),
            Error::LeaseLost => (FailedPrecondition, "LEASE_LOST", "lease_lost", None),
            Error::AttemptMismatch { .. } => (FailedPrecondition, "ATTEMPT_MISMATCH", "attempt_mismatch", None),
            Error::LeaseLive => (FailedPrecondition, "LEASE_LIVE", "lease_live", None),
            Error::AlreadyCompleted => (FailedPrecondition, "ALREADY_COMPLETED", "already_completed", None),
            Error::NotInProgress => (FailedPrecondition, "NOT_IN_PROGRESS", "not_in_progress", None),
            Error::AdminRequiresAuth => (PermissionDenied, "ADMIN_REQUIRES_AUTH", "admin_requires_auth", None),
            Error::NotFound => (NotFound, "NOT_FOUND", "not_found", None),
            Error::StoreUnavailable(_) => (Unavailable, "STORE_UNAVAILABLE", "store_unavailable", Some("unavailable")),
            Error::StoreLost(_) => (Unavailable, "STORE_UNAVAILABLE", "store_unavailable", Some("unavailable")),
            Error::StoreTimeout => (Unavailable, "STORE_UNAVAILABLE", "store_unavailable", Some("timeout")),
            Error::Contention(_) => (Unavailable, "STORE_UNAVAILABLE", "store_unavailable", Some("contention")),
            Error::DeadlineExceeded => (DeadlineExceeded, "DEADLINE_EXCEEDED", "deadline_exceeded", None),
            Error::RequestReadTimeout(_) => (DeadlineExceeded, "REQUEST_READ_TIMEOUT", "request_read_timeout", None),
            Error::Unauthenticated => (Unauthenticated, "UNAUTHENTICATED", "unauthenticated", None),
            Error::NamespaceDenied => (PermissionDenied, "NAMESPACE_DENIED", "namespace_denied", None),
            Error::TooManyWaiters(_) => (ResourceExhausted, "TOO_MANY_WAITERS", "too_many_waiters", None),
            Error::RateLimited(_) => (ResourceExhausted, "RATE_LIMITED", "rate_limited", None),
            Error::UnauthenticatedBytes(_) => {
                (ResourceExhausted, "UNAUTHENTICATED_BYTES", "unauthenticated_bytes", None)
            }
            Error::Unimplemented(_) => (Unimplemented, "UNIMPLEMENTED", "unimplemented", None),
            Error::DatabaseBug { .. } | Error::Internal(_) => (Internal, "INTERNAL", "internal", Some("internal")),
        }
    }

    /// The `ErrorInfo.reason` of this error.
    pub fn reason(&self) -> &'static str {
        self.describe().1
    }

    fn code(&self) -> Code {
        self.describe().0
    }

    /// The outcome label of a call that failed with this error.
    pub fn outcome(&self) -> &'static str {
        self.describe().2
    }

    /// The kind of a failed store call, `None` for errors that are not the store's.
    pub fn store_kind(&self) -> Option<&'static str> {
        self.describe().3
    }
}

impl Error {
    /// After this failure the server idemd writes to may no longer be the
    /// primary: a multi-host target looks for it again.
    pub fn primary_may_have_moved(&self) -> bool {
        match self {
            Error::StoreLost(_) => true,
            Error::StoreUnavailable(error) => crate::store::postgres::session::primary_may_have_moved(error),
            _ => false,
        }
    }

    /// The database answered the statement with an error (or contention
    /// outlasted the retries): nothing of it took effect.
    pub fn rejected_by_database(&self) -> bool {
        matches!(
            self,
            Error::DatabaseBug { .. } | Error::Contention(_) | Error::StoreUnavailable(sqlx::Error::Database(_))
        )
    }
}

/// What an error the database answered with means for the caller, by
/// Postgres SQLSTATE class (SQLite by its result code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseErrorClass {
    /// Connection exceptions (08), operator intervention (57P: shutdown,
    /// crash recovery), insufficient resources (53), a read-only session
    /// (25006): the primary may have moved; UNAVAILABLE, retry.
    Unavailable,
    /// Serialization failure (40001) or deadlock (40P01): the statement was
    /// rolled back and may be run again.
    Contention,
    /// Data exceptions (22), integrity violations (23), syntax or access
    /// errors (42), internal errors (XX): a bug; INTERNAL, never retried.
    Bug,
}

pub fn classify(error: &dyn sqlx::error::DatabaseError) -> DatabaseErrorClass {
    use sqlx::error::ErrorKind;
    if !matches!(error.kind(), ErrorKind::Other) {
        // A unique, foreign-key, not-null or check violation, in either database.
        return DatabaseErrorClass::Bug;
    }
    let code = error.code();
    let code = code.as_deref().unwrap_or("");
    if error.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // By primary result code: SQLITE_ERROR (a syntax error, a missing
        // table or column), SQLITE_CONSTRAINT, SQLITE_MISMATCH, SQLITE_RANGE.
        let primary = code.parse::<i32>().map(|code| code & 0xff).unwrap_or(0);
        return if matches!(primary, 1 | 19 | 20 | 25) {
            DatabaseErrorClass::Bug
        } else {
            DatabaseErrorClass::Unavailable
        };
    }
    match code {
        "40001" | "40P01" => DatabaseErrorClass::Contention,
        _ if ["22", "23", "42", "XX"].iter().any(|class| code.starts_with(class)) => DatabaseErrorClass::Bug,
        _ => DatabaseErrorClass::Unavailable,
    }
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        match error {
            // Decoding a row we wrote ourselves cannot fail unless the code
            // and the schema disagree: that is a bug, not an outage.
            sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::Decode(_) => Error::Internal(error.to_string()),
            sqlx::Error::Database(database) => match classify(database.as_ref()) {
                DatabaseErrorClass::Bug => Error::DatabaseBug {
                    code: database.code().map(|code| code.into_owned()).unwrap_or_default(),
                    message: database.message().to_string(),
                },
                DatabaseErrorClass::Contention => Error::Contention("a serialization failure or deadlock persisted"),
                DatabaseErrorClass::Unavailable => Error::StoreUnavailable(sqlx::Error::Database(database)),
            },
            other => Error::StoreUnavailable(other),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = error.code();
        // What went wrong inside is logged by the RPC (`observe`), never sent.
        let message = match &error {
            Error::StoreUnavailable(_) | Error::StoreLost(_) => "store unavailable; retry with backoff".to_string(),
            Error::Internal(_) | Error::DatabaseBug { .. } => "internal error".to_string(),
            other => other.to_string(),
        };
        let mut details = ErrorDetails::with_error_info(error.reason(), ERROR_DOMAIN, HashMap::new());
        if let Error::InvalidField { field, description } = &error {
            details.add_bad_request_violation(field.clone(), description.clone());
        }
        Status::with_error_details(code, message, details)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_store_error_kind_is_one_the_metrics_export_from_the_start() {
        let errors = [
            Error::StoreUnavailable(sqlx::Error::PoolTimedOut),
            Error::StoreLost("moved".into()),
            Error::StoreTimeout,
            Error::Contention("kept changing"),
            Error::Internal("bug".into()),
            Error::DatabaseBug { code: "42703".into(), message: "no such column".into() },
        ];
        for error in errors {
            let kind = error.store_kind().unwrap_or_else(|| panic!("{error:?} is a store error"));
            assert!(STORE_ERROR_KINDS.contains(&kind), "{kind} is not in STORE_ERROR_KINDS");
        }
    }
}
