//! Readiness: `idemd.v1.Idempotency` is SERVING only while the store
//! answers a probe, and NOT_SERVING from the moment shutdown begins.
//! Liveness (service `""`) stays SERVING while the process runs.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::pb::SERVICE_NAME;
use crate::store::Store;

const PROBE_INTERVAL: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes the store until `shutdown`, then reports NOT_SERVING and returns:
/// this task is the only writer of readiness, so nothing can flip it back.
pub fn spawn_readiness_probe<S: Store>(
    store: S,
    reporter: HealthReporter,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut current = None;
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
            if shutdown.is_cancelled() {
                break;
            }
            if current != Some(status) {
                if current.is_some() || status != ServingStatus::Serving {
                    tracing::warn!(?status, "readiness changed");
                }
                reporter.set_service_status(SERVICE_NAME, status).await;
                current = Some(status);
            }
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        reporter
            .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
            .await;
    })
}
