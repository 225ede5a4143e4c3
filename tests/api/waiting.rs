//! Begin with `wait_timeout`: woken by the holder's Complete or Abort, by
//! lease expiry, or answering in_progress when the wait or deadline runs out.

use std::time::Duration;

use idemd::pb::begin_response::Outcome;
use tokio::time::Instant;
use tonic::Request;

use crate::helpers::*;

fn waiting(key: &str, wait: Duration) -> idemd::pb::BeginRequest {
    let mut request = begin_req(key);
    request.wait_timeout = Some(duration(wait));
    request
}

/// The safety-net poll is 15–25 s (250 ms through a pooler without LISTEN):
/// a waiter answering well before that was woken.
const PROMPT: Duration = Duration::from_millis(1500);

/// A waiter parked on `waiter_app` gets the replay, promptly, of the
/// Complete its key's holder sends to `holder_app`.
async fn completion_wakes_the_waiter(holder_app: &TestApp, waiter_app: &TestApp, response: &[u8]) {
    let holder = holder_app.acquire(begin_req("k")).await;
    let mut client = waiter_app.client.clone();
    let waiter = tokio::spawn(async move { client.begin(waiting("k", Duration::from_secs(30))).await });
    // Long enough for the waiter to park, on its own replica or another.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let completed_at = Instant::now();
    holder_app.complete("k", &holder.lease_token, response).await.expect("complete");
    let outcome = waiter.await.expect("task").expect("begin").into_inner().outcome;
    assert!(completed_at.elapsed() < PROMPT, "woken promptly, took {:?}", completed_at.elapsed());
    let Some(Outcome::Completed(replay)) = outcome else {
        panic!("expected the replay, got {outcome:?}");
    };
    assert_eq!(replay.response, response);
}

async fn waiter_receives_the_holders_completion(backend: Backend) {
    let app = spawn_app(backend).await;
    completion_wakes_the_waiter(&app, &app, b"paid").await;
}

async fn exactly_one_waiter_acquires_after_an_abort(backend: Backend) {
    let app = spawn_app(backend).await;
    let holder = app.acquire(begin_req("k")).await;
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let mut client = app.client.clone();
            tokio::spawn(async move {
                client
                    .begin(waiting("k", Duration::from_secs(3)))
                    .await
                    .map(|r| (r.into_inner().outcome, Instant::now()))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let aborted_at = Instant::now();
    app.abort("k", &holder.lease_token, "transient").await.expect("abort");
    let mut acquired = Vec::new();
    let mut in_progress = 0;
    for waiter in waiters {
        let (outcome, answered_at) = waiter.await.expect("task").expect("begin");
        match outcome {
            Some(Outcome::Acquired(lease)) => {
                assert!(answered_at - aborted_at < PROMPT, "woken promptly");
                acquired.push(lease);
            }
            Some(Outcome::InProgress(busy)) => {
                // The others went on waiting until their wait ran out.
                assert!(answered_at - aborted_at >= Duration::from_secs(2));
                assert_eq!(busy.attempt, 2);
                in_progress += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((acquired.len(), in_progress), (1, 3));
    assert_eq!(acquired[0].attempt, 2);
}

async fn waiter_acquires_when_the_lease_expires(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_secs(3600)).await;
    let mut request = begin_req("k");
    request.lease_ttl = secs(1);
    app.acquire(request).await;
    let outcome = app.begin(waiting("k", Duration::from_secs(10))).await.expect("begin");
    let Outcome::Acquired(lease) = outcome else {
        panic!("expected to take over, got {outcome:?}");
    };
    assert_eq!(lease.attempt, 2);
}

async fn wait_runs_out_with_in_progress(backend: Backend) {
    let app = spawn_app(backend).await;
    app.acquire(begin_req("k")).await;
    let started = Instant::now();
    let outcome = app.begin(waiting("k", Duration::from_millis(700))).await.expect("begin");
    assert!(matches!(outcome, Outcome::InProgress(_)), "{outcome:?}");
    assert!(started.elapsed() >= Duration::from_millis(700));
}

async fn wait_never_outlasts_the_callers_deadline(backend: Backend) {
    let app = spawn_app(backend).await;
    app.acquire(begin_req("k")).await;
    let mut request = Request::new(waiting("k", Duration::from_secs(30)));
    request.set_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let outcome = app.client.clone().begin(request).await.expect("answered before the deadline");
    assert!(matches!(outcome.into_inner().outcome, Some(Outcome::InProgress(_))));
    assert!(started.elapsed() < Duration::from_secs(1));
}

async fn explicit_zero_wait_answers_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    app.acquire(begin_req("k")).await;
    let started = Instant::now();
    let outcome = app.begin(waiting("k", Duration::ZERO)).await.expect("begin");
    assert!(matches!(outcome, Outcome::InProgress(_)), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "no waiting");
}

async fn waiter_with_another_fingerprint_is_rejected_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    app.acquire(begin_req("k")).await;
    let mut request = waiting("k", Duration::from_secs(30));
    request.fingerprint = b"fp-2".to_vec();
    let started = Instant::now();
    let status = app.begin(request).await.expect_err("mismatch");
    assert_error(&status, tonic::Code::FailedPrecondition, "FINGERPRINT_MISMATCH");
    assert!(started.elapsed() < Duration::from_secs(5), "no waiting");
}

crate::both_stores!(
    waiter_receives_the_holders_completion,
    exactly_one_waiter_acquires_after_an_abort,
    waiter_acquires_when_the_lease_expires,
    wait_runs_out_with_in_progress,
    wait_never_outlasts_the_callers_deadline,
    explicit_zero_wait_answers_at_once,
    waiter_with_another_fingerprint_is_rejected_at_once,
);

/// Two replicas on one Postgres: a Complete on one wakes a waiter on the
/// other (by NOTIFY; through PgBouncer without LISTEN, by re-checking).
async fn waiter_is_woken_by_a_completion_on_another_replica(backend: Backend) {
    let a = spawn_app(backend).await;
    let b = spawn_on(a.config.clone()).await;
    completion_wakes_the_waiter(&a, &b, b"paid on a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_waiter_is_woken_by_a_completion_on_another_replica() {
    waiter_is_woken_by_a_completion_on_another_replica(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_waiter_is_woken_by_a_completion_on_another_replica() {
    waiter_is_woken_by_a_completion_on_another_replica(Backend::PgBouncer).await
}

/// A NOTIFY holds a database-wide lock until its transaction commits, so
/// idemd notifies only for an attempt a waiter marked: a Complete nobody
/// waits for is silent, one a waiter marked wakes it. NOTIFYs arrive in
/// commit order, so the first one heard must be the awaited key's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notifies_only_transitions_a_waiter_awaits() {
    let app = spawn_app(Backend::Postgres).await;
    let mut listener = sqlx::postgres::PgListener::connect(&app.database_url).await.expect("connect");
    listener.listen("idemd_wake").await.expect("listen");
    let unawaited = app.acquire(begin_req("unawaited")).await;
    app.complete("unawaited", &unawaited.lease_token, b"paid").await.expect("complete");
    let aborted = app.acquire(begin_req("aborted")).await;
    app.abort("aborted", &aborted.lease_token, "declined").await.expect("abort");
    completion_wakes_the_waiter(&app, &app, b"paid while awaited").await;
    let first = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a notification within 10 s")
        .expect("receive");
    assert_eq!(first.payload(), format!("{NS}/k"));
}
