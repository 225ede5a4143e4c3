//! Every rule of Complete.

use std::time::Duration;

use idemd::pb::{self, begin_response::Outcome};
use tonic::Code;

use crate::helpers::*;

async fn complete_stores_the_outcome(backend: Backend) {
    let app = spawn_app(backend).await;
    let acquired = app.acquire(begin_req("k")).await;
    let done = app.complete("k", &acquired.lease_token, b"{\"charge\":\"ch_1\"}").await.expect("complete");
    let record = app.lookup("k").await.expect("lookup");
    assert_eq!(record.state, pb::State::Completed as i32);
    assert_eq!(record.response, b"{\"charge\":\"ch_1\"}");
    assert_eq!(record.response_code, 200);
    assert_eq!(record.content_type, "application/json");
    assert_eq!(record.completed_at, done.completed_at);
    assert_eq!(record.expires_at, done.expires_at);
    // expires_at = completed_at + retention (24 h by default).
    let retained = to_chrono(done.expires_at) - to_chrono(done.completed_at);
    assert_eq!(retained, chrono::Duration::hours(24));
}

async fn retried_complete_is_ok_and_changes_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let acquired = app.acquire(begin_req("k")).await;
    let first = app.complete("k", &acquired.lease_token, b"first").await.expect("complete");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = app.complete("k", &acquired.lease_token, b"second").await.expect("retried complete");
    assert_eq!(again, first, "the reply carries the original timestamps");
    let record = app.lookup("k").await.expect("lookup");
    assert_eq!(record.response, b"first");
}

async fn complete_after_another_attempt_took_over_is_lease_lost(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app.acquire(begin_req("k")).await;
    app.abort("k", &first.lease_token, "retry").await.expect("abort");
    let second = app.acquire(begin_req("k")).await;
    let status = app.complete("k", &first.lease_token, b"stale").await.expect_err("stale token");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
    // Nothing changed: the new holder still completes.
    app.complete("k", &second.lease_token, b"ok").await.expect("complete");
}

async fn complete_of_an_aborted_record_is_lease_lost(backend: Backend) {
    let app = spawn_app(backend).await;
    let acquired = app.acquire(begin_req("k")).await;
    app.abort("k", &acquired.lease_token, "retry").await.expect("abort");
    let status = app.complete("k", &acquired.lease_token, b"x").await.expect_err("aborted");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
    assert_eq!(app.lookup("k").await.expect("lookup").state, pb::State::Aborted as i32);
}

async fn complete_after_the_lease_expired_is_lease_lost(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_secs(3600)).await;
    let mut request = begin_req("k");
    request.lease_ttl = secs(1);
    let acquired = app.acquire(request).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let status = app.complete("k", &acquired.lease_token, b"late").await.expect_err("expired");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
    assert_eq!(app.lookup("k").await.expect("lookup").state, pb::State::InProgress as i32);
}

async fn complete_with_a_foreign_token_is_lease_lost(backend: Backend) {
    let app = spawn_app(backend).await;
    app.acquire(begin_req("k")).await;
    let other = app.acquire(begin_req("other")).await;
    let status = app.complete("k", &other.lease_token, b"x").await.expect_err("foreign");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
    let status = app.complete("k", "lt_forged", b"x").await.expect_err("forged");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
}

async fn complete_of_an_absent_record_is_not_found(backend: Backend) {
    let app = spawn_app(backend).await;
    let status = app.complete("nope", "lt_x", b"x").await.expect_err("absent");
    assert_error(&status, Code::NotFound, "NOT_FOUND");
}

async fn largest_response_is_accepted(backend: Backend) {
    let app = spawn_app(backend).await;
    let acquired = app.acquire(begin_req("big")).await;
    let payload = vec![7u8; 1_048_576];
    app.complete("big", &acquired.lease_token, &payload).await.expect("1 MiB is allowed");
    let Outcome::Completed(replay) = app.begin(begin_req("big")).await.expect("begin") else {
        panic!("expected a replay");
    };
    assert_eq!(replay.response, payload);
}

async fn concurrent_completes_each_store_their_own_response(backend: Backend) {
    // With group commit these share batches: many keys, a repeat of one
    // Complete, and a stale token among them.
    let app = spawn_app(backend).await;
    let mut leases = Vec::new();
    for i in 0..32 {
        leases.push(app.acquire(begin_req(&format!("c-{i}"))).await);
    }
    let stale = leases[31].lease_token.clone();
    app.abort("c-31", &stale, "retry").await.expect("abort");
    let fresh = app.acquire(begin_req("c-31")).await;
    let mut calls = Vec::new();
    for (i, lease) in leases.iter().enumerate() {
        let token = if i == 31 { stale.clone() } else { lease.lease_token.clone() };
        for _ in 0..if i == 7 { 2 } else { 1 } {
            let mut client = app.client.clone();
            let token = token.clone();
            calls.push(tokio::spawn(async move {
                let request = pb::CompleteRequest {
                    namespace: NS.into(),
                    key: format!("c-{i}"),
                    lease_token: token,
                    response: format!("response {i}").into_bytes(),
                    ..Default::default()
                };
                (i, client.complete(request).await)
            }));
        }
    }
    for call in calls {
        let (i, answer) = call.await.expect("task");
        if i == 31 {
            assert_error(&answer.expect_err("stale token"), Code::FailedPrecondition, "LEASE_LOST");
        } else {
            answer.unwrap_or_else(|s| panic!("c-{i}: {s:?}"));
        }
    }
    for i in 0..31 {
        let Outcome::Completed(replay) = app.begin(begin_req(&format!("c-{i}"))).await.expect("begin") else {
            panic!("c-{i} not completed");
        };
        assert_eq!(replay.response, format!("response {i}").into_bytes());
    }
    app.complete("c-31", &fresh.lease_token, b"fresh").await.expect("the new holder completes");
}

crate::both_stores!(
    concurrent_completes_each_store_their_own_response,
    complete_stores_the_outcome,
    retried_complete_is_ok_and_changes_nothing,
    complete_after_another_attempt_took_over_is_lease_lost,
    complete_of_an_aborted_record_is_lease_lost,
    complete_after_the_lease_expired_is_lease_lost,
    complete_with_a_foreign_token_is_lease_lost,
    complete_of_an_absent_record_is_not_found,
    largest_response_is_accepted,
);

/// Group commit runs the Begins and Completes that queue together as one
/// statement and one transaction, each with its own answer and event; a
/// Begin of a key whose Complete is in the same batch runs after it and
/// replays it. The batch worker is held on a locked row so that the calls
/// queue up behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begins_and_completes_that_queue_together_commit_together() {
    use sqlx::{Connection, Row};
    let app = spawn_app_with(Backend::PostgresBatched, |config| config.database.group_commit_in_flight = 1).await;
    let mut leases = Vec::new();
    for i in 0..10 {
        leases.push(app.acquire(begin_req(&format!("c-{i}"))).await.lease_token);
    }
    let blocker = app.acquire(begin_req("blocker")).await.lease_token;

    let mut db = sqlx::PgConnection::connect(&app.database_url).await.expect("connect");
    sqlx::raw_sql("BEGIN").execute(&mut db).await.expect("begin");
    sqlx::query("SELECT 1 FROM idemd_records WHERE namespace = $1 AND key = 'blocker' FOR UPDATE")
        .bind(NS)
        .execute(&mut db)
        .await
        .expect("lock the blocker's row");
    let held = {
        let client = app.client.clone();
        tokio::spawn(async move { complete_call(client, "blocker", blocker).await })
    };
    eventually("the batch worker waits on the locked row", Duration::from_secs(10), || async {
        let mut c = sqlx::PgConnection::connect(&app.database_url).await.ok()?;
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut c)
        .await
        .ok()?;
        (waiting > 0).then_some(())
    })
    .await;

    let completes: Vec<_> = leases
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            let client = app.client.clone();
            tokio::spawn(async move { complete_call(client, &format!("c-{i}"), token).await })
        })
        .collect();
    let begins: Vec<_> = (0..10)
        .map(|i| format!("n-{i}"))
        .chain(["c-0".to_string()])
        .map(|key| {
            let mut client = app.client.clone();
            tokio::spawn(async move { (key.clone(), client.begin(begin_req(&key)).await) })
        })
        .collect();
    // Time for the calls to queue behind the held batch; one that came later
    // would only land in a later batch.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sqlx::raw_sql("COMMIT").execute(&mut db).await.expect("release the row");

    held.await.expect("task").expect("the held Complete");
    for complete in completes {
        complete.await.expect("task").expect("complete");
    }
    for begin in begins {
        let (key, answer) = begin.await.expect("task");
        let outcome = answer.unwrap_or_else(|s| panic!("{key}: {s:?}")).into_inner().outcome;
        match (key.as_str(), outcome) {
            ("c-0", Some(Outcome::Completed(replay))) => assert_eq!(replay.response, b"response c-0"),
            (key, Some(Outcome::Acquired(_))) if key.starts_with("n-") => {}
            (key, outcome) => panic!("{key}: {outcome:?}"),
        }
    }
    for i in 0..10 {
        let record = app.lookup(&format!("c-{i}")).await.expect("lookup");
        assert_eq!(record.state, pb::State::Completed as i32);
        assert_eq!(record.response, format!("response c-{i}").into_bytes());
    }
    // The transaction that wrote each COMPLETED event of c-* and ACQUIRED event of n-*.
    let events = sqlx::query(
        "SELECT kind, xmin::text AS tx FROM idemd_events WHERE namespace = $1 \
         AND ((kind = 2 AND key LIKE 'c-%') OR (kind = 1 AND key LIKE 'n-%'))",
    )
    .bind(NS)
    .fetch_all(&mut db)
    .await
    .expect("events");
    assert_eq!(events.len(), 20, "one event per transition");
    let transactions = |kind: i16| -> std::collections::HashSet<String> {
        events.iter().filter(|e| e.get::<i16, _>("kind") == kind).map(|e| e.get("tx")).collect()
    };
    assert!(
        !transactions(1).is_disjoint(&transactions(2)),
        "no Begin committed with a Complete: {:?} / {:?}",
        transactions(1),
        transactions(2)
    );
}

async fn complete_call(
    mut client: idemd::pb::idempotency_client::IdempotencyClient<tonic::transport::Channel>,
    key: &str,
    token: String,
) -> Result<pb::CompleteResponse, tonic::Status> {
    let request = pb::CompleteRequest {
        namespace: NS.into(),
        key: key.into(),
        lease_token: token,
        response: format!("response {key}").into_bytes(),
        ..Default::default()
    };
    client.complete(request).await.map(|r| r.into_inner())
}
