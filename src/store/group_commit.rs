//! Group commit for Begin on Postgres: concurrent Begins are gathered while
//! the previous batch is in the database and executed as one statement
//! (`unnest` arrays) in one transaction; each caller gets its own answer.
//!
//! A lone Begin runs the one-key statement at once (nothing waits for a
//! window unless `--group-commit-window` asks for one). Duplicate keys in a
//! batch are left to the one-key path after it, so a statement never touches
//! a row twice; keys are sorted so concurrent batches lock rows in one order.
//! Every rule of Begin's table is the same SQL as the one-key statement's;
//! a key the batch did not acquire is read back and judged by the same
//! verdict, and anything that changed in between takes the one-key path.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::postgres::{BEGIN_ACQUIRE_BATCH, BEGIN_READ_BATCH, PgStore, attempt_of, current_record};
use crate::domain::{BeginOutcome, BeginRequest, Lease, Verdict, micros, new_downstream_key, new_lease_token};
use crate::error::{Error, Result};

type Reply = oneshot::Sender<Result<BeginOutcome>>;

/// Hands Begins to the batch workers.
#[derive(Debug)]
pub struct BeginBatcher {
    queue: mpsc::Sender<(BeginRequest, Reply)>,
}

impl BeginBatcher {
    /// Starts `workers` batch workers over `store` (a store without a batcher).
    pub fn start(store: PgStore, workers: usize, max_batch: usize, window: Duration) -> Arc<Self> {
        let (queue, receiver) = mpsc::channel(max_batch.max(1) * workers.max(1) * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..workers.max(1) {
            let (store, receiver) = (store.clone(), Arc::clone(&receiver));
            tokio::spawn(async move {
                while let Some(batch) = gather(&receiver, max_batch, window).await {
                    run_batch(&store, batch).await;
                }
            });
        }
        Arc::new(BeginBatcher { queue })
    }

    pub async fn submit(&self, request: BeginRequest) -> Result<BeginOutcome> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((request, reply)).await.map_err(|_| Error::Internal("group commit stopped".into()))?;
        answer.await.map_err(|_| Error::Internal("group commit dropped a request".into()))?
    }
}

/// Waits for one Begin, then takes what else is already queued (or arrives
/// within `window`), up to `max_batch`.
async fn gather(
    receiver: &Mutex<mpsc::Receiver<(BeginRequest, Reply)>>,
    max_batch: usize,
    window: Duration,
) -> Option<Vec<(BeginRequest, Reply)>> {
    let mut receiver = receiver.lock().await;
    let first = receiver.recv().await?;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + window;
    while batch.len() < max_batch {
        match receiver.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) if window.is_zero() => break,
            Err(_) => match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(item)) => batch.push(item),
                _ => break,
            },
        }
    }
    Some(batch)
}

async fn run_batch(store: &PgStore, batch: Vec<(BeginRequest, Reply)>) {
    if batch.len() == 1 {
        for (request, reply) in batch {
            let _ = reply.send(store.begin_single(&request).await);
        }
        return;
    }
    // One entry per key in the statement; repeats take the one-key path after it.
    let mut seen = HashSet::new();
    let (mut entries, mut repeats) = (Vec::new(), Vec::new());
    for (request, reply) in batch {
        if seen.insert(request.id.wake_topic()) {
            entries.push((request, reply, new_lease_token(), new_downstream_key()));
        } else {
            repeats.push((request, reply));
        }
    }
    match acquire_batch(store, &entries).await {
        Ok(mut acquired) => {
            let mut pending = Vec::new();
            for (request, reply, token, _) in entries {
                match acquired.remove(&request.id.wake_topic()) {
                    Some((attempt, lease_expires_at, downstream_key)) => {
                        let lease = Lease { lease_token: token, attempt, lease_expires_at, downstream_key };
                        let _ = reply.send(Ok(BeginOutcome::Acquired(lease)));
                    }
                    None => pending.push((request, reply)),
                }
            }
            judge_batch(store, pending).await;
        }
        Err(error) => {
            tracing::warn!(%error, "group commit batch failed; its Begins answer UNAVAILABLE");
            for (_, reply, _, _) in entries {
                let _ =
                    reply.send(Err(Error::StoreUnavailable(sqlx::Error::Protocol(format!("batch failed: {error}")))));
            }
        }
    }
    for (request, reply) in repeats {
        let store = store.clone();
        tokio::spawn(async move {
            let _ = reply.send(store.begin_single(&request).await);
        });
    }
}

type Acquired = HashMap<String, (u32, crate::domain::Timestamp, String)>;

async fn acquire_batch(store: &PgStore, entries: &[(BeginRequest, Reply, String, String)]) -> Result<Acquired> {
    let column = |f: &dyn Fn(&BeginRequest, &str, &str) -> String| -> Vec<String> {
        entries.iter().map(|(r, _, token, key)| f(r, token, key)).collect()
    };
    let namespaces = column(&|r, _, _| r.id.namespace.as_str().to_string());
    let keys = column(&|r, _, _| r.id.key.as_str().to_string());
    let tokens = column(&|_, t, _| t.to_string());
    let downstream = column(&|_, _, d| d.to_string());
    let fingerprints: Vec<Vec<u8>> = entries.iter().map(|(r, ..)| r.fingerprint.clone()).collect();
    let leases: Vec<i64> = entries.iter().map(|(r, ..)| micros(r.lease_ttl)).collect();
    let retentions: Vec<i64> = entries.iter().map(|(r, ..)| micros(r.retention)).collect();
    let nonces: Vec<Option<String>> = entries.iter().map(|(r, ..)| r.attempt_nonce.clone()).collect();
    let rows = sqlx::query(BEGIN_ACQUIRE_BATCH)
        .bind(&namespaces)
        .bind(&keys)
        .bind(&fingerprints)
        .bind(&leases)
        .bind(&retentions)
        .bind(&downstream)
        .bind(&tokens)
        .bind(&nonces)
        .fetch_all(store.pool())
        .await?;
    let mut acquired = HashMap::with_capacity(rows.len());
    for row in rows {
        let namespace: String = row.try_get("namespace")?;
        let key: String = row.try_get("key")?;
        acquired.insert(
            format!("{namespace}/{key}"),
            (attempt_of(&row)?, row.try_get("lease_expires_at")?, row.try_get("downstream_key")?),
        );
    }
    Ok(acquired)
}

/// Reads the keys that were not acquired and applies Begin's table; what
/// changed in between (or failed to read) goes through the one-key path.
async fn judge_batch(store: &PgStore, pending: Vec<(BeginRequest, Reply)>) {
    if pending.is_empty() {
        return;
    }
    let namespaces: Vec<&str> = pending.iter().map(|(r, _)| r.id.namespace.as_str()).collect();
    let keys: Vec<&str> = pending.iter().map(|(r, _)| r.id.key.as_str()).collect();
    let read = sqlx::query(BEGIN_READ_BATCH).bind(&namespaces).bind(&keys).fetch_all(store.pool()).await;
    let mut current = HashMap::new();
    if let Ok(rows) = read {
        for row in rows {
            let (Ok(namespace), Ok(key)) = (row.try_get::<String, _>("namespace"), row.try_get::<String, _>("key"))
            else {
                continue;
            };
            if let Ok(record) = current_record(&row) {
                current.insert(format!("{namespace}/{key}"), record);
            }
        }
    }
    for (request, reply) in pending {
        let verdict = current.remove(&request.id.wake_topic()).map(|record| record.verdict(&request));
        match verdict {
            Some(Verdict::Outcome(outcome)) => {
                let _ = reply.send(Ok(outcome));
            }
            Some(Verdict::Mismatch) => {
                let _ = reply.send(Err(Error::FingerprintMismatch));
            }
            Some(Verdict::TryAgain) | None => {
                let store = store.clone();
                tokio::spawn(async move {
                    let _ = reply.send(store.begin_single(&request).await);
                });
            }
        }
    }
}
