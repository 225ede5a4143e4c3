//! `run_once` against a real idemd when an attempt's outcome is unknown:
//! what the abort records, and when the reconcile hook runs.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idemd_client::pb::{AbortedBy, State};
use idemd_client::{Attempt, Client, Done, Error, ErrorKind, Failure, Policy, Response};

use crate::helpers::*;

/// The kind and the operation's own error of a failed call.
fn failed(result: Result<Done, Error<&str>>) -> (ErrorKind, Option<&str>) {
    let error = result.expect_err("a failed call");
    (error.kind(), error.into_operation_error().ok())
}

/// Attempt 1 charges and its answer is lost.
async fn charge_then_time_out(client: &Client, key: &str) -> Attempt {
    let seen = Mutex::new(None);
    let result = client
        .run_once(key, b"fp", |attempt| {
            *seen.lock().expect("seen") = Some(attempt);
            async { Err::<Response, _>(Failure::OutcomeUnknown("provider timeout")) }
        })
        .await;
    assert_eq!(failed(result), (ErrorKind::OutcomeUnknown, Some("provider timeout")));
    seen.into_inner().expect("seen").expect("the operation ran")
}

/// A reconcile hook that counts its calls and answers `answer`.
fn hook<'a>(
    calls: &'a Mutex<Vec<Attempt>>,
    answer: Result<Option<Response>, &'static str>,
) -> impl FnOnce(Attempt) -> std::future::Ready<Result<Option<Response>, &'static str>> + 'a {
    move |attempt| {
        calls.lock().expect("calls").push(attempt);
        std::future::ready(answer)
    }
}

#[tokio::test]
async fn an_unknown_outcome_is_recorded_and_handed_to_the_next_attempt() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    let first = charge_then_time_out(&client, "order-1").await;
    assert_eq!(first.previous, None, "attempt 1 has no predecessor");

    let record = lookup(&server, "order-1").await;
    assert_eq!(record.state, State::Aborted as i32);
    assert!(record.outcome_unknown);
    assert_eq!(record.aborted_by, AbortedBy::Caller as i32);

    let seen = Mutex::new(None);
    let done = client
        .run_once("order-1", b"fp", |attempt| {
            *seen.lock().expect("seen") = Some(attempt);
            async { Ok::<_, Failure<()>>(ok("ch_1")) }
        })
        .await
        .expect("attempt 2");
    assert_eq!((done.attempt, done.replayed, done.reconciled), (2, false, false));
    let second = seen.into_inner().expect("seen").expect("plain run_once runs the operation");
    assert_eq!(second.downstream_key, first.downstream_key);
    let previous = second.previous.expect("attempt 2 says how attempt 1 ended");
    assert_eq!((previous.attempt, previous.aborted_by), (1, AbortedBy::Caller));
    assert!(previous.outcome_unknown);
    assert_eq!(previous.abort_reason, "outcome unknown");
    assert!(previous.ended_at.is_some());
}

#[tokio::test]
async fn after_a_retryable_failure_nothing_is_reconciled() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    let calls = Mutex::new(Vec::new());
    let result = client
        .run_once_with_reconcile("order-2", b"fp", hook(&calls, Ok(Some(ok("wrong")))), |attempt| async move {
            assert_eq!(attempt.previous, None);
            Err::<Response, _>(Failure::Retryable("provider 503"))
        })
        .await;
    assert_eq!(failed(result), (ErrorKind::Retryable, Some("provider 503")));
    assert!(!lookup(&server, "order-2").await.outcome_unknown);

    let done = client
        .run_once_with_reconcile("order-2", b"fp", hook(&calls, Ok(Some(ok("wrong")))), |attempt| async move {
            let previous = attempt.previous.expect("attempt 2 says how attempt 1 ended");
            assert!(!previous.outcome_unknown, "{previous:?}");
            Ok(ok("ch_2"))
        })
        .await
        .expect("attempt 2");
    assert_eq!((done.attempt, done.reconciled, done.response), (2, false, ok("ch_2")));
    assert!(calls.lock().expect("calls").is_empty(), "the hook runs only after an unknown outcome");
}

#[tokio::test]
async fn a_reconciled_result_is_stored_without_running_the_operation() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    let first = charge_then_time_out(&client, "order-3").await;
    let calls = Mutex::new(Vec::new());
    let runs = AtomicU32::new(0);
    let done = client
        .run_once_with_reconcile("order-3", b"fp", hook(&calls, Ok(Some(ok("ch_3")))), |_| {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Failure<&'static str>>(ok("second charge")) }
        })
        .await
        .expect("reconciled");
    assert_eq!(done, Done { response: ok("ch_3"), replayed: false, reconciled: true, attempt: 2 });
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let calls = calls.into_inner().expect("calls");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].downstream_key, first.downstream_key, "the hook looks up the first attempt's key");
    assert!(calls[0].previous.as_ref().is_some_and(|p| p.outcome_unknown && p.attempt == 1));

    let record = lookup(&server, "order-3").await;
    assert_eq!((record.state, record.response), (State::Completed as i32, b"ch_3".to_vec()));
    let replay = client.run_once("order-3", b"fp", |_| async { Ok::<_, Failure<()>>(ok("again")) }).await;
    assert_eq!(replay.expect("replay").response, ok("ch_3"));
}

#[tokio::test]
async fn when_the_hook_finds_nothing_the_operation_runs() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    charge_then_time_out(&client, "order-4").await;
    let calls = Mutex::new(Vec::new());
    let done = client
        .run_once_with_reconcile("order-4", b"fp", hook(&calls, Ok(None)), |attempt| async move {
            assert!(attempt.previous.is_some_and(|p| p.outcome_unknown), "the operation sees it too");
            Ok::<_, Failure<&'static str>>(ok("ch_4"))
        })
        .await
        .expect("ran");
    assert_eq!((done.response, done.reconciled, done.attempt), (ok("ch_4"), false, 2));
    assert_eq!(calls.lock().expect("calls").len(), 1);
}

#[tokio::test]
async fn a_failed_hook_leaves_the_outcome_unknown() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    charge_then_time_out(&client, "order-5").await;
    let calls = Mutex::new(Vec::new());
    let runs = AtomicU32::new(0);
    let result = client
        .run_once_with_reconcile("order-5", b"fp", hook(&calls, Err("lookup 503")), |_| {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Failure<&'static str>>(ok("second charge")) }
        })
        .await;
    assert_eq!(failed(result), (ErrorKind::OutcomeUnknown, Some("lookup 503")));
    assert_eq!(runs.load(Ordering::SeqCst), 0, "no charge while the first one may exist");
    let record = lookup(&server, "order-5").await;
    assert_eq!((record.state, record.attempt, record.outcome_unknown), (State::Aborted as i32, 2, true));

    let done = client
        .run_once_with_reconcile("order-5", b"fp", hook(&calls, Ok(Some(ok("ch_5")))), |_| async {
            Ok::<_, Failure<&'static str>>(ok("second charge"))
        })
        .await
        .expect("reconciled on attempt 3");
    assert_eq!((done.response, done.reconciled, done.attempt), (ok("ch_5"), true, 3));
    let calls = calls.into_inner().expect("calls");
    assert_eq!(calls.len(), 2);
    assert!(calls[1].previous.as_ref().is_some_and(|p| p.outcome_unknown && p.attempt == 2));
}

#[tokio::test]
async fn a_retryable_failure_keeps_an_unreconciled_unknown_outcome() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    charge_then_time_out(&client, "order-6").await;
    // Without a hook nobody checked attempt 1: the record must keep saying so.
    let result = client.run_once("order-6", b"fp", |_| async { Err::<Response, _>(Failure::Retryable("503")) }).await;
    assert_eq!(failed(result), (ErrorKind::OutcomeUnknown, Some("503")));
    let record = lookup(&server, "order-6").await;
    assert_eq!((record.attempt, record.outcome_unknown), (2, true));

    // With a hook that found nothing, the retryable failure is just that.
    let calls = Mutex::new(Vec::new());
    let result = client
        .run_once_with_reconcile("order-6", b"fp", hook(&calls, Ok(None)), |_| async {
            Err::<Response, _>(Failure::Retryable("503"))
        })
        .await;
    assert_eq!(failed(result), (ErrorKind::Retryable, Some("503")));
    assert_eq!(calls.lock().expect("calls").len(), 1);
    let record = lookup(&server, "order-6").await;
    assert_eq!((record.attempt, record.outcome_unknown), (3, false));
}

#[tokio::test]
async fn an_expired_lease_is_reconciled() {
    let server = start_idemd().await;
    let client = client(&server, Policy { lease_ttl: Duration::from_secs(1), ..quick() });
    // The caller charges, then its process dies: nothing of it runs again,
    // not its heartbeats and not even its destructors (which would end the
    // lease at once), so only the lease's expiry ends the attempt.
    let (running, is_running) = tokio::sync::oneshot::channel();
    let mut crashed = Box::pin(client.run_once("order-7", b"fp", |_| async {
        let _ = running.send(());
        std::future::pending::<Result<Response, Failure<()>>>().await
    }));
    tokio::select! {
        _ = &mut crashed => panic!("the call returned"),
        _ = is_running => {}
    }
    std::mem::forget(crashed);
    let calls = Mutex::new(Vec::new());
    let done = client
        .run_once_with_reconcile("order-7", b"fp", hook(&calls, Ok(Some(ok("ch_7")))), |_| async {
            Ok::<_, Failure<&'static str>>(ok("second charge"))
        })
        .await
        .expect("reconciled after the lease expired");
    assert_eq!((done.response, done.reconciled, done.attempt), (ok("ch_7"), true, 2));
    let calls = calls.into_inner().expect("calls");
    let previous = calls.first().and_then(|attempt| attempt.previous.clone()).expect("the hook ran");
    assert_eq!((previous.aborted_by, previous.abort_reason.as_str()), (AbortedBy::Reaper, "lease expired"));
    assert!(previous.outcome_unknown);
}
