//! Postgres failover under load: a Patroni cluster (primary, synchronous
//! standby, replica), three idemd replicas on its multi-host URL, the fault
//! harness's clients, and the primary's postmaster killed with SIGKILL while
//! they run. Patroni promotes the synchronous standby; idemd follows without
//! a restart. The recorded history is checked with the same invariants as
//! the fault harness, and the run ends with
//!
//! `failover: <operations> operations, <failovers> failovers, <lost> lost, <double> double acquisitions, <seconds> s max unavailability`
//!
//! Short mode (`scripts/test`): 2 failovers. `IDEMD_FAILOVERS=N` (or
//! `scripts/failover --long`) for more.

use std::time::Duration;

use chrono::Utc;
use sqlx::Connection;
use tokio::time::Instant;

use crate::history::{Answer, Call};
use crate::patroni::Patroni;
use crate::replicas::Replicas;
use crate::{CALM, RECOVERY_BOUND, REPLICAS, finish, recover, start_load};

const DATABASE: &str = "idemd_failover";
/// A whole cluster again (the old primary rewound and streaming) before the next kill.
const REJOIN_DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_loses_nothing_and_acquires_nothing_twice() {
    let failovers: usize = std::env::var("IDEMD_FAILOVERS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let run_started = Instant::now();
    let cluster = Patroni::start("failover").await;
    eprintln!("Patroni cluster whole after {:.1?}", run_started.elapsed());
    {
        let leader = cluster.leader(Duration::from_secs(30)).await;
        let mut admin = sqlx::PgConnection::connect(&Patroni::node_url(leader, "postgres")).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DATABASE}")))
            .execute(&mut admin)
            .await
            .expect("create database");
    }
    let url = cluster.url(DATABASE);
    let mut replicas = Replicas::start(REPLICAS, &url).await;
    let mut probe = 0;
    let (shared, clients) = start_load(&replicas, &mut probe, 5000).await;

    let mut kills = Vec::new();
    let mut recoveries = Vec::new();
    for failover in 1..=failovers {
        tokio::time::sleep(CALM).await;
        cluster.wait_whole(REJOIN_DEADLINE).await;
        let old = cluster.leader(Duration::from_secs(30)).await;
        eprintln!("failover {failover}: SIGKILL to the postmaster of {} (the primary)", old.name);
        kills.push(Utc::now());
        cluster.kill_postmaster(old);
        let took = recover(&shared, &mut probe).await;
        let new = cluster.leader(Duration::from_secs(60)).await;
        assert_ne!(new.name, old.name, "Patroni promoted another node");
        eprintln!("          {} promoted; every idemd replica serving again after {took:.2?}", new.name);
        recoveries.push(took);
    }
    // The final rows are read from whoever is primary now.
    cluster.wait_whole(REJOIN_DEADLINE).await;
    let leader_url = Patroni::node_url(cluster.leader(Duration::from_secs(30)).await, DATABASE);
    let report = finish(&shared, clients, &mut replicas, &mut probe, recoveries, &leader_url).await;

    // How long Begins failed: around each kill and on each idemd replica,
    // Begins in the order they were sent; a run of failures (any error)
    // lasts from the first one's sending to the answer of the next Begin
    // that succeeded, or to the end of the window if none did.
    let mut unavailable = Duration::ZERO;
    for (i, killed) in kills.iter().enumerate() {
        // Up to the next kill, so each failover is measured on its own.
        let until = kills.get(i + 1).copied().unwrap_or(*killed + chrono::Duration::seconds(60));
        let mut longest = Duration::ZERO;
        for replica in 0..REPLICAS {
            let mut around: Vec<_> = report
                .events
                .iter()
                .filter(|e| matches!(e.call, Call::Begin) && e.replica == replica)
                .filter(|e| e.received >= *killed && e.sent < until)
                .collect();
            around.sort_by_key(|e| e.sent);
            let mut run_from = None;
            for event in around {
                let failed = matches!(event.answer, Answer::Error { .. });
                match (failed, run_from) {
                    (true, None) => run_from = Some(event.sent),
                    (false, Some(from)) => {
                        longest = longest.max((event.received - from).to_std().unwrap_or_default());
                        run_from = None;
                    }
                    _ => {}
                }
            }
            if let Some(from) = run_from {
                longest = longest.max((until - from).to_std().unwrap_or_default());
            }
        }
        eprintln!("          Begins failed for at most {longest:.2?} after the kill at {killed}");
        unavailable = unavailable.max(longest);
    }
    let violations_of = |prefixes: &[&str]| -> usize {
        report
            .checked
            .invariants
            .iter()
            .filter(|i| prefixes.iter().any(|p| i.name.starts_with(p)))
            .map(|i| i.violations.len())
            .sum()
    };
    // 3: a stored response changed or vanished; 4: an acknowledged write is missing.
    let lost = violations_of(&["3.", "4."]);
    // 1: two live leases overlapped; 2: a superseded holder's Complete succeeded.
    let double = violations_of(&["1.", "2."]);
    println!("run: {:.0?}", run_started.elapsed());
    println!(
        "failover: {} operations, {} failovers, {lost} lost, {double} double acquisitions, {:.1} s max unavailability",
        report.operations,
        kills.len(),
        unavailable.as_secs_f64()
    );
    assert_eq!(report.violations, 0, "invariants violated: see the table above");
    assert!(unavailable < RECOVERY_BOUND, "Begins failed for {unavailable:?} after a failover");
    assert!(report.acquired > 50, "the load was too light to prove anything ({} acquisitions)", report.acquired);
}
