//! A TCP proxy between idemd and Postgres that can add latency, cut every
//! open connection, and refuse new ones: a network that misbehaves, on
//! loopback only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    latency_ms: Arc<AtomicU64>,
    refusing: Arc<AtomicBool>,
    /// Bumped to cut every connection open at that moment.
    cuts: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let latency_ms = Arc::new(AtomicU64::new(0));
        let refusing = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let task = {
            let (latency_ms, refusing, cuts) = (latency_ms.clone(), refusing.clone(), cuts.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else { continue };
                    // Subscribed before the check: a cut either refuses this
                    // connection here or reaches it through `cut`.
                    let (latency_ms, cut) = (latency_ms.clone(), cuts.subscribe());
                    if refusing.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else { return };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        let mut cut_a = cut.clone();
                        let mut cut_b = cut;
                        tokio::select! {
                            _ = pipe(client_read, server_write, latency_ms.clone()) => {}
                            _ = pipe(server_read, client_write, latency_ms) => {}
                            _ = cut_a.changed() => {}
                            _ = cut_b.changed() => {}
                        }
                    });
                }
            })
        };
        Proxy { addr, latency_ms, refusing, cuts, task }
    }

    pub fn set_latency(&self, latency: Duration) {
        self.latency_ms.store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set_refusing(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Drops every connection open now, mid-stream, as a network fault would.
    pub fn cut_all(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    latency_ms: Arc<AtomicU64>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = latency_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
