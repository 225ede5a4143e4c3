//! The one error type of the client: what became of a call, the key and
//! attempt it concerned, and its cause (the operation's own error, idemd's
//! status, or what a client-side check found).

use std::convert::Infallible;
use std::fmt;

use tonic::{Code, Status};

/// What became of a call that returned an [`Error`], and so what the caller
/// may do next. The same kinds as the other clients' errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A namespace, key, fingerprint, policy, address or response idemd
    /// would refuse, found before any call (or idemd's INVALID_ARGUMENT).
    /// Nothing ran. Fix the code.
    InvalidArgument,
    /// The key was first used with another request (a different
    /// fingerprint). Nothing ran; the record is unchanged. Answer 422.
    FingerprintMismatch,
    /// Another attempt still held the key when the in-progress budget ran
    /// out. Nothing ran here; retry later (503 with Retry-After).
    InProgress,
    /// The operation returned [`Failure::Retryable`](crate::Failure): nothing
    /// happened, the attempt was aborted, and a retry runs it again.
    Retryable,
    /// The side effect may have happened. The attempt was aborted as
    /// outcome-unknown (or its lease expires, which says the same), so the
    /// next attempt sees [`PreviousAttempt::outcome_unknown`](crate::PreviousAttempt)
    /// and its reconcile hook runs first. Returned for
    /// [`Failure::OutcomeUnknown`](crate::Failure), a failed reconcile hook, a
    /// [`Failure::Retryable`](crate::Failure) after an earlier unknown outcome
    /// nobody reconciled, a response idemd cannot store, and a Complete that
    /// failed. Retrying is safe when the provider deduplicates on the
    /// downstream key or a reconcile hook asks it first.
    OutcomeUnknown,
    /// The operation ran, but its lease kept being taken over (or released
    /// by an operator) before its outcome was stored. Call again: it replays
    /// the winner's result or runs a new attempt with the same downstream key.
    LeaseLost,
    /// idemd refused (UNAUTHENTICATED, PERMISSION_DENIED,
    /// RESOURCE_EXHAUSTED, …) or stayed unreachable past the retries, before
    /// anything ran. [`Error::code`] says which.
    Rpc,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::FingerprintMismatch => "fingerprint mismatch: the key was used with a different request",
            ErrorKind::InProgress => "another attempt is still in progress",
            ErrorKind::Retryable => "retryable failure (aborted)",
            ErrorKind::OutcomeUnknown => "outcome unknown (aborted as outcome-unknown)",
            ErrorKind::LeaseLost => "lease lost before the outcome was stored",
            ErrorKind::Rpc => "idemd call failed",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Why an [`Error`] happened.
#[derive(Debug)]
pub enum Cause<E> {
    /// The operation's own error (from [`Failure::Retryable`](crate::Failure)
    /// or [`Failure::OutcomeUnknown`](crate::Failure)) or the reconcile hook's.
    Operation(E),
    /// idemd's answer: its gRPC status, with the `ErrorInfo` reason in
    /// [`Error::reason`].
    Status(Status),
    /// What the client found: a field idemd would refuse, a budget that ran
    /// out, a record that changed under the call.
    Message(String),
}

/// The error of every call of this crate. `E` is the operation's own error
/// type; construction errors have none (`Error<Infallible>`, the default).
///
/// Match on [`Error::kind`]; take the operation's error back with
/// [`Error::into_operation_error`]. A final failure (a declined card) is not
/// an error: it is a stored outcome, returned in [`Done`](crate::Done), which
/// [`Done::into_result`](crate::Done::into_result) turns back into the
/// caller's own error type.
pub struct Error<E = Infallible> {
    kind: ErrorKind,
    key: String,
    attempt: u32,
    cause: Cause<E>,
}

impl<E> Error<E> {
    pub(crate) fn new(kind: ErrorKind, key: &str, attempt: u32, cause: Cause<E>) -> Self {
        Error { kind, key: key.to_string(), attempt, cause }
    }

    pub(crate) fn invalid(key: &str, message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, key, 0, Cause::Message(message.into()))
    }

    /// What became of the call.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The idempotency key of the call ("" for errors building a client).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The attempt that ran, 0 when none was acquired.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn cause(&self) -> &Cause<E> {
        &self.cause
    }

    pub fn into_cause(self) -> Cause<E> {
        self.cause
    }

    /// The operation's (or reconcile hook's) own error, if it caused this.
    pub fn operation_error(&self) -> Option<&E> {
        match &self.cause {
            Cause::Operation(error) => Some(error),
            _ => None,
        }
    }

    /// The operation's own error back, or this error when something else
    /// caused it.
    pub fn into_operation_error(self) -> Result<E, Self> {
        match self.cause {
            Cause::Operation(error) => Ok(error),
            cause => Err(Error { cause, ..self }),
        }
    }

    /// idemd's status, when idemd's answer caused this.
    pub fn status(&self) -> Option<&Status> {
        match &self.cause {
            Cause::Status(status) => Some(status),
            _ => None,
        }
    }

    /// idemd's gRPC code, when idemd's answer caused this.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }

    /// The `google.rpc.ErrorInfo` reason idemd attached, e.g.
    /// `FINGERPRINT_MISMATCH` or `LEASE_LOST`.
    pub fn reason(&self) -> Option<String> {
        self.status().and_then(reason)
    }

    /// The same error with the operation's error converted (e.g. an
    /// `Error<Infallible>` of [`Client::new`](crate::Client::new) into the
    /// error type of your calls: `error.map(|never| match never {})`).
    pub fn map<F>(self, convert: impl FnOnce(E) -> F) -> Error<F> {
        let cause = match self.cause {
            Cause::Operation(error) => Cause::Operation(convert(error)),
            Cause::Status(status) => Cause::Status(status),
            Cause::Message(message) => Cause::Message(message),
        };
        Error { kind: self.kind, key: self.key, attempt: self.attempt, cause }
    }
}

/// The `google.rpc.ErrorInfo` reason of an idemd status.
pub(crate) fn reason(status: &Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_details_error_info().map(|info| info.reason)
}

impl<E: fmt::Debug> fmt::Debug for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("key", &self.key)
            .field("attempt", &self.attempt)
            .field("cause", &self.cause)
            .finish()
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "idemd: {}", self.kind)?;
        if !self.key.is_empty() {
            write!(f, " (key {:?}", self.key)?;
            if self.attempt > 0 {
                write!(f, ", attempt {}", self.attempt)?;
            }
            f.write_str(")")?;
        }
        match &self.cause {
            Cause::Operation(error) => write!(f, ": {error}"),
            Cause::Status(status) => match reason(status) {
                Some(reason) => write!(f, ": {:?} {reason}: {}", status.code(), status.message()),
                None => write!(f, ": {:?}: {}", status.code(), status.message()),
            },
            Cause::Message(message) => write!(f, ": {message}"),
        }
    }
}

impl<E> std::error::Error for Error<E>
where
    E: std::error::Error + 'static,
{
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            Cause::Operation(error) => Some(error),
            Cause::Status(status) => Some(status),
            Cause::Message(_) => None,
        }
    }
}
