//! What the command line says when it fails (on stderr) and its exit
//! status: the gRPC code, idemd's ErrorInfo reason and the server's message,
//! or which address could not be reached.

use std::fmt;

use tonic::Code;
use tonic_types::StatusExt;

use crate::error::ERROR_DOMAIN;

#[derive(Debug)]
pub enum CliError {
    /// Options or input files that cannot work; exit status 2, like clap's
    /// own usage errors.
    Usage(String),
    /// The server could not be reached at all.
    Connect { addr: String, detail: String },
    /// The server (or the transport under a call) answered with an error.
    Rpc { addr: String, status: Box<tonic::Status> },
    /// The server answered something the contract rules out.
    Protocol(String),
    /// Writing the output failed (a closed pipe is not reported).
    Output(std::io::Error),
}

impl CliError {
    pub fn rpc(addr: &str, status: tonic::Status) -> CliError {
        CliError::Rpc { addr: addr.to_string(), status: Box::new(status) }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }

    /// The reader of the output went away (`| head`): stop quietly.
    pub fn is_closed_pipe(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

impl From<std::io::Error> for CliError {
    fn from(error: std::io::Error) -> Self {
        CliError::Output(error)
    }
}

/// The code's name as the gRPC specification and the proto comments write it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(message) | CliError::Protocol(message) => f.write_str(message),
            CliError::Connect { addr, detail } => write!(f, "cannot connect to {addr}: {detail}"),
            CliError::Rpc { addr, status } => {
                let code = code_name(status.code());
                let message = super::render::clean(status.message());
                match status.get_details_error_info() {
                    Some(info) if info.domain == ERROR_DOMAIN => write!(f, "{code} / {}: {message}", info.reason),
                    Some(info) => write!(f, "{code} / {} ({}): {message}", info.reason, info.domain),
                    // Not idemd's own answer (every one of those carries
                    // ErrorInfo): the transport failed under the call, or a
                    // proxy answered. Its causes and the server matter then.
                    None => {
                        let detail = match std::error::Error::source(status.as_ref()) {
                            Some(source) => {
                                let causes = chain(source);
                                if causes.starts_with(&message) { causes } else { format!("{message}: {causes}") }
                            }
                            None => message,
                        };
                        write!(f, "{code}: {detail} (server {addr})")?;
                        // What a plaintext client hears from a TLS port.
                        if addr.starts_with("http://") && matches!(status.code(), Code::Internal | Code::Unknown) {
                            write!(f, "; if the server uses TLS, give an https:// --addr")?;
                        }
                        Ok(())
                    }
                }
            }
            CliError::Output(error) => write!(f, "cannot write the output: {error}"),
        }
    }
}

/// An error with its causes, `outer: inner: innermost` (tonic's transport
/// errors say only "transport error" at the top).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    fn idemd_status(code: Code, reason: &str, message: &str) -> tonic::Status {
        tonic::Status::with_error_details(
            code,
            message,
            ErrorDetails::with_error_info(reason, ERROR_DOMAIN, std::collections::HashMap::new()),
        )
    }

    #[test]
    fn an_idemd_error_shows_code_reason_and_message() {
        let error = CliError::rpc(
            "http://127.0.0.1:50051",
            idemd_status(Code::FailedPrecondition, "ATTEMPT_MISMATCH", "attempt 2 is not the record's attempt 3"),
        );
        assert_eq!(
            error.to_string(),
            "FAILED_PRECONDITION / ATTEMPT_MISMATCH: attempt 2 is not the record's attempt 3"
        );
        assert_eq!(error.exit_code(), 1);
    }

    #[test]
    fn an_error_without_error_info_names_the_server() {
        let error = CliError::rpc("https://idemd:50051", tonic::Status::unavailable("connection reset"));
        assert_eq!(error.to_string(), "UNAVAILABLE: connection reset (server https://idemd:50051)");
    }

    #[test]
    fn a_transport_failure_shows_its_causes() {
        let cause =
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "received fatal alert: CertificateRequired");
        let mut status = tonic::Status::unknown("transport error");
        status.set_source(std::sync::Arc::new(cause));
        let error = CliError::rpc("https://idemd:50051", status);
        assert_eq!(
            error.to_string(),
            "UNKNOWN: transport error: received fatal alert: CertificateRequired (server https://idemd:50051)"
        );
        let plaintext = CliError::rpc("http://idemd:50051", tonic::Status::internal("h2 protocol error"));
        assert!(plaintext.to_string().ends_with("; if the server uses TLS, give an https:// --addr"), "{plaintext}");
    }

    #[test]
    fn a_server_message_cannot_drive_the_terminal() {
        let error = CliError::rpc("x", idemd_status(Code::InvalidArgument, "INVALID_FIELD", "bad\u{1b}[2J key"));
        assert!(!error.to_string().contains('\u{1b}'));
    }

    #[test]
    fn usage_errors_exit_2_and_a_closed_pipe_is_quiet() {
        assert_eq!(CliError::Usage("--limit".into()).exit_code(), 2);
        assert!(CliError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).is_closed_pipe());
        assert!(!CliError::from(std::io::Error::from(std::io::ErrorKind::PermissionDenied)).is_closed_pipe());
    }

    #[test]
    fn every_code_has_its_canonical_name() {
        assert_eq!(code_name(Code::from(9)), "FAILED_PRECONDITION");
        assert_eq!(code_name(Code::from(16)), "UNAUTHENTICATED");
        assert_eq!(code_name(Code::from(5)), "NOT_FOUND");
    }

    #[test]
    fn a_chain_lists_the_causes_once() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert_eq!(chain(&Outer(inner)), "transport error: connection refused");
    }
}
