//! The proto types against the domain's: decoding a request's durations,
//! encoding replies and records, and the record id every request carries.

use std::time::Duration;

use crate::domain::{self, BeginOutcome, Record, Timestamp};
use crate::error::{Error, Result};
use crate::pb;

/// A request naming one record by `namespace` and `key`.
pub(crate) trait Addressed {
    /// Takes the namespace and key out of the message, unchecked.
    fn take_id(&mut self) -> (String, String);
}

macro_rules! addressed {
    ($($message:ty),*) => {$(
        impl Addressed for $message {
            fn take_id(&mut self) -> (String, String) {
                (std::mem::take(&mut self.namespace), std::mem::take(&mut self.key))
            }
        }
    )*};
}

addressed!(pb::BeginRequest, pb::CompleteRequest, pb::AbortRequest, pb::HeartbeatRequest, pb::LookupRequest);

/// A protobuf Duration as a std Duration: malformed or negative ones are
/// INVALID_ARGUMENT naming `field`.
pub(crate) fn parse_duration(field: &str, value: &prost_types::Duration) -> Result<Duration> {
    // The protobuf spec's range for Duration.seconds: ±10,000 years.
    const MAX_SECONDS: i64 = 315_576_000_000;
    let (seconds, nanos) = (value.seconds, value.nanos);
    if !(-999_999_999..=999_999_999).contains(&nanos) {
        return Err(Error::invalid(field, format!("{field}.nanos is out of range")));
    }
    if (seconds > 0 && nanos < 0) || (seconds < 0 && nanos > 0) {
        return Err(Error::invalid(field, format!("{field} has mixed signs")));
    }
    if !(-MAX_SECONDS..=MAX_SECONDS).contains(&seconds) {
        return Err(Error::invalid(field, format!("{field}.seconds is out of range")));
    }
    if seconds < 0 || nanos < 0 {
        return Err(Error::invalid(field, format!("{field} is negative")));
    }
    // Both are non-negative and in range here.
    Ok(Duration::new(seconds.unsigned_abs(), nanos.unsigned_abs()))
}

/// An optional Duration field: unset means `default`, set must lie in [min, max].
pub(crate) fn duration_in(
    field: &str,
    value: Option<&prost_types::Duration>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration> {
    let Some(value) = value else {
        return Ok(default);
    };
    let duration = parse_duration(field, value)?;
    if duration < min || duration > max {
        return Err(Error::invalid(
            field,
            format!(
                "{field} must lie within [{}, {}]",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(duration)
}

pub(crate) fn timestamp(value: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: value.timestamp(),
        // Always below 2e9 (a leap second adds at most 1e9).
        nanos: i32::try_from(value.timestamp_subsec_nanos()).unwrap_or(999_999_999),
    }
}

pub(crate) fn encode_begin(outcome: BeginOutcome) -> pb::BeginResponse {
    use pb::begin_response::Outcome;
    let outcome = match outcome {
        BeginOutcome::Acquired(lease) => Outcome::Acquired(pb::Acquired {
            lease_token: lease.lease_token,
            attempt: lease.attempt,
            lease_expires_at: Some(timestamp(lease.lease_expires_at)),
            downstream_key: lease.downstream_key,
            previous: lease.previous.map(encode_previous),
        }),
        BeginOutcome::Completed(stored) => Outcome::Completed(pb::Completed {
            response: stored.response,
            response_code: stored.response_code,
            content_type: stored.content_type,
            completed_at: Some(timestamp(stored.completed_at)),
            expires_at: Some(timestamp(stored.expires_at)),
            attempt: stored.attempt,
        }),
        BeginOutcome::InProgress(busy) => Outcome::InProgress(pb::InProgress {
            attempt: busy.attempt,
            lease_expires_at: Some(timestamp(busy.lease_expires_at)),
            retry_after: Some(pb::duration(busy.retry_after())),
        }),
    };
    pb::BeginResponse { outcome: Some(outcome) }
}

fn encode_aborted_by(aborted_by: Option<domain::AbortedBy>) -> pb::AbortedBy {
    match aborted_by {
        Some(domain::AbortedBy::Caller) => pb::AbortedBy::Caller,
        Some(domain::AbortedBy::Reaper) => pb::AbortedBy::Reaper,
        Some(domain::AbortedBy::Operator) => pb::AbortedBy::Operator,
        None => pb::AbortedBy::Unspecified,
    }
}

fn encode_previous(previous: domain::PreviousAttempt) -> pb::PreviousAttempt {
    pb::PreviousAttempt {
        attempt: previous.attempt,
        aborted_by: encode_aborted_by(previous.aborted_by) as i32,
        abort_reason: previous.abort_reason,
        outcome_unknown: previous.outcome_unknown,
        ended_at: previous.ended_at.map(timestamp),
    }
}

pub(crate) fn encode_event(event: domain::Event) -> pb::Event {
    let kind = match event.kind {
        domain::EventKind::Acquired => pb::EventKind::Acquired,
        domain::EventKind::Completed => pb::EventKind::Completed,
        domain::EventKind::Aborted => pb::EventKind::Aborted,
        domain::EventKind::Reaped => pb::EventKind::Reaped,
        domain::EventKind::Released => pb::EventKind::Released,
        domain::EventKind::Resolved => pb::EventKind::Resolved,
        domain::EventKind::Invalidated => pb::EventKind::Invalidated,
    };
    pb::Event {
        at: Some(timestamp(event.at)),
        kind: kind as i32,
        attempt: event.attempt,
        principal: event.principal,
        reason: event.reason,
        response_code: event.response_code.unwrap_or_default(),
        outcome_unknown: event.outcome_unknown,
    }
}

pub(crate) fn encode_record(record: Record) -> pb::Record {
    let state = match record.state {
        domain::State::InProgress => pb::State::InProgress,
        domain::State::Completed => pb::State::Completed,
        domain::State::Aborted => pb::State::Aborted,
    };
    let aborted_by = encode_aborted_by(record.aborted_by);
    pb::Record {
        namespace: record.namespace,
        key: record.key,
        state: state as i32,
        attempt: record.attempt,
        fingerprint: record.fingerprint,
        downstream_key: record.downstream_key,
        created_at: Some(timestamp(record.created_at)),
        updated_at: Some(timestamp(record.updated_at)),
        lease_expires_at: Some(timestamp(record.lease_expires_at)),
        completed_at: record.completed_at.map(timestamp),
        expires_at: Some(timestamp(record.expires_at)),
        response: record.response.unwrap_or_default(),
        response_code: record.response_code.unwrap_or_default(),
        content_type: record.content_type.unwrap_or_default(),
        abort_reason: record.abort_reason.unwrap_or_default(),
        aborted_by: aborted_by as i32,
        outcome_unknown: record.outcome_unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(seconds: i64, nanos: i32) -> prost_types::Duration {
        prost_types::Duration { seconds, nanos }
    }

    #[test]
    fn durations_are_checked() {
        assert_eq!(parse_duration("x", &d(1, 500)).ok(), Some(Duration::new(1, 500)));
        assert!(parse_duration("x", &d(1, -1)).is_err());
        assert!(parse_duration("x", &d(-1, 1)).is_err());
        assert!(parse_duration("x", &d(0, 1_000_000_000)).is_err());
        assert!(parse_duration("x", &d(-5, 0)).is_err());
        assert!(parse_duration("x", &d(i64::MAX, 0)).is_err());
        let limits = Duration::from_secs(1)..=Duration::from_secs(10);
        assert!(duration_in("x", Some(&d(0, 0)), Duration::from_secs(5), *limits.start(), *limits.end()).is_err());
        assert_eq!(
            duration_in("x", None, Duration::from_secs(5), *limits.start(), *limits.end()).ok(),
            Some(Duration::from_secs(5))
        );
    }
}
