//! The operator's command line against a running server: `idemd lookup` and
//! `idemd admin list|history|resolve|release|invalidate`. `main.rs` parses;
//! each command here prints its result on stdout and a failure on stderr,
//! and says which exit status the process ends with.
//!
//! - `connect`: address, token and TLS → one channel.
//! - `lookup`, `admin` (with `list` for paging): the commands.
//! - `render`: text, tables and JSON of records and events.
//! - `error`: what a failure prints and its exit status.

mod admin;
mod connect;
mod error;
mod list;
mod lookup;
mod render;

use std::io::Write;
use std::process::ExitCode;

pub use admin::{AdminAction, AdminArgs};
pub use connect::{ConnectArgs, DEFAULT_ADDR};
pub use error::CliError;
pub use lookup::LookupArgs;

/// `idemd lookup`.
pub async fn lookup(args: LookupArgs) -> ExitCode {
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let result = lookup::run(args, &mut out).await;
    finish(result, out)
}

/// `idemd admin …`.
pub async fn admin(args: AdminArgs) -> ExitCode {
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let result = admin::run(args, &mut out, &mut std::io::stderr()).await;
    finish(result, out)
}

fn finish(result: Result<(), CliError>, mut out: impl Write) -> ExitCode {
    let result = result.and_then(|()| out.flush().map_err(CliError::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `idemd admin list | head`: the reader has what it wanted.
        Err(error) if error.is_closed_pipe() => ExitCode::SUCCESS,
        Err(error) => {
            // Whatever was printed before the failure goes out first.
            let _ = out.flush();
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
