//! Readiness: `idemd.v1.Idempotency` is SERVING only while the store
//! answers a probe (and, with `--no-migrate`, once the database has every
//! migration this binary knows), and NOT_SERVING from the moment shutdown
//! begins. Liveness (service `""`) stays SERVING while the process runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::pb::{ADMIN_SERVICE_NAME, SERVICE_NAME};
use crate::store::Store;

const PROBE_INTERVAL: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The readiness status, with shutdown as a one-way latch: once shutdown
/// began, no probe result can report SERVING again.
#[derive(Clone)]
pub struct Readiness {
    reporter: HealthReporter,
    /// `Some(status)` last reported; the lock orders probe reports against shutdown.
    state: Arc<Mutex<(Option<ServingStatus>, bool)>>,
    /// What was last reported, readable without the lock (the `idemd_ready` gauge).
    serving: Arc<AtomicBool>,
}

impl Readiness {
    /// Starts NOT_SERVING until the first probe succeeds.
    pub async fn new(reporter: HealthReporter) -> Self {
        for service in [SERVICE_NAME, ADMIN_SERVICE_NAME] {
            reporter.set_service_status(service, ServingStatus::NotServing).await;
        }
        Readiness { reporter, state: Arc::new(Mutex::new((None, false))), serving: Arc::new(AtomicBool::new(false)) }
    }

    /// Whether readiness is SERVING now.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    async fn report(&self, status: ServingStatus) {
        let mut state = self.state.lock().await;
        let (last, shutting_down) = &mut *state;
        if *shutting_down || *last == Some(status) {
            return;
        }
        if last.is_some() || status != ServingStatus::Serving {
            tracing::warn!(?status, "readiness changed");
        }
        *last = Some(status);
        self.serving.store(status == ServingStatus::Serving, Ordering::Relaxed);
        for service in [SERVICE_NAME, ADMIN_SERVICE_NAME] {
            self.reporter.set_service_status(service, status).await;
        }
    }

    /// NOT_SERVING for good: shutdown has begun.
    pub async fn shut_down(&self) {
        let mut state = self.state.lock().await;
        state.1 = true;
        self.serving.store(false, Ordering::Relaxed);
        for service in [SERVICE_NAME, ADMIN_SERVICE_NAME] {
            self.reporter.set_service_status(service, ServingStatus::NotServing).await;
        }
    }
}

/// Probes the store every 500 ms until `stop`, reporting readiness. With
/// `schema_checked` false (migrations left to `idemd migrate`), the probe
/// also waits for the schema: a replica of a new release started before its
/// migrations ran must not take calls its statements cannot serve.
pub fn spawn_readiness_probe<S: Store>(
    store: S,
    readiness: Readiness,
    mut schema_checked: bool,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_missing = None;
        loop {
            if !schema_checked {
                match tokio::time::timeout(PROBE_TIMEOUT, store.missing_migrations()).await {
                    Ok(Ok(0)) => {
                        tracing::info!("the database has every migration this binary knows");
                        schema_checked = true;
                    }
                    Ok(Ok(missing)) if last_missing != Some(missing) => {
                        tracing::warn!(
                            missing,
                            "migrations not applied yet (--no-migrate): not ready until `idemd migrate` ran"
                        );
                        last_missing = Some(missing);
                    }
                    Ok(Ok(_)) => {}
                    // A database never migrated has no migrations table.
                    Ok(Err(error)) if last_missing != Some(usize::MAX) => {
                        tracing::warn!(%error, "cannot read the applied migrations (--no-migrate): not ready until `idemd migrate` ran");
                        last_missing = Some(usize::MAX);
                    }
                    Ok(Err(_)) => {}
                    Err(_) => tracing::debug!("schema check timed out"),
                }
            }
            let status = match tokio::time::timeout(PROBE_TIMEOUT, store.ping()).await {
                Ok(Ok(())) if !schema_checked => ServingStatus::NotServing,
                Ok(Ok(())) => ServingStatus::Serving,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "readiness probe failed");
                    ServingStatus::NotServing
                }
                Err(_) => {
                    tracing::debug!("readiness probe timed out");
                    ServingStatus::NotServing
                }
            };
            readiness.report(status).await;
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = stop.cancelled() => break,
            }
        }
    })
}
