//! The README's examples, run against a real idemd with a fake payment
//! provider; `the_readme_shows_these_examples` checks that every Rust block
//! of the README appears here verbatim, so the README cannot drift from
//! code that compiles and runs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use idemd_client::{Client, ErrorKind, Failure, Policy, Response, entity_key, fingerprint};

use crate::helpers::*;

// --- What the README's examples take as given: your order, your payment
// provider's SDK and its errors. ---

pub struct Order {
    pub id: String,
    pub amount: String,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub id: String,
}

impl Charge {
    fn to_json(&self) -> Vec<u8> {
        format!(r#"{{"id":"{}"}}"#, self.id).into_bytes()
    }

    fn from_json(body: &[u8]) -> Result<Charge, PaymentError> {
        let text = String::from_utf8_lossy(body);
        let id = text.strip_prefix(r#"{"id":""#).and_then(|rest| rest.strip_suffix(r#""}"#));
        id.map(|id| Charge { id: id.to_string() }).ok_or_else(|| PaymentError::Corrupt(text.into_owned()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("card declined: {0}")]
    Declined(String),
    #[error("no answer within the timeout")]
    Timeout,
    #[error("provider answered 503")]
    Unavailable,
}

/// A provider that deduplicates on the idempotency key it is given, as
/// Stripe, Adyen and PayPal do; its first answer to a charge is lost after
/// it charged, amounts of 666 are declined and amounts of 503 refused.
#[derive(Default)]
pub struct Provider {
    charges: Mutex<HashMap<String, Charge>>,
    calls: AtomicU32,
}

impl Provider {
    async fn charge(&self, amount: &str, _currency: &str, idempotency_key: &str) -> Result<Charge, ProviderError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if amount == "666" {
            return Err(ProviderError::Declined("insufficient_funds".into()));
        }
        if amount == "503" {
            return Err(ProviderError::Unavailable);
        }
        let mut charges = self.charges.lock().expect("charges");
        let next = charges.len() + 1;
        let charge = charges.entry(idempotency_key.to_string()).or_insert_with(|| Charge { id: format!("ch_{next}") });
        if call == 0 {
            return Err(ProviderError::Timeout);
        }
        Ok(charge.clone())
    }

    async fn find_by_metadata(&self, _field: &str, idempotency_key: &str) -> Result<Option<Charge>, ProviderError> {
        Ok(self.charges.lock().expect("charges").get(idempotency_key).cloned())
    }
}

/// Your service's error: the README's example converts into it.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("card declined: {0}")]
    Declined(String),
    #[error("stored charge unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Idemd(#[from] idemd_client::Error<ProviderError>),
}

// --- The README's examples, verbatim. ---

/// Charges an order at most once, however often it is called.
async fn charge_order(idemd: &Client, provider: &Provider, order: &Order) -> Result<Charge, PaymentError> {
    let key = entity_key(&order.id, "charge");
    let fp = fingerprint(&[("amount", order.amount.as_bytes()), ("currency", order.currency.as_bytes())]);
    let done = idemd
        .run_once(&key, &fp, |attempt| async move {
            // The provider's idempotency key: a retry after a crash charges once.
            match provider.charge(&order.amount, &order.currency, &attempt.downstream_key).await {
                Ok(charge) => Ok(Response::new(201, charge.to_json(), "application/json")),
                // An answer: stored and replayed to every retry.
                Err(ProviderError::Declined(reason)) => Err(Failure::Final(Response::new(402, reason, "text/plain"))),
                // Sent, no answer: it may have charged.
                Err(error @ ProviderError::Timeout) => Err(Failure::OutcomeUnknown(error)),
                // Refused (a 5xx, "idempotency key in use"): nothing happened.
                Err(error) => Err(Failure::Retryable(error)),
            }
        })
        .await?;
    // A replayed decline comes back as the same error as the first one.
    let stored = done.into_result(|stored| {
        (stored.code == 402).then(|| PaymentError::Declined(String::from_utf8_lossy(&stored.body).into_owned()))
    })?;
    Charge::from_json(&stored.body)
}

/// The HTTP status a payment API answers for each outcome.
fn status_of(result: &Result<Charge, PaymentError>) -> u16 {
    match result {
        Ok(_) => 201,
        Err(PaymentError::Declined(_)) => 402,
        Err(PaymentError::Idemd(error)) => match error.kind() {
            // Nothing happened: the client may retry later.
            ErrorKind::InProgress | ErrorKind::Retryable | ErrorKind::Rpc => 503,
            // It may have charged: a retry is safe (same downstream key).
            ErrorKind::OutcomeUnknown | ErrorKind::LeaseLost => 503,
            // The key was used for another request.
            ErrorKind::FingerprintMismatch => 422,
            _ => 500,
        },
        Err(PaymentError::Corrupt(_)) => 500,
    }
}

/// For a provider that does not deduplicate on the key: look first.
async fn charge_order_reconciled(idemd: &Client, provider: &Provider, order: &Order) -> Result<Charge, PaymentError> {
    let key = entity_key(&order.id, "charge");
    let fp = fingerprint(&[("amount", order.amount.as_bytes()), ("currency", order.currency.as_bytes())]);
    let done = idemd
        .run_once_with_reconcile(
            &key,
            &fp,
            // Only when attempt.previous says its outcome is unknown: what does the provider hold?
            |attempt| async move {
                let found = provider.find_by_metadata("idempotency_key", &attempt.downstream_key).await?;
                Ok(found.map(|charge| Response::new(201, charge.to_json(), "application/json")))
            },
            |attempt| async move {
                match provider.charge(&order.amount, &order.currency, &attempt.downstream_key).await {
                    Ok(charge) => Ok(Response::new(201, charge.to_json(), "application/json")),
                    Err(error @ ProviderError::Timeout) => Err(Failure::OutcomeUnknown(error)),
                    Err(error) => Err(Failure::Retryable(error)),
                }
            },
        )
        .await?;
    Charge::from_json(&done.response.body)
}

// --- Running them. ---

#[tokio::test]
async fn the_readme_example_charges_once_and_replays_a_decline() {
    let server = start_idemd().await;
    let idemd = Client::connect_lazy(&server.addr, "payments", Policy::default()).expect("client");
    let provider = Provider::default();
    let order = Order { id: "order-42".into(), amount: "1000".into(), currency: "EUR".into() };

    // The provider charged, but its answer was lost: outcome unknown.
    let first = charge_order(&idemd, &provider, &order).await;
    assert!(matches!(&first, Err(PaymentError::Idemd(e)) if e.kind() == ErrorKind::OutcomeUnknown), "{first:?}");
    assert_eq!(status_of(&first), 503);
    // The retry is safe: the same downstream key gets the same charge.
    let retried = charge_order(&idemd, &provider, &order).await.expect("the retry");
    let again = charge_order(&idemd, &provider, &order).await.expect("a replay");
    assert_eq!((&retried, &again), (&Charge { id: "ch_1".into() }, &Charge { id: "ch_1".into() }));
    assert_eq!(provider.charges.lock().expect("charges").len(), 1, "charged once");

    let declined = Order { id: "order-43".into(), amount: "666".into(), currency: "EUR".into() };
    for _ in 0..2 {
        let result = charge_order(&idemd, &provider, &declined).await;
        assert!(matches!(&result, Err(PaymentError::Declined(reason)) if reason == "insufficient_funds"), "{result:?}");
        assert_eq!(status_of(&result), 402);
    }
    let refused = Order { id: "order-45".into(), amount: "503".into(), currency: "EUR".into() };
    let result = charge_order(&idemd, &provider, &refused).await;
    assert!(matches!(&result, Err(PaymentError::Idemd(e)) if e.kind() == ErrorKind::Retryable), "{result:?}");
    assert_eq!(status_of(&result), 503);
    let changed = Order { amount: "2000".into(), ..order };
    let reused = charge_order(&idemd, &provider, &changed).await;
    assert_eq!(status_of(&reused), 422, "{reused:?}");
}

#[tokio::test]
async fn the_readme_reconcile_example_finds_the_lost_charge() {
    let server = start_idemd().await;
    let idemd =
        Client::connect_lazy(&format!("http://{}", server.addr), "payments", Policy::default()).expect("client");
    let provider = Provider::default();
    let order = Order { id: "order-44".into(), amount: "1000".into(), currency: "EUR".into() };
    let first = charge_order_reconciled(&idemd, &provider, &order).await;
    assert_eq!(status_of(&first), 503);
    let found = charge_order_reconciled(&idemd, &provider, &order).await.expect("reconciled");
    assert_eq!(found, Charge { id: "ch_1".into() });
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1, "the hook found it: no second charge call");
}

#[test]
fn the_readme_shows_these_examples() {
    let readme = include_str!("../../README.md");
    let source = include_str!("readme.rs");
    let mut blocks = 0;
    let mut rest = readme;
    while let Some(start) = rest.find("```rust\n") {
        let block = &rest[start + "```rust\n".len()..];
        let end = block.find("```\n").expect("a closed block");
        assert!(
            source.contains(&block[..end]),
            "the README block is not in tests/client/readme.rs:\n{}",
            &block[..end]
        );
        blocks += 1;
        rest = &block[end..];
    }
    assert!(blocks >= 3, "the README's Rust examples: {blocks}");
}
