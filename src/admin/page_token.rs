//! ListRecords' page tokens: where the next page starts, bound to the
//! filters of the listing that issued it.
//!
//! A token is base64url of: a version byte, the cursor's `updated_at` (µs
//! since the epoch), its key, a digest of the listing's filters, and a
//! checksum of all that. It is opaque to callers and carries no authority
//! (every page checks the grant), so it needs no server secret: replicas
//! share nothing and any of them continues any listing. The checksum makes
//! a token that was altered, truncated or made up fail as INVALID_ARGUMENT
//! rather than list from a position nobody was given; the filter digest does
//! the same for a token reused with other filters.

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::domain::Timestamp;
use crate::error::{Error, Result};
use crate::operator::{Cursor, ListQuery};

const VERSION: u8 = 1;
const DIGEST_BYTES: usize = 8;
const ENGINE: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// What the filters of a listing hash to.
fn filters_digest(query: &ListQuery) -> [u8; DIGEST_BYTES] {
    let mut hash = Sha256::new();
    hash.update(b"idemd list filters v1\0");
    hash.update(query.namespace.as_str().as_bytes());
    hash.update([0, query.state.map_or(0, |state| state as u8), u8::from(query.outcome_unknown_only)]);
    for bound in [query.updated_before, query.updated_after] {
        match bound {
            Some(time) => hash.update([&[1u8][..], &time.timestamp_micros().to_be_bytes()].concat()),
            None => hash.update([0u8]),
        }
    }
    hash.update(query.key_prefix.as_bytes());
    truncated(hash)
}

fn checksum(body: &[u8]) -> [u8; DIGEST_BYTES] {
    let mut hash = Sha256::new();
    hash.update(b"idemd page token v1\0");
    hash.update(body);
    truncated(hash)
}

fn truncated(hash: Sha256) -> [u8; DIGEST_BYTES] {
    let mut out = [0u8; DIGEST_BYTES];
    out.copy_from_slice(&hash.finalize()[..DIGEST_BYTES]);
    out
}

/// The token of the page after `cursor` in `query`'s listing.
pub fn issue(query: &ListQuery, cursor: &Cursor) -> String {
    let mut body = vec![VERSION];
    body.extend_from_slice(&cursor.updated_at.timestamp_micros().to_be_bytes());
    body.extend_from_slice(&filters_digest(query));
    body.extend_from_slice(cursor.key.as_bytes());
    let check = checksum(&body);
    body.extend_from_slice(&check);
    ENGINE.encode(body)
}

/// The cursor of a token issued for these filters; INVALID_ARGUMENT for
/// anything else.
pub fn redeem(query: &ListQuery, token: &str) -> Result<Cursor> {
    let invalid = || Error::invalid("page_token", "page_token was not issued by idemd for this listing");
    let bytes = ENGINE.decode(token).map_err(|_| invalid())?;
    let fixed = 1 + 8 + DIGEST_BYTES;
    if bytes.len() < fixed + DIGEST_BYTES {
        return Err(invalid());
    }
    let (body, check) = bytes.split_at(bytes.len() - DIGEST_BYTES);
    if checksum(body) != check || body[0] != VERSION || body[9..fixed] != filters_digest(query) {
        return Err(invalid());
    }
    let micros = i64::from_be_bytes(body[1..9].try_into().map_err(|_| invalid())?);
    let updated_at = Timestamp::from_timestamp_micros(micros).ok_or_else(invalid)?;
    let key = String::from_utf8(body[fixed..].to_vec()).map_err(|_| invalid())?;
    Ok(Cursor { updated_at, key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Namespace, State};

    fn query(namespace: &str) -> ListQuery {
        ListQuery {
            namespace: Namespace::parse(namespace.into()).unwrap_or_else(|e| panic!("{e}")),
            state: Some(State::Aborted),
            outcome_unknown_only: true,
            updated_before: None,
            updated_after: Timestamp::from_timestamp_micros(1_700_000_000_000_000),
            key_prefix: "ord".into(),
            page_size: 100,
            after: None,
        }
    }

    fn cursor() -> Cursor {
        Cursor {
            updated_at: Timestamp::from_timestamp_micros(1_764_000_000_123_456).unwrap_or_default(),
            key: "order-ü-42".into(),
        }
    }

    #[test]
    fn a_token_gives_back_its_cursor_for_the_same_filters_only() {
        let token = issue(&query("payments"), &cursor());
        assert_eq!(redeem(&query("payments"), &token).ok(), Some(cursor()));
        assert!(redeem(&query("refunds"), &token).is_err());
        assert!(redeem(&ListQuery { key_prefix: "x".into(), ..query("payments") }, &token).is_err());
        assert!(redeem(&ListQuery { outcome_unknown_only: false, ..query("payments") }, &token).is_err());
    }

    #[test]
    fn forged_truncated_and_altered_tokens_are_invalid_argument() {
        let token = issue(&query("payments"), &cursor());
        let q = query("payments");
        for bad in [
            String::new(),
            "not base64!".to_string(),
            token[..token.len() - 3].to_string(),
            token[3..].to_string(),
            ENGINE.encode(b"\x01aaaaaaaabbbbbbbbkeycccccccc"),
        ] {
            let error = redeem(&q, &bad).err().map(|e| e.reason());
            assert_eq!(error, Some("INVALID_FIELD"), "{bad:?}");
        }
        let mut altered = ENGINE.decode(&token).unwrap_or_default();
        altered[12] ^= 1;
        assert!(redeem(&q, &ENGINE.encode(altered)).is_err());
    }
}
