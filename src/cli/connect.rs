//! How the command line reaches idemd: the address, a bearer token and TLS
//! (a CA to trust, a client certificate for mTLS), checked before any
//! connection is tried, then one channel shared by the command's calls.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::error::{CliError, chain};
use crate::pb;

pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sent as each call's `grpc-timeout`, so that a stuck server or network
/// ends the call with idemd's DEADLINE_EXCEEDED instead of hanging a shell.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where `https://` finds trust roots without `--tls-ca` (tonic is built
/// without a bundled root store); `SSL_CERT_FILE` comes first.
const SYSTEM_CA_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// Connection options shared by `idemd lookup` and every `idemd admin`
/// subcommand (accepted before or after the subcommand's name).
#[derive(Clone, Args)]
#[command(next_help_heading = "Connection")]
pub struct ConnectArgs {
    /// The server's gRPC address: http://host:port, or https://host:port for
    /// TLS. Without a scheme: https when a --tls-* option is given, else http.
    #[arg(long, env = "IDEMD_ADDR", default_value = DEFAULT_ADDR, global = true)]
    pub addr: String,
    /// Bearer token for a server with auth, sent as `authorization: Bearer
    /// <token>`. Prefer the environment variable: a flag shows in `ps`.
    #[arg(long, env = "IDEMD_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// PEM CA bundle that signed the server's certificate (default: the
    /// system's bundle, SSL_CERT_FILE first).
    #[arg(long, global = true, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate (chain) for mTLS; needs --tls-key.
    #[arg(long, global = true, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry, when --addr reaches it
    /// by another (an IP address, a port-forward). Default: --addr's host.
    #[arg(long, global = true, value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

// By hand: the derived Debug would print the token.
impl fmt::Debug for ConnectArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectArgs")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_server_name", &self.tls_server_name)
            .finish()
    }
}

impl ConnectArgs {
    fn wants_tls(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_server_name.is_some()
    }

    /// `--addr` with its scheme, checked against the TLS options.
    pub fn url(&self) -> Result<String, CliError> {
        let addr = self.addr.trim();
        let url = match addr.split_once("://") {
            Some(_) => addr.to_string(),
            None if self.wants_tls() => format!("https://{addr}"),
            None => format!("http://{addr}"),
        };
        let uri: http::Uri = url.parse().map_err(|e| CliError::Usage(format!("--addr {addr}: {e}")))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(CliError::Usage(format!("--addr {addr}: no host")));
        }
        match uri.scheme_str() {
            Some("https") => Ok(url),
            Some("http") if self.wants_tls() => Err(CliError::Usage(format!(
                "--tls-ca, --tls-cert and --tls-server-name need an https:// address, not --addr {addr}"
            ))),
            Some("http") => Ok(url),
            _ => Err(CliError::Usage(format!("--addr {addr}: the scheme must be http:// or https://"))),
        }
    }

    fn tls_config(&self) -> Result<ClientTlsConfig, CliError> {
        let ca = match &self.tls_ca {
            Some(path) => read_certificates("--tls-ca", path)?,
            None => system_bundle()?,
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let cert = read_certificates("--tls-cert", cert)?;
            let key_pem = read("--tls-key", key)?;
            PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| CliError::Usage(format!("--tls-key {}: no PEM private key ({e})", key.display())))?;
            tls = tls.identity(Identity::from_pem(cert, key_pem));
        }
        if let Some(name) = &self.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(tls)
    }

    /// The endpoint the options describe; no connection is tried yet.
    pub fn endpoint(&self) -> Result<Endpoint, CliError> {
        let url = self.url()?;
        let endpoint = Channel::from_shared(url.clone())
            .map_err(|e| CliError::Usage(format!("--addr {}: {e}", self.addr)))?
            .connect_timeout(CONNECT_TIMEOUT);
        if url.starts_with("https://") {
            return endpoint.tls_config(self.tls_config()?).map_err(|e| CliError::Usage(format!("TLS: {}", chain(&e))));
        }
        Ok(endpoint)
    }

    fn call_metadata(&self) -> Result<CallMetadata, CliError> {
        let authorization = match &self.token {
            None => None,
            Some(token) => {
                let mut value: AsciiMetadataValue = format!("Bearer {}", token.trim())
                    .parse()
                    .map_err(|_| CliError::Usage("--token (IDEMD_TOKEN) holds characters a header cannot".into()))?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(CallMetadata { authorization, timeout: CALL_TIMEOUT })
    }

    /// Connects now, so that an unreachable server is reported as such,
    /// naming the address, before any call.
    pub async fn connect(&self) -> Result<Connection, CliError> {
        let metadata = self.call_metadata()?;
        let endpoint = self.endpoint()?;
        let addr = self.url()?;
        let channel =
            endpoint.connect().await.map_err(|e| CliError::Connect { addr: addr.clone(), detail: chain(&e) })?;
        Ok(Connection { channel, metadata, addr })
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))
}

/// The file's bytes, once they are known to hold at least one PEM
/// certificate: tonic skips what it cannot parse, which would turn a wrong
/// file into an "unknown issuer" at the handshake.
fn read_certificates(flag: &str, path: &Path) -> Result<Vec<u8>, CliError> {
    let pem = read(flag, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))?;
    if certificates.is_empty() {
        return Err(CliError::Usage(format!("{flag} {}: no PEM certificate in it", path.display())));
    }
    Ok(pem)
}

fn system_bundle() -> Result<Vec<u8>, CliError> {
    if let Some(path) = std::env::var_os("SSL_CERT_FILE") {
        return read_certificates("SSL_CERT_FILE", Path::new(&path));
    }
    SYSTEM_CA_BUNDLES
        .iter()
        .map(Path::new)
        .find(|path| path.is_file())
        .map(|path| read_certificates("the system CA bundle", path))
        .unwrap_or_else(|| {
            Err(CliError::Usage(format!(
                "https:// needs --tls-ca: no system CA bundle (SSL_CERT_FILE, {})",
                SYSTEM_CA_BUNDLES.join(", ")
            )))
        })
}

/// Stamps every call with the bearer token and a deadline.
#[derive(Clone)]
pub struct CallMetadata {
    authorization: Option<AsciiMetadataValue>,
    timeout: Duration,
}

impl Interceptor for CallMetadata {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", MetadataValue::clone(value));
        }
        request.set_timeout(self.timeout);
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, CallMetadata>;

/// A connected channel and what every call carries.
pub struct Connection {
    channel: Channel,
    metadata: CallMetadata,
    /// The address as connected, for error messages.
    pub addr: String,
}

impl Connection {
    pub fn admin(&self) -> pb::admin_client::AdminClient<Authed> {
        pb::admin_client::AdminClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    pub fn idempotency(&self) -> pb::idempotency_client::IdempotencyClient<Authed> {
        pb::idempotency_client::IdempotencyClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    /// A failed call as the command line reports it.
    pub fn error(&self, status: tonic::Status) -> CliError {
        CliError::rpc(&self.addr, status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        connect: ConnectArgs,
    }

    fn parse(args: &[&str]) -> Result<ConnectArgs, clap::Error> {
        Cli::try_parse_from(["idemd"].iter().chain(args)).map(|cli| cli.connect)
    }

    fn usage(result: Result<impl fmt::Debug, CliError>) -> String {
        match result {
            Err(CliError::Usage(message)) => message,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn addresses_get_their_scheme() {
        let url = |args: &[&str]| parse(args).expect("parses").url().expect("valid");
        assert_eq!(url(&["--addr", "http://idemd:50051"]), "http://idemd:50051");
        assert_eq!(url(&["--addr", "idemd:50051"]), "http://idemd:50051");
        assert_eq!(url(&["--addr", "idemd:50051", "--tls-ca", "ca.pem"]), "https://idemd:50051");
        assert_eq!(url(&["--addr", "https://idemd:50051"]), "https://idemd:50051");
    }

    #[test]
    fn tls_options_need_https() {
        let args = parse(&["--addr", "http://idemd:50051", "--tls-ca", "ca.pem"]).expect("parses");
        assert!(usage(args.url()).contains("https://"));
        let args = parse(&["--addr", "ftp://idemd:50051"]).expect("parses");
        assert!(usage(args.url()).contains("http:// or https://"));
        let args = parse(&["--addr", "http://"]).expect("parses");
        assert!(usage(args.url()).contains("--addr"));
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        assert!(parse(&["--tls-cert", "c.pem"]).is_err());
        assert!(parse(&["--tls-key", "k.pem"]).is_err());
        assert!(parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).is_ok());
    }

    #[test]
    fn tls_files_are_checked_before_connecting() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("missing.pem");
        let args = ConnectArgs { tls_ca: Some(missing.clone()), ..parse(&["--addr", "https://idemd:1"]).expect("p") };
        assert!(usage(args.endpoint()).contains(&format!("--tls-ca {}", missing.display())));
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("write");
        let args = ConnectArgs { tls_ca: Some(junk), ..args };
        assert!(usage(args.endpoint()).contains("no PEM certificate"));
    }

    #[test]
    fn the_token_is_a_sensitive_bearer_header_and_stays_out_of_debug() {
        let args = parse(&["--token", "idemd_secret"]).expect("parses");
        assert!(!format!("{args:?}").contains("idemd_secret"));
        let mut metadata = args.call_metadata().expect("valid token");
        let request = metadata.call(tonic::Request::new(())).expect("stamped");
        let value = request.metadata().get("authorization").expect("header");
        assert_eq!(value.to_str().expect("ascii"), "Bearer idemd_secret");
        assert!(value.is_sensitive());
        assert!(request.metadata().get("grpc-timeout").is_some());
        let bad = ConnectArgs { token: Some("line\nbreak".into()), ..args };
        assert!(usage(bad.call_metadata().map(|_| ())).contains("--token"));
    }

    #[test]
    fn without_a_token_no_authorization_is_sent() {
        let args = ConnectArgs { token: None, ..parse(&[]).expect("parses") };
        let request = args.call_metadata().expect("ok").call(tonic::Request::new(())).expect("stamped");
        assert!(request.metadata().get("authorization").is_none());
    }
}
