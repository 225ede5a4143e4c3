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
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use crate::auth::{AuthInterceptor, Authenticator};
use crate::begin_route::{BeginHandler, BeginRouteLayer};
use crate::codec::WireErrorsLayer;
use crate::config::{Backend, DatabaseConfig, ServeConfig};
use crate::deadline::ArrivalLayer;
use crate::health::Readiness;
use crate::metrics::{self, Metrics};
use crate::pb;
use crate::service::{IdempotencyService, Limits, POLLING_WAITER_INTERVAL, WAITER_POLL};
use crate::store::Store;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::tls::{self, ReloadingTls, TlsFiles};
use crate::wakeups::Wakeups;
use crate::{health, reaper};

/// Room for the other fields of a CompleteRequest next to the largest response.
const REQUEST_OVERHEAD_BYTES: usize = 64 * 1024;
/// HTTP/2 pings on idle connections, and how long an answer may take.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long background tasks get to stop after the drain.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Applies the migrations of the configured database and returns.
pub async fn migrate(database: &DatabaseConfig) -> anyhow::Result<()> {
    match database.database_url.backend().map_err(anyhow::Error::msg)? {
        Backend::Postgres => {
            let store = PgStore::connect_lazy(database, Wakeups::new())?;
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

/// Serves on `listener` until `shutdown` resolves. Validates the
/// configuration, opens the store and applies migrations (unless
/// `--no-migrate`) before the first call is answered.
/// The already-bound sockets a server serves on: production binds the
/// configured addresses, tests bind port 0 and read the addresses back.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    /// `/metrics`; `None` serves no metrics endpoint (the registry still counts).
    pub metrics: Option<TcpListener>,
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
        Ok(Listeners { grpc, metrics: Some(metrics) })
    }
}

pub async fn run(
    config: ServeConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let wakeups = Wakeups::new();
    let background = CancellationToken::new();
    match config.database.database_url.backend().map_err(anyhow::Error::msg)? {
        Backend::Postgres => {
            let store = PgStore::connect_lazy(&config.database, Arc::clone(&wakeups))?;
            if !config.no_migrate {
                store.migrate().await.context("applying Postgres migrations")?;
            }
            let relay = store.spawn_wakeup_listener(Arc::clone(&wakeups), background.clone());
            if relay.is_none() {
                tracing::warn!(
                    "no LISTEN through a transaction pooler: waiters re-check their key every {:?} \
                     (set --direct-database-url for immediate wake-ups)",
                    POLLING_WAITER_INTERVAL
                );
            }
            serve(store, wakeups, config, listeners, shutdown, background, relay.into_iter().collect()).await
        }
        Backend::Sqlite => {
            let store = SqliteStore::connect(&config.database, Arc::clone(&wakeups))
                .await
                .context("opening the SQLite database")?;
            if !config.no_migrate {
                store.migrate().await.context("applying SQLite migrations")?;
            }
            serve(store, wakeups, config, listeners, shutdown, background, Vec::new()).await
        }
    }
}

async fn serve<S: Store>(
    store: S,
    wakeups: Arc<Wakeups>,
    config: ServeConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    background: CancellationToken,
    mut tasks: Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let readiness = Readiness::new(reporter).await;
    tasks.push(health::spawn_readiness_probe(store.clone(), readiness.clone(), background.clone()));
    let metrics = Metrics::new()?;
    {
        let store = store.clone();
        metrics.observe_pool(move || store.pool_stats());
    }
    let metrics_server = listeners.metrics.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(metrics = %addr, "serving /metrics");
        }
        tokio::spawn(metrics::serve(listener, Arc::clone(&metrics), background.clone()))
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
    let max_request_bytes = config.max_response_bytes + REQUEST_OVERHEAD_BYTES;
    let idempotency = pb::idempotency_server::IdempotencyServer::from_arc(Arc::clone(&service))
        .max_decoding_message_size(max_request_bytes);
    let authenticator = match &config.auth_tokens_file {
        Some(path) => {
            let authenticator = Authenticator::load(path)?;
            tasks.push(authenticator.spawn_watcher(background.clone()));
            Some(authenticator)
        }
        None => {
            // SIGHUP's default action would kill the process: with nothing to reload, note it.
            tasks.push(ignore_hangups(background.clone()));
            None
        }
    };
    // Health and reflection stay open: Kubernetes probes send no credentials.
    let begin = BeginHandler::new(service, AuthInterceptor(authenticator.clone()), max_request_bytes);
    let idempotency = InterceptedService::new(idempotency, AuthInterceptor(authenticator));
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let files = TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: config.tls_client_ca.clone() };
            let tls = ReloadingTls::load(files)?;
            tasks.push(tls.spawn_watcher(background.clone()));
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
    let router = Server::builder()
        .max_concurrent_streams(config.max_concurrent_streams)
        // Dead peers are detected and their connection slots freed.
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        // Before tonic's own grpc-timeout timer starts: idemd answers first.
        .layer(ArrivalLayer)
        .layer(WireErrorsLayer)
        // Begin is answered before the router: a parked waiter holds less.
        .layer(BeginRouteLayer(begin))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(idempotency);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let server = async {
        match tls {
            Some(tls) => {
                let incoming = tls::tls_incoming(listener, tls, slots, draining.clone());
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
            None => router.serve_with_incoming_shutdown(tls::plain_incoming(listener, slots), signal).await,
        }
    };

    let grace = config.shutdown_grace;
    let result = tokio::select! {
        result = server => result.context("serving gRPC"),
        _ = async { draining.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "shutdown grace expired; dropping the calls still in flight");
            Ok(())
        }
    };

    background.cancel();
    for task in tasks {
        if tokio::time::timeout(TASK_STOP_TIMEOUT, task).await.is_err() {
            tracing::warn!("a background task did not stop in time");
        }
    }
    if let Some(task) = metrics_server {
        match tokio::time::timeout(TASK_STOP_TIMEOUT, task).await {
            Ok(Ok(Err(error))) => tracing::warn!(%error, "the metrics endpoint failed"),
            Err(_) => tracing::warn!("the metrics endpoint did not stop in time"),
            _ => {}
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
