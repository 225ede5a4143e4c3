//! Limits that keep one caller from exhausting the service: parked waiters
//! overall, per namespace and per credential, and optional request rates
//! per namespace and per credential. All answer RESOURCE_EXHAUSTED beyond
//! the limit. The per-credential limits hold however many namespaces a
//! `prefix.*` grant lets one credential spread over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use crate::auth::Principal;
use crate::domain::Namespace;
use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct Parked {
    total: usize,
    per_namespace: HashMap<String, usize>,
    per_credential: HashMap<String, usize>,
}

fn release(counts: &mut HashMap<String, usize>, name: &str) {
    if let Some(count) = counts.get_mut(name) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            counts.remove(name);
        }
    }
}

/// Counts parked `wait_timeout` waiters against `--max-waiters`,
/// `--max-waiters-per-namespace` and `--max-waiters-per-credential`.
#[derive(Debug)]
pub struct WaiterLimits {
    max_total: usize,
    max_per_namespace: usize,
    max_per_credential: usize,
    parked: Mutex<Parked>,
}

impl WaiterLimits {
    pub fn new(max_total: usize, max_per_namespace: usize, max_per_credential: usize) -> Arc<Self> {
        Arc::new(WaiterLimits {
            max_total,
            max_per_namespace,
            max_per_credential,
            parked: Mutex::new(Parked::default()),
        })
    }

    fn parked(&self) -> MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for one more waiter, released when the permit drops. Without
    /// auth there is no credential to count.
    pub fn admit(self: &Arc<Self>, namespace: &Namespace, principal: Option<&Principal>) -> Result<WaiterPermit> {
        let mut parked = self.parked();
        if parked.total >= self.max_total {
            return Err(Error::TooManyWaiters("the server"));
        }
        if parked.per_namespace.get(namespace.as_str()).copied().unwrap_or(0) >= self.max_per_namespace {
            return Err(Error::TooManyWaiters("this namespace"));
        }
        let credential = principal.map(|principal| principal.name().to_string());
        if let Some(name) = &credential
            && parked.per_credential.get(name).copied().unwrap_or(0) >= self.max_per_credential
        {
            return Err(Error::TooManyWaiters("these credentials"));
        }
        parked.total += 1;
        *parked.per_namespace.entry(namespace.as_str().to_string()).or_insert(0) += 1;
        if let Some(name) = &credential {
            *parked.per_credential.entry(name.clone()).or_insert(0) += 1;
        }
        Ok(WaiterPermit { limits: Arc::clone(self), namespace: namespace.as_str().to_string(), credential })
    }
}

pub struct WaiterPermit {
    limits: Arc<WaiterLimits>,
    namespace: String,
    credential: Option<String>,
}

impl Drop for WaiterPermit {
    fn drop(&mut self) {
        let mut parked = self.limits.parked();
        parked.total = parked.total.saturating_sub(1);
        release(&mut parked.per_namespace, &self.namespace);
        if let Some(name) = &self.credential {
            release(&mut parked.per_credential, name);
        }
    }
}

/// A token bucket per name (a namespace, or a credential): `rate` requests
/// a second, bursts of `rate`.
#[derive(Debug)]
pub struct RateLimiter {
    /// What a bucket is of, for the error: "this namespace", "these credentials".
    scope: &'static str,
    rate: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    /// The last sweep of full buckets: at most one a second, however many namespaces.
    swept: Mutex<Instant>,
}

/// Past this many names, buckets that refilled completely are dropped.
const MAX_BUCKETS: usize = 10_000;

impl RateLimiter {
    /// `None` when `rate` is 0 (off).
    pub fn new(rate: u32, scope: &'static str) -> Option<Self> {
        (rate > 0).then(|| RateLimiter {
            scope,
            rate: f64::from(rate),
            buckets: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
        })
    }

    pub fn check(&self, name: &str) -> Result<()> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let mut swept = self.swept.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() > MAX_BUCKETS && now.duration_since(*swept) >= std::time::Duration::from_secs(1) {
            *swept = now;
            let rate = self.rate;
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < rate);
        }
        let (tokens, at) = buckets.entry(name.to_string()).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        if *tokens < 1.0 {
            return Err(Error::RateLimited(self.scope));
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
        let limits = WaiterLimits::new(3, 2, 10);
        let a1 = limits.admit(&ns("a"), None).expect("1st in a");
        let _a2 = limits.admit(&ns("a"), None).expect("2nd in a");
        assert!(matches!(limits.admit(&ns("a"), None), Err(Error::TooManyWaiters(_))));
        let _b1 = limits.admit(&ns("b"), None).expect("b");
        assert!(matches!(limits.admit(&ns("c"), None), Err(Error::TooManyWaiters(_))), "3 overall");
        drop(a1);
        limits.admit(&ns("a"), None).expect("a slot was released");
    }

    #[test]
    fn one_credential_cannot_spread_over_namespaces_past_its_share() {
        let (_, line) = crate::auth::new_token(&["pay.*".into()]).expect("token");
        let (grants, _) = crate::auth::Grants::parse_lenient(&line);
        let principal = grants.principals().next().expect("one credential");
        let limits = WaiterLimits::new(100, 10, 3);
        let permits: Vec<_> = (0..3)
            .map(|i| limits.admit(&ns(&format!("pay.n{i}")), Some(&principal)).expect("within its share"))
            .collect();
        let refused = limits.admit(&ns("pay.n3"), Some(&principal));
        assert!(matches!(refused, Err(Error::TooManyWaiters("these credentials"))));
        limits.admit(&ns("pay.n3"), None).expect("another caller still parks");
        drop(permits);
        limits.admit(&ns("pay.n3"), Some(&principal)).expect("released");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_is_per_name_and_refills() {
        let limiter = RateLimiter::new(2, "this namespace").expect("on");
        limiter.check("a").expect("1");
        limiter.check("a").expect("2");
        assert!(matches!(limiter.check("a"), Err(Error::RateLimited(_))));
        limiter.check("b").expect("another name");
        tokio::time::advance(std::time::Duration::from_millis(500)).await;
        limiter.check("a").expect("refilled one");
        assert!(RateLimiter::new(0, "this namespace").is_none());
    }
}
