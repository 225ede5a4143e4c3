//! Group commit on Postgres: concurrent Begins (and, separately, Completes)
//! are gathered while the previous batch is in the database and executed as
//! one statement (`unnest` arrays) in one transaction; each caller gets its
//! own answer.
//!
//! A lone call runs the one-key statement at once (nothing waits for a
//! window unless `--group-commit-window` asks for one). Repeats of a key in a
//! batch take the one-key path after it, so a statement never touches a row
//! twice; rows are locked in key order so concurrent batches cannot deadlock
//! one another. Every rule is the same SQL as the one-key statement's; a key
//! the batch did not settle is judged by the same verdict or goes through
//! the one-key path, and a batch that fails falls back to one-key calls.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::PgRow;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::statements::{BEGIN_ACQUIRE_BATCH, BEGIN_READ_BATCH, COMPLETE_BATCH, SingleKey};
use crate::domain::{
    BeginOutcome, BeginRequest, CompleteRequest, Completion, REAPER_REASON, RecordId, Verdict, micros,
    new_downstream_key, new_lease_token,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::rows::{acquired_lease, current_record};

type Reply<A> = oneshot::Sender<Result<A>>;
type Item<Q, A> = (Q, Reply<A>);

/// Hands calls of one kind to its batch workers.
#[derive(Debug)]
pub struct Batcher<Q, A> {
    queue: mpsc::Sender<Item<Q, A>>,
}

impl<Q: Send + 'static, A: Send + 'static> Batcher<Q, A> {
    /// A batch still running after `limit` (a database gone silent) is
    /// given up, closing its connection, so the calls queued behind it
    /// reach the database again once it answers or the primary moves.
    /// Each batch's size is counted under `kind` in `metrics`.
    fn start<F, Fut>(
        workers: usize,
        max_batch: usize,
        window: Duration,
        limit: Duration,
        (kind, metrics): (&'static str, Option<Arc<Metrics>>),
        run: F,
    ) -> Self
    where
        F: Fn(Vec<Item<Q, A>>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let (queue, receiver) = mpsc::channel(max_batch.max(1) * workers.max(1) * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..workers.max(1) {
            let (run, receiver, metrics) = (run.clone(), Arc::clone(&receiver), metrics.clone());
            tokio::spawn(async move {
                while let Some(batch) = gather(&receiver, max_batch, window).await {
                    if let Some(metrics) = &metrics {
                        metrics.group_commit_batch(kind, batch.len());
                    }
                    if tokio::time::timeout(limit, run(batch)).await.is_err() {
                        tracing::warn!(?limit, "a group commit batch outlasted the store timeout; given up");
                    }
                }
            });
        }
        Batcher { queue }
    }

    pub async fn submit(&self, request: Q) -> Result<A> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((request, reply)).await.map_err(|_| Error::Internal("group commit stopped".into()))?;
        // Dropped unanswered: its batch was given up at the store timeout, so,
        // as for a single call that timed out, it may or may not have committed.
        answer.await.map_err(|_| Error::StoreTimeout)?
    }
}

/// The Begin and Complete batchers of one store.
#[derive(Debug)]
pub struct GroupCommit {
    pub begin: Batcher<BeginRequest, BeginOutcome>,
    pub complete: Batcher<CompleteRequest, Completion>,
}

impl GroupCommit {
    /// Starts the workers over the one-key statements.
    pub fn start(
        store: SingleKey,
        workers: usize,
        max_batch: usize,
        window: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> Arc<Self> {
        let (begin_store, limit) = (store.clone(), store.store_timeout());
        let begin = Batcher::start(workers, max_batch, window, limit, ("begin", metrics.clone()), move |batch| {
            run_begins(begin_store.clone(), batch)
        });
        let complete = Batcher::start(workers, max_batch, window, limit, ("complete", metrics), move |batch| {
            run_completes(store.clone(), batch)
        });
        Arc::new(GroupCommit { begin, complete })
    }
}

/// Waits for one call, then takes what else is already queued (or arrives
/// within `window`), up to `max_batch`.
async fn gather<T>(receiver: &Mutex<mpsc::Receiver<T>>, max_batch: usize, window: Duration) -> Option<Vec<T>> {
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

/// One entry per key, and the repeats.
type Split<Q, A> = (Vec<Item<Q, A>>, Vec<Item<Q, A>>);

/// Splits a batch into one entry per key and the repeats.
fn distinct<Q, A>(batch: Vec<Item<Q, A>>, id: impl Fn(&Q) -> RecordId) -> Split<Q, A> {
    let mut seen = HashSet::new();
    let (mut entries, mut repeats) = (Vec::new(), Vec::new());
    for item in batch {
        if seen.insert(id(&item.0)) {
            entries.push(item);
        } else {
            repeats.push(item);
        }
    }
    (entries, repeats)
}

/// A Begin whose caller has gone (its deadline passed, it hung up) while it
/// was queued: running it would take a lease nobody holds, keeping the key
/// busy until the reaper frees it.
fn abandoned<Q, A>((_, reply): &Item<Q, A>) -> bool {
    reply.is_closed()
}

fn begin_alone(store: &SingleKey, (request, reply): Item<BeginRequest, BeginOutcome>) {
    let store = store.clone();
    tokio::spawn(async move {
        if reply.is_closed() {
            return;
        }
        let outcome = tokio::time::timeout(store.store_timeout(), store.begin_single(&request)).await;
        let _ = reply.send(outcome.unwrap_or(Err(Error::StoreTimeout)));
    });
}

fn complete_alone(store: &SingleKey, (request, reply): Item<CompleteRequest, Completion>) {
    let store = store.clone();
    tokio::spawn(async move {
        let completion = tokio::time::timeout(store.store_timeout(), store.complete_single(&request)).await;
        let _ = reply.send(completion.unwrap_or(Err(Error::StoreTimeout)));
    });
}

async fn run_begins(store: SingleKey, mut batch: Vec<Item<BeginRequest, BeginOutcome>>) {
    batch.retain(|item| !abandoned(item));
    if batch.is_empty() {
        return;
    }
    if batch.len() == 1 {
        for (request, reply) in batch {
            let _ = reply.send(store.begin_single(&request).await);
        }
        return;
    }
    tracing::debug!(size = batch.len(), "group commit of Begins");
    // A caller that gave up while queued must not be handed a lease nobody holds.
    let batch: Vec<_> = batch.into_iter().filter(|(_, reply)| !reply.is_closed()).collect();
    let (entries, repeats) = distinct(batch, |r| r.id.clone());
    let tokens: Vec<(String, String)> = entries.iter().map(|_| (new_lease_token(), new_downstream_key())).collect();
    match acquire_batch(&store, &entries, &tokens).await {
        Ok(mut acquired) => {
            let mut pending = Vec::new();
            for ((request, reply), (token, _)) in entries.into_iter().zip(tokens) {
                match acquired.remove(&request.id) {
                    Some(row) => {
                        let lease = acquired_lease(&row, token);
                        let _ = reply.send(lease.map(BeginOutcome::Acquired));
                    }
                    None => pending.push((request, reply)),
                }
            }
            judge_begins(&store, pending).await;
        }
        // Postgres rejected the statement, so nothing of it committed: each runs alone.
        Err(error) if error.rejected_by_database() => {
            tracing::warn!(%error, "group commit of Begins failed; each runs alone");
            entries.into_iter().for_each(|item| begin_alone(&store, item));
        }
        // The connection failed: the batch may have committed, so, as for a
        // single Begin, the callers hear "not confirmed" and retry (same nonce).
        Err(error) => {
            let message = error.to_string();
            for (_, reply) in entries {
                let _ = reply.send(Err(Error::StoreLost(message.clone())));
            }
        }
    }
    repeats.into_iter().for_each(|item| begin_alone(&store, item));
}

async fn acquire_batch(
    store: &SingleKey,
    entries: &[Item<BeginRequest, BeginOutcome>],
    tokens: &[(String, String)],
) -> Result<HashMap<RecordId, PgRow>> {
    let requests = || entries.iter().map(|(r, _)| r);
    let namespaces: Vec<&str> = requests().map(|r| r.id.namespace.as_str()).collect();
    let keys: Vec<&str> = requests().map(|r| r.id.key.as_str()).collect();
    let fingerprints: Vec<&[u8]> = requests().map(|r| r.fingerprint.as_slice()).collect();
    let leases: Vec<i64> = requests().map(|r| micros(r.lease_ttl)).collect();
    let retentions: Vec<i64> = requests().map(|r| micros(r.retention)).collect();
    let nonces: Vec<Option<&str>> = requests().map(|r| r.attempt_nonce.as_deref()).collect();
    let lease_tokens: Vec<&str> = tokens.iter().map(|(t, _)| t.as_str()).collect();
    let downstream: Vec<&str> = tokens.iter().map(|(_, d)| d.as_str()).collect();
    let principals: Vec<&str> = requests().map(|r| r.principal.as_str()).collect();
    let query = || {
        sqlx::query(BEGIN_ACQUIRE_BATCH)
            .bind(&namespaces)
            .bind(&keys)
            .bind(&fingerprints)
            .bind(&leases)
            .bind(&retentions)
            .bind(&downstream)
            .bind(&lease_tokens)
            .bind(&nonces)
            .bind(&principals)
            .bind(REAPER_REASON)
    };
    let rows = store.session().fetch_all(query).await?;
    let mut acquired = HashMap::with_capacity(rows.len());
    for row in rows {
        let namespace: String = row.try_get("namespace")?;
        let key: String = row.try_get("key")?;
        acquired.insert(RecordId::stored(namespace, key), row);
    }
    Ok(acquired)
}

/// Reads the keys that were not acquired and applies Begin's table; what
/// changed in between (or failed to read) goes through the one-key path.
async fn judge_begins(store: &SingleKey, pending: Vec<Item<BeginRequest, BeginOutcome>>) {
    if pending.is_empty() {
        return;
    }
    let namespaces: Vec<&str> = pending.iter().map(|(r, _)| r.id.namespace.as_str()).collect();
    let keys: Vec<&str> = pending.iter().map(|(r, _)| r.id.key.as_str()).collect();
    let read = store.session().fetch_all(|| sqlx::query(BEGIN_READ_BATCH).bind(&namespaces).bind(&keys)).await;
    let mut current = HashMap::new();
    for row in read.unwrap_or_default() {
        if let (Ok(namespace), Ok(key), Ok(record)) =
            (row.try_get::<String, _>("namespace"), row.try_get::<String, _>("key"), current_record(&row))
        {
            current.insert(RecordId::stored(namespace, key), record);
        }
    }
    for (request, reply) in pending {
        match current.remove(&request.id).map(|record| record.verdict(&request)) {
            Some(Verdict::Outcome(outcome)) => {
                let _ = reply.send(Ok(outcome));
            }
            Some(Verdict::Mismatch) => {
                let _ = reply.send(Err(Error::FingerprintMismatch));
            }
            Some(Verdict::TryAgain) | None => begin_alone(store, (request, reply)),
        }
    }
}

async fn run_completes(store: SingleKey, batch: Vec<Item<CompleteRequest, Completion>>) {
    if batch.len() == 1 {
        for (request, reply) in batch {
            let _ = reply.send(store.complete_single(&request).await);
        }
        return;
    }
    tracing::debug!(size = batch.len(), "group commit of Completes");
    let (entries, repeats) = distinct(batch, |r| r.id.clone());
    let requests = || entries.iter().map(|(r, _)| r);
    let namespaces: Vec<&str> = requests().map(|r| r.id.namespace.as_str()).collect();
    let keys: Vec<&str> = requests().map(|r| r.id.key.as_str()).collect();
    let tokens: Vec<&str> = requests().map(|r| r.lease_token.as_str()).collect();
    let responses: Vec<&[u8]> = requests().map(|r| r.response.as_slice()).collect();
    let codes: Vec<i32> = requests().map(|r| r.response_code).collect();
    let content_types: Vec<&str> = requests().map(|r| r.content_type.as_str()).collect();
    let principals: Vec<&str> = requests().map(|r| r.principal.as_str()).collect();
    let query = || {
        sqlx::query(COMPLETE_BATCH)
            .bind(&namespaces)
            .bind(&keys)
            .bind(&tokens)
            .bind(&responses)
            .bind(&codes)
            .bind(&content_types)
            .bind(&principals)
    };
    let result = store.session().fetch_all(query).await;
    match result {
        Ok(rows) => {
            let mut done = HashMap::with_capacity(rows.len());
            for row in rows {
                if let (Ok(namespace), Ok(key), Ok(completed_at), Ok(expires_at)) = (
                    row.try_get::<String, _>("namespace"),
                    row.try_get::<String, _>("key"),
                    row.try_get("completed_at"),
                    row.try_get("expires_at"),
                ) {
                    done.insert(RecordId::stored(namespace, key), Completion { completed_at, expires_at });
                }
            }
            for (request, reply) in entries {
                match done.remove(&request.id) {
                    Some(completion) => {
                        let _ = reply.send(Ok(completion));
                    }
                    // Not completed here: the one-key path says why (a retry, LEASE_LOST, NOT_FOUND).
                    None => complete_alone(&store, (request, reply)),
                }
            }
        }
        Err(error) => {
            tracing::warn!(%error, "group commit of Completes failed; each runs alone");
            entries.into_iter().for_each(|item| complete_alone(&store, item));
        }
    }
    repeats.into_iter().for_each(|item| complete_alone(&store, item));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_begin_whose_caller_has_gone_is_abandoned() {
        let (waiting, _answer) = oneshot::channel::<Result<()>>();
        let (gone, answer) = oneshot::channel::<Result<()>>();
        drop(answer);
        let mut batch: Vec<Item<&str, ()>> = vec![("waiting", waiting), ("gone", gone)];
        batch.retain(|item| !abandoned(item));
        assert_eq!(batch.iter().map(|(name, _)| *name).collect::<Vec<_>>(), ["waiting"]);
    }
}
