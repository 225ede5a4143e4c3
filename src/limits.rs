//! Limits that keep one caller from exhausting the service: parked waiters
//! overall and per namespace, and an optional per-namespace request rate.
//! Both answer RESOURCE_EXHAUSTED beyond the limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use crate::domain::Namespace;
use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct Parked {
    total: usize,
    per_namespace: HashMap<String, usize>,
}

/// Counts parked `wait_timeout` waiters against `--max-waiters` and
/// `--max-waiters-per-namespace`.
#[derive(Debug)]
pub struct WaiterLimits {
    max_total: usize,
    max_per_namespace: usize,
    parked: Mutex<Parked>,
}

impl WaiterLimits {
    pub fn new(max_total: usize, max_per_namespace: usize) -> Arc<Self> {
        Arc::new(WaiterLimits { max_total, max_per_namespace, parked: Mutex::new(Parked::default()) })
    }

    fn parked(&self) -> MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for one more waiter, released when the permit drops.
    pub fn admit(self: &Arc<Self>, namespace: &Namespace) -> Result<WaiterPermit> {
        let mut parked = self.parked();
        let in_namespace = parked.per_namespace.get(namespace.as_str()).copied().unwrap_or(0);
        if parked.total >= self.max_total {
            return Err(Error::TooManyWaiters("the server"));
        }
        if in_namespace >= self.max_per_namespace {
            return Err(Error::TooManyWaiters("this namespace"));
        }
        parked.total += 1;
        *parked.per_namespace.entry(namespace.as_str().to_string()).or_insert(0) += 1;
        Ok(WaiterPermit { limits: Arc::clone(self), namespace: namespace.as_str().to_string() })
    }
}

pub struct WaiterPermit {
    limits: Arc<WaiterLimits>,
    namespace: String,
}

impl Drop for WaiterPermit {
    fn drop(&mut self) {
        let mut parked = self.limits.parked();
        parked.total = parked.total.saturating_sub(1);
        if let Some(count) = parked.per_namespace.get_mut(&self.namespace) {
            *count -= 1;
            if *count == 0 {
                parked.per_namespace.remove(&self.namespace);
            }
        }
    }
}

/// A token bucket per namespace: `rate` requests a second, bursts of `rate`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    /// The last sweep of full buckets: at most one a second, however many namespaces.
    swept: Mutex<Instant>,
}

/// Past this many namespaces, buckets that refilled completely are dropped.
const MAX_BUCKETS: usize = 10_000;

impl RateLimiter {
    /// `None` when `rate` is 0 (off).
    pub fn new(rate: u32) -> Option<Self> {
        (rate > 0).then(|| RateLimiter {
            rate: f64::from(rate),
            buckets: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
        })
    }

    pub fn check(&self, namespace: &Namespace) -> Result<()> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let mut swept = self.swept.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() > MAX_BUCKETS && now.duration_since(*swept) >= std::time::Duration::from_secs(1) {
            *swept = now;
            let rate = self.rate;
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < rate);
        }
        let (tokens, at) = buckets.entry(namespace.as_str().to_string()).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        if *tokens < 1.0 {
            return Err(Error::RateLimited);
        }
        *tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str) -> Namespace {
        Namespace::parse(name.into()).expect("namespace")
    }

    #[test]
    fn waiter_slots_are_counted_and_released() {
        let limits = WaiterLimits::new(3, 2);
        let a1 = limits.admit(&ns("a")).expect("1st in a");
        let _a2 = limits.admit(&ns("a")).expect("2nd in a");
        assert!(matches!(limits.admit(&ns("a")), Err(Error::TooManyWaiters(_))));
        let _b1 = limits.admit(&ns("b")).expect("b");
        assert!(matches!(limits.admit(&ns("c")), Err(Error::TooManyWaiters(_))), "3 overall");
        drop(a1);
        limits.admit(&ns("a")).expect("a slot was released");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_is_per_namespace_and_refills() {
        let limiter = RateLimiter::new(2).expect("on");
        limiter.check(&ns("a")).expect("1");
        limiter.check(&ns("a")).expect("2");
        assert!(matches!(limiter.check(&ns("a")), Err(Error::RateLimited)));
        limiter.check(&ns("b")).expect("another namespace");
        tokio::time::advance(std::time::Duration::from_millis(500)).await;
        limiter.check(&ns("a")).expect("refilled one");
        assert!(RateLimiter::new(0).is_none());
    }
}
