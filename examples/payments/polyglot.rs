//! The demo with workers in several languages: one provider over HTTP on
//! loopback, one idemd, and a worker process per language, each charging
//! its share of the payments through its own language's client. Each
//! payment is in the shares of `--workers` languages (in one share several
//! times when there are fewer languages than that), so workers of different
//! languages race for it.
//!
//! Every worker speaks the same small protocol. It reads `IDEMD_ADDR`
//! (`host:port`), `PROVIDER_URL`, `NAMESPACE`, `PAYMENTS` (payment numbers,
//! comma-separated; a repeated one is raced by several tasks), `RECONCILE`
//! (`on`: pass a reconcile hook that looks the downstream key up),
//! `CONCURRENCY` and `WORKER` (its name, sent to the provider) from its
//! environment; prints `ready` once its client is built and waits for a
//! line on stdin, so that no language starts before the others; then, per
//! payment, `result pay-N completed|replayed|reconciled <code> <body>` as
//! soon as it has an answer, and finally `summary completed=… replayed=…
//! reconciled=… unfinished=…`. Payment `pay-N` is charged `1000 + 7 N` EUR
//! with key `entity_key("pay-N", "charge")` and a fingerprint over payment,
//! amount and currency, so every language asks for the same thing. When the
//! provider's answer carries `Demo-Crash: now` the worker exits at once with
//! status 3, between charging and completing; this supervisor starts it
//! again with what its share still lacks.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::Barrier;

use crate::Settings;
use crate::provider::{self, Provider};

pub const LANGUAGES: [&str; 5] = ["rust", "python", "typescript", "go", "java"];

/// Process starts per language before the supervisor gives up.
const MAX_STARTS: u32 = 12;
/// How long one worker process may run.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(120);
const CONCURRENCY: usize = 8;

/// What one language's workers did.
#[derive(Default)]
struct Tally {
    language: String,
    completed: u32,
    replayed: u32,
    reconciled: u32,
    crashes: u32,
    starts: u32,
    /// Every answer a worker got: (payment, code, body).
    answers: Vec<(u64, i32, String)>,
    /// Why a worker process failed other than on purpose.
    failures: Vec<String>,
    /// Payments of its share left without an answer.
    unfinished: usize,
}

/// The command that starts a language's worker: this binary for Rust, else
/// `PAYMENTS_WORKER_<LANGUAGE>`, which `examples/payments/run` sets after
/// building the worker.
fn command(language: &str) -> Result<Vec<String>, String> {
    if language == "rust" {
        let exe = std::env::current_exe().map_err(|e| format!("the demo's own path: {e}"))?;
        return Ok(vec![exe.display().to_string(), "worker".into()]);
    }
    let variable = format!("PAYMENTS_WORKER_{}", language.to_uppercase());
    match std::env::var(&variable) {
        Ok(command) if !command.trim().is_empty() => Ok(command.split_whitespace().map(str::to_string).collect()),
        _ => Err(format!(
            "{variable} is not set: run the demo through examples/payments/run, which builds the {language} worker"
        )),
    }
}

/// Payment p goes to languages p, p + 1, …, p + workers − 1 (modulo their
/// number), so each language meets each other one on some payments. A
/// language takes the payments it is first for first, then those it is
/// second for, and so on, each group in its own order (shuffled by the
/// seed): a slow starter (a JVM) still arrives first on some payments, and
/// the others come racing for them.
fn shares(payments: u64, workers: u64, languages: usize, seed: u64) -> Vec<Vec<u64>> {
    let mut shares = vec![Vec::new(); languages];
    for payment in 0..payments {
        for k in 0..workers {
            shares[((payment + k) % languages as u64) as usize].push((k, payment));
        }
    }
    shares
        .into_iter()
        .enumerate()
        .map(|(index, mut share)| {
            share.shuffle(&mut StdRng::seed_from_u64(seed ^ index as u64));
            share.sort_by_key(|&(k, _)| k);
            share.into_iter().map(|(_, payment)| payment).collect()
        })
        .collect()
}

pub async fn run(settings: &Settings) -> bool {
    let started = Instant::now();
    let mut commands = Vec::new();
    for language in &settings.languages {
        match command(language) {
            Ok(command) => commands.push(command),
            Err(message) => {
                eprintln!("{message}");
                return false;
            }
        }
    }
    let provider = Arc::new(Provider::new(settings.provider_dedup));
    let provider_addr = provider::serve(Arc::clone(&provider), settings.seed).await;
    let environment = vec![
        ("IDEMD_ADDR".to_string(), settings.addr.trim_start_matches("http://").trim_end_matches('/').to_string()),
        ("PROVIDER_URL".to_string(), format!("http://{provider_addr}")),
        // A fresh namespace per run, so a long-running idemd replays nothing
        // of an earlier one.
        ("NAMESPACE".to_string(), format!("demo-payments-{}-{}", std::process::id(), settings.seed)),
        ("RECONCILE".to_string(), if settings.reconcile { "on" } else { "off" }.to_string()),
        ("CONCURRENCY".to_string(), CONCURRENCY.to_string()),
    ];
    let shares = shares(settings.payments, settings.workers, settings.languages.len(), settings.seed);
    let barrier = Arc::new(Barrier::new(settings.languages.len()));
    let tallies: Vec<Tally> = futures::future::join_all(settings.languages.iter().zip(commands).zip(shares).map(
        |((language, command), share)| {
            supervise(language.clone(), command, share, environment.clone(), Arc::clone(&barrier))
        },
    ))
    .await;

    // The ledger: what the provider charged against what the workers got.
    let charges = provider.charges_per_payment.lock().expect("provider").clone();
    let mut answers: HashMap<u64, Vec<(i32, &str)>> = HashMap::new();
    for tally in &tallies {
        for (payment, code, body) in &tally.answers {
            answers.entry(*payment).or_default().push((*code, body));
        }
    }
    let (mut finished, mut declined, mut disagreements) = (0, 0, 0);
    for payment in 0..settings.payments {
        let Some(got) = answers.get(&payment) else { continue };
        finished += 1;
        // Every worker of a payment, in any language, got the same answer.
        if got.iter().any(|answer| *answer != got[0]) {
            disagreements += 1;
        }
        if got[0].0 == 402 {
            declined += 1;
        } else if charges.get(&format!("pay-{payment}")).copied().unwrap_or(0) == 0 {
            disagreements += 1;
        }
    }
    let double = crate::print_ledger(settings, &provider, &charges, (finished, declined, disagreements), started);
    println!();
    println!(
        "{:<12}{:>10}{:>12}{:>10}{:>9}{:>8}",
        "worker", "completed", "reconciled", "replayed", "crashes", "starts"
    );
    let mut healthy = true;
    for tally in &tallies {
        println!(
            "{:<12}{:>10}{:>12}{:>10}{:>9}{:>8}",
            tally.language, tally.completed, tally.reconciled, tally.replayed, tally.crashes, tally.starts
        );
        for failure in &tally.failures {
            eprintln!("{} worker: {failure}", tally.language);
        }
        if tally.unfinished > 0 {
            eprintln!("{} worker: {} of its share left unanswered", tally.language, tally.unfinished);
        }
        healthy &= tally.failures.is_empty() && tally.unfinished == 0;
    }
    println!();
    println!("double charges: {double}");
    healthy && double == 0 && finished == settings.payments && disagreements == 0
}

/// Runs a language's worker until its share is answered, starting it again
/// after each crash (with what the share still lacks).
async fn supervise(
    language: String,
    command: Vec<String>,
    share: Vec<u64>,
    environment: Vec<(String, String)>,
    barrier: Arc<Barrier>,
) -> Tally {
    let mut tally = Tally { language: language.clone(), ..Tally::default() };
    let mut left = share;
    let mut waited = false;
    while !left.is_empty() && tally.starts < MAX_STARTS && tally.failures.len() < 3 {
        tally.starts += 1;
        let payments = left.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let spawned = Command::new(&command[0])
            .args(&command[1..])
            .envs(environment.iter().cloned())
            .env("PAYMENTS", payments)
            .env("WORKER", &language)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                tally.failures.push(format!("cannot start {}: {error}", command.join(" ")));
                continue;
            }
        };
        let mut stderr = child.stderr.take().expect("piped stderr");
        let errors = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        let mut stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut summary = None;
        let mut this_run = 0;
        let read = async {
            while let Ok(Some(line)) = lines.next_line().await {
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields.as_slice() {
                    ["ready"] => {
                        if !waited {
                            barrier.wait().await;
                            waited = true;
                        }
                        if let Some(mut go) = stdin.take() {
                            let _ = go.write_all(b"go\n").await;
                        }
                    }
                    ["result", payment, how, code, body] => {
                        let payment = payment.strip_prefix("pay-").and_then(|n| n.parse::<u64>().ok());
                        let (Some(payment), Ok(code)) = (payment, code.parse::<i32>()) else { continue };
                        match *how {
                            "completed" => tally.completed += 1,
                            "replayed" => tally.replayed += 1,
                            "reconciled" => tally.reconciled += 1,
                            _ => continue,
                        }
                        if let Some(index) = left.iter().position(|&p| p == payment) {
                            left.swap_remove(index);
                        }
                        tally.answers.push((payment, code, body.to_string()));
                        this_run += 1;
                    }
                    ["summary", counts @ ..] => summary = Some(counts.join(" ")),
                    _ => {}
                }
            }
        };
        let timed_out = tokio::time::timeout(PROCESS_TIMEOUT, read).await.is_err();
        if timed_out {
            let _ = child.start_kill();
        }
        // A worker that died before it was ready must not hold the others.
        if !waited {
            barrier.wait().await;
            waited = true;
        }
        let status = child.wait().await;
        let errors = errors.await.unwrap_or_default();
        let tail = || errors.lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        match status.map(|s| s.code()) {
            Ok(Some(3)) if !timed_out => tally.crashes += 1,
            Ok(Some(0)) if !timed_out => {
                // The summary must account for exactly the answers printed.
                let answered = summary.as_deref().map(summed);
                if answered != Some(this_run) {
                    tally.failures.push(format!("its summary ({summary:?}) does not match its {this_run} answers"));
                }
            }
            other => {
                let why = if timed_out { "timed out".to_string() } else { format!("exited with {other:?}") };
                tally.failures.push(format!("{why}; its last errors:\n{}", tail()));
            }
        }
    }
    // Nor one that never started.
    if !waited {
        barrier.wait().await;
    }
    tally.unfinished = left.len();
    tally
}

/// completed + replayed + reconciled of a `summary` line.
fn summed(counts: &str) -> usize {
    counts
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .filter(|(name, _)| matches!(*name, "completed" | "replayed" | "reconciled"))
        .filter_map(|(_, value)| value.parse::<usize>().ok())
        .sum()
}
