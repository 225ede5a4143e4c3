//! A Patroni cluster of the test's own on loopback: one etcd, three nodes
//! (a primary, a synchronous standby, a replica; `synchronous_mode: true`)
//! from Debian's `patroni` and `etcd-server`, PostgreSQL run as the
//! unprivileged user `scripts/test` names. Tuned to fail over fast: a
//! crashed primary is not restarted in place (`primary_start_timeout: 0`),
//! Patroni loops every second, and a demoted primary rejoins with pg_rewind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const SCOPE: &str = "idemd-failover";

pub struct Node {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
}

pub struct Patroni {
    dir: tempfile::TempDir,
    user: String,
    bindir: PathBuf,
    etcd_port: u16,
    pub nodes: Vec<Node>,
    /// What was spawned (runuser, or the program itself), reaped on drop.
    children: Vec<std::process::Child>,
}

/// Distinct free loopback ports, all held until every one is chosen.
fn free_ports(count: usize) -> Vec<u16> {
    let held: Vec<_> = (0..count).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("port")).collect();
    held.iter().map(|l| l.local_addr().expect("addr").port()).collect()
}

fn config(node: &Node, dir: &Path, etcd_port: u16, bindir: &Path) -> String {
    let name = &node.name;
    let run = dir.display();
    format!(
        r#"scope: {SCOPE}
namespace: /service/
name: {name}
log:
  level: INFO
  dir: {run}/log/{name}
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  hosts: 127.0.0.1:{etcd_port}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 3
    maximum_lag_on_failover: 1048576
    primary_start_timeout: 0
    synchronous_mode: true
    synchronous_node_count: 1
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        max_connections: 100
        wal_log_hints: 'on'
        synchronous_commit: 'on'
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 128MB
        shared_buffers: 32MB
  initdb:
    - encoding: UTF8
    - auth: trust
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {run}/data/{name}
  bin_dir: {bindir}
  pgpass: {run}/pgpass-{name}
  authentication:
    superuser:
      username: postgres
    replication:
      username: postgres
    rewind:
      username: postgres
  parameters:
    unix_socket_directories: '{run}/sock'
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
"#,
        api = node.api_port,
        pg = node.pg_port,
        bindir = bindir.display(),
    )
}

impl Patroni {
    /// Starts etcd and three nodes and waits until the cluster is whole.
    pub async fn start(name: &str) -> Patroni {
        let (bindir, user) = (crate::pg_cluster::bindir(), crate::pg_cluster::pg_user());
        let tmp = std::env::var("IDEMD_TEST_TMP").unwrap_or_else(|_| std::env::temp_dir().display().to_string());
        for tool in ["patroni", "etcd"] {
            let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().expect("sh");
            assert!(
                found.status.success(),
                "{tool} not found: apt-get install patroni etcd-server (scripts/test does)"
            );
        }
        let dir = tempfile::Builder::new().prefix(name).tempdir_in(tmp).expect("cluster dir");
        let ports = free_ports(8);
        let nodes =
            (0..3).map(|i| Node { name: format!("pg{i}"), pg_port: ports[2 + i], api_port: ports[5 + i] }).collect();
        let mut cluster = Patroni { dir, user, bindir, etcd_port: ports[0], nodes, children: Vec::new() };
        for sub in ["data", "log", "sock", "etcd"] {
            std::fs::create_dir_all(cluster.dir.path().join(sub)).expect("mkdir");
        }
        for node in &cluster.nodes {
            std::fs::create_dir_all(cluster.dir.path().join("log").join(&node.name)).expect("mkdir");
            let file = cluster.dir.path().join(format!("{}.yml", node.name));
            std::fs::write(&file, config(node, cluster.dir.path(), cluster.etcd_port, &cluster.bindir))
                .expect("write config");
        }
        if !cluster.user.is_empty() {
            let path = cluster.dir.path().display().to_string();
            assert!(Command::new("chown").args(["-R", &cluster.user, &path]).status().expect("chown").success());
        }
        std::fs::set_permissions(cluster.dir.path().join("data"), std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod");

        let peer = format!("http://127.0.0.1:{}", ports[1]);
        let client = format!("http://127.0.0.1:{}", cluster.etcd_port);
        let etcd_data = cluster.dir.path().join("etcd").display().to_string();
        cluster.spawn(
            "etcd",
            &[
                "etcd",
                "--name=e0",
                &format!("--data-dir={etcd_data}"),
                &format!("--listen-client-urls={client}"),
                &format!("--advertise-client-urls={client}"),
                &format!("--listen-peer-urls={peer}"),
                &format!("--initial-advertise-peer-urls={peer}"),
                &format!("--initial-cluster=e0={peer}"),
                "--initial-cluster-state=new",
                "--log-level=warn",
            ],
        );
        for i in 0..cluster.nodes.len() {
            let name = cluster.nodes[i].name.clone();
            let config = cluster.dir.path().join(format!("{name}.yml")).display().to_string();
            cluster.spawn(&name, &["/usr/bin/patroni", &config]);
        }
        cluster.wait_whole(Duration::from_secs(180)).await;
        cluster
    }

    /// Runs a program as the cluster's user in the background, recording its pid.
    fn spawn(&mut self, name: &str, program: &[&str]) {
        let dir = self.dir.path();
        let pid_file = dir.join(format!("{name}.pid")).display().to_string();
        let log = std::fs::File::create(dir.join("log").join(format!("{name}.out"))).expect("log");
        // `exec` keeps the pid the script wrote: the program's own.
        let script = format!("echo $$ > '{pid_file}'; exec \"$@\"");
        let mut command = if self.user.is_empty() {
            Command::new("sh")
        } else {
            let mut command = Command::new("runuser");
            command.args(["-u", &self.user, "--", "sh"]);
            command
        };
        let child = command
            .args(["-c", &script, "sh"])
            .args(program)
            .current_dir(dir)
            .env("HOME", dir)
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start a cluster process");
        self.children.push(child);
    }

    /// `GET path` on a node's REST API, as JSON.
    async fn api(&self, node: &Node, path: &str) -> Option<serde_json::Value> {
        let get = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", node.api_port)).await.ok()?;
            let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.ok()?;
            let text = String::from_utf8_lossy(&response);
            let (_, body) = text.split_once("\r\n\r\n")?;
            serde_json::from_str(body).ok()
        };
        tokio::time::timeout(Duration::from_secs(2), get).await.ok().flatten()
    }

    /// `(name, role)` of every running member, as any node's API tells.
    async fn members(&self) -> Vec<(String, String)> {
        for node in &self.nodes {
            if let Some(cluster) = self.api(node, "/cluster").await {
                return cluster["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|m| m["state"] == "running" || m["state"] == "streaming")
                    .map(|m| {
                        (
                            m["name"].as_str().unwrap_or_default().to_string(),
                            m["role"].as_str().unwrap_or_default().into(),
                        )
                    })
                    .collect();
            }
        }
        Vec::new()
    }

    /// Until there is a leader, a synchronous standby and a replica.
    pub async fn wait_whole(&self, deadline: Duration) {
        let started = Instant::now();
        loop {
            let members = self.members().await;
            let count = |role: &str| members.iter().filter(|(_, r)| r == role).count();
            if count("leader") == 1 && count("sync_standby") == 1 && count("replica") == 1 {
                return;
            }
            assert!(
                started.elapsed() < deadline,
                "the Patroni cluster is not whole after {deadline:?}: {members:?}; logs in {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The node holding the leader lock, once there is one.
    pub async fn leader(&self, deadline: Duration) -> &Node {
        let started = Instant::now();
        loop {
            let members = self.members().await;
            if let Some((name, _)) = members.iter().find(|(_, role)| role == "leader")
                && let Some(node) = self.nodes.iter().find(|n| &n.name == name)
            {
                return node;
            }
            assert!(started.elapsed() < deadline, "no Patroni leader after {deadline:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL to a node's postmaster, as a crash would.
    pub fn kill_postmaster(&self, node: &Node) {
        let pid_file = self.dir.path().join("data").join(&node.name).join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file).expect("postmaster.pid");
        let pid = text.lines().next().expect("pid line").trim().to_string();
        assert!(Command::new("kill").args(["-KILL", &pid]).status().expect("kill").success());
    }

    /// A libpq-style multi-host URL over every node, writes to the primary.
    pub fn url(&self, database: &str) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.pg_port)).collect();
        format!("postgres://postgres@{}/{database}?target_session_attrs=read-write", hosts.join(","))
    }

    pub fn node_url(node: &Node, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", node.pg_port)
    }
}

impl Drop for Patroni {
    fn drop(&mut self) {
        let dir = self.dir.path();
        let pid = |name: &str| std::fs::read_to_string(dir.join(format!("{name}.pid"))).ok();
        for node in &self.nodes {
            if let Some(pid) = pid(&node.name) {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
        for node in &self.nodes {
            let data = dir.join("data").join(&node.name).display().to_string();
            let pg_ctl = self.bindir.join("pg_ctl").display().to_string();
            let mut command = if self.user.is_empty() { Command::new(&pg_ctl) } else { Command::new("runuser") };
            if !self.user.is_empty() {
                command.args(["-u", &self.user, "--", &pg_ctl]);
            }
            let _ = command.args(["-D", &data, "-m", "immediate", "stop"]).output();
        }
        if let Some(pid) = pid("etcd") {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
