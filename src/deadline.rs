//! The caller's deadline (`grpc-timeout`), counted from when its request
//! arrived, and how much of it idemd keeps for answering.
//!
//! A client cuts a call short when its deadline passes (a tonic client with
//! CANCELLED "Timeout expired", without our ErrorInfo). The contract (the
//! proto) promises DEADLINE_EXCEEDED, and a waiting Begin promises
//! `in_progress` just before the deadline; both must therefore be answered
//! before the caller's own timer fires. [`ArrivalLayer`] notes the instant a
//! request arrives, and idemd answers by a tenth of the timeout (at most
//! 250 ms) before the deadline counted from there: store calls still running
//! then end as DEADLINE_EXCEEDED, and a wait ends one such margin earlier
//! still, so that its last look at the record has that margin to run. The
//! server puts no timer of its own around calls (it serves connections
//! itself, `crate::connections`): each call bounds its store work and its
//! wait by this deadline.

use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// When the request arrived, as an extension of the request.
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub Instant);

/// Notes [`Arrived`] on every request; the outermost of idemd's layers.
#[derive(Debug, Clone, Copy, Default)]
pub struct ArrivalLayer;

impl<S> tower_layer::Layer<S> for ArrivalLayer {
    type Service = Arrival<S>;
    fn layer(&self, inner: S) -> Arrival<S> {
        Arrival { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Arrival<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for Arrival<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> S::Future {
        request.extensions_mut().insert(Arrived(Instant::now()));
        self.inner.call(request)
    }
}

/// What a call may spend, from its arrival.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deadline {
    /// Store calls still running then end as DEADLINE_EXCEEDED.
    pub answer_by: Instant,
    /// A waiting Begin stops waiting by then.
    pub stop_waiting_by: Instant,
}

/// When the request arrived (now, for one that did not come through
/// [`ArrivalLayer`], as in unit tests).
pub fn arrived_at<T>(request: &tonic::Request<T>) -> Instant {
    request.extensions().get::<Arrived>().map_or_else(Instant::now, |arrived| arrived.0)
}

impl Deadline {
    /// The caller's deadline, if its request carries a `grpc-timeout`.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<Deadline> {
        let timeout = grpc_timeout(request.metadata())?;
        Some(Deadline::after(arrived_at(request), timeout))
    }

    fn after(arrived: Instant, timeout: Duration) -> Deadline {
        let margin = (timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(250));
        Deadline {
            answer_by: arrived + timeout.saturating_sub(margin),
            stop_waiting_by: arrived + timeout.saturating_sub(2 * margin),
        }
    }
}

/// The caller's timeout from `grpc-timeout`, if it sent a valid one.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// When a waiting Begin that arrived at `arrived` must stop waiting: after
/// `wait`, and in time to answer before the caller's deadline.
pub fn wait_until(arrived: Instant, wait: Duration, deadline: Option<Deadline>) -> Option<Instant> {
    if wait.is_zero() {
        return None;
    }
    let until = arrived + wait;
    Some(deadline.map_or(until, |deadline| until.min(deadline.stop_waiting_by)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("grpc-timeout", "1500m".parse().expect("ascii"));
        assert_eq!(grpc_timeout(&metadata), Some(Duration::from_millis(1500)));
        metadata.insert("grpc-timeout", "2S".parse().expect("ascii"));
        assert_eq!(grpc_timeout(&metadata), Some(Duration::from_secs(2)));
        metadata.insert("grpc-timeout", "bogus".parse().expect("ascii"));
        assert_eq!(grpc_timeout(&metadata), None);
    }

    #[test]
    fn answers_a_tenth_of_the_timeout_early_and_stops_waiting_a_tenth_before_that() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let one_second = Deadline::after(start, Duration::from_secs(1));
        assert_eq!(one_second, Deadline { answer_by: start + ms(900), stop_waiting_by: start + ms(800) });
        // At most 250 ms is kept, however long the timeout.
        let a_minute = Deadline::after(start, Duration::from_secs(60));
        assert_eq!(a_minute.answer_by, start + ms(59_750));
        assert_eq!(a_minute.stop_waiting_by, start + ms(59_500));
        // At least a millisecond, so that idemd's answer is ready before the caller's timer fires.
        let tiny = Deadline::after(start, ms(5));
        assert_eq!(tiny, Deadline { answer_by: start + ms(4), stop_waiting_by: start + ms(3) });
        assert_eq!(Deadline::after(start, Duration::ZERO).stop_waiting_by, start);
    }

    #[test]
    fn wait_ends_before_the_deadline() {
        let start = Instant::now();
        assert_eq!(wait_until(start, Duration::ZERO, None), None);
        assert_eq!(wait_until(start, Duration::from_secs(5), None), Some(start + Duration::from_secs(5)));
        let deadline = Deadline::after(start, Duration::from_secs(1));
        assert_eq!(wait_until(start, Duration::from_secs(5), Some(deadline)), Some(deadline.stop_waiting_by));
        assert_eq!(
            wait_until(start, Duration::from_millis(300), Some(deadline)),
            Some(start + Duration::from_millis(300))
        );
    }

    #[test]
    fn the_deadline_counts_from_arrival() {
        let arrived = Instant::now() - Duration::from_millis(400);
        let mut request = tonic::Request::new(());
        request.metadata_mut().insert("grpc-timeout", "1S".parse().expect("ascii"));
        request.extensions_mut().insert(Arrived(arrived));
        assert_eq!(Deadline::of(&request), Some(Deadline::after(arrived, Duration::from_secs(1))));
        assert_eq!(Deadline::of(&tonic::Request::new(())), None);
    }
}
