//! The Rust client's exactly-once helper against a real server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idemd_client::{Attempt, Client, ErrorKind, Failure, Policy, Response, fingerprint};

use crate::helpers::*;

fn client(app: &TestApp, policy: Policy) -> Client {
    Client::new(app.channel(), NS, policy).expect("a valid namespace and policy")
}

fn quick() -> Policy {
    Policy {
        lease_ttl: Duration::from_secs(2),
        wait: Duration::from_secs(2),
        in_progress_budget: Duration::from_secs(15),
        ..Policy::default()
    }
}

fn ok(body: &str) -> Response {
    Response { body: body.as_bytes().to_vec(), code: 201, content_type: "application/json".into() }
}

async fn first_call_runs_and_a_repeat_replays(backend: Backend) {
    let app = spawn_app(backend).await;
    let client = client(&app, quick());
    let runs = AtomicU32::new(0);
    let fp = fingerprint(&[("amount", b"1000")]);
    let operation = |attempt: Attempt| {
        runs.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, Failure<()>>(ok(&attempt.downstream_key)) }
    };
    let first = client.run_once("order-1", &fp, operation).await.expect("first");
    assert!(!first.replayed);
    assert_eq!(first.attempt, 1);
    assert!(String::from_utf8_lossy(&first.response.body).starts_with("idk_"));
    let again = client.run_once("order-1", &fp, operation).await.expect("repeat");
    assert!(again.replayed);
    assert_eq!(again.response, first.response);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let other = client.run_once("order-1", &fingerprint(&[("amount", b"2000")]), operation).await;
    assert_eq!(other.map_err(|e| e.kind()).err(), Some(ErrorKind::FingerprintMismatch));
}

async fn concurrent_duplicates_run_it_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let client = client(&app, quick());
    let runs = Arc::new(AtomicU32::new(0));
    let calls = (0..8).map(|_| {
        let (client, runs) = (client.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            client
                .run_once("order-2", b"fp", |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, Failure<()>>(ok("charged"))
                })
                .await
        })
    });
    let results = futures::future::join_all(calls).await;
    for result in results {
        let done = result.expect("task").expect("every duplicate gets the answer");
        assert_eq!(done.response, ok("charged"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

async fn a_retryable_failure_aborts_and_the_retry_runs_again(backend: Backend) {
    let app = spawn_app(backend).await;
    let client = client(&app, quick());
    let keys = std::sync::Mutex::new(Vec::new());
    let result = client
        .run_once("order-3", b"fp", |attempt| {
            keys.lock().expect("keys").push(attempt.downstream_key);
            async { Err::<Response, _>(Failure::Retryable("provider 503")) }
        })
        .await;
    let error = result.expect_err("a retryable failure");
    assert_eq!((error.kind(), error.operation_error()), (ErrorKind::Retryable, Some(&"provider 503")));
    let record = app.lookup("order-3").await.expect("lookup");
    assert_eq!(record.state, idemd::pb::State::Aborted as i32);
    let done = client
        .run_once("order-3", b"fp", |attempt| {
            keys.lock().expect("keys").push(attempt.downstream_key);
            async { Ok::<_, Failure<()>>(ok("charged")) }
        })
        .await
        .expect("retry");
    assert_eq!((done.replayed, done.attempt), (false, 2));
    let keys = keys.lock().expect("keys");
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1], "both attempts send the provider the same key");
}

async fn a_final_failure_is_stored_and_replayed(backend: Backend) {
    let app = spawn_app(backend).await;
    let client = client(&app, quick());
    let declined = Response {
        body: b"{\"error\":\"card_declined\"}".to_vec(),
        code: 402,
        content_type: "application/json".into(),
    };
    let runs = AtomicU32::new(0);
    for expect_replay in [false, true] {
        let stored = declined.clone();
        let done = client
            .run_once("order-4", b"fp", |_| {
                runs.fetch_add(1, Ordering::SeqCst);
                async move { Err::<Response, _>(Failure::<()>::Final(stored)) }
            })
            .await
            .expect("a final failure is an answer");
        assert_eq!(done.replayed, expect_replay);
        assert_eq!(done.response, declined);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

async fn a_long_operation_keeps_its_lease_through_heartbeats(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_millis(100)).await;
    let policy =
        Policy { lease_ttl: Duration::from_secs(1), in_progress_budget: Duration::from_millis(300), ..quick() };
    let client = client(&app, policy);
    let runs = Arc::new(AtomicU32::new(0));
    let long = {
        let (client, runs) = (client.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            client
                .run_once("order-5", b"fp", |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Ok::<_, Failure<()>>(ok("slow charge"))
                })
                .await
        })
    };
    // Three lease lengths later the lease is still held: no duplicate runs.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let duplicate = client
            .run_once("order-5", b"fp", |_| {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Failure<()>>(ok("duplicate")) }
            })
            .await;
        match duplicate {
            Err(busy) if busy.kind() == ErrorKind::InProgress => {}
            Ok(done) => assert!(done.replayed && done.response == ok("slow charge"), "{done:?}"),
            Err(other) => panic!("{other:?}"),
        }
    }
    let done = long.await.expect("task").expect("completed without losing the lease");
    assert_eq!(done.response, ok("slow charge"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

async fn a_crashed_caller_is_recovered_after_its_lease_expires(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.reaper_interval = Duration::from_millis(100)).await;
    let policy = Policy { lease_ttl: Duration::from_secs(1), ..quick() };
    let client = client(&app, policy);
    let first_key = Arc::new(std::sync::Mutex::new(String::new()));
    // The caller charges, then its process dies: nothing of it runs again,
    // not its heartbeats and not even its destructors (a dropped call would
    // end its lease at once), so only the lease's expiry frees the key.
    let (running, is_running) = tokio::sync::oneshot::channel();
    let mut crashed = Box::pin(client.run_once("order-6", b"fp", |attempt| {
        *first_key.lock().expect("key") = attempt.downstream_key;
        async move {
            let _ = running.send(());
            std::future::pending::<Result<Response, Failure<()>>>().await
        }
    }));
    tokio::select! {
        _ = &mut crashed => panic!("the call returned"),
        _ = is_running => {}
    }
    std::mem::forget(crashed);
    let done = client
        .run_once("order-6", b"fp", |attempt| {
            let first = first_key.lock().expect("key").clone();
            async move {
                assert_eq!(attempt.downstream_key, first, "the provider can dedupe the charge");
                Ok::<_, Failure<()>>(ok("recovered"))
            }
        })
        .await
        .expect("recovered after the lease expired");
    assert_eq!((done.replayed, done.attempt), (false, 2));
}

crate::both_stores!(
    first_call_runs_and_a_repeat_replays,
    concurrent_duplicates_run_it_once,
    a_retryable_failure_aborts_and_the_retry_runs_again,
    a_final_failure_is_stored_and_replayed,
    a_long_operation_keeps_its_lease_through_heartbeats,
    a_crashed_caller_is_recovered_after_its_lease_expires,
);
