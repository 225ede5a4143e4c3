//! Every setting of `idemd serve`: flag, environment variable, default and
//! validation, in one struct. Validated once at start-up; an error names the
//! flag (and its variable) that is wrong.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::store::postgres::url::PgUrl;

/// Lease lengths callers may ask for (proto/idemd/v1/idempotency.proto).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);
/// The longest `wait_timeout` a Begin may ask for.
pub const MAX_WAIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Responses beyond this are a misuse of an idempotency store.
pub const MAX_RESPONSE_BYTES_CEILING: usize = 64 * 1024 * 1024;

pub(crate) fn duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("{e} (write durations like 500ms, 60s, 24h)"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A database URL whose password never reaches a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn backend(&self) -> Result<Backend, String> {
        let scheme = self.0.split_once(':').map(|(s, _)| s).unwrap_or("");
        match scheme {
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            "sqlite" => Ok(Backend::Sqlite),
            _ => Err(format!("unsupported scheme in {self}: use postgres://… (production) or sqlite://… (embedded)")),
        }
    }
}

impl FromStr for DatabaseUrl {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, String> {
        let url = DatabaseUrl(value.to_string());
        if url.backend()? == Backend::Postgres {
            PgUrl::parse(value)?;
        }
        Ok(url)
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.starts_with("postgres://") || self.0.starts_with("postgresql://") {
            return match PgUrl::parse(&self.0) {
                Ok(url) => write!(f, "{}", url.redacted()),
                Err(_) => write!(f, "<unparsable database url>"),
            };
        }
        match url::Url::parse(&self.0) {
            Ok(mut parsed) => {
                if parsed.password().is_some() {
                    // set_password only fails for URLs that cannot have one.
                    let _ = parsed.set_password(Some("***"));
                }
                // sqlx also takes the password as a query parameter.
                if parsed.query_pairs().any(|(name, _)| name == "password") {
                    let pairs: Vec<(String, String)> = parsed
                        .query_pairs()
                        .map(|(n, v)| (n.to_string(), if n == "password" { "***".to_string() } else { v.to_string() }))
                        .collect();
                    parsed.query_pairs_mut().clear().extend_pairs(pairs);
                }
                write!(f, "{parsed}")
            }
            Err(_) => write!(f, "<unparsable database url>"),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// What sits between idemd and Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DbPooler {
    /// Postgres itself (or a session-mode pooler).
    None,
    /// A transaction-mode pooler such as PgBouncer: no prepared statement
    /// outlives its transaction, no session settings, no LISTEN.
    Transaction,
}

/// Where the records live.
#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// Database URL: postgres://user:pass@host/db for production, or an
    /// SQLite file (created if missing) for a laptop or one small instance.
    /// Several hosts (`postgres://u@a,b,c/db?target_session_attrs=read-write`)
    /// make idemd write to whichever is the primary and follow a failover.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://idemd.db")]
    pub database_url: DatabaseUrl,

    /// `transaction` when DATABASE_URL points at a transaction-mode pooler
    /// (PgBouncer `pool_mode = transaction`).
    #[arg(long, env = "IDEMD_DB_POOLER", value_enum, default_value_t = DbPooler::None)]
    pub db_pooler: DbPooler,

    /// Postgres without the pooler, for migrations and LISTEN (wake-ups of
    /// waiters from other replicas). With a transaction pooler and no direct
    /// URL, waiters re-check their key every 250 ms instead.
    #[arg(long, env = "IDEMD_DIRECT_DATABASE_URL")]
    pub direct_database_url: Option<DatabaseUrl>,

    /// Connections in the pool of this replica. Replicas × this must stay
    /// under Postgres's max_connections.
    #[arg(long, env = "IDEMD_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,

    /// Longest a call waits on the database (for a connection and for its
    /// statement) before answering UNAVAILABLE; also Postgres's
    /// statement_timeout for idemd's sessions.
    #[arg(long, env = "IDEMD_STORE_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub store_timeout: Duration,

    /// Postgres group commit: up to this many concurrent Begins and this
    /// many concurrent Completes run as one statement and one commit (1 =
    /// off, every call its own statement). A lone call never waits for
    /// company.
    #[arg(long, env = "IDEMD_GROUP_COMMIT_MAX_BATCH", default_value_t = 32)]
    pub group_commit_max_batch: usize,

    /// How long a batch waits for more Begins once it has one (0: only
    /// what is already queued, so a lone Begin never waits).
    #[arg(long, env = "IDEMD_GROUP_COMMIT_WINDOW", default_value = "0ms", value_parser = duration)]
    pub group_commit_window: Duration,

    /// With group commit: batches in the database at once. With 1, the
    /// next batch gathers while one is in the database; more overlap the
    /// round trip to a distant database at the cost of smaller batches and
    /// more commits.
    #[arg(long, env = "IDEMD_GROUP_COMMIT_IN_FLIGHT", default_value_t = 1)]
    pub group_commit_in_flight: usize,
}

impl DatabaseConfig {
    /// What `serve` and `migrate` share.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let postgres = self.database_url.backend() == Ok(Backend::Postgres);
        if self.db_pooler != DbPooler::None && !postgres {
            return Err(bad("--db-pooler", "IDEMD_DB_POOLER", "applies to a postgres:// DATABASE_URL only"));
        }
        if let Some(direct) = &self.direct_database_url
            && (!postgres || direct.backend() != Ok(Backend::Postgres))
        {
            return Err(bad(
                "--direct-database-url",
                "IDEMD_DIRECT_DATABASE_URL",
                "must be a postgres:// URL, next to a postgres:// DATABASE_URL",
            ));
        }
        Ok(())
    }
}

/// Settings of `idemd serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address of the gRPC port (the service, health and reflection).
    #[arg(long, env = "IDEMD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Address of the Prometheus endpoint (`/metrics`, plain HTTP).
    #[arg(long, env = "IDEMD_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,

    /// Address of a plaintext port serving only the gRPC health service
    /// (liveness `""`, readiness `idemd.v1.Idempotency` and `idemd.v1.Admin`),
    /// for probes that cannot speak TLS, such as Kubernetes' gRPC probes.
    /// Unset: health is served on the gRPC port only.
    #[arg(long, env = "IDEMD_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    #[command(flatten)]
    pub database: DatabaseConfig,

    /// Lease length when a Begin or Heartbeat does not ask for one (1s–1h).
    #[arg(long, env = "IDEMD_DEFAULT_LEASE_TTL", default_value = "60s", value_parser = duration)]
    pub default_lease_ttl: Duration,

    /// Retention when a Begin does not ask for one.
    #[arg(long, env = "IDEMD_DEFAULT_RETENTION", default_value = "24h", value_parser = duration)]
    pub default_retention: Duration,

    /// Shortest retention a Begin may ask for. Payments retry windows need a day.
    #[arg(long, env = "IDEMD_MIN_RETENTION", default_value = "24h", value_parser = duration)]
    pub min_retention: Duration,

    /// Longest retention a Begin may ask for.
    #[arg(long, env = "IDEMD_MAX_RETENTION", default_value = "720h", value_parser = duration)]
    pub max_retention: Duration,

    /// Largest response Complete accepts, in bytes.
    #[arg(long, env = "IDEMD_MAX_RESPONSE_BYTES", default_value_t = 1_048_576)]
    pub max_response_bytes: usize,

    /// How often the reaper aborts leases whose caller died.
    #[arg(long, env = "IDEMD_REAPER_INTERVAL", default_value = "1s", value_parser = duration)]
    pub reaper_interval: Duration,

    /// How often the purger deletes expired records.
    #[arg(long, env = "IDEMD_PURGE_INTERVAL", default_value = "60s", value_parser = duration)]
    pub purge_interval: Duration,

    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish.
    #[arg(long, env = "IDEMD_SHUTDOWN_GRACE", default_value = "20s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// Tokens file (one grant per line: `sha256:<hex> <ns>[,<ns>…]`); with it,
    /// every call needs credentials. Re-read on SIGHUP and on change.
    #[arg(long, env = "IDEMD_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// PEM certificate chain for TLS on the gRPC port (with --tls-key).
    #[arg(long, env = "IDEMD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "IDEMD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: clients must present a certificate it signed (mTLS).
    #[arg(long, env = "IDEMD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Begin calls parked on wait_timeout at once, overall.
    #[arg(long, env = "IDEMD_MAX_WAITERS", default_value_t = 10_000)]
    pub max_waiters: usize,

    /// Begin calls parked on wait_timeout at once, per namespace.
    #[arg(long, env = "IDEMD_MAX_WAITERS_PER_NAMESPACE", default_value_t = 1_000)]
    pub max_waiters_per_namespace: usize,

    /// Begin calls parked on wait_timeout at once, per credential (token or
    /// client certificate), over all its namespaces. Default: the same as
    /// --max-waiters-per-namespace.
    #[arg(long, env = "IDEMD_MAX_WAITERS_PER_CREDENTIAL")]
    pub max_waiters_per_credential: Option<usize>,

    /// Requests per second per namespace (bursts of as many); 0 is off.
    #[arg(long, env = "IDEMD_RATE_LIMIT_PER_NAMESPACE", default_value_t = 0)]
    pub rate_limit_per_namespace: u32,

    /// Requests per second per credential, over all its namespaces; 0 is
    /// off. Default: the same as --rate-limit-per-namespace.
    #[arg(long, env = "IDEMD_RATE_LIMIT_PER_CREDENTIAL")]
    pub rate_limit_per_credential: Option<u32>,

    /// Open client connections on the gRPC port. When all are taken, a new
    /// connection takes the slot of one that never authenticated or has no
    /// call open; with none such, it is refused.
    #[arg(long, env = "IDEMD_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Open connections on the metrics port.
    #[arg(long, env = "IDEMD_METRICS_MAX_CONNECTIONS", default_value_t = 64)]
    pub metrics_max_connections: usize,

    /// From accepting a connection to its first request's headers (TLS
    /// handshake and HTTP/2 preface included); a silent socket is dropped.
    #[arg(long, env = "IDEMD_FIRST_REQUEST_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub first_request_timeout: Duration,

    /// A connection with no open call for this long is closed (gracefully:
    /// gRPC clients reconnect on their next call).
    #[arg(long, env = "IDEMD_CONNECTION_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub connection_idle_timeout: Duration,

    /// A connection older than this (±10 %, so that a fleet's clients do not
    /// reconnect at once) is closed gracefully: the client reconnects, and
    /// through a Service that balances connections, lands on any replica,
    /// new ones included. Unset: connections live until idle or shutdown.
    #[arg(long, env = "IDEMD_MAX_CONNECTION_AGE", value_parser = duration)]
    pub max_connection_age: Option<Duration>,

    /// Calls still running this long after a connection's --max-connection-age
    /// close began are cut (the client sees UNAVAILABLE and retries).
    #[arg(long, env = "IDEMD_MAX_CONNECTION_AGE_GRACE", default_value = "30s", value_parser = duration)]
    pub max_connection_age_grace: Duration,

    /// Longest a request's body (each message, for a stream) may take to
    /// arrive after its headers, whatever the caller's grpc-timeout.
    #[arg(long, env = "IDEMD_REQUEST_READ_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub request_read_timeout: Duration,

    /// Concurrent calls (HTTP/2 streams) per connection.
    #[arg(long, env = "IDEMD_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// Log line format.
    #[arg(long, env = "IDEMD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Do not apply migrations at start-up (run `idemd migrate` instead, for
    /// example in an init container); readiness then stays NOT_SERVING until
    /// the database has every migration this binary knows.
    #[arg(long, env = "IDEMD_NO_MIGRATE")]
    pub no_migrate: bool,
}

/// A setting that is out of range, named by its flag and variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {flag} ({env}): {problem}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub env: &'static str,
    pub problem: String,
}

fn bad(flag: &'static str, env: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError { flag, env, problem: problem.into() }
}

impl ServeConfig {
    /// Every setting from its environment variable or default, as if no flag
    /// were given (tests start from this and override fields).
    pub fn defaults() -> Self {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: ServeConfig,
        }
        let matches =
            <Wrapper as clap::CommandFactory>::command().no_binary_name(true).get_matches_from(Vec::<String>::new());
        // The defaults above are literals that parse; a failure is a bug in this file.
        Wrapper::from_arg_matches(&matches).map(|w| w.config).expect("defaults parse") // ok: constant input
    }

    /// `--max-waiters-per-credential`, or the per-namespace limit.
    pub fn max_waiters_per_credential(&self) -> usize {
        self.max_waiters_per_credential.unwrap_or(self.max_waiters_per_namespace)
    }

    /// `--rate-limit-per-credential`, or the per-namespace rate.
    pub fn rate_limit_per_credential(&self) -> u32 {
        self.rate_limit_per_credential.unwrap_or(self.rate_limit_per_namespace)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        let d = &self.database;
        if d.store_timeout < Duration::from_millis(100) || d.store_timeout > Duration::from_secs(600) {
            return Err(bad("--store-timeout", "IDEMD_STORE_TIMEOUT", "must be between 100ms and 10m"));
        }
        if d.group_commit_max_batch == 0 || d.group_commit_max_batch > 1000 {
            return Err(bad("--group-commit-max-batch", "IDEMD_GROUP_COMMIT_MAX_BATCH", "must be between 1 and 1000"));
        }
        if !(1..=16).contains(&d.group_commit_in_flight) {
            return Err(bad("--group-commit-in-flight", "IDEMD_GROUP_COMMIT_IN_FLIGHT", "must be between 1 and 16"));
        }
        if d.group_commit_window > Duration::from_millis(100) {
            return Err(bad("--group-commit-window", "IDEMD_GROUP_COMMIT_WINDOW", "must be at most 100ms"));
        }
        if d.db_max_connections == 0 {
            return Err(bad("--db-max-connections", "IDEMD_DB_MAX_CONNECTIONS", "must be at least 1"));
        }
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&self.default_lease_ttl) {
            return Err(bad("--default-lease-ttl", "IDEMD_DEFAULT_LEASE_TTL", "must be between 1s and 1h"));
        }
        if self.min_retention.is_zero() {
            return Err(bad("--min-retention", "IDEMD_MIN_RETENTION", "must be positive"));
        }
        if self.max_retention < self.min_retention {
            return Err(bad("--max-retention", "IDEMD_MAX_RETENTION", "must not be below --min-retention"));
        }
        if self.max_retention > Duration::from_secs(100 * 365 * 24 * 3600) {
            return Err(bad("--max-retention", "IDEMD_MAX_RETENTION", "must be at most 100 years"));
        }
        if !(self.min_retention..=self.max_retention).contains(&self.default_retention) {
            return Err(bad(
                "--default-retention",
                "IDEMD_DEFAULT_RETENTION",
                "must lie within [--min-retention, --max-retention]",
            ));
        }
        if self.max_response_bytes == 0 || self.max_response_bytes > MAX_RESPONSE_BYTES_CEILING {
            return Err(bad("--max-response-bytes", "IDEMD_MAX_RESPONSE_BYTES", "must be between 1 and 67108864"));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(bad("--tls-cert/--tls-key", "IDEMD_TLS_CERT/IDEMD_TLS_KEY", "give both or neither"));
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(bad("--tls-client-ca", "IDEMD_TLS_CLIENT_CA", "needs --tls-cert and --tls-key"));
        }
        if self.max_waiters == 0 || self.max_waiters_per_namespace == 0 {
            return Err(bad("--max-waiters", "IDEMD_MAX_WAITERS", "limits must be at least 1"));
        }
        if self.max_waiters_per_credential == Some(0) {
            return Err(bad("--max-waiters-per-credential", "IDEMD_MAX_WAITERS_PER_CREDENTIAL", "must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(bad("--max-connections", "IDEMD_MAX_CONNECTIONS", "must be at least 1"));
        }
        if self.metrics_max_connections == 0 {
            return Err(bad("--metrics-max-connections", "IDEMD_METRICS_MAX_CONNECTIONS", "must be at least 1"));
        }
        let second_to_minute = Duration::from_millis(100)..=Duration::from_secs(60);
        if !second_to_minute.contains(&self.first_request_timeout) {
            return Err(bad("--first-request-timeout", "IDEMD_FIRST_REQUEST_TIMEOUT", "must be between 100ms and 60s"));
        }
        if !second_to_minute.contains(&self.request_read_timeout) {
            return Err(bad("--request-read-timeout", "IDEMD_REQUEST_READ_TIMEOUT", "must be between 100ms and 60s"));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(24 * 3600)).contains(&self.connection_idle_timeout) {
            return Err(bad(
                "--connection-idle-timeout",
                "IDEMD_CONNECTION_IDLE_TIMEOUT",
                "must be between 1s and 24h",
            ));
        }
        if self
            .max_connection_age
            .is_some_and(|age| !(Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600)).contains(&age))
        {
            return Err(bad("--max-connection-age", "IDEMD_MAX_CONNECTION_AGE", "must be between 1s and 7 days"));
        }
        if self.max_connection_age_grace > Duration::from_secs(3600) {
            return Err(bad("--max-connection-age-grace", "IDEMD_MAX_CONNECTION_AGE_GRACE", "must be at most 1h"));
        }
        if self.max_concurrent_streams == 0 {
            return Err(bad("--max-concurrent-streams", "IDEMD_MAX_CONCURRENT_STREAMS", "must be at least 1"));
        }
        if self.reaper_interval < Duration::from_millis(10) {
            return Err(bad("--reaper-interval", "IDEMD_REAPER_INTERVAL", "must be at least 10ms"));
        }
        if self.purge_interval < Duration::from_millis(10) {
            return Err(bad("--purge-interval", "IDEMD_PURGE_INTERVAL", "must be at least 10ms"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = ServeConfig::defaults();
        config.validate().expect("defaults validate");
        assert_eq!(config.default_lease_ttl, Duration::from_secs(60));
        assert_eq!(config.database.database_url.backend(), Ok(Backend::Sqlite));
    }

    #[test]
    fn errors_name_the_setting() {
        let mut config = ServeConfig::defaults();
        config.default_retention = Duration::from_secs(60);
        let error = config.validate().expect_err("retention below min").to_string();
        assert!(error.contains("--default-retention") && error.contains("IDEMD_DEFAULT_RETENTION"), "{error}");
    }

    #[test]
    fn group_commit_in_flight_is_bounded() {
        let mut config = ServeConfig::defaults();
        assert_eq!(config.database.group_commit_in_flight, 1);
        for refused in [0, 17] {
            config.database.group_commit_in_flight = refused;
            let error = config.validate().expect_err("out of range").to_string();
            assert!(
                error.contains("--group-commit-in-flight") && error.contains("IDEMD_GROUP_COMMIT_IN_FLIGHT"),
                "{error}"
            );
        }
        config.database.group_commit_in_flight = 16;
        config.validate().expect("16 batches in flight");
    }

    #[test]
    fn database_password_is_hidden() {
        let url = DatabaseUrl::new("postgres://idemd:s3cret@db:5432/idemd");
        assert!(!format!("{url:?} {url}").contains("s3cret"));
        let url = DatabaseUrl::new("postgres://db/idemd?user=idemd&password=s3cret");
        assert!(!format!("{url:?} {url}").contains("s3cret"), "{url}");
        let url = DatabaseUrl::new("postgres://idemd:s3cret@a:5432,b:5432/idemd?target_session_attrs=read-write");
        assert!(!format!("{url:?} {url}").contains("s3cret"), "{url}");
        assert!("postgres://a,b/db?target_session_attrs=standby".parse::<DatabaseUrl>().is_err());
        assert!("mysql://x".parse::<DatabaseUrl>().is_err());
    }
}
