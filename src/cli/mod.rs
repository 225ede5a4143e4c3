//! The operator's command line against a running server: `idemd lookup`. `main.rs` parses;
//! each command here prints its result on stdout and a failure on stderr,
//! and says which exit status the process ends with.
//!
//! - `connect`: address, token and TLS → one channel.
//! - `lookup`: the command.
//! - `render`: text, tables and JSON of records and events.
//! - `error`: what a failure prints and its exit status.

mod connect;
mod error;
mod lookup;
mod render;

use std::io::Write;
use std::process::ExitCode;

pub use connect::{ConnectArgs, DEFAULT_ADDR};
pub use error::CliError;
pub use lookup::LookupArgs;

/// `idemd lookup`.
pub async fn lookup(args: LookupArgs) -> ExitCode {
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let result = lookup::run(args, &mut out).await;
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
