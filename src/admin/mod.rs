//! The `idemd.v1.Admin` service: what on-call uses when an attempt ended
//! without an outcome. Decode → check (the caller, the fields, the admin
//! grant) → one store call → encode, like the Idempotency service; every
//! action is logged at WARN and counted.

pub mod page_token;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::auth::Principal;
use crate::deadline::Deadline;
use crate::domain::{
    MAX_CONTENT_TYPE_LEN, MAX_KEY_LEN, MAX_REASON_LEN, Namespace, RecordId, State, Timestamp, check_text,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::observe::{Reply, RpcCall, observed};
use crate::operator::{
    Cursor, DEFAULT_PAGE_SIZE, InvalidateRequest, ListQuery, MAX_PAGE_SIZE, ReleaseRequest, ResolveRequest,
};
use crate::pb;
use crate::service::principal_name;
use crate::store::Store;
use crate::wire::{encode_event, encode_record};

/// What the Admin service needs from the configuration.
#[derive(Debug, Clone)]
pub struct AdminLimits {
    /// Credentials are checked (a tokens file or a client CA): without
    /// them, only loopback callers are answered.
    pub auth_on: bool,
    pub max_response_bytes: usize,
    pub store_timeout: Duration,
}

pub struct AdminService<S> {
    store: S,
    metrics: Arc<Metrics>,
    limits: AdminLimits,
}

/// A request past the checks every Admin call shares.
struct Checked<T> {
    principal: Option<Principal>,
    deadline: Option<Deadline>,
    fields: T,
}

impl<S: Store> AdminService<S> {
    pub fn new(store: S, metrics: Arc<Metrics>, limits: AdminLimits) -> Self {
        AdminService { store, metrics, limits }
    }

    /// In the contract's order: the caller (the interceptor checked the
    /// credentials; with auth off, a caller that is not on loopback is
    /// refused before anything else), the fields, then the admin grant on
    /// the namespace. Nothing here depends on whether the key exists.
    fn prologue<M, T>(
        &self,
        call: &RpcCall,
        request: Request<M>,
        fields: impl FnOnce(M) -> Result<(Namespace, T)>,
    ) -> Result<Checked<T>> {
        let principal = request.extensions().get::<Principal>().cloned();
        if !self.limits.auth_on && !request.remote_addr().is_some_and(|peer| peer.ip().to_canonical().is_loopback()) {
            return Err(Error::AdminRequiresAuth);
        }
        let deadline = Deadline::of(&request);
        let (namespace, fields) = fields(request.into_inner())?;
        call.namespace(namespace.as_str());
        match &principal {
            Some(principal) => principal.check_admin(&namespace)?,
            None if self.limits.auth_on => return Err(Error::Unauthenticated),
            None => {}
        }
        Ok(Checked { principal, deadline, fields })
    }

    /// One store call within `--store-timeout` and the caller's deadline.
    async fn bounded<T>(&self, deadline: Option<Deadline>, call: impl Future<Output = Result<T>>) -> Result<T> {
        let store_limit = Instant::now() + self.limits.store_timeout;
        let (limit, error) = match deadline {
            Some(deadline) if deadline.answer_by < store_limit => (deadline.answer_by, Error::DeadlineExceeded),
            _ => (store_limit, Error::StoreTimeout),
        };
        let result = tokio::time::timeout_at(limit, call).await.unwrap_or(Err(error));
        if let Err(error) = &result {
            self.metrics.store_error(error);
        }
        result
    }

    async fn list_call(
        &self,
        call: &RpcCall,
        request: Request<pb::ListRecordsRequest>,
    ) -> Result<Reply<pb::ListRecordsResponse>> {
        let checked = self.prologue(call, request, list_query)?;
        let query = checked.fields;
        let mut records = if query.is_empty_range() {
            Vec::new()
        } else {
            self.bounded(checked.deadline, self.store.list_records(&query)).await?
        };
        let next_page_token = if records.len() > query.page_size as usize {
            records.truncate(query.page_size as usize);
            records
                .last()
                .map(|last| page_token::issue(&query, &Cursor { updated_at: last.updated_at, key: last.key.clone() }))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let records = records.into_iter().map(encode_record).collect();
        Ok(Reply { message: pb::ListRecordsResponse { records, next_page_token }, outcome: "listed", attempt: None })
    }

    async fn history_call(
        &self,
        call: &RpcCall,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Reply<pb::GetHistoryResponse>> {
        let checked = self.prologue(call, request, |message| {
            let id = RecordId::parse(message.namespace, message.key)?;
            Ok((id.namespace.clone(), id))
        })?;
        let events = self.bounded(checked.deadline, self.store.history(&checked.fields)).await?;
        let events = events.into_iter().map(encode_event).collect();
        Ok(Reply { message: pb::GetHistoryResponse { events }, outcome: "found", attempt: None })
    }

    async fn resolve_call(
        &self,
        call: &RpcCall,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Reply<pb::ResolveResponse>> {
        let max_response_bytes = self.limits.max_response_bytes;
        let checked = self.prologue(call, request, |message| {
            let id = RecordId::parse(message.namespace, message.key)?;
            let attempt = check_attempt(message.attempt)?;
            if message.response.len() > max_response_bytes {
                return Err(Error::invalid("response", format!("response is longer than {max_response_bytes} bytes")));
            }
            check_text("content_type", &message.content_type, MAX_CONTENT_TYPE_LEN, true)?;
            check_reason(&message.reason)?;
            let request = ResolveRequest {
                id,
                attempt,
                response: message.response,
                response_code: message.response_code,
                content_type: message.content_type,
                reason: message.reason,
                principal: String::new(),
            };
            Ok((request.id.namespace.clone(), request))
        })?;
        let request = ResolveRequest { principal: principal_name(checked.principal.as_ref()), ..checked.fields };
        let result = self.bounded(checked.deadline, self.store.resolve(&request)).await;
        log_action("resolve", &request.principal, &request.id, &request.reason, &result);
        let record = result?;
        Ok(Reply {
            message: pb::ResolveResponse { record: Some(encode_record(record)) },
            outcome: "resolved",
            attempt: Some(request.attempt),
        })
    }

    async fn release_call(
        &self,
        call: &RpcCall,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Reply<pb::ReleaseResponse>> {
        let checked = self.prologue(call, request, |message| {
            let id = RecordId::parse(message.namespace, message.key)?;
            let attempt = check_attempt(message.attempt)?;
            check_reason(&message.reason)?;
            let request = ReleaseRequest {
                id,
                attempt,
                reason: message.reason,
                outcome_unknown: message.outcome_unknown,
                principal: String::new(),
            };
            Ok((request.id.namespace.clone(), request))
        })?;
        let request = ReleaseRequest { principal: principal_name(checked.principal.as_ref()), ..checked.fields };
        let result = self.bounded(checked.deadline, self.store.release(&request)).await;
        log_action("release", &request.principal, &request.id, &request.reason, &result);
        let record = result?;
        Ok(Reply {
            message: pb::ReleaseResponse { record: Some(encode_record(record)) },
            outcome: "released",
            attempt: Some(request.attempt),
        })
    }

    async fn invalidate_call(
        &self,
        call: &RpcCall,
        request: Request<pb::InvalidateRequest>,
    ) -> Result<Reply<pb::InvalidateResponse>> {
        let checked = self.prologue(call, request, |message| {
            let id = RecordId::parse(message.namespace, message.key)?;
            check_reason(&message.reason)?;
            let request = InvalidateRequest { id, reason: message.reason, principal: String::new() };
            Ok((request.id.namespace.clone(), request))
        })?;
        let request = InvalidateRequest { principal: principal_name(checked.principal.as_ref()), ..checked.fields };
        let result = self.bounded(checked.deadline, self.store.invalidate(&request)).await;
        log_action("invalidate", &request.principal, &request.id, &request.reason, &result);
        result?;
        Ok(Reply { message: pb::InvalidateResponse {}, outcome: "invalidated", attempt: None })
    }
}

/// An operator's action leaves a WARN line whatever its outcome: who, on
/// which record, and why. Never the response.
fn log_action<T>(action: &'static str, principal: &str, id: &RecordId, reason: &str, result: &Result<T>) {
    let outcome = match result {
        Ok(_) => "done",
        Err(error) => error.reason(),
    };
    tracing::warn!(
        admin.action = action,
        admin.principal = principal,
        idemd.namespace = id.namespace.as_str(),
        idemd.key = id.key.as_str(),
        admin.reason = reason,
        admin.outcome = outcome,
        "admin action"
    );
}

/// Required and at least 1: the record's current attempt.
fn check_attempt(attempt: u32) -> Result<u32> {
    if attempt == 0 {
        return Err(Error::invalid("attempt", "attempt is required (the record's current attempt, >= 1)"));
    }
    Ok(attempt)
}

/// Required: 1–1024 bytes, no NUL.
fn check_reason(reason: &str) -> Result<()> {
    if reason.is_empty() {
        return Err(Error::invalid("reason", "reason is required: say why, for the record's history"));
    }
    check_text("reason", reason, MAX_REASON_LEN, false)?;
    if reason.contains('\0') {
        return Err(Error::invalid("reason", "reason contains a NUL character"));
    }
    Ok(())
}

fn timestamp_of(field: &str, value: Option<prost_types::Timestamp>) -> Result<Option<Timestamp>> {
    value
        .map(|t| {
            u32::try_from(t.nanos)
                .ok()
                .and_then(|nanos| Timestamp::from_timestamp(t.seconds, nanos))
                .ok_or_else(|| Error::invalid(field, format!("{field} is not a valid timestamp")))
        })
        .transpose()
}

fn list_query(message: pb::ListRecordsRequest) -> Result<(Namespace, ListQuery)> {
    let namespace = Namespace::parse(message.namespace)?;
    let state = match message.state {
        0 => None,
        1 => Some(State::InProgress),
        2 => Some(State::Completed),
        3 => Some(State::Aborted),
        _ => return Err(Error::invalid("state", "state is not a known State")),
    };
    let updated_before = timestamp_of("updated_before", message.updated_before)?;
    let updated_after = timestamp_of("updated_after", message.updated_after)?;
    check_text("key_prefix", &message.key_prefix, MAX_KEY_LEN, true)?;
    let page_size = match message.page_size {
        0 => DEFAULT_PAGE_SIZE,
        size if size > MAX_PAGE_SIZE => {
            return Err(Error::invalid("page_size", format!("page_size is more than {MAX_PAGE_SIZE}")));
        }
        size => size,
    };
    let mut query = ListQuery {
        namespace: namespace.clone(),
        state,
        outcome_unknown_only: message.outcome_unknown_only,
        updated_before,
        updated_after,
        key_prefix: message.key_prefix,
        page_size,
        after: None,
    };
    if !message.page_token.is_empty() {
        query.after = Some(page_token::redeem(&query, &message.page_token)?);
    }
    Ok((namespace, query))
}

#[tonic::async_trait]
impl<S: Store> pb::admin_server::Admin for AdminService<S> {
    async fn list_records(
        &self,
        request: Request<pb::ListRecordsRequest>,
    ) -> Result<Response<pb::ListRecordsResponse>, Status> {
        observed!(self, "ListRecords", list_call, request)
    }

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        observed!(self, "GetHistory", history_call, request)
    }

    async fn resolve(&self, request: Request<pb::ResolveRequest>) -> Result<Response<pb::ResolveResponse>, Status> {
        observed!(self, "Resolve", resolve_call, request)
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        observed!(self, "Release", release_call, request)
    }

    async fn invalidate(
        &self,
        request: Request<pb::InvalidateRequest>,
    ) -> Result<Response<pb::InvalidateResponse>, Status> {
        observed!(self, "Invalidate", invalidate_call, request)
    }
}
