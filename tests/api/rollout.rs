//! What a Kubernetes rollout relies on: probes that work with TLS on (the
//! plaintext health port), connections that do not live forever (so a
//! connection-balancing Service spreads them over new replicas), and
//! readiness that waits for the schema when migrations run elsewhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use idemd::pb::{self, begin_response::Outcome};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::*;
use crate::security::{Ca, tls_app};

/// The status a health check reports, `None` when the check fails.
async fn health_status(channel: Channel, service: &str) -> Option<ServingStatus> {
    let mut request = Request::new(HealthCheckRequest { service: service.into() });
    request.set_timeout(Duration::from_secs(5));
    let status = HealthClient::new(channel).check(request).await.ok()?.into_inner().status;
    ServingStatus::try_from(status).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_speak_plaintext_to_the_health_port_while_the_grpc_port_needs_tls() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("server ca");
    let app = tls_app(dir.path(), &ca, None, |c| c.health_listen = Some("127.0.0.1:0".parse().expect("addr"))).await;
    let health_addr = app.health_addr.expect("a health port");
    let plaintext = test_channel(health_addr, None);
    for service in ["", pb::SERVICE_NAME, pb::ADMIN_SERVICE_NAME] {
        assert_eq!(health_status(plaintext.clone(), service).await, Some(ServingStatus::Serving), "{service:?}");
    }
    // Health only: the service and reflection are not on this port.
    let status = pb::idempotency_client::IdempotencyClient::new(plaintext.clone())
        .begin(begin_req("k"))
        .await
        .expect_err("not served here");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    // The gRPC port still refuses plaintext, health included.
    assert_eq!(health_status(test_channel(app.addr, None), "").await, None);
}

/// A channel over a connector that counts the TCP connections it opens.
fn counted_channel(addr: std::net::SocketAddr) -> (Channel, Arc<AtomicUsize>) {
    let connects = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connects);
    let connector = tower::service_fn(move |_: http::Uri| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move { tokio::net::TcpStream::connect(addr).await.map(TokioIo::new) }
    });
    let endpoint =
        Endpoint::from_shared(format!("http://{addr}")).expect("uri").connect_timeout(Duration::from_secs(5));
    (endpoint.connect_with_connector_lazy(connector), connects)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_max_age_is_closed_gracefully_and_the_client_reconnects() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.max_connection_age = Some(Duration::from_secs(1))).await;
    let (channel, connects) = counted_channel(app.addr);
    let mut client = pb::idempotency_client::IdempotencyClient::new(channel);
    let mut calls = 0;
    // Calls keep succeeding across the close: it waits for no call, and the
    // client's next call opens a new connection.
    eventually("the client reconnects after the age close", Duration::from_secs(20), || {
        calls += 1;
        let request = begin_req(&format!("k{calls}"));
        let mut client = client.clone();
        let connects = Arc::clone(&connects);
        async move {
            let outcome = client.begin(request).await.expect("every call succeeds").into_inner().outcome;
            assert!(matches!(outcome, Some(Outcome::Acquired(_))), "{outcome:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            (connects.load(Ordering::SeqCst) >= 2).then_some(())
        }
    })
    .await;
    client.begin(begin_req("after")).await.expect("the new connection serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_outliving_the_max_age_grace_are_cut() {
    let app = spawn_app_with(Backend::Sqlite, |c| {
        c.max_connection_age = Some(Duration::from_secs(1));
        c.max_connection_age_grace = Duration::from_secs(1);
    })
    .await;
    app.acquire(begin_req("held")).await;
    let (channel, _) = counted_channel(app.addr);
    let mut client = pb::idempotency_client::IdempotencyClient::new(channel);
    // Parked on the held key for up to 30 s: longer than age + grace.
    let mut request = begin_req("held");
    request.wait_timeout = Some(prost_types::Duration { seconds: 30, nanos: 0 });
    let started = tokio::time::Instant::now();
    let call = tokio::time::timeout(Duration::from_secs(25), client.begin(request)).await.expect("cut before 25 s");
    let status = call.expect_err("cut, not answered");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal),
        "{status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(25));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_migrate_readiness_waits_for_the_schema() {
    let database_url = fresh_postgres_database(&admin_url()).await;
    let mut config = test_config(&database_url);
    config.no_migrate = true;
    let database = config.database.clone();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = grpc.local_addr().expect("addr");
    let listeners = idemd::server::Listeners { grpc, metrics: None, health: None };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(idemd::server::run(config, listeners, async {
        let _ = stopped.await;
    }));
    let channel = test_channel(addr, None);
    // Up and answering, but not ready: the tables are not there.
    eventually("liveness answers", Duration::from_secs(20), || {
        let channel = channel.clone();
        async move { health_status(channel, "").await.filter(|s| *s == ServingStatus::Serving) }
    })
    .await;
    for _ in 0..4 {
        assert_eq!(health_status(channel.clone(), pb::SERVICE_NAME).await, Some(ServingStatus::NotServing));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    idemd::server::migrate(&database).await.expect("idemd migrate");
    eventually("ready once migrated", Duration::from_secs(20), || {
        let channel = channel.clone();
        async move { health_status(channel, pb::SERVICE_NAME).await.filter(|s| *s == ServingStatus::Serving) }
    })
    .await;
    let mut client = pb::idempotency_client::IdempotencyClient::new(channel);
    client.begin(begin_req("k")).await.expect("serves");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), server).await.expect("stops").expect("task").expect("clean exit");
}
