//! The gRPC port's connections: TLS (rustls, no OpenSSL), mTLS when a
//! client CA is given, certificates re-read when their files change
//! (Kubernetes rotates Secrets in place), and a cap on open connections.
//! The metrics port stays plaintext.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

/// How often certificate files are checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, clients must present a certificate this CA signed (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.cert.as_path(), self.key.as_path()];
        paths.extend(self.client_ca.as_deref());
        paths
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        self.paths().iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
    }

    fn server_config(&self) -> Result<rustls::ServerConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("--tls-cert {}: {e}", self.cert.display()))?;
        if certs.is_empty() {
            return Err(format!("--tls-cert {}: no certificate", self.cert.display()));
        }
        let key =
            PrivateKeyDer::from_pem_file(&self.key).map_err(|e| format!("--tls-key {}: {e}", self.key.display()))?;
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                let cas = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
                for ca in cas {
                    roots.add(ca).map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config =
            builder.with_single_cert(certs, key).map_err(|e| format!("--tls-cert/--tls-key do not match: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The TLS acceptor in force, replaced when the files change.
pub struct ReloadingTls {
    files: TlsFiles,
    acceptor: RwLock<TlsAcceptor>,
    stamps: RwLock<Vec<Option<SystemTime>>>,
}

impl ReloadingTls {
    /// Loads the certificates; at start-up a bad file is an error.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<Self>> {
        let stamps = files.stamps();
        let config = files.server_config().map_err(anyhow::Error::msg)?;
        tracing::info!(mtls = files.client_ca.is_some(), "TLS enabled on the gRPC port");
        Ok(Arc::new(ReloadingTls {
            files,
            acceptor: RwLock::new(TlsAcceptor::from(Arc::new(config))),
            stamps: RwLock::new(stamps),
        }))
    }

    fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn reload_if_changed(&self) {
        let stamps = self.files.stamps();
        if *self.stamps.read().unwrap_or_else(std::sync::PoisonError::into_inner) == stamps {
            return;
        }
        *self.stamps.write().unwrap_or_else(std::sync::PoisonError::into_inner) = stamps;
        match self.files.server_config() {
            Ok(config) => {
                *self.acceptor.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    TlsAcceptor::from(Arc::new(config));
                tracing::info!("TLS certificates reloaded");
            }
            // Mid-rotation a cert may not match its key yet: keep serving and retry on the next change.
            Err(error) => tracing::error!(%error, "TLS certificates rejected; the previous ones stay in force"),
        }
    }

    pub fn spawn_watcher(self: &Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(WATCH_INTERVAL) => this.reload_if_changed(),
                }
            }
        })
    }
}

/// A connection holding one of the `--max-connections` slots while open.
pub struct Limited<S> {
    stream: S,
    _slot: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl<S: Connected> Connected for Limited<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// Takes a connection slot, or refuses the connection when all are taken.
fn admit(stream: TcpStream, slots: &Arc<Semaphore>) -> Option<(TcpStream, OwnedSemaphorePermit)> {
    match Arc::clone(slots).try_acquire_owned() {
        Ok(slot) => {
            // Small gRPC frames must not wait for Nagle's algorithm.
            let _ = stream.set_nodelay(true);
            Some((stream, slot))
        }
        Err(_) => {
            tracing::warn!("connection refused: --max-connections reached");
            None
        }
    }
}

/// Plaintext connections, at most `slots` at once.
pub fn plain_incoming(
    listener: TcpListener,
    slots: Arc<Semaphore>,
) -> impl Stream<Item = std::io::Result<Limited<TcpStream>>> {
    TcpListenerStream::new(listener).filter_map(move |accepted| {
        let slots = Arc::clone(&slots);
        async move {
            match accepted {
                Ok(stream) => admit(stream, &slots).map(|(stream, slot)| Ok(Limited { stream, _slot: slot })),
                Err(error) => Some(Err(error)),
            }
        }
    })
}

/// TLS connections, at most `slots` at once; handshakes run concurrently so
/// a slow client cannot hold up the others. Stops accepting on `shutdown`.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
) -> impl Stream<Item = std::io::Result<Limited<TlsStream<TcpStream>>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tx.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    continue;
                }
            };
            let Some((stream, slot)) = admit(stream, &slots) else { continue };
            let (acceptor, tx) = (tls.acceptor(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(Limited { stream, _slot: slot })).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
