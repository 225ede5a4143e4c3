//! Plain types of the idempotency domain: validated identities, records and
//! the outcome of each transition. No I/O here.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::RngCore;

use crate::error::{Error, Result};

/// Instants as the store's clock tells them.
pub type Timestamp = DateTime<Utc>;

pub const MAX_NAMESPACE_LEN: usize = 64;
pub const MAX_KEY_LEN: usize = 255;
pub const MAX_FINGERPRINT_LEN: usize = 64;
pub const MAX_NONCE_LEN: usize = 128;
pub const MAX_CONTENT_TYPE_LEN: usize = 255;
pub const MAX_REASON_LEN: usize = 1024;
/// Tokens we issue are 51 bytes; anything much longer cannot be one of ours.
pub const MAX_LEASE_TOKEN_LEN: usize = 256;

/// Whether `c` is a control character as the proto defines it.
fn is_control(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}')
}

/// 1–64 characters of `[a-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace(String);

impl Namespace {
    pub fn parse(value: String) -> Result<Self> {
        if value.is_empty() {
            return Err(Error::invalid("namespace", "namespace is required"));
        }
        if value.len() > MAX_NAMESPACE_LEN {
            return Err(Error::invalid("namespace", "namespace is longer than 64 characters"));
        }
        if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')) {
            return Err(Error::invalid("namespace", "namespace may only contain [a-z0-9._-]"));
        }
        Ok(Namespace(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// 1–255 bytes of UTF-8 without control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(String);

impl Key {
    pub fn parse(value: String) -> Result<Self> {
        if value.is_empty() {
            return Err(Error::invalid("key", "key is required"));
        }
        if value.len() > MAX_KEY_LEN {
            return Err(Error::invalid("key", "key is longer than 255 bytes"));
        }
        if value.chars().any(is_control) {
            return Err(Error::invalid("key", "key contains a control character"));
        }
        Ok(Key(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The primary key of a record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordId {
    pub namespace: Namespace,
    pub key: Key,
}

impl RecordId {
    pub fn parse(namespace: String, key: String) -> Result<Self> {
        Ok(RecordId { namespace: Namespace::parse(namespace)?, key: Key::parse(key)? })
    }

    /// The id of a row read back from the database, which only ever holds
    /// ids that were checked on the way in.
    pub fn stored(namespace: String, key: String) -> Self {
        RecordId { namespace: Namespace(namespace), key: Key(key) }
    }

    /// The id a wake-up `NOTIFY` names as `namespace/key` (unambiguous: a
    /// namespace has no `/`); `None` for a payload that is not one.
    pub fn from_wake_payload(payload: &str) -> Option<Self> {
        let (namespace, key) = payload.split_once('/')?;
        RecordId::parse(namespace.to_string(), key.to_string()).ok()
    }
}

/// 0–64 bytes, compared byte for byte.
pub fn check_fingerprint(value: &[u8]) -> Result<()> {
    if value.len() > MAX_FINGERPRINT_LEN {
        return Err(Error::invalid("fingerprint", "fingerprint is longer than 64 bytes"));
    }
    Ok(())
}

/// A string field with a byte limit and, when `no_control`, no control characters.
pub fn check_text(field: &str, value: &str, max: usize, no_control: bool) -> Result<()> {
    if value.len() > max {
        return Err(Error::invalid(field, format!("{field} is longer than {max} bytes")));
    }
    if no_control && value.chars().any(is_control) {
        return Err(Error::invalid(field, format!("{field} contains a control character")));
    }
    Ok(())
}

/// A lease token as given back by a caller: required, bounded.
pub fn check_lease_token(value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid("lease_token", "lease_token is required"));
    }
    check_text("lease_token", value, MAX_LEASE_TOKEN_LEN, true)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    InProgress = 1,
    Completed = 2,
    Aborted = 3,
}

impl State {
    pub fn from_code(code: i64) -> Result<Self> {
        match code {
            1 => Ok(State::InProgress),
            2 => Ok(State::Completed),
            3 => Ok(State::Aborted),
            other => Err(Error::Internal(format!("unknown state {other} in store"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortedBy {
    Caller = 1,
    Reaper = 2,
    Operator = 3,
}

impl AbortedBy {
    pub fn from_code(code: Option<i64>) -> Option<Self> {
        match code {
            Some(1) => Some(AbortedBy::Caller),
            Some(2) => Some(AbortedBy::Reaper),
            Some(3) => Some(AbortedBy::Operator),
            _ => None,
        }
    }
}

/// The abort reason the reaper writes.
pub const REAPER_REASON: &str = "lease expired";

/// A validated Begin.
#[derive(Debug, Clone)]
pub struct BeginRequest {
    pub id: RecordId,
    pub fingerprint: Vec<u8>,
    pub lease_ttl: Duration,
    pub retention: Duration,
    /// `None` when the caller sent no (or an empty) nonce.
    pub attempt_nonce: Option<String>,
    /// Who asks, for the history (`""` when auth is off).
    pub principal: String,
}

/// A validated Abort.
#[derive(Debug, Clone)]
pub struct AbortRequest {
    pub id: RecordId,
    pub lease_token: String,
    pub reason: String,
    pub outcome_unknown: bool,
    pub principal: String,
}

/// What Complete stores.
#[derive(Debug, Clone)]
pub struct CompleteRequest {
    pub id: RecordId,
    pub lease_token: String,
    pub response: Vec<u8>,
    pub response_code: i32,
    pub content_type: String,
    pub principal: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub lease_token: String,
    pub attempt: u32,
    pub lease_expires_at: Timestamp,
    pub downstream_key: String,
    /// How attempt − 1 ended; `None` on attempt 1.
    pub previous: Option<PreviousAttempt>,
}

/// How the attempt before an acquisition ended (`Acquired.previous`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreviousAttempt {
    pub attempt: u32,
    pub aborted_by: Option<AbortedBy>,
    pub abort_reason: String,
    pub outcome_unknown: bool,
    pub ended_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub response: Vec<u8>,
    pub response_code: i32,
    pub content_type: String,
    pub completed_at: Timestamp,
    pub expires_at: Timestamp,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Busy {
    pub attempt: u32,
    pub lease_expires_at: Timestamp,
    /// Time until the lease expires by the store's clock (not clamped).
    pub lease_remaining: Duration,
}

impl Busy {
    /// The `retry_after` hint: the time until the lease expires, clamped to [50 ms, 2 s].
    pub fn retry_after(&self) -> Duration {
        self.lease_remaining.clamp(Duration::from_millis(50), Duration::from_secs(2))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum BeginOutcome {
    Acquired(Lease),
    Completed(StoredResponse),
    InProgress(Busy),
}

/// The timestamps a (possibly retried) Complete answers with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Completion {
    pub completed_at: Timestamp,
    pub expires_at: Timestamp,
}

/// A record as Lookup shows it: everything but the lease token and nonce.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub namespace: String,
    pub key: String,
    pub state: State,
    pub attempt: u32,
    pub fingerprint: Vec<u8>,
    pub downstream_key: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub lease_expires_at: Timestamp,
    pub completed_at: Option<Timestamp>,
    pub expires_at: Timestamp,
    pub response: Option<Vec<u8>>,
    pub response_code: Option<i32>,
    pub content_type: Option<String>,
    pub abort_reason: Option<String>,
    pub aborted_by: Option<AbortedBy>,
    pub outcome_unknown: bool,
}

/// What happened to a record, as its history keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Acquired = 1,
    Completed = 2,
    Aborted = 3,
    Reaped = 4,
    Released = 5,
    Resolved = 6,
    Invalidated = 7,
}

impl EventKind {
    pub fn from_code(code: i64) -> Result<Self> {
        Ok(match code {
            1 => EventKind::Acquired,
            2 => EventKind::Completed,
            3 => EventKind::Aborted,
            4 => EventKind::Reaped,
            5 => EventKind::Released,
            6 => EventKind::Resolved,
            7 => EventKind::Invalidated,
            other => return Err(Error::Internal(format!("unknown event kind {other} in store"))),
        })
    }
}

/// One event of a key's history.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at: Timestamp,
    pub kind: EventKind,
    pub attempt: u32,
    pub principal: String,
    pub reason: String,
    pub response_code: Option<i32>,
    pub outcome_unknown: bool,
}

/// The principal of every event the reaper's rule writes (a lease expired).
pub const REAPER_PRINCIPAL: &str = "reaper";

/// A lease the reaper aborted: its caller most likely died mid-operation.
#[derive(Debug, Clone, PartialEq)]
pub struct ReapedLease {
    pub namespace: String,
    pub key: String,
    pub attempt: u32,
    /// From the lease's end to the reaper's abort, by the store's clock:
    /// how far behind the reaper is.
    pub overdue: Duration,
}

/// What a store read of a live record says to a Begin that did not acquire.
#[derive(Debug, Clone)]
pub struct CurrentRecord {
    pub state: State,
    pub attempt: u32,
    pub fingerprint: Vec<u8>,
    pub downstream_key: String,
    pub lease_token: String,
    pub attempt_nonce: Option<String>,
    pub lease_expires_at: Timestamp,
    pub stored: Option<StoredResponse>,
    /// How the attempt before the current one ended, for a holder's retry.
    pub previous: Option<PreviousAttempt>,
    /// The store's clock at the read.
    pub now: Timestamp,
}

/// How a Begin that did not acquire reads the record it lost to.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Outcome(BeginOutcome),
    Mismatch,
    /// The record changed between the acquisition attempt and the read
    /// (aborted, expired, purged): attempt the acquisition again.
    TryAgain,
}

impl CurrentRecord {
    /// Applies Begin's table to a live record that the acquisition statement
    /// did not take. Pure: the acquisition itself happened (or not) in SQL.
    pub fn verdict(self, request: &BeginRequest) -> Verdict {
        if self.fingerprint != request.fingerprint {
            return Verdict::Mismatch;
        }
        match self.state {
            State::Completed => match self.stored {
                Some(stored) => Verdict::Outcome(BeginOutcome::Completed(stored)),
                None => Verdict::TryAgain,
            },
            State::Aborted => Verdict::TryAgain,
            State::InProgress if self.lease_expires_at <= self.now => Verdict::TryAgain,
            State::InProgress => {
                let own_retry = matches!((&request.attempt_nonce, &self.attempt_nonce),
                    (Some(mine), Some(holder)) if mine == holder);
                if own_retry {
                    Verdict::Outcome(BeginOutcome::Acquired(Lease {
                        lease_token: self.lease_token,
                        attempt: self.attempt,
                        lease_expires_at: self.lease_expires_at,
                        downstream_key: self.downstream_key,
                        previous: self.previous,
                    }))
                } else {
                    let lease_remaining = (self.lease_expires_at - self.now).to_std().unwrap_or(Duration::ZERO);
                    Verdict::Outcome(BeginOutcome::InProgress(Busy {
                        attempt: self.attempt,
                        lease_expires_at: self.lease_expires_at,
                        lease_remaining,
                    }))
                }
            }
        }
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// `"idk_"` + 32 lowercase hex digits (128 random bits): the provider's
/// idempotency key, drawn when a record is created.
pub fn new_downstream_key() -> String {
    format!("idk_{}", random_hex(16))
}

/// `"lt_"` + 48 hex digits (192 random bits), unique per acquisition.
pub fn new_lease_token() -> String {
    format!("lt_{}", random_hex(24))
}

/// Microseconds of a duration, saturating (durations here are at most 30 days).
pub fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_rules() {
        assert!(Namespace::parse("payments.eu-1_a".into()).is_ok());
        assert!(Namespace::parse("".into()).is_err());
        assert!(Namespace::parse("Payments".into()).is_err());
        assert!(Namespace::parse("a/b".into()).is_err());
        assert!(Namespace::parse("a".repeat(64)).is_ok());
        assert!(Namespace::parse("a".repeat(65)).is_err());
    }

    #[test]
    fn key_rules() {
        assert!(Key::parse("order-1 ✓".into()).is_ok());
        assert!(Key::parse("".into()).is_err());
        assert!(Key::parse("a\u{0}".into()).is_err());
        assert!(Key::parse("a\u{7f}".into()).is_err());
        assert!(Key::parse("a\u{85}".into()).is_err());
        assert!(Key::parse("é".repeat(127)).is_ok());
        assert!(Key::parse("é".repeat(128)).is_err());
    }

    #[test]
    fn generated_keys_have_their_shape() {
        let k = new_downstream_key();
        assert_eq!(k.len(), 36);
        assert!(k.starts_with("idk_"));
        assert!(k[4..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(new_lease_token(), new_lease_token());
    }

    #[test]
    fn retry_after_is_clamped() {
        let busy = |ms| Busy { attempt: 1, lease_expires_at: Utc::now(), lease_remaining: Duration::from_millis(ms) };
        assert_eq!(busy(0).retry_after(), Duration::from_millis(50));
        assert_eq!(busy(700).retry_after(), Duration::from_millis(700));
        assert_eq!(busy(60_000).retry_after(), Duration::from_secs(2));
    }
}
