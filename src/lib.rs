//! idemd: a standalone gRPC idempotency service.
//!
//! Map of the crate, from the wire inwards:
//! - [`server`] binds the gRPC port and wires everything; shuts down gracefully.
//! - `service` implements the five RPCs: one prologue (caller, deadline,
//!   record id, grant, admission), one store method; `wire` converts
//!   between the proto types and the domain's.
//! - `codec` decodes requests, turning undecodable bytes into INVALID_ARGUMENT.
//! - `error` is the one error type and its one mapping to `tonic::Status`.
//! - [`domain`] holds plain validated types and the outcome of each transition.
//! - `store` is the `Store` trait and its Postgres and SQLite implementations,
//!   where all correctness lives (one atomic statement per transition).
//! - `connections` accepts, caps and closes the connections of both ports;
//!   [`request_guard`] bounds each request body's size and arrival time;
//!   `fd_limit` checks the file-descriptor limit at start-up.
//! - [`auth`] maps credentials to namespaces; `tls` terminates TLS;
//!   `limits` bounds waiters and request rates.
//! - `wakeups` parks `Begin` waiters and wakes them when a holder finishes.
//! - `reaper` runs the reaper and purger loops; `health` drives readiness.
//! - [`bench`](mod@bench) is the `idemd bench` load generator.
//! - [`config`] is every setting; [`telemetry`] sets up logs and traces,
//!   `metrics` the registry behind `/metrics`, `observe` the span and
//!   metrics of each RPC.
//! - [`cli`] is the operator's command line: `idemd lookup` and `idemd admin`.
#![forbid(unsafe_code)]

pub(crate) mod admin;
pub mod auth;
pub mod bench;
pub mod cli;
pub(crate) mod codec;
pub mod config;
pub(crate) mod connections;
pub(crate) mod deadline;
pub mod domain;
pub(crate) mod error;
pub(crate) mod fd_limit;
pub(crate) mod health;
pub(crate) mod limits;
pub(crate) mod metrics;
pub(crate) mod observe;
pub(crate) mod operator;
pub(crate) mod reaper;
pub mod request_guard;
pub mod server;
pub(crate) mod service;
pub(crate) mod store;
pub mod telemetry;
pub(crate) mod tls;
pub(crate) mod wakeups;
pub(crate) mod wire;

/// Code generated from `proto/idemd/v1/idempotency.proto` and `admin.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("idemd.v1");

    /// The encoded descriptor set of the contract, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/idemd_descriptor.bin"));

    /// The service name clients and readiness probes use.
    pub const SERVICE_NAME: &str = "idemd.v1.Idempotency";

    /// The operator's service, on the same port.
    pub const ADMIN_SERVICE_NAME: &str = "idemd.v1.Admin";

    /// A std duration as a protobuf Duration (saturating; ours are far shorter).
    pub fn duration(value: std::time::Duration) -> prost_types::Duration {
        prost_types::Duration {
            seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(value.subsec_nanos()).unwrap_or(0),
        }
    }
}
