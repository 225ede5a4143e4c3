//! Throwaway PostgreSQL clusters for the tests: one of a test's own, for
//! tests that stop and restart the database under idemd, and the shared one
//! the other tests create their databases on. `scripts/test` names the
//! server binaries, the unprivileged user PostgreSQL runs as (it refuses
//! root) and a shared cluster and PgBouncer of its own; plain `cargo test`
//! finds the binaries itself and starts the shared cluster (and PgBouncer)
//! once per test process, stopped when the process exits.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The PostgreSQL server binaries: `IDEMD_TEST_PG_BINDIR`, or the newest
/// `/usr/lib/postgresql/<version>/bin`.
pub fn bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("IDEMD_TEST_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "the PostgreSQL server binaries are not installed: `apt-get install postgresql` \
             (or run scripts/test, which installs them), or set IDEMD_TEST_PG_BINDIR"
        ),
    }
}

/// The user PostgreSQL runs as: `IDEMD_TEST_PG_USER`, or `postgres` when the
/// tests run as root, or the current user ("").
pub fn pg_user() -> String {
    if let Ok(user) = std::env::var("IDEMD_TEST_PG_USER") {
        return user;
    }
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if !uid.is_ok_and(|uid| uid == "0") {
        return String::new();
    }
    let exists = Command::new("id").args(["-u", "postgres"]).output().is_ok_and(|o| o.status.success());
    assert!(
        exists,
        "running as root: PostgreSQL needs an unprivileged user; create `postgres` or set IDEMD_TEST_PG_USER"
    );
    "postgres".to_string()
}

/// The server the tests create their databases on: `IDEMD_TEST_DATABASE_URL`,
/// or a cluster started for this test process.
#[allow(dead_code)] // the faults binary runs clusters of its own only
pub fn shared_url() -> String {
    if let Ok(url) = std::env::var("IDEMD_TEST_DATABASE_URL") {
        return url;
    }
    shared().url()
}

/// PgBouncer in transaction mode in front of the shared cluster:
/// `IDEMD_TEST_PGBOUNCER_URL`, or one started for this test process.
#[allow(dead_code)] // the faults binary uses no PgBouncer
pub fn shared_pgbouncer_url() -> String {
    if let Ok(url) = std::env::var("IDEMD_TEST_PGBOUNCER_URL") {
        return url;
    }
    assert!(
        std::env::var("IDEMD_TEST_DATABASE_URL").is_err(),
        "IDEMD_TEST_DATABASE_URL is set but IDEMD_TEST_PGBOUNCER_URL is not: set both (scripts/test does), or neither"
    );
    static BOUNCER: OnceLock<String> = OnceLock::new();
    BOUNCER
        .get_or_init(|| {
            let cluster = shared();
            let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"].into_iter().find(|p| std::path::Path::new(p).exists());
            let bin = bin.unwrap_or_else(|| {
                panic!("PgBouncer is not installed: `apt-get install pgbouncer` (or run scripts/test, which installs it)")
            });
            let port = free_port();
            let dir = cluster.dir.path();
            let ini = dir.join("pgbouncer.ini");
            let users = dir.join("pgbouncer-users.txt");
            std::fs::write(&users, "\"postgres\" \"\"\n").expect("pgbouncer users");
            std::fs::write(
                &ini,
                format!(
                    "[databases]\n* = host=127.0.0.1 port={}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                     unix_socket_dir =\nauth_type = trust\nauth_file = {}\npool_mode = transaction\n\
                     max_client_conn = 2000\ndefault_pool_size = 4\nserver_idle_timeout = 5\n\
                     logfile = {}\npidfile = {}\n",
                    cluster.port,
                    users.display(),
                    dir.join("pgbouncer.log").display(),
                    dir.join("pgbouncer.pid").display(),
                ),
            )
            .expect("pgbouncer.ini");
            if !cluster.user.is_empty() {
                let ok = Command::new("chown").args(["-R", &cluster.user, &dir.display().to_string()]).status();
                assert!(ok.is_ok_and(|s| s.success()), "chown the cluster folder");
            }
            let mut start = cluster.as_user(bin);
            let status = start.args(["-d", &ini.display().to_string()]).status().expect("start pgbouncer");
            assert!(status.success(), "pgbouncer did not start (see {})", dir.join("pgbouncer.log").display());
            format!("postgres://postgres@127.0.0.1:{port}/postgres")
        })
        .clone()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
}

/// The cluster of this test process, stopped (with its PgBouncer) and
/// removed by a watchdog when the process exits: a static is never dropped.
fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    SHARED.get_or_init(|| {
        let cluster = Cluster::with_settings("idemd-tests", "-c max_connections=300 -c fsync=off");
        let (pg_ctl, data, dir) =
            (cluster.bindir.join("pg_ctl"), cluster.data(), cluster.dir.path().display().to_string());
        let as_user = if cluster.user.is_empty() { String::new() } else { format!("runuser -u {} -- ", cluster.user) };
        let watchdog = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             [ -f {dir}/pgbouncer.pid ] && kill $(cat {dir}/pgbouncer.pid) 2>/dev/null; \
             {as_user}{pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            pg_ctl = pg_ctl.display(),
        );
        let mut watchdog = Command::new("sh").args(["-c", &watchdog]).spawn().expect("start the cluster's watchdog");
        // Reaped if it ever ends while the tests still run.
        std::thread::spawn(move || watchdog.wait());
        cluster
    })
}

/// A throwaway cluster run by the unprivileged user `scripts/test` names.
pub struct Cluster {
    bindir: PathBuf,
    user: String,
    dir: tempfile::TempDir,
    pub port: u16,
    /// Extra server settings, kept for restarts.
    settings: String,
}

impl Cluster {
    pub fn command(&self, tool: &str) -> Command {
        self.as_user(self.bindir.join(tool))
    }

    /// `program`, run as the cluster's user.
    fn as_user(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        if self.user.is_empty() {
            Command::new(program)
        } else {
            let mut command = Command::new("runuser");
            command.args(["-u", &self.user, "--"]).arg(program);
            command
        }
    }

    pub fn pg(&self, tool: &str, args: &[&str]) {
        let output = self.command(tool).args(args).output().expect("run a PostgreSQL tool");
        assert!(output.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }

    pub fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    pub fn new(name: &str) -> Cluster {
        Cluster::with_settings(name, "")
    }

    /// A cluster started with extra server settings (`-c name=value …`).
    fn with_settings(name: &str, settings: &str) -> Cluster {
        let (bindir, user) = (bindir(), pg_user());
        let tmp = std::env::var("IDEMD_TEST_TMP").unwrap_or_else(|_| std::env::temp_dir().display().to_string());
        let dir = tempfile::Builder::new().prefix(name).tempdir_in(tmp).expect("cluster dir");
        if !user.is_empty() {
            let ok = Command::new("chown").args([&user, &dir.path().display().to_string()]).status().expect("chown");
            assert!(ok.success());
        }
        let port = free_port();
        let cluster = Cluster { bindir, user, dir, port, settings: settings.to_string() };
        cluster.pg("initdb", &["-D", &cluster.data(), "-U", "postgres", "--auth=trust", "--no-sync"]);
        cluster.start();
        cluster
    }

    pub fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 {}",
            self.port,
            self.dir.path().display(),
            self.settings
        );
        let log = self.dir.path().join("log").display().to_string();
        self.pg("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "-t", "60", "-o", &options, "start"]);
    }

    /// Stops the postmaster at once, as a crash would (no checkpoint).
    pub fn stop_immediately(&self) {
        self.pg("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.command("pg_ctl").args(["-D", &data, "-m", "immediate", "stop"]).output();
    }
}
