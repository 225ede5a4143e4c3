//! What a peer without credentials can hold, and what one credential can
//! take from the others: each test here is an attack that used to succeed.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use idemd::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tonic::{Code, Request};

use crate::helpers::*;
use crate::validation::{frame, raw_call, raw_call_with_header, status_of};

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const REFLECTION: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
const BEGIN: &str = "/idemd.v1.Idempotency/Begin";

type Sender = hyper::client::conn::http2::SendRequest<StreamBody<tokio_stream::wrappers::ReceiverStream<Chunk>>>;
type Chunk = Result<Frame<Bytes>, std::convert::Infallible>;

/// A bare HTTP/2 connection; the connection task ends when the server closes it.
async fn h2(addr: std::net::SocketAddr) -> (Sender, tokio::task::JoinHandle<()>) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("HTTP/2 handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, task)
}

/// Starts a call whose body is `first` and then stays open until the
/// returned sender drops; resolves to the call's status.
async fn open_call(
    sender: &mut Sender,
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&'static str, String)],
    first: Vec<u8>,
) -> (mpsc::Sender<Chunk>, tokio::task::JoinHandle<tonic::Status>) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(Ok(Frame::data(Bytes::from(first)))).await.expect("queue");
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    let request = request.body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))).expect("request");
    sender.ready().await.expect("ready");
    let response = sender.send_request(request);
    let answer = tokio::spawn(async move { status_of(response.await.expect("an HTTP response")).await });
    (tx, answer)
}

async fn answered_within(
    answer: tokio::task::JoinHandle<tonic::Status>,
    within: Duration,
    what: &str,
) -> tonic::Status {
    tokio::time::timeout(within, answer)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {within:?}"))
        .expect("task")
}

fn tokens_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("tokens");
    let partial = dir.join(".tokens.partial");
    std::fs::write(&partial, text).expect("write");
    std::fs::rename(&partial, &path).expect("rename");
    path
}

fn token(grants: &[&str]) -> (String, String) {
    idemd::auth::new_token(&grants.iter().map(|g| g.to_string()).collect::<Vec<_>>()).expect("token")
}

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    request
}

async fn auth_app(dir: &Path, text: &str, tweak: impl FnOnce(&mut idemd::config::ServeConfig)) -> TestApp {
    let path = tokens_file(dir, text);
    spawn_app_with(Backend::Sqlite, |c| {
        c.auth_tokens_file = Some(path);
        tweak(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_its_methods_limit_is_refused_before_its_bytes_arrive() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, line) = token(&[NS]);
    let app = auth_app(dir.path(), &line, |_| {}).await;
    let (mut sender, _connection) = h2(app.addr).await;
    // Health and reflection need no credentials: ~4 MiB declared, a few bytes sent.
    let (_open, answer) = open_call(&mut sender, app.addr, HEALTH_CHECK, &[], frame(0, 4 << 20, &[0; 100])).await;
    assert_invalid_field(&answered_within(answer, Duration::from_secs(5), "health").await, "request");
    // Reflection ends its stream when the request stream fails (tonic-reflection
    // answers OK then): what matters is that the stream ends at once.
    let (_open, answer) = open_call(&mut sender, app.addr, REFLECTION, &[], frame(0, 4 << 20, &[0; 100])).await;
    let status = answered_within(answer, Duration::from_secs(5), "reflection").await;
    assert!(matches!(status.code(), Code::Ok | Code::InvalidArgument), "{status:?}");
    // Without auth, Begin's limit is its own largest message, not Complete's.
    let open = spawn_app(Backend::Sqlite).await;
    let (mut sender, _connection) = h2(open.addr).await;
    let (_open, answer) = open_call(&mut sender, open.addr, BEGIN, &[], frame(0, 1 << 20, &[0; 100])).await;
    assert_invalid_field(&answered_within(answer, Duration::from_secs(5), "Begin").await, "request");
    open.acquire(begin_req("the server is fine")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_finishes_arriving_is_cut_at_the_read_timeout() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.request_read_timeout = Duration::from_millis(500)).await;
    let (mut sender, _connection) = h2(app.addr).await;
    let begin = prost::Message::encode_to_vec(&begin_req("slow"));
    let length = u32::try_from(begin.len()).expect("small");
    let cases = [
        (HEALTH_CHECK, Vec::new(), frame(0, 100, &[0; 50])),
        // The caller's own deadline is a minute: the read timeout holds regardless.
        (BEGIN, vec![("grpc-timeout", "60S".to_string())], frame(0, length, &begin[..begin.len() - 1])),
        // The whole message but no end of stream.
        (BEGIN, vec![], frame(0, length, &begin)),
    ];
    for (path, headers, body) in cases {
        let (_open, answer) = open_call(&mut sender, app.addr, path, &headers, body).await;
        let status = answered_within(answer, Duration::from_secs(5), path).await;
        assert_error(&status, Code::DeadlineExceeded, "REQUEST_READ_TIMEOUT");
    }
    app.acquire(begin_req("slow")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_credentials_hold_a_bounded_number_of_bytes_per_connection() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, line) = token(&[NS]);
    let app = auth_app(dir.path(), &line, |c| c.request_read_timeout = Duration::from_secs(30)).await;
    let (mut sender, _connection) = h2(app.addr).await;
    let per_stream = idemd::request_guard::HEALTH_MESSAGE_BYTES;
    let streams = 2 * idemd::request_guard::UNAUTHENTICATED_BYTES_PER_CONNECTION / per_stream;
    let mut open = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..streams {
        let declared = u32::try_from(per_stream - 5).expect("small");
        let (tx, answer) =
            open_call(&mut sender, app.addr, HEALTH_CHECK, &[], frame(0, declared, &vec![0; per_stream - 6])).await;
        open.push(tx);
        answers.push(answer);
    }
    // The streams beyond the budget are answered at once; the others wait for their last byte.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut exhausted = 0;
    for answer in answers {
        if answer.is_finished() {
            let status = answer.await.expect("task");
            assert_error(&status, Code::ResourceExhausted, "UNAUTHENTICATED_BYTES");
            exhausted += 1;
        }
    }
    assert!(exhausted >= streams / 3, "only {exhausted} of {streams} streams were refused");
    assert!(exhausted < streams, "the budget refused every stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_cannot_lock_out_a_caller_with_credentials() {
    let dir = tempfile::tempdir().expect("dir");
    let (secret, line) = token(&[NS]);
    let app = auth_app(dir.path(), &line, |c| c.max_connections = 16).await;
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(TcpStream::connect(app.addr).await.expect("the kernel accepts"));
    }
    let mut client = pb::idempotency_client::IdempotencyClient::new(test_channel(app.addr, None));
    let mut request = authed(begin_req("through the flood"), &secret);
    request.set_timeout(Duration::from_secs(5));
    client.begin(request).await.expect("a caller with credentials gets a slot");
    // With every other slot silent, the authenticated connection keeps its slot under more flooding.
    for _ in 0..64 {
        silent.push(TcpStream::connect(app.addr).await.expect("the kernel accepts"));
    }
    client
        .lookup(authed(pb::LookupRequest { namespace: NS.into(), key: "through the flood".into() }, &secret))
        .await
        .expect("still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_sends_nothing_is_dropped_at_the_first_request_timeout() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.first_request_timeout = Duration::from_millis(300)).await;
    let half_sent: [(_, &[u8]); 2] = [(app.addr, b"PRI * HTTP/2.0\r\n"), (app.metrics_addr, b"GET /metr")];
    for (port, start) in half_sent {
        let mut socket = TcpStream::connect(port).await.expect("connect");
        // Half an HTTP/2 preface (or half a request line), then silence.
        socket.write_all(start).await.expect("write");
        let mut buffer = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match socket.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{port}: a silent socket stays open");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_the_client_reconnects() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.connection_idle_timeout = Duration::from_secs(1)).await;
    let (mut sender, connection) = h2(app.addr).await;
    let check = prost::Message::encode_to_vec(&tonic_health::pb::HealthCheckRequest { service: String::new() });
    let (tx, answer) = open_call(
        &mut sender,
        app.addr,
        HEALTH_CHECK,
        &[],
        frame(0, u32::try_from(check.len()).expect("small"), &check),
    )
    .await;
    drop(tx);
    assert_eq!(answered_within(answer, Duration::from_secs(5), "health").await.code(), Code::Ok);
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the idle connection was closed")
        .expect("task");
    // A tonic channel reconnects on its next call.
    app.acquire(begin_req("after idling")).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    app.acquire(begin_req("after idling again")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_refused_only_when_every_slot_holds_a_call() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.max_connections = 2).await;
    app.acquire(begin_req("held")).await;
    let connect = || tonic::transport::Channel::from_shared(format!("http://{}", app.addr)).expect("uri");
    // Two callers wait on the held key: both slots hold an authenticated call.
    let mut waiters = Vec::new();
    for parked in [1.0, 2.0] {
        let channel = connect().connect().await.expect("a slot");
        let mut client = pb::idempotency_client::IdempotencyClient::new(channel);
        let request = pb::BeginRequest { wait_timeout: secs(3), ..begin_req("held") };
        waiters.push(tokio::spawn(async move { client.begin(request).await }));
        eventually("the waiter parked", Duration::from_secs(10), || async {
            let metrics = scrape(app.metrics_addr).await;
            (metrics.get("idemd_waiters").copied() == Some(parked)).then_some(())
        })
        .await;
    }
    let refused = async {
        let channel = connect().connect_timeout(Duration::from_secs(2)).connect().await.ok()?;
        let request = pb::LookupRequest { namespace: NS.into(), key: "held".into() };
        pb::idempotency_client::IdempotencyClient::new(channel).lookup(request).await.ok()
    };
    assert!(refused.await.is_none(), "a third connection must not reach the service");
    for waiter in waiters {
        let outcome = waiter.await.expect("task").expect("answered").into_inner().outcome;
        assert!(matches!(outcome, Some(pb::begin_response::Outcome::InProgress(_))), "{outcome:?}");
    }
    // Now idle, their slots can be taken.
    eventually("a slot is free again", Duration::from_secs(10), || async {
        let channel = connect().connect().await.ok()?;
        let request = pb::LookupRequest { namespace: NS.into(), key: "held".into() };
        pb::idempotency_client::IdempotencyClient::new(channel).lookup(request).await.ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_has_the_same_caps_and_timeouts() {
    let app = spawn_app_with(Backend::Sqlite, |c| {
        c.metrics_max_connections = 2;
        c.first_request_timeout = Duration::from_secs(30);
    })
    .await;
    let mut half_sent = Vec::new();
    for _ in 0..20 {
        let mut socket = TcpStream::connect(app.metrics_addr).await.expect("connect");
        socket.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.expect("write");
        half_sent.push(socket);
    }
    let metrics = tokio::time::timeout(Duration::from_secs(10), scrape(app.metrics_addr)).await.expect("scraped");
    assert!(metrics.keys().any(|name| name.starts_with("idemd_build_info")), "{metrics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_credential_gets_one_share_whatever_namespaces_it_spreads_over() {
    let dir = tempfile::tempdir().expect("dir");
    let (spreader, spreader_line) = token(&["pay.*"]);
    let (other, other_line) = token(&[NS]);
    let app = auth_app(dir.path(), &format!("{spreader_line}\n{other_line}\n"), |c| {
        c.rate_limit_per_namespace = 5;
        c.max_waiters_per_namespace = 2;
    })
    .await;
    let mut client = app.client.clone();
    let mut passed = 0;
    let started = std::time::Instant::now();
    for i in 0..20 {
        let request = pb::LookupRequest { namespace: format!("pay.n{i}"), key: "k".into() };
        match client.lookup(authed(request, &spreader)).await {
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert_error(&status, Code::ResourceExhausted, "RATE_LIMITED");
            }
            _ => passed += 1,
        }
    }
    // A burst of 5, and 5 more per second the calls took: a loaded machine
    // that takes long over them earns the credential more calls, not 20.
    let earned = 5 + (5.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(passed <= earned.min(19), "{passed} of 20 calls passed a rate of 5/s in {:?}", started.elapsed());
    // The other tenant's allowance is its own.
    client.begin(authed(begin_req("own share"), &other)).await.expect("another credential");

    // Waiters: two in one namespace each would be four; the credential allows two.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut waiting = Vec::new();
    for namespace in ["pay.a", "pay.b"] {
        let key = pb::BeginRequest { namespace: namespace.into(), ..begin_req("busy") };
        client.begin(authed(key.clone(), &spreader)).await.expect("acquired");
        let mut client = client.clone();
        let secret = spreader.clone();
        let request = pb::BeginRequest { wait_timeout: secs(3), ..key };
        waiting.push(tokio::spawn(async move { client.begin(authed(request, &secret)).await }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let third = pb::BeginRequest { namespace: "pay.c".into(), ..begin_req("busy") };
    client.begin(authed(third.clone(), &spreader)).await.expect("acquired");
    let status = client
        .begin(authed(pb::BeginRequest { wait_timeout: secs(3), ..third }, &spreader))
        .await
        .expect_err("a third waiter of the same credential");
    assert_error(&status, Code::ResourceExhausted, "TOO_MANY_WAITERS");
    for waiter in waiting {
        waiter.await.expect("task").expect("the first two waited");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_grant_never_covers_an_empty_segment() {
    let dir = tempfile::tempdir().expect("dir");
    let (secret, line) = token(&["pay.*"]);
    let app = auth_app(dir.path(), &line, |_| {}).await;
    let mut client = app.client.clone();
    client
        .begin(authed(pb::BeginRequest { namespace: "pay.eu".into(), ..begin_req("k") }, &secret))
        .await
        .expect("granted");
    for namespace in ["pay.", "pay..x", "pay.x."] {
        let request = pb::BeginRequest { namespace: namespace.into(), ..begin_req("k") };
        let status = client.begin(authed(request, &secret)).await.expect_err(namespace);
        assert_error(&status, Code::PermissionDenied, "NAMESPACE_DENIED");
    }
}

fn gauge(metrics: &std::collections::BTreeMap<String, f64>, name: &str) -> Option<f64> {
    metrics.get(name).copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_holds_even_beside_a_bad_line_and_whatever_the_mtime() {
    let dir = tempfile::tempdir().expect("dir");
    let (kept, kept_line) = token(&[NS]);
    let (revoked, revoked_line) = token(&[NS]);
    let app = auth_app(dir.path(), &format!("{kept_line}\n{revoked_line}\n"), |_| {}).await;
    let mut client = app.client.clone();
    client.begin(authed(begin_req("a"), &revoked)).await.expect("granted before the revocation");
    assert_eq!(gauge(&scrape(app.metrics_addr).await, "idemd_auth_tokens_file_in_force"), Some(1.0));

    // The revocation ships with a typo on another line.
    let path = tokens_file(dir.path(), &format!("{kept_line}\nsha256:not-hex {NS}\n"));
    eventually("the revoked token is refused", Duration::from_secs(10), || {
        let mut client = client.clone();
        let revoked = revoked.clone();
        async move { client.begin(authed(begin_req("b"), &revoked)).await.err() }
    })
    .await;
    client.begin(authed(begin_req("c"), &kept)).await.expect("the good lines are in force");
    let metrics = scrape(app.metrics_addr).await;
    assert_eq!(gauge(&metrics, "idemd_auth_tokens_file_in_force"), Some(0.0), "the bad line is left out");
    assert_eq!(gauge(&metrics, "idemd_auth_tokens_file_bad_lines"), Some(1.0));

    // A replacement that keeps the old modification time (`cp -p`) is noticed too.
    let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).expect("mtime");
    let (newer, newer_line) = token(&[NS]);
    std::fs::write(&path, format!("{kept_line}\n{newer_line}\n")).expect("write");
    std::fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(mtime)).expect("keep the mtime");
    eventually("the new token works", Duration::from_secs(10), || {
        let mut client = client.clone();
        let newer = newer.clone();
        async move { client.begin(authed(begin_req("d"), &newer)).await.ok() }
    })
    .await;
    eventually("the file is in force again", Duration::from_secs(10), || async {
        (gauge(&scrape(app.metrics_addr).await, "idemd_auth_tokens_file_in_force") == Some(1.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unimplemented_reply_carries_error_info_and_messages_are_encoded_once() {
    let app = spawn_app(Backend::Sqlite).await;
    for path in ["/idemd.v1.Idempotency/NoSuchMethod", "/no.such.Service/Method"] {
        let status = raw_call(&app, path, frame(0, 0, &[])).await;
        assert_error(&status, Code::Unimplemented, "UNIMPLEMENTED");
    }
    let lookup = prost::Message::encode_to_vec(&pb::LookupRequest { namespace: NS.into(), key: "k".into() });
    for path in [BEGIN, "/idemd.v1.Idempotency/Lookup"] {
        let status = raw_call_with_header(
            &app,
            path,
            Some(("grpc-encoding", "gzip")),
            frame(1, u32::try_from(lookup.len()).expect("small"), &lookup),
        )
        .await;
        assert_error(&status, Code::Unimplemented, "UNIMPLEMENTED");
        assert!(status.message().contains("gzip"), "{status:?}");
    }
    // A framing error's message reads as text, not as percent-encoded text.
    let status = raw_call(&app, BEGIN, frame(0, 10, &[1, 2])).await;
    assert_invalid_field(&status, "request");
    assert!(!status.message().contains('%'), "{:?}", status.message());
}

/// `sh -c 'ulimit …; exec idemd serve …'`: the process's file-descriptor limit set before it starts.
fn serve_under_limit(soft: u64, hard: u64, dir: &Path, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_idemd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--database-url", &format!("sqlite://{}", dir.join("idemd.db").display())])
        .args(args)
        .env("RUST_LOG", "info");
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_descriptor_limit_is_raised_or_the_configuration_refused() {
    let dir = tempfile::tempdir().expect("dir");
    // The hard limit cannot honour --max-connections: refused, saying what to change.
    let output = serve_under_limit(100, 200, dir.path(), &["--max-connections", "4096"]).output().expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--max-connections") && stderr.contains("ulimit"), "{stderr}");

    // A soft limit below, a hard limit above: raised, and served.
    let mut child = serve_under_limit(100, 1024, dir.path(), &["--max-connections", "500"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start");
    let stderr = child.stderr.take().expect("stderr");
    let raised = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok).take(100) {
            let done = line.contains("idemd listening");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    let lines = tokio::time::timeout(Duration::from_secs(30), raised).await.expect("started in time").expect("task");
    let _ = child.kill();
    let _ = child.wait();
    assert!(lines.iter().any(|l| l.contains("idemd listening")), "idemd did not start: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("raised the file-descriptor soft limit")), "{lines:?}");
}
