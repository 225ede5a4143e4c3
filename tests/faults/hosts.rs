//! A multi-host DATABASE_URL with `target_session_attrs=read-write`: idemd
//! writes to whichever server takes writes, follows it when that changes,
//! and is NOT_SERVING while none does. Two clusters of the test's own play
//! primary and standby; "standby" is a server whose sessions are read-only
//! (`default_transaction_read_only`), which is what libpq's read-write check
//! (and idemd's) sees on a real standby too.

use std::time::Duration;

use idemd::config::{DatabaseUrl, ServeConfig};
use idemd::pb::begin_response::Outcome;
use idemd::pb::idempotency_client::IdempotencyClient;
use idemd::pb::{self};
use sqlx::Connection;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::pg_cluster::Cluster;
use crate::proxy::Proxy;

const DATABASE: &str = "idemd_hosts";
const DEADLINE: Duration = Duration::from_secs(30);

async fn admin(cluster: &Cluster) -> sqlx::PgConnection {
    let url = format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", cluster.port);
    sqlx::PgConnection::connect(&url).await.expect("connect to a test cluster")
}

/// Makes a cluster take writes or refuse them, as a promotion or a demotion would.
async fn set_writable(cluster: &Cluster, writable: bool) {
    let mut connection = admin(cluster).await;
    let setting = if writable { "off" } else { "on" };
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER SYSTEM SET default_transaction_read_only = {setting}")))
        .execute(&mut connection)
        .await
        .expect("alter system");
    sqlx::query("SELECT pg_reload_conf()").execute(&mut connection).await.expect("reload");
}

/// Ends idemd's sessions on a cluster, as the restart of a demoted primary does.
async fn drop_sessions(cluster: &Cluster) {
    let mut connection = admin(cluster).await;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'idemd'")
        .execute(&mut connection)
        .await
        .expect("terminate");
}

async fn rows_on(cluster: &Cluster, key: &str) -> i64 {
    let mut connection = admin(cluster).await;
    sqlx::query_scalar("SELECT count(*) FROM idemd_records WHERE key = $1")
        .bind(key)
        .fetch_one(&mut connection)
        .await
        .expect("count")
}

async fn ready(channel: &Channel) -> bool {
    let request = HealthCheckRequest { service: pb::SERVICE_NAME.into() };
    HealthClient::new(channel.clone()).check(request).await.is_ok_and(|r| r.into_inner().status == 1)
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < DEADLINE, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn acquires(channel: &Channel, key: &str) -> bool {
    let mut request =
        tonic::Request::new(pb::BeginRequest { namespace: "hosts".into(), key: key.into(), ..Default::default() });
    request.set_timeout(Duration::from_secs(3));
    matches!(
        IdempotencyClient::new(channel.clone()).begin(request).await.map(|r| r.into_inner().outcome),
        Ok(Some(Outcome::Acquired(_)))
    )
}

/// Two clusters with the database migrated on each.
async fn two_clusters() -> (Cluster, Cluster) {
    let (a, b) = (Cluster::new("hosts-a"), Cluster::new("hosts-b"));
    for cluster in [&a, &b] {
        let mut connection = sqlx::PgConnection::connect(&cluster.url()).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DATABASE}")))
            .execute(&mut connection)
            .await
            .expect("create database");
        let mut config = ServeConfig::defaults();
        config.database.database_url =
            DatabaseUrl::new(format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", cluster.port));
        idemd::server::migrate(&config.database).await.expect("migrate");
    }
    (a, b)
}

/// An idemd in this process on `hosts` (`host:port,host:port`), written-to
/// only where sessions are read-write.
struct Idemd {
    channel: Channel,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start_idemd(hosts: &str) -> Idemd {
    let mut config = ServeConfig::defaults();
    config.database.database_url =
        DatabaseUrl::new(format!("postgres://postgres@{hosts}/{DATABASE}?target_session_attrs=read-write"));
    config.database.store_timeout = Duration::from_secs(2);
    config.no_migrate = true;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = grpc.local_addr().expect("addr");
    let listeners = idemd::server::Listeners { grpc, metrics: None, health: None };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(idemd::server::run(config, listeners, async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}")).expect("uri").connect_lazy();
    Idemd { channel, stop, server }
}

impl Idemd {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(DEADLINE, self.server).await.expect("stops").expect("task").expect("clean exit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_host_url_follows_the_writable_server() {
    let (a, b) = two_clusters().await;
    // b is the standby, and listed first: idemd must pass over it.
    set_writable(&b, false).await;
    let idemd = start_idemd(&format!("127.0.0.1:{},127.0.0.1:{}", b.port, a.port)).await;
    let channel = idemd.channel.clone();

    until("ready on the writable server", async || ready(&channel).await).await;
    assert!(acquires(&channel, "first").await, "a Begin on the writable server");
    assert_eq!((rows_on(&a, "first").await, rows_on(&b, "first").await), (1, 0), "written to a, the primary");

    // Switchover: a refuses writes (its sessions stay open), b takes them.
    set_writable(&a, false).await;
    set_writable(&b, true).await;
    until("a Begin succeeds after the switchover", async || acquires(&channel, "second").await).await;
    assert_eq!((rows_on(&a, "second").await, rows_on(&b, "second").await), (0, 1), "written to b, the new primary");
    until("ready after the switchover", async || ready(&channel).await).await;

    // No primary at all: NOT_SERVING, and Begins fail closed.
    set_writable(&b, false).await;
    drop_sessions(&b).await;
    until("not ready without a primary", async || !ready(&channel).await).await;
    assert!(!acquires(&channel, "nowhere").await, "no Begin acquires without a primary");

    // a is promoted: idemd follows without a restart.
    set_writable(&a, true).await;
    until("ready again on the new primary", async || ready(&channel).await).await;
    until("a Begin succeeds on the new primary", async || acquires(&channel, "third").await).await;
    assert_eq!((rows_on(&a, "third").await, rows_on(&b, "third").await), (1, 0));
    assert_eq!(rows_on(&a, "nowhere").await + rows_on(&b, "nowhere").await, 0, "nothing written without a primary");

    idemd.stop().await;
}

/// A primary that goes silent (every byte delayed an hour, connections
/// open) is left for the next writable server; idemd is not restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_primary_is_left_for_the_next_writable_server() {
    let (a, b) = two_clusters().await;
    set_writable(&b, false).await;
    let proxy = Proxy::start(format!("127.0.0.1:{}", a.port).parse().expect("addr")).await;
    let idemd = start_idemd(&format!("{},127.0.0.1:{}", proxy.addr, b.port)).await;
    let channel = idemd.channel.clone();
    until("ready on a", async || ready(&channel).await).await;
    assert!(acquires(&channel, "first").await, "a Begin on a");
    assert_eq!(rows_on(&a, "first").await, 1);

    proxy.set_latency(Duration::from_secs(3600));
    set_writable(&b, true).await;
    until("a Begin succeeds on b", async || acquires(&channel, "second").await).await;
    assert_eq!((rows_on(&a, "second").await, rows_on(&b, "second").await), (0, 1), "written to b");
    until("ready on b", async || ready(&channel).await).await;
    idemd.stop().await;
}
