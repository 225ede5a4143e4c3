//! `idemd lookup`: reads one record from a running server and prints it as
//! JSON (the response as base64, plus as text when it is UTF-8).

use base64::Engine;
use serde_json::{Value, json};

use crate::pb;

fn timestamp(value: Option<prost_types::Timestamp>) -> Value {
    value
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)))
        .unwrap_or(Value::Null)
}

/// The record as a JSON object.
pub fn record_json(record: pb::Record) -> Value {
    let state = pb::State::try_from(record.state).map(|s| s.as_str_name()).unwrap_or("STATE_UNSPECIFIED");
    let aborted_by =
        pb::AbortedBy::try_from(record.aborted_by).map(|a| a.as_str_name()).unwrap_or("ABORTED_BY_UNSPECIFIED");
    let b64 = base64::engine::general_purpose::STANDARD;
    json!({
        "namespace": record.namespace,
        "key": record.key,
        "state": state,
        "attempt": record.attempt,
        "fingerprint_hex": hex::encode(&record.fingerprint),
        "downstream_key": record.downstream_key,
        "created_at": timestamp(record.created_at),
        "updated_at": timestamp(record.updated_at),
        "lease_expires_at": timestamp(record.lease_expires_at),
        "completed_at": timestamp(record.completed_at),
        "expires_at": timestamp(record.expires_at),
        "response_base64": b64.encode(&record.response),
        "response_text": String::from_utf8(record.response).ok(),
        "response_code": record.response_code,
        "content_type": record.content_type,
        "abort_reason": record.abort_reason,
        "aborted_by": aborted_by,
    })
}

/// Looks up `namespace/key` on the server at `addr`.
pub async fn lookup(addr: String, namespace: String, key: String) -> anyhow::Result<Value> {
    let mut client = pb::idempotency_client::IdempotencyClient::connect(addr.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))?;
    let response = client
        .lookup(pb::LookupRequest { namespace, key })
        .await
        .map_err(|status| anyhow::anyhow!("{:?}: {}", status.code(), status.message()))?;
    let record = response.into_inner().record.ok_or_else(|| anyhow::anyhow!("the server answered without a record"))?;
    Ok(record_json(record))
}
