//! The idempotency key of an entity's operation and the fingerprint of a
//! request: the same values in every client language (checked against
//! `clients/testdata/vectors.json`).

use sha2::{Digest, Sha256};

/// The idempotency key of an operation on a business entity
/// (`entity_key(&order.id, "charge")`): a UUIDv5 under
/// UUIDv5(URL, "urn:idemd:key") of `operation + "\n" + entity`, so a retry
/// from a service in any language finds the same record.
pub fn entity_key(entity: &str, operation: &str) -> String {
    let namespace = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, b"urn:idemd:key");
    uuid::Uuid::new_v5(&namespace, format!("{operation}\n{entity}").as_bytes()).to_string()
}

/// SHA-256 over a canonical encoding of named request fields: sorted by
/// name, each name and value length-prefixed (u32, big-endian), so field
/// order does not matter and no two different requests collide by
/// concatenation. The same bytes in every client language.
pub fn fingerprint(fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut sorted: Vec<&(&str, &[u8])> = fields.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut hasher = Sha256::new();
    for (name, value) in sorted {
        hasher.update(length(name.len()));
        hasher.update(name.as_bytes());
        hasher.update(length(value.len()));
        hasher.update(value);
    }
    hasher.finalize().to_vec()
}

/// A field's length prefix. Fields are request fields, far below 4 GiB;
/// saturating keeps a pathological one from wrapping into another's prefix.
fn length(len: usize) -> [u8; 4] {
    u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes()
}
