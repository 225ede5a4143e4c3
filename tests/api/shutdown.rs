//! SIGTERM on the real binary: readiness flips, in-flight calls finish, new
//! calls are refused, and the process exits 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
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
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_idemd"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(["--database-url", &format!("sqlite://{}", dir.path().join("idemd.db").display())])
        .args(["--shutdown-grace", "10s"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start idemd");
    let stderr = child.stderr.take().expect("stderr");
    let mut child = KillOnDrop(child);
    // The server logs the address it bound.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("addr=").nth(1) {
                let _ = addr_tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(60)).expect("idemd logs its address");
    let url = format!("http://{addr}");
    let channel = tonic::transport::Channel::from_shared(url.clone()).expect("uri").connect().await.expect("connect");
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
    let holder = match client.begin(begin_req("k")).await.expect("begin").into_inner().outcome {
        Some(Outcome::Acquired(lease)) => lease,
        other => panic!("{other:?}"),
    };
    // An in-flight call: a Begin parked waiting for the holder.
    let mut waiter_client = client.clone();
    let waiter = tokio::spawn(async move {
        let mut request = begin_req("k");
        request.wait_timeout = secs(30);
        waiter_client.begin(request).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let killed = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().expect("kill");
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
    let fresh = tonic::transport::Channel::from_shared(url).expect("uri").connect_timeout(Duration::from_secs(2));
    let refused = match fresh.connect().await {
        Err(_) => true,
        Ok(channel) => IdempotencyClient::new(channel).begin(begin_req("new")).await.is_err(),
    };
    assert!(refused, "a new call after SIGTERM must be refused");

    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < until, "idemd did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0), "exit code");
    drop(holder);
}

/// Never leaves an idemd process behind when the test fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
