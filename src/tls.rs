//! TLS on the gRPC port (rustls, no OpenSSL), mTLS when a client CA is
//! given, certificates re-read when their files' content changes
//! (Kubernetes rotates Secrets in place; a copy that keeps the old
//! modification time is noticed too). The handshake runs within the
//! connection's first-request deadline (`crate::connections`). The metrics
//! port stays plaintext.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// How often certificate files are checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

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

    /// A digest of each file's content (`None`: unreadable).
    fn stamps(&self) -> Vec<Option<[u8; 32]>> {
        self.paths().iter().map(|p| std::fs::read(p).ok().map(|bytes| Sha256::digest(&bytes).into())).collect()
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
    stamps: RwLock<Vec<Option<[u8; 32]>>>,
    /// The files on disk are what is in force: false from a rejected
    /// reload until one is accepted (the `idemd_tls_certificate_in_force` gauge).
    in_force: AtomicBool,
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
            in_force: AtomicBool::new(true),
        }))
    }

    /// Whether the certificates in force are the files on disk.
    pub fn in_force(&self) -> bool {
        self.in_force.load(Ordering::Relaxed)
    }

    fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The handshake with the certificates in force; `None` when it fails
    /// (logged at DEBUG: a scanner or a client that does not trust us).
    pub async fn accept(&self, stream: TcpStream) -> Option<TlsStream<TcpStream>> {
        match self.acceptor().accept(stream).await {
            Ok(stream) => Some(stream),
            Err(error) => {
                tracing::debug!(%error, "TLS handshake failed");
                None
            }
        }
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
                self.in_force.store(true, Ordering::Relaxed);
                tracing::info!("TLS certificates reloaded");
            }
            // Mid-rotation a cert may not match its key yet: keep serving and retry on the next change.
            Err(error) => {
                self.in_force.store(false, Ordering::Relaxed);
                tracing::error!(%error, "TLS certificates rejected; the previous ones stay in force");
            }
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
