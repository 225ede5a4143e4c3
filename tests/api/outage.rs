//! Readiness follows the database: a Postgres cluster of the test's own is
//! stopped and started again under a running idemd, which is not restarted.

use std::time::Duration;

use idemd::pb::begin_response::Outcome;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::*;
use crate::pg_cluster::Cluster;
use crate::validation::{frame, status_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_postgres_outage_without_restart() {
    let cluster = Cluster::new("outage");
    let database_url = fresh_postgres_database(&cluster.url()).await;
    let app = spawn_on(test_config(&database_url)).await;
    app.acquire(begin_req("before")).await;

    cluster.stop_immediately();
    app.wait_for_readiness(ServingStatus::NotServing, Duration::from_secs(20)).await;
    // Fail closed: never `acquired` while the store cannot confirm it.
    for key in ["during-1", "during-2", "before"] {
        let status = app.begin(begin_req(key)).await.expect_err("store is down");
        assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");
    }
    // Liveness stays SERVING: the process is fine, only the store is not.
    let live = app
        .health()
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("liveness")
        .into_inner();
    assert_eq!(live.status, ServingStatus::Serving as i32);

    cluster.start();
    app.wait_for_readiness(ServingStatus::Serving, Duration::from_secs(30)).await;
    let acquired = eventually("Begin succeeds again", Duration::from_secs(20), || async {
        match app.begin(begin_req("after")).await {
            Ok(Outcome::Acquired(lease)) => Some(lease),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(status) => {
                assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");
                None
            }
        }
    })
    .await;
    assert_eq!(acquired.attempt, 1);
    // What was acquired before the outage is still held.
    assert!(matches!(app.begin(begin_req("before")).await.expect("begin"), Outcome::InProgress(_)));
}

/// Holds the database's write lock from a side connection, as a stuck
/// migration or a runaway transaction would.
async fn hold_write_lock(app: &TestApp) -> Box<dyn std::any::Any + Send> {
    use sqlx::Connection;
    match app.backend {
        Backend::Postgres | Backend::PostgresBatched | Backend::PgBouncer => {
            let mut connection = sqlx::PgConnection::connect(&app.database_url).await.expect("connect");
            sqlx::query("BEGIN").execute(&mut connection).await.expect("begin");
            sqlx::query("LOCK TABLE idemd_records IN EXCLUSIVE MODE").execute(&mut connection).await.expect("lock");
            Box::new(connection)
        }
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&app.database_url).await.expect("connect");
            sqlx::query("BEGIN IMMEDIATE").execute(&mut connection).await.expect("lock");
            Box::new(connection)
        }
    }
}

async fn begin_fails_closed_when_the_store_does_not_answer(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.database.store_timeout = Duration::from_millis(500)).await;
    let held = app.acquire(begin_req("held")).await;
    let lock = hold_write_lock(&app).await;
    let mut stuck = begin_req("stuck");
    stuck.attempt_nonce = "nonce-1".into();
    let started = tokio::time::Instant::now();
    let status = app.begin(stuck.clone()).await.expect_err("the store cannot confirm");
    assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");
    assert!(started.elapsed() < Duration::from_secs(5), "answered after the store timeout, not hanging");
    let status = app.complete("held", &held.lease_token, b"ok").await.expect_err("cannot store");
    assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");
    drop(lock);
    // UNAVAILABLE means "not confirmed": the statement may still have landed
    // after the answer. Retrying converges either way: the same nonce gets the
    // same first attempt back, the same token completes once.
    let acquired = app.acquire(stuck.clone()).await;
    assert_eq!(acquired.attempt, 1);
    assert_eq!(app.acquire(stuck).await, acquired);
    app.complete("held", &held.lease_token, b"ok").await.expect("complete once the store answers");
    let record = app.lookup("held").await.expect("lookup");
    assert_eq!((record.state, record.response), (idemd::pb::State::Completed as i32, b"ok".to_vec()));
}

/// SQLite runs a statement it has started to its end even when the call that
/// sent it is gone, and wakes waiters in-process. (On Postgres the wake-up is
/// a NOTIFY in the statement's own transaction.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_hear_a_complete_whose_caller_hung_up_before_it_landed() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.database.store_timeout = Duration::from_secs(10)).await;
    let held = app.acquire(begin_req("k")).await;
    let mut waiting = begin_req("k");
    waiting.wait_timeout = secs(60);
    let mut client = app.client.clone();
    let waiter = tokio::spawn(async move { client.begin(waiting).await });
    eventually("parked", Duration::from_secs(5), || async {
        (scrape(app.metrics_addr).await.get("idemd_waiters") == Some(&1.0)).then_some(())
    })
    .await;
    // The holder's Complete reaches the store, which is busy, and the holder
    // hangs up before it lands (a deadline, a crash).
    let lock = hold_write_lock(&app).await;
    let complete = app.complete("k", &held.lease_token, b"ok");
    assert!(tokio::time::timeout(Duration::from_secs(1), complete).await.is_err(), "the store is locked");
    drop(lock);
    let record = eventually("the Complete landed all the same", Duration::from_secs(10), || async {
        app.lookup("k").await.ok().filter(|r| r.state == idemd::pb::State::Completed as i32)
    })
    .await;
    assert_eq!(record.response, b"ok");
    // Well before the waiters' safety-net re-check (15-25 s).
    let answered = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("the waiter was woken");
    let outcome = answered.expect("task").expect("answered").into_inner().outcome;
    assert!(matches!(outcome, Some(Outcome::Completed(_))), "{outcome:?}");
}

/// A unary call over a bare HTTP/2 connection, with `grpc-timeout`: the
/// status idemd itself answers. (A tonic client cuts the call short on its
/// own side at the deadline, with CANCELLED.)
async fn call_with_timeout(app: &TestApp, path: &str, message: Vec<u8>, timeout: &'static str) -> tonic::Status {
    let stream = tokio::net::TcpStream::connect(app.addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let body = frame(0, u32::try_from(message.len()).expect("a small message"), &message);
    let request = http::Request::post(format!("http://{}{path}", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("request");
    status_of(sender.send_request(request).await.expect("an HTTP response")).await
}

async fn a_store_call_past_the_callers_deadline_is_deadline_exceeded(backend: Backend) {
    use prost::Message;
    // The store would be given 10 s; the caller allows one.
    let app = spawn_app_with(backend, |c| c.database.store_timeout = Duration::from_secs(10)).await;
    let held = app.acquire(begin_req("held")).await;
    let lock = hold_write_lock(&app).await;
    let started = tokio::time::Instant::now();
    let begin = begin_req("stuck").encode_to_vec();
    let status = call_with_timeout(&app, "/idemd.v1.Idempotency/Begin", begin, "1S").await;
    assert_error(&status, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    let complete = idemd::pb::CompleteRequest {
        namespace: NS.into(),
        key: "held".into(),
        lease_token: held.lease_token.clone(),
        response: b"ok".to_vec(),
        ..Default::default()
    };
    let status = call_with_timeout(&app, "/idemd.v1.Idempotency/Complete", complete.encode_to_vec(), "1S").await;
    assert_error(&status, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    assert!(started.elapsed() < Duration::from_secs(5), "answered at the deadlines, not at the store timeout");
    drop(lock);
}

/// A statement the database refuses as a data or programming error is a
/// bug: INTERNAL, never UNAVAILABLE (a caller would retry it for ever).
async fn database_errors_that_are_bugs_answer_internal(backend: Backend) {
    let app = spawn_app(backend).await;
    // A CHECK violation (SQLite: a constraint trigger) for one key.
    let poison = match backend {
        Backend::Sqlite => {
            "CREATE TRIGGER poison BEFORE INSERT ON idemd_records WHEN NEW.key = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'poison'); END"
        }
        _ => "ALTER TABLE idemd_records ADD CONSTRAINT poison CHECK (key <> 'poison')",
    };
    app.execute_sql(poison).await;
    let status = app.begin(begin_req("poison")).await.expect_err("refused by the database");
    assert_error(&status, Code::Internal, "INTERNAL");
    app.acquire(begin_req("fine")).await;
    // A statement that no longer matches the schema (SQLSTATE 42703; SQLite: no such column).
    app.execute_sql("ALTER TABLE idemd_records RENAME COLUMN fingerprint TO fingerprint_renamed").await;
    let status = app.begin(begin_req("after the rename")).await.expect_err("refused by the database");
    assert_error(&status, Code::Internal, "INTERNAL");
    let status = app.lookup("fine").await.expect_err("refused by the database");
    assert_error(&status, Code::Internal, "INTERNAL");
}

crate::both_stores!(
    database_errors_that_are_bugs_answer_internal,
    begin_fails_closed_when_the_store_does_not_answer,
    a_store_call_past_the_callers_deadline_is_deadline_exceeded
);
