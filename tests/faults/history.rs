//! The recorded history of every call the clients made (with wall-clock send
//! and receive times: idemd, Postgres and the clients share one clock on one
//! machine), and the invariant checker run over it and the final database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub type Time = DateTime<Utc>;

/// The lease every client asks for; the checker derives acquisition times from it.
pub const LEASE_TTL: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub enum Call {
    Begin,
    Complete {
        token: String,
        payload: Vec<u8>,
    },
    Abort {
        token: String,
    },
    Heartbeat {
        #[allow(dead_code)] // shown in violation reports through Debug
        token: String,
    },
}

#[derive(Clone, Debug)]
pub enum Answer {
    Acquired {
        token: String,
        attempt: u32,
        lease_expires_at: Time,
    },
    Completed {
        response: Vec<u8>,
    },
    InProgress,
    /// A Heartbeat's new lease end.
    Extended {
        lease_expires_at: Time,
    },
    Ok,
    Error {
        code: tonic::Code,
        #[allow(dead_code)] // shown in violation reports through Debug
        message: String,
    },
}

#[derive(Clone, Debug)]
pub struct Event {
    pub key: String,
    pub replica: usize,
    pub sent: Time,
    pub received: Time,
    pub call: Call,
    pub answer: Answer,
}

#[derive(Default)]
pub struct History {
    events: Mutex<Vec<Event>>,
    /// Windows during which Postgres was down: [stopped, restarting).
    outages: Mutex<Vec<(Time, Time)>>,
}

impl History {
    pub fn record(&self, event: Event) {
        self.events.lock().expect("history").push(event);
    }

    pub fn outage(&self, from: Time, to: Time) {
        self.outages.lock().expect("history").push((from, to));
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("history").clone()
    }

    pub fn outages(&self) -> Vec<(Time, Time)> {
        self.outages.lock().expect("history").clone()
    }
}

/// A row of the final database.
#[derive(Debug, Clone)]
pub struct FinalRow {
    pub state: i16,
    pub attempt: u32,
    pub response: Option<Vec<u8>>,
    pub rows: i64,
    pub outcome_unknown: bool,
    /// The key's events as the database keeps them, oldest first:
    /// (kind, attempt, outcome_unknown).
    pub events: Vec<(i16, u32, bool)>,
}

/// What a key's events say its record is, replayed in order: (state,
/// attempt, outcome_unknown), or the first event that cannot follow the
/// ones before it.
pub fn replay(events: &[(i16, u32, bool)]) -> Result<Option<(i16, u32, bool)>, String> {
    const IN_PROGRESS: i16 = 1;
    const COMPLETED: i16 = 2;
    const ABORTED: i16 = 3;
    let mut record: Option<(i16, u32, bool)> = None;
    for (index, &(kind, attempt, unknown)) in events.iter().enumerate() {
        record = match (kind, record) {
            // ACQUIRED: a new record, or the next attempt of an aborted one.
            // (A record that expired, or was invalidated, starts again at 1.)
            (1, _) if attempt == 1 => Some((IN_PROGRESS, 1, false)),
            (1, Some((ABORTED, current, _))) if attempt == current + 1 => Some((IN_PROGRESS, attempt, false)),
            // COMPLETED by the holder; RESOLVED by an operator.
            (2, Some((IN_PROGRESS, current, _))) | (6, Some((IN_PROGRESS | ABORTED, current, _)))
                if attempt == current =>
            {
                Some((COMPLETED, attempt, false))
            }
            // ABORTED, REAPED, RELEASED.
            (3..=5, Some((IN_PROGRESS, current, _))) if attempt == current => Some((ABORTED, attempt, unknown)),
            (7, Some(_)) => None,
            _ => return Err(format!("event {index} (kind {kind}, attempt {attempt}) cannot follow {record:?}")),
        };
    }
    Ok(record)
}

pub struct Invariant {
    pub name: &'static str,
    pub checked: usize,
    pub violations: Vec<String>,
}

impl Invariant {
    fn new(name: &'static str) -> Self {
        Invariant { name, checked: 0, violations: Vec::new() }
    }
}

struct Acquisition {
    attempt: u32,
    /// Postgres's now() at the acquiring statement: its start, not its commit.
    acquired_at: Time,
    /// When the client had the acquisition in hand (after the commit).
    acknowledged_at: Time,
    /// The latest lease end the store acknowledged (acquisition or heartbeat).
    lease_expires_at: Time,
    /// The earliest moment the holder itself may have ended the lease (its
    /// first Complete or Abort, whatever the answer was).
    ended_by_holder: Option<Time>,
}

pub struct Checked {
    pub invariants: Vec<Invariant>,
}

impl Checked {
    pub fn violations(&self) -> usize {
        self.invariants.iter().map(|i| i.violations.len()).sum()
    }
}

fn ttl() -> chrono::Duration {
    chrono::Duration::from_std(LEASE_TTL).expect("small")
}

pub fn check(
    events: &[Event],
    outages: &[(Time, Time)],
    final_rows: &HashMap<String, FinalRow>,
    reaped_log_lines: &[(String, u32)],
    recoveries: &[Duration],
    recovery_bound: Duration,
) -> Checked {
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for event in events {
        by_key.entry(event.key.as_str()).or_default().push(event);
    }

    let mut chain = Invariant::new("1. acquisitions form a chain, leases never overlap");
    let mut superseded = Invariant::new("2. no Complete by a superseded token succeeded");
    let mut replays = Invariant::new("3. a stored response never changes or disappears");
    let mut durable = Invariant::new("4. acknowledged writes are in the database, one row per key");
    let mut outage = Invariant::new("5. Begin answers only errors while Postgres is down");
    let mut recovery = Invariant::new("6. readiness and calls recover after every fault");
    let mut reaped_once = Invariant::new("7. no lease reaped twice");

    for (key, events) in &by_key {
        // Every distinct acquisition (a nonce retry returns the same token).
        let mut acquisitions: HashMap<&str, Acquisition> = HashMap::new();
        for event in events {
            if let Answer::Acquired { token, attempt, lease_expires_at } = &event.answer {
                let acquisition = acquisitions.entry(token.as_str()).or_insert(Acquisition {
                    attempt: *attempt,
                    acquired_at: *lease_expires_at - ttl(),
                    acknowledged_at: event.received,
                    lease_expires_at: *lease_expires_at,
                    ended_by_holder: None,
                });
                acquisition.acknowledged_at = acquisition.acknowledged_at.min(event.received);
            }
        }
        for event in events {
            if let (Call::Heartbeat { token }, Answer::Extended { lease_expires_at }) = (&event.call, &event.answer)
                && let Some(acquisition) = acquisitions.get_mut(token.as_str())
            {
                acquisition.lease_expires_at = acquisition.lease_expires_at.max(*lease_expires_at);
            }
            let token = match &event.call {
                Call::Complete { token, .. } | Call::Abort { token } => token,
                _ => continue,
            };
            // A call that definitely changed nothing did not end the lease; an
            // OK or an unknown outcome (timeout, unavailable) may have.
            let changed_nothing = matches!(
                event.answer,
                Answer::Error {
                    code: tonic::Code::FailedPrecondition | tonic::Code::NotFound | tonic::Code::InvalidArgument,
                    ..
                }
            );
            if changed_nothing {
                continue;
            }
            if let Some(acquisition) = acquisitions.get_mut(token.as_str()) {
                let sent = event.sent;
                acquisition.ended_by_holder = Some(acquisition.ended_by_holder.map_or(sent, |t| t.min(sent)));
            }
        }

        // 1. Attempts strictly increase with acquisition time; each lease
        //    ends (expires, or its holder ends it) before the next begins.
        let mut ordered: Vec<(&str, &Acquisition)> = acquisitions.iter().map(|(t, a)| (*t, a)).collect();
        ordered.sort_by_key(|(_, a)| a.attempt);
        for pair in ordered.windows(2) {
            let ((_, earlier), (_, later)) = (pair[0], pair[1]);
            chain.checked += 1;
            if earlier.attempt == later.attempt {
                chain.violations.push(format!("{key}: two acquisitions with attempt {}", later.attempt));
                continue;
            }
            if later.acquired_at <= earlier.acquired_at {
                chain.violations.push(format!(
                    "{key}: attempt {} acquired at {} not after attempt {} at {}",
                    later.attempt, later.acquired_at, earlier.attempt, earlier.acquired_at
                ));
            }
            // A takeover needs the lease expired by the statement's clock, so
            // acquired_at is exact against expiry; after an Abort the statement
            // may have started before it and waited on the row, so only an
            // acquisition acknowledged before the holder even sent its Abort
            // or Complete is a certain overlap.
            let before_expiry = later.acquired_at < earlier.lease_expires_at;
            let before_holder_ended = earlier.ended_by_holder.is_none_or(|ended| later.acknowledged_at < ended);
            if before_expiry && before_holder_ended {
                chain.violations.push(format!(
                    "{key}: attempt {} acquired at {} while attempt {} held a live lease until {}",
                    later.attempt, later.acquired_at, earlier.attempt, earlier.lease_expires_at
                ));
            }
        }

        // 2. A superseded token's Abort or Heartbeat never succeeds.
        for event in events {
            let token = match (&event.call, &event.answer) {
                (Call::Abort { token }, Answer::Ok) | (Call::Heartbeat { token }, Answer::Extended { .. }) => token,
                _ => continue,
            };
            let Some(mine) = acquisitions.get(token.as_str()) else { continue };
            superseded.checked += 1;
            if let Some(newer) =
                acquisitions.values().find(|a| a.attempt > mine.attempt && a.acknowledged_at < event.sent)
            {
                superseded.violations.push(format!(
                    "{key}: {:?} by attempt {} succeeded after attempt {} was acquired",
                    event.call, mine.attempt, newer.attempt
                ));
            }
        }

        // 2. A token whose Complete succeeded is never followed by another attempt.
        let completed: Vec<&Event> = events
            .iter()
            .copied()
            .filter(|e| matches!((&e.call, &e.answer), (Call::Complete { .. }, Answer::Ok)))
            .collect();
        let max_attempt = acquisitions.values().map(|a| a.attempt).max().unwrap_or(0);
        for event in &completed {
            let Call::Complete { token, .. } = &event.call else { continue };
            superseded.checked += 1;
            match acquisitions.get(token.as_str()) {
                Some(acquisition) if acquisition.attempt < max_attempt => superseded.violations.push(format!(
                    "{key}: Complete by attempt {} succeeded, yet attempt {max_attempt} acquired the key",
                    acquisition.attempt
                )),
                Some(_) => {}
                None => superseded.violations.push(format!("{key}: Complete succeeded for a token never acquired")),
            }
        }

        // 3. One stored response; every replay is byte-identical to it; after
        //    an acknowledged Complete nothing else is answered.
        let payloads: HashSet<&Vec<u8>> = completed
            .iter()
            .filter_map(|e| match &e.call {
                Call::Complete { payload, .. } => Some(payload),
                _ => None,
            })
            .collect();
        replays.checked += payloads.len();
        if payloads.len() > 1 {
            replays.violations.push(format!("{key}: {} different responses acknowledged", payloads.len()));
        }
        let sent_payloads: HashSet<&Vec<u8>> = events
            .iter()
            .filter_map(|e| match &e.call {
                Call::Complete { payload, .. } => Some(payload),
                _ => None,
            })
            .collect();
        let mut replayed: Option<&Vec<u8>> = None;
        for event in events {
            if let Answer::Completed { response } = &event.answer {
                replays.checked += 1;
                if let Some(stored) = payloads.iter().next()
                    && response != *stored
                {
                    replays.violations.push(format!("{key}: a replay differs from the acknowledged response"));
                }
                if !sent_payloads.contains(response) {
                    replays.violations.push(format!("{key}: a replay matches no response any caller sent"));
                }
                if replayed.is_some_and(|r| r != response) {
                    replays.violations.push(format!("{key}: two replays differ"));
                }
                replayed = Some(response);
            }
        }
        if let Some(first_ack) = completed.iter().map(|e| e.received).min() {
            for event in events {
                if matches!(event.call, Call::Begin) && event.sent > first_ack {
                    replays.checked += 1;
                    if matches!(event.answer, Answer::Acquired { .. } | Answer::InProgress) {
                        replays.violations.push(format!(
                            "{key}: Begin sent at {} after the Complete acknowledged at {first_ack} answered {:?}",
                            event.sent, event.answer
                        ));
                    }
                }
            }
        }

        // 4. What was acknowledged is in the database.
        if max_attempt > 0 {
            durable.checked += 1;
            match final_rows.get(*key) {
                None => durable.violations.push(format!("{key}: acquired (attempt {max_attempt}) but no row")),
                Some(row) => {
                    if row.rows != 1 {
                        durable.violations.push(format!("{key}: {} rows", row.rows));
                    }
                    if row.attempt < max_attempt {
                        durable.violations.push(format!(
                            "{key}: database has attempt {} but attempt {max_attempt} was acknowledged",
                            row.attempt
                        ));
                    }
                    let completed_attempt = completed.iter().find_map(|e| match &e.call {
                        Call::Complete { token, .. } => acquisitions.get(token.as_str()).map(|a| a.attempt),
                        _ => None,
                    });
                    if let Some(attempt) = completed_attempt
                        && row.attempt != attempt
                    {
                        durable.violations.push(format!(
                            "{key}: completed by attempt {attempt}, but the database holds attempt {}",
                            row.attempt
                        ));
                    }
                    if let Some(stored) = payloads.iter().next()
                        && (row.state != 2 || row.response.as_ref() != Some(*stored))
                    {
                        durable.violations.push(format!("{key}: acknowledged response missing (state {})", row.state));
                    }
                }
            }
        }

        // 5. While Postgres was down, Begin never answered anything but an error.
        for event in events {
            if !matches!(event.call, Call::Begin) {
                continue;
            }
            for (from, to) in outages {
                if event.sent >= *from && event.received <= *to {
                    outage.checked += 1;
                    if !matches!(event.answer, Answer::Error { .. }) {
                        outage.violations.push(format!(
                            "{key}: Begin on replica {} answered {:?} during the outage {from}..{to}",
                            event.replica, event.answer
                        ));
                    }
                }
            }
        }
    }

    for (i, took) in recoveries.iter().enumerate() {
        recovery.checked += 1;
        if *took > recovery_bound {
            recovery.violations.push(format!("fault {}: recovery took {took:?} (bound {recovery_bound:?})", i + 1));
        }
    }

    let mut seen = HashSet::new();
    for lease in reaped_log_lines {
        reaped_once.checked += 1;
        if !seen.insert(lease) {
            reaped_once.violations.push(format!("{} attempt {} reaped twice", lease.0, lease.1));
        }
    }

    let mut history = Invariant::new("8. each key's history replays to its final record");
    for (key, row) in final_rows {
        history.checked += 1;
        let want = Some((row.state, row.attempt, row.outcome_unknown));
        match replay(&row.events) {
            Ok(replayed) if replayed == want => {}
            Ok(replayed) => history.violations.push(format!("{key}: history says {replayed:?}, record {want:?}")),
            Err(problem) => history.violations.push(format!("{key}: {problem}")),
        }
    }

    Checked { invariants: vec![chain, superseded, replays, durable, outage, recovery, reaped_once, history] }
}

#[cfg(test)]
mod tests {
    //! The checker must catch what it claims to: synthetic histories with one
    //! planted violation each.
    use super::*;

    fn at(ms: i64) -> Time {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).expect("time")
    }

    fn event(key: &str, sent: i64, received: i64, call: Call, answer: Answer) -> Event {
        Event { key: key.into(), replica: 0, sent: at(sent), received: at(received), call, answer }
    }

    fn acquired(key: &str, ms: i64, token: &str, attempt: u32) -> Event {
        let lease_expires_at = at(ms) + ttl();
        event(key, ms, ms + 1, Call::Begin, Answer::Acquired { token: token.into(), attempt, lease_expires_at })
    }

    fn complete(key: &str, ms: i64, token: &str, payload: &[u8]) -> Event {
        event(key, ms, ms + 1, Call::Complete { token: token.into(), payload: payload.to_vec() }, Answer::Ok)
    }

    fn row(state: i16, attempt: u32, response: Option<&[u8]>) -> FinalRow {
        // The history that leads to this row: aborted attempts, then the last one.
        let mut events = vec![(1, 1, false)];
        for earlier in 1..attempt {
            events.extend([(3, earlier, false), (1, earlier + 1, false)]);
        }
        match state {
            2 => events.push((2, attempt, false)),
            3 => events.push((3, attempt, false)),
            _ => {}
        }
        FinalRow { state, attempt, response: response.map(<[u8]>::to_vec), rows: 1, outcome_unknown: false, events }
    }

    fn violations(
        events: &[Event],
        rows: &[(&str, FinalRow)],
        outages: &[(Time, Time)],
        reaped: &[(String, u32)],
    ) -> Vec<usize> {
        let rows = rows.iter().map(|(k, r)| (k.to_string(), r.clone())).collect();
        check(events, outages, &rows, reaped, &[], Duration::from_secs(30))
            .invariants
            .iter()
            .map(|i| i.violations.len())
            .collect()
    }

    #[test]
    fn a_clean_history_passes() {
        let events = [
            acquired("k", 0, "t1", 1),
            event("k", 100, 101, Call::Abort { token: "t1".into() }, Answer::Ok),
            acquired("k", 200, "t2", 2),
            complete("k", 300, "t2", b"ok"),
            event("k", 400, 401, Call::Begin, Answer::Completed { response: b"ok".to_vec() }),
        ];
        assert_eq!(violations(&events, &[("k", row(2, 2, Some(b"ok")))], &[], &[]), vec![0; 8]);
    }

    #[test]
    fn overlapping_leases_are_caught() {
        let events = [acquired("k", 0, "t1", 1), acquired("k", 500, "t2", 2)];
        assert_eq!(violations(&events, &[("k", row(1, 2, None))], &[], &[])[0], 1);
    }

    #[test]
    fn a_superseded_complete_and_a_changed_replay_are_caught() {
        let events = [
            acquired("k", 0, "t1", 1),
            acquired("k", 3000, "t2", 2),
            complete("k", 3100, "t1", b"stale"),
            event("k", 3200, 3201, Call::Begin, Answer::Completed { response: b"other".to_vec() }),
        ];
        let found = violations(&events, &[("k", row(2, 2, Some(b"stale")))], &[], &[]);
        assert_eq!(found[1], 1, "superseded complete");
        assert!(found[2] >= 1, "replay differs");
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        let events = [acquired("k", 0, "t1", 1), complete("k", 100, "t1", b"ok")];
        assert_eq!(violations(&events, &[("k", row(1, 1, None))], &[], &[])[3], 1);
        assert_eq!(violations(&events, &[], &[], &[])[3], 1);
    }

    #[test]
    fn an_answer_during_an_outage_is_caught() {
        let events = [acquired("k", 1000, "t1", 1)];
        assert_eq!(violations(&events, &[("k", row(1, 1, None))], &[(at(500), at(2000))], &[])[4], 1);
    }

    #[test]
    fn a_lease_reaped_twice_is_caught() {
        let reaped = [("k".to_string(), 1), ("k".to_string(), 1)];
        assert_eq!(violations(&[], &[], &[], &reaped)[6], 1);
    }

    #[test]
    fn a_history_replays_to_its_record_or_names_the_event_that_cannot_be() {
        let crashed_then_completed = [(1, 1, false), (4, 1, true), (1, 2, false), (2, 2, false)];
        assert_eq!(replay(&crashed_then_completed), Ok(Some((2, 2, false))));
        assert_eq!(replay(&[(1, 1, false), (3, 1, true)]), Ok(Some((3, 1, true))));
        assert!(replay(&[(1, 1, false), (2, 1, false), (3, 1, false)]).is_err(), "an abort after the completion");
        assert!(replay(&[(1, 1, false), (1, 2, false)]).is_err(), "an acquisition over a live attempt");
        assert!(replay(&[(2, 1, false)]).is_err(), "a completion without its acquisition");
    }
}
