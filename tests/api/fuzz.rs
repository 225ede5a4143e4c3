//! Hostile input: a fixed number of random calls (well-formed messages with
//! hostile field values, and raw bytes) through decode → validate → store on
//! SQLite. No panic, no INTERNAL, every rejection is INVALID_ARGUMENT naming
//! a field, and the record set stays consistent.

use idemd::pb::{self, begin_response::Outcome};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::sync::{Arc, Mutex};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;

/// Cases per run: fixed, so CI time is bounded and a failure reproduces
/// from the seed proptest prints.
const CASES: u32 = 1000;

fn namespace() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("payments".to_string()),
        1 => Just("refunds".to_string()),
        2 => ".{0,70}",
        1 => "[a-z0-9._-]{60,70}",
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![3 => "k[0-3]", 2 => ".{0,40}", 1 => "\\PC{250,260}", 1 => "[\\x00-\\x1f\\x7f-\\x9f]{1,3}"]
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    let seconds = prop_oneof![
        -2i64..5,
        Just(59),
        Just(60),
        Just(61),
        Just(3600),
        Just(3601),
        Just(86_400),
        Just(2_592_000),
        Just(2_592_001),
        Just(i64::MAX),
        Just(i64::MIN),
        any::<i64>()
    ];
    let nanos = prop_oneof![Just(0i32), Just(1), Just(-1), Just(999_999_999), Just(1_000_000_000), any::<i32>()];
    proptest::option::of((seconds, nanos).prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }))
}

#[derive(Debug, Clone)]
enum FuzzCall {
    Begin(pb::BeginRequest),
    Complete {
        namespace: String,
        key: String,
        token: Option<usize>,
        forged: String,
        response: Vec<u8>,
        content_type: String,
    },
    Abort {
        namespace: String,
        key: String,
        token: Option<usize>,
        forged: String,
        reason: String,
    },
    Heartbeat {
        namespace: String,
        key: String,
        token: Option<usize>,
        forged: String,
        ttl: Option<prost_types::Duration>,
    },
    Lookup(pb::LookupRequest),
    Raw {
        method: usize,
        bytes: Vec<u8>,
    },
}

fn fuzz_call() -> impl Strategy<Value = FuzzCall> {
    let begin = (
        namespace(),
        key(),
        proptest::collection::vec(any::<u8>(), 0..70),
        duration(),
        duration(),
        duration(),
        ".{0,130}",
    )
        .prop_map(|(namespace, key, fingerprint, lease_ttl, retention, wait, nonce)| {
            // Long waits would only slow the run down.
            let wait_timeout = wait.map(|d| prost_types::Duration { seconds: d.seconds.clamp(-1, 0), nanos: d.nanos });
            FuzzCall::Begin(pb::BeginRequest {
                namespace,
                key,
                fingerprint,
                lease_ttl,
                retention,
                wait_timeout,
                attempt_nonce: nonce,
            })
        });
    let token = proptest::option::of(0usize..8);
    prop_oneof![
        4 => begin,
        2 => (namespace(), key(), token.clone(), ".{0,300}", proptest::collection::vec(any::<u8>(), 0..1100), ".{0,260}")
            .prop_map(|(namespace, key, token, forged, response, content_type)| FuzzCall::Complete { namespace, key, token, forged, response, content_type }),
        1 => (namespace(), key(), token.clone(), ".{0,10}", ".{0,1030}")
            .prop_map(|(namespace, key, token, forged, reason)| FuzzCall::Abort { namespace, key, token, forged, reason }),
        1 => (namespace(), key(), token, ".{0,10}", duration())
            .prop_map(|(namespace, key, token, forged, ttl)| FuzzCall::Heartbeat { namespace, key, token, forged, ttl }),
        1 => (namespace(), key()).prop_map(|(namespace, key)| FuzzCall::Lookup(pb::LookupRequest { namespace, key })),
        2 => (0usize..5, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(method, bytes)| FuzzCall::Raw { method, bytes }),
    ]
}

/// Every answer must be one idemd means to give.
fn check_status(status: &tonic::Status) -> Result<(), TestCaseError> {
    match status.code() {
        Code::InvalidArgument => {
            let info = status
                .get_details_error_info()
                .ok_or_else(|| TestCaseError::fail(format!("no ErrorInfo: {status:?}")))?;
            prop_assert_eq!(info.reason, "INVALID_FIELD");
            let bad = status
                .get_details_bad_request()
                .ok_or_else(|| TestCaseError::fail(format!("no BadRequest: {status:?}")))?;
            prop_assert!(bad.field_violations.iter().all(|v| !v.field.is_empty()), "unnamed field: {status:?}");
        }
        Code::FailedPrecondition | Code::NotFound => {
            prop_assert!(status.get_details_error_info().is_some(), "no ErrorInfo: {status:?}");
        }
        other => return Err(TestCaseError::fail(format!("unexpected {other:?}: {status:?}"))),
    }
    Ok(())
}

fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut framed = vec![0];
    framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    framed.extend_from_slice(bytes);
    framed
}

#[test]
fn hostile_input_never_crashes_or_corrupts() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let app = runtime.block_on(spawn_app_with(Backend::Sqlite, |c| c.max_response_bytes = 1000));
    let tokens: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut runner = TestRunner::new(Config { cases: CASES, failure_persistence: None, ..Config::default() });
    let result = runner.run(&fuzz_call(), |call| {
        runtime.block_on(async {
            let mut client = app.client.clone();
            let pick = |token: Option<usize>, forged: &str| {
                let tokens = tokens.lock().expect("tokens");
                token.and_then(|i| tokens.get(i % tokens.len().max(1)).cloned()).unwrap_or_else(|| forged.to_string())
            };
            let answer: Result<(), tonic::Status> = match call {
                FuzzCall::Begin(request) => client.begin(request).await.map(|response| {
                    if let Some(Outcome::Acquired(lease)) = response.into_inner().outcome {
                        tokens.lock().expect("tokens").push(lease.lease_token);
                    }
                }),
                FuzzCall::Complete { namespace, key, token, forged, response, content_type } => {
                    let lease_token = pick(token, &forged);
                    let request =
                        pb::CompleteRequest { namespace, key, lease_token, response, response_code: 200, content_type };
                    client.complete(request).await.map(|_| ())
                }
                FuzzCall::Abort { namespace, key, token, forged, reason } => {
                    let request = pb::AbortRequest {
                        namespace,
                        key,
                        lease_token: pick(token, &forged),
                        reason,
                        outcome_unknown: false,
                    };
                    client.abort(request).await.map(|_| ())
                }
                FuzzCall::Heartbeat { namespace, key, token, forged, ttl } => {
                    let request =
                        pb::HeartbeatRequest { namespace, key, lease_token: pick(token, &forged), lease_ttl: ttl };
                    client.heartbeat(request).await.map(|_| ())
                }
                FuzzCall::Lookup(request) => client.lookup(request).await.map(|_| ()),
                FuzzCall::Raw { method, bytes } => {
                    let path = ["Begin", "Complete", "Abort", "Heartbeat", "Lookup"][method];
                    let status =
                        crate::validation::raw_call(&app, &format!("/idemd.v1.Idempotency/{path}"), frame(&bytes))
                            .await;
                    if status.code() == Code::Ok { Ok(()) } else { Err(status) }
                }
            };
            match answer {
                Ok(()) => Ok(()),
                Err(status) => check_status(&status),
            }
        })
    });
    if let Err(error) = result {
        panic!("{error}");
    }

    // The server still answers, and every stored record is consistent.
    runtime.block_on(async {
        app.acquire(begin_req("after-fuzzing")).await;
        use sqlx::{Connection, Row};
        let mut db = sqlx::SqliteConnection::connect(&app.database_url).await.expect("connect");
        let rows = sqlx::query("SELECT * FROM idemd_records").fetch_all(&mut db).await.expect("rows");
        assert!(!rows.is_empty());
        for row in rows {
            let namespace: String = row.get("namespace");
            let key: String = row.get("key");
            idemd::domain::RecordId::parse(namespace.clone(), key.clone()).expect("only valid identities are stored");
            let state: i64 = row.get("state");
            let attempt: i64 = row.get("attempt");
            let (created, expires, lease): (i64, i64, i64) =
                (row.get("created_at"), row.get("expires_at"), row.get("lease_expires_at"));
            assert!(attempt >= 1 && expires > created, "{namespace}/{key}");
            if state == 1 {
                assert!(expires >= lease, "{namespace}/{key}: expires before its lease");
            }
            if state == 2 {
                let response: Option<Vec<u8>> = row.get("response");
                assert!(response.is_some_and(|r| r.len() <= 1000), "{namespace}/{key}");
            }
            let fingerprint: Vec<u8> = row.get("fingerprint");
            assert!(fingerprint.len() <= 64);
        }
    });
}
