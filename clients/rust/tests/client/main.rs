//! The Rust client against a real idemd: one test binary, a fresh server
//! (and SQLite file) per test. `IDEMD_BIN` names the server binary (default
//! the workspace's `target/debug/idemd`: `cargo build --bin idemd`).

mod behaviour;
mod conformance;
mod helpers;
mod outcome_unknown;
mod readme;
