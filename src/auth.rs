//! Who may call what: bearer tokens (kept only as SHA-256 hashes) and, with
//! mTLS, client-certificate subjects, each granting a set of namespaces.
//!
//! The tokens file has one grant per line, `#` comments and blank lines:
//!
//! ```text
//! sha256:<64 hex digits of SHA-256(token)> payments,refunds
//! sha256:<…> tenant-a.*            # every namespace starting with "tenant-a."
//! subject:checkout.payments.svc payments   # an mTLS client certificate's CN or URI SAN
//! sha256:<…> admin:payments,payments name=oncall   # the Admin service too, and a name
//! ```
//!
//! A namespace entry prefixed `admin:` grants the Admin service (and
//! Lookup) on it; plain entries grant the Idempotency service. The optional
//! last field `name=<1–64 of [A-Za-z0-9._-]>` names the credential in
//! history and logs; without it a token is `sha256:` + 12 hex digits of its
//! hash and a certificate `subject:<CN or URI SAN>`.
//!
//! The file is re-read on SIGHUP and whenever its content changes (compared
//! by digest, so a copy that keeps the old modification time is noticed).
//! At start-up a bad line is an error. On a reload, a bad line never keeps
//! an old grant alive: the good lines take effect, a bad line grants
//! nothing, and a bad line whose credential can be read takes every grant of
//! that credential away (it may have meant to narrow them). Only a file that
//! cannot be read or holds no grant at all keeps the previous grants (an
//! empty file is far more often one caught mid-write than an intent to lock
//! every caller out). Either way an ERROR line names each bad line and the
//! `idemd_auth_tokens_file_in_force` gauge drops to 0 until the file on disk
//! is exactly what is in force again.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::connections::ConnectionHandle;
use crate::domain::Namespace;
use crate::error::{Error, Result};

/// How often the tokens file's content is checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Namespaces one credential may use: exact names and `prefix.*` patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceGrant {
    exact: HashSet<String>,
    prefixes: Vec<String>,
}

impl NamespaceGrant {
    /// `tenant-a.*` grants `tenant-a.` followed by one or more non-empty
    /// dot-separated segments: never `tenant-a.` itself nor `tenant-a..x`.
    pub fn allows(&self, namespace: &str) -> bool {
        self.exact.contains(namespace)
            || self.prefixes.iter().any(|prefix| {
                namespace
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| !rest.is_empty() && rest.split('.').all(|segment| !segment.is_empty()))
            })
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

/// One credential's grants and the name it is known by in limits, logs and
/// history.
#[derive(Debug)]
struct Credential {
    grant: NamespaceGrant,
    admin: NamespaceGrant,
    name: Arc<str>,
}

/// What the lines of one credential grant, merged.
#[derive(Debug, Default)]
struct Granted {
    grant: NamespaceGrant,
    admin: NamespaceGrant,
    name: Option<String>,
}

/// `name=<1–64 of [A-Za-z0-9._-]>`.
fn parse_name(field: &str) -> std::result::Result<String, String> {
    let name = field.strip_prefix("name=").ok_or("expected `name=<name>` after the namespaces")?;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid { Ok(name.to_string()) } else { Err(format!("{name:?} is not a name of 1-64 [A-Za-z0-9._-]")) }
}

/// The parsed tokens file.
#[derive(Debug, Default, Clone)]
pub struct Grants {
    /// Shared with every request's `Principal`: no copy per call.
    by_token_hash: HashMap<[u8; 32], Principal>,
    by_subject: HashMap<String, Principal>,
}

/// Whom a credential on one line names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CredentialId {
    Token([u8; 32]),
    Subject(String),
}

fn parse_credential(credential: &str) -> std::result::Result<CredentialId, String> {
    if let Some(hash) = credential.strip_prefix("sha256:") {
        let bytes = hex::decode(hash).map_err(|_| "the token hash is not hex".to_string())?;
        let hash: [u8; 32] = bytes.try_into().map_err(|_| "the token hash is not 32 bytes".to_string())?;
        Ok(CredentialId::Token(hash))
    } else if let Some(subject) = credential.strip_prefix("subject:") {
        if subject.is_empty() {
            return Err("empty subject".into());
        }
        Ok(CredentialId::Subject(subject.to_string()))
    } else {
        Err("a credential starts with `sha256:` or `subject:`".into())
    }
}

impl Grants {
    /// Parses the tokens file strictly: the first bad line is an error that
    /// names the line and what is wrong.
    pub fn parse(text: &str) -> std::result::Result<Grants, String> {
        let (grants, bad_lines) = Grants::parse_lenient(text);
        match bad_lines.into_iter().next() {
            Some(problem) => Err(problem),
            None => Ok(grants),
        }
    }

    /// Parses what can be parsed: the grants of the good lines, less every
    /// grant of a credential named on a bad line; and each bad line's problem.
    pub fn parse_lenient(text: &str) -> (Grants, Vec<String>) {
        let mut credentials: HashMap<CredentialId, Granted> = HashMap::new();
        let mut poisoned: HashSet<CredentialId> = HashSet::new();
        let mut bad_lines = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (credential, namespaces, name, extra) = (parts.next(), parts.next(), parts.next(), parts.next());
            let credential = credential.map(parse_credential);
            let parsed = match (credential.clone(), namespaces, extra) {
                (Some(Ok(id)), Some(namespaces), None) => {
                    let mut granted = Granted::default();
                    namespaces
                        .split(',')
                        .try_for_each(|pattern| match pattern.strip_prefix("admin:") {
                            Some(pattern) => granted.admin.add(pattern),
                            None => granted.grant.add(pattern),
                        })
                        .and_then(|()| name.map(parse_name).transpose())
                        .and_then(|name| {
                            let known = credentials.get(&id).and_then(|known| known.name.as_ref());
                            match (known, name) {
                                (Some(known), Some(name)) if *known != name => {
                                    Err(format!("the credential is already named {known:?}"))
                                }
                                (_, name) => Ok(Granted { name, ..granted }),
                            }
                        })
                        .map(|granted| (id, granted))
                }
                (Some(Err(problem)), _, _) => Err(problem),
                _ => Err("expected `sha256:<hex> [admin:]<namespace>[,…] [name=<name>]`".into()),
            };
            match parsed {
                Ok((id, granted)) => {
                    let merged = credentials.entry(id).or_default();
                    merged.grant.merge(granted.grant);
                    merged.admin.merge(granted.admin);
                    merged.name = merged.name.take().or(granted.name);
                }
                Err(problem) => {
                    bad_lines.push(format!("line {}: {problem}", index + 1));
                    if let Some(Ok(id)) = credential {
                        poisoned.insert(id);
                    }
                }
            }
        }
        let mut grants = Grants::default();
        for (id, granted) in credentials {
            if poisoned.contains(&id) {
                continue;
            }
            let Granted { grant, admin, name } = granted;
            match id {
                CredentialId::Token(hash) => {
                    let name = name.unwrap_or_else(|| format!("sha256:{}", &hex::encode(hash)[..12]));
                    grants.by_token_hash.insert(hash, Principal::new(grant, admin, name));
                }
                CredentialId::Subject(subject) => {
                    let name = name.unwrap_or_else(|| format!("subject:{subject}"));
                    grants.by_subject.insert(subject, Principal::new(grant, admin, name));
                }
            }
        }
        (grants, bad_lines)
    }

    /// Every credential of the file.
    pub fn principals(&self) -> impl Iterator<Item = Principal> + '_ {
        self.by_token_hash.values().chain(self.by_subject.values()).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_token_hash.len() + self.by_subject.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The caller of one request: the namespaces it may use and the name its
/// limits are counted under; put in the request's extensions by the
/// interceptor.
#[derive(Debug, Clone)]
pub struct Principal(Arc<Credential>);

impl Principal {
    fn new(grant: NamespaceGrant, admin: NamespaceGrant, name: String) -> Self {
        Principal(Arc::new(Credential { grant, admin, name: name.into() }))
    }

    /// The Idempotency service on this namespace.
    pub fn check(&self, namespace: &Namespace) -> Result<()> {
        if self.0.grant.allows(namespace.as_str()) { Ok(()) } else { Err(Error::NamespaceDenied) }
    }

    /// The Admin service on this namespace.
    pub fn check_admin(&self, namespace: &Namespace) -> Result<()> {
        if self.0.admin.allows(namespace.as_str()) { Ok(()) } else { Err(Error::NamespaceDenied) }
    }

    /// Lookup: granted by either kind of entry.
    pub fn check_lookup(&self, namespace: &Namespace) -> Result<()> {
        self.check(namespace).or_else(|_| self.check_admin(namespace))
    }

    /// `sha256:<first 12 hex digits of the token's hash>` or
    /// `subject:<certificate subject>`: never the token.
    pub fn name(&self) -> &str {
        &self.0.name
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
    /// Digest of the content last read, whether or not it was accepted.
    seen: RwLock<Option<[u8; 32]>>,
    /// The grants in force are exactly what the file on disk says.
    in_force: AtomicBool,
    /// Bad lines in the file last read.
    bad_lines: AtomicUsize,
}

/// The file's content and its digest, or why it cannot be read.
fn read_file(path: &Path) -> std::result::Result<(String, [u8; 32]), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let digest = Sha256::digest(text.as_bytes()).into();
    Ok((text, digest))
}

fn digest_of(path: &Path) -> Option<[u8; 32]> {
    read_file(path).ok().map(|(_, digest)| digest)
}

impl Authenticator {
    /// Loads the tokens file; at start-up any bad line is an error.
    pub fn load(path: &Path) -> anyhow::Result<Arc<Self>> {
        let invalid =
            |e: String| anyhow::anyhow!("invalid --auth-tokens-file {} (IDEMD_AUTH_TOKENS_FILE): {e}", path.display());
        let (text, digest) = read_file(path).map_err(invalid)?;
        let grants = Grants::parse(&text).map_err(invalid)?;
        if grants.is_empty() {
            return Err(invalid("no grants in the file".into()));
        }
        tracing::info!(path = %path.display(), credentials = grants.len(), "auth tokens loaded");
        Ok(Arc::new(Authenticator {
            path: path.to_path_buf(),
            grants: RwLock::new(Arc::new(grants)),
            seen: RwLock::new(Some(digest)),
            in_force: AtomicBool::new(true),
            bad_lines: AtomicUsize::new(0),
        }))
    }

    fn current(&self) -> Arc<Grants> {
        // A poisoned lock still holds a complete Arc: the swap is one store.
        Arc::clone(&self.grants.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Whether the grants in force are exactly the file on disk.
    pub fn file_in_force(&self) -> bool {
        self.in_force.load(Ordering::Relaxed)
    }

    /// Bad lines in the file last read.
    pub fn bad_lines(&self) -> usize {
        self.bad_lines.load(Ordering::Relaxed)
    }

    /// Re-reads the file (see the module comment for what a bad line does).
    /// True when its grants are now in force, bad lines left out.
    pub fn reload(&self) -> bool {
        let read = read_file(&self.path);
        let mut seen = self.seen.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *seen = read.as_ref().ok().map(|(_, digest)| *digest);
        drop(seen);
        let path = self.path.display();
        let text = match read {
            Ok((text, _)) => text,
            Err(error) => {
                self.in_force.store(false, Ordering::Relaxed);
                tracing::error!(%path, %error, "auth tokens file unreadable; the previous grants stay in force");
                return false;
            }
        };
        let (grants, bad_lines) = Grants::parse_lenient(&text);
        self.bad_lines.store(bad_lines.len(), Ordering::Relaxed);
        if grants.is_empty() {
            self.in_force.store(false, Ordering::Relaxed);
            tracing::error!(%path, ?bad_lines, "auth tokens file holds no grant; the previous grants stay in force");
            return false;
        }
        for problem in &bad_lines {
            tracing::error!(%path, line = %problem, "auth tokens file: bad line left out (its credential's grants revoked)");
        }
        tracing::info!(%path, credentials = grants.len(), bad_lines = bad_lines.len(), "auth tokens reloaded");
        *self.grants.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(grants);
        self.in_force.store(bad_lines.is_empty(), Ordering::Relaxed);
        true
    }

    /// Reloads on SIGHUP and whenever the file's content changes.
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
                        let seen = *this.seen.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                        if digest_of(&this.path) != seen {
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
            return grants.by_token_hash.get(&token_hash(token)).cloned().ok_or(Error::Unauthenticated);
        }
        let mut matched = subjects.iter().filter_map(|subject| grants.by_subject.get(subject));
        let first = matched.next().ok_or(Error::Unauthenticated)?;
        let rest: Vec<_> = matched.collect();
        if rest.is_empty() {
            return Ok(first.clone());
        }
        // A certificate naming several granted subjects gets their union,
        // counted under their names together.
        let mut union = first.0.grant.clone();
        let mut admin = first.0.admin.clone();
        let mut name = first.name().to_string();
        for principal in rest {
            union.merge(principal.0.grant.clone());
            admin.merge(principal.0.admin.clone());
            name.push('+');
            name.push_str(principal.name());
        }
        Ok(Principal::new(union, admin, name))
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
        if let Some(authenticator) = &self.0 {
            let subjects = request.peer_certs().map(|certs| subjects_of(&certs)).unwrap_or_default();
            let principal = authenticator.authenticate(request.metadata(), &subjects)?;
            request.extensions_mut().insert(principal);
        }
        // The connection carried a call that may use the service: it keeps
        // its slot before connections that never did (crate::connections).
        if let Some(connection) = request.extensions().get::<ConnectionHandle>() {
            connection.0.mark_authenticated();
        }
        Ok(request)
    }
}

/// `idemd token`: a new random token (256 bits) and its line for the file.
pub fn new_token(grants: &[String]) -> std::result::Result<(String, String), String> {
    let mut grant = NamespaceGrant::default();
    for pattern in grants {
        grant.add(pattern.strip_prefix("admin:").unwrap_or(pattern))?;
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
        let principal = grants.by_token_hash.get(&token_hash(&token)).expect("grant");
        let allows = |namespace: &str| principal.0.grant.allows(namespace);
        assert!(allows("payments") && allows("tenant-a.eu") && allows("tenant-a.eu.x"));
        assert!(!allows("tenant-ab") && !allows("refunds"));
        assert!(!allows("tenant-a.") && !allows("tenant-a..x") && !allows("tenant-a.x."), "empty segments");
        assert!(!line.contains(&token), "the file never holds the token");
        assert!(principal.name().starts_with("sha256:") && principal.name().len() == 19, "{}", principal.name());
        assert!(!token.contains(&principal.name()[7..]), "the name is of the hash, not of the token");
        assert!(principal.check(&ns("payments")).is_ok());
        assert!(matches!(principal.check(&ns("refunds")), Err(Error::NamespaceDenied)));
    }

    #[test]
    fn a_bad_line_grants_nothing_and_revokes_its_credential() {
        let (keep, keep_line) = new_token(&["payments".into()]).expect("token");
        let (narrowed, narrowed_line) = new_token(&["refunds".into()]).expect("token");
        let narrowed_hash = narrowed_line.split_whitespace().next().expect("credential");
        let text = format!(
            "{keep_line}\n{narrowed_line}\n{narrowed_hash} Not_A_Namespace\nsha256:zz payments\nsubject:svc payments\n"
        );
        assert!(Grants::parse(&text).expect_err("strict").contains("line 3"));
        let (grants, bad_lines) = Grants::parse_lenient(&text);
        assert_eq!(bad_lines.len(), 2, "{bad_lines:?}");
        assert!(grants.by_token_hash.contains_key(&token_hash(&keep)), "unrelated lines stay in force");
        assert!(!grants.by_token_hash.contains_key(&token_hash(&narrowed)), "its credential is revoked");
        assert!(grants.by_subject.contains_key("svc"));
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
