//! A throwaway PostgreSQL cluster of a test's own, for tests that stop and
//! restart the database under idemd. Uses the server binaries and the
//! unprivileged user `scripts/test` names (PostgreSQL refuses root).

use std::path::PathBuf;
use std::process::Command;

/// A throwaway cluster run by the unprivileged user `scripts/test` names.
pub struct Cluster {
    bindir: PathBuf,
    user: String,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Cluster {
    pub fn command(&self, tool: &str) -> Command {
        let program = self.bindir.join(tool);
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
        let bindir =
            PathBuf::from(std::env::var("IDEMD_TEST_PG_BINDIR").expect("IDEMD_TEST_PG_BINDIR: run scripts/test"));
        let user = std::env::var("IDEMD_TEST_PG_USER").unwrap_or_default();
        let tmp = std::env::var("IDEMD_TEST_TMP").unwrap_or_else(|_| std::env::temp_dir().display().to_string());
        let dir = tempfile::Builder::new().prefix(name).tempdir_in(tmp).expect("cluster dir");
        if !user.is_empty() {
            let ok = Command::new("chown").args([&user, &dir.path().display().to_string()]).status().expect("chown");
            assert!(ok.success());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let cluster = Cluster { bindir, user, dir, port };
        cluster.pg("initdb", &["-D", &cluster.data(), "-U", "postgres", "--auth=trust", "--no-sync"]);
        cluster.start();
        cluster
    }

    pub fn start(&self) {
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
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
