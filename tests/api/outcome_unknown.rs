//! Outcome unknown: what the next attempt learns about the one before it
//! (Acquired.previous), and what Lookup shows (Record.outcome_unknown).

use std::time::Duration;

use idemd::pb;
use idemd::pb::begin_response::Outcome;

use crate::helpers::*;

async fn abort(app: &TestApp, key: &str, token: &str, reason: &str, outcome_unknown: bool) {
    let request = pb::AbortRequest {
        namespace: NS.into(),
        key: key.into(),
        lease_token: token.into(),
        reason: reason.into(),
        outcome_unknown,
    };
    app.client.clone().abort(request).await.expect("abort");
}

async fn first_attempt_has_no_previous(backend: Backend) {
    let app = spawn_app(backend).await;
    let acquired = app.acquire(begin_req("first")).await;
    assert_eq!(acquired.attempt, 1);
    assert_eq!(acquired.previous, None);
}

async fn an_abort_with_unknown_outcome_is_stored_and_told_to_the_next_attempt(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app.acquire(begin_req("charge")).await;
    abort(&app, "charge", &first.lease_token, "provider timed out after the request left", true).await;

    let record = app.lookup("charge").await.expect("lookup");
    assert_eq!(record.state, pb::State::Aborted as i32);
    assert!(record.outcome_unknown, "{record:?}");
    assert_eq!(record.aborted_by, pb::AbortedBy::Caller as i32);

    let mut retry = begin_req("charge");
    retry.attempt_nonce = "nonce-2".into();
    let second = app.acquire(retry.clone()).await;
    let previous = second.previous.clone().expect("previous on attempt 2");
    assert_eq!(previous.attempt, 1);
    assert_eq!(previous.aborted_by, pb::AbortedBy::Caller as i32);
    assert_eq!(previous.abort_reason, "provider timed out after the request left");
    assert!(previous.outcome_unknown);
    assert!(previous.ended_at.is_some());
    assert_eq!(second.downstream_key, first.downstream_key, "the reconciliation key stays");

    // The holder's own retried Begin (its reply was lost) gets the same previous.
    let again = app.acquire(retry).await;
    assert_eq!(again.lease_token, second.lease_token);
    assert_eq!(again.previous, second.previous);

    // While an attempt is in flight the record itself says nothing of the last one.
    let record = app.lookup("charge").await.expect("lookup");
    assert!(!record.outcome_unknown && record.abort_reason.is_empty(), "{record:?}");
}

async fn a_plain_abort_says_nothing_happened(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app.acquire(begin_req("declined")).await;
    abort(&app, "declined", &first.lease_token, "provider refused: rate limited", false).await;
    assert!(!app.lookup("declined").await.expect("lookup").outcome_unknown);
    let second = app.acquire(begin_req("declined")).await;
    let previous = second.previous.expect("previous");
    assert!(!previous.outcome_unknown);
    assert_eq!(previous.abort_reason, "provider refused: rate limited");
}

async fn an_expired_lease_taken_over_is_outcome_unknown(backend: Backend) {
    // The reaper never runs here: the next Begin finds the lease expired.
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_secs(3600)).await;
    let mut request = begin_req("crashed");
    request.lease_ttl = secs(1);
    let crashed = app.acquire(request.clone()).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let next = app.acquire(request).await;
    assert_eq!(next.attempt, 2);
    let previous = next.previous.expect("previous");
    assert_eq!(previous.aborted_by, pb::AbortedBy::Reaper as i32);
    assert_eq!(previous.abort_reason, "lease expired");
    assert!(previous.outcome_unknown);
    assert_eq!(previous.ended_at, crashed.lease_expires_at, "an expired lease ended at its expiry");

    let kinds: Vec<_> = app.history("crashed").await.expect("history").iter().map(|e| (e.kind, e.attempt)).collect();
    use pb::EventKind::*;
    assert_eq!(kinds, [(Acquired as i32, 1), (Reaped as i32, 1), (Acquired as i32, 2)]);
}

async fn a_reaped_lease_is_outcome_unknown(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_millis(100)).await;
    let mut request = begin_req("reaped");
    request.lease_ttl = secs(1);
    app.acquire(request.clone()).await;
    let record = eventually("the reaper aborts the lease", Duration::from_secs(10), || async {
        let record = app.lookup("reaped").await.ok()?;
        (record.state == pb::State::Aborted as i32).then_some(record)
    })
    .await;
    assert!(record.outcome_unknown);
    let next = app.begin(request).await.expect("begin");
    let Outcome::Acquired(next) = next else { panic!("expected acquired, got {next:?}") };
    let previous = next.previous.expect("previous");
    assert_eq!(previous.aborted_by, pb::AbortedBy::Reaper as i32);
    assert!(previous.outcome_unknown);
}

crate::both_stores!(
    first_attempt_has_no_previous,
    an_abort_with_unknown_outcome_is_stored_and_told_to_the_next_attempt,
    a_plain_abort_says_nothing_happened,
    an_expired_lease_taken_over_is_outcome_unknown,
    a_reaped_lease_is_outcome_unknown,
);
