//! How a record looks: aligned text for a person, JSON (with the proto's
//! enum names) for a program. Every string the server
//! sends goes through [`clean`] before it reaches a terminal.

use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use crate::pb;

/// Gap between a field's name and its value.
const GAP: &str = "  ";

/// A response longer than this is cut in the text view; `--json` has it whole.
const MAX_RESPONSE_SHOWN: usize = 2048;

fn datetime(value: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let value = value?;
    DateTime::from_timestamp(value.seconds, u32::try_from(value.nanos).ok()?)
}

fn timestamp_json(value: Option<&prost_types::Timestamp>) -> Value {
    datetime(value).map_or(Value::Null, |t| Value::String(t.to_rfc3339_opts(SecondsFormat::Micros, true)))
}

fn timestamp_text(value: Option<&prost_types::Timestamp>) -> String {
    datetime(value).map_or_else(|| "-".to_string(), |t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn state_name(state: i32) -> &'static str {
    pb::State::try_from(state).map_or("STATE_UNSPECIFIED", |s| s.as_str_name())
}

fn aborted_by_name(aborted_by: i32) -> &'static str {
    pb::AbortedBy::try_from(aborted_by).map_or("ABORTED_BY_UNSPECIFIED", |a| a.as_str_name())
}

/// `STATE_IN_PROGRESS` → `in_progress`: the words `--state` accepts.
fn word(name: &str, prefix: &str) -> String {
    let word = name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase();
    if word == "unspecified" { "-".to_string() } else { word }
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

fn or_dash(value: &str) -> String {
    if value.is_empty() { "-".to_string() } else { clean(value) }
}

/// Control characters escaped (`\n`, `\u{1b}`): a key or a reason cannot
/// move the cursor or recolour an operator's terminal.
pub fn clean(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The record as the JSON object `idemd lookup --json` prints.
pub fn record_json(record: &pb::Record) -> Value {
    let response_base64 = Value::String(base64::engine::general_purpose::STANDARD.encode(&record.response));
    let response_text =
        std::str::from_utf8(&record.response).map_or(Value::Null, |text| Value::String(text.to_string()));
    json!({
        "namespace": record.namespace,
        "key": record.key,
        "state": state_name(record.state),
        "attempt": record.attempt,
        "fingerprint_hex": hex::encode(&record.fingerprint),
        "downstream_key": record.downstream_key,
        "created_at": timestamp_json(record.created_at.as_ref()),
        "updated_at": timestamp_json(record.updated_at.as_ref()),
        "lease_expires_at": timestamp_json(record.lease_expires_at.as_ref()),
        "completed_at": timestamp_json(record.completed_at.as_ref()),
        "expires_at": timestamp_json(record.expires_at.as_ref()),
        "response_base64": response_base64,
        "response_text": response_text,
        "response_code": record.response_code,
        "content_type": record.content_type,
        "abort_reason": record.abort_reason,
        "aborted_by": aborted_by_name(record.aborted_by),
        "outcome_unknown": record.outcome_unknown,
    })
}

fn is_completed(record: &pb::Record) -> bool {
    record.state == pb::State::Completed as i32
}

fn response_text(record: &pb::Record) -> String {
    if !is_completed(record) {
        return "-".to_string();
    }
    let body = &record.response;
    let shown = match std::str::from_utf8(body) {
        Ok(text) => clean(text),
        Err(_) => format!("base64:{}", base64::engine::general_purpose::STANDARD.encode(body)),
    };
    match shown.char_indices().nth(MAX_RESPONSE_SHOWN) {
        Some((cut, _)) => format!("{}… ({} bytes; --json prints it whole)", &shown[..cut], body.len()),
        None if shown.is_empty() => "(empty)".to_string(),
        None => shown,
    }
}

fn response_code_text(record: &pb::Record) -> String {
    if is_completed(record) { record.response_code.to_string() } else { "-".to_string() }
}

/// One record as `name  value` lines, every field of the record.
pub fn record_text(record: &pb::Record) -> String {
    let fields = [
        ("namespace", clean(&record.namespace)),
        ("key", clean(&record.key)),
        ("state", word(state_name(record.state), "STATE_")),
        ("attempt", record.attempt.to_string()),
        ("outcome_unknown", yes_no(record.outcome_unknown).to_string()),
        ("aborted_by", word(aborted_by_name(record.aborted_by), "ABORTED_BY_")),
        ("abort_reason", or_dash(&record.abort_reason)),
        ("downstream_key", or_dash(&record.downstream_key)),
        ("fingerprint", or_dash(&hex::encode(&record.fingerprint))),
        ("created_at", timestamp_text(record.created_at.as_ref())),
        ("updated_at", timestamp_text(record.updated_at.as_ref())),
        ("lease_expires_at", timestamp_text(record.lease_expires_at.as_ref())),
        ("completed_at", timestamp_text(record.completed_at.as_ref())),
        ("expires_at", timestamp_text(record.expires_at.as_ref())),
        ("response_code", response_code_text(record)),
        ("content_type", or_dash(&record.content_type)),
        ("response", response_text(record)),
    ];
    let width = fields.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    fields.iter().map(|(name, value)| format!("{name:<width$}{GAP}{value}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 123_456_000 })
    }

    fn aborted() -> pb::Record {
        pb::Record {
            namespace: "payments".into(),
            key: "order-42".into(),
            state: pb::State::Aborted as i32,
            attempt: 2,
            fingerprint: vec![0xab, 0xcd],
            downstream_key: "idk_0123456789abcdef0123456789abcdef".into(),
            created_at: at(1_700_000_000),
            updated_at: at(1_700_000_060),
            lease_expires_at: at(1_700_000_060),
            expires_at: at(1_700_086_400),
            abort_reason: "lease expired".into(),
            aborted_by: pb::AbortedBy::Reaper as i32,
            outcome_unknown: true,
            ..Default::default()
        }
    }

    fn completed(response: &[u8]) -> pb::Record {
        pb::Record {
            state: pb::State::Completed as i32,
            response: response.to_vec(),
            response_code: 201,
            content_type: "application/json".into(),
            completed_at: at(1_700_000_030),
            abort_reason: String::new(),
            aborted_by: 0,
            outcome_unknown: false,
            ..aborted()
        }
    }

    #[test]
    fn record_json_keeps_the_lookup_shape_and_adds_outcome_unknown() {
        let json = record_json(&completed(br#"{"ok":true}"#));
        let keys: Vec<&str> = json.as_object().expect("object").keys().map(String::as_str).collect();
        let mut expected = vec![
            "namespace",
            "key",
            "state",
            "attempt",
            "fingerprint_hex",
            "downstream_key",
            "created_at",
            "updated_at",
            "lease_expires_at",
            "completed_at",
            "expires_at",
            "response_base64",
            "response_text",
            "response_code",
            "content_type",
            "abort_reason",
            "aborted_by",
            "outcome_unknown",
        ];
        expected.sort_unstable();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(json["state"], "STATE_COMPLETED");
        assert_eq!(json["aborted_by"], "ABORTED_BY_UNSPECIFIED");
        assert_eq!(json["fingerprint_hex"], "abcd");
        assert_eq!(json["response_text"], r#"{"ok":true}"#);
        assert_eq!(json["response_base64"], "eyJvayI6dHJ1ZX0=");
        assert_eq!(json["completed_at"], "2023-11-14T22:13:50.123456Z");
        assert_eq!(json["outcome_unknown"], false);
    }

    #[test]
    fn record_text_is_aligned_and_readable() {
        let text = record_text(&aborted());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 17);
        let value_column = lines[0].find("payments").expect("namespace value");
        for line in &lines {
            assert!(line[value_column..].chars().next().is_some_and(|c| c != ' '), "misaligned: {line:?}");
        }
        assert!(text.contains("state             aborted\n"), "{text}");
        assert!(text.contains("outcome_unknown   yes\n"), "{text}");
        assert!(text.contains("aborted_by        reaper\n"), "{text}");
        assert!(text.contains("updated_at        2023-11-14T22:14:20.123Z\n"), "{text}");
        assert!(text.contains("completed_at      -\n"), "{text}");
        assert!(text.contains("response          -\n"), "{text}");
    }

    #[test]
    fn record_text_shows_text_binary_and_long_responses() {
        assert!(record_text(&completed(b"charged")).contains("response          charged\n"));
        assert!(record_text(&completed(&[0xff])).contains("response          base64:/w==\n"));
        assert!(record_text(&completed(b"")).contains("response          (empty)\n"));
        let long = record_text(&completed(&[b'x'; 5000]));
        assert!(long.contains("… (5000 bytes; --json prints it whole)"), "{long}");
        assert!(!long.contains(&"x".repeat(MAX_RESPONSE_SHOWN + 1)));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(clean("ok\u{1b}[31mred\nnext\u{85}"), "ok\\u{1b}[31mred\\nnext\\u{85}");
        assert_eq!(clean("café ✓"), "café ✓");
        let mut record = aborted();
        record.abort_reason = "timeout\u{1b}[2J".into();
        assert!(!record_text(&record).contains('\u{1b}'));
    }
}
