//! Starting the real server for a test: a random port, a fresh database
//! (an SQLite file in a temporary folder, or a new Postgres database on the
//! cluster `scripts/test` started), and clients for it.

use std::net::SocketAddr;
use std::time::Duration;

use idemd::config::{DatabaseUrl, ServeConfig};
use idemd::pb::idempotency_client::IdempotencyClient;
use idemd::pb::{self, begin_response::Outcome};
use sqlx::Connection;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

pub const NS: &str = "payments";

/// A lazily connecting channel to `addr`, over TLS when `tls` is given.
pub fn test_channel(addr: SocketAddr, tls: Option<&ClientTlsConfig>) -> Channel {
    let endpoint = match tls {
        Some(tls) => {
            Channel::from_shared(format!("https://{addr}")).expect("uri").tls_config(tls.clone()).expect("tls config")
        }
        None => Channel::from_shared(format!("http://{addr}")).expect("uri"),
    };
    endpoint.connect_timeout(Duration::from_secs(5)).connect_lazy()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// Postgres with group commit of Begins on.
    PostgresBatched,
    /// Postgres through PgBouncer in transaction mode (`--db-pooler
    /// transaction`), with no direct URL: no LISTEN, waiters re-check.
    PgBouncer,
}

/// PgBouncer (transaction mode) in front of the shared cluster.
pub fn pgbouncer_url() -> String {
    crate::pg_cluster::shared_pgbouncer_url()
}

/// The shared cluster: `scripts/test`'s, or one this test process started.
pub fn admin_url() -> String {
    crate::pg_cluster::shared_url()
}

/// The same database as `database_url`, reached through the test PgBouncer.
pub fn pooled_url(database_url: &str) -> String {
    let mut pooled = url::Url::parse(&pgbouncer_url()).expect("pgbouncer url");
    pooled.set_path(url::Url::parse(database_url).expect("database url").path());
    pooled.to_string()
}

/// Creates an empty Postgres database on the server at `admin` and returns its URL.
pub async fn fresh_postgres_database(admin: &str) -> String {
    let name = format!("idemd_{}", uuid::Uuid::new_v4().simple());
    let mut connection = sqlx::PgConnection::connect(admin).await.expect("connect to the test cluster");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut connection)
        .await
        .expect("create a test database");
    let mut url = url::Url::parse(admin).expect("admin url");
    url.set_path(&name);
    url.to_string()
}

pub struct TestApp {
    /// The one connection `client` and `health()` share.
    shared_channel: Channel,
    pub tls: Option<ClientTlsConfig>,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The plaintext health-only port, when the config asked for one.
    pub health_addr: Option<SocketAddr>,
    pub client: IdempotencyClient<Channel>,
    pub database_url: String,
    pub backend: Backend,
    /// What the server was started with, to start another replica like it.
    pub config: ServeConfig,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

/// Settings every test starts from; a test overrides what it exercises.
pub fn test_config(database_url: &str) -> ServeConfig {
    let mut config = ServeConfig::defaults();
    config.database.database_url = DatabaseUrl::new(database_url);
    config.database.db_max_connections = 8;
    config.reaper_interval = Duration::from_millis(200);
    config.shutdown_grace = Duration::from_secs(5);
    config
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

pub async fn spawn_app_with(backend: Backend, tweak: impl FnOnce(&mut ServeConfig)) -> TestApp {
    let (database_url, dir) = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            (format!("sqlite://{}", dir.path().join("idemd.db").display()), Some(dir))
        }
        Backend::Postgres | Backend::PostgresBatched | Backend::PgBouncer => {
            (fresh_postgres_database(&admin_url()).await, None)
        }
    };
    let mut config = test_config(&database_url);
    match backend {
        // Group commit is the default; this backend keeps the one-statement
        // path (`--group-commit-max-batch 1`) under the same suite.
        Backend::Postgres => config.database.group_commit_max_batch = 1,
        Backend::PostgresBatched => {
            config.database.group_commit_max_batch = 32;
            // Batches overlapping in the database (rows of a kind taken in
            // key order; a deadlock between one batch's Begins and another's
            // Completes is retried) are the harder case; the default, one at
            // a time, runs behind PgBouncer and in the faults suite.
            config.database.group_commit_in_flight = 4;
        }
        Backend::PgBouncer => {
            // With the default group commit: batches through the pooler.
            // Migrations take a session lock, so they run on Postgres itself.
            idemd::server::migrate(&config.database).await.expect("migrate the test database");
            config.no_migrate = true;
            config.database.db_pooler = idemd::config::DbPooler::Transaction;
            config.database.database_url = DatabaseUrl::new(pooled_url(&database_url));
        }
        Backend::Sqlite => {}
    }
    tweak(&mut config);
    let mut app = spawn_on(config).await;
    app.backend = backend;
    // The tests' own reads and faults go to Postgres itself.
    app.database_url = database_url;
    app._dir = dir;
    app
}

/// Starts a server with exactly this configuration (the database must exist).
pub async fn spawn_on(config: ServeConfig) -> TestApp {
    spawn_on_tls(config, None).await
}

/// Starts a server whose clients connect with `tls` (server name `localhost`).
pub async fn spawn_on_tls(config: ServeConfig, tls: Option<ClientTlsConfig>) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let metrics_addr = metrics.local_addr().expect("addr");
    let database_url = config.database.database_url.expose().to_string();
    let started_with = config.clone();
    let (tx, rx) = oneshot::channel::<()>();
    // A health port is asked for with any address; the test binds its own.
    let health = match config.health_listen {
        Some(_) => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind")),
        None => None,
    };
    let health_addr = health.as_ref().map(|listener| listener.local_addr().expect("addr"));
    let listeners = idemd::server::Listeners { grpc: listener, metrics: Some(metrics), health };
    let handle = tokio::spawn(idemd::server::run(config, listeners, async {
        let _ = rx.await;
    }));
    let channel = test_channel(addr, tls.as_ref());
    let app = TestApp {
        shared_channel: channel.clone(),
        tls,
        addr,
        metrics_addr,
        health_addr,
        client: IdempotencyClient::new(channel),
        database_url,
        backend: Backend::Sqlite,
        config: started_with,
        shutdown: Some(tx),
        handle: Some(handle),
        _dir: None,
    };
    app.wait_for_readiness(ServingStatus::Serving, Duration::from_secs(30)).await;
    app
}

impl TestApp {
    pub fn channel(&self) -> Channel {
        test_channel(self.addr, self.tls.as_ref())
    }

    /// The Admin service over the app's own connection.
    pub fn admin(&self) -> idemd::pb::admin_client::AdminClient<Channel> {
        idemd::pb::admin_client::AdminClient::new(self.shared_channel.clone())
    }

    /// A key's history, oldest first.
    pub async fn history(&self, key: &str) -> Result<Vec<pb::Event>, Status> {
        let request = pb::GetHistoryRequest { namespace: NS.into(), key: key.into() };
        Ok(self.admin().get_history(request).await?.into_inner().events)
    }

    /// Health checks over the app's own connection (no connection per poll).
    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.shared_channel.clone())
    }

    pub async fn readiness(&self) -> Option<ServingStatus> {
        let response = self.health().check(HealthCheckRequest { service: pb::SERVICE_NAME.into() }).await.ok()?;
        ServingStatus::try_from(response.into_inner().status).ok()
    }

    /// Polls readiness until it is `want`; panics after `deadline`.
    pub async fn wait_for_readiness(&self, want: ServingStatus, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if self.readiness().await == Some(want) {
                return;
            }
            if let Some(handle) = &self.handle {
                assert!(!handle.is_finished(), "the server stopped while waiting for readiness {want:?}");
            }
            assert!(tokio::time::Instant::now() < until, "readiness did not become {want:?} within {deadline:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server the way SIGTERM does and returns its result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("server stops within 30 s")
            .expect("server task")
    }

    /// Rows stored for `(namespace, key)`, read straight from the database.
    pub async fn row_count(&self, namespace: &str, key: &str) -> i64 {
        let sql = "SELECT COUNT(*) FROM idemd_records WHERE namespace = $1 AND key = $2";
        match self.backend {
            Backend::Postgres | Backend::PostgresBatched | Backend::PgBouncer => {
                let mut c = sqlx::PgConnection::connect(&self.database_url).await.expect("connect");
                sqlx::query_scalar(sql).bind(namespace).bind(key).fetch_one(&mut c).await.expect("count")
            }
            Backend::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.database_url).await.expect("connect");
                sqlx::query_scalar(sql).bind(namespace).bind(key).fetch_one(&mut c).await.expect("count")
            }
        }
    }

    /// Runs one statement straight on the database (a fault a test injects).
    pub async fn execute_sql(&self, sql: &str) {
        match self.backend {
            Backend::Postgres | Backend::PostgresBatched | Backend::PgBouncer => {
                let mut c = sqlx::PgConnection::connect(&self.database_url).await.expect("connect");
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut c).await.expect("statement");
            }
            Backend::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.database_url).await.expect("connect");
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut c).await.expect("statement");
            }
        }
    }

    pub async fn begin(&self, request: pb::BeginRequest) -> Result<Outcome, Status> {
        let response = self.client.clone().begin(request).await?;
        Ok(response.into_inner().outcome.expect("an outcome"))
    }

    pub async fn acquire(&self, request: pb::BeginRequest) -> pb::Acquired {
        match self.begin(request).await.expect("begin") {
            Outcome::Acquired(acquired) => acquired,
            other => panic!("expected acquired, got {other:?}"),
        }
    }

    pub async fn complete(&self, key: &str, token: &str, response: &[u8]) -> Result<pb::CompleteResponse, Status> {
        self.client
            .clone()
            .complete(pb::CompleteRequest {
                namespace: NS.into(),
                key: key.into(),
                lease_token: token.into(),
                response: response.to_vec(),
                response_code: 200,
                content_type: "application/json".into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn abort(&self, key: &str, token: &str, reason: &str) -> Result<(), Status> {
        self.client
            .clone()
            .abort(pb::AbortRequest {
                namespace: NS.into(),
                key: key.into(),
                lease_token: token.into(),
                reason: reason.into(),
                outcome_unknown: false,
            })
            .await
            .map(|_| ())
    }

    pub async fn heartbeat(
        &self,
        key: &str,
        token: &str,
        ttl: Option<Duration>,
    ) -> Result<pb::HeartbeatResponse, Status> {
        self.client
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                namespace: NS.into(),
                key: key.into(),
                lease_token: token.into(),
                lease_ttl: ttl.map(duration),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn lookup(&self, key: &str) -> Result<pb::Record, Status> {
        self.client
            .clone()
            .lookup(pb::LookupRequest { namespace: NS.into(), key: key.into() })
            .await
            .map(|r| r.into_inner().record.expect("a record"))
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A Begin for `key` in the test namespace with fingerprint `fp-1`.
pub fn begin_req(key: &str) -> pb::BeginRequest {
    pb::BeginRequest { namespace: NS.into(), key: key.into(), fingerprint: b"fp-1".to_vec(), ..Default::default() }
}

pub fn duration(value: Duration) -> prost_types::Duration {
    pb::duration(value)
}

pub fn secs(value: u64) -> Option<prost_types::Duration> {
    Some(duration(Duration::from_secs(value)))
}

pub fn to_chrono(value: Option<prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    let value = value.expect("a timestamp");
    chrono::DateTime::from_timestamp(value.seconds, value.nanos as u32).expect("valid timestamp")
}

/// Asserts `code` and the ErrorInfo reason (domain idemd).
#[track_caller]
pub fn assert_error(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    let info = status.get_details_error_info().unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, "idemd");
}

/// Asserts INVALID_ARGUMENT / INVALID_FIELD with a violation naming `field`.
#[track_caller]
pub fn assert_invalid_field(status: &Status, field: &str) {
    assert_error(status, Code::InvalidArgument, "INVALID_FIELD");
    let bad_request = status.get_details_bad_request().unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    assert!(bad_request.field_violations.iter().any(|v| v.field == field), "no violation for {field} in {status:?}");
    assert!(status.message().contains(field), "message should name {field}: {status:?}");
}

/// What a key's history says its record is: (state, attempt,
/// outcome_unknown), by replaying the events in order; `None` when the last
/// event removed it. Panics on an event that cannot follow the one before,
/// so a history that disagrees with its transitions fails the test.
pub fn replay(events: &[pb::Event]) -> Option<(pb::State, u32, bool)> {
    use pb::EventKind::*;
    let mut record: Option<(pb::State, u32, bool)> = None;
    for event in events {
        let kind = pb::EventKind::try_from(event.kind).expect("a known event kind");
        record = match (kind, record) {
            (Acquired, None) => {
                assert_eq!(event.attempt, 1, "a new record starts at attempt 1: {events:?}");
                Some((pb::State::InProgress, 1, false))
            }
            (Acquired, Some((_, attempt, _))) if event.attempt == 1 => {
                assert!(attempt >= 1, "{events:?}");
                Some((pb::State::InProgress, 1, false))
            }
            (Acquired, Some((state, attempt, _))) => {
                assert_eq!(state, pb::State::Aborted, "acquired over {state:?}: {events:?}");
                assert_eq!(event.attempt, attempt + 1, "{events:?}");
                Some((pb::State::InProgress, event.attempt, false))
            }
            (Completed | Resolved, Some((state, attempt, _))) => {
                assert_eq!(event.attempt, attempt, "{events:?}");
                assert!(kind == Resolved || state == pb::State::InProgress, "{events:?}");
                Some((pb::State::Completed, attempt, false))
            }
            (Aborted | Reaped | Released, Some((pb::State::InProgress, attempt, _))) => {
                assert_eq!(event.attempt, attempt, "{events:?}");
                Some((pb::State::Aborted, attempt, event.outcome_unknown))
            }
            (Invalidated, Some(_)) => None,
            (kind, record) => panic!("{kind:?} cannot follow {record:?}: {events:?}"),
        };
    }
    record
}

/// Runs the scenario against both stores, one test each.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Postgres).await
                }
            )*
        }
        mod postgres_batched {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::PostgresBatched).await
                }
            )*
        }
        mod pgbouncer {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::PgBouncer).await
                }
            )*
        }
    };
}

/// Polls `check` every 50 ms until it returns Some; panics after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < until, "{what}: not within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real `idemd serve` binary on a random port, with an SQLite file of
/// its own; killed when dropped. Its stderr lines arrive on `logs`.
pub struct Binary {
    pub child: std::process::Child,
    pub addr: String,
    pub logs: std::sync::mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Binary {
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Binary {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new(env!("CARGO_BIN_EXE_idemd"));
        command
            .arg("serve")
            .args(if args.contains(&"--listen") { &[][..] } else { &["--listen", "127.0.0.1:0"][..] })
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--database-url", &format!("sqlite://{}", dir.path().join("idemd.db").display())])
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in envs {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("start idemd");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, logs) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut binary = Binary { child, addr: String::new(), logs, _dir: dir };
        let line = binary.wait_for_log(" addr=", Duration::from_secs(60));
        let rest = line.split(" addr=").nth(1).unwrap_or_default();
        binary.addr = rest.split_whitespace().next().unwrap_or_default().to_string();
        binary
    }

    /// The next stderr line containing `needle`; panics after `deadline`.
    pub fn wait_for_log(&self, needle: &str, deadline: Duration) -> String {
        let until = std::time::Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match self.logs.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!("no log line containing {needle:?} within {deadline:?}"),
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        assert!(killed.success());
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(tokio::time::Instant::now() < until, "idemd did not exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `/metrics` and parse the samples: `name{sorted labels}` → value.
pub async fn scrape(addr: SocketAddr) -> std::collections::BTreeMap<String, f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: idemd\r\nConnection: close\r\n\r\n").await.expect("request");
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut raw))
        .await
        .expect("metrics answer in time")
        .expect("read");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let series = match series.split_once('{') {
                Some((name, labels)) => {
                    let mut labels: Vec<&str> =
                        labels.trim_end_matches('}').split(',').filter(|l| !l.is_empty()).collect();
                    labels.sort();
                    format!("{name}{{{}}}", labels.join(","))
                }
                None => series.to_string(),
            };
            Some((series, value))
        })
        .collect()
}
