//! A real idemd per test (the binary `IDEMD_BIN` names, default the
//! workspace's `target/debug/idemd`, on a fresh SQLite file), clients on it,
//! the record as idemd sees it, an operator's hand (Admin), and a proxy that
//! loses replies or releases leases the way a network or an operator does.

use std::convert::Infallible;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::WithTrailers;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use idemd_client::pb::{self, admin_client::AdminClient, idempotency_client::IdempotencyClient};
use idemd_client::{Attempt, Client, Policy, Response};
use prost::Message;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub const NS: &str = "rust-payments";

/// A running idemd, killed when the test ends (also when it fails).
pub struct Server {
    process: Option<Child>,
    folder: PathBuf,
    /// `127.0.0.1:<port>`.
    pub addr: String,
}

impl Server {
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    pub fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr)).expect("address").connect_lazy()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.folder);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

pub async fn start_idemd() -> Server {
    let binary = std::env::var("IDEMD_BIN")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/debug/idemd").to_string());
    let port = free_port();
    let folder = std::env::temp_dir().join(format!("idemd-client-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&folder).expect("temp dir");
    let process = Command::new(&binary)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", "127.0.0.1:0"])
        .arg("--database-url")
        .arg(format!("sqlite://{}/idemd.db", folder.display()))
        .args(["--reaper-interval", "100ms"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary} ({e}): set IDEMD_BIN or run `cargo build --bin idemd`"));
    let server = Server { process: Some(process), folder, addr: format!("127.0.0.1:{port}") };
    let mut probe = IdempotencyClient::new(server.channel());
    for _ in 0..300 {
        let request = pb::LookupRequest { namespace: NS.into(), key: "startup".into() };
        match probe.lookup(request).await {
            Err(status) if status.code() == Code::NotFound => return server,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("idemd did not start");
}

pub fn client(server: &Server, policy: Policy) -> Client {
    Client::connect_lazy(&server.addr, NS, policy).expect("address")
}

/// Short leases and budgets, so that what waits on them fits in a test.
pub fn quick() -> Policy {
    Policy {
        lease_ttl: Duration::from_secs(2),
        wait: Duration::from_secs(2),
        in_progress_budget: Duration::from_secs(15),
        ..Policy::default()
    }
}

pub fn ok(body: &str) -> Response {
    Response { body: body.as_bytes().to_vec(), code: 201, content_type: "application/json".into() }
}

pub async fn lookup(server: &Server, key: &str) -> pb::Record {
    let request = pb::LookupRequest { namespace: NS.into(), key: key.into() };
    let mut grpc = IdempotencyClient::new(server.channel());
    grpc.lookup(request).await.expect("lookup").into_inner().record.expect("a record")
}

/// The record's history, oldest first, as its event kinds.
pub async fn history(server: &Server, key: &str) -> Vec<pb::EventKind> {
    let request = pb::GetHistoryRequest { namespace: NS.into(), key: key.into() };
    let events = AdminClient::new(server.channel()).get_history(request).await.expect("history").into_inner().events;
    events.iter().map(|event| event.kind()).collect()
}

/// Ends a running attempt as an operator would (Admin.Release), so its
/// holder's Complete answers LEASE_LOST.
pub async fn release(channel: Channel, key: &str, attempt: u32) {
    let request = pb::ReleaseRequest {
        namespace: NS.into(),
        key: key.into(),
        attempt,
        reason: "test: taken over".into(),
        outcome_unknown: true,
    };
    AdminClient::new(channel).release(request).await.expect("release");
}

/// The attempts an operation (or hook) was called with, in order.
#[derive(Default)]
pub struct Runs(Mutex<Vec<Attempt>>);

impl Runs {
    /// Records a call; returns how many there were, this one included.
    pub fn add(&self, attempt: Attempt) -> usize {
        let mut runs = self.0.lock().expect("runs");
        runs.push(attempt);
        runs.len()
    }

    pub fn count(&self) -> usize {
        self.0.lock().expect("runs").len()
    }

    pub fn get(&self, index: usize) -> Attempt {
        self.0.lock().expect("runs")[index].clone()
    }
}

/// What the proxy does besides forwarding.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fault {
    /// Nothing: it forwards and counts (and answers UNAVAILABLE when its
    /// upstream cannot be reached, as a load balancer without backends).
    None,
    /// The first Begin reaches idemd, which acts on it; its reply is then
    /// lost on the way back (the client sees UNAVAILABLE).
    LoseFirstBeginReply,
    /// Before each Complete reaches idemd, an operator releases the
    /// attempt, so idemd answers LEASE_LOST.
    ReleaseBeforeEveryComplete,
}

/// Begins that reached the upstream, with their replies when they had one.
pub type Begins = Arc<Mutex<Vec<(pb::BeginRequest, Option<pb::BeginResponse>)>>>;

/// A gRPC proxy in front of an upstream address.
pub struct Proxy {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// Every Begin that reached the upstream, with its reply when it had one.
    pub begins: Begins,
    /// Every Begin that reached the proxy.
    pub begin_calls: Arc<AtomicU32>,
}

struct ProxyState {
    upstream: Channel,
    fault: Fault,
    begins: Begins,
    begin_calls: Arc<AtomicU32>,
}

type ProxyBody = WithTrailers<Full<Bytes>, std::future::Ready<Option<Result<http::HeaderMap, Infallible>>>>;

const BEGIN: &str = "/idemd.v1.Idempotency/Begin";
const COMPLETE: &str = "/idemd.v1.Idempotency/Complete";

pub async fn proxy(upstream: &str, fault: Fault) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let upstream = Endpoint::from_shared(format!("http://{upstream}"))
        .expect("upstream")
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    let state = Arc::new(ProxyState { upstream, fault, begins: Arc::default(), begin_calls: Arc::default() });
    let proxy = Proxy { addr, begins: Arc::clone(&state.begins), begin_calls: Arc::clone(&state.begin_calls) };
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = Arc::clone(&state);
            let service = hyper::service::service_fn(move |request| forward(Arc::clone(&state), request));
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    proxy
}

fn status_response(status: Status) -> http::Response<ProxyBody> {
    status.into_http::<Full<Bytes>>().map(|body| body.with_trailers(std::future::ready(None)))
}

/// A gRPC message's bytes, without the 5-byte frame header.
fn message(frame: &Bytes) -> &[u8] {
    frame.get(5..).unwrap_or_default()
}

async fn forward(
    state: Arc<ProxyState>,
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<ProxyBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let sent = body.collect().await.map(|collected| collected.to_bytes()).unwrap_or_default();
    let path = parts.uri.path().to_string();
    if path == BEGIN {
        state.begin_calls.fetch_add(1, Ordering::SeqCst);
    }
    if path == COMPLETE && state.fault == Fault::ReleaseBeforeEveryComplete {
        let complete = pb::CompleteRequest::decode(message(&sent)).expect("a CompleteRequest");
        let lookup = pb::LookupRequest { namespace: complete.namespace, key: complete.key.clone() };
        let record = IdempotencyClient::new(state.upstream.clone()).lookup(lookup).await.expect("lookup");
        let attempt = record.into_inner().record.expect("a record").attempt;
        release(state.upstream.clone(), &complete.key, attempt).await;
    }
    let mut upstream = state.upstream.clone();
    let outgoing = http::Request::from_parts(parts, tonic::body::Body::new(Full::new(sent.clone())));
    let answered = async {
        std::future::poll_fn(|cx| upstream.poll_ready(cx)).await?;
        upstream.call(outgoing).await
    };
    let (head, body) = match answered.await {
        Ok(response) => response.into_parts(),
        Err(error) => return Ok(status_response(Status::unavailable(format!("proxy upstream: {error}")))),
    };
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(status) => return Ok(status_response(status)),
    };
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    if path == BEGIN {
        let request = pb::BeginRequest::decode(message(&sent)).expect("a BeginRequest");
        let reply = pb::BeginResponse::decode(message(&data)).ok().filter(|_| !data.is_empty());
        let mut begins = state.begins.lock().expect("begins");
        begins.push((request, reply));
        if state.fault == Fault::LoseFirstBeginReply && begins.len() == 1 {
            return Ok(status_response(Status::unavailable("the test lost this reply on its way back")));
        }
    }
    let body = Full::new(data).with_trailers(std::future::ready(trailers.map(Ok)));
    Ok(http::Response::from_parts(head, body))
}
