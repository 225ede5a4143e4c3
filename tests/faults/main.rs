//! The fault harness: a throwaway Postgres behind a misbehaving proxy, three
//! idemd replicas, concurrent clients hammering a few keys (duplicates,
//! crashes between Begin and Complete, aborts, heartbeats), and injected
//! faults: replica `kill -9`, Postgres stopped in immediate mode, backends
//! terminated, latency with client deadlines shorter than the store, cut
//! connections. Every call is recorded and the history and the final
//! database are checked against the invariants in `history.rs`.
//!
//! Short mode (default, run by `scripts/test`) lasts about a minute;
//! `IDEMD_FAULTS_SECONDS=600` (`scripts/faults --long`) soaks.

#[path = "../common/pg_cluster.rs"]
mod pg_cluster;

mod failover;
mod history;
mod hosts;
mod patroni;
mod proxy;
mod replicas;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use idemd::pb::begin_response::Outcome;
use idemd::pb::idempotency_client::IdempotencyClient;
use idemd::pb::{self};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{Connection, Row};
use tokio::time::Instant;
use tonic::transport::Channel;

use history::{Answer, Call, Event, FinalRow, History, LEASE_TTL};
use pg_cluster::Cluster;
use proxy::Proxy;
use replicas::Replicas;

const NAMESPACE: &str = "faults";
const CLIENTS: usize = 12;
const KEYS_PER_EPOCH: u64 = 24;
const EPOCH: Duration = Duration::from_secs(3);
const REPLICAS: usize = 3;
/// A fault is followed by this much normal load before the next one.
const CALM: Duration = Duration::from_secs(3);
const RECOVERY_BOUND: Duration = Duration::from_secs(30);

/// What the clients share with the fault injector.
struct Shared {
    history: History,
    channels: Vec<Channel>,
    stop: AtomicBool,
    /// While set, clients use deadlines shorter than the store's latency.
    short_deadlines: AtomicBool,
    started: Instant,
}

fn tonic_timeout(request: &mut tonic::Request<impl Sized>, shared: &Shared) -> Duration {
    let deadline =
        if shared.short_deadlines.load(Ordering::SeqCst) { Duration::from_millis(100) } else { Duration::from_secs(3) };
    request.set_timeout(deadline);
    deadline
}

async fn timed<T>(
    shared: &Shared,
    key: &str,
    replica: usize,
    call: Call,
    future: impl std::future::Future<Output = Result<T, tonic::Status>>,
    answer_of: impl FnOnce(T) -> Answer,
) -> Answer {
    let sent = Utc::now();
    let answer = match tokio::time::timeout(Duration::from_secs(10), future).await {
        Ok(Ok(value)) => answer_of(value),
        Ok(Err(status)) => Answer::Error { code: status.code(), message: status.message().to_string() },
        Err(_) => Answer::Error { code: tonic::Code::DeadlineExceeded, message: "client gave up".into() },
    };
    shared.history.record(Event { key: key.into(), replica, sent, received: Utc::now(), call, answer: answer.clone() });
    answer
}

fn begin_answer(response: tonic::Response<pb::BeginResponse>) -> Answer {
    match response.into_inner().outcome {
        Some(Outcome::Acquired(a)) => {
            Answer::Acquired { token: a.lease_token, attempt: a.attempt, lease_expires_at: to_time(a.lease_expires_at) }
        }
        Some(Outcome::Completed(c)) => Answer::Completed { response: c.response },
        Some(Outcome::InProgress(_)) => Answer::InProgress,
        None => Answer::Error { code: tonic::Code::Unknown, message: "no outcome".into() },
    }
}

fn to_time(value: Option<prost_types::Timestamp>) -> history::Time {
    let value = value.unwrap_or_default();
    chrono::DateTime::from_timestamp(value.seconds, value.nanos as u32).unwrap_or_default()
}

/// One client: logical operations on a sliding window of keys, so keys keep
/// being created while older ones are replayed.
async fn client(shared: Arc<Shared>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !shared.stop.load(Ordering::SeqCst) {
        let epoch = shared.started.elapsed().as_secs() / EPOCH.as_secs();
        let key = format!("k{epoch}-{}", rng.random_range(0..KEYS_PER_EPOCH));
        let replica = rng.random_range(0..shared.channels.len());
        let mut client = IdempotencyClient::new(shared.channels[replica].clone());
        let mut request = tonic::Request::new(pb::BeginRequest {
            namespace: NAMESPACE.into(),
            key: key.clone(),
            fingerprint: key.as_bytes().to_vec(),
            lease_ttl: Some(prost_types::Duration { seconds: LEASE_TTL.as_secs() as i64, nanos: 0 }),
            wait_timeout: rng.random_bool(0.3).then_some(prost_types::Duration { seconds: 1, nanos: 0 }),
            attempt_nonce: format!("{seed}-{}", rng.random::<u64>()),
            ..Default::default()
        });
        tonic_timeout(&mut request, &shared);
        let answer = timed(&shared, &key, replica, Call::Begin, client.begin(request), begin_answer).await;
        let Answer::Acquired { token, .. } = answer else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
            continue;
        };
        // The "charge".
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..80))).await;
        let choice: f64 = rng.random();
        if choice < 0.10 {
            // Crash: never Complete nor Abort; the reaper or a takeover ends it.
            continue;
        }
        if choice < 0.25 {
            let mut request = tonic::Request::new(pb::AbortRequest {
                namespace: NAMESPACE.into(),
                key: key.clone(),
                lease_token: token.clone(),
                reason: "transient".into(),
                outcome_unknown: false,
            });
            tonic_timeout(&mut request, &shared);
            timed(&shared, &key, replica, Call::Abort { token }, client.abort(request), |_| Answer::Ok).await;
            continue;
        }
        if choice < 0.35 {
            let mut request = tonic::Request::new(pb::HeartbeatRequest {
                namespace: NAMESPACE.into(),
                key: key.clone(),
                lease_token: token.clone(),
                lease_ttl: Some(prost_types::Duration { seconds: LEASE_TTL.as_secs() as i64, nanos: 0 }),
            });
            tonic_timeout(&mut request, &shared);
            let call = Call::Heartbeat { token: token.clone() };
            let extended = |r: tonic::Response<pb::HeartbeatResponse>| Answer::Extended {
                lease_expires_at: to_time(r.into_inner().lease_expires_at),
            };
            timed(&shared, &key, replica, call, client.heartbeat(request), extended).await;
        }
        // Complete, retried through other replicas while the answer is unknown.
        let payload = format!("{key}|{token}").into_bytes();
        for retry in 0..3 {
            let replica = (replica + retry) % shared.channels.len();
            let mut client = IdempotencyClient::new(shared.channels[replica].clone());
            let mut request = tonic::Request::new(pb::CompleteRequest {
                namespace: NAMESPACE.into(),
                key: key.clone(),
                lease_token: token.clone(),
                response: payload.clone(),
                response_code: 200,
                content_type: "text/plain".into(),
            });
            tonic_timeout(&mut request, &shared);
            let call = Call::Complete { token: token.clone(), payload: payload.clone() };
            match timed(&shared, &key, replica, call, client.complete(request), |_| Answer::Ok).await {
                Answer::Error {
                    code: tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled,
                    ..
                } => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => break,
            }
        }
    }
}

/// Until every replica is ready and a Begin + Complete succeeds through each.
async fn recover(shared: &Shared, probe: &mut u64) -> Duration {
    let started = Instant::now();
    for (replica, channel) in shared.channels.iter().enumerate() {
        // Readiness first: the orchestrator would route nothing here before.
        loop {
            assert!(started.elapsed() < Duration::from_secs(120), "replica {replica} never became ready");
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            let check = tonic_health::pb::HealthCheckRequest { service: pb::SERVICE_NAME.into() };
            if health.check(check).await.is_ok_and(|r| r.into_inner().status == 1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        loop {
            assert!(started.elapsed() < Duration::from_secs(120), "replica {replica} never recovered");
            *probe += 1;
            let mut client = IdempotencyClient::new(channel.clone());
            let key = format!("probe-{probe}");
            let mut request = tonic::Request::new(pb::BeginRequest {
                namespace: "probe".into(),
                key: key.clone(),
                ..Default::default()
            });
            request.set_timeout(Duration::from_secs(2));
            if let Ok(response) = client.begin(request).await
                && let Some(Outcome::Acquired(lease)) = response.into_inner().outcome
            {
                let mut request = tonic::Request::new(pb::CompleteRequest {
                    namespace: "probe".into(),
                    key,
                    lease_token: lease.lease_token,
                    ..Default::default()
                });
                request.set_timeout(Duration::from_secs(2));
                if client.complete(request).await.is_ok() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    started.elapsed()
}

async fn terminate_backends(cluster: &Cluster, database: &str) {
    let mut admin = sqlx::PgConnection::connect(&cluster.url()).await.expect("admin connection");
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .execute(&mut admin)
    .await
    .expect("terminate backends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_never_break_the_invariants() {
    let seconds: u64 = std::env::var("IDEMD_FAULTS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let run_started = Instant::now();
    let cluster = Cluster::new("faults");
    let database = "idemd_faults";
    {
        let mut admin = sqlx::PgConnection::connect(&cluster.url()).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&mut admin).await.expect("db");
    }
    let proxy = Proxy::start(format!("127.0.0.1:{}", cluster.port).parse().expect("addr")).await;
    let via_proxy = format!("postgres://postgres@{}/{database}", proxy.addr);
    let database_url = format!("postgres://postgres@127.0.0.1:{}/{database}", cluster.port);
    let mut replicas = Replicas::start(REPLICAS, &via_proxy).await;
    let mut probe = 0;
    let (shared, clients) = start_load(&replicas, &mut probe, 1000).await;
    let mut recoveries = Vec::new();
    let mut faults = 0;
    let mut round = 0;
    while shared.started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(CALM).await;
        let fault = round % 6;
        round += 1;
        faults += 1;
        match fault {
            0 | 5 => {
                let victim = (round / 6 + fault) % REPLICAS;
                eprintln!("fault {faults}: kill -9 replica {victim}, restart after 1 s");
                replicas.kill(victim);
                tokio::time::sleep(Duration::from_secs(1)).await;
                replicas.restart(victim).await;
            }
            1 => {
                eprintln!("fault {faults}: Postgres stopped (immediate) for 2 s");
                cluster.stop_immediately();
                let from = Utc::now();
                tokio::time::sleep(Duration::from_secs(2)).await;
                shared.history.outage(from, Utc::now());
                cluster.start();
            }
            2 => {
                eprintln!("fault {faults}: pg_terminate_backend on every idemd connection");
                terminate_backends(&cluster, database).await;
            }
            3 => {
                eprintln!("fault {faults}: 300 ms latency to Postgres, client deadlines 100 ms, for 3 s");
                proxy.set_latency(Duration::from_millis(300));
                shared.short_deadlines.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(3)).await;
                shared.short_deadlines.store(false, Ordering::SeqCst);
                proxy.set_latency(Duration::ZERO);
            }
            _ => {
                eprintln!("fault {faults}: every Postgres connection cut, new ones refused for 2 s");
                proxy.set_refusing(true);
                proxy.cut_all();
                let from = Utc::now();
                tokio::time::sleep(Duration::from_secs(2)).await;
                shared.history.outage(from, Utc::now());
                proxy.set_refusing(false);
            }
        }
        let took = recover(&shared, &mut probe).await;
        eprintln!("          recovered in {took:.2?}");
        recoveries.push(took);
    }
    let report = finish(&shared, clients, &mut replicas, &mut probe, recoveries, &database_url).await;
    println!(
        "faults: {} operations, {faults} faults, {} violations, {:.1} s max recovery",
        report.operations,
        report.violations,
        report.max_recovery.as_secs_f64()
    );
    println!("run: {:.0?}", run_started.elapsed());
    assert_eq!(report.violations, 0, "invariants violated: see the table above");
    assert!(report.acquired > 50, "the load was too light to prove anything ({} acquisitions)", report.acquired);
}

/// Waits until every replica serves, then starts the clients (seeded from
/// `seed`) on them.
async fn start_load(
    replicas: &Replicas,
    probe: &mut u64,
    seed: u64,
) -> (Arc<Shared>, Vec<tokio::task::JoinHandle<()>>) {
    let shared = Arc::new(Shared {
        history: History::default(),
        channels: replicas.channels(),
        stop: AtomicBool::new(false),
        short_deadlines: AtomicBool::new(false),
        started: Instant::now(),
    });
    recover(&shared, probe).await;
    let clients = (0..CLIENTS).map(|i| tokio::spawn(client(Arc::clone(&shared), seed + i as u64))).collect();
    (shared, clients)
}

/// What a run with faults comes to.
struct Report {
    pub operations: usize,
    pub acquired: usize,
    pub violations: usize,
    pub max_recovery: Duration,
    pub events: Vec<Event>,
    pub checked: history::Checked,
}

/// Stops the clients, lets every crashed lease be reaped, stops the
/// replicas, reads the final rows at `database_url` and checks the history,
/// printing the table of invariants.
async fn finish(
    shared: &Shared,
    clients: Vec<tokio::task::JoinHandle<()>>,
    replicas: &mut Replicas,
    probe: &mut u64,
    mut recoveries: Vec<Duration>,
    database_url: &str,
) -> Report {
    shared.stop.store(true, Ordering::SeqCst);
    for client in clients {
        let _ = tokio::time::timeout(Duration::from_secs(30), client).await;
    }
    recoveries.push(recover(shared, probe).await);
    // Let every crashed lease expire and be reaped, so the logs are complete.
    tokio::time::sleep(LEASE_TTL + Duration::from_secs(1)).await;
    replicas.stop_all().await;

    let mut final_rows = HashMap::new();
    {
        let mut connection = sqlx::PgConnection::connect(database_url).await.expect("connect");
        let rows = sqlx::query(
            "SELECT key, state, attempt, response, outcome_unknown AND state = 3 AS outcome_unknown, \
                    (SELECT coalesce(array_agg(e.kind ORDER BY e.seq), '{}') FROM idemd_events e \
                     WHERE e.namespace = r.namespace AND e.key = r.key) AS kinds, \
                    (SELECT coalesce(array_agg(e.attempt ORDER BY e.seq), '{}') FROM idemd_events e \
                     WHERE e.namespace = r.namespace AND e.key = r.key) AS attempts, \
                    (SELECT coalesce(array_agg(e.outcome_unknown ORDER BY e.seq), '{}') FROM idemd_events e \
                     WHERE e.namespace = r.namespace AND e.key = r.key) AS unknowns \
             FROM idemd_records r WHERE namespace = $1",
        )
        .bind(NAMESPACE)
        .fetch_all(&mut connection)
        .await
        .expect("final rows");
        for row in rows {
            let key: String = row.get("key");
            let attempt: i32 = row.get("attempt");
            let (kinds, attempts, unknowns): (Vec<i16>, Vec<i32>, Vec<bool>) =
                (row.get("kinds"), row.get("attempts"), row.get("unknowns"));
            let events = kinds.into_iter().zip(attempts).zip(unknowns).map(|((k, a), u)| (k, a as u32, u)).collect();
            let final_row = FinalRow {
                state: row.get("state"),
                attempt: attempt as u32,
                response: row.get("response"),
                rows: 1,
                outcome_unknown: row.get("outcome_unknown"),
                events,
            };
            let previous = final_rows.insert(key.clone(), final_row);
            if let Some(previous) = previous {
                // Impossible with the primary key; counted so the checker would say so.
                final_rows.entry(key).and_modify(|row| row.rows = previous.rows + 1);
            }
        }
    }
    let events = shared.history.events();
    let checked = history::check(
        &events,
        &shared.history.outages(),
        &final_rows,
        &replicas.reaped_from_logs(),
        &recoveries,
        RECOVERY_BOUND,
    );
    println!();
    println!("{:<62} {:>8} {:>10}", "invariant", "checked", "violations");
    for invariant in &checked.invariants {
        println!("{:<62} {:>8} {:>10}", invariant.name, invariant.checked, invariant.violations.len());
        for violation in invariant.violations.iter().take(10) {
            println!("    {violation}");
        }
    }
    let acquired = events.iter().filter(|e| matches!(e.answer, Answer::Acquired { .. })).count();
    let errors = events.iter().filter(|e| matches!(e.answer, Answer::Error { .. })).count();
    println!("calls: {} ({acquired} acquired, {errors} errors), keys: {}", events.len(), final_rows.len());
    Report {
        operations: events.len(),
        acquired,
        violations: checked.violations(),
        max_recovery: recoveries.iter().max().copied().unwrap_or_default(),
        events,
        checked,
    }
}
