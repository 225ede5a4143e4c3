//! Decoding idemd's rows, once for both databases. They store the same
//! columns with different types (Postgres `timestamptz`, `smallint` and
//! `integer`; SQLite microseconds since the epoch and `INTEGER`):
//! [`StoredRow`] reads a column of either, and the records, token checks and
//! reaped leases are built from it here.

use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use crate::domain::{
    AbortedBy, CurrentRecord, Event, EventKind, Lease, PreviousAttempt, ReapedLease, Record, State, StoredResponse,
    Timestamp,
};
use crate::error::{Error, Result};
use crate::store::TokenCheck;

/// One column of a row, whatever the database's type for it.
pub(crate) trait StoredRow {
    fn text(&self, column: &str) -> Result<String>;
    fn opt_text(&self, column: &str) -> Result<Option<String>>;
    fn bytes(&self, column: &str) -> Result<Vec<u8>>;
    fn opt_bytes(&self, column: &str) -> Result<Option<Vec<u8>>>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>>;
    fn opt_time(&self, column: &str) -> Result<Option<Timestamp>>;
    fn flag(&self, column: &str) -> Result<bool>;

    fn int(&self, column: &str) -> Result<i64> {
        self.opt_int(column)?.ok_or_else(|| Error::Internal(format!("{column} is NULL")))
    }

    fn time(&self, column: &str) -> Result<Timestamp> {
        self.opt_time(column)?.ok_or_else(|| Error::Internal(format!("{column} is NULL")))
    }
}

/// Text and bytes decode alike in both databases.
macro_rules! same_in_both {
    () => {
        fn text(&self, column: &str) -> Result<String> {
            Ok(self.try_get(column)?)
        }
        fn opt_text(&self, column: &str) -> Result<Option<String>> {
            Ok(self.try_get(column)?)
        }
        fn bytes(&self, column: &str) -> Result<Vec<u8>> {
            Ok(self.try_get(column)?)
        }
        fn opt_bytes(&self, column: &str) -> Result<Option<Vec<u8>>> {
            Ok(self.try_get(column)?)
        }
    };
}

impl StoredRow for PgRow {
    same_in_both!();
    /// `smallint` (state, aborted_by) or `integer` (attempt, response_code).
    fn opt_int(&self, column: &str) -> Result<Option<i64>> {
        use sqlx::{Column, TypeInfo};
        let small = self
            .try_column(column)
            .map(|c| c.type_info().name() == "INT2")
            .map_err(|_| Error::Internal(format!("no column {column}")))?;
        Ok(if small {
            self.try_get::<Option<i16>, _>(column)?.map(i64::from)
        } else {
            self.try_get::<Option<i32>, _>(column)?.map(i64::from)
        })
    }
    fn opt_time(&self, column: &str) -> Result<Option<Timestamp>> {
        Ok(self.try_get(column)?)
    }
    fn flag(&self, column: &str) -> Result<bool> {
        Ok(self.try_get(column)?)
    }
}

impl StoredRow for SqliteRow {
    same_in_both!();
    fn opt_int(&self, column: &str) -> Result<Option<i64>> {
        Ok(self.try_get(column)?)
    }
    /// Microseconds since the Unix epoch.
    fn opt_time(&self, column: &str) -> Result<Option<Timestamp>> {
        self.try_get::<Option<i64>, _>(column)?
            .map(|us| {
                Timestamp::from_timestamp_micros(us)
                    .ok_or_else(|| Error::Internal(format!("{column} {us} is not a time")))
            })
            .transpose()
    }
    /// 0 or 1.
    fn flag(&self, column: &str) -> Result<bool> {
        Ok(self.try_get::<i64, _>(column)? != 0)
    }
}

pub(crate) fn attempt_of(row: &impl StoredRow) -> Result<u32> {
    let attempt = row.int("attempt")?;
    u32::try_from(attempt).map_err(|_| Error::Internal(format!("attempt {attempt} out of range")))
}

fn state_of(row: &impl StoredRow) -> Result<State> {
    State::from_code(row.int("state")?)
}

fn response_code_of(row: &impl StoredRow) -> Result<Option<i32>> {
    row.opt_int("response_code")?
        .map(|code| i32::try_from(code).map_err(|_| Error::Internal(format!("response_code {code} out of range"))))
        .transpose()
}

/// How the attempt before the row's current one ended: `None` on attempt 1.
/// Reads `attempt`, `aborted_by`, `abort_reason`, `outcome_unknown` and
/// `ended_at`, which an acquisition leaves describing attempt − 1.
pub(crate) fn previous_attempt(row: &impl StoredRow) -> Result<Option<PreviousAttempt>> {
    let attempt = attempt_of(row)?;
    if attempt <= 1 {
        return Ok(None);
    }
    Ok(Some(PreviousAttempt {
        attempt: attempt - 1,
        aborted_by: AbortedBy::from_code(row.opt_int("aborted_by")?),
        abort_reason: row.opt_text("abort_reason")?.unwrap_or_default(),
        outcome_unknown: row.flag("outcome_unknown")?,
        ended_at: row.opt_time("ended_at")?,
    }))
}

/// The lease an acquisition statement returned, with the token it drew.
pub(crate) fn acquired_lease(row: &impl StoredRow, lease_token: String) -> Result<Lease> {
    Ok(Lease {
        lease_token,
        attempt: attempt_of(row)?,
        lease_expires_at: row.time("lease_expires_at")?,
        downstream_key: row.text("downstream_key")?,
        previous: previous_attempt(row)?,
    })
}

/// One event of a key's history.
pub(crate) fn event(row: &impl StoredRow) -> Result<Event> {
    Ok(Event {
        at: row.time("at")?,
        kind: EventKind::from_code(row.int("kind")?)?,
        attempt: attempt_of(row)?,
        principal: row.text("principal")?,
        reason: row.text("reason")?,
        response_code: response_code_of(row)?,
        outcome_unknown: row.flag("outcome_unknown")?,
    })
}

/// Where a record stands after an Admin action changed nothing.
pub(crate) fn standing(row: &impl StoredRow) -> Result<crate::operator::Standing> {
    Ok(crate::operator::Standing {
        state: state_of(row)?,
        attempt: attempt_of(row)?,
        lease_live: row.flag("lease_live")?,
    })
}

/// What a Complete, Abort or Heartbeat that changed nothing reads to say why.
pub(crate) fn token_check(row: &impl StoredRow) -> Result<TokenCheck> {
    Ok(TokenCheck {
        state: state_of(row)?,
        lease_token: row.text("lease_token")?,
        aborted_by: AbortedBy::from_code(row.opt_int("aborted_by")?),
        completed_at: row.opt_time("completed_at")?,
        expires_at: row.time("expires_at")?,
    })
}

/// What Begin reads of a record it did not acquire.
pub(crate) fn current_record(row: &impl StoredRow) -> Result<CurrentRecord> {
    let state = state_of(row)?;
    let attempt = attempt_of(row)?;
    let stored = match (state, row.opt_bytes("response")?) {
        (State::Completed, Some(response)) => Some(StoredResponse {
            response,
            response_code: response_code_of(row)?.unwrap_or(0),
            content_type: row.opt_text("content_type")?.unwrap_or_default(),
            completed_at: row
                .opt_time("completed_at")?
                .ok_or_else(|| Error::Internal("completed record without completed_at".into()))?,
            expires_at: row.time("expires_at")?,
            attempt,
        }),
        _ => None,
    };
    Ok(CurrentRecord {
        state,
        attempt,
        fingerprint: row.bytes("fingerprint")?,
        downstream_key: row.text("downstream_key")?,
        lease_token: row.text("lease_token")?,
        attempt_nonce: row.opt_text("attempt_nonce")?,
        lease_expires_at: row.time("lease_expires_at")?,
        stored,
        previous: previous_attempt(row)?,
        now: row.time("now")?,
    })
}

/// A whole record, for Lookup and the Admin service. The abort columns
/// describe the latest attempt that ended without completing, which is the
/// record's own attempt only while it is ABORTED.
pub(crate) fn record(row: &impl StoredRow) -> Result<Record> {
    let aborted = state_of(row)? == State::Aborted;
    Ok(Record {
        namespace: row.text("namespace")?,
        key: row.text("key")?,
        state: state_of(row)?,
        attempt: attempt_of(row)?,
        fingerprint: row.bytes("fingerprint")?,
        downstream_key: row.text("downstream_key")?,
        created_at: row.time("created_at")?,
        updated_at: row.time("updated_at")?,
        lease_expires_at: row.time("lease_expires_at")?,
        completed_at: row.opt_time("completed_at")?,
        expires_at: row.time("expires_at")?,
        response: row.opt_bytes("response")?,
        response_code: response_code_of(row)?,
        content_type: row.opt_text("content_type")?,
        abort_reason: if aborted { row.opt_text("abort_reason")? } else { None },
        aborted_by: if aborted { AbortedBy::from_code(row.opt_int("aborted_by")?) } else { None },
        outcome_unknown: aborted && row.flag("outcome_unknown")?,
    })
}

/// A lease the reaper aborted.
pub(crate) fn reaped_lease(row: &impl StoredRow) -> Result<ReapedLease> {
    Ok(ReapedLease {
        namespace: row.text("namespace")?,
        key: row.text("key")?,
        attempt: attempt_of(row)?,
        overdue: elapsed(row.time("lease_expires_at")?, row.time("updated_at")?),
    })
}

/// How long past due a purged record was.
pub(crate) fn purged_overdue(row: &impl StoredRow) -> Result<std::time::Duration> {
    Ok(elapsed(row.time("due_at")?, row.time("purged_at")?))
}

/// From `since` to `until`; zero if the clock says `until` came first.
fn elapsed(since: crate::domain::Timestamp, until: crate::domain::Timestamp) -> std::time::Duration {
    (until - since).to_std().unwrap_or_default()
}
