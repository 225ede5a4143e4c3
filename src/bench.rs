//! `idemd bench`: a bounded load generator against a running server.
//! Workers run Begin → Complete pairs (or Begins alone) over several
//! channels, a share of Begins hitting keys already in flight or completed;
//! latencies go into HDR histograms per RPC. Ping mode measures the bare
//! gRPC round trip (a health Check) through the same channels.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::time::Instant;
use tonic::transport::Channel;

use idemd_client::pb::{self, begin_response::Outcome, idempotency_client::IdempotencyClient};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Begin, then Complete when acquired: one pair per logical operation.
    Pairs,
    /// Begin only.
    Begin,
    /// Parked waiters: the bench holds one key and every worker sends a
    /// Begin for it with `wait_timeout` (the rest of `--duration`, at most
    /// 60 s), again and again; for measuring what waiting callers cost.
    Park,
    /// The gRPC floor: a health Check (`grpc.health.v1`) per operation,
    /// through the same server, channels and pacing, with no store call.
    /// What a round trip costs before idemd does anything.
    Ping,
}

/// Settings of `idemd bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchConfig {
    /// The server's gRPC address.
    #[arg(long, env = "IDEMD_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Concurrent workers, each with one call in flight.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// How long to run, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Distinct keys fresh Begins are drawn from (wrapping around).
    #[arg(long, default_value_t = 1_000_000_000)]
    pub keys: u64,
    /// Share of Begins (0–1) that reuse a recent key: in flight or completed.
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_ratio: f64,
    /// Bytes of each stored response.
    #[arg(long, default_value_t = 600)]
    pub payload_bytes: usize,
    /// Namespace of the benchmark's keys.
    #[arg(long, default_value = "bench")]
    pub namespace: String,
    #[arg(long, value_enum, default_value = "pairs")]
    pub mode: Mode,
    /// gRPC connections the workers share (default: min(concurrency, 8)).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Bearer token when the server runs with auth.
    #[arg(long, env = "IDEMD_TOKEN")]
    pub token: Option<String>,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Target operations per second over all workers (pairs, or Begins in
    /// begin mode), spread evenly; unset: as fast as they go. For latency at
    /// a given load rather than at saturation. A worker that falls behind
    /// starts its next operation at once, so the report's rate says whether
    /// the target was reached.
    #[arg(long)]
    pub rate: Option<f64>,
}

impl BenchConfig {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        anyhow::ensure!(self.keys >= 1, "--keys must be at least 1");
        anyhow::ensure!((0.0..=1.0).contains(&self.duplicate_ratio), "--duplicate-ratio must lie within [0, 1]");
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive");
        if let Some(rate) = self.rate {
            anyhow::ensure!(
                rate.is_finite() && rate > 0.0,
                "--rate must be a positive number of operations per second"
            );
        }
        Ok(())
    }
}

/// Recent keys duplicates are drawn from.
const RECENT_KEYS: usize = 1024;

#[derive(Default)]
struct Tally {
    pairs: AtomicU64,
    begins: AtomicU64,
    errors: AtomicU64,
    acquired: AtomicU64,
    completed: AtomicU64,
    in_progress: AtomicU64,
    pings: AtomicU64,
    errors_by_code: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn error(&self, status: &tonic::Status) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut by_code = self.errors_by_code.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *by_code.entry(format!("{:?}", status.code())).or_insert(0) += 1;
    }
}

struct Shared {
    config: BenchConfig,
    run: String,
    next_key: AtomicU64,
    recent: Mutex<Vec<String>>,
    tally: Tally,
    payload: Vec<u8>,
}

/// Latency histograms of one worker, merged at the end.
struct Latencies {
    begin: Histogram<u64>,
    complete: Histogram<u64>,
    /// From sending the Begin to the Complete's answer: what a payment pays.
    pair: Histogram<u64>,
    ping: Histogram<u64>,
}

impl Latencies {
    fn new() -> Self {
        Latencies { begin: histogram(), complete: histogram(), pair: histogram(), ping: histogram() }
    }

    fn add(&mut self, other: &Latencies) -> anyhow::Result<()> {
        for (mine, theirs) in [
            (&mut self.begin, &other.begin),
            (&mut self.complete, &other.complete),
            (&mut self.pair, &other.pair),
            (&mut self.ping, &other.ping),
        ] {
            mine.add(theirs).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(())
    }
}

fn histogram() -> Histogram<u64> {
    // Microseconds from 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("valid sigfig")) // ok: constants
}

impl Shared {
    fn key(&self, rng: &mut impl Rng) -> String {
        if self.config.duplicate_ratio > 0.0 && rng.random_bool(self.config.duplicate_ratio) {
            let recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !recent.is_empty() {
                return recent[rng.random_range(0..recent.len())].clone();
            }
        }
        let n = self.next_key.fetch_add(1, Ordering::Relaxed) % self.config.keys;
        let key = format!("{}-{n}", self.run);
        let mut recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() < RECENT_KEYS {
            recent.push(key.clone());
        } else {
            let slot = (n as usize) % RECENT_KEYS;
            recent[slot] = key.clone();
        }
        key
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(Duration::from_secs(10));
        if let Some(token) = &self.config.token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }
}

/// The key park mode holds and waits on.
const PARKING_KEY: &str = "parked";

/// A Begin for the key park mode holds and waits on.
fn parking_begin(shared: &Shared) -> pb::BeginRequest {
    pb::BeginRequest {
        namespace: shared.config.namespace.clone(),
        key: format!("{}-{PARKING_KEY}", shared.run),
        fingerprint: b"bench".to_vec(),
        ..Default::default()
    }
}

/// One Begin after another on the held key, each waiting until `until`.
async fn parked_worker(shared: Arc<Shared>, channel: Channel, until: Instant) -> Latencies {
    let mut client = IdempotencyClient::new(channel);
    let mut latencies = Latencies::new();
    let tally = &shared.tally;
    loop {
        let left = until.saturating_duration_since(Instant::now()).min(crate::config::MAX_WAIT_TIMEOUT);
        if left < Duration::from_millis(100) {
            break;
        }
        let begin = pb::BeginRequest { wait_timeout: Some(pb::duration(left)), ..parking_begin(&shared) };
        let mut request = shared.request(begin);
        request.set_timeout(left + Duration::from_secs(10));
        let started = Instant::now();
        let outcome = client.begin(request).await;
        let _ = latencies.begin.record(started.elapsed().as_micros() as u64);
        tally.begins.fetch_add(1, Ordering::Relaxed);
        match outcome.map(|r| r.into_inner().outcome) {
            Ok(Some(Outcome::InProgress(_))) => tally.in_progress.fetch_add(1, Ordering::Relaxed),
            Ok(Some(Outcome::Completed(_))) => tally.completed.fetch_add(1, Ordering::Relaxed),
            Ok(_) => tally.acquired.fetch_add(1, Ordering::Relaxed),
            Err(status) => {
                tally.error(&status);
                tokio::time::sleep(Duration::from_millis(100)).await;
                0
            }
        };
    }
    latencies
}

/// Park mode: takes the lease every worker will wait on, for the whole run.
async fn hold_parking_key(shared: &Shared, channel: Channel) -> anyhow::Result<()> {
    let lease_ttl = (shared.config.duration + Duration::from_secs(60)).min(crate::config::MAX_LEASE_TTL);
    let begin = pb::BeginRequest { lease_ttl: Some(pb::duration(lease_ttl)), ..parking_begin(shared) };
    match IdempotencyClient::new(channel).begin(shared.request(begin)).await?.into_inner().outcome {
        Some(Outcome::Acquired(_)) => Ok(()),
        other => anyhow::bail!("could not take the key the waiters park on: {other:?}"),
    }
}

/// Each worker's share of `--rate`, started at a random phase so the
/// workers do not fire together.
fn pace(config: &BenchConfig, rng: &mut impl Rng) -> Option<tokio::time::Interval> {
    config.rate.map(|rate| {
        let period = Duration::from_secs_f64(config.concurrency as f64 / rate);
        let start = Instant::now() + period.mul_f64(rng.random_range(0.0..1.0));
        let mut ticks = tokio::time::interval_at(start, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    })
}

/// Waits for the worker's next turn under `--rate`; false once the run is over.
async fn next_turn(pace: &mut Option<tokio::time::Interval>, until: Instant) -> bool {
    if Instant::now() >= until {
        return false;
    }
    if let Some(ticks) = pace.as_mut() {
        ticks.tick().await;
    }
    Instant::now() < until
}

/// Health Checks, one after another: the round trip without idemd's work.
async fn ping_worker(shared: Arc<Shared>, channel: Channel, until: Instant) -> Latencies {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut latencies = Latencies::new();
    let mut pace = pace(&shared.config, &mut rand::rng());
    while next_turn(&mut pace, until).await {
        let started = Instant::now();
        let check = shared.request(tonic_health::pb::HealthCheckRequest { service: String::new() });
        match client.check(check).await {
            Ok(_) => {
                let _ = latencies.ping.record(started.elapsed().as_micros() as u64);
                shared.tally.pings.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => shared.tally.error(&status),
        }
    }
    latencies
}

async fn worker(shared: Arc<Shared>, channel: Channel, until: Instant) -> Latencies {
    match shared.config.mode {
        Mode::Park => return parked_worker(shared, channel, until).await,
        Mode::Ping => return ping_worker(shared, channel, until).await,
        Mode::Pairs | Mode::Begin => {}
    }
    let mut client = IdempotencyClient::new(channel);
    let mut latencies = Latencies::new();
    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    let tally = &shared.tally;
    let mut pace = pace(&shared.config, &mut rng);
    while next_turn(&mut pace, until).await {
        let key = shared.key(&mut rng);
        let pair_started = Instant::now();
        let started = pair_started;
        let begin = pb::BeginRequest {
            namespace: shared.config.namespace.clone(),
            key: key.clone(),
            fingerprint: b"bench".to_vec(),
            ..Default::default()
        };
        let outcome = client.begin(shared.request(begin)).await;
        let _ = latencies.begin.record(started.elapsed().as_micros() as u64);
        tally.begins.fetch_add(1, Ordering::Relaxed);
        let lease = match outcome.map(|r| r.into_inner().outcome) {
            Ok(Some(Outcome::Acquired(lease))) => {
                tally.acquired.fetch_add(1, Ordering::Relaxed);
                lease
            }
            Ok(Some(Outcome::Completed(_))) => {
                tally.completed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(_) => {
                tally.in_progress.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(status) => {
                tally.error(&status);
                continue;
            }
        };
        if shared.config.mode == Mode::Begin {
            continue;
        }
        let started = Instant::now();
        let complete = pb::CompleteRequest {
            namespace: shared.config.namespace.clone(),
            key,
            lease_token: lease.lease_token,
            response: shared.payload.clone(),
            response_code: 201,
            content_type: "application/octet-stream".into(),
        };
        match client.complete(shared.request(complete)).await {
            Ok(_) => {
                let _ = latencies.complete.record(started.elapsed().as_micros() as u64);
                let _ = latencies.pair.record(pair_started.elapsed().as_micros() as u64);
                tally.pairs.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => tally.error(&status),
        }
    }
    latencies
}

fn percentiles(histogram: &Histogram<u64>) -> Value {
    let ms = |q: f64| (histogram.value_at_quantile(q) as f64 / 1000.0 * 1000.0).round() / 1000.0;
    json!({ "count": histogram.len(), "p50": ms(0.50), "p90": ms(0.90), "p99": ms(0.99), "p999": ms(0.999) })
}

/// Runs the benchmark and returns its report as JSON.
pub async fn run(config: BenchConfig) -> anyhow::Result<Value> {
    config.validate()?;
    let channel_count = config.channels.unwrap_or(config.concurrency.min(8)).max(1);
    let mut channels = Vec::with_capacity(channel_count);
    for _ in 0..channel_count {
        let channel = Channel::from_shared(config.addr.clone())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {} (--addr): {e}", config.addr))?;
        channels.push(channel);
    }
    let shared = Arc::new(Shared {
        run: format!("{:016x}", rand::rng().random::<u64>()),
        next_key: AtomicU64::new(0),
        recent: Mutex::new(Vec::with_capacity(RECENT_KEYS)),
        tally: Tally::default(),
        payload: vec![b'x'; config.payload_bytes],
        config: config.clone(),
    });
    if config.mode == Mode::Park {
        hold_parking_key(&shared, channels[0].clone()).await?;
    }
    let started = Instant::now();
    let until = started + config.duration;
    let workers: Vec<_> = (0..config.concurrency)
        .map(|i| tokio::spawn(worker(Arc::clone(&shared), channels[i % channel_count].clone(), until)))
        .collect();

    let progress = if config.json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new_spinner() };
    let ticker = {
        let (shared, progress) = (Arc::clone(&shared), progress.clone());
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let (counted, what) = match shared.config.mode {
                    Mode::Pairs => (shared.tally.pairs.load(Ordering::Relaxed), "pairs"),
                    Mode::Begin | Mode::Park => (shared.tally.begins.load(Ordering::Relaxed), "begins"),
                    Mode::Ping => (shared.tally.pings.load(Ordering::Relaxed), "pings"),
                };
                let rate = (counted - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), counted);
                progress.set_message(format!(
                    "{:.0}/{:.0} s · {rate:.0} {what}/s · {} errors",
                    started.elapsed().as_secs_f64().min(shared.config.duration.as_secs_f64()),
                    shared.config.duration.as_secs_f64(),
                    shared.tally.errors.load(Ordering::Relaxed)
                ));
                progress.tick();
            }
        })
    };

    let mut latencies = Latencies::new();
    for worker in workers {
        latencies.add(&worker.await?)?;
    }
    ticker.abort();
    progress.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    let tally = &shared.tally;
    let errors_by_code = tally.errors_by_code.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    Ok(json!({
        "mode": format!("{:?}", config.mode).to_lowercase(),
        "concurrency": config.concurrency,
        "rate_target": config.rate,
        "duration_s": elapsed,
        "duplicate_ratio": config.duplicate_ratio,
        "payload_bytes": config.payload_bytes,
        "pairs": tally.pairs.load(Ordering::Relaxed),
        "pairs_per_second": tally.pairs.load(Ordering::Relaxed) as f64 / elapsed,
        "begins_per_second": tally.begins.load(Ordering::Relaxed) as f64 / elapsed,
        "pings_per_second": tally.pings.load(Ordering::Relaxed) as f64 / elapsed,
        "outcomes": {
            "acquired": tally.acquired.load(Ordering::Relaxed),
            "completed": tally.completed.load(Ordering::Relaxed),
            "in_progress": tally.in_progress.load(Ordering::Relaxed),
        },
        "errors": tally.errors.load(Ordering::Relaxed),
        "errors_by_code": errors_by_code,
        "latency_ms": {
            "begin": percentiles(&latencies.begin),
            "complete": percentiles(&latencies.complete),
            "pair": percentiles(&latencies.pair),
            "ping": percentiles(&latencies.ping),
        },
    }))
}

/// The human-readable report.
pub fn render(report: &Value) -> String {
    let latency = |rpc: &str| {
        let l = &report["latency_ms"][rpc];
        format!(
            "{rpc:<9} p50 {:>7.3} ms  p90 {:>7.3} ms  p99 {:>7.3} ms  p99.9 {:>7.3} ms  ({} calls)",
            l["p50"].as_f64().unwrap_or(0.0),
            l["p90"].as_f64().unwrap_or(0.0),
            l["p99"].as_f64().unwrap_or(0.0),
            l["p999"].as_f64().unwrap_or(0.0),
            l["count"]
        )
    };
    let errors = match report["errors_by_code"].as_object() {
        Some(map) if !map.is_empty() => {
            map.iter().map(|(code, n)| format!("{code} {n}")).collect::<Vec<_>>().join(", ")
        }
        _ => "none".to_string(),
    };
    if report["mode"] == "ping" {
        return format!(
            "ping mode (health Check, no store call), {} workers, {:.1} s\npings/s   {:.1}\n{}\nerrors    {}",
            report["concurrency"],
            report["duration_s"].as_f64().unwrap_or(0.0),
            report["pings_per_second"].as_f64().unwrap_or(0.0),
            latency("ping"),
            errors
        );
    }
    format!(
        "{} mode, {} workers, {:.1} s, duplicate ratio {}, {}-byte responses\n\
         pairs/s   {:.1}\nbegins/s  {:.1}\n{}\n{}\n{}\noutcomes  acquired {}, completed (replayed) {}, in_progress {}\nerrors    {}",
        report["mode"].as_str().unwrap_or(""),
        report["concurrency"],
        report["duration_s"].as_f64().unwrap_or(0.0),
        report["duplicate_ratio"],
        report["payload_bytes"],
        report["pairs_per_second"].as_f64().unwrap_or(0.0),
        report["begins_per_second"].as_f64().unwrap_or(0.0),
        latency("begin"),
        latency("complete"),
        latency("pair"),
        report["outcomes"]["acquired"],
        report["outcomes"]["completed"],
        report["outcomes"]["in_progress"],
        errors
    )
}
