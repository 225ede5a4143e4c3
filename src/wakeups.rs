//! Parks Begin waiters per key and wakes them when the holder's Complete or
//! Abort (or the reaper) finishes with the key.
//!
//! A waiter subscribes *before* it tries the acquisition, so a wake-up that
//! lands between the attempt and the wait is never lost. Subscriptions hold
//! no database connection: a parked waiter is a watch receiver and a map
//! entry, removed with the last subscriber. SQLite wakes in-process; Postgres
//! relays `NOTIFY` from any replica through [`Wakeups::wake_payload`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use crate::domain::RecordId;

#[derive(Debug, Default)]
pub struct Wakeups {
    /// A key with waiters → a counter bumped on every wake-up.
    topics: Mutex<HashMap<RecordId, watch::Sender<u64>>>,
}

impl Wakeups {
    pub fn new() -> Arc<Self> {
        Arc::new(Wakeups::default())
    }

    fn topics(&self) -> MutexGuard<'_, HashMap<RecordId, watch::Sender<u64>>> {
        // The map stays consistent even if a holder panicked mid-insert.
        self.topics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts listening for wake-ups of `id`; call before trying to acquire.
    pub fn subscribe(self: &Arc<Self>, id: &RecordId) -> Subscription {
        let topic = id.clone();
        let receiver = self.topics().entry(topic.clone()).or_insert_with(|| watch::channel(0).0).subscribe();
        Subscription { hub: Arc::clone(self), topic, receiver: Some(receiver) }
    }

    /// Wakes the waiters of one key, if any.
    pub fn wake(&self, id: &RecordId) {
        if let Some(sender) = self.topics().get(id) {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes the waiters of the key a `NOTIFY` payload names.
    pub fn wake_payload(&self, payload: &str) {
        match RecordId::from_wake_payload(payload) {
            Some(id) => self.wake(&id),
            None => {
                tracing::warn!(payload, "a wake-up that names no key; waking every waiter");
                self.wake_all();
            }
        }
    }

    /// Wakes everyone: used when wake-ups may have been missed (the
    /// notification connection dropped), so each waiter re-checks its key.
    pub fn wake_all(&self) {
        for sender in self.topics().values() {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Keys with at least one parked waiter on this replica.
    #[cfg(test)]
    fn waiting_keys(&self) -> usize {
        self.topics().len()
    }
}

/// One waiter's interest in one key.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Wakeups>,
    topic: RecordId,
    receiver: Option<watch::Receiver<u64>>,
}

impl Subscription {
    /// Resolves on the next wake-up after the subscription (or the previous
    /// `woken`); returns at once if one already happened.
    pub async fn woken(&mut self) {
        if let Some(receiver) = self.receiver.as_mut() {
            // The sender lives in the map while any receiver exists, so this
            // cannot fail; if it ever did, waking early is the safe side.
            let _ = receiver.changed().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.receiver.take());
        let mut topics = self.hub.topics();
        if topics.get(&self.topic).is_some_and(|s| s.receiver_count() == 0) {
            topics.remove(&self.topic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(key: &str) -> RecordId {
        RecordId::parse("ns".into(), key.into()).expect("valid id")
    }

    #[tokio::test]
    async fn wake_reaches_only_that_key_and_map_empties() {
        let hub = Wakeups::new();
        let mut a = hub.subscribe(&id("a"));
        let mut b = hub.subscribe(&id("b"));
        hub.wake(&id("a"));
        tokio::time::timeout(Duration::from_secs(1), a.woken()).await.expect("a woken");
        assert!(tokio::time::timeout(Duration::from_millis(50), b.woken()).await.is_err());
        assert_eq!(hub.waiting_keys(), 2);
        drop(a);
        drop(b);
        assert_eq!(hub.waiting_keys(), 0);
    }

    #[tokio::test]
    async fn a_notify_payload_wakes_its_key() {
        let hub = Wakeups::new();
        let mut a = hub.subscribe(&RecordId::parse("ns".into(), "a/b".into()).expect("valid id"));
        hub.wake_payload("ns/a/b");
        tokio::time::timeout(Duration::from_secs(1), a.woken()).await.expect("woken");
        assert_eq!(RecordId::from_wake_payload("no slash"), None);
    }

    #[tokio::test]
    async fn wake_before_wait_is_not_lost() {
        let hub = Wakeups::new();
        let mut a = hub.subscribe(&id("a"));
        hub.wake_all();
        tokio::time::timeout(Duration::from_secs(1), a.woken()).await.expect("woken");
    }
}
