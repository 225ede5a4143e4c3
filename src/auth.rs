//! Who may call what: bearer tokens (kept only as SHA-256 hashes) and, with
//! mTLS, client-certificate subjects, each granting a set of namespaces.
//!
//! The tokens file has one grant per line, `#` comments and blank lines:
//!
//! ```text
//! sha256:<64 hex digits of SHA-256(token)> payments,refunds
//! sha256:<…> tenant-a.*            # every namespace starting with "tenant-a."
//! subject:checkout.payments.svc payments   # an mTLS client certificate's CN or URI SAN
//! ```
//!
//! The file is re-read on SIGHUP and when it changes; a file that does not
//! parse keeps the previous grants in force and logs an error naming the line.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::Namespace;
use crate::error::{Error, Result};

/// How often the tokens file's modification time is checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Namespaces one credential may use: exact names and `prefix.*` patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceGrant {
    exact: HashSet<String>,
    prefixes: Vec<String>,
}

impl NamespaceGrant {
    pub fn allows(&self, namespace: &str) -> bool {
        self.exact.contains(namespace) || self.prefixes.iter().any(|prefix| namespace.starts_with(prefix.as_str()))
    }

    fn add(&mut self, pattern: &str) -> std::result::Result<(), String> {
        if let Some(prefix) = pattern.strip_suffix('*') {
            // "tenant-a.*" grants "tenant-a.x" but not "tenant-ab".
            let stem = prefix.strip_suffix('.').ok_or("a pattern must end in \".*\"")?;
            Namespace::parse(stem.to_string()).map_err(|_| format!("{pattern:?} is not a valid namespace pattern"))?;
            self.prefixes.push(prefix.to_string());
        } else {
            Namespace::parse(pattern.to_string()).map_err(|_| format!("{pattern:?} is not a valid namespace"))?;
            self.exact.insert(pattern.to_string());
        }
        Ok(())
    }

    fn merge(&mut self, other: NamespaceGrant) {
        self.exact.extend(other.exact);
        self.prefixes.extend(other.prefixes);
    }
}

/// The parsed tokens file.
#[derive(Debug, Default, Clone)]
pub struct Grants {
    /// Shared with every request's `Principal`: no copy per call.
    by_token_hash: HashMap<[u8; 32], Arc<NamespaceGrant>>,
    by_subject: HashMap<String, Arc<NamespaceGrant>>,
}

impl Grants {
    /// Parses the tokens file; an error names the line and what is wrong.
    pub fn parse(text: &str) -> std::result::Result<Grants, String> {
        let mut tokens: HashMap<[u8; 32], NamespaceGrant> = HashMap::new();
        let mut subjects: HashMap<String, NamespaceGrant> = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fail = |problem: String| format!("line {}: {problem}", index + 1);
            let mut parts = line.split_whitespace();
            let (Some(credential), Some(namespaces), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(fail("expected `sha256:<hex> <namespace>[,<namespace>…]`".into()));
            };
            let mut grant = NamespaceGrant::default();
            for pattern in namespaces.split(',') {
                grant.add(pattern).map_err(fail)?;
            }
            if let Some(hash) = credential.strip_prefix("sha256:") {
                let bytes = hex::decode(hash).map_err(|_| fail("the token hash is not hex".into()))?;
                let hash: [u8; 32] = bytes.try_into().map_err(|_| fail("the token hash is not 32 bytes".into()))?;
                tokens.entry(hash).or_default().merge(grant);
            } else if let Some(subject) = credential.strip_prefix("subject:") {
                if subject.is_empty() {
                    return Err(fail("empty subject".into()));
                }
                subjects.entry(subject.to_string()).or_default().merge(grant);
            } else {
                return Err(fail("a credential starts with `sha256:` or `subject:`".into()));
            }
        }
        Ok(Grants {
            by_token_hash: tokens.into_iter().map(|(k, g)| (k, Arc::new(g))).collect(),
            by_subject: subjects.into_iter().map(|(k, g)| (k, Arc::new(g))).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.by_token_hash.len() + self.by_subject.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The namespaces the caller of one request may use; put in the request's
/// extensions by the interceptor.
#[derive(Debug, Clone)]
pub struct Principal(Arc<NamespaceGrant>);

impl Principal {
    pub fn check(&self, namespace: &Namespace) -> Result<()> {
        if self.0.allows(namespace.as_str()) { Ok(()) } else { Err(Error::NamespaceDenied) }
    }
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The current grants, reloadable.
#[derive(Debug)]
pub struct Authenticator {
    path: PathBuf,
    grants: RwLock<Arc<Grants>>,
    modified: RwLock<Option<SystemTime>>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_grants(path: &Path) -> std::result::Result<Grants, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let grants = Grants::parse(&text)?;
    // An empty file is far more often one caught mid-write than an intent
    // to lock every caller out; stop idemd to revoke everything at once.
    if grants.is_empty() {
        return Err("no grants in the file".into());
    }
    Ok(grants)
}

impl Authenticator {
    /// Loads the tokens file; at start-up a broken file is an error.
    pub fn load(path: &Path) -> anyhow::Result<Arc<Self>> {
        let stamp = modified(path);
        let grants = read_grants(path).map_err(|e| {
            anyhow::anyhow!("invalid --auth-tokens-file {} (IDEMD_AUTH_TOKENS_FILE): {e}", path.display())
        })?;
        tracing::info!(path = %path.display(), credentials = grants.len(), "auth tokens loaded");
        Ok(Arc::new(Authenticator {
            path: path.to_path_buf(),
            grants: RwLock::new(Arc::new(grants)),
            modified: RwLock::new(stamp),
        }))
    }

    fn current(&self) -> Arc<Grants> {
        // A poisoned lock still holds a complete Arc: the swap is one store.
        Arc::clone(&self.grants.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Re-reads the file; a broken one keeps the previous grants.
    pub fn reload(&self) -> bool {
        let before = modified(&self.path);
        let read = read_grants(&self.path);
        // Changed while being read: leave the stamp stale so the next tick reads it again.
        if modified(&self.path) == before {
            *self.modified.write().unwrap_or_else(std::sync::PoisonError::into_inner) = before;
        }
        match read {
            Ok(grants) => {
                tracing::info!(path = %self.path.display(), credentials = grants.len(), "auth tokens reloaded");
                *self.grants.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(grants);
                true
            }
            Err(error) => {
                tracing::error!(path = %self.path.display(), %error, "auth tokens file rejected; the previous grants stay in force");
                false
            }
        }
    }

    /// Reloads on SIGHUP and whenever the file's modification time changes.
    pub fn spawn_watcher(self: &Arc<Self>, shutdown: CancellationToken) -> JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(signal) => Some(signal),
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGHUP; reloading on file change only");
                    None
                }
            };
            loop {
                let hup = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = hup => { this.reload(); }
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {
                        let seen = *this.modified.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                        if modified(&this.path) != seen {
                            this.reload();
                        }
                    }
                }
            }
        })
    }

    /// The caller's grant from `authorization: Bearer <token>`, or else from
    /// the mTLS client certificate's subjects; UNAUTHENTICATED otherwise.
    pub fn authenticate(&self, metadata: &tonic::metadata::MetadataMap, subjects: &[String]) -> Result<Principal> {
        let grants = self.current();
        if let Some(value) = metadata.get("authorization") {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(str::trim)
                .ok_or(Error::Unauthenticated)?;
            return grants
                .by_token_hash
                .get(&token_hash(token))
                .map(|grant| Principal(Arc::clone(grant)))
                .ok_or(Error::Unauthenticated);
        }
        let mut matched = subjects.iter().filter_map(|subject| grants.by_subject.get(subject));
        let first = matched.next().ok_or(Error::Unauthenticated)?;
        let rest: Vec<_> = matched.collect();
        if rest.is_empty() {
            return Ok(Principal(Arc::clone(first)));
        }
        // A certificate naming several granted subjects gets their union.
        let mut union = NamespaceGrant::clone(first);
        for grant in rest {
            union.merge(NamespaceGrant::clone(grant));
        }
        Ok(Principal(Arc::new(union)))
    }
}

/// The names a client certificate stands for: its subject CN and URI SANs.
pub fn subjects_of(certificates: &[rustls::pki_types::CertificateDer<'_>]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Some(leaf) = certificates.first() else { return Vec::new() };
    let Ok((_, certificate)) = X509Certificate::from_der(leaf.as_ref()) else { return Vec::new() };
    let mut subjects: Vec<String> =
        certificate.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_string)).collect();
    if let Ok(Some(san)) = certificate.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                subjects.push((*uri).to_string());
            }
        }
    }
    subjects
}

/// The interceptor in front of the Idempotency service: credentials first
/// (UNAUTHENTICATED), before the request body is even decoded. Without a
/// tokens file it lets every call through.
#[derive(Clone)]
pub struct AuthInterceptor(pub Option<Arc<Authenticator>>);

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        let Some(authenticator) = &self.0 else { return Ok(request) };
        let subjects = request.peer_certs().map(|certs| subjects_of(&certs)).unwrap_or_default();
        let principal = authenticator.authenticate(request.metadata(), &subjects)?;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// `idemd token`: a new random token (256 bits) and its line for the file.
pub fn new_token(grants: &[String]) -> std::result::Result<(String, String), String> {
    let mut grant = NamespaceGrant::default();
    for pattern in grants {
        grant.add(pattern)?;
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("idemd_{}", hex::encode(bytes));
    let line = format!("sha256:{} {}", hex::encode(token_hash(&token)), grants.join(","));
    Ok((token, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str) -> Namespace {
        Namespace::parse(name.into()).expect("namespace")
    }

    #[test]
    fn tokens_and_patterns() {
        let (token, line) = new_token(&["payments".into(), "tenant-a.*".into()]).expect("token");
        let grants =
            Grants::parse(&format!("# comment\n\n{line}  # trailing\nsubject:svc.example refunds\n")).expect("parses");
        assert_eq!(grants.len(), 2);
        let grant = grants.by_token_hash.get(&token_hash(&token)).expect("grant");
        assert!(
            grant.allows("payments")
                && grant.allows("tenant-a.eu")
                && !grant.allows("tenant-ab")
                && !grant.allows("refunds")
        );
        assert!(!line.contains(&token), "the file never holds the token");
        let principal = Principal(Arc::clone(grant));
        assert!(principal.check(&ns("payments")).is_ok());
        assert!(matches!(principal.check(&ns("refunds")), Err(Error::NamespaceDenied)));
    }

    #[test]
    fn broken_lines_are_named() {
        assert!(Grants::parse("sha256:zz payments").expect_err("bad hex").contains("line 1"));
        assert!(Grants::parse("\nsha256:00 payments").expect_err("short hash").contains("line 2"));
        assert!(Grants::parse("token payments").is_err());
        let hash = "0".repeat(64);
        assert!(Grants::parse(&format!("sha256:{hash} Payments")).is_err());
        assert!(Grants::parse(&format!("sha256:{hash} tenant*")).is_err());
        assert!(Grants::parse(&format!("sha256:{hash}")).is_err());
        assert!(Grants::parse("# only a comment\n").is_ok_and(|g| g.is_empty()));
    }
}
