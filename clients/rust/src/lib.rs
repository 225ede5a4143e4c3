//! The Rust client of idemd: [`Client::run_once`] runs an operation exactly
//! once per idempotency key and does the protocol's hard parts in one place
//! (Begin first, heartbeats while the operation runs, Complete or Abort
//! always, waiting on a concurrent duplicate, retrying Begin with the same
//! attempt nonce, beginning again after a lost lease).
//!
//! - [`client`](Client): the connection for one namespace, its [`Policy`],
//!   the field checks and the retried RPCs;
//! - `run_once`: the helper, with [`Attempt`] (what the operation is told),
//!   [`Failure`] (how it failed), [`Done`] (the outcome, run or replayed);
//! - [`Error`]: one error type, an [`ErrorKind`] per outcome, the cause kept;
//! - [`entity_key`] and [`fingerprint`]: the same values in every language;
//! - [`pb`]: the contract's generated code (messages and the raw stubs).
//!
//! A provider that deduplicates on `downstream_key` makes a retry after an
//! unknown outcome safe by itself. For one that does not,
//! [`Client::run_once_with_reconcile`] first asks the provider (a reconcile
//! hook) whenever the previous attempt's outcome is unknown, and stores what
//! it already did instead of doing it again.
//!
//! This crate depends on tonic's client side only.
#![forbid(unsafe_code)]

mod client;
mod error;
mod keys;
mod run_once;

pub use client::{Client, Policy};
pub use error::{Cause, Error, ErrorKind};
pub use keys::{entity_key, fingerprint};
pub use run_once::{Attempt, Done, Failure, PreviousAttempt, Response};

/// Code generated from `proto/idemd/v1/idempotency.proto` and `admin.proto`
/// (client side).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("idemd.v1");

    /// A std duration as a protobuf Duration (saturating).
    pub fn duration(value: std::time::Duration) -> prost_types::Duration {
        prost_types::Duration {
            seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(value.subsec_nanos()).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `clients/testdata/vectors.json`, which every client's tests read.
    fn vectors() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/vectors.json");
        let text = std::fs::read_to_string(path).expect("clients/testdata/vectors.json");
        serde_json::from_str(&text).expect("vectors are JSON")
    }

    fn text<'a>(value: &'a serde_json::Value, field: &str) -> &'a str {
        value[field].as_str().expect("a string")
    }

    #[test]
    fn entity_keys_match_the_shared_vectors() {
        let vectors = vectors();
        let cases = vectors["entity_keys"].as_array().expect("entity_keys");
        assert!(!cases.is_empty());
        for case in cases {
            assert_eq!(entity_key(text(case, "entity"), text(case, "operation")), text(case, "key"), "{case}");
        }
    }

    #[test]
    fn fingerprints_match_the_shared_vectors() {
        let vectors = vectors();
        let cases = vectors["fingerprints"].as_array().expect("fingerprints");
        assert!(!cases.is_empty());
        for case in cases {
            let fields: Vec<(&str, &[u8])> = case["fields"]
                .as_object()
                .expect("fields")
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str().expect("text").as_bytes()))
                .collect();
            assert_eq!(hex::encode(fingerprint(&fields)), text(case, "sha256_hex"), "{case}");
        }
        assert_ne!(fingerprint(&[("a", b"bc")]), fingerprint(&[("ab", b"c")]));
    }
}
