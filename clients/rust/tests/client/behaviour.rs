//! What the helper promises beyond the shared scenarios: the lease always
//! ends (a panic, a dropped call), bad input is refused before any call,
//! the knobs reach idemd, and the budgets end.

use std::time::{Duration, SystemTime};

use idemd_client::pb::{AbortedBy, State};
use idemd_client::{Cause, Client, ErrorKind, Failure, Policy, Response};
use tonic::Code;

use crate::helpers::*;

async fn assert_aborted_as_unknown(server: &Server, key: &str, reason: &str) {
    let record = lookup(server, key).await;
    assert_eq!(record.state(), State::Aborted, "{record:?}");
    assert!(record.outcome_unknown, "{record:?}");
    assert_eq!((record.aborted_by(), record.abort_reason.as_str()), (AbortedBy::Caller, reason));
}

/// An operation (or hook) with a bug.
fn panics<T>(why: &str) -> T {
    panic!("{why}")
}

#[tokio::test]
async fn a_panic_never_leaves_the_lease_held() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    let call = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .run_once("order-panic", b"fp", |_| async {
                    panics::<Result<Response, Failure<()>>>("a bug after the provider was called")
                })
                .await
        })
    };
    let panicked = call.await.expect_err("the panic goes on to the caller");
    assert!(panicked.is_panic());
    assert_aborted_as_unknown(&server, "order-panic", "the operation panicked").await;

    // The reconcile hook's panic too.
    let hook = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .run_once_with_reconcile(
                    "order-panic",
                    b"fp",
                    |_| async { panics::<Result<Option<Response>, ()>>("a bug in the lookup") },
                    |_| async { Ok(ok("{}")) },
                )
                .await
        }
    });
    assert!(hook.await.expect_err("the panic goes on").is_panic());
    assert_aborted_as_unknown(&server, "order-panic", "the reconcile hook panicked").await;
    assert_eq!(lookup(&server, "order-panic").await.attempt, 2);
}

#[tokio::test]
async fn a_dropped_call_ends_its_lease_at_once() {
    let server = start_idemd().await;
    // A lease far longer than the test: only the guard can end it in time.
    let client = client(&server, Policy { lease_ttl: Duration::from_secs(600), ..quick() });
    let (running, is_running) = tokio::sync::oneshot::channel();
    let call = client.run_once("order-dropped", b"fp", |_| async {
        let _ = running.send(());
        std::future::pending::<Result<Response, Failure<()>>>().await
    });
    let cut = tokio::select! {
        _ = call => false,
        _ = async { is_running.await.expect("runs"); } => true,
    };
    assert!(cut, "the call was cut off while its operation ran");
    for _ in 0..50 {
        if lookup(&server, "order-dropped").await.state() == State::Aborted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_aborted_as_unknown(&server, "order-dropped", "the caller stopped waiting while the operation ran").await;
}

#[tokio::test]
async fn invalid_arguments_are_refused_before_any_call() {
    let invalid_client = |result: Result<Client, idemd_client::Error>| {
        let error = result.expect_err("refused");
        assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}");
        error.to_string()
    };
    // Nothing listens there: an answer would be UNAVAILABLE, not these.
    let addr = format!("127.0.0.1:{}", free_port());
    assert!(invalid_client(Client::connect_lazy(&addr, "Payments", Policy::default())).contains("namespace"));
    assert!(invalid_client(Client::connect_lazy("idemd", "payments", Policy::default())).contains("address"));
    assert!(invalid_client(Client::connect_lazy("https://idemd:443", "payments", Policy::default())).contains("TLS"));
    let short = Policy { lease_ttl: Duration::from_millis(10), ..Policy::default() };
    assert!(invalid_client(Client::connect_lazy(&addr, "payments", short.clone())).contains("lease_ttl"));

    let client = Client::connect_lazy(&addr, "payments", Policy::default()).expect("valid");
    let never = |_| async { Ok::<_, Failure<&str>>(ok("{}")) };
    for (key, fingerprint, what) in
        [("", &b"fp"[..], "key"), ("a\u{7}b", b"fp", "control"), ("order-1", &[0; 65][..], "fingerprint")]
    {
        let error = client.run_once(key, fingerprint, never).await.expect_err("refused");
        assert_eq!(error.kind(), ErrorKind::InvalidArgument);
        assert!(matches!(error.cause(), Cause::Message(m) if m.contains(what)), "{error}");
    }
    let error = client.with_policy(short).run_once("order-1", b"fp", never).await.expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn an_unstorable_response_is_aborted_as_unknown() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    let error = client
        .run_once("order-bad-type", b"fp", |_| async {
            Ok::<_, Failure<&str>>(Response { body: b"{}".to_vec(), code: 201, content_type: "text/plain\n".into() })
        })
        .await
        .expect_err("the content type cannot be stored");
    assert_eq!(error.kind(), ErrorKind::OutcomeUnknown);
    assert!(error.to_string().contains("content type"), "{error}");
    assert_aborted_as_unknown(&server, "order-bad-type", "the operation's response cannot be stored").await;
}

#[tokio::test]
async fn addresses_with_and_without_scheme() {
    let server = start_idemd().await;
    for addr in [server.addr.clone(), format!("http://{}", server.addr), format!("http://{}/", server.addr)] {
        let client = Client::connect_lazy(&addr, NS, quick()).expect("address");
        let done = client.run_once(&addr, b"fp", |_| async { Ok::<_, Failure<()>>(ok("{}")) }).await;
        assert!(done.is_ok(), "{addr}: {done:?}");
    }
}

#[tokio::test]
async fn retention_and_lease_ttl_reach_idemd_per_call() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    let week = Duration::from_secs(7 * 86_400);
    let per_call = client.with_policy(Policy { retention: Some(week), lease_ttl: Duration::from_secs(90), ..quick() });
    let before = SystemTime::now();
    per_call
        .run_once("order-knobs", b"fp", |_| async {
            let record = lookup(&server, "order-knobs").await;
            let expires = record.lease_expires_at.and_then(|at| SystemTime::try_from(at).ok()).expect("a lease");
            assert!(expires > before + Duration::from_secs(80), "the lease TTL reached idemd: {record:?}");
            Ok::<_, Failure<()>>(ok("{}"))
        })
        .await
        .expect("done");
    let record = lookup(&server, "order-knobs").await;
    let expires = record.expires_at.and_then(|at| SystemTime::try_from(at).ok()).expect("expires_at");
    assert!(expires > before + week - Duration::from_secs(60), "{record:?}");
    assert!(expires < before + week + Duration::from_secs(60), "{record:?}");
    assert_eq!(client.policy().retention, None, "the client's own policy is unchanged");

    // Outside the server's range: idemd's INVALID_ARGUMENT, nothing ran.
    let error = client
        .with_policy(Policy { retention: Some(Duration::from_secs(60)), ..quick() })
        .run_once("order-short", b"fp", |_| async { Ok::<_, Failure<()>>(ok("{}")) })
        .await
        .expect_err("below the server's minimum");
    assert_eq!((error.kind(), error.code()), (ErrorKind::InvalidArgument, Some(Code::InvalidArgument)));
}

#[tokio::test]
async fn the_in_progress_budget_runs_out() {
    let server = start_idemd().await;
    let holder = client(&server, Policy { lease_ttl: Duration::from_secs(30), ..quick() });
    let (running, is_running) = tokio::sync::oneshot::channel();
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let held = tokio::spawn(async move {
        holder
            .run_once("order-busy", b"fp", |_| async {
                let _ = running.send(());
                let _ = finished.await;
                Ok::<_, Failure<()>>(ok("held"))
            })
            .await
    });
    is_running.await.expect("holding");
    let budget = Policy { wait: Duration::from_millis(300), in_progress_budget: Duration::from_secs(1), ..quick() };
    let started = std::time::Instant::now();
    let error = client(&server, budget)
        .run_once("order-busy", b"fp", |_| async { Ok::<_, Failure<()>>(ok("second")) })
        .await
        .expect_err("still held");
    assert_eq!((error.kind(), error.attempt()), (ErrorKind::InProgress, 0));
    assert!(started.elapsed() >= Duration::from_secs(1) && started.elapsed() < Duration::from_secs(5));
    finish.send(()).expect("holder waits");
    assert_eq!(held.await.expect("task").expect("holder").response, ok("held"));
}
