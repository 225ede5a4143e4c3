//! Group commit on Postgres: concurrent Begins and Completes are gathered
//! while the previous batch is in the database and executed as one
//! statement (`unnest` arrays) in one transaction; each caller gets its own
//! answer. A batch with both kinds is one statement and one commit for
//! both, so a pair's Begin and Complete share their commits with other
//! pairs'.
//!
//! A lone call runs the one-key statement at once (nothing waits for a
//! window unless `--group-commit-window` asks for one). Repeats of a key in a
//! batch (a Begin and a Complete of one key included) take the one-key path
//! after it, so a statement never touches a row twice; rows of a kind are
//! taken in key order so concurrent batches rarely wait on one another,
//! and a deadlock between them is retried like any other. Every rule is the
//! same SQL as the one-key statement's; a key the batch did not settle is
//! judged by the same verdict or goes through the one-key path, and a batch
//! that fails falls back to one-key calls.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::PgRow;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::session::PgQuery;
use super::statements::{BEGIN_ACQUIRE_BATCH, BEGIN_COMPLETE_BATCH, BEGIN_READ_BATCH, COMPLETE_BATCH, SingleKey};
use crate::domain::{
    BeginOutcome, BeginRequest, CompleteRequest, Completion, REAPER_REASON, RecordId, Verdict, micros,
    new_downstream_key, new_lease_token,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::rows::{acquired_lease, current_record};

type Reply<A> = oneshot::Sender<Result<A>>;
type Item<Q, A> = (Q, Reply<A>);
type BeginItem = Item<BeginRequest, BeginOutcome>;
type CompleteItem = Item<CompleteRequest, Completion>;

/// The calls waiting for a batch, one queue per kind.
#[derive(Debug)]
struct Queues {
    begins: mpsc::Receiver<BeginItem>,
    completes: mpsc::Receiver<CompleteItem>,
}

/// What one batch worker took from the queues.
#[derive(Debug, Default)]
struct Batch {
    begins: Vec<BeginItem>,
    completes: Vec<CompleteItem>,
}

/// Hands Begins and Completes to the batch workers.
#[derive(Debug)]
pub struct GroupCommit {
    begins: mpsc::Sender<BeginItem>,
    completes: mpsc::Sender<CompleteItem>,
}

impl GroupCommit {
    /// Starts `workers` batch workers over the one-key statements, each
    /// taking up to `max_batch` Begins and `max_batch` Completes. A batch
    /// still running after the store timeout (a database gone silent) is
    /// given up, closing its connection, so the calls queued behind it reach
    /// the database again once it answers or the primary moves. Each batch's
    /// size is counted by kind in `metrics`.
    pub fn start(
        store: SingleKey,
        workers: usize,
        max_batch: usize,
        window: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> Arc<Self> {
        let capacity = max_batch.max(1) * workers.max(1) * 4;
        let (begins, begin_queue) = mpsc::channel(capacity);
        let (completes, complete_queue) = mpsc::channel(capacity);
        let queues = Arc::new(Mutex::new(Queues { begins: begin_queue, completes: complete_queue }));
        let limit = store.store_timeout();
        for _ in 0..workers.max(1) {
            let (store, queues, metrics) = (store.clone(), Arc::clone(&queues), metrics.clone());
            tokio::spawn(async move {
                while let Some(batch) = gather(&queues, max_batch.max(1), window).await {
                    if let Some(metrics) = &metrics {
                        if !batch.begins.is_empty() {
                            metrics.group_commit_batch("begin", batch.begins.len());
                        }
                        if !batch.completes.is_empty() {
                            metrics.group_commit_batch("complete", batch.completes.len());
                        }
                    }
                    if tokio::time::timeout(limit, run(&store, batch)).await.is_err() {
                        tracing::warn!(?limit, "a group commit batch outlasted the store timeout; given up");
                    }
                }
            });
        }
        Arc::new(GroupCommit { begins, completes })
    }

    pub async fn begin(&self, request: BeginRequest) -> Result<BeginOutcome> {
        submit(&self.begins, request).await
    }

    pub async fn complete(&self, request: CompleteRequest) -> Result<Completion> {
        submit(&self.completes, request).await
    }
}

async fn submit<Q, A>(queue: &mpsc::Sender<Item<Q, A>>, request: Q) -> Result<A> {
    let (reply, answer) = oneshot::channel();
    queue.send((request, reply)).await.map_err(|_| Error::Internal("group commit stopped".into()))?;
    // Dropped unanswered: its batch was given up at the store timeout, so,
    // as for a single call that timed out, it may or may not have committed.
    answer.await.map_err(|_| Error::StoreTimeout)?
}

/// Waits for one call of either kind, then takes what else is already
/// queued (or arrives within `window`), up to `max_batch` of each kind.
async fn gather(queues: &Mutex<Queues>, max_batch: usize, window: Duration) -> Option<Batch> {
    let mut queues = queues.lock().await;
    let Queues { begins, completes } = &mut *queues;
    let mut batch = Batch::default();
    tokio::select! {
        Some(item) = begins.recv() => batch.begins.push(item),
        Some(item) = completes.recv() => batch.completes.push(item),
        else => return None,
    }
    let deadline = tokio::time::Instant::now() + window;
    loop {
        take_queued(begins, &mut batch.begins, max_batch);
        take_queued(completes, &mut batch.completes, max_batch);
        let (begins_full, completes_full) = (batch.begins.len() >= max_batch, batch.completes.len() >= max_batch);
        if window.is_zero() || (begins_full && completes_full) {
            return Some(batch);
        }
        let arrived = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                Some(item) = begins.recv(), if !begins_full => batch.begins.push(item),
                Some(item) = completes.recv(), if !completes_full => batch.completes.push(item),
                else => std::future::pending().await,
            }
        });
        if arrived.await.is_err() {
            return Some(batch);
        }
    }
}

fn take_queued<T>(queue: &mut mpsc::Receiver<T>, into: &mut Vec<T>, max_batch: usize) {
    while into.len() < max_batch {
        match queue.try_recv() {
            Ok(item) => into.push(item),
            Err(_) => break,
        }
    }
}

/// One entry per key, and the repeats.
type Split<Q, A> = (Vec<Item<Q, A>>, Vec<Item<Q, A>>);

/// Splits calls into one entry per key and the repeats; a key already in
/// `taken` is a repeat.
fn distinct<Q, A>(calls: Vec<Item<Q, A>>, id: impl Fn(&Q) -> &RecordId, taken: &mut HashSet<RecordId>) -> Split<Q, A> {
    let (mut entries, mut repeats) = (Vec::new(), Vec::new());
    for item in calls {
        if taken.insert(id(&item.0).clone()) {
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

fn begin_alone(store: &SingleKey, (request, reply): BeginItem) {
    let store = store.clone();
    tokio::spawn(async move {
        if reply.is_closed() {
            return;
        }
        let outcome = tokio::time::timeout(store.store_timeout(), store.begin_single(&request)).await;
        let _ = reply.send(outcome.unwrap_or(Err(Error::StoreTimeout)));
    });
}

fn complete_alone(store: &SingleKey, (request, reply): CompleteItem) {
    let store = store.clone();
    tokio::spawn(async move {
        let completion = tokio::time::timeout(store.store_timeout(), store.complete_single(&request)).await;
        let _ = reply.send(completion.unwrap_or(Err(Error::StoreTimeout)));
    });
}

/// Runs one batch: a lone call as the one-key statement; otherwise the
/// distinct keys of each kind as one statement, both kinds together when
/// there are both; the repeats alone after it.
async fn run(store: &SingleKey, mut batch: Batch) {
    // A caller that gave up while queued must not be handed a lease nobody holds.
    batch.begins.retain(|item| !abandoned(item));
    match (batch.begins.len(), batch.completes.len()) {
        (0, 0) => return,
        (1, 0) => {
            for (request, reply) in batch.begins {
                let _ = reply.send(store.begin_single(&request).await);
            }
            return;
        }
        (0, 1) => {
            for (request, reply) in batch.completes {
                let _ = reply.send(store.complete_single(&request).await);
            }
            return;
        }
        (begins, completes) => tracing::debug!(begins, completes, "group commit"),
    }
    let mut taken = HashSet::new();
    let (mut completes, complete_repeats) = distinct(batch.completes, |r| &r.id, &mut taken);
    // The update takes the rows in the order of its arrays, as the Begins'
    // insert takes them in key order: batches in the database at once then
    // rarely wait on one another.
    completes.sort_by(|(a, _), (b, _)| {
        (a.id.namespace.as_str(), a.id.key.as_str()).cmp(&(b.id.namespace.as_str(), b.id.key.as_str()))
    });
    let (begins, begin_repeats) = distinct(batch.begins, |r| &r.id, &mut taken);
    let tokens: Vec<(String, String)> = begins.iter().map(|_| (new_lease_token(), new_downstream_key())).collect();
    let begin_arrays = BeginArrays::new(&begins, &tokens);
    let complete_arrays = CompleteArrays::new(&completes);
    let result = match (begins.is_empty(), completes.is_empty()) {
        (false, true) => store.session().fetch_all(|| begin_arrays.bind(sqlx::query(BEGIN_ACQUIRE_BATCH))).await,
        (true, false) => store.session().fetch_all(|| complete_arrays.bind(sqlx::query(COMPLETE_BATCH))).await,
        _ => {
            let query = || complete_arrays.bind(begin_arrays.bind(sqlx::query(BEGIN_COMPLETE_BATCH)));
            store.session().fetch_all(query).await
        }
    };
    match result {
        Ok(rows) => {
            let (mut acquired, mut done) = (HashMap::new(), HashMap::new());
            for row in rows {
                let (Ok(kind), Ok(namespace), Ok(key)) =
                    (row.try_get::<i32, _>("kind"), row.try_get::<String, _>("namespace"), row.try_get("key"))
                else {
                    continue;
                };
                let id = RecordId::stored(namespace, key);
                if kind == 1 {
                    acquired.insert(id, row);
                } else if let (Ok(completed_at), Ok(expires_at)) =
                    (row.try_get("completed_at"), row.try_get("expires_at"))
                {
                    done.insert(id, Completion { completed_at, expires_at });
                }
            }
            settle_completes(store, completes, Some(done));
            settle_begins(store, begins, tokens, acquired).await;
        }
        Err(error) => {
            if !completes.is_empty() {
                tracing::warn!(%error, "group commit of Completes failed; each runs alone");
            }
            settle_completes(store, completes, None);
            if error.rejected_by_database() {
                // Postgres rejected the statement, so nothing of it committed: each runs alone.
                if !begins.is_empty() {
                    tracing::warn!(%error, "group commit of Begins failed; each runs alone");
                }
                begins.into_iter().for_each(|item| begin_alone(store, item));
            } else {
                // The connection failed: the batch may have committed, so, as for a
                // single Begin, the callers hear "not confirmed" and retry (same nonce).
                let message = error.to_string();
                for (_, reply) in begins {
                    let _ = reply.send(Err(Error::StoreLost(message.clone())));
                }
            }
        }
    }
    complete_repeats.into_iter().for_each(|item| complete_alone(store, item));
    begin_repeats.into_iter().for_each(|item| begin_alone(store, item));
}

/// The Begins of a batch as the arrays of [`BEGIN_ACQUIRE_BATCH`]'s
/// parameters $1 to $10.
struct BeginArrays<'a> {
    namespaces: Vec<&'a str>,
    keys: Vec<&'a str>,
    fingerprints: Vec<&'a [u8]>,
    leases: Vec<i64>,
    retentions: Vec<i64>,
    downstream: Vec<&'a str>,
    lease_tokens: Vec<&'a str>,
    nonces: Vec<Option<&'a str>>,
    principals: Vec<&'a str>,
}

impl<'a> BeginArrays<'a> {
    fn new(entries: &'a [BeginItem], tokens: &'a [(String, String)]) -> Self {
        let requests = || entries.iter().map(|(r, _)| r);
        BeginArrays {
            namespaces: requests().map(|r| r.id.namespace.as_str()).collect(),
            keys: requests().map(|r| r.id.key.as_str()).collect(),
            fingerprints: requests().map(|r| r.fingerprint.as_slice()).collect(),
            leases: requests().map(|r| micros(r.lease_ttl)).collect(),
            retentions: requests().map(|r| micros(r.retention)).collect(),
            downstream: tokens.iter().map(|(_, d)| d.as_str()).collect(),
            lease_tokens: tokens.iter().map(|(t, _)| t.as_str()).collect(),
            nonces: requests().map(|r| r.attempt_nonce.as_deref()).collect(),
            principals: requests().map(|r| r.principal.as_str()).collect(),
        }
    }

    fn bind<'q>(&'q self, query: PgQuery<'q>) -> PgQuery<'q> {
        query
            .bind(&self.namespaces)
            .bind(&self.keys)
            .bind(&self.fingerprints)
            .bind(&self.leases)
            .bind(&self.retentions)
            .bind(&self.downstream)
            .bind(&self.lease_tokens)
            .bind(&self.nonces)
            .bind(&self.principals)
            .bind(REAPER_REASON)
    }
}

/// The Completes of a batch as the arrays of [`COMPLETE_BATCH`]'s
/// parameters, bound after whatever the query already has.
struct CompleteArrays<'a> {
    namespaces: Vec<&'a str>,
    keys: Vec<&'a str>,
    tokens: Vec<&'a str>,
    responses: Vec<&'a [u8]>,
    codes: Vec<i32>,
    content_types: Vec<&'a str>,
    principals: Vec<&'a str>,
}

impl<'a> CompleteArrays<'a> {
    fn new(entries: &'a [CompleteItem]) -> Self {
        let requests = || entries.iter().map(|(r, _)| r);
        CompleteArrays {
            namespaces: requests().map(|r| r.id.namespace.as_str()).collect(),
            keys: requests().map(|r| r.id.key.as_str()).collect(),
            tokens: requests().map(|r| r.lease_token.as_str()).collect(),
            responses: requests().map(|r| r.response.as_slice()).collect(),
            codes: requests().map(|r| r.response_code).collect(),
            content_types: requests().map(|r| r.content_type.as_str()).collect(),
            principals: requests().map(|r| r.principal.as_str()).collect(),
        }
    }

    fn bind<'q>(&'q self, query: PgQuery<'q>) -> PgQuery<'q> {
        query
            .bind(&self.namespaces)
            .bind(&self.keys)
            .bind(&self.tokens)
            .bind(&self.responses)
            .bind(&self.codes)
            .bind(&self.content_types)
            .bind(&self.principals)
    }
}

/// Answers the Begins of a batch that ran: the acquired ones with their
/// lease, the others by what holds their key.
async fn settle_begins(
    store: &SingleKey,
    entries: Vec<BeginItem>,
    tokens: Vec<(String, String)>,
    mut acquired: HashMap<RecordId, PgRow>,
) {
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
    judge_begins(store, pending).await;
}

/// Answers the Completes of a batch: those it completed (`done`, `None` if
/// the statement failed) with their completion; the others through the
/// one-key path, which says why (a retry, LEASE_LOST, NOT_FOUND).
fn settle_completes(store: &SingleKey, entries: Vec<CompleteItem>, done: Option<HashMap<RecordId, Completion>>) {
    let mut done = done.unwrap_or_default();
    for (request, reply) in entries {
        match done.remove(&request.id) {
            Some(completion) => {
                let _ = reply.send(Ok(completion));
            }
            None => complete_alone(store, (request, reply)),
        }
    }
}

/// Reads the keys that were not acquired and applies Begin's table; what
/// changed in between (or failed to read) goes through the one-key path.
async fn judge_begins(store: &SingleKey, pending: Vec<BeginItem>) {
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
