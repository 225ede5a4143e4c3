//! How records and events look: aligned text and tables for a person, JSON
//! (with the proto's enum names) for a program. Every string the server
//! sends goes through [`clean`] before it reaches a terminal.

use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use unicode_width::UnicodeWidthStr;

use crate::pb;

/// Gap between table columns.
const GAP: &str = "  ";

/// A response longer than this is cut in the text view; `--json` has it whole.
const MAX_RESPONSE_SHOWN: usize = 2048;

/// Whether the record's JSON carries its response. Lists leave it out on the
/// wire; their JSON says so with nulls rather than with an empty response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    Included,
    NotSent,
}

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

fn event_kind_name(kind: i32) -> &'static str {
    pb::EventKind::try_from(kind).map_or("EVENT_KIND_UNSPECIFIED", |k| k.as_str_name())
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
pub fn record_json(record: &pb::Record, response: Response) -> Value {
    let (response_base64, response_text) = match response {
        Response::Included => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(&record.response)),
            std::str::from_utf8(&record.response).map_or(Value::Null, |text| Value::String(text.to_string())),
        ),
        Response::NotSent => (Value::Null, Value::Null),
    };
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

/// One history event as a JSON object.
pub fn event_json(event: &pb::Event) -> Value {
    json!({
        "at": timestamp_json(event.at.as_ref()),
        "kind": event_kind_name(event.kind),
        "attempt": event.attempt,
        "principal": event.principal,
        "reason": event.reason,
        "response_code": event.response_code,
        "outcome_unknown": event.outcome_unknown,
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

/// A table column: its header and the width every row pads to.
struct Column {
    header: &'static str,
    width: usize,
    /// Cut longer values (`…`); otherwise they push the rest of the row.
    truncate: bool,
}

/// `value` padded (or cut) to `width` terminal cells.
fn fit(value: &str, width: usize, truncate: bool) -> String {
    let mut value = value.to_string();
    if truncate && value.width() > width {
        while value.width() + 1 > width {
            value.pop();
        }
        value.push('…');
    }
    let pad = width.saturating_sub(value.width());
    value + &" ".repeat(pad)
}

/// One line of cells; the last cell is not padded (no trailing blanks).
fn line(columns: &[Column], cells: &[String]) -> String {
    let mut out = String::new();
    for (i, (column, cell)) in columns.iter().zip(cells).enumerate() {
        if i + 1 == columns.len() {
            out.push_str(cell);
        } else {
            out.push_str(&fit(cell, column.width, column.truncate));
            out.push_str(GAP);
        }
    }
    out.push('\n');
    out
}

/// The list's columns have fixed widths: pages are printed as they arrive,
/// before the widest value of the listing is known. Keys and downstream keys
/// are never cut: an operator copies them into the next command.
const LIST_COLUMNS: [Column; 9] = [
    Column { header: "KEY", width: 32, truncate: false },
    Column { header: "STATE", width: 11, truncate: false },
    Column { header: "ATTEMPT", width: 7, truncate: false },
    Column { header: "OUTCOME_UNKNOWN", width: 15, truncate: false },
    Column { header: "ABORTED_BY", width: 10, truncate: false },
    Column { header: "ABORT_REASON", width: 28, truncate: true },
    Column { header: "UPDATED_AT", width: 24, truncate: false },
    Column { header: "DOWNSTREAM_KEY", width: 36, truncate: false },
    Column { header: "CODE", width: 4, truncate: false },
];

/// The list table's header line, printed once above the first page.
pub fn list_header() -> String {
    line(&LIST_COLUMNS, &LIST_COLUMNS.map(|c| c.header.to_string()))
}

/// One record as a row of the list table.
pub fn list_row(record: &pb::Record) -> String {
    let cells = [
        clean(&record.key),
        word(state_name(record.state), "STATE_"),
        record.attempt.to_string(),
        yes_no(record.outcome_unknown).to_string(),
        word(aborted_by_name(record.aborted_by), "ABORTED_BY_"),
        or_dash(&record.abort_reason),
        timestamp_text(record.updated_at.as_ref()),
        or_dash(&record.downstream_key),
        response_code_text(record),
    ];
    line(&LIST_COLUMNS, &cells)
}

/// A key's history as a table sized to its content (it arrives whole). The
/// reason comes last: a long one then widens nothing else.
pub fn history_table(events: &[pb::Event]) -> String {
    let headers = ["AT", "KIND", "ATTEMPT", "PRINCIPAL", "CODE", "OUTCOME_UNKNOWN", "REASON"];
    let rows: Vec<[String; 7]> = events
        .iter()
        .map(|event| {
            let kind = pb::EventKind::try_from(event.kind).ok();
            let has_code = matches!(kind, Some(pb::EventKind::Completed | pb::EventKind::Resolved));
            let has_outcome =
                matches!(kind, Some(pb::EventKind::Aborted | pb::EventKind::Reaped | pb::EventKind::Released));
            [
                timestamp_text(event.at.as_ref()),
                word(event_kind_name(event.kind), "EVENT_KIND_"),
                event.attempt.to_string(),
                or_dash(&event.principal),
                if has_code { event.response_code.to_string() } else { "-".to_string() },
                if has_outcome { yes_no(event.outcome_unknown).to_string() } else { "-".to_string() },
                or_dash(&event.reason),
            ]
        })
        .collect();
    let columns: Vec<Column> = headers
        .iter()
        .enumerate()
        .map(|(i, &header)| Column {
            header,
            width: rows.iter().map(|row| row[i].width()).chain([header.len()]).max().unwrap_or(0),
            truncate: false,
        })
        .collect();
    let mut out = line(&columns, &columns.iter().map(|c| c.header.to_string()).collect::<Vec<_>>());
    for row in &rows {
        out.push_str(&line(&columns, row));
    }
    out
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
        let json = record_json(&completed(br#"{"ok":true}"#), Response::Included);
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
    fn record_json_of_a_list_says_the_response_was_not_sent() {
        let json = record_json(&aborted(), Response::NotSent);
        assert_eq!(json["response_base64"], Value::Null);
        assert_eq!(json["response_text"], Value::Null);
        assert_eq!(json["completed_at"], Value::Null);
        assert_eq!(json["aborted_by"], "ABORTED_BY_REAPER");
        assert_eq!(json["outcome_unknown"], true);
        let binary = record_json(&completed(&[0xff, 0x00]), Response::Included);
        assert_eq!(binary["response_text"], Value::Null);
        assert_eq!(binary["response_base64"], "/wA=");
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
        assert!(!list_row(&record).contains('\u{1b}'));
        assert!(!record_text(&record).contains('\u{1b}'));
    }

    #[test]
    fn list_rows_line_up_under_the_header() {
        let header = list_header();
        let mut long_reason = aborted();
        long_reason.abort_reason = "provider timed out after the charge request left".into();
        long_reason.key = "clé-✓".into();
        let rows = [list_row(&aborted()), list_row(&long_reason), list_row(&completed(b"x"))];
        let starts = |line: &str| -> Vec<usize> {
            // Each column starts after a two-blank gap (cells hold no double blanks).
            let mut starts = vec![0];
            let chars: Vec<char> = line.chars().collect();
            for i in 2..chars.len() {
                if chars[i - 2] == ' ' && chars[i - 1] == ' ' && chars[i] != ' ' {
                    starts.push(UnicodeWidthStr::width(chars[..i].iter().collect::<String>().as_str()));
                }
            }
            starts
        };
        for row in &rows {
            assert_eq!(starts(row), starts(&header), "\n{header}{row}");
        }
        assert!(rows[1].contains("provider timed out after th…"), "{}", rows[1]);
        assert!(rows[0].ends_with("-\n") && rows[2].ends_with("201\n"));
        assert!(!header.ends_with(" \n"));
    }

    #[test]
    fn a_key_longer_than_its_column_is_printed_whole() {
        let mut record = aborted();
        record.key = "k".repeat(40);
        assert!(list_row(&record).starts_with(&format!("{}  aborted", "k".repeat(40))));
    }

    #[test]
    fn history_is_a_table_sized_to_its_content() {
        let events = [
            pb::Event { at: at(1), kind: pb::EventKind::Acquired as i32, attempt: 1, ..Default::default() },
            pb::Event {
                at: at(2),
                kind: pb::EventKind::Reaped as i32,
                attempt: 1,
                principal: "reaper".into(),
                reason: "lease expired".into(),
                outcome_unknown: true,
                ..Default::default()
            },
            pb::Event {
                at: at(3),
                kind: pb::EventKind::Resolved as i32,
                attempt: 1,
                principal: "oncall".into(),
                reason: "charge ch_123 found at the provider".into(),
                response_code: 200,
                ..Default::default()
            },
        ];
        let table = history_table(&events);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "AT                        KIND      ATTEMPT  PRINCIPAL  CODE  OUTCOME_UNKNOWN  REASON");
        assert_eq!(lines[1], "1970-01-01T00:00:01.123Z  acquired  1        -          -     -                -");
        assert_eq!(
            lines[2],
            "1970-01-01T00:00:02.123Z  reaped    1        reaper     -     yes              lease expired"
        );
        assert_eq!(
            lines[3],
            "1970-01-01T00:00:03.123Z  resolved  1        oncall     200   -                charge ch_123 found at the provider"
        );
        let json = event_json(&events[1]);
        assert_eq!(json["kind"], "EVENT_KIND_REAPED");
        assert_eq!(json["at"], "1970-01-01T00:00:02.123456Z");
        assert_eq!(json["principal"], "reaper");
        assert_eq!(json["outcome_unknown"], true);
    }
}
