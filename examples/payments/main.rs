//! The payment demo: proves "charged once" end to end.
//!
//! - a fake payment provider that records charges and, like Stripe,
//!   deduplicates by idempotency key; with `--provider-dedup off` it charges
//!   every call instead, and sometimes charges and then times out (the worker
//!   cannot tell whether it charged), but it can list the charges made with
//!   an idempotency key (as Stripe lists by metadata);
//! - a payment service that charges through idemd with the Rust client's
//!   `run_once`, passing idemd's `downstream_key` to the provider; against a
//!   provider without deduplication it uses `run_once_with_reconcile`, whose
//!   hook looks the `downstream_key` up whenever the previous attempt's
//!   outcome is unknown (`--reconcile off` leaves the hook out, to show what
//!   it prevents);
//! - a chaos driver: several concurrent workers per payment, transient
//!   provider failures (aborted and retried), declined cards (stored and
//!   replayed), and workers that crash between charging and completing.
//!
//! With `--languages rust` (the default) all of it runs in this process,
//! the workers as tasks. With other languages (`--languages
//! rust,python,typescript,go,java`) the provider serves HTTP on loopback and
//! the workers are processes of each language racing for the same payments
//! through their own client, some of them exiting between charging and
//! completing (see `polyglot.rs`; `payments worker` is the Rust one).
//!
//! It prints a ledger and ends with `double charges: <n>` (exit 1 unless 0
//! and every payment finished). Run it with `examples/payments/run`.

mod polyglot;
mod provider;
mod worker;

use std::sync::atomic::Ordering;
use std::time::Duration;

use idemd_client::{Attempt, Client, Failure, Policy, Response, entity_key, fingerprint};
use provider::{Provider, ProviderError, ProviderResult};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

impl ProviderResult {
    /// The answer the payment service stores: the same whether the charge
    /// call returned it or the reconcile hook found it later.
    fn into_response(self) -> Response {
        match self {
            ProviderResult::Charged { charge_id } => {
                Response { body: charge_id.into_bytes(), code: 201, content_type: "text/plain".into() }
            }
            ProviderResult::Declined => {
                Response { body: b"card_declined".to_vec(), code: 402, content_type: "text/plain".into() }
            }
        }
    }
}

struct Settings {
    payments: u64,
    workers: u64,
    seed: u64,
    provider_dedup: bool,
    reconcile: bool,
    addr: String,
    /// The languages whose workers race: `["rust"]` runs in-process.
    languages: Vec<String>,
}

fn on_off(flag: &str, value: &str) -> bool {
    match value {
        "on" => true,
        "off" => false,
        _ => panic!("{flag} takes on or off"),
    }
}

fn settings() -> Settings {
    let (mut payments, mut workers, mut seed, mut provider_dedup, mut reconcile) = (200, 3, 42, true, None);
    let mut addr = std::env::var("IDEMD_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let mut languages = vec!["rust".to_string()];
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).cloned().unwrap_or_default();
        let number = || value.parse::<u64>().unwrap_or_else(|_| panic!("{} needs a number", pair[0]));
        match pair[0].as_str() {
            "--payments" => payments = number(),
            "--workers" => workers = number(),
            "--seed" => seed = number(),
            "--provider-dedup" => provider_dedup = on_off(&pair[0], &value),
            "--reconcile" => reconcile = Some(on_off(&pair[0], &value)),
            "--addr" => addr = value,
            "--languages" => languages = value.split(',').filter(|l| !l.is_empty()).map(str::to_string).collect(),
            other => panic!(
                "unknown argument {other}: use --payments N --workers N --seed N \
                 --provider-dedup on|off --reconcile on|off --addr URL --languages rust,python,typescript,go,java"
            ),
        }
    }
    // As API.md advises: reconcile when the provider does not deduplicate.
    let reconcile = reconcile.unwrap_or(!provider_dedup);
    assert!(!languages.is_empty(), "--languages: name at least one of {:?}", polyglot::LANGUAGES);
    for language in &languages {
        assert!(
            polyglot::LANGUAGES.contains(&language.as_str()),
            "--languages: {language}? one of {:?}",
            polyglot::LANGUAGES
        );
    }
    Settings { payments, workers, seed, provider_dedup, reconcile, addr, languages }
}

async fn wait_until_ready(addr: &str) {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    for _ in 0..300 {
        if let Ok(channel) = tonic::transport::Channel::from_shared(addr.to_string()).expect("address").connect().await
            && let Ok(response) =
                HealthClient::new(channel).check(HealthCheckRequest { service: idemd::pb::SERVICE_NAME.into() }).await
            && response.into_inner().status == 1
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("idemd at {addr} is not ready");
}

/// One worker of one payment: retries until the payment has an answer.
async fn worker(
    client: Client,
    provider: &Provider,
    payment: u64,
    worker: u64,
    settings: &Settings,
) -> Option<Response> {
    let mut rng = StdRng::seed_from_u64(settings.seed ^ (payment << 8) ^ worker);
    let payment_id = format!("pay-{payment}");
    let key = entity_key(&payment_id, "charge");
    let amount = (1000 + payment * 7).to_string();
    let fp = fingerprint(&[("payment", payment_id.as_bytes()), ("amount", amount.as_bytes()), ("currency", b"EUR")]);
    let declined = provider::declined(payment);
    for _ in 0..60 {
        let (fail, crash) = (rng.random_bool(0.15), rng.random_bool(0.15));
        // Drawn only without deduplication, so that the default run's
        // chaos stays what it was for a given seed.
        let time_out = !settings.provider_dedup && rng.random_bool(0.15);
        let payment_id = &payment_id;
        let operation = |attempt: Attempt| async move {
            let result = provider.charge(&attempt.downstream_key, payment_id, declined, fail, time_out);
            if crash && result.is_ok() {
                // Charged, then the process dies before telling idemd.
                std::future::pending::<()>().await;
            }
            match result {
                Ok(ProviderResult::Declined) => Err(Failure::Final(ProviderResult::Declined.into_response())),
                Ok(charged) => Ok(charged.into_response()),
                Err(ProviderError::Transient) => Err(Failure::Retryable("provider 503")),
                Err(ProviderError::Timeout) => Err(Failure::OutcomeUnknown("provider timeout")),
            }
        };
        // Called only when the previous attempt's outcome is unknown.
        let reconcile = |attempt: Attempt| async move {
            Ok::<_, &str>(provider.find(&attempt.downstream_key).map(ProviderResult::into_response))
        };
        let call = async {
            if settings.reconcile {
                client.run_once_with_reconcile(&key, &fp, reconcile, operation).await
            } else {
                client.run_once(&key, &fp, operation).await
            }
        };
        // A crashed worker is one whose call never returns: cut it off. The
        // client then ends the lease at once as outcome-unknown (a dropped
        // call does); a process that dies leaves it to expire, which the
        // run with other languages shows.
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(done)) => return Some(done.response),
            Ok(Err(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await,
        }
    }
    None
}

#[tokio::main]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("worker") {
        return worker::run().await;
    }
    let settings = &settings();
    wait_until_ready(&settings.addr).await;
    let ok = if settings.languages == ["rust"] { in_process(settings).await } else { polyglot::run(settings).await };
    if !ok {
        std::process::exit(1);
    }
}

/// Every worker a task of this process, the provider called directly.
/// Returns whether every payment was charged once and answered alike.
async fn in_process(settings: &Settings) -> bool {
    let policy = Policy {
        lease_ttl: Duration::from_secs(1),
        wait: Duration::from_millis(500),
        in_progress_budget: Duration::from_secs(1),
        ..Policy::default()
    };
    let client = Client::connect_lazy(&settings.addr, "demo-payments", policy).expect("address");
    let provider = Provider::new(settings.provider_dedup);
    let started = std::time::Instant::now();

    let answers: Vec<Vec<Option<Response>>> = futures::future::join_all((0..settings.payments).map(|payment| {
        let (client, provider) = (client.clone(), &provider);
        async move {
            futures::future::join_all(
                (0..settings.workers).map(|w| worker(client.clone(), provider, payment, w, settings)),
            )
            .await
        }
    }))
    .await;

    let charges = provider.charges_per_payment.lock().expect("provider").clone();
    let mut finished = 0;
    let mut declined = 0;
    let mut disagreements = 0;
    for (payment, answers) in answers.iter().enumerate() {
        let got: Vec<&Response> = answers.iter().flatten().collect();
        if got.is_empty() {
            continue;
        }
        finished += 1;
        // Every worker of a payment saw the same stored answer.
        if got.iter().any(|r| *r != got[0]) {
            disagreements += 1;
        }
        if got[0].code == 402 {
            declined += 1;
        } else if charges.get(&format!("pay-{payment}")).copied().unwrap_or(0) == 0 {
            disagreements += 1;
        }
    }
    let double = print_ledger(settings, &provider, &charges, (finished, declined, disagreements), started);
    println!("double charges: {double}");
    double == 0 && finished == settings.payments as usize && disagreements == 0
}

/// Prints what the provider and the workers saw (the lines both modes share)
/// and returns how many payments were charged more than once.
fn print_ledger(
    settings: &Settings,
    provider: &Provider,
    charges: &std::collections::HashMap<String, u32>,
    (finished, declined, disagreements): (impl std::fmt::Display, impl std::fmt::Display, impl std::fmt::Display),
    started: std::time::Instant,
) -> usize {
    let kept: u32 = charges.values().sum();
    let double = charges.values().filter(|&&n| n > 1).count();
    let on_off = |on: bool| if on { "on" } else { "off" };
    println!("payments:                        {}", settings.payments);
    if settings.languages != ["rust"] {
        println!("languages:                       {}", settings.languages.join(", "));
    }
    println!("provider deduplication:          {}", on_off(settings.provider_dedup));
    println!("reconcile hook:                  {}", on_off(settings.reconcile));
    println!("finished (charged or declined):  {finished} ({declined} declined)");
    println!("workers per payment:             {}", settings.workers);
    println!("raw charge calls:                {}", provider.raw_calls.load(Ordering::SeqCst));
    println!("transient provider failures:     {}", provider.transient_failures.load(Ordering::SeqCst));
    println!("charges kept by the provider:    {kept}");
    println!("answers that disagree:           {disagreements}");
    if settings.provider_dedup {
        println!("double charges without the downstream key: {}", provider.deduplicated.load(Ordering::SeqCst));
    } else {
        let timeouts = provider.timeouts_after_charging.load(Ordering::SeqCst);
        println!("timeouts after charging:         {timeouts}");
    }
    if settings.reconcile {
        let (lookups, found) = (provider.lookups.load(Ordering::SeqCst), provider.lookups_found.load(Ordering::SeqCst));
        println!("reconcile lookups (found):       {lookups} ({found})");
    }
    println!("run time:                        {:.1?}", started.elapsed());
    double
}
