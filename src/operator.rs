//! What operators ask of the store through the Admin service, validated,
//! and why an action that changed nothing was refused. No I/O here.

use crate::domain::{Namespace, RecordId, State, Timestamp};
use crate::error::{Error, Result};

/// Records per page when the caller says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The largest page a caller may ask for.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Where a listing resumes: after this (updated_at, key) in its order
/// (newest updated_at first, ties by key).
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    pub updated_at: Timestamp,
    pub key: String,
}

/// One page of a namespace's live records.
#[derive(Debug, Clone, PartialEq)]
pub struct ListQuery {
    pub namespace: Namespace,
    pub state: Option<State>,
    pub outcome_unknown_only: bool,
    /// Exclusive.
    pub updated_before: Option<Timestamp>,
    /// Inclusive.
    pub updated_after: Option<Timestamp>,
    pub key_prefix: String,
    pub page_size: u32,
    pub after: Option<Cursor>,
}

impl ListQuery {
    /// Whether only ABORTED records can match, so the listing may walk the
    /// index of aborted records alone.
    pub fn aborted_only(&self) -> bool {
        self.outcome_unknown_only || self.state == Some(State::Aborted)
    }

    /// A range that cannot hold anything: an empty page, not an error.
    pub fn is_empty_range(&self) -> bool {
        matches!((self.updated_before, self.updated_after), (Some(before), Some(after)) if before <= after)
            || (self.outcome_unknown_only && matches!(self.state, Some(State::InProgress | State::Completed)))
    }
}

/// Admin.Resolve: the reconciled outcome of `attempt`.
#[derive(Debug, Clone)]
pub struct ResolveRequest {
    pub id: RecordId,
    pub attempt: u32,
    pub response: Vec<u8>,
    pub response_code: i32,
    pub content_type: String,
    pub reason: String,
    pub principal: String,
}

/// Admin.Release: ends `attempt` so that the next Begin acquires.
#[derive(Debug, Clone)]
pub struct ReleaseRequest {
    pub id: RecordId,
    pub attempt: u32,
    pub reason: String,
    pub outcome_unknown: bool,
    pub principal: String,
}

/// Admin.Invalidate: removes the record.
#[derive(Debug, Clone)]
pub struct InvalidateRequest {
    pub id: RecordId,
    pub reason: String,
    pub principal: String,
}

/// Where a live record stands, read after an action's statement changed
/// nothing, to say why.
#[derive(Debug, Clone, Copy)]
pub struct Standing {
    pub state: State,
    pub attempt: u32,
    pub lease_live: bool,
}

/// What an action that changed nothing tells its caller: an error, or
/// that the record moved in between and the statement should run again.
#[derive(Debug)]
pub enum Refusal {
    Error(Error),
    TryAgain,
}

fn fenced(standing: &Standing, attempt: u32) -> Option<Refusal> {
    (standing.attempt != attempt)
        .then_some(Refusal::Error(Error::AttemptMismatch { given: attempt, current: standing.attempt }))
}

impl Standing {
    pub fn why_not_resolved(standing: Option<Standing>, attempt: u32) -> Refusal {
        let Some(standing) = standing else { return Refusal::Error(Error::NotFound) };
        if let Some(refusal) = fenced(&standing, attempt) {
            return refusal;
        }
        match standing.state {
            State::Completed => Refusal::Error(Error::AlreadyCompleted),
            State::InProgress if standing.lease_live => Refusal::Error(Error::LeaseLive),
            State::InProgress | State::Aborted => Refusal::TryAgain,
        }
    }

    pub fn why_not_released(standing: Option<Standing>, attempt: u32) -> Refusal {
        let Some(standing) = standing else { return Refusal::Error(Error::NotFound) };
        if let Some(refusal) = fenced(&standing, attempt) {
            return refusal;
        }
        match standing.state {
            State::InProgress => Refusal::TryAgain,
            State::Completed | State::Aborted => Refusal::Error(Error::NotInProgress),
        }
    }

    pub fn why_not_invalidated(standing: Option<Standing>) -> Refusal {
        match standing {
            None => Refusal::Error(Error::NotFound),
            Some(Standing { state: State::InProgress, lease_live: true, .. }) => Refusal::Error(Error::LeaseLive),
            Some(_) => Refusal::TryAgain,
        }
    }
}

/// How many times an action re-runs its statement when the record moved
/// between the statement and the read that explains it.
pub const ACTION_ROUNDS: usize = 4;

/// Runs an action's statement until it changes the record or the read
/// after it explains the refusal.
pub async fn act<T, A, AFut, R, RFut>(
    mut try_act: A,
    mut read: R,
    why: impl Fn(Option<Standing>) -> Refusal,
) -> Result<T>
where
    A: FnMut() -> AFut,
    AFut: std::future::Future<Output = Result<Option<T>>>,
    R: FnMut() -> RFut,
    RFut: std::future::Future<Output = Result<Option<Standing>>>,
{
    for _ in 0..ACTION_ROUNDS {
        if let Some(done) = try_act().await? {
            return Ok(done);
        }
        match why(read().await?) {
            Refusal::Error(error) => return Err(error),
            Refusal::TryAgain => continue,
        }
    }
    Err(Error::Contention("the record kept changing during an Admin action"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(state: State, attempt: u32, lease_live: bool) -> Option<Standing> {
        Some(Standing { state, attempt, lease_live })
    }

    fn reason(refusal: Refusal) -> &'static str {
        match refusal {
            Refusal::Error(error) => error.reason(),
            Refusal::TryAgain => "try again",
        }
    }

    #[test]
    fn resolve_is_refused_for_the_documented_reasons_in_order() {
        assert_eq!(reason(Standing::why_not_resolved(None, 1)), "NOT_FOUND");
        assert_eq!(reason(Standing::why_not_resolved(standing(State::Completed, 2, false), 1)), "ATTEMPT_MISMATCH");
        assert_eq!(reason(Standing::why_not_resolved(standing(State::Completed, 1, false), 1)), "ALREADY_COMPLETED");
        assert_eq!(reason(Standing::why_not_resolved(standing(State::InProgress, 1, true), 1)), "LEASE_LIVE");
        assert_eq!(reason(Standing::why_not_resolved(standing(State::Aborted, 1, false), 1)), "try again");
    }

    #[test]
    fn release_and_invalidate_are_refused_for_the_documented_reasons() {
        assert_eq!(reason(Standing::why_not_released(None, 1)), "NOT_FOUND");
        assert_eq!(reason(Standing::why_not_released(standing(State::InProgress, 3, true), 2)), "ATTEMPT_MISMATCH");
        assert_eq!(reason(Standing::why_not_released(standing(State::Aborted, 2, false), 2)), "NOT_IN_PROGRESS");
        assert_eq!(reason(Standing::why_not_invalidated(None)), "NOT_FOUND");
        assert_eq!(reason(Standing::why_not_invalidated(standing(State::InProgress, 1, true))), "LEASE_LIVE");
        assert_eq!(reason(Standing::why_not_invalidated(standing(State::InProgress, 1, false))), "try again");
    }
}
