//! One test per scenario of `clients/testdata/conformance.json`, named
//! after its id; `every_conformance_scenario_has_a_test` keeps the list and
//! the tests in step.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use idemd_client::pb::{AbortedBy, EventKind, State};
use idemd_client::{Attempt, Failure, Policy, Response, entity_key, fingerprint};
use idemd_client::{Client, ErrorKind};
use tokio::sync::oneshot;
use tonic::Code;

use crate::helpers::*;

fn fp(amount: &str) -> Vec<u8> {
    fingerprint(&[("amount", amount.as_bytes()), ("currency", b"EUR")])
}

#[tokio::test]
async fn first_run_stores_and_replays() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    let runs = Runs::default();
    let charge = |attempt: Attempt| {
        runs.add(attempt);
        async { Ok::<_, Failure<()>>(ok(r#"{"charge":"ch_1"}"#)) }
    };
    let first = client.run_once("order-1", &fp("1000"), charge).await.expect("first run");
    assert_eq!((first.replayed, first.reconciled, first.attempt), (false, false, 1));
    assert_eq!(first.response, ok(r#"{"charge":"ch_1"}"#));
    let attempt = runs.get(0);
    assert_eq!((attempt.attempt, attempt.previous.as_ref()), (1, None));
    let hex = attempt.downstream_key.strip_prefix("idk_").expect("idk_ prefix");
    assert!(hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{hex}");

    let second = client.run_once("order-1", &fp("1000"), charge).await.expect("second run");
    assert_eq!((second.replayed, second.attempt), (true, 1));
    assert_eq!(second.response, first.response, "body, code and content type replayed");
    assert_eq!(runs.count(), 1);
    let record = lookup(&server, "order-1").await;
    assert_eq!(record.state(), State::Completed);
    assert_eq!(record.downstream_key, attempt.downstream_key);
}

#[tokio::test]
async fn concurrent_duplicate_waits_for_the_stored_response() {
    let server = start_idemd().await;
    let runs = Arc::new(AtomicU32::new(0));
    let (started, is_running) = oneshot::channel();
    let (release, released) = oneshot::channel::<()>();
    let holder = {
        let (client, runs) = (client(&server, quick()), Arc::clone(&runs));
        tokio::spawn(async move {
            client
                .run_once("order-dup", &fp("1000"), |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = started.send(());
                    let _ = released.await;
                    Ok::<_, Failure<()>>(ok(r#"{"charge":"ch_dup"}"#))
                })
                .await
        })
    };
    is_running.await.expect("the holder runs");
    // A wait longer than the holder takes: one Begin waits server-side and
    // is woken by the holder's Complete.
    let waiter = {
        let (client, runs) = (client(&server, Policy { wait: Duration::from_secs(10), ..quick() }), Arc::clone(&runs));
        tokio::spawn(async move {
            client
                .run_once("order-dup", &fp("1000"), |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Failure<()>>(ok(r#"{"charge":"ch_second"}"#))
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.send(()).expect("the holder waits");
    let held = holder.await.expect("holder task").expect("holder");
    let waited = waiter.await.expect("waiter task").expect("waiter");
    assert!(!held.replayed && waited.replayed, "{held:?} {waited:?}");
    assert_eq!(waited.response, ok(r#"{"charge":"ch_dup"}"#));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The caller's own error type for a decline, as a payment SDK has it.
#[derive(Debug, PartialEq)]
struct CardDeclined(String);

#[tokio::test]
async fn final_failure_is_stored_and_replayed() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    let runs = Runs::default();
    let declined =
        Response { body: br#"{"error":"card_declined"}"#.to_vec(), code: 402, content_type: "application/json".into() };
    let decline = |attempt: Attempt| {
        runs.add(attempt);
        let declined = declined.clone();
        async move { Err::<Response, _>(Failure::<()>::Final(declined)) }
    };
    let first = client.run_once("order-declined", &fp("1000"), decline).await.expect("a stored outcome");
    assert_eq!((first.replayed, &first.response), (false, &declined));
    let record = lookup(&server, "order-declined").await;
    assert_eq!((record.state(), record.response_code), (State::Completed, 402));

    // Every later run gets the same final failure, as the caller's own
    // error type when asked for it: the fresh one and the replays alike.
    let as_error = |stored: &Response| {
        (stored.code == 402).then(|| CardDeclined(String::from_utf8_lossy(&stored.body).into_owned()))
    };
    assert_eq!(first.into_result(as_error), Err(CardDeclined(r#"{"error":"card_declined"}"#.into())));
    for _ in 0..2 {
        let again = client.run_once("order-declined", &fp("1000"), decline).await.expect("replay");
        assert_eq!((again.replayed, again.attempt), (true, 1));
        assert_eq!(again.into_result(as_error), Err(CardDeclined(r#"{"error":"card_declined"}"#.into())));
    }
    assert_eq!(runs.count(), 1);
    let charged = Done200::done();
    assert_eq!(charged.into_result(as_error), Ok(ok("{}")), "a success is no error");
}

/// A success, for `into_result`'s other side.
struct Done200;

impl Done200 {
    fn done() -> idemd_client::Done {
        idemd_client::Done { response: ok("{}"), replayed: true, reconciled: false, attempt: 1 }
    }
}

#[tokio::test]
async fn retryable_failure_is_aborted_and_rerun() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    let runs = Runs::default();
    let error = client
        .run_once("order-503", &fp("1000"), |attempt| {
            runs.add(attempt);
            async { Err::<Response, _>(Failure::Retryable("provider answered 503")) }
        })
        .await
        .expect_err("a retryable failure");
    assert_eq!((error.kind(), error.key(), error.attempt()), (ErrorKind::Retryable, "order-503", 1));
    assert_eq!(error.operation_error(), Some(&"provider answered 503"), "the cause is kept");
    assert!(error.to_string().contains("order-503") && error.to_string().contains("503"), "{error}");
    let record = lookup(&server, "order-503").await;
    assert_eq!(
        (record.state(), record.outcome_unknown, record.aborted_by()),
        (State::Aborted, false, AbortedBy::Caller)
    );

    let done = client
        .run_once("order-503", &fp("1000"), |attempt| {
            runs.add(attempt);
            async { Ok::<_, Failure<&str>>(ok(r#"{"charge":"ch_2"}"#)) }
        })
        .await
        .expect("the rerun");
    assert_eq!((done.attempt, done.replayed), (2, false));
    let (first, second) = (runs.get(0), runs.get(1));
    assert_eq!(second.downstream_key, first.downstream_key);
    let previous = second.previous.expect("attempt 2 says how attempt 1 ended");
    assert_eq!((previous.attempt, previous.outcome_unknown), (1, false));
}

#[tokio::test]
async fn unknown_outcome_is_aborted_as_unknown() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    let runs = Runs::default();
    let error = client
        .run_once("order-timeout", &fp("1000"), |attempt| {
            runs.add(attempt);
            async { Err::<Response, _>(Failure::OutcomeUnknown("provider did not answer within 10 s")) }
        })
        .await
        .expect_err("an unknown outcome");
    assert_eq!((error.kind(), error.attempt()), (ErrorKind::OutcomeUnknown, 1));
    assert_eq!(error.into_operation_error().ok(), Some("provider did not answer within 10 s"));
    let record = lookup(&server, "order-timeout").await;
    assert_eq!((record.state(), record.outcome_unknown), (State::Aborted, true));

    client
        .run_once("order-timeout", &fp("1000"), |attempt| {
            runs.add(attempt);
            async { Ok::<_, Failure<&str>>(ok("{}")) }
        })
        .await
        .expect("attempt 2");
    let previous = runs.get(1).previous.expect("attempt 2 says how attempt 1 ended");
    assert_eq!((previous.attempt, previous.aborted_by, previous.outcome_unknown), (1, AbortedBy::Caller, true));
    assert!(previous.ended_at.is_some_and(|at| at <= SystemTime::now() + Duration::from_secs(5)));
}

#[tokio::test]
async fn reconcile_hook_completes_without_running() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    // Attempt 1 of a key times out at the provider (which charged).
    let unknown_first = |key: &'static str| {
        let client = client.clone();
        async move {
            let first = client
                .run_once(key, &fp("1000"), |_| async { Err::<Response, _>(Failure::OutcomeUnknown("timeout")) })
                .await;
            assert_eq!(first.map_err(|e| e.kind()).err(), Some(ErrorKind::OutcomeUnknown));
        }
    };

    // Found: stored, returned as reconciled; the operation does not run.
    unknown_first("order-found").await;
    let (runs, asked) = (Runs::default(), Runs::default());
    let done = client
        .run_once_with_reconcile(
            "order-found",
            &fp("1000"),
            |attempt| {
                asked.add(attempt);
                async { Ok::<_, &str>(Some(ok(r#"{"charge":"ch_found"}"#))) }
            },
            |attempt| {
                runs.add(attempt);
                async { Ok(ok(r#"{"charge":"ch_second"}"#)) }
            },
        )
        .await
        .expect("reconciled");
    assert_eq!((done.reconciled, done.replayed, done.attempt), (true, false, 2));
    assert_eq!(done.response, ok(r#"{"charge":"ch_found"}"#));
    assert_eq!((runs.count(), asked.count()), (0, 1));
    assert!(asked.get(0).previous.is_some_and(|previous| previous.outcome_unknown));
    let replayed = client
        .run_once("order-found", &fp("1000"), |_| async { Ok::<_, Failure<()>>(ok("{}")) })
        .await
        .expect("replay");
    assert_eq!((replayed.replayed, replayed.response), (true, ok(r#"{"charge":"ch_found"}"#)));

    // None: the operation runs.
    unknown_first("order-none").await;
    let (runs, asked) = (Runs::default(), Runs::default());
    let done = client
        .run_once_with_reconcile(
            "order-none",
            &fp("1000"),
            |attempt| {
                asked.add(attempt);
                async { Ok::<_, &str>(None) }
            },
            |attempt| {
                runs.add(attempt);
                async { Ok(ok(r#"{"charge":"ch_ran"}"#)) }
            },
        )
        .await
        .expect("ran");
    assert_eq!((done.reconciled, done.attempt, runs.count(), asked.count()), (false, 2, 1, 1));

    // The hook fails: nothing runs, and the question stays open.
    unknown_first("order-hook-fails").await;
    let runs = Runs::default();
    let error = client
        .run_once_with_reconcile(
            "order-hook-fails",
            &fp("1000"),
            |_| async { Err::<Option<Response>, _>("provider search unavailable") },
            |attempt| {
                runs.add(attempt);
                async { Ok(ok("{}")) }
            },
        )
        .await
        .expect_err("the hook failed");
    assert_eq!(
        (error.kind(), error.operation_error()),
        (ErrorKind::OutcomeUnknown, Some(&"provider search unavailable"))
    );
    assert_eq!(runs.count(), 0);
    let record = lookup(&server, "order-hook-fails").await;
    assert_eq!((record.state(), record.outcome_unknown, record.attempt), (State::Aborted, true, 2));
}

#[tokio::test]
async fn lost_begin_reply_retried_with_the_same_nonce_gets_the_same_lease() {
    let server = start_idemd().await;
    let lossy = proxy(&server.addr, Fault::LoseFirstBeginReply).await;
    let client = Client::connect_lazy(&lossy.addr, NS, quick()).expect("address");
    let runs = Runs::default();
    let done = client
        .run_once("order-nonce", &fp("1000"), |attempt| {
            runs.add(attempt);
            async { Ok::<_, Failure<()>>(ok(r#"{"charge":"ch_nonce"}"#)) }
        })
        .await
        .expect("the retried Begin acquired");
    assert_eq!((done.attempt, runs.count()), (1, 1));
    let begins = lossy.begins.lock().expect("begins").clone();
    assert_eq!(begins.len(), 2, "the lost Begin and its retry: {begins:?}");
    let (lost, retried) = (&begins[0], &begins[1]);
    assert!(!lost.0.attempt_nonce.is_empty());
    assert_eq!(retried.0.attempt_nonce, lost.0.attempt_nonce, "the retry carries the same nonce");
    let token = |reply: &Option<idemd_client::pb::BeginResponse>| match reply.as_ref().and_then(|r| r.outcome.clone()) {
        Some(idemd_client::pb::begin_response::Outcome::Acquired(lease)) => (lease.lease_token, lease.attempt),
        other => panic!("want an acquired lease, got {other:?}"),
    };
    let (first_token, first_attempt) = token(&lost.1);
    assert_eq!(
        token(&retried.1),
        (first_token, first_attempt),
        "idemd acted on the lost Begin; the retry got its lease"
    );
    // No orphaned lease, no attempt 2.
    assert_eq!(history(&server, "order-nonce").await, [EventKind::Acquired, EventKind::Completed]);
}

#[tokio::test]
async fn heartbeats_keep_a_long_operation_alive() {
    let server = start_idemd().await;
    let client = client(&server, Policy { lease_ttl: Duration::from_secs(1), ..quick() });
    let midway = Mutex::new(None);
    let intruder = Mutex::new(None);
    let done = client
        .run_once("order-long", &fp("1000"), |_| async {
            tokio::time::sleep(Duration::from_millis(1800)).await;
            // Past the 1 s TTL (and the 100 ms reaper) the lease is still ours.
            *midway.lock().expect("midway") = Some(lookup(&server, "order-long").await);
            let busy = Policy { wait: Duration::ZERO, in_progress_budget: Duration::ZERO, ..quick() };
            let other = crate::helpers::client(&server, busy)
                .run_once("order-long", &fp("1000"), |_| async { Ok::<_, Failure<()>>(ok("intruder")) })
                .await;
            *intruder.lock().expect("intruder") = Some(other.map_err(|e| e.kind()));
            tokio::time::sleep(Duration::from_millis(700)).await;
            Ok::<_, Failure<()>>(ok(r#"{"charge":"ch_long"}"#))
        })
        .await
        .expect("completed on its first lease");
    assert_eq!((done.attempt, done.replayed), (1, false));
    let midway = midway.into_inner().expect("midway").expect("looked up");
    assert_eq!((midway.state(), midway.attempt), (State::InProgress, 1));
    let expires = midway.lease_expires_at.and_then(|at| SystemTime::try_from(at).ok()).expect("a lease expiry");
    assert!(expires > SystemTime::now() - Duration::from_secs(1), "the lease was renewed");
    assert_eq!(intruder.into_inner().expect("intruder"), Some(Err(ErrorKind::InProgress)));
    // No REAPED event: the lease never expired although the operation
    // outlived it more than twice over.
    assert_eq!(history(&server, "order-long").await, [EventKind::Acquired, EventKind::Completed]);
}

#[tokio::test]
async fn lease_lost_begins_again() {
    let server = start_idemd().await;
    let client = client(&server, quick());

    // Nobody else stored a result: Begin hands this call the record again
    // (attempt 2), and the response it already has is stored there
    // without running the operation again.
    let runs = Runs::default();
    let done = client
        .run_once("order-released", &fp("1000"), |attempt| {
            let number = attempt.attempt;
            runs.add(attempt);
            let channel = server.channel();
            async move {
                release(channel, "order-released", number).await;
                Ok::<_, Failure<()>>(ok("mine"))
            }
        })
        .await
        .expect("stored under a new attempt");
    assert_eq!((done.attempt, done.replayed, done.response), (2, false, ok("mine")));
    assert_eq!(runs.count(), 1, "the operation never runs twice in one call");
    assert_eq!(
        history(&server, "order-released").await,
        [EventKind::Acquired, EventKind::Released, EventKind::Acquired, EventKind::Completed]
    );

    // Another attempt took over and stored its result first: Begin replays
    // the winner's.
    let done = client
        .run_once("order-contested", &fp("1000"), |attempt| {
            let (client, channel) = (client.clone(), server.channel());
            async move {
                release(channel, "order-contested", attempt.attempt).await;
                let winner = client
                    .run_once("order-contested", &fp("1000"), |_| async { Ok::<_, Failure<()>>(ok("winner")) })
                    .await
                    .expect("the winner");
                assert_eq!(winner.attempt, 2);
                Ok::<_, Failure<()>>(ok("loser"))
            }
        })
        .await
        .expect("the winner's result");
    assert_eq!((done.replayed, done.attempt, done.response), (true, 2, ok("winner")));

    // The lease keeps being taken: two more Begins, then LeaseLost.
    let releasing = proxy(&server.addr, Fault::ReleaseBeforeEveryComplete).await;
    let taken = Client::connect_lazy(&releasing.addr, NS, quick()).expect("address");
    let runs = AtomicU32::new(0);
    let error = taken
        .run_once("order-taken", &fp("1000"), |_| {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Failure<()>>(ok("never stored")) }
        })
        .await
        .expect_err("lost three times");
    assert_eq!(error.kind(), ErrorKind::LeaseLost, "{error:?}");
    assert_eq!((error.reason().as_deref(), error.code()), (Some("LEASE_LOST"), Some(Code::FailedPrecondition)));
    assert_eq!((runs.load(Ordering::SeqCst), error.attempt()), (1, 3));
    assert_eq!(releasing.begin_calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn fingerprint_mismatch_is_its_own_error() {
    let server = start_idemd().await;
    let client = client(&server, quick());
    let runs = AtomicU32::new(0);
    let charge = |_| {
        runs.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Failure<&str>>(ok("1000 EUR")) }
    };
    client.run_once("order-fp", &fp("1000"), charge).await.expect("first");
    let error = client.run_once("order-fp", &fp("9999"), charge).await.expect_err("another request");
    assert_eq!(error.kind(), ErrorKind::FingerprintMismatch);
    assert_eq!(
        (error.reason().as_deref(), error.code()),
        (Some("FINGERPRINT_MISMATCH"), Some(Code::FailedPrecondition))
    );
    assert_eq!((error.key(), error.attempt()), ("order-fp", 0));
    assert!(error.to_string().contains("order-fp"), "{error}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let record = lookup(&server, "order-fp").await;
    assert_eq!((record.fingerprint, record.response), (fp("1000"), b"1000 EUR".to_vec()));
}

#[tokio::test]
async fn unavailable_is_retried_then_surfaced() {
    let never = |_| async { panic!("the operation ran without idemd") as Result<Response, Failure<()>> };
    let policy = Policy { rpc_retries: 3, rpc_timeout: Duration::from_secs(2), ..quick() };

    // An address nobody listens on.
    let nowhere =
        Client::connect_lazy(&format!("http://127.0.0.1:{}", free_port()), NS, policy.clone()).expect("address");
    let started = Instant::now();
    let error = nowhere.run_once("order-nowhere", &fp("1000"), never).await.expect_err("unreachable");
    assert_eq!((error.kind(), error.code(), error.attempt()), (ErrorKind::Rpc, Some(Code::Unavailable), 0));
    assert!(started.elapsed() < Duration::from_secs(20), "bounded: {:?}", started.elapsed());

    // Exactly 1 Begin and 3 retries, then the error (a balancer without
    // backends answers UNAVAILABLE to each).
    let balancer = proxy(&format!("127.0.0.1:{}", free_port()), Fault::None).await;
    let behind = Client::connect_lazy(&balancer.addr, NS, policy.clone()).expect("address");
    let error = behind.run_once("order-balancer", &fp("1000"), never).await.expect_err("no backend");
    assert_eq!((error.kind(), error.code()), (ErrorKind::Rpc, Some(Code::Unavailable)));
    assert_eq!(balancer.begin_calls.load(Ordering::SeqCst), 4);

    // A server that stopped: the same, never a success.
    let mut server = start_idemd().await;
    let client = client(&server, policy);
    client.run_once("order-before", &fp("1000"), |_| async { Ok::<_, Failure<()>>(ok("{}")) }).await.expect("served");
    server.stop();
    let error = client.run_once("order-after", &fp("1000"), never).await.expect_err("stopped");
    assert_eq!((error.kind(), error.code()), (ErrorKind::Rpc, Some(Code::Unavailable)));
}

#[test]
fn keys_and_fingerprints_match_the_shared_vectors() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/vectors.json"))
        .expect("clients/testdata/vectors.json");
    let vectors: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let field = |value: &serde_json::Value, name: &str| value[name].as_str().expect("a string").to_string();
    let keys = vectors["entity_keys"].as_array().expect("entity_keys");
    let fingerprints = vectors["fingerprints"].as_array().expect("fingerprints");
    assert!(!keys.is_empty() && !fingerprints.is_empty());
    for case in keys {
        assert_eq!(entity_key(&field(case, "entity"), &field(case, "operation")), field(case, "key"), "{case}");
    }
    for case in fingerprints {
        let fields: Vec<(String, String)> = case["fields"]
            .as_object()
            .expect("fields")
            .iter()
            .map(|(name, value)| (name.clone(), value.as_str().expect("text").to_string()))
            .collect();
        let borrowed: Vec<(&str, &[u8])> = fields.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
        assert_eq!(hex::encode(fingerprint(&borrowed)), field(case, "sha256_hex"), "{case}");
    }
    assert_ne!(fingerprint(&[("a", b"bc")]), fingerprint(&[("ab", b"c")]), "concatenation collides");
}

/// Fails when a scenario of `clients/testdata/conformance.json` has no test
/// named after it here.
#[test]
fn every_conformance_scenario_has_a_test() {
    let list = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/conformance.json"))
        .expect("clients/testdata/conformance.json");
    let list: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    let scenarios = list["scenarios"].as_array().expect("scenarios");
    assert!(!scenarios.is_empty());
    let source = include_str!("conformance.rs");
    for scenario in scenarios {
        let id = scenario["id"].as_str().expect("an id");
        assert!(source.contains(&format!("fn {id}()")), "scenario {id} has no test here");
    }
}
