//! TLS and mTLS, bearer tokens and namespace grants, reloads, and limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use idemd::pb::{self, begin_response::Outcome};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::{Code, Request};

use crate::helpers::*;

/// A test CA and what it signs (the CLI tests use it too).
pub(crate) struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca"))
    }

    pub(crate) fn pem(&self) -> String {
        self.0.pem()
    }

    /// `(cert PEM, key PEM)` for `cn`, valid for localhost and 127.0.0.1.
    pub(crate) fn leaf(&self, cn: &str, uri: Option<&str>) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(uri) = uri {
            params.subject_alt_names.push(SanType::URI(uri.try_into().expect("uri")));
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.0).expect("signed");
        (cert.pem(), key.serialize_pem())
    }
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    // Write then rename: a reader never sees half a file.
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, text).expect("write");
    std::fs::rename(&partial, &path).expect("rename");
    path
}

fn client_tls(ca: &Ca, identity: Option<&(String, String)>) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem())).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    tls
}

/// Begin through a fresh TLS connection: Ok(()) when the call got an answer.
async fn call_over(addr: std::net::SocketAddr, tls: ClientTlsConfig) -> Result<(), tonic::Status> {
    let mut client = pb::idempotency_client::IdempotencyClient::new(test_channel(addr, Some(&tls)));
    let mut request = Request::new(begin_req(&format!("tls-{}", uuid::Uuid::new_v4())));
    request.set_timeout(Duration::from_secs(5));
    client.begin(request).await.map(|_| ())
}

pub(crate) async fn tls_app(
    dir: &Path,
    ca: &Ca,
    client_ca: Option<&Ca>,
    tweak: impl FnOnce(&mut idemd::config::ServeConfig),
) -> TestApp {
    let (cert, key) = ca.leaf("idemd", None);
    let database_url = format!("sqlite://{}", dir.join("idemd.db").display());
    let mut config = test_config(&database_url);
    config.tls_cert = Some(write(dir, "tls.crt", &cert));
    config.tls_key = Some(write(dir, "tls.key", &key));
    let identity = client_ca.map(|client_ca| {
        config.tls_client_ca = Some(write(dir, "client-ca.crt", &client_ca.pem()));
        client_ca.leaf("probe-client", None)
    });
    tweak(&mut config);
    spawn_on_tls(config, Some(client_tls(ca, identity.as_ref()))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_needs_the_right_ca() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("server ca");
    let app = tls_app(dir.path(), &ca, None, |_| {}).await;
    call_over(app.addr, client_tls(&ca, None)).await.expect("trusted CA");
    let status = call_over(app.addr, client_tls(&Ca::new("other ca"), None)).await.expect_err("untrusted");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Plaintext is refused on a TLS port.
    let plain =
        pb::idempotency_client::IdempotencyClient::new(test_channel(app.addr, None)).begin(begin_req("p")).await;
    assert!(plain.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_needs_a_client_certificate_from_the_client_ca() {
    let dir = tempfile::tempdir().expect("dir");
    let (server_ca, client_ca) = (Ca::new("server ca"), Ca::new("client ca"));
    let app = tls_app(dir.path(), &server_ca, Some(&client_ca), |_| {}).await;
    let good = client_ca.leaf("checkout", None);
    call_over(app.addr, client_tls(&server_ca, Some(&good))).await.expect("client cert from the CA");
    call_over(app.addr, client_tls(&server_ca, None)).await.expect_err("no client certificate");
    let stranger = Ca::new("stranger ca").leaf("checkout", None);
    call_over(app.addr, client_tls(&server_ca, Some(&stranger))).await.expect_err("foreign client certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_subject_stands_for_a_token() {
    let dir = tempfile::tempdir().expect("dir");
    let (server_ca, client_ca) = (Ca::new("server ca"), Ca::new("client ca"));
    let tokens = write(
        dir.path(),
        "tokens",
        "subject:probe-client payments,admin:payments\nsubject:spiffe://prod/refunds refunds\n",
    );
    let app = tls_app(dir.path(), &server_ca, Some(&client_ca), |c| c.auth_tokens_file = Some(tokens)).await;
    app.acquire(begin_req("by-cn")).await;
    // A certificate without a name= is its subject in the history.
    let events = app.history("by-cn").await.expect("history");
    assert_eq!(events.iter().map(|e| e.principal.as_str()).collect::<Vec<_>>(), ["subject:probe-client"]);
    let mut refunds = begin_req("k");
    refunds.namespace = "refunds".into();
    assert_error(
        &app.begin(refunds.clone()).await.expect_err("CN not granted refunds"),
        Code::PermissionDenied,
        "NAMESPACE_DENIED",
    );
    let uri_identity = client_ca.leaf("anything", Some("spiffe://prod/refunds"));
    let mut client = pb::idempotency_client::IdempotencyClient::new(test_channel(
        app.addr,
        Some(&client_tls(&server_ca, Some(&uri_identity))),
    ));
    client.begin(refunds).await.expect("granted by the URI SAN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificates_reload_when_their_files_change() {
    let dir = tempfile::tempdir().expect("dir");
    let (old_ca, new_ca) = (Ca::new("old ca"), Ca::new("new ca"));
    let app = tls_app(dir.path(), &old_ca, None, |_| {}).await;
    call_over(app.addr, client_tls(&old_ca, None)).await.expect("old certificate");
    let (cert, key) = new_ca.leaf("idemd", None);
    write(dir.path(), "tls.key", &key);
    write(dir.path(), "tls.crt", &cert);
    eventually("the new certificate is served", Duration::from_secs(15), || async {
        call_over(app.addr, client_tls(&new_ca, None)).await.ok()
    })
    .await;
    call_over(app.addr, client_tls(&old_ca, None)).await.expect_err("the old certificate is gone");
}

pub(crate) fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    request
}

fn token_for(grants: &[&str]) -> (String, String) {
    idemd::auth::new_token(&grants.iter().map(|g| g.to_string()).collect::<Vec<_>>()).expect("token")
}

async fn auth_app(dir: &Path, lines: &[&str]) -> TestApp {
    let tokens = write(dir, "tokens", &lines.join("\n"));
    let database_url = format!("sqlite://{}", dir.join("idemd.db").display());
    let mut config = test_config(&database_url);
    config.auth_tokens_file = Some(tokens);
    spawn_on(config).await
}

fn in_namespace(namespace: &str, key: &str) -> pb::BeginRequest {
    pb::BeginRequest { namespace: namespace.into(), ..begin_req(key) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_matrix() {
    let dir = tempfile::tempdir().expect("dir");
    let (payments, payments_line) = token_for(&["payments"]);
    let (tenants, tenants_line) = token_for(&["tenant-a.*", "refunds"]);
    let app = auth_app(dir.path(), &[&payments_line, "# a comment", "", &tenants_line]).await;
    let mut client = app.client.clone();

    let status = client.begin(begin_req("k")).await.expect_err("no token");
    assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    let status = client.begin(authed(begin_req("k"), "idemd_not-a-token")).await.expect_err("bad token");
    assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    let mut wrong_scheme = Request::new(begin_req("k"));
    wrong_scheme.metadata_mut().insert("authorization", format!("Basic {payments}").parse().expect("ascii"));
    assert_error(&client.begin(wrong_scheme).await.expect_err("not bearer"), Code::Unauthenticated, "UNAUTHENTICATED");

    client.begin(authed(begin_req("k"), &payments)).await.expect("payments token in payments");
    let status = client.begin(authed(in_namespace("refunds", "k"), &payments)).await.expect_err("not granted");
    assert_error(&status, Code::PermissionDenied, "NAMESPACE_DENIED");

    client.begin(authed(in_namespace("tenant-a.eu", "k"), &tenants)).await.expect("prefix grant");
    client.begin(authed(in_namespace("tenant-a.us.east", "k"), &tenants)).await.expect("prefix grant, deeper");
    client.begin(authed(in_namespace("refunds", "k"), &tenants)).await.expect("exact grant");
    for namespace in ["tenant-ab", "tenant-a", "payments"] {
        let status = client.begin(authed(in_namespace(namespace, "k"), &tenants)).await.expect_err(namespace);
        assert_error(&status, Code::PermissionDenied, "NAMESPACE_DENIED");
    }

    // Credentials are checked first, then fields, then the namespace grant.
    let status = client.begin(in_namespace("Bad!", "k")).await.expect_err("no token, bad field");
    assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    let status = client.begin(authed(in_namespace("refunds", ""), &payments)).await.expect_err("bad field");
    assert_invalid_field(&status, "key");

    // Health and reflection need no credentials.
    app.wait_for_readiness(tonic_health::pb::health_check_response::ServingStatus::Serving, Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_namespaces_key_is_denied_alike_whether_it_exists_or_not() {
    let dir = tempfile::tempdir().expect("dir");
    let (owner, owner_line) = token_for(&["payments"]);
    let (intruder, intruder_line) = token_for(&["refunds"]);
    let app = auth_app(dir.path(), &[&owner_line, &intruder_line]).await;
    let mut client = app.client.clone();
    let Some(Outcome::Acquired(lease)) =
        client.begin(authed(begin_req("exists"), &owner)).await.expect("begin").into_inner().outcome
    else {
        panic!("expected acquired");
    };
    let describe = |status: tonic::Status| (status.code(), status.message().to_string(), status.details().to_vec());
    for key in ["exists", "missing"] {
        let lookup = pb::LookupRequest { namespace: NS.into(), key: key.into() };
        let complete = pb::CompleteRequest {
            namespace: NS.into(),
            key: key.into(),
            lease_token: lease.lease_token.clone(),
            ..Default::default()
        };
        let abort = pb::AbortRequest {
            namespace: NS.into(),
            key: key.into(),
            lease_token: lease.lease_token.clone(),
            reason: String::new(),
            outcome_unknown: false,
        };
        let a = describe(client.lookup(authed(lookup, &intruder)).await.expect_err("lookup"));
        let b = describe(client.complete(authed(complete, &intruder)).await.expect_err("complete"));
        let c = describe(client.abort(authed(abort, &intruder)).await.expect_err("abort"));
        for (code, _, _) in [&a, &b, &c] {
            assert_eq!(*code, Code::PermissionDenied);
        }
        if key == "missing" {
            continue;
        }
        // Same answers for the missing key: nothing reveals that "exists" exists.
        let lookup = pb::LookupRequest { namespace: NS.into(), key: "missing".into() };
        assert_eq!(describe(client.lookup(authed(lookup, &intruder)).await.expect_err("lookup")), a);
    }
    // The record is untouched.
    client
        .complete(authed(
            pb::CompleteRequest {
                namespace: NS.into(),
                key: "exists".into(),
                lease_token: lease.lease_token,
                response: b"ok".to_vec(),
                ..Default::default()
            },
            &owner,
        ))
        .await
        .expect("the owner completes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_reload_on_change_and_a_broken_file_keeps_the_old_grants() {
    let dir = tempfile::tempdir().expect("dir");
    let (first, first_line) = token_for(&["payments"]);
    let app = auth_app(dir.path(), &[&first_line]).await;
    let mut client = app.client.clone();
    client.begin(authed(begin_req("a"), &first)).await.expect("first token");

    let (second, second_line) = token_for(&["payments"]);
    write(dir.path(), "tokens", &second_line);
    eventually("the second token works", Duration::from_secs(15), || {
        let mut client = client.clone();
        let second = second.clone();
        async move { client.begin(authed(begin_req("b"), &second)).await.ok() }
    })
    .await;
    let status = client.begin(authed(begin_req("c"), &first)).await.expect_err("revoked");
    assert_error(&status, Code::Unauthenticated, "UNAUTHENTICATED");

    write(dir.path(), "tokens", "this is not a grant\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client.begin(authed(begin_req("d"), &second)).await.expect("a broken file keeps the old grants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_reload_on_sighup_and_the_token_command_makes_them() {
    let dir = tempfile::tempdir().expect("dir");
    let made = |grant: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_idemd"))
            .args(["token", "--grant", grant])
            .output()
            .expect("idemd token");
        assert!(output.status.success());
        let text = String::from_utf8(output.stdout).expect("utf-8");
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[1].starts_with("sha256:") && lines[1].ends_with(grant) && !lines[1].contains(&lines[0]));
        (lines[0].clone(), lines[1].clone())
    };
    let (first, first_line) = made("payments");
    let tokens = write(dir.path(), "tokens", &first_line);
    let mut idemd = Binary::start(&["--auth-tokens-file", &tokens.display().to_string()], &[]);
    let mut client = pb::idempotency_client::IdempotencyClient::connect(idemd.url()).await.expect("connect");
    client.begin(authed(begin_req("a"), &first)).await.expect("first token");

    let (second, second_line) = made("payments");
    // SIGHUP reloads at once, without waiting for the watcher.
    write(dir.path(), "tokens", &format!("{first_line}\n{second_line}"));
    let pid = idemd.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    idemd.wait_for_log("auth tokens reloaded", Duration::from_secs(10));
    client.begin(authed(begin_req("b"), &second)).await.expect("second token after SIGHUP");

    // A broken file is read, rejected, and the grants in force stay.
    write(dir.path(), "tokens", "this is not a grant\n");
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    idemd.wait_for_log("auth tokens file holds no grant", Duration::from_secs(10));
    client.begin(authed(begin_req("c"), &second)).await.expect("the previous grants stay in force");
    assert_eq!(idemd.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_capped_per_namespace_and_overall() {
    let app = spawn_app_with(Backend::Sqlite, |c| {
        c.max_waiters = 3;
        c.max_waiters_per_namespace = 2;
    })
    .await;
    let park = |namespace: &str, key: &str| {
        let mut client = app.client.clone();
        let mut request = in_namespace(namespace, key);
        request.wait_timeout = secs(60);
        tokio::spawn(async move { client.begin(request).await })
    };
    let held = app.acquire(begin_req("held")).await;
    let held_refunds = app.acquire(in_namespace("refunds", "held")).await;
    let first = [park(NS, "held"), park(NS, "held")];
    eventually("two parked", Duration::from_secs(5), || async {
        let samples = scrape(app.metrics_addr).await;
        (samples.get("idemd_waiters") == Some(&2.0)).then_some(())
    })
    .await;
    // One past the namespace's limit.
    let mut request = begin_req("held");
    request.wait_timeout = secs(60);
    assert_error(
        &app.begin(request).await.expect_err("third in payments"),
        Code::ResourceExhausted,
        "TOO_MANY_WAITERS",
    );
    // Another namespace still has room, up to the overall limit of 3.
    let third = park("refunds", "held");
    eventually("three parked", Duration::from_secs(5), || async {
        (scrape(app.metrics_addr).await.get("idemd_waiters") == Some(&3.0)).then_some(())
    })
    .await;
    app.acquire(in_namespace("other", "held")).await;
    let mut request = in_namespace("other", "held");
    request.wait_timeout = secs(60);
    assert_error(&app.begin(request).await.expect_err("fourth overall"), Code::ResourceExhausted, "TOO_MANY_WAITERS");
    // Not waiting needs no slot.
    assert!(matches!(app.begin(begin_req("held")).await.expect("no wait"), Outcome::InProgress(_)));
    // Completing the held keys answers the parked waiters at once.
    app.complete("held", &held.lease_token, b"ok").await.expect("complete");
    let mut client = app.client.clone();
    client
        .complete(pb::CompleteRequest {
            namespace: "refunds".into(),
            key: "held".into(),
            lease_token: held_refunds.lease_token,
            ..Default::default()
        })
        .await
        .expect("complete");
    for waiter in first.into_iter().chain([third]) {
        let outcome = waiter.await.expect("task").expect("answered").into_inner().outcome;
        assert!(matches!(outcome, Some(Outcome::Completed(_))), "{outcome:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_caller_hangs_up_gives_its_slot_back() {
    // Otherwise every abandoned wait would leak a slot until Begins with
    // wait_timeout were refused for good.
    let app = spawn_app_with(Backend::Sqlite, |c| {
        c.max_waiters = 1;
        c.max_waiters_per_namespace = 1;
    })
    .await;
    let waiters = || async { scrape(app.metrics_addr).await.get("idemd_waiters").copied() };
    let park = || {
        let mut client = app.client.clone();
        let mut request = begin_req("held");
        request.wait_timeout = secs(60);
        tokio::spawn(async move { client.begin(request).await })
    };
    let held = app.acquire(begin_req("held")).await;
    let abandoned = park();
    eventually("one parked", Duration::from_secs(5), || async { (waiters().await == Some(1.0)).then_some(()) }).await;
    // Dropping the call resets its HTTP/2 stream, as a caller's timeout or crash does.
    abandoned.abort();
    eventually("the slot given back", Duration::from_secs(5), || async {
        (waiters().await == Some(0.0)).then_some(())
    })
    .await;
    let next = park();
    eventually("the next one parked", Duration::from_secs(5), || async {
        (waiters().await == Some(1.0)).then_some(())
    })
    .await;
    app.complete("held", &held.lease_token, b"ok").await.expect("complete");
    let outcome = next.await.expect("task").expect("answered").into_inner().outcome;
    assert!(matches!(outcome, Some(Outcome::Completed(_))), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_is_limited_per_namespace() {
    // One a second: the boundary holds however slow this machine is.
    let app = spawn_app_with(Backend::Sqlite, |c| c.rate_limit_per_namespace = 1).await;
    app.begin(begin_req("k0")).await.expect("within the burst");
    assert_error(&app.begin(begin_req("k1")).await.expect_err("one past"), Code::ResourceExhausted, "RATE_LIMITED");
    app.begin(in_namespace("refunds", "k")).await.expect("another namespace has its own budget");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.begin(begin_req("k2")).await.expect("refilled");
}
