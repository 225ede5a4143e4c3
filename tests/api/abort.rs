//! Every rule of Abort.

use std::time::Duration;

use idemd::pb;
use tonic::Code;

use crate::helpers::*;

async fn abort_releases_the_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let acquired = app.acquire(begin_req("k")).await;
    app.abort("k", &acquired.lease_token, "provider 503").await.expect("abort");
    let record = app.lookup("k").await.expect("lookup");
    assert_eq!(record.state, pb::State::Aborted as i32);
    assert_eq!(record.aborted_by, pb::AbortedBy::Caller as i32);
    assert_eq!(record.abort_reason, "provider 503");
    // A repeat by the same token is OK and changes nothing.
    app.abort("k", &acquired.lease_token, "again").await.expect("repeated abort");
    assert_eq!(app.lookup("k").await.expect("lookup"), record);
}

async fn abort_of_a_completed_record_is_lease_lost(backend: Backend) {
    let app = spawn_app(backend).await;
    let acquired = app.acquire(begin_req("k")).await;
    app.complete("k", &acquired.lease_token, b"ok").await.expect("complete");
    let status = app.abort("k", &acquired.lease_token, "oops").await.expect_err("completed");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
    assert_eq!(app.lookup("k").await.expect("lookup").state, pb::State::Completed as i32);
}

async fn abort_with_a_stale_or_foreign_token_is_lease_lost(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app.acquire(begin_req("k")).await;
    app.abort("k", &first.lease_token, "retry").await.expect("abort");
    let second = app.acquire(begin_req("k")).await;
    let status = app.abort("k", &first.lease_token, "stale").await.expect_err("stale");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
    let status = app.abort("k", "lt_forged", "foreign").await.expect_err("foreign");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
    let record = app.lookup("k").await.expect("lookup");
    assert_eq!((record.state, record.attempt), (pb::State::InProgress as i32, 2));
    app.complete("k", &second.lease_token, b"ok").await.expect("holder unaffected");
}

async fn abort_after_the_reaper_is_lease_lost(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_millis(100)).await;
    let mut request = begin_req("k");
    request.lease_ttl = secs(1);
    let acquired = app.acquire(request).await;
    eventually("reaped", Duration::from_secs(10), || async {
        (app.lookup("k").await.ok()?.aborted_by == pb::AbortedBy::Reaper as i32).then_some(())
    })
    .await;
    let status = app.abort("k", &acquired.lease_token, "late").await.expect_err("reaped");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
    assert_eq!(app.lookup("k").await.expect("lookup").abort_reason, "lease expired");
}

async fn abort_of_an_expired_lease_is_lease_lost(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_secs(3600)).await;
    let mut request = begin_req("k");
    request.lease_ttl = secs(1);
    let acquired = app.acquire(request).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let status = app.abort("k", &acquired.lease_token, "late").await.expect_err("expired");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
    assert_eq!(app.lookup("k").await.expect("lookup").state, pb::State::InProgress as i32);
}

async fn abort_of_an_absent_record_is_not_found(backend: Backend) {
    let app = spawn_app(backend).await;
    let status = app.abort("nope", "lt_x", "").await.expect_err("absent");
    assert_error(&status, Code::NotFound, "NOT_FOUND");
}

async fn abort_and_heartbeat_of_an_expired_record_are_not_found(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.min_retention = Duration::from_secs(1);
        c.purge_interval = Duration::from_secs(3600);
        c.reaper_interval = Duration::from_secs(3600);
    })
    .await;
    let mut request = begin_req("k");
    request.retention = secs(1);
    request.lease_ttl = secs(1);
    let acquired = app.acquire(request).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(app.row_count(NS, "k").await, 1, "not purged yet");
    let status = app.abort("k", &acquired.lease_token, "late").await.expect_err("expired");
    assert_error(&status, Code::NotFound, "NOT_FOUND");
    let status = app.heartbeat("k", &acquired.lease_token, None).await.expect_err("expired");
    assert_error(&status, Code::NotFound, "NOT_FOUND");
}

crate::both_stores!(
    abort_releases_the_key,
    abort_of_a_completed_record_is_lease_lost,
    abort_with_a_stale_or_foreign_token_is_lease_lost,
    abort_after_the_reaper_is_lease_lost,
    abort_of_an_expired_lease_is_lease_lost,
    abort_of_an_absent_record_is_not_found,
    abort_and_heartbeat_of_an_expired_record_are_not_found,
);
