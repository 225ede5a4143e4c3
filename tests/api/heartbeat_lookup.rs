//! Every rule of Heartbeat and Lookup.

use std::time::Duration;

use idemd::pb;
use tonic::Code;

use crate::helpers::*;

async fn heartbeat_extends_a_live_lease(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.min_retention = Duration::from_secs(1)).await;
    let mut request = begin_req("k");
    request.lease_ttl = secs(5);
    request.retention = secs(1);
    let acquired = app.acquire(request).await;
    let before = chrono::Utc::now();
    let extended = app.heartbeat("k", &acquired.lease_token, Some(Duration::from_secs(600))).await.expect("heartbeat");
    let lease_end = to_chrono(extended.lease_expires_at);
    assert!(
        lease_end >= before + chrono::Duration::seconds(599) && lease_end <= before + chrono::Duration::seconds(601)
    );
    let record = app.lookup("k").await.expect("lookup");
    assert_eq!(record.lease_expires_at, extended.lease_expires_at);
    assert!(to_chrono(record.expires_at) >= to_chrono(extended.lease_expires_at), "expires_at grows with the lease");
    // The default lease when none is given: 60 s.
    let default = app.heartbeat("k", &acquired.lease_token, None).await.expect("heartbeat");
    let lease_end = to_chrono(default.lease_expires_at);
    assert!(lease_end < before + chrono::Duration::seconds(70));
    // The lease outlives the original 5 s.
    let mut holder_retry = begin_req("k");
    holder_retry.fingerprint = b"fp-1".to_vec();
    let busy = app.begin(holder_retry).await.expect("begin");
    assert!(matches!(busy, pb::begin_response::Outcome::InProgress(_)));
}

async fn heartbeat_cannot_revive_a_lost_lease(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_secs(3600)).await;
    let mut request = begin_req("k");
    request.lease_ttl = secs(1);
    let acquired = app.acquire(request).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let status = app.heartbeat("k", &acquired.lease_token, None).await.expect_err("expired");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");

    let done = app.acquire(begin_req("done")).await;
    app.complete("done", &done.lease_token, b"ok").await.expect("complete");
    let status = app.heartbeat("done", &done.lease_token, None).await.expect_err("completed");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");

    let aborted = app.acquire(begin_req("aborted")).await;
    app.abort("aborted", &aborted.lease_token, "").await.expect("abort");
    let status = app.heartbeat("aborted", &aborted.lease_token, None).await.expect_err("aborted");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");

    let status = app.heartbeat("k", "lt_forged", None).await.expect_err("foreign");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
}

async fn heartbeat_of_an_absent_record_is_not_found(backend: Backend) {
    let app = spawn_app(backend).await;
    let status = app.heartbeat("nope", "lt_x", None).await.expect_err("absent");
    assert_error(&status, Code::NotFound, "NOT_FOUND");
}

async fn lookup_shows_the_record_and_changes_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let acquired = app.acquire(begin_req("k")).await;
    let first = app.lookup("k").await.expect("lookup");
    assert_eq!(first.namespace, NS);
    assert_eq!(first.key, "k");
    assert_eq!(first.attempt, 1);
    assert_eq!(first.lease_expires_at, acquired.lease_expires_at);
    assert_eq!(first.completed_at, None);
    assert!(first.created_at.is_some() && first.updated_at.is_some());
    assert_eq!(app.lookup("k").await.expect("lookup"), first, "read-only");
    let status = app.lookup("absent").await.expect_err("absent");
    assert_error(&status, Code::NotFound, "NOT_FOUND");
}

crate::both_stores!(
    heartbeat_extends_a_live_lease,
    heartbeat_cannot_revive_a_lost_lease,
    heartbeat_of_an_absent_record_is_not_found,
    lookup_shows_the_record_and_changes_nothing,
);
