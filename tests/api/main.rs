//! Black-box tests of idemd through real gRPC, every scenario against both
//! stores (SQLite and the Postgres cluster `scripts/test` provides).

mod helpers;
#[path = "../common/pg_cluster.rs"]
mod pg_cluster;

mod abort;
mod admin;
mod begin;
mod bench;
mod cli;
mod client;
mod complete;
mod fuzz;
mod hardening;
mod heartbeat_lookup;
mod observability;
mod ops;
mod outage;
mod outcome_unknown;
mod reaper;
mod rollout;
mod security;
mod shutdown;
mod validation;
mod waiting;
