//! Every row of Begin's table.

use std::time::Duration;

use idemd::pb::{self, begin_response::Outcome};
use tonic::Code;

use crate::helpers::*;

async fn acquires_absent_key_as_attempt_1(backend: Backend) {
    let app = spawn_app(backend).await;
    let before = chrono::Utc::now();
    let acquired = app.acquire(begin_req("order-1")).await;
    assert_eq!(acquired.attempt, 1);
    assert!(acquired.lease_token.len() >= 32, "token too short: {}", acquired.lease_token);
    let dk = &acquired.downstream_key;
    assert!(dk.starts_with("idk_") && dk.len() == 36, "{dk}");
    assert!(dk[4..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{dk}");
    let lease_end = to_chrono(acquired.lease_expires_at);
    // Default lease: 60 s from now (clocks of test and store agree on one machine).
    assert!(lease_end > before + chrono::Duration::seconds(55) && lease_end < before + chrono::Duration::seconds(65));
    let record = app.lookup("order-1").await.expect("lookup");
    assert_eq!(record.state, pb::State::InProgress as i32);
    assert_eq!(record.fingerprint, b"fp-1");
    assert_eq!(&record.downstream_key, dk);
    // expires_at = created_at + default retention (24 h).
    let retained = to_chrono(record.expires_at) - to_chrono(record.created_at);
    assert!((retained - chrono::Duration::hours(24)).num_seconds().abs() <= 1, "{retained}");
}

async fn fingerprint_mismatch_is_rejected_and_leaves_the_record(backend: Backend) {
    let app = spawn_app(backend).await;
    let acquired = app.acquire(begin_req("k")).await;
    let before = app.lookup("k").await.expect("lookup");

    let mut other = begin_req("k");
    other.fingerprint = b"fp-2".to_vec();
    let status = app.begin(other.clone()).await.expect_err("mismatch while in progress");
    assert_error(&status, Code::FailedPrecondition, "FINGERPRINT_MISMATCH");
    // Empty matches only empty.
    let mut empty = begin_req("k");
    empty.fingerprint.clear();
    let status = app.begin(empty).await.expect_err("empty vs non-empty");
    assert_error(&status, Code::FailedPrecondition, "FINGERPRINT_MISMATCH");
    assert_eq!(app.lookup("k").await.expect("lookup"), before);

    app.complete("k", &acquired.lease_token, b"ok").await.expect("complete");
    let status = app.begin(other.clone()).await.expect_err("mismatch when completed");
    assert_error(&status, Code::FailedPrecondition, "FINGERPRINT_MISMATCH");

    let acquired = app.acquire(begin_req("k2")).await;
    app.abort("k2", &acquired.lease_token, "transient").await.expect("abort");
    other.key = "k2".into();
    let status = app.begin(other).await.expect_err("mismatch when aborted");
    assert_error(&status, Code::FailedPrecondition, "FINGERPRINT_MISMATCH");
    assert_eq!(app.lookup("k2").await.expect("lookup").state, pb::State::Aborted as i32);
}

async fn empty_fingerprint_matches_empty(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut request = begin_req("k");
    request.fingerprint.clear();
    let acquired = app.acquire(request.clone()).await;
    app.complete("k", &acquired.lease_token, b"done").await.expect("complete");
    assert!(matches!(app.begin(request).await.expect("begin"), Outcome::Completed(_)));
}

async fn replays_completed_response_byte_for_byte(backend: Backend) {
    let app = spawn_app(backend).await;
    let acquired = app.acquire(begin_req("pay-1")).await;
    let payload: Vec<u8> = (0..=255u8).chain([0, 0, 0xff, 0]).cycle().take(4096).collect();
    let mut client = app.client.clone();
    let done = client
        .complete(pb::CompleteRequest {
            namespace: NS.into(),
            key: "pay-1".into(),
            lease_token: acquired.lease_token.clone(),
            response: payload.clone(),
            response_code: 402,
            content_type: "application/octet-stream".into(),
        })
        .await
        .expect("complete")
        .into_inner();
    for _ in 0..2 {
        let Outcome::Completed(replay) = app.begin(begin_req("pay-1")).await.expect("begin") else {
            panic!("expected a replay");
        };
        assert_eq!(replay.response, payload);
        assert_eq!(replay.response_code, 402);
        assert_eq!(replay.content_type, "application/octet-stream");
        assert_eq!(replay.attempt, 1);
        assert_eq!(replay.completed_at, done.completed_at);
        assert_eq!(replay.expires_at, done.expires_at);
    }
}

async fn reacquires_after_abort_with_the_same_downstream_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app.acquire(begin_req("k")).await;
    app.abort("k", &first.lease_token, "provider timeout").await.expect("abort");
    let second = app.acquire(begin_req("k")).await;
    assert_eq!(second.attempt, 2);
    assert_eq!(second.downstream_key, first.downstream_key);
    assert_ne!(second.lease_token, first.lease_token);
    let record = app.lookup("k").await.expect("lookup");
    assert_eq!(record.state, pb::State::InProgress as i32);
    assert_eq!(record.abort_reason, "");
    assert_eq!(record.aborted_by, pb::AbortedBy::Unspecified as i32);
}

async fn takes_over_an_expired_lease(backend: Backend) {
    // No reaper: the takeover itself must handle an expired IN_PROGRESS lease.
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_secs(3600)).await;
    let mut request = begin_req("k");
    request.lease_ttl = secs(1);
    let first = app.acquire(request.clone()).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The winner completes below: its lease must outlast a busy machine's pauses.
    request.lease_ttl = secs(60);
    let second = app.acquire(request).await;
    assert_eq!(second.attempt, 2);
    assert_eq!(second.downstream_key, first.downstream_key);
    let status = app.complete("k", &first.lease_token, b"late").await.expect_err("superseded");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
    app.complete("k", &second.lease_token, b"winner").await.expect("complete");
    let Outcome::Completed(replay) = app.begin(begin_req("k")).await.expect("begin") else {
        panic!("expected a replay");
    };
    assert_eq!(replay.response, b"winner");
    assert_eq!(replay.attempt, 2);
}

async fn holders_retry_with_its_nonce_gets_the_same_lease(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut request = begin_req("k");
    request.attempt_nonce = "nonce-a".into();
    request.lease_ttl = secs(30);
    let first = app.acquire(request.clone()).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    request.lease_ttl = secs(600);
    let again = app.acquire(request.clone()).await;
    assert_eq!(again, first, "same token, attempt and lease (not extended)");

    request.attempt_nonce = "nonce-b".into();
    assert!(matches!(app.begin(request).await.expect("begin"), Outcome::InProgress(_)));
    assert!(matches!(app.begin(begin_req("k")).await.expect("begin"), Outcome::InProgress(_)));
}

async fn live_lease_answers_in_progress(backend: Backend) {
    let app = spawn_app(backend).await;
    let acquired = app.acquire(begin_req("k")).await;
    let Outcome::InProgress(busy) = app.begin(begin_req("k")).await.expect("begin") else {
        panic!("expected in_progress");
    };
    assert_eq!(busy.attempt, 1);
    assert_eq!(busy.lease_expires_at, acquired.lease_expires_at);
    // 60 s left: the hint is clamped to 2 s.
    assert_eq!(busy.retry_after, secs(2));

    // Under 1 s left: the hint is what remains, at least 50 ms. A machine that
    // pauses for the whole second between the two calls sees the lease expire
    // and acquire instead, which proves nothing here: try again on a new key.
    for round in 0..3 {
        let mut short = begin_req(&format!("s{round}"));
        short.lease_ttl = secs(1);
        app.acquire(short.clone()).await;
        match app.begin(short).await.expect("begin") {
            Outcome::InProgress(busy) => {
                let hint = busy.retry_after.expect("retry_after");
                assert!(hint.seconds == 0 && hint.nanos >= 50_000_000, "{hint:?}");
                return;
            }
            Outcome::Acquired(lease) => assert_eq!(lease.attempt, 2, "only an expired lease is taken over"),
            other => panic!("expected in_progress, got {other:?}"),
        }
    }
    panic!("three one-second leases expired before the next call: the machine is too slow for this test");
}

async fn concurrent_begins_acquire_exactly_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let calls = (0..64).map(|_| {
        let app_client = app.client.clone();
        tokio::spawn(async move {
            let mut client = app_client;
            client.begin(begin_req("hot")).await.map(|r| r.into_inner().outcome.expect("outcome"))
        })
    });
    let outcomes = futures::future::join_all(calls).await;
    let mut acquired = 0;
    let mut in_progress = 0;
    for outcome in outcomes {
        match outcome.expect("task").expect("begin") {
            Outcome::Acquired(_) => acquired += 1,
            Outcome::InProgress(_) => in_progress += 1,
            Outcome::Completed(_) => panic!("nothing was completed"),
        }
    }
    assert_eq!((acquired, in_progress), (1, 63));
    assert_eq!(app.row_count(NS, "hot").await, 1);
}

async fn namespaces_never_interact(backend: Backend) {
    let app = spawn_app(backend).await;
    app.acquire(begin_req("k")).await;
    let mut other = begin_req("k");
    other.namespace = "refunds".into();
    other.fingerprint = b"different".to_vec();
    let acquired = app.acquire(other).await;
    assert_eq!(acquired.attempt, 1);
}

async fn expired_record_acts_as_absent(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.min_retention = Duration::from_secs(1);
        c.purge_interval = Duration::from_secs(3600);
    })
    .await;
    let mut request = begin_req("k");
    request.retention = secs(1);
    // Complete sets expires_at to now + retention whatever the lease was.
    let first = app.acquire(request.clone()).await;
    app.complete("k", &first.lease_token, b"old").await.expect("complete");
    tokio::time::sleep(Duration::from_millis(1200)).await;

    assert_error(&app.lookup("k").await.expect_err("expired"), Code::NotFound, "NOT_FOUND");
    assert_error(&app.complete("k", &first.lease_token, b"x").await.expect_err("expired"), Code::NotFound, "NOT_FOUND");
    // Not purged yet, but a new Begin (even with another fingerprint) starts afresh.
    assert_eq!(app.row_count(NS, "k").await, 1);
    request.fingerprint = b"fp-new".to_vec();
    let fresh = app.acquire(request).await;
    assert_eq!(fresh.attempt, 1);
    assert_ne!(fresh.downstream_key, first.downstream_key);
    let record = app.lookup("k").await.expect("lookup");
    assert_eq!(record.fingerprint, b"fp-new");
    assert!(record.response.is_empty());
}

async fn record_outlives_its_live_lease(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.min_retention = Duration::from_secs(1)).await;
    let mut request = begin_req("k");
    request.retention = secs(1);
    request.lease_ttl = secs(120);
    let acquired = app.acquire(request).await;
    let record = app.lookup("k").await.expect("lookup");
    assert!(to_chrono(record.expires_at) >= to_chrono(acquired.lease_expires_at));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(matches!(app.begin(begin_req("k")).await.expect("begin"), Outcome::InProgress(_)));
}

async fn another_fingerprint_cannot_take_over_an_expired_lease(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_secs(3600)).await;
    let mut request = begin_req("k");
    request.lease_ttl = secs(1);
    app.acquire(request).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut other = begin_req("k");
    other.fingerprint = b"fp-2".to_vec();
    let status = app.begin(other).await.expect_err("mismatch on an expired lease");
    assert_error(&status, Code::FailedPrecondition, "FINGERPRINT_MISMATCH");
    let record = app.lookup("k").await.expect("lookup");
    assert_eq!((record.state, record.attempt), (pb::State::InProgress as i32, 1));
}

async fn holders_nonce_after_its_lease_expired_gets_a_new_attempt(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_secs(3600)).await;
    let mut request = begin_req("k");
    request.lease_ttl = secs(1);
    request.attempt_nonce = "nonce-a".into();
    let first = app.acquire(request.clone()).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = app.acquire(request).await;
    assert_eq!(second.attempt, 2);
    assert_ne!(second.lease_token, first.lease_token);
}

async fn reacquisition_and_completion_set_expires_at(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app.acquire(begin_req("k")).await;
    let created = app.lookup("k").await.expect("lookup");
    app.abort("k", &first.lease_token, "retry").await.expect("abort");
    // A longer retention on re-acquisition pushes expires_at out.
    let mut longer = begin_req("k");
    longer.retention = secs(48 * 3600);
    let second = app.acquire(longer).await;
    let record = app.lookup("k").await.expect("lookup");
    let grown = to_chrono(record.expires_at) - to_chrono(created.expires_at);
    assert!(grown > chrono::Duration::hours(23), "{grown}");
    // A shorter one never pulls it in: expires_at = max(expires_at, now + retention, lease end).
    app.abort("k", &second.lease_token, "retry").await.expect("abort");
    let third = app.acquire(begin_req("k")).await;
    assert_eq!(app.lookup("k").await.expect("lookup").expires_at, record.expires_at);
    // Complete: completed_at + the retention of the latest acquisition (24 h here).
    let done = app.complete("k", &third.lease_token, b"ok").await.expect("complete");
    assert_eq!(to_chrono(done.expires_at) - to_chrono(done.completed_at), chrono::Duration::hours(24));
}

async fn completion_keeps_the_requested_retention(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut request = begin_req("k");
    request.retention = secs(72 * 3600);
    let acquired = app.acquire(request).await;
    let done = app.complete("k", &acquired.lease_token, b"ok").await.expect("complete");
    assert_eq!(to_chrono(done.expires_at) - to_chrono(done.completed_at), chrono::Duration::hours(72));
}

async fn mixed_concurrent_begins_keep_every_rule(backend: Backend) {
    // With group commit these land in shared batches: distinct keys, repeats
    // of a key, a completed key, and one mismatch among them.
    let app = spawn_app(backend).await;
    let done = app.acquire(begin_req("done")).await;
    app.complete("done", &done.lease_token, b"stored").await.expect("complete");
    let mut calls = Vec::new();
    for i in 0..48 {
        let mut request = begin_req(&format!("mixed-{}", i % 16));
        if i == 47 {
            request.key = "done".into();
            request.fingerprint = b"other".to_vec();
        } else if i % 12 == 5 {
            request.key = "done".into();
        }
        let mut client = app.client.clone();
        calls.push(tokio::spawn(async move { (request.key.clone(), client.begin(request).await) }));
    }
    let mut acquired: std::collections::HashMap<String, u32> = Default::default();
    for call in calls {
        let (key, answer) = call.await.expect("task");
        match answer.map(|r| r.into_inner().outcome) {
            Ok(Some(Outcome::Acquired(lease))) => *acquired.entry(key).or_default() += lease.attempt,
            Ok(Some(Outcome::InProgress(_))) => assert_ne!(key, "done"),
            Ok(Some(Outcome::Completed(replay))) => {
                assert_eq!(key, "done");
                assert_eq!(replay.response, b"stored");
            }
            Err(status) => {
                assert_eq!(key, "done");
                assert_error(&status, Code::FailedPrecondition, "FINGERPRINT_MISMATCH");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(acquired.len(), 16, "every distinct key acquired");
    assert!(acquired.values().all(|&attempts| attempts == 1), "exactly once, attempt 1: {acquired:?}");
    for i in 0..16 {
        assert_eq!(app.row_count(NS, &format!("mixed-{i}")).await, 1);
    }
}

crate::both_stores!(
    mixed_concurrent_begins_keep_every_rule,
    acquires_absent_key_as_attempt_1,
    fingerprint_mismatch_is_rejected_and_leaves_the_record,
    empty_fingerprint_matches_empty,
    replays_completed_response_byte_for_byte,
    reacquires_after_abort_with_the_same_downstream_key,
    takes_over_an_expired_lease,
    holders_retry_with_its_nonce_gets_the_same_lease,
    live_lease_answers_in_progress,
    concurrent_begins_acquire_exactly_once,
    namespaces_never_interact,
    expired_record_acts_as_absent,
    record_outlives_its_live_lease,
    another_fingerprint_cannot_take_over_an_expired_lease,
    holders_nonce_after_its_lease_expired_gets_a_new_attempt,
    reacquisition_and_completion_set_expires_at,
    completion_keeps_the_requested_retention,
);
