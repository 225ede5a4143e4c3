//! The transport attacks of the hardening review, run for a bounded time
//! against a running idemd while a client with a valid token keeps calling.
//! `scripts/attack` starts idemd (auth on) and runs this; it prints
//!
//! ```text
//! attacks: N kinds, M connections, peak RSS X MiB, legit calls ok Y/Z
//! ```
//!
//! and exits non-zero when a legitimate call failed or the peak RSS rose
//! more than `--max-rss-growth-mib` over idle.
//!
//! The kinds, each run by its own task until the time is up:
//! - slow bodies: health and Begin streams that declare a large message
//!   and send all but its last bytes, over a few connections;
//! - idle sockets: TCP connections that never send a byte;
//! - fd exhaustion: connections opened as fast as possible, past
//!   `--max-connections`, each held until the server closes it;
//! - half-sent scrapes: `GET /metrics` without the end of its headers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::StreamBody;
use hyper::body::Frame;
use idemd::pb;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic::Request;

#[derive(Parser)]
struct Args {
    /// idemd's gRPC address.
    #[arg(long)]
    addr: SocketAddr,
    /// idemd's metrics address.
    #[arg(long)]
    metrics_addr: SocketAddr,
    /// A valid token for the namespace `payments` (the legitimate client's).
    #[arg(long, env = "IDEMD_TOKEN")]
    token: String,
    /// idemd's process id, to read its RSS.
    #[arg(long)]
    pid: u32,
    /// How long the attacks run.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Connections the fd-exhaustion attack keeps open at most.
    #[arg(long, default_value_t = 6000)]
    connections: usize,
    /// Silent connections the idle-socket attack holds.
    #[arg(long, default_value_t = 2000)]
    idle_sockets: usize,
    /// Fail when the peak RSS grows more than this over idle.
    #[arg(long, default_value_t = 100)]
    max_rss_growth_mib: u64,
}

/// A TCP connection, or `None` when the server does not take it within a second.
async fn connect(addr: SocketAddr) -> Option<TcpStream> {
    tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await.ok()?.ok()
}

/// `VmRSS` or `VmHWM` (the peak) of a process, in KiB.
fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    legit_ok: AtomicU64,
    legit_total: AtomicU64,
    scrapes_ok: AtomicU64,
    scrapes_total: AtomicU64,
}

type Chunk = Result<Frame<Bytes>, std::convert::Infallible>;

/// Streams that declare `declared` bytes and send `sent`, then hold the
/// stream open; re-opened as the server ends them.
async fn slow_bodies(addr: SocketAddr, until: Instant, counts: Arc<Counts>) {
    let begin = prost::Message::encode_to_vec(&pb::BeginRequest {
        namespace: "payments".into(),
        key: "slow".into(),
        ..Default::default()
    });
    while Instant::now() < until {
        let Some(stream) = connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        counts.connections.fetch_add(1, Ordering::Relaxed);
        let Ok((mut sender, connection)) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        else {
            continue;
        };
        let connection = tokio::spawn(connection);
        let mut held = Vec::new();
        for i in 0..128u32 {
            let (path, declared, payload): (&str, u32, Vec<u8>) = match i % 3 {
                0 => ("/grpc.health.v1.Health/Check", 4 << 20, vec![0; 16 * 1024]),
                1 => ("/grpc.health.v1.Health/Check", 1000, vec![0; 999]),
                _ => ("/idemd.v1.Idempotency/Begin", 1 << 20, begin.clone()),
            };
            let mut body = vec![0];
            body.extend_from_slice(&declared.to_be_bytes());
            body.extend_from_slice(&payload);
            let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(1);
            if tx.send(Ok(Frame::data(Bytes::from(body)))).await.is_err() {
                break;
            }
            let request = http::Request::post(format!("http://{addr}{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
            let Ok(request) = request else { break };
            if sender.ready().await.is_err() {
                break;
            }
            let response = sender.send_request(request);
            held.push((tx, tokio::spawn(response)));
        }
        // Hold the streams open until the server ends them or the time is up.
        let _ = tokio::time::timeout_at(until, connection).await;
        drop(held);
    }
}

/// TCP connections that never send a byte: `count` of them, held to the end.
async fn idle_sockets(addr: SocketAddr, count: usize, until: Instant, counts: Arc<Counts>) {
    let mut open = Vec::with_capacity(count);
    while open.len() < count && Instant::now() < until {
        match connect(addr).await {
            Some(socket) => {
                counts.connections.fetch_add(1, Ordering::Relaxed);
                open.push(socket);
            }
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    tokio::time::sleep_until(until).await;
}

/// Connections as fast as they open, each dropped only when the server
/// closes it (or at the end).
async fn fd_exhaustion(addr: SocketAddr, max: usize, until: Instant, counts: Arc<Counts>) {
    let held = Arc::new(AtomicU64::new(0));
    while Instant::now() < until {
        if held.load(Ordering::Relaxed) as usize >= max {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let Some(mut socket) = connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        counts.connections.fetch_add(1, Ordering::Relaxed);
        held.fetch_add(1, Ordering::Relaxed);
        let held = Arc::clone(&held);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buffer = [0u8; 64];
            let _ = tokio::time::timeout_at(until, socket.read(&mut buffer)).await;
            held.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// `GET /metrics` without the blank line that ends the headers, and a
/// whole scrape once a second (what Prometheus needs to get through).
async fn half_sent_scrapes(addr: SocketAddr, until: Instant, counts: Arc<Counts>) {
    let mut open = Vec::new();
    let mut next_scrape = Instant::now();
    while Instant::now() < until {
        if let Some(mut socket) = connect(addr).await {
            counts.connections.fetch_add(1, Ordering::Relaxed);
            let _ = socket.write_all(b"GET /metrics HTTP/1.1\r\nHost: idemd\r\n").await;
            open.push(socket);
        }
        if open.len() > 200 {
            open.remove(0);
        }
        if Instant::now() >= next_scrape {
            next_scrape += Duration::from_secs(1);
            counts.scrapes_total.fetch_add(1, Ordering::Relaxed);
            if tokio::time::timeout(Duration::from_secs(5), scrape(addr)).await.is_ok_and(|ok| ok) {
                counts.scrapes_ok.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A whole `GET /metrics`: true when it answered 200.
async fn scrape(addr: SocketAddr) -> bool {
    use tokio::io::AsyncReadExt;
    let Some(mut socket) = connect(addr).await else { return false };
    if socket.write_all(b"GET /metrics HTTP/1.1\r\nHost: idemd\r\nConnection: close\r\n\r\n").await.is_err() {
        return false;
    }
    let mut reply = Vec::new();
    let _ = socket.read_to_end(&mut reply).await;
    reply.starts_with(b"HTTP/1.1 200")
}

/// `message` with the token and a 5 s deadline.
fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(Duration::from_secs(5));
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// A payment service with a valid token: Begin then Complete, each with a
/// deadline, one pair every 50 ms, on a new connection every 10 pairs (as
/// new pods and reconnecting clients do).
async fn legitimate_client(args: &Args, until: Instant, counts: Arc<Counts>) {
    let channel = || {
        tonic::transport::Channel::from_shared(format!("http://{}", args.addr))
            .map(|endpoint| endpoint.connect_timeout(Duration::from_secs(5)).connect_lazy())
    };
    let Ok(first) = channel() else { return };
    let mut client = pb::idempotency_client::IdempotencyClient::new(first);
    let mut turn = 0u64;
    while Instant::now() < until {
        turn += 1;
        if turn.is_multiple_of(10)
            && let Ok(fresh) = channel()
        {
            client = pb::idempotency_client::IdempotencyClient::new(fresh);
        }
        counts.legit_total.fetch_add(1, Ordering::Relaxed);
        let key = format!("legit-{}-{turn}", std::process::id());
        let begin = pb::BeginRequest { namespace: "payments".into(), key: key.clone(), ..Default::default() };
        let result = async {
            let reply = client.begin(authed(begin, &args.token)).await?.into_inner();
            let Some(pb::begin_response::Outcome::Acquired(lease)) = reply.outcome else {
                return Err(tonic::Status::internal(format!("not acquired: {:?}", reply.outcome)));
            };
            let complete = pb::CompleteRequest {
                namespace: "payments".into(),
                key,
                lease_token: lease.lease_token,
                response: b"charged".to_vec(),
                ..Default::default()
            };
            client.complete(authed(complete, &args.token)).await.map(|_| ())
        }
        .await;
        match result {
            Ok(()) => {
                counts.legit_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => eprintln!("legitimate call failed: {status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let idle_kib = rss_kib(args.pid, "VmRSS:");
    let counts = Arc::new(Counts::default());
    let until = Instant::now() + args.duration;
    eprintln!("idle RSS {} MiB; attacking for {:?}", idle_kib / 1024, args.duration);
    let progress = {
        let counts = Arc::clone(&counts);
        let pid = args.pid;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                eprintln!(
                    "  {} connections so far, RSS {} MiB, legit {}/{}",
                    counts.connections.load(Ordering::Relaxed),
                    rss_kib(pid, "VmRSS:") / 1024,
                    counts.legit_ok.load(Ordering::Relaxed),
                    counts.legit_total.load(Ordering::Relaxed),
                );
            }
        })
    };
    let kinds = 4;
    tokio::join!(
        slow_bodies(args.addr, until, Arc::clone(&counts)),
        idle_sockets(args.addr, args.idle_sockets, until, Arc::clone(&counts)),
        fd_exhaustion(args.addr, args.connections, until, Arc::clone(&counts)),
        half_sent_scrapes(args.metrics_addr, until, Arc::clone(&counts)),
        legitimate_client(&args, until, Arc::clone(&counts)),
    );
    progress.abort();
    let peak_kib = rss_kib(args.pid, "VmHWM:");
    let (ok, total) = (counts.legit_ok.load(Ordering::Relaxed), counts.legit_total.load(Ordering::Relaxed));
    println!(
        "attacks: {kinds} kinds, {} connections, peak RSS {} MiB, legit calls ok {ok}/{total}",
        counts.connections.load(Ordering::Relaxed),
        peak_kib / 1024,
    );
    let growth_mib = peak_kib.saturating_sub(idle_kib) / 1024;
    let (scrapes_ok, scrapes) =
        (counts.scrapes_ok.load(Ordering::Relaxed), counts.scrapes_total.load(Ordering::Relaxed));
    println!("idle RSS {} MiB, peak {growth_mib} MiB over idle; scrapes ok {scrapes_ok}/{scrapes}", idle_kib / 1024);
    anyhow::ensure!(total > 0 && ok == total, "legitimate calls failed during the attacks");
    anyhow::ensure!(scrapes > 0 && scrapes_ok == scrapes, "scrapes of /metrics failed during the attacks");
    anyhow::ensure!(
        growth_mib <= args.max_rss_growth_mib,
        "peak RSS grew {growth_mib} MiB over idle (limit {} MiB)",
        args.max_rss_growth_mib
    );
    Ok(())
}
