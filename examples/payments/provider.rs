//! The fake payment provider: records charges and, like Stripe,
//! deduplicates by idempotency key; without deduplication it charges every
//! call, sometimes times out after charging, and answers a lookup by key (as
//! Stripe lists by metadata). In-process for the Rust-only demo; over HTTP
//! on loopback for workers in other languages, with the chaos decided here
//! so that every language meets the same mix.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the provider answers for one idempotency key.
#[derive(Clone, Debug)]
pub enum ProviderResult {
    Charged { charge_id: String },
    Declined,
}

#[derive(Default)]
pub struct Provider {
    /// Whether a repeated idempotency key gets the first answer back (like
    /// Stripe) or is charged again.
    pub deduplicates: bool,
    /// idempotency key → every answer given for it, oldest first.
    by_key: Mutex<HashMap<String, Vec<ProviderResult>>>,
    /// payment → charges actually created for it.
    pub charges_per_payment: Mutex<HashMap<String, u32>>,
    pub raw_calls: AtomicU64,
    pub deduplicated: AtomicU64,
    pub transient_failures: AtomicU64,
    pub timeouts_after_charging: AtomicU64,
    pub lookups: AtomicU64,
    pub lookups_found: AtomicU64,
}

pub enum ProviderError {
    /// Refused before anything was charged.
    Transient,
    /// Done, but the answer never reached the caller.
    Timeout,
}

impl Provider {
    pub fn new(deduplicates: bool) -> Self {
        Provider { deduplicates, ..Provider::default() }
    }

    /// A charge request. Transient failures happen before anything is
    /// charged; timeouts after it.
    pub fn charge(
        &self,
        idempotency_key: &str,
        payment: &str,
        declined: bool,
        fail: bool,
        time_out: bool,
    ) -> Result<ProviderResult, ProviderError> {
        self.raw_calls.fetch_add(1, Ordering::SeqCst);
        if fail {
            self.transient_failures.fetch_add(1, Ordering::SeqCst);
            return Err(ProviderError::Transient);
        }
        let mut by_key = self.by_key.lock().expect("provider");
        if self.deduplicates
            && let Some(first) = by_key.get(idempotency_key).and_then(|answers| answers.first())
        {
            // Without the key this call would have charged the customer again.
            self.deduplicated.fetch_add(1, Ordering::SeqCst);
            return Ok(first.clone());
        }
        let result = if declined {
            ProviderResult::Declined
        } else {
            let mut per_payment = self.charges_per_payment.lock().expect("provider");
            let count = per_payment.entry(payment.to_string()).or_insert(0);
            *count += 1;
            ProviderResult::Charged { charge_id: format!("ch_{}_{}", payment, count) }
        };
        by_key.entry(idempotency_key.to_string()).or_default().push(result.clone());
        if time_out {
            self.timeouts_after_charging.fetch_add(1, Ordering::SeqCst);
            return Err(ProviderError::Timeout);
        }
        Ok(result)
    }

    /// The first answer given for an idempotency key, if any: how a caller
    /// finds out what an attempt whose answer it lost did.
    pub fn find(&self, idempotency_key: &str) -> Option<ProviderResult> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let found = self.by_key.lock().expect("provider").get(idempotency_key).and_then(|a| a.first()).cloned();
        if found.is_some() {
            self.lookups_found.fetch_add(1, Ordering::SeqCst);
        }
        found
    }
}

/// A card is declined or not whoever asks: decided by the payment.
pub fn declined(payment: u64) -> bool {
    payment % 17 == 3
}

/// The provider's HTTP face and the chaos it deals out.
struct Http {
    provider: Arc<Provider>,
    chaos: Mutex<StdRng>,
    /// worker → how many charges it has been answered with a 201.
    charged: Mutex<HashMap<String, u32>>,
}

/// The successful charges (counted from 0 per worker name) whose answer
/// tells the worker to crash: the 9th, 21st and 41st. Every language crashes
/// a few times, and not before it got going: a slow starter (a JVM) that
/// crashed at once would restart after the others had taken all its
/// payments.
const CRASH_AFTER: [u32; 3] = [8, 20, 40];

/// Serves the provider on loopback until the process ends:
///
/// - `POST /v1/charges` with `Idempotency-Key: <key>`, `Demo-Worker:
///   <name>` and `{"payment":"pay-N","amount":"…","currency":"EUR"}`:
///   201 `{"id":"ch_pay-N_1"}`; 402 `{"error":"card_declined"}`; 503 (15 %,
///   nothing charged: retryable); without deduplication also 504 (15 %,
///   charged, but the answer is lost: the outcome is unknown). A 201 may
///   carry `Demo-Crash: now`: the worker exits at once, after the charge and
///   before idemd hears of it (see `CRASH_AFTER`).
/// - `GET /v1/charges?idempotency_key=<key>`: what that key got first, 200
///   or 402 with the same body as the charge's answer, or 404.
///
/// Bodies carry no spaces, so workers print them as one field.
pub async fn serve(provider: Arc<Provider>, seed: u64) -> SocketAddr {
    let http = Arc::new(Http {
        provider,
        chaos: Mutex::new(StdRng::seed_from_u64(seed)),
        charged: Mutex::new(HashMap::new()),
    });
    let app = axum::Router::new().route("/v1/charges", axum::routing::post(charge).get(find)).with_state(http);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [("content-type", "application/json")], body).into_response()
}

fn charged(result: &ProviderResult) -> Response {
    match result {
        ProviderResult::Charged { charge_id } => json(StatusCode::CREATED, format!(r#"{{"id":"{charge_id}"}}"#)),
        ProviderResult::Declined => json(StatusCode::PAYMENT_REQUIRED, r#"{"error":"card_declined"}"#.into()),
    }
}

#[derive(serde::Deserialize)]
struct ChargeRequest {
    payment: String,
}

async fn charge(State(http): State<Arc<Http>>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or_default().to_string();
    let (key, worker) = (header("idempotency-key"), header("demo-worker"));
    let request: Option<ChargeRequest> = serde_json::from_slice(&body).ok();
    let payment = request.map(|r| r.payment).unwrap_or_default();
    let number = payment.strip_prefix("pay-").and_then(|n| n.parse::<u64>().ok());
    let Some(number) = number.filter(|_| !key.is_empty()) else {
        return json(StatusCode::BAD_REQUEST, r#"{"error":"want an Idempotency-Key and a payment pay-N"}"#.into());
    };
    let (fail, time_out) = {
        let mut rng = http.chaos.lock().expect("chaos");
        (rng.random_bool(0.15), !http.provider.deduplicates && rng.random_bool(0.15))
    };
    match http.provider.charge(&key, &payment, declined(number), fail, time_out) {
        Ok(result @ ProviderResult::Charged { .. }) => {
            let mut response = charged(&result);
            let mut counts = http.charged.lock().expect("charged");
            let count = counts.entry(worker).or_insert(0);
            if CRASH_AFTER.contains(count) {
                response.headers_mut().insert("demo-crash", axum::http::HeaderValue::from_static("now"));
            }
            *count += 1;
            response
        }
        Ok(result) => charged(&result),
        Err(ProviderError::Transient) => json(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"try_again"}"#.into()),
        Err(ProviderError::Timeout) => json(StatusCode::GATEWAY_TIMEOUT, r#"{"error":"timeout"}"#.into()),
    }
}

async fn find(State(http): State<Arc<Http>>, uri: Uri) -> Response {
    let key = uri.query().unwrap_or_default().split('&').find_map(|pair| pair.strip_prefix("idempotency_key="));
    match key.and_then(|key| http.provider.find(key)) {
        Some(result) => {
            let mut response = charged(&result);
            if response.status() == StatusCode::CREATED {
                *response.status_mut() = StatusCode::OK;
            }
            response
        }
        None => json(StatusCode::NOT_FOUND, r#"{"error":"no_such_charge"}"#.into()),
    }
}
