//! SIGTERM on the real binary: readiness flips, in-flight calls finish, new
//! calls are refused, and the process exits 0.

use std::time::Duration;

use idemd::pb::begin_response::Outcome;
use idemd::pb::idempotency_client::IdempotencyClient;
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_and_exits_zero() {
    let mut idemd = Binary::start(&["--shutdown-grace", "10s"], &[]);
    let channel = tonic::transport::Channel::from_shared(idemd.url()).expect("uri").connect().await.expect("connect");
    let mut health = HealthClient::new(channel.clone());
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = health
            .check(HealthCheckRequest { service: idemd::pb::SERVICE_NAME.into() })
            .await
            .map(|r| r.into_inner().status)
            .ok();
        if ready == Some(ServingStatus::Serving as i32) {
            break;
        }
        assert!(Instant::now() < until, "idemd never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut readiness =
        health.watch(HealthCheckRequest { service: idemd::pb::SERVICE_NAME.into() }).await.expect("watch").into_inner();
    assert_eq!(readiness.message().await.expect("watch").expect("status").status, ServingStatus::Serving as i32);

    let mut client = IdempotencyClient::new(channel);
    let outcome = client.begin(begin_req("k")).await.expect("begin").into_inner().outcome;
    assert!(matches!(outcome, Some(Outcome::Acquired(_))), "{outcome:?}");
    // An in-flight call: a Begin parked waiting for the holder.
    let mut waiter_client = client.clone();
    let waiter = tokio::spawn(async move {
        let mut request = begin_req("k");
        request.wait_timeout = secs(30);
        waiter_client.begin(request).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let pid = idemd.child.id().to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(killed.success());

    // Readiness goes NOT_SERVING first.
    let update = tokio::time::timeout(Duration::from_secs(10), readiness.message())
        .await
        .expect("a readiness update within 10 s")
        .expect("the watch stream")
        .expect("an update before the stream ends");
    assert_eq!(update.status, ServingStatus::NotServing as i32);
    // An open Watch is an in-flight call too; a prober closes it once it has its answer.
    drop(readiness);
    // The in-flight call finishes with an answer, not an error.
    let answer = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter is answered during the drain")
        .expect("task")
        .expect("an OK answer");
    assert!(matches!(answer.into_inner().outcome, Some(Outcome::InProgress(_))));

    // New calls are refused.
    let fresh =
        tonic::transport::Channel::from_shared(idemd.url()).expect("uri").connect_timeout(Duration::from_secs(2));
    let refused = match fresh.connect().await {
        Err(_) => true,
        Ok(channel) => IdempotencyClient::new(channel).begin(begin_req("new")).await.is_err(),
    };
    assert!(refused, "a new call after SIGTERM must be refused");

    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = idemd.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < until, "idemd did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0), "exit code");
}
