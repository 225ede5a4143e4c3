//! idemd replicas as real processes on fixed loopback ports, so a replica
//! killed with SIGKILL comes back where its clients expect it.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tonic::transport::Channel;

pub struct Replicas {
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
    database_url: String,
    dir: tempfile::TempDir,
}

/// A free port below the kernel's ephemeral range, so an outgoing connection
/// cannot take it while its replica is down between kill and restart.
fn free_port() -> u16 {
    use rand::Rng;
    loop {
        let port = rand::rng().random_range(20_000..30_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Replicas {
    pub async fn start(count: usize, database_url: &str) -> Replicas {
        let mut replicas = Replicas {
            ports: (0..count).map(|_| free_port()).collect(),
            children: (0..count).map(|_| None).collect(),
            database_url: database_url.to_string(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        for replica in 0..count {
            replicas.spawn(replica);
        }
        replicas
    }

    fn log(&self, replica: usize) -> PathBuf {
        self.dir.path().join(format!("replica-{replica}.log"))
    }

    fn spawn(&mut self, replica: usize) {
        let log = OpenOptions::new().create(true).append(true).open(self.log(replica)).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_idemd"))
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[replica])])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--database-url", &self.database_url])
            .args(["--db-max-connections", "6", "--store-timeout", "1s"])
            .args(["--reaper-interval", "200ms", "--shutdown-grace", "2s"])
            // Replica 1 batches its Begins (group commit), the others do not.
            .args(["--group-commit-max-batch", if replica == 1 { "32" } else { "1" }])
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start idemd");
        self.children[replica] = Some(child);
    }

    pub fn channels(&self) -> Vec<Channel> {
        self.ports
            .iter()
            .map(|port| {
                Channel::from_shared(format!("http://127.0.0.1:{port}"))
                    .expect("uri")
                    .connect_timeout(Duration::from_millis(500))
                    .connect_lazy()
            })
            .collect()
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self, replica: usize) {
        if let Some(mut child) = self.children[replica].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self, replica: usize) {
        self.kill(replica);
        self.spawn(replica);
    }

    pub async fn stop_all(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
        for child in self.children.iter_mut() {
            if let Some(mut process) = child.take() {
                for _ in 0..200 {
                    if process.try_wait().ok().flatten().is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = process.kill();
                let _ = process.wait();
            }
        }
    }

    /// `(key, attempt)` of every "aborted by the reaper" line of every replica.
    pub fn reaped_from_logs(&self) -> Vec<(String, u32)> {
        let mut reaped = Vec::new();
        for replica in 0..self.ports.len() {
            let text = std::fs::read_to_string(self.log(replica)).unwrap_or_default();
            for line in
                text.lines().filter(|l| l.contains("aborted by the reaper") && l.contains("namespace=\"faults\""))
            {
                let field = |name: &str| {
                    line.split_whitespace()
                        .find_map(|part| part.strip_prefix(&format!("{name}=")))
                        .map(|v| v.trim_matches('"').to_string())
                };
                if let (Some(key), Some(attempt)) = (field("key"), field("attempt").and_then(|a| a.parse().ok())) {
                    reaped.push((key, attempt));
                }
            }
        }
        reaped
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
