//! The reaper (a caller that crashed mid-operation) and the purger.

use std::time::Duration;

use idemd::pb;
use tonic::Code;

use crate::helpers::*;

async fn reaper_aborts_a_crashed_callers_lease(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_millis(100)).await;
    let mut request = begin_req("crash");
    request.lease_ttl = secs(1);
    // The caller acquires, maybe charges, and dies: no Complete, no Abort.
    let crashed = app.acquire(request.clone()).await;
    let record = eventually("the reaper aborts the lease", Duration::from_secs(10), || async {
        let record = app.lookup("crash").await.ok()?;
        (record.state == pb::State::Aborted as i32).then_some(record)
    })
    .await;
    assert_eq!(record.abort_reason, "lease expired");
    assert_eq!(record.aborted_by, pb::AbortedBy::Reaper as i32);
    assert_eq!(record.attempt, 1);

    // The retry completes below: its lease must outlast a busy machine's pauses.
    request.lease_ttl = secs(60);
    let retry = app.acquire(request).await;
    assert_eq!(retry.attempt, 2);
    assert_eq!(retry.downstream_key, crashed.downstream_key, "the provider dedupes the retry");
    let status = app.complete("crash", &crashed.lease_token, b"zombie").await.expect_err("old token");
    assert_error(&status, Code::FailedPrecondition, "LEASE_LOST");
    app.complete("crash", &retry.lease_token, b"ok").await.expect("complete");
}

async fn reaper_leaves_live_leases_alone(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_millis(50)).await;
    let acquired = app.acquire(begin_req("live")).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(app.lookup("live").await.expect("lookup").state, pb::State::InProgress as i32);
    app.complete("live", &acquired.lease_token, b"ok").await.expect("complete");
}

async fn purger_deletes_expired_records(backend: Backend) {
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

    eventually("the purger deletes the expired record", Duration::from_secs(10), || async {
        (app.row_count(NS, "short").await == 0).then_some(())
    })
    .await;
    assert_eq!(app.row_count(NS, "kept").await, 1, "live records stay");
}

crate::both_stores!(
    reaper_aborts_a_crashed_callers_lease,
    reaper_leaves_live_leases_alone,
    purger_deletes_expired_records,
);

/// The live-leases index serves the reaper and nothing else: a one-key
/// transition of an in-flight attempt (it says `state = 1` and
/// `lease_expires_at > now()`) is planned on the primary key even with
/// statistics taken while no lease was in flight, when the index looks
/// empty and a walk of it free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_reaper_is_planned_on_the_live_leases_index() {
    use sqlx::Connection;
    let app = spawn_app(Backend::Postgres).await;
    for i in 0..20 {
        let key = format!("done-{i}");
        let lease = app.acquire(begin_req(&key)).await;
        app.complete(&key, &lease.lease_token, b"ok").await.expect("complete");
    }
    let mut db = sqlx::PgConnection::connect(&app.database_url).await.expect("connect");
    sqlx::raw_sql("ANALYZE idemd_records; SET enable_seqscan = off").execute(&mut db).await.expect("analyze");
    let plan = |sql: &'static str| {
        let url = app.database_url.clone();
        async move {
            let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
            sqlx::raw_sql("SET enable_seqscan = off").execute(&mut db).await.expect("set");
            let lines: Vec<String> = sqlx::query_scalar(sql).fetch_all(&mut db).await.expect("explain");
            lines.join("\n")
        }
    };
    let transition = plan(
        "EXPLAIN UPDATE idemd_records SET updated_at = now() WHERE namespace = 'ns' AND key = 'k' \
         AND state = 1 AND lease_token = 't' AND lease_expires_at > now() AND expires_at > now()",
    )
    .await;
    assert!(!transition.contains("live_leases"), "{transition}");
    let reaper = plan(
        "EXPLAIN SELECT namespace, key FROM idemd_records \
         WHERE state = 1 AND completed_at IS NULL AND lease_expires_at <= now() AND expires_at > now() \
         ORDER BY lease_expires_at LIMIT 100 FOR UPDATE SKIP LOCKED",
    )
    .await;
    assert!(reaper.contains("idemd_records_live_leases"), "{reaper}");
}
