//! Wires the store, the service, health, reflection and the background loops
//! onto an already-bound listener, serves until `shutdown` resolves, then
//! shuts down gracefully: readiness NOT_SERVING first, then the listener
//! closes and in-flight calls drain for up to `--shutdown-grace`, then the
//! background loops stop and the pool closes.
//!
//! Tests and production start the server the same way: [`run`] with a
//! listener and a shutdown future.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Connected;
use tower_layer::Layer;

use crate::admin::{AdminLimits, AdminService};
use crate::auth::{AuthInterceptor, Authenticator};
use crate::codec::WireErrorsLayer;
use crate::config::{Backend, DatabaseConfig, ServeConfig};
use crate::connections::{self, ConnectionPolicy, ConnectionService, Slot, Slots};
use crate::deadline::ArrivalLayer;
use crate::fd_limit;
use crate::health::Readiness;
use crate::metrics::{self, Metrics};
use crate::pb;
use crate::request_guard::{self, RequestGuardLayer};
use crate::service::{IdempotencyService, Limits, POLLING_WAITER_INTERVAL, WAITER_POLL};
use crate::store::Store;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::tls::{ReloadingTls, TlsFiles};
use crate::wakeups::Wakeups;
use crate::{health, reaper};

/// HTTP/2 pings on every connection, and how long an answer may take: a
/// peer that stops answering is dropped and its slot freed.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control windows: what a peer may send before idemd reads it,
/// per stream and per connection. A whole Complete of the default maximum
/// fits in one stream window.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 1024 * 1024 + request_guard::COMPLETE_OVERHEAD_BYTES as u32;
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 2 * HTTP2_STREAM_WINDOW_BYTES;
/// Request headers, credentials and trace context included.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// How long background tasks get to stop after the drain.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Applies the migrations of the configured database and returns.
pub async fn migrate(database: &DatabaseConfig) -> anyhow::Result<()> {
    match database.database_url.backend().map_err(anyhow::Error::msg)? {
        Backend::Postgres => {
            let store = PgStore::connect_lazy(database, Wakeups::new(), None)?;
            store.migrate().await.context("applying Postgres migrations")?;
            store.close().await;
        }
        Backend::Sqlite => {
            let store = SqliteStore::connect(database, Wakeups::new()).await.context("opening the SQLite database")?;
            store.migrate().await.context("applying SQLite migrations")?;
            store.close().await;
        }
    }
    tracing::info!(database = %database.database_url, "migrations applied");
    Ok(())
}

/// The already-bound sockets a server serves on: production binds the
/// configured addresses, tests bind port 0 and read the addresses back.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    /// `/metrics`; `None` serves no metrics endpoint (the registry still counts).
    pub metrics: Option<TcpListener>,
    /// The plaintext health-only port (`--health-listen`), if any.
    pub health: Option<TcpListener>,
}

impl Listeners {
    /// Binds `--listen` and `--metrics-listen`, naming the setting that fails.
    pub async fn bind(config: &ServeConfig) -> anyhow::Result<Self> {
        let grpc = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (--listen, IDEMD_LISTEN)", config.listen))?;
        let metrics = TcpListener::bind(config.metrics_listen).await.with_context(|| {
            format!("cannot listen on {} (--metrics-listen, IDEMD_METRICS_LISTEN)", config.metrics_listen)
        })?;
        let health = match config.health_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (--health-listen, IDEMD_HEALTH_LISTEN)"))?,
            ),
            None => None,
        };
        Ok(Listeners { grpc, metrics: Some(metrics), health })
    }
}

/// Serves on the listeners until `shutdown` resolves. Validates the
/// configuration, opens the store and applies migrations (unless
/// `--no-migrate`) before the first call is answered.
pub async fn run(
    config: ServeConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    ensure_descriptors(&config)?;
    let mut shared = Shared {
        wakeups: Wakeups::new(),
        metrics: Metrics::new()?,
        background: CancellationToken::new(),
        tasks: Vec::new(),
    };
    let wakeups = Arc::clone(&shared.wakeups);
    match config.database.database_url.backend().map_err(anyhow::Error::msg)? {
        Backend::Postgres => {
            let metrics = Some(Arc::clone(&shared.metrics));
            let store = PgStore::connect_lazy(&config.database, Arc::clone(&wakeups), metrics)?;
            if !config.no_migrate {
                store.migrate().await.context("applying Postgres migrations")?;
            }
            let relay = store.spawn_wakeup_listener(wakeups, shared.background.clone());
            if relay.is_none() {
                tracing::warn!(
                    "no LISTEN through a transaction pooler: waiters re-check their key every {:?} \
                     (set --direct-database-url for immediate wake-ups)",
                    POLLING_WAITER_INTERVAL
                );
            }
            shared.tasks.extend(relay);
            serve(store, shared, config, listeners, shutdown).await
        }
        Backend::Sqlite => {
            let store = SqliteStore::connect(&config.database, wakeups).await.context("opening the SQLite database")?;
            if !config.no_migrate {
                store.migrate().await.context("applying SQLite migrations")?;
            }
            serve(store, shared, config, listeners, shutdown).await
        }
    }
}

/// What exists before the store is opened and outlives it: the store
/// counts into the metrics and wakes the waiters.
struct Shared {
    wakeups: Arc<Wakeups>,
    metrics: Arc<Metrics>,
    /// Stops the background tasks after the drain.
    background: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn serve<S: Store>(
    store: S,
    shared: Shared,
    config: ServeConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Shared { wakeups, metrics, background, mut tasks } = shared;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let readiness = Readiness::new(reporter).await;
    tasks.push(health::spawn_readiness_probe(store.clone(), readiness.clone(), !config.no_migrate, background.clone()));
    {
        let store = store.clone();
        metrics.observe_pool(move || store.pool_stats());
        let readiness = readiness.clone();
        metrics.observe_readiness(move || readiness.is_serving());
    }
    let metrics_server = listeners.metrics.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(metrics = %addr, "serving /metrics");
        }
        let policy = ConnectionPolicy { max_age: None, ..connection_policy(&config, config.metrics_max_connections) };
        let slots = Slots::new("metrics", policy);
        tokio::spawn(metrics::serve(listener, Arc::clone(&metrics), slots, background.clone()))
    });
    tasks.push(reaper::spawn_reaper(store.clone(), Arc::clone(&metrics), config.reaper_interval, background.clone()));
    tasks.push(reaper::spawn_purger(store.clone(), Arc::clone(&metrics), config.purge_interval, background.clone()));

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.ErrorInfo and BadRequest, so tools can show error details.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let stop_waiting = CancellationToken::new();
    let service = Arc::new(IdempotencyService::new(
        store.clone(),
        wakeups,
        Arc::clone(&metrics),
        Limits {
            waiter_poll: if store.wakes_waiters() { WAITER_POLL } else { POLLING_WAITER_INTERVAL },
            ..Limits::from(&config)
        },
        stop_waiting.clone(),
    ));
    let max_request_bytes = request_guard::complete_limit(config.max_response_bytes);
    let idempotency =
        pb::idempotency_server::IdempotencyServer::from_arc(service).max_decoding_message_size(max_request_bytes);
    let authenticator = match &config.auth_tokens_file {
        Some(path) => {
            let authenticator = Authenticator::load(path)?;
            tasks.push(authenticator.spawn_watcher(background.clone()));
            metrics.observe_tokens_file(Arc::clone(&authenticator));
            Some(authenticator)
        }
        None => {
            // SIGHUP's default action would kill the process: with nothing to reload, note it.
            tasks.push(ignore_hangups(background.clone()));
            None
        }
    };
    let admin = pb::admin_server::AdminServer::new(AdminService::new(
        store.clone(),
        Arc::clone(&metrics),
        AdminLimits {
            auth_on: authenticator.is_some() || config.tls_client_ca.is_some(),
            max_response_bytes: config.max_response_bytes,
            store_timeout: config.database.store_timeout,
        },
    ))
    .max_decoding_message_size(max_request_bytes);
    // Health and reflection stay open: Kubernetes probes send no credentials.
    let admin = InterceptedService::new(admin, AuthInterceptor(authenticator.clone()));
    let idempotency = InterceptedService::new(idempotency, AuthInterceptor(authenticator));
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let files = TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: config.tls_client_ca.clone() };
            let tls = ReloadingTls::load(files)?;
            tasks.push(tls.spawn_watcher(background.clone()));
            let watched = Arc::clone(&tls);
            metrics.observe_tls(move || watched.in_force());
            Some(tls)
        }
        _ => None,
    };

    let listener = listeners.grpc;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, database = %config.database.database_url, "idemd listening");

    let draining = CancellationToken::new();
    let signal = {
        let draining = draining.clone();
        async move {
            shutdown.await;
            tracing::info!("shutdown requested: readiness NOT_SERVING, draining in-flight calls");
            readiness.shut_down().await;
            stop_waiting.cancel();
            draining.cancel();
        }
    };
    // Every request passes the same layers, outermost first.
    let layers = |routes: Routes| {
        ArrivalLayer.layer(
            RequestGuardLayer {
                max_response_bytes: config.max_response_bytes,
                read_timeout: config.request_read_timeout,
            }
            .layer(WireErrorsLayer.layer(routes.prepare())),
        )
    };
    let health_only = layers(Routes::new(health_service.clone()));
    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(idempotency)
        .add_service(admin);
    let grpc = layers(routes);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.max_concurrent_streams)
        .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    let health_server = listeners.health.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(health = %addr, "serving gRPC health on its own plaintext port");
        }
        // Probes go on answering through the drain (readiness NOT_SERVING,
        // liveness SERVING): this port stops with the background tasks.
        let policy = ConnectionPolicy { max_age: None, ..connection_policy(&config, config.metrics_max_connections) };
        let (http2, stop) = (http2.clone(), background.clone());
        tokio::spawn(async move {
            let connections = TaskTracker::new();
            connections::accept_loop(listener, Slots::new("health", policy), stop.clone(), |stream, _peer, slot| {
                let (grpc, http2, stop) = (health_only.clone(), http2.clone(), stop.clone());
                connections.spawn(async move { serve_http2(stream, slot, grpc, &http2, stop).await });
            })
            .await;
            connections.close();
            connections.wait().await;
        })
    });
    let slots = Slots::new("grpc", connection_policy(&config, config.max_connections));
    let connections = TaskTracker::new();
    let server = async {
        let accept = connections::accept_loop(listener, slots, draining.clone(), |stream, _peer, slot| {
            let (grpc, http2, drain, tls) = (grpc.clone(), http2.clone(), draining.clone(), tls.clone());
            connections.spawn(async move {
                match tls {
                    None => serve_http2(stream, slot, grpc, &http2, drain).await,
                    Some(tls) => {
                        let handshake = async { tls.accept(stream).await };
                        if let Some(stream) = connections::within_first_request_deadline(&slot, handshake).await {
                            serve_http2(stream, slot, grpc, &http2, drain).await;
                        }
                    }
                }
            });
        });
        tokio::join!(signal, accept);
        connections.close();
        connections.wait().await;
        Ok::<(), anyhow::Error>(())
    };

    let grace = config.shutdown_grace;
    let result = tokio::select! {
        result = server => result,
        _ = async { draining.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "shutdown grace expired; dropping the calls still in flight");
            Ok(())
        }
    };

    background.cancel();
    // The metrics endpoint stops with the background tasks: scrapes go on during the drain.
    for task in tasks.into_iter().chain(metrics_server).chain(health_server) {
        if tokio::time::timeout(TASK_STOP_TIMEOUT, task).await.is_err() {
            tracing::warn!("a background task did not stop in time");
        }
    }
    // Connections still busy with a host that went silent may never come
    // back to the pool: the process exits without them.
    if tokio::time::timeout(TASK_STOP_TIMEOUT, store.close()).await.is_err() {
        tracing::warn!("database connections did not close in time");
    }
    metrics.shutdown();
    tracing::info!("idemd stopped");
    result
}

fn connection_policy(config: &ServeConfig, max_connections: usize) -> ConnectionPolicy {
    ConnectionPolicy {
        max_connections,
        first_request_timeout: config.first_request_timeout,
        idle_timeout: config.connection_idle_timeout,
        max_age: config.max_connection_age,
        max_age_grace: config.max_connection_age_grace,
    }
}

/// Serves gRPC over HTTP/2 on one accepted (and, with TLS, handshaken)
/// connection until it closes.
async fn serve_http2<IO, S>(
    io: IO,
    slot: Slot,
    grpc: S,
    http2: &hyper::server::conn::http2::Builder<TokioExecutor>,
    drain: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    S: tower_service::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let service = TowerToHyperService::new(ConnectionService::new(grpc, &slot, io.connect_info()));
    let connection = http2.serve_connection(TokioIo::new(io), service);
    connections::drive(connection, slot, drain).await;
}

/// The file descriptors the configured connections need, with the soft
/// limit raised to cover them when the hard limit allows.
fn ensure_descriptors(config: &ServeConfig) -> anyhow::Result<()> {
    let health = if config.health_listen.is_some() { config.metrics_max_connections } else { 0 };
    let needed = (config.max_connections + config.metrics_max_connections + health) as u64
        + u64::from(config.database.db_max_connections)
        + fd_limit::RESERVED_DESCRIPTORS;
    match fd_limit::ensure(needed).map_err(anyhow::Error::msg)? {
        fd_limit::FdLimit::Raised { from, to } => {
            tracing::info!(from, to, needed, "raised the file-descriptor soft limit")
        }
        fd_limit::FdLimit::Enough { soft } => tracing::debug!(soft, needed, "file-descriptor limit"),
    }
    Ok(())
}

fn ignore_hangups(shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = hangups.recv() => tracing::info!("SIGHUP: nothing to reload (no --auth-tokens-file)"),
            }
        }
    })
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
