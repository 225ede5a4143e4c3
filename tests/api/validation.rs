//! Every malformed field gets INVALID_ARGUMENT / INVALID_FIELD naming the
//! field; none produces INTERNAL or a panic (the server keeps answering).

use idemd::pb;
use prost_types::Duration as PbDuration;

use crate::helpers::*;

fn d(seconds: i64, nanos: i32) -> Option<PbDuration> {
    Some(PbDuration { seconds, nanos })
}

fn bad_identities() -> Vec<(&'static str, String, String)> {
    vec![
        ("namespace", String::new(), "k".into()),
        ("namespace", "Payments".into(), "k".into()),
        ("namespace", "pay/ments".into(), "k".into()),
        ("namespace", "a".repeat(65), "k".into()),
        ("key", NS.into(), String::new()),
        ("key", NS.into(), "k".repeat(256)),
        ("key", NS.into(), "a\u{0}b".into()),
        ("key", NS.into(), "a\nb".into()),
        ("key", NS.into(), "a\u{7f}".into()),
        ("key", NS.into(), "a\u{9f}".into()),
    ]
}

async fn malformed_begin_fields_are_invalid_argument(backend: Backend) {
    let app = spawn_app(backend).await;
    for (field, namespace, key) in bad_identities() {
        let request = pb::BeginRequest { namespace, key, ..begin_req("k") };
        assert_invalid_field(&app.begin(request).await.expect_err(field), field);
    }
    let cases: Vec<(&str, pb::BeginRequest)> = vec![
        ("fingerprint", pb::BeginRequest { fingerprint: vec![1; 65], ..begin_req("k") }),
        ("lease_ttl", pb::BeginRequest { lease_ttl: d(0, 0), ..begin_req("k") }),
        ("lease_ttl", pb::BeginRequest { lease_ttl: d(0, 999_999_999), ..begin_req("k") }),
        ("lease_ttl", pb::BeginRequest { lease_ttl: d(3601, 0), ..begin_req("k") }),
        ("lease_ttl", pb::BeginRequest { lease_ttl: d(-5, 0), ..begin_req("k") }),
        ("lease_ttl", pb::BeginRequest { lease_ttl: d(5, -1), ..begin_req("k") }),
        ("lease_ttl", pb::BeginRequest { lease_ttl: d(5, 1_000_000_000), ..begin_req("k") }),
        ("lease_ttl", pb::BeginRequest { lease_ttl: d(i64::MAX, 0), ..begin_req("k") }),
        ("retention", pb::BeginRequest { retention: d(0, 0), ..begin_req("k") }),
        ("retention", pb::BeginRequest { retention: d(3600, 0), ..begin_req("k") }),
        ("retention", pb::BeginRequest { retention: d(31 * 24 * 3600, 0), ..begin_req("k") }),
        ("retention", pb::BeginRequest { retention: d(-86400, 0), ..begin_req("k") }),
        ("wait_timeout", pb::BeginRequest { wait_timeout: d(61, 0), ..begin_req("k") }),
        ("wait_timeout", pb::BeginRequest { wait_timeout: d(-1, 0), ..begin_req("k") }),
        ("wait_timeout", pb::BeginRequest { wait_timeout: d(1, -5), ..begin_req("k") }),
        ("attempt_nonce", pb::BeginRequest { attempt_nonce: "n".repeat(129), ..begin_req("k") }),
        ("attempt_nonce", pb::BeginRequest { attempt_nonce: "n\u{0}".into(), ..begin_req("k") }),
    ];
    for (field, request) in cases {
        let status = app.begin(request.clone()).await.expect_err(field);
        assert_invalid_field(&status, field);
    }
    // Boundaries that are valid.
    let ok = pb::BeginRequest {
        namespace: "a".repeat(64),
        key: "é".repeat(127),
        fingerprint: vec![0; 64],
        lease_ttl: d(3600, 0),
        retention: d(30 * 24 * 3600, 0),
        wait_timeout: d(0, 0),
        attempt_nonce: "n".repeat(128),
    };
    app.acquire(ok).await;
    let one_second = pb::BeginRequest { lease_ttl: secs(1), retention: secs(86400), ..begin_req("b") };
    app.acquire(one_second).await;
    assert_eq!(app.row_count(NS, "k").await, 0, "no rejected request wrote anything");
}

async fn malformed_complete_abort_heartbeat_lookup_fields_are_invalid_argument(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.max_response_bytes = 1000).await;
    let acquired = app.acquire(begin_req("k")).await;
    let token = acquired.lease_token.clone();
    let mut client = app.client.clone();
    for (field, namespace, key) in bad_identities() {
        let complete = pb::CompleteRequest {
            namespace: namespace.clone(),
            key: key.clone(),
            lease_token: token.clone(),
            ..Default::default()
        };
        assert_invalid_field(&client.complete(complete).await.expect_err(field), field);
        let abort = pb::AbortRequest {
            namespace: namespace.clone(),
            key: key.clone(),
            lease_token: token.clone(),
            ..Default::default()
        };
        assert_invalid_field(&client.abort(abort).await.expect_err(field), field);
        let heartbeat = pb::HeartbeatRequest {
            namespace: namespace.clone(),
            key: key.clone(),
            lease_token: token.clone(),
            ..Default::default()
        };
        assert_invalid_field(&client.heartbeat(heartbeat).await.expect_err(field), field);
        let lookup = pb::LookupRequest { namespace, key };
        assert_invalid_field(&client.lookup(lookup).await.expect_err(field), field);
    }
    let complete = |f: fn(&mut pb::CompleteRequest)| {
        let mut request = pb::CompleteRequest {
            namespace: NS.into(),
            key: "k".into(),
            lease_token: token.clone(),
            ..Default::default()
        };
        f(&mut request);
        request
    };
    for (field, request) in [
        ("lease_token", complete(|r| r.lease_token.clear())),
        ("response", complete(|r| r.response = vec![0; 1001])),
        ("content_type", complete(|r| r.content_type = "t".repeat(256))),
        ("content_type", complete(|r| r.content_type = "text/plain\n".into())),
    ] {
        assert_invalid_field(&client.complete(request).await.expect_err(field), field);
    }
    let abort = |token: &str, reason: String| pb::AbortRequest {
        namespace: NS.into(),
        key: "k".into(),
        lease_token: token.into(),
        reason,
        outcome_unknown: false,
    };
    assert_invalid_field(&client.abort(abort("", String::new())).await.expect_err("token"), "lease_token");
    assert_invalid_field(&client.abort(abort(&token, "r".repeat(1025))).await.expect_err("reason"), "reason");
    assert_invalid_field(&client.abort(abort(&token, "a\u{0}".into())).await.expect_err("reason"), "reason");
    let heartbeat = |token: &str, ttl| pb::HeartbeatRequest {
        namespace: NS.into(),
        key: "k".into(),
        lease_token: token.into(),
        lease_ttl: ttl,
    };
    assert_invalid_field(&client.heartbeat(heartbeat("", None)).await.expect_err("token"), "lease_token");
    assert_invalid_field(&client.heartbeat(heartbeat(&token, d(0, 0))).await.expect_err("ttl"), "lease_ttl");
    assert_invalid_field(&client.heartbeat(heartbeat(&token, d(7200, 0))).await.expect_err("ttl"), "lease_ttl");

    // The record is untouched and the holder can still finish at the limit.
    let exactly = complete(|r| r.response = vec![0; 1000]);
    client.complete(exactly).await.expect("a response of exactly max_response_bytes");
}

/// BeginRequest with `key` as bytes, to send invalid UTF-8 on the wire.
#[derive(Clone, PartialEq, prost::Message)]
struct RawBeginRequest {
    #[prost(string, tag = "1")]
    namespace: String,
    #[prost(bytes = "vec", tag = "2")]
    key: Vec<u8>,
}

async fn undecodable_request_is_invalid_argument(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut grpc = tonic::client::Grpc::new(app.channel());
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<RawBeginRequest, pb::BeginResponse>::default();
    let request = RawBeginRequest { namespace: NS.into(), key: vec![b'k', 0xff, 0xfe] };
    let path = http::uri::PathAndQuery::from_static("/idemd.v1.Idempotency/Begin");
    let status = grpc.unary(tonic::Request::new(request), path, codec).await.expect_err("invalid UTF-8 is rejected");
    assert_invalid_field(&status, "key");
    // The server is fine.
    app.acquire(begin_req("after")).await;
}

/// Sends raw bytes as the body of a gRPC call and returns the status.
pub async fn raw_call(app: &TestApp, path: &str, body: Vec<u8>) -> tonic::Status {
    raw_call_with_header(app, path, None, body).await
}

/// The same, with one more request header.
pub async fn raw_call_with_header(
    app: &TestApp,
    path: &str,
    header: Option<(&'static str, &'static str)>,
    body: Vec<u8>,
) -> tonic::Status {
    use tower_service::Service;
    let mut channel = app.channel();
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.expect("ready");
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}{path}", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    let request =
        request.body(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(body)))).expect("request");
    status_of(channel.call(request).await.expect("an HTTP response")).await
}

/// A gRPC reply's status: in its headers (a trailers-only reply) or its trailers.
pub async fn status_of<B>(response: http::Response<B>) -> tonic::Status
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers");
    tonic::Status::from_header_map(&trailers).expect("a grpc-status")
}

/// One length-prefixed gRPC message, with whatever flag and length a test declares.
pub fn frame(compressed: u8, declared_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![compressed];
    bytes.extend_from_slice(&declared_len.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

async fn malformed_grpc_framing_is_invalid_argument(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.max_response_bytes = 1000).await;
    let begin = "/idemd.v1.Idempotency/Begin";
    let cases = [
        ("no message at all", begin, Vec::new()),
        ("truncated frame", begin, frame(0, 10, &[1, 2])),
        ("compressed flag without an encoding", begin, frame(1, 1, &[0])),
    ];
    for (what, path, body) in cases {
        let status = raw_call(&app, path, body).await;
        assert_ne!(status.code(), tonic::Code::Internal, "{what}: {status:?}");
        assert_invalid_field(&status, "request");
    }
    // A message beyond max_response_bytes plus room for the other fields.
    let oversized = prost::Message::encode_to_vec(&pb::CompleteRequest {
        namespace: NS.into(),
        key: "k".into(),
        lease_token: "lt_x".into(),
        response: vec![0; 200_000],
        ..Default::default()
    });
    let status = raw_call(&app, "/idemd.v1.Idempotency/Complete", frame(0, oversized.len() as u32, &oversized)).await;
    assert_invalid_field(&status, "request");
    // Begin's own limit is far below Complete's.
    let oversized = prost::Message::encode_to_vec(&pb::BeginRequest {
        namespace: NS.into(),
        key: "k".into(),
        attempt_nonce: "n".repeat(200_000),
        ..Default::default()
    });
    let status = raw_call(&app, begin, frame(0, oversized.len() as u32, &oversized)).await;
    assert_invalid_field(&status, "request");
    // The server is fine.
    app.acquire(begin_req("after")).await;
}

/// No compression is enabled: a compressed request is UNIMPLEMENTED.
async fn compressed_requests_are_unimplemented(backend: Backend) {
    let app = spawn_app(backend).await;
    let begin = prost::Message::encode_to_vec(&begin_req("compressed"));
    let lookup = prost::Message::encode_to_vec(&pb::LookupRequest { namespace: NS.into(), key: "compressed".into() });
    let calls = [("/idemd.v1.Idempotency/Begin", begin), ("/idemd.v1.Idempotency/Lookup", lookup)];
    for (path, message) in &calls {
        let status =
            raw_call_with_header(&app, path, Some(("grpc-encoding", "gzip")), frame(1, message.len() as u32, message))
                .await;
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{path}: {status:?}");
        assert!(status.message().contains("gzip"), "{path}: {status:?}");
    }
    // The refused Begin did nothing: the key is still free.
    app.acquire(begin_req("compressed")).await;
    // `identity` is no compression, and accepted.
    for (path, message) in &calls {
        let status = raw_call_with_header(
            &app,
            path,
            Some(("grpc-encoding", "identity")),
            frame(0, message.len() as u32, message),
        )
        .await;
        assert_eq!(status.code(), tonic::Code::Ok, "{path}: {status:?}");
    }
}

crate::both_stores!(
    malformed_begin_fields_are_invalid_argument,
    malformed_complete_abort_heartbeat_lookup_fields_are_invalid_argument,
    undecodable_request_is_invalid_argument,
    malformed_grpc_framing_is_invalid_argument,
    compressed_requests_are_unimplemented,
);
