//! Readiness: `idemd.v1.Idempotency` is SERVING only while the store
//! answers a probe, and NOT_SERVING from the moment shutdown begins.
//! Liveness (service `""`) stays SERVING while the process runs.

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

/// Probes the store every 500 ms until `stop`, reporting readiness.
pub fn spawn_readiness_probe<S: Store>(store: S, readiness: Readiness, stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let status = match tokio::time::timeout(PROBE_TIMEOUT, store.ping()).await {
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
