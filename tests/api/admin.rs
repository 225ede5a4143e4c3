//! The Admin service and the history it reads: every transition writes its
//! event, operators' actions follow their documented rules, and races
//! between an operator and a caller have exactly one winner whose history
//! agrees with the record.

use std::collections::HashSet;
use std::time::Duration;

use idemd::pb;
use idemd::pb::EventKind::*;
use idemd::pb::begin_response::Outcome;
use tonic::{Code, Request, Status};

use crate::helpers::*;

fn resolve_req(key: &str, attempt: u32) -> pb::ResolveRequest {
    pb::ResolveRequest {
        namespace: NS.into(),
        key: key.into(),
        attempt,
        response: b"{\"charge\":\"ch_1\"}".to_vec(),
        response_code: 201,
        content_type: "application/json".into(),
        reason: "provider says ch_1 exists for this downstream_key".into(),
    }
}

fn release_req(key: &str, attempt: u32) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        namespace: NS.into(),
        key: key.into(),
        attempt,
        reason: "holder pod is gone".into(),
        outcome_unknown: true,
    }
}

fn invalidate_req(key: &str) -> pb::InvalidateRequest {
    pb::InvalidateRequest { namespace: NS.into(), key: key.into(), reason: "customer asked for a new order".into() }
}

fn kinds(events: &[pb::Event]) -> Vec<(i32, u32)> {
    events.iter().map(|e| (e.kind, e.attempt)).collect()
}

/// Ends the record's current attempt without completing it.
async fn aborted(app: &TestApp, key: &str, outcome_unknown: bool) -> pb::Acquired {
    let acquired = app.acquire(begin_req(key)).await;
    let request = pb::AbortRequest {
        namespace: NS.into(),
        key: key.into(),
        lease_token: acquired.lease_token.clone(),
        reason: "provider timeout".into(),
        outcome_unknown,
    };
    app.client.clone().abort(request).await.expect("abort");
    acquired
}

async fn every_transition_writes_one_event_and_nothing_else_does(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut request = begin_req("k");
    request.attempt_nonce = "n1".into();
    let first = app.acquire(request.clone()).await;
    app.acquire(request).await; // the holder's retry: no event
    let mut other = begin_req("k");
    other.attempt_nonce = "n2".into();
    assert!(matches!(app.begin(other).await.expect("begin"), Outcome::InProgress(_))); // no event
    app.heartbeat("k", &first.lease_token, Some(Duration::from_secs(30))).await.expect("heartbeat"); // no event
    app.lookup("k").await.expect("lookup"); // no event
    let request = pb::AbortRequest {
        namespace: NS.into(),
        key: "k".into(),
        lease_token: first.lease_token.clone(),
        reason: "gateway 503".into(),
        outcome_unknown: false,
    };
    app.client.clone().abort(request.clone()).await.expect("abort");
    app.client.clone().abort(request).await.expect("repeated abort: no event");
    let second = app.acquire(begin_req("k")).await;
    app.complete("k", &second.lease_token, b"ok").await.expect("complete");
    app.complete("k", &second.lease_token, b"ok").await.expect("repeated complete: no event");
    assert!(matches!(app.begin(begin_req("k")).await.expect("replay"), Outcome::Completed(_))); // no event

    let events = app.history("k").await.expect("history");
    assert_eq!(
        kinds(&events),
        [(Acquired as i32, 1), (Aborted as i32, 1), (Acquired as i32, 2), (Completed as i32, 2)]
    );
    assert_eq!(events[1].reason, "gateway 503");
    assert!(!events[1].outcome_unknown);
    assert_eq!(events[3].response_code, 200);
    assert!(events.iter().all(|e| e.principal.is_empty()), "auth off: no principal: {events:?}");
    assert!(events.windows(2).all(|w| to_chrono(w[0].at) <= to_chrono(w[1].at)), "oldest first: {events:?}");
    assert_eq!(replay(&events), Some((pb::State::Completed, 2, false)));

    let status = app.history("never").await.expect_err("no history");
    assert_error(&status, Code::NotFound, "NOT_FOUND");
}

async fn resolve_completes_an_aborted_record_as_its_attempt_would_have(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = aborted(&app, "r", true).await;
    let resolved = app.admin().resolve(resolve_req("r", 1)).await.expect("resolve").into_inner();
    let record = resolved.record.expect("record");
    assert_eq!(record.state, pb::State::Completed as i32);
    assert_eq!(record.attempt, 1);
    assert_eq!(record.response, resolve_req("r", 1).response);
    assert!(!record.outcome_unknown && record.abort_reason.is_empty(), "{record:?}");

    let Outcome::Completed(replayed) = app.begin(begin_req("r")).await.expect("begin") else { panic!("replay") };
    assert_eq!(replayed.response, resolve_req("r", 1).response);
    assert_eq!((replayed.response_code, replayed.attempt), (201, 1));
    // The former holder cannot take the operator's outcome for its own.
    let status = app.complete("r", &first.lease_token, b"late").await.expect_err("late complete");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");

    let events = app.history("r").await.expect("history");
    assert_eq!(kinds(&events), [(Acquired as i32, 1), (Aborted as i32, 1), (Resolved as i32, 1)]);
    assert_eq!(events[2].reason, resolve_req("r", 1).reason);
    assert_eq!(events[2].response_code, 201);

    let again = app.admin().resolve(resolve_req("r", 1)).await.expect_err("twice");
    assert_error(&again, Code::FailedPrecondition, "ALREADY_COMPLETED");
}

async fn admin_actions_refuse_with_their_documented_reasons(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut admin = app.admin();
    let live = app.acquire(begin_req("live")).await;

    let status = admin.resolve(resolve_req("live", 1)).await.expect_err("live");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LIVE");
    let status = admin.invalidate(invalidate_req("live")).await.expect_err("live");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LIVE");
    let status = admin.release(release_req("live", 2)).await.expect_err("wrong attempt");
    assert_error(&status, Code::FailedPrecondition, "ATTEMPT_MISMATCH");
    let status = admin.resolve(resolve_req("live", 7)).await.expect_err("wrong attempt");
    assert_error(&status, Code::FailedPrecondition, "ATTEMPT_MISMATCH");

    app.complete("live", &live.lease_token, b"ok").await.expect("complete");
    let status = admin.release(release_req("live", 1)).await.expect_err("completed");
    assert_error(&status, Code::FailedPrecondition, "NOT_IN_PROGRESS");

    for status in [
        admin.resolve(resolve_req("absent", 1)).await.expect_err("absent"),
        admin.release(release_req("absent", 1)).await.expect_err("absent"),
        admin.invalidate(invalidate_req("absent")).await.expect_err("absent"),
    ] {
        assert_error(&status, Code::NotFound, "NOT_FOUND");
    }
}

async fn admin_fields_are_checked(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut admin = app.admin();
    let cases: Vec<(Status, &str)> = vec![
        (
            admin
                .resolve(pb::ResolveRequest { reason: String::new(), ..resolve_req("k", 1) })
                .await
                .expect_err("refused"),
            "reason",
        ),
        (
            admin
                .release(pb::ReleaseRequest { reason: "a\0b".into(), ..release_req("k", 1) })
                .await
                .expect_err("refused"),
            "reason",
        ),
        (
            admin
                .invalidate(pb::InvalidateRequest { reason: "x".repeat(1025), ..invalidate_req("k") })
                .await
                .expect_err("refused"),
            "reason",
        ),
        (admin.resolve(resolve_req("k", 0)).await.expect_err("refused"), "attempt"),
        (admin.release(release_req("k", 0)).await.expect_err("refused"), "attempt"),
        (
            admin
                .resolve(pb::ResolveRequest { content_type: "a\nb".into(), ..resolve_req("k", 1) })
                .await
                .expect_err("refused"),
            "content_type",
        ),
        (
            admin
                .resolve(pb::ResolveRequest { namespace: "Bad".into(), ..resolve_req("k", 1) })
                .await
                .expect_err("refused"),
            "namespace",
        ),
        (
            admin
                .get_history(pb::GetHistoryRequest { namespace: NS.into(), key: String::new() })
                .await
                .expect_err("refused"),
            "key",
        ),
        (list(&app, pb::ListRecordsRequest { page_size: 1001, ..list_req() }).await.expect_err("refused"), "page_size"),
        (
            list(&app, pb::ListRecordsRequest { key_prefix: "a\u{1}".into(), ..list_req() })
                .await
                .expect_err("refused"),
            "key_prefix",
        ),
        (
            list(&app, pb::ListRecordsRequest { page_token: "forged".into(), ..list_req() })
                .await
                .expect_err("refused"),
            "page_token",
        ),
        (list(&app, pb::ListRecordsRequest { state: 9, ..list_req() }).await.expect_err("refused"), "state"),
    ];
    for (status, field) in cases {
        assert_invalid_field(&status, field);
    }
    let response = pb::ResolveRequest { response: vec![0; app.config.max_response_bytes + 1], ..resolve_req("k", 1) };
    assert_invalid_field(&admin.resolve(response).await.expect_err("refused"), "response");
}

fn list_req() -> pb::ListRecordsRequest {
    pb::ListRecordsRequest { namespace: NS.into(), ..Default::default() }
}

async fn list(app: &TestApp, request: pb::ListRecordsRequest) -> Result<pb::ListRecordsResponse, Status> {
    Ok(app.admin().list_records(request).await?.into_inner())
}

fn timestamp(at: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 }
}

async fn listing_filters_and_leaves_responses_out(backend: Backend) {
    let app = spawn_app(backend).await;
    let done = app.acquire(begin_req("order-done")).await;
    app.complete("order-done", &done.lease_token, b"secret card data").await.expect("complete");
    aborted(&app, "order-unknown", true).await;
    aborted(&app, "order-known", false).await;
    app.acquire(begin_req("refund-live")).await;

    let all = list(&app, list_req()).await.expect("list");
    assert_eq!(all.records.len(), 4);
    assert!(all.next_page_token.is_empty());
    assert!(all.records.windows(2).all(|w| to_chrono(w[0].updated_at) >= to_chrono(w[1].updated_at)), "newest first");
    let completed = all.records.iter().find(|r| r.key == "order-done").expect("listed");
    assert!(completed.response.is_empty(), "lists leave responses out");
    assert_eq!(completed.response_code, 200);

    let keys = |response: pb::ListRecordsResponse| response.records.into_iter().map(|r| r.key).collect::<Vec<_>>();
    let on_call = pb::ListRecordsRequest { state: pb::State::Aborted as i32, outcome_unknown_only: true, ..list_req() };
    assert_eq!(keys(list(&app, on_call).await.expect("list")), ["order-unknown"]);
    let aborted = pb::ListRecordsRequest { state: pb::State::Aborted as i32, ..list_req() };
    let mut both = keys(list(&app, aborted).await.expect("list"));
    both.sort();
    assert_eq!(both, ["order-known", "order-unknown"]);
    let prefixed = pb::ListRecordsRequest { key_prefix: "refund".into(), ..list_req() };
    assert_eq!(keys(list(&app, prefixed).await.expect("list")), ["refund-live"]);

    let now = chrono::Utc::now();
    let future =
        pb::ListRecordsRequest { updated_after: Some(timestamp(now + chrono::Duration::hours(1))), ..list_req() };
    assert!(list(&app, future).await.expect("list").records.is_empty());
    let past =
        pb::ListRecordsRequest { updated_before: Some(timestamp(now - chrono::Duration::hours(1))), ..list_req() };
    assert!(list(&app, past).await.expect("list").records.is_empty());
    let inverted = pb::ListRecordsRequest {
        updated_before: Some(timestamp(now - chrono::Duration::hours(1))),
        updated_after: Some(timestamp(now)),
        ..list_req()
    };
    let page = list(&app, inverted).await.expect("an inverted range is an empty page, not an error");
    assert!(page.records.is_empty() && page.next_page_token.is_empty());

    // A token only continues the listing it was issued for, and only unaltered.
    let first = list(&app, pb::ListRecordsRequest { page_size: 1, ..list_req() }).await.expect("list");
    assert_eq!(first.records.len(), 1);
    let token = first.next_page_token;
    assert!(!token.is_empty());
    let other =
        pb::ListRecordsRequest { page_size: 1, key_prefix: "order".into(), page_token: token.clone(), ..list_req() };
    assert_invalid_field(&list(&app, other).await.expect_err("other filters"), "page_token");
    let truncated = pb::ListRecordsRequest { page_size: 1, page_token: token[..token.len() - 2].into(), ..list_req() };
    assert_invalid_field(&list(&app, truncated).await.expect_err("truncated"), "page_token");
}

/// Records straight in the database, so that thousands exist in a blink.
async fn seed(app: &TestApp, count: usize) {
    let sql = match app.backend {
        Backend::Sqlite => format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) \
             INSERT INTO idemd_records (namespace, key, state, attempt, fingerprint, downstream_key, lease_token, \
             retention_us, created_at, updated_at, lease_expires_at, expires_at, completed_at, response, \
             response_code, content_type) \
             SELECT '{NS}', 'seed-' || printf('%05d', i), 2, 1, x'', 'idk_' || i, 'lt_' || i, 86400000000, \
             t, t - i * 1000, t, t + 86400000000, t, x'6f6b', 200, '' \
             FROM n, (SELECT CAST(unixepoch('subsec') * 1000000 AS INTEGER) AS t)"
        ),
        _ => format!(
            "INSERT INTO idemd_records (namespace, key, state, attempt, fingerprint, downstream_key, lease_token, \
             retention_us, created_at, updated_at, lease_expires_at, expires_at, completed_at, response, \
             response_code, content_type) \
             SELECT '{NS}', 'seed-' || lpad(i::text, 5, '0'), 2, 1, '', 'idk_' || i, 'lt_' || i, 86400000000, \
             now(), now() - i * interval '1 millisecond', now(), now() + interval '1 day', now(), 'ok', 200, '' \
             FROM generate_series(1, {count}) AS i"
        ),
    };
    app.execute_sql(&sql).await;
}

async fn paging_sees_every_unchanged_record_exactly_once(backend: Backend) {
    let app = spawn_app(backend).await;
    seed(&app, 2500).await;
    // Callers keep working on some keys (new ones, and re-created ones that
    // move to the front) while the listing pages.
    let app = std::sync::Arc::new(app);
    let churn = {
        let app = std::sync::Arc::clone(&app);
        tokio::spawn(async move {
            let mut changed = HashSet::new();
            for i in 0..60 {
                let key = if i % 2 == 0 { format!("churn-{i}") } else { format!("seed-{:05}", 2500 - i) };
                if let Ok(Outcome::Acquired(_)) = app.begin(begin_req(&key)).await {
                    changed.insert(key);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            changed
        })
    };
    let mut seen: Vec<String> = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let request = pb::ListRecordsRequest { page_size: 1000, page_token: token.clone(), ..list_req() };
        let page = list(&app, request).await.expect("page");
        pages += 1;
        seen.extend(page.records.into_iter().map(|r| r.key));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let changed = churn.await.expect("churn");
    assert!(pages >= 3, "2,500 records in pages of 1,000: {pages} pages");
    let mut counts = std::collections::HashMap::new();
    for key in &seen {
        *counts.entry(key.clone()).or_insert(0) += 1;
    }
    for i in 1..=2500 {
        let key = format!("seed-{i:05}");
        if !changed.contains(&key) {
            assert_eq!(counts.get(&key), Some(&1), "{key} did not change and must be listed once");
        }
    }
    for (key, count) in counts {
        assert!(count == 1 || changed.contains(&key), "{key} listed {count} times without changing");
    }
}

async fn release_ends_the_holders_attempt_and_a_waiter_acquires(backend: Backend) {
    let app = spawn_app(backend).await;
    let holder = app.acquire(begin_req("held")).await;
    let waiters: Vec<_> = (0..2)
        .map(|i| {
            let client = app.client.clone();
            tokio::spawn(async move {
                let mut request = begin_req("held");
                request.wait_timeout = secs(4);
                request.attempt_nonce = format!("waiter-{i}");
                let started = tokio::time::Instant::now();
                let outcome = client.clone().begin(request).await.expect("begin").into_inner().outcome;
                (outcome, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = app.admin().release(release_req("held", 1)).await.expect("release").into_inner();
    let record = released.record.expect("record");
    assert_eq!(record.state, pb::State::Aborted as i32);
    assert_eq!(record.aborted_by, pb::AbortedBy::Operator as i32);
    assert!(record.outcome_unknown);

    let mut acquired = Vec::new();
    for waiter in waiters {
        let (outcome, took) = waiter.await.expect("waiter");
        if let Some(Outcome::Acquired(lease)) = outcome {
            assert!(took < Duration::from_secs(3), "woken by the Release, not by its timeout: {took:?}");
            acquired.push(lease);
        }
    }
    assert_eq!(acquired.len(), 1, "exactly one waiter acquires");
    let previous = acquired[0].previous.clone().expect("previous");
    assert_eq!(previous.aborted_by, pb::AbortedBy::Operator as i32);
    assert_eq!(previous.abort_reason, "holder pod is gone");
    assert!(previous.outcome_unknown);

    for status in [
        app.complete("held", &holder.lease_token, b"late").await.expect_err("complete"),
        app.abort("held", &holder.lease_token, "late").await.expect_err("abort"),
        app.heartbeat("held", &holder.lease_token, Some(Duration::from_secs(30))).await.expect_err("heartbeat"),
    ] {
        assert_error(&status, tonic::Code::FailedPrecondition, "LEASE_LOST");
    }
    let events = app.history("held").await.expect("history");
    assert_eq!(kinds(&events), [(Acquired as i32, 1), (Released as i32, 1), (Acquired as i32, 2)]);
}

// Through a transaction pooler without LISTEN no transition wakes a waiter:
// it re-checks every 250 ms and would take the expired lease over itself
// before the Resolve (the Release test covers that backend).
mod resolve_wakes {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::resolve_wakes_a_parked_waiter_with_the_outcome(crate::helpers::Backend::Sqlite).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::resolve_wakes_a_parked_waiter_with_the_outcome(crate::helpers::Backend::Postgres).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_batched() {
        super::resolve_wakes_a_parked_waiter_with_the_outcome(crate::helpers::Backend::PostgresBatched).await
    }
}

/// Moves the key's lease end to `ms` milliseconds from now (database clock).
async fn expire_lease_soon(app: &TestApp, key: &str, ms: u64) {
    let sql = match app.backend {
        Backend::Sqlite => format!(
            "UPDATE idemd_records SET lease_expires_at = CAST(unixepoch('subsec') * 1000000 AS INTEGER) + {ms}000 \
             WHERE key = '{key}'"
        ),
        _ => format!(
            "UPDATE idemd_records SET lease_expires_at = now() + interval '{ms} milliseconds' WHERE key = '{key}'"
        ),
    };
    app.execute_sql(&sql).await;
}

/// The ErrorInfo reason of an idemd error.
fn reason_of(status: &Status) -> String {
    use tonic_types::StatusExt;
    status.get_details_error_info().map(|info| info.reason).unwrap_or_default()
}

/// Makes the key's live lease look expired to the database, without any
/// transition: a waiter parked on it still sleeps until its own timer, so
/// only the operator's action can wake it.
async fn expire_lease_behind_the_waiters_back(app: &TestApp, key: &str) {
    let sql = match app.backend {
        Backend::Sqlite => {
            format!("UPDATE idemd_records SET lease_expires_at = lease_expires_at - 3600000000 WHERE key = '{key}'")
        }
        _ => format!("UPDATE idemd_records SET lease_expires_at = now() - interval '1 second' WHERE key = '{key}'"),
    };
    app.execute_sql(&sql).await;
}

async fn resolve_wakes_a_parked_waiter_with_the_outcome(backend: Backend) {
    let app = spawn_app(backend).await;
    // Anything else that wakes the waiter between the lease's end and the
    // Resolve (on a loaded machine, the LISTEN connection's liveness check
    // wakes every waiter) lets it take the lease over first: the Resolve then
    // answers ATTEMPT_MISMATCH and the scenario is run again on a new key.
    for round in 0..3 {
        if resolve_wakes_round(&app, &format!("parked-{round}")).await {
            return;
        }
    }
    panic!("in three rounds the waiter was never left parked until the Resolve");
}

/// One round; false when the waiter was woken by something else first.
async fn resolve_wakes_round(app: &TestApp, key: &str) -> bool {
    app.acquire(begin_req(key)).await;
    let waiter = {
        let client = app.client.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            let mut request = begin_req(&key);
            request.wait_timeout = secs(20);
            let started = tokio::time::Instant::now();
            let outcome = client.clone().begin(request).await.expect("begin").into_inner().outcome;
            (outcome, started.elapsed())
        })
    };
    // Parked, and (Postgres) its mark on the attempt made: from here only a
    // transition's wake-up or its own timer (the lease's end, a minute
    // away) moves it.
    eventually("the waiter parks", Duration::from_secs(10), || async {
        (scrape(app.metrics_addr).await.get("idemd_waiters").copied() == Some(1.0)).then_some(())
    })
    .await;
    if app.backend != Backend::Sqlite {
        eventually("the waiter marks the attempt", Duration::from_secs(10), || async {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&app.database_url).await.ok()?;
            let marked: bool = sqlx::query_scalar("SELECT waiters FROM idemd_records WHERE key = $1")
                .bind(key)
                .fetch_one(&mut c)
                .await
                .ok()?;
            marked.then_some(())
        })
        .await;
    }
    expire_lease_behind_the_waiters_back(app, key).await;
    let resolved = app.admin().resolve(resolve_req(key, 1)).await;
    let (outcome, took) = tokio::time::timeout(Duration::from_secs(15), waiter).await.expect("answered").expect("task");
    if let Err(status) = &resolved {
        assert_error(status, Code::FailedPrecondition, "ATTEMPT_MISMATCH");
        assert!(matches!(outcome, Some(Outcome::Acquired(_))), "only a takeover explains it: {outcome:?}");
        return false;
    }
    let Some(Outcome::Completed(completed)) = outcome else { panic!("expected completed, got {outcome:?}") };
    assert_eq!(completed.response, resolve_req(key, 1).response);
    assert!(took < Duration::from_secs(15), "woken by the Resolve: {took:?}");
    true
}

async fn invalidate_removes_the_record_and_keeps_its_history(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app.acquire(begin_req("inv")).await;
    app.complete("inv", &first.lease_token, b"ok").await.expect("complete");
    app.admin().invalidate(invalidate_req("inv")).await.expect("invalidate");
    assert_error(&app.lookup("inv").await.expect_err("gone"), Code::NotFound, "NOT_FOUND");
    let listed = list(&app, list_req()).await.expect("list");
    assert!(listed.records.iter().all(|r| r.key != "inv"), "an invalidated record is not listed");
    let events = app.history("inv").await.expect("kept history");
    assert_eq!(kinds(&events), [(Acquired as i32, 1), (Completed as i32, 1), (Invalidated as i32, 1)]);
    assert_eq!(events[2].reason, "customer asked for a new order");

    let mut fresh = begin_req("inv");
    fresh.fingerprint = b"another request".to_vec();
    let second = app.acquire(fresh).await;
    assert_eq!(second.attempt, 1);
    assert_ne!(second.downstream_key, first.downstream_key);
    assert_eq!(second.previous, None);
    let events = app.history("inv").await.expect("history");
    assert_eq!(events.len(), 4);
    assert_eq!(replay(&events), Some((pb::State::InProgress, 1, false)));
    let status = app.admin().invalidate(invalidate_req("inv")).await.expect_err("live");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LIVE");
}

/// The record and its history, read after a race, must tell one story.
async fn record_and_history_agree(app: &TestApp, key: &str) -> Option<(pb::State, u32, bool)> {
    let record = app.lookup(key).await.ok();
    let events = app.history(key).await.expect("history");
    let replayed = replay(&events);
    let stored = record.map(|r| (pb::State::try_from(r.state).expect("state"), r.attempt, r.outcome_unknown));
    assert_eq!(replayed, stored, "history {events:?}");
    stored
}

async fn operators_racing_callers_have_one_winner(backend: Backend) {
    // What is tested is who wins, not how fast: a generous store timeout, so
    // that a busy machine (SQLite's one writer, fsyncs) cannot turn a loser's
    // answer into STORE_UNAVAILABLE.
    let app =
        std::sync::Arc::new(spawn_app_with(backend, |c| c.database.store_timeout = Duration::from_secs(60)).await);
    // Each race runs its two calls at once; four races run side by side.
    let rounds = 200;
    let parallel = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
    let mut tasks = Vec::new();
    for i in 0..rounds {
        let app = std::sync::Arc::clone(&app);
        let parallel = std::sync::Arc::clone(&parallel);
        tasks.push(tokio::spawn(async move {
            let _turn = parallel.acquire().await.expect("semaphore");
            // Resolve races the holder's Complete across the lease's end:
            // the lease runs out a few milliseconds from now, the holder's
            // Complete leaves at a varying moment around it, and the
            // operator resolves as soon as the lease is no longer live.
            let key = format!("resolve-{i}");
            let holder = app.acquire(begin_req(&key)).await;
            expire_lease_soon(&app, &key, 10).await;
            let (resolve, complete) = tokio::join!(
                async {
                    loop {
                        match app.admin().resolve(resolve_req(&key, 1)).await {
                            Err(status) if reason_of(&status) == "LEASE_LIVE" => {
                                tokio::time::sleep(Duration::from_millis(1)).await
                            }
                            answer => break answer,
                        }
                    }
                },
                async {
                    tokio::time::sleep(Duration::from_millis((i % 20) as u64)).await;
                    app.complete(&key, &holder.lease_token, b"holder").await
                }
            );
            assert!(resolve.is_ok() != complete.is_ok(), "{key}: exactly one wins: {resolve:?} {complete:?}");
            if let Err(status) = &resolve {
                assert_error(status, Code::FailedPrecondition, "ALREADY_COMPLETED");
            }
            if let Err(status) = &complete {
                assert_error(status, Code::FailedPrecondition, "LEASE_LOST");
            }
            assert_eq!(record_and_history_agree(&app, &key).await, Some((pb::State::Completed, 1, false)));

            // Release races the holder's Complete on a live lease.
            let key = format!("release-{i}");
            let holder = app.acquire(begin_req(&key)).await;
            let (release, complete) = tokio::join!(
                async { app.admin().release(release_req(&key, 1)).await },
                app.complete(&key, &holder.lease_token, b"holder")
            );
            assert!(release.is_ok() != complete.is_ok(), "{key}: exactly one wins: {release:?} {complete:?}");
            if let Err(status) = &release {
                assert_error(status, Code::FailedPrecondition, "NOT_IN_PROGRESS");
            }
            if let Err(status) = &complete {
                assert_error(status, Code::FailedPrecondition, "LEASE_LOST");
            }
            let want = if release.is_ok() { (pb::State::Aborted, 1, true) } else { (pb::State::Completed, 1, false) };
            assert_eq!(record_and_history_agree(&app, &key).await, Some(want));

            // Invalidate races a Begin that would acquire the aborted record.
            let key = format!("invalidate-{i}");
            aborted(&app, &key, false).await;
            let (invalidate, begin) =
                tokio::join!(async { app.admin().invalidate(invalidate_req(&key)).await }, app.begin(begin_req(&key)));
            let Ok(Outcome::Acquired(acquired)) = begin else {
                panic!("{key}: the Begin acquires either way: {begin:?}")
            };
            match &invalidate {
                // Invalidate first: the Begin created a fresh record.
                Ok(_) => assert_eq!(acquired.attempt, 1, "{key}"),
                // The Begin first: its live lease refuses the Invalidate.
                Err(status) => {
                    assert_error(status, Code::FailedPrecondition, "LEASE_LIVE");
                    assert_eq!(acquired.attempt, 2, "{key}");
                }
            }
            assert_eq!(
                record_and_history_agree(&app, &key).await,
                Some((pb::State::InProgress, acquired.attempt, false))
            );
        }));
    }
    for task in tasks {
        task.await.expect("race round");
    }
}

crate::both_stores!(
    every_transition_writes_one_event_and_nothing_else_does,
    resolve_completes_an_aborted_record_as_its_attempt_would_have,
    admin_actions_refuse_with_their_documented_reasons,
    admin_fields_are_checked,
    listing_filters_and_leaves_responses_out,
    paging_sees_every_unchanged_record_exactly_once,
    release_ends_the_holders_attempt_and_a_waiter_acquires,
    invalidate_removes_the_record_and_keeps_its_history,
    operators_racing_callers_have_one_winner,
    history_is_purged_with_its_record,
);

// ---- permissions: auth on (tokens with names and admin grants), and off ----

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    request
}

fn token_line(grants: &str, name: Option<&str>) -> (String, String) {
    let (token, line) = idemd::auth::new_token(&["payments".to_string()]).expect("token");
    let hash = line.split_whitespace().next().expect("hash").to_string();
    let line = match name {
        Some(name) => format!("{hash} {grants} name={name}"),
        None => format!("{hash} {grants}"),
    };
    (token, line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_needs_an_admin_grant_on_the_namespace_and_history_names_the_principal() {
    let dir = tempfile::tempdir().expect("dir");
    let (caller, caller_line) = token_line("payments", Some("checkout"));
    let (oncall, oncall_line) = token_line("admin:payments", Some("oncall-alice"));
    let (elsewhere, elsewhere_line) = token_line("admin:refunds,payments", None);
    let path = dir.path().join("tokens");
    std::fs::write(&path, format!("{caller_line}\n{oncall_line}\n{elsewhere_line}\n")).expect("tokens file");
    let app = spawn_app_with(Backend::Sqlite, |c| c.auth_tokens_file = Some(path)).await;
    let mut client = app.client.clone();
    let mut admin = app.admin();

    let acquired = match client.begin(authed(begin_req("k"), &caller)).await.expect("begin").into_inner().outcome {
        Some(Outcome::Acquired(acquired)) => acquired,
        other => panic!("{other:?}"),
    };
    let abort = pb::AbortRequest {
        namespace: NS.into(),
        key: "k".into(),
        lease_token: acquired.lease_token,
        reason: "timeout".into(),
        outcome_unknown: true,
    };
    client.abort(authed(abort, &caller)).await.expect("abort");

    let history = pb::GetHistoryRequest { namespace: NS.into(), key: "k".into() };
    let status = admin.get_history(authed(history.clone(), &caller)).await.expect_err("caller-only grant");
    assert_error(&status, Code::PermissionDenied, "NAMESPACE_DENIED");
    let status = admin.list_records(authed(list_req(), &elsewhere)).await.expect_err("admin on another namespace");
    assert_error(&status, Code::PermissionDenied, "NAMESPACE_DENIED");
    let status = admin.get_history(Request::new(history.clone())).await.expect_err("no credentials");
    assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");

    // An admin grant reads Lookup too, and the Idempotency service stays closed to it.
    let lookup = pb::LookupRequest { namespace: NS.into(), key: "k".into() };
    client.lookup(authed(lookup, &oncall)).await.expect("lookup with an admin grant");
    let status = client.begin(authed(begin_req("k2"), &oncall)).await.expect_err("admin grant only");
    assert_error(&status, Code::PermissionDenied, "NAMESPACE_DENIED");

    admin.resolve(authed(resolve_req("k", 1), &oncall)).await.expect("resolve");
    let events = admin.get_history(authed(history, &oncall)).await.expect("history").into_inner().events;
    let principals: Vec<_> = events.iter().map(|e| (e.kind, e.principal.as_str())).collect();
    assert_eq!(
        principals,
        [(Acquired as i32, "checkout"), (Aborted as i32, "checkout"), (Resolved as i32, "oncall-alice")]
    );
    let metrics = scrape(app.metrics_addr).await;
    let resolved = metrics
        .iter()
        .find(|(name, _)| {
            name.starts_with("idemd_admin_actions_total")
                && name.contains("action=\"resolve\"")
                && name.contains("outcome=\"resolved\"")
        })
        .map(|(_, value)| *value);
    assert_eq!(resolved, Some(1.0), "{metrics:?}");
}

/// An address of this machine that is not loopback, to call from.
fn non_loopback_address() -> std::net::IpAddr {
    let output = std::process::Command::new("hostname").arg("-I").output().expect("hostname -I");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|word| word.parse::<std::net::IpAddr>().ok())
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
        .expect("this test needs a non-loopback IPv4 address on the machine (hostname -I lists none)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_off_admin_answers_loopback_callers_only() {
    let mut server = Binary::start(&["--listen", "0.0.0.0:0"], &[]);
    let port = server.url().rsplit(':').next().expect("port").to_string();
    let remote = format!("http://{}:{port}", non_loopback_address());
    let channel = tonic::transport::Channel::from_shared(remote).expect("uri").connect().await.expect("connect");
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    let status = admin.list_records(list_req()).await.expect_err("not loopback");
    assert_error(&status, Code::PermissionDenied, "ADMIN_REQUIRES_AUTH");
    // The Idempotency service is not affected.
    pb::idempotency_client::IdempotencyClient::new(channel).begin(begin_req("k")).await.expect("begin");

    let local = format!("http://127.0.0.1:{port}");
    let channel = tonic::transport::Channel::from_shared(local).expect("uri").connect().await.expect("connect");
    pb::admin_client::AdminClient::new(channel).list_records(list_req()).await.expect("loopback");
    server.terminate().await;
}

async fn history_is_purged_with_its_record(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.min_retention = Duration::from_secs(1);
        c.purge_interval = Duration::from_millis(100);
    })
    .await;
    let mut short = begin_req("short");
    short.retention = secs(1);
    // Complete sets expires_at to now + retention whatever the lease was.
    let acquired = app.acquire(short).await;
    app.complete("short", &acquired.lease_token, b"ok").await.expect("complete");
    let kept = app.acquire(begin_req("kept")).await;
    app.complete("kept", &kept.lease_token, b"ok").await.expect("complete");
    assert_eq!(app.history("short").await.expect("history").len(), 2);

    eventually("the purger deletes the record and its history", Duration::from_secs(10), || async {
        (app.row_count(NS, "short").await == 0).then_some(())
    })
    .await;
    let status = app.history("short").await.expect_err("purged");
    assert_error(&status, Code::NotFound, "NOT_FOUND");
    assert_eq!(event_rows(&app, "short").await, 0, "no event outlives its record");
    assert_eq!(app.history("kept").await.expect("kept").len(), 2);
}

/// Events of a key left in the table, read straight from the database.
async fn event_rows(app: &TestApp, key: &str) -> i64 {
    use sqlx::Connection;
    let sql = "SELECT COUNT(*) FROM idemd_events WHERE namespace = $1 AND key = $2";
    match app.backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&app.database_url).await.expect("connect");
            sqlx::query_scalar(sql).bind(NS).bind(key).fetch_one(&mut c).await.expect("count")
        }
        _ => {
            let mut c = sqlx::PgConnection::connect(&app.database_url).await.expect("connect");
            sqlx::query_scalar(sql).bind(NS).bind(key).fetch_one(&mut c).await.expect("count")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_admin_action_is_logged_at_warn_without_the_response() {
    let server = Binary::start(&[], &[]);
    let channel = tonic::transport::Channel::from_shared(server.url()).expect("uri").connect().await.expect("connect");
    let mut client = pb::idempotency_client::IdempotencyClient::new(channel.clone());
    let Some(Outcome::Acquired(acquired)) =
        client.begin(begin_req("logged")).await.expect("begin").into_inner().outcome
    else {
        panic!("acquired")
    };
    let abort = pb::AbortRequest {
        namespace: NS.into(),
        key: "logged".into(),
        lease_token: acquired.lease_token,
        reason: "timeout".into(),
        outcome_unknown: true,
    };
    client.abort(abort).await.expect("abort");
    let resolve = pb::ResolveRequest { response: b"card-number-4242".to_vec(), ..resolve_req("logged", 1) };
    pb::admin_client::AdminClient::new(channel).resolve(resolve).await.expect("resolve");
    let line = server.wait_for_log("admin action", Duration::from_secs(10));
    assert!(line.contains("WARN"), "{line}");
    for part in ["admin.action=\"resolve\"", "idemd.namespace=\"payments\"", "idemd.key=\"logged\"", "ch_1 exists"] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
    assert!(!line.contains("card-number"), "the response must never be logged: {line}");
}
