//! The operator's command line, run as the real binary against a test
//! server: `idemd lookup` and every `idemd admin` subcommand, as text and as
//! JSON, with a token, over TLS and mTLS, and paging through more records
//! than one page holds.

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;

use idemd::pb;
use serde_json::Value;

use crate::helpers::*;
use crate::security::{Ca, authed, tls_app, write};

/// What one run of the binary printed, and how it ended.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(self) -> String {
        assert_eq!(self.code, Some(0), "stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self.stdout
    }

    /// The stderr of a run that failed with exit status 1.
    #[track_caller]
    fn fails(self) -> String {
        assert_eq!(self.code, Some(1), "stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        assert!(self.stderr.starts_with("error: "), "{}", self.stderr);
        self.stderr
    }

    #[track_caller]
    fn json_lines(self) -> Vec<Value> {
        self.ok().lines().map(|line| serde_json::from_str(line).expect("one JSON object per line")).collect()
    }

    #[track_caller]
    fn json(self) -> Value {
        serde_json::from_str(&self.ok()).expect("one JSON object")
    }
}

/// Runs `idemd <args>` with only the environment given here.
async fn idemd_with_env(args: &[&str], envs: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_idemd"));
    command.args(args).env_remove("IDEMD_ADDR").env_remove("IDEMD_TOKEN").stdin(Stdio::null());
    for (name, value) in envs {
        command.env(name, value);
    }
    let output = command.output().await.expect("run idemd");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("utf-8 stderr"),
    }
}

/// Runs `idemd <args> --addr <the app>`.
async fn idemd(app: &TestApp, args: &[&str]) -> Run {
    let addr = format!("http://{}", app.addr);
    let mut all = args.to_vec();
    all.extend(["--addr", &addr]);
    idemd_with_env(&all, &[]).await
}

async fn abort(app: &TestApp, key: &str, token: &str, outcome_unknown: bool) {
    let request = pb::AbortRequest {
        namespace: NS.into(),
        key: key.into(),
        lease_token: token.into(),
        reason: "provider timeout".into(),
        outcome_unknown,
    };
    app.client.clone().abort(request).await.expect("abort");
}

fn keys(records: &[Value]) -> Vec<&str> {
    records.iter().map(|record| record["key"].as_str().expect("key")).collect()
}

/// The table's rows (the header dropped), each cut into its cells.
fn rows(table: &str) -> Vec<Vec<&str>> {
    let mut lines = table.lines();
    let header = lines.next().expect("a header");
    assert!(header.starts_with("KEY "), "{table}");
    lines.map(|line| line.split("  ").map(str::trim).filter(|cell| !cell.is_empty()).collect()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_prints_a_record_as_text_and_as_json() {
    let app = spawn_app(Backend::Sqlite).await;
    let lease = app.acquire(begin_req("order-42")).await;
    app.complete("order-42", &lease.lease_token, br#"{"charge":"ch_1"}"#).await.expect("complete");

    let text = idemd(&app, &["lookup", "--namespace", NS, "--key", "order-42"]).await.ok();
    for line in ["key               order-42", "state             completed", "attempt           1"] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
    assert!(text.contains(r#"response          {"charge":"ch_1"}"#), "{text}");
    assert!(text.contains(&format!("downstream_key    {}", lease.downstream_key)), "{text}");

    let json = idemd(&app, &["lookup", "--namespace", NS, "--key", "order-42", "--json"]).await.json();
    assert_eq!(json["state"], "STATE_COMPLETED");
    assert_eq!(json["response_text"], r#"{"charge":"ch_1"}"#);
    assert_eq!(json["response_code"], 200);
    assert_eq!(json["downstream_key"], lease.downstream_key.as_str());
    assert_eq!(json["outcome_unknown"], false);
    assert_eq!(json["fingerprint_hex"], hex::encode(b"fp-1"));
    assert!(json.get("lease_token").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_show_code_reason_and_message_on_stderr() {
    let app = spawn_app(Backend::Sqlite).await;
    let run = idemd(&app, &["lookup", "--namespace", NS, "--key", "missing"]).await;
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    let stderr = run.fails();
    assert!(stderr.starts_with("error: NOT_FOUND / NOT_FOUND: "), "{stderr}");

    let stderr = idemd(&app, &["lookup", "--namespace", "Bad!", "--key", "k"]).await.fails();
    assert!(
        stderr.starts_with("error: INVALID_ARGUMENT / INVALID_FIELD: ") && stderr.contains("namespace"),
        "{stderr}"
    );

    let bad_usage = idemd(&app, &["admin", "list", "--namespace", NS, "--page-size", "5000"]).await;
    assert_eq!(bad_usage.code, Some(2), "{}", bad_usage.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_named() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let addr = format!("http://{closed}");
    let stderr = idemd_with_env(&["lookup", "--namespace", NS, "--key", "k"], &[("IDEMD_ADDR", &addr)]).await.fails();
    assert!(stderr.contains(&format!("cannot connect to {addr}")), "{stderr}");
    let stderr = idemd_with_env(&["admin", "list", "--namespace", NS, "--addr", &addr], &[]).await.fails();
    assert!(stderr.contains(&format!("cannot connect to {addr}")), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_every_record_once() {
    let app = spawn_app(Backend::Sqlite).await;
    let mut created = HashSet::new();
    for i in 0..250 {
        let key = format!("order-{i:03}");
        app.acquire(begin_req(&key)).await;
        created.insert(key);
    }

    let lines = idemd(&app, &["admin", "list", "--namespace", NS, "--page-size", "100", "--json"]).await.json_lines();
    assert_eq!(lines.len(), 250);
    let listed: HashSet<String> = keys(&lines).into_iter().map(str::to_string).collect();
    assert_eq!(listed, created, "every record exactly once");
    let updated: Vec<&str> = lines.iter().map(|r| r["updated_at"].as_str().expect("updated_at")).collect();
    assert!(updated.windows(2).all(|w| w[0] >= w[1]), "newest first");
    assert!(lines.iter().all(|r| r["state"] == "STATE_IN_PROGRESS" && r["response_base64"].is_null()));

    let run = idemd(&app, &["admin", "list", "--namespace", NS, "--page-size", "100"]).await;
    assert_eq!(run.stderr, "250 records\n");
    let table = run.ok();
    assert_eq!(table.lines().filter(|line| line.starts_with("KEY ")).count(), 1, "one header");
    let all = rows(&table);
    assert_eq!(all.len(), 250);
    assert_eq!(all.iter().map(|row| row[0].to_string()).collect::<HashSet<_>>(), created);
    assert!(all.iter().all(|row| row[1] == "in_progress" && row[2] == "1"), "{table}");

    let run = idemd(&app, &["admin", "list", "--namespace", NS, "--page-size", "100", "--limit", "120"]).await;
    assert_eq!(run.stderr, "120 records (--limit reached; more match)\n");
    assert_eq!(rows(&run.ok()).len(), 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_finds_the_outcome_unknown_aborts_of_the_last_hour() {
    let app = spawn_app(Backend::Sqlite).await;
    let done = app.acquire(begin_req("done")).await;
    app.complete("done", &done.lease_token, b"ok").await.expect("complete");
    let known = app.acquire(begin_req("declined-before-sending")).await;
    abort(&app, "declined-before-sending", &known.lease_token, false).await;
    let unknown = app.acquire(begin_req("timed-out")).await;
    abort(&app, "timed-out", &unknown.lease_token, true).await;
    app.acquire(begin_req("running")).await;

    let on_call = ["admin", "list", "--namespace", NS, "--state", "aborted", "--outcome-unknown", "--since", "1h"];
    let lines = idemd(&app, &[&on_call[..], &["--json"]].concat()).await.json_lines();
    assert_eq!(keys(&lines), ["timed-out"]);
    assert_eq!(lines[0]["state"], "STATE_ABORTED");
    assert_eq!(lines[0]["aborted_by"], "ABORTED_BY_CALLER");
    assert_eq!(lines[0]["abort_reason"], "provider timeout");
    assert_eq!(lines[0]["outcome_unknown"], true);
    assert_eq!(lines[0]["downstream_key"], unknown.downstream_key.as_str());
    let table = idemd(&app, &on_call).await.ok();
    let found = rows(&table);
    assert_eq!(found.len(), 1, "{table}");
    assert_eq!(found[0][..6], ["timed-out", "aborted", "1", "yes", "caller", "provider timeout"], "{table}");
    assert_eq!(found[0][7], unknown.downstream_key);

    let list = |extra: &'static [&'static str]| {
        let app = &app;
        async move {
            let args = [&["admin", "list", "--namespace", NS, "--json"][..], extra].concat();
            let mut keys: Vec<String> =
                idemd(app, &args).await.json_lines().iter().map(|r| r["key"].as_str().expect("key").into()).collect();
            keys.sort();
            keys
        }
    };
    assert_eq!(list(&["--state", "aborted"]).await, ["declined-before-sending", "timed-out"]);
    assert_eq!(list(&["--state", "in_progress"]).await, ["running"]);
    assert_eq!(list(&["--state", "completed"]).await, ["done"]);
    assert_eq!(list(&["--key-prefix", "d"]).await, ["declined-before-sending", "done"]);
    assert_eq!(list(&[]).await.len(), 4);
    assert!(list(&["--before", "2000-01-01T00:00:00Z"]).await.is_empty());
    assert_eq!(list(&["--after", "2000-01-01T00:00:00Z"]).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lists_a_keys_events_oldest_first() {
    let app = spawn_app(Backend::Sqlite).await;
    let first = app.acquire(begin_req("order-7")).await;
    abort(&app, "order-7", &first.lease_token, true).await;
    let second = app.acquire(begin_req("order-7")).await;
    app.complete("order-7", &second.lease_token, b"charged").await.expect("complete");

    let events = idemd(&app, &["admin", "history", "--namespace", NS, "--key", "order-7", "--json"]).await.json_lines();
    let kinds: Vec<(&str, u64)> =
        events.iter().map(|e| (e["kind"].as_str().expect("kind"), e["attempt"].as_u64().expect("attempt"))).collect();
    assert_eq!(
        kinds,
        [
            ("EVENT_KIND_ACQUIRED", 1),
            ("EVENT_KIND_ABORTED", 1),
            ("EVENT_KIND_ACQUIRED", 2),
            ("EVENT_KIND_COMPLETED", 2)
        ]
    );
    assert_eq!(events[1]["reason"], "provider timeout");
    assert_eq!(events[1]["outcome_unknown"], true);
    assert_eq!(events[3]["response_code"], 200);
    assert!(events.iter().all(|e| e["principal"] == ""), "auth is off");

    let table = idemd(&app, &["admin", "history", "--namespace", NS, "--key", "order-7"]).await.ok();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    assert!(lines[0].starts_with("AT ") && lines[0].contains("KIND") && lines[0].ends_with("REASON"), "{table}");
    for (line, kind) in lines[1..].iter().zip(["acquired", "aborted", "acquired", "completed"]) {
        assert_eq!(line.split_whitespace().nth(1), Some(kind), "{table}");
    }
    assert!(lines[2].contains("yes") && lines[2].ends_with("provider timeout"), "{table}");
    assert!(lines[4].contains(" 200 "), "{table}");

    let stderr = idemd(&app, &["admin", "history", "--namespace", NS, "--key", "never-seen"]).await.fails();
    assert!(stderr.starts_with("error: NOT_FOUND / NOT_FOUND: "), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_then_resolve_a_stuck_attempt() {
    let app = spawn_app(Backend::Sqlite).await;
    let stuck = app.acquire(begin_req("stuck")).await;
    let release = ["admin", "release", "--namespace", NS, "--key", "stuck", "--reason", "worker hung"];

    let stderr = idemd(&app, &[&release[..], &["--attempt", "2", "--outcome-unknown", "true"]].concat()).await.fails();
    assert!(stderr.starts_with("error: FAILED_PRECONDITION / ATTEMPT_MISMATCH: "), "{stderr}");

    let text = idemd(&app, &[&release[..], &["--attempt", "1", "--outcome-unknown", "true"]].concat()).await.ok();
    for line in [
        "state             aborted",
        "aborted_by        operator",
        "outcome_unknown   yes",
        "abort_reason      worker hung",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
    let status = app.complete("stuck", &stuck.lease_token, b"late").await.expect_err("released");
    assert_error(&status, tonic::Code::FailedPrecondition, "LEASE_LOST");
    let stderr = idemd(&app, &[&release[..], &["--attempt", "1", "--outcome-unknown", "true"]].concat()).await.fails();
    assert!(stderr.starts_with("error: FAILED_PRECONDITION / NOT_IN_PROGRESS: "), "{stderr}");

    let resolve = [
        "admin",
        "resolve",
        "--namespace",
        NS,
        "--key",
        "stuck",
        "--attempt",
        "1",
        "--reason",
        "charge ch_9 found at the provider",
        "--response-code",
        "201",
        "--content-type",
        "application/json",
    ];
    let text = idemd(&app, &[&resolve[..], &["--response", r#"{"charge":"ch_9"}"#]].concat()).await.ok();
    for line in ["state             completed", "response_code     201", r#"response          {"charge":"ch_9"}"#] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
    let replay = app.begin(begin_req("stuck")).await.expect("begin");
    assert!(matches!(replay, pb::begin_response::Outcome::Completed(_)), "{replay:?}");
    let stderr = idemd(&app, &[&resolve[..], &["--response", "again"]].concat()).await.fails();
    assert!(stderr.starts_with("error: FAILED_PRECONDITION / ALREADY_COMPLETED: "), "{stderr}");

    let events = idemd(&app, &["admin", "history", "--namespace", NS, "--key", "stuck", "--json"]).await.json_lines();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().expect("kind")).collect();
    assert_eq!(kinds, ["EVENT_KIND_ACQUIRED", "EVENT_KIND_RELEASED", "EVENT_KIND_RESOLVED"]);
    assert_eq!(events[1]["reason"], "worker hung");
    assert_eq!(events[2]["reason"], "charge ch_9 found at the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_resolve_print_json_and_read_the_response_from_a_file() {
    let app = spawn_app(Backend::Sqlite).await;
    let held = app.acquire(begin_req("held")).await;

    let resolve = |body: &Path| {
        let body = body.display().to_string();
        let app = &app;
        async move {
            let args = ["admin", "resolve", "--json", "--namespace", NS, "--key", "held", "--attempt", "1"];
            let rest = ["--reason", "reconciled", "--response-code", "200", "--response-file", &body];
            idemd(app, &[&args[..], &rest[..]].concat()).await
        }
    };
    let dir = tempfile::tempdir().expect("dir");
    let body = write(dir.path(), "body.bin", "charged \u{2713}");
    let stderr = resolve(&body).await.fails();
    assert!(stderr.starts_with("error: FAILED_PRECONDITION / LEASE_LIVE: "), "{stderr}");

    let release = ["admin", "release", "--namespace", NS, "--key", "held", "--attempt", "1", "--reason", "stuck"];
    let json = idemd(&app, &[&release[..], &["--outcome-unknown", "false", "--json"]].concat()).await.json();
    assert_eq!(json["state"], "STATE_ABORTED");
    assert_eq!(json["aborted_by"], "ABORTED_BY_OPERATOR");
    assert_eq!(json["outcome_unknown"], false);
    assert_eq!(json["downstream_key"], held.downstream_key.as_str());

    let json = resolve(&body).await.json();
    assert_eq!(json["state"], "STATE_COMPLETED");
    assert_eq!(json["response_text"], "charged \u{2713}");
    assert_eq!(json["response_code"], 200);

    let stderr = resolve(&dir.path().join("missing")).await;
    assert_eq!(stderr.code, Some(2), "{}", stderr.stderr);
    assert!(stderr.stderr.contains("--response-file"), "{}", stderr.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_removes_a_record_and_says_so() {
    let app = spawn_app(Backend::Sqlite).await;
    for key in ["test-order", "test-order-2"] {
        let lease = app.acquire(begin_req(key)).await;
        app.complete(key, &lease.lease_token, b"ok").await.expect("complete");
    }
    let invalidate = |key: &'static str, json: bool| {
        let app = &app;
        async move {
            let mut args = vec!["admin", "invalidate", "--namespace", NS, "--key", key, "--reason", "test data"];
            if json {
                args.push("--json");
            }
            idemd(app, &args).await
        }
    };
    assert_eq!(invalidate("test-order", false).await.ok(), "invalidated payments/test-order\n");
    let json = invalidate("test-order-2", true).await.json();
    assert_eq!(json, serde_json::json!({"namespace": NS, "key": "test-order-2", "invalidated": true}));
    for key in ["test-order", "test-order-2"] {
        let stderr = idemd(&app, &["lookup", "--namespace", NS, "--key", key]).await.fails();
        assert!(stderr.contains("NOT_FOUND"), "{stderr}");
    }
    let stderr = invalidate("test-order", false).await.fails();
    assert!(stderr.starts_with("error: NOT_FOUND / NOT_FOUND: "), "{stderr}");
    let kinds: Vec<String> = idemd(&app, &["admin", "history", "--namespace", NS, "--key", "test-order", "--json"])
        .await
        .json_lines()
        .iter()
        .map(|e| e["kind"].as_str().expect("kind").to_string())
        .collect();
    assert_eq!(kinds.last().map(String::as_str), Some("EVENT_KIND_INVALIDATED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_an_admin_grant_is_sent_from_the_flag_or_the_environment() {
    let dir = tempfile::tempdir().expect("dir");
    let (oncall, line) = idemd::auth::new_token(&["payments".to_string()]).expect("token");
    let hash = line.split_whitespace().next().expect("sha256:<hex>");
    let (caller, caller_line) = idemd::auth::new_token(&["payments".to_string()]).expect("token");
    let tokens = write(dir.path(), "tokens", &format!("{hash} payments,admin:payments name=oncall\n{caller_line}\n"));
    let database_url = format!("sqlite://{}", dir.path().join("idemd.db").display());
    let mut config = test_config(&database_url);
    config.auth_tokens_file = Some(tokens);
    let app = spawn_on(config).await;
    let lease = app.client.clone().begin(authed(begin_req("order-1"), &caller)).await.expect("begin").into_inner();
    assert!(matches!(lease.outcome, Some(pb::begin_response::Outcome::Acquired(_))));

    let list = ["admin", "list", "--namespace", NS, "--json"];
    let stderr = idemd(&app, &list).await.fails();
    assert!(stderr.starts_with("error: UNAUTHENTICATED / UNAUTHENTICATED: "), "{stderr}");
    let stderr = idemd(&app, &[&list[..], &["--token", &caller]].concat()).await.fails();
    assert!(stderr.starts_with("error: PERMISSION_DENIED / NAMESPACE_DENIED: "), "{stderr}");

    let lines = idemd(&app, &[&list[..], &["--token", &oncall]].concat()).await.json_lines();
    assert_eq!(keys(&lines), ["order-1"]);
    let addr = format!("http://{}", app.addr);
    let from_env = [("IDEMD_TOKEN", oncall.as_str()), ("IDEMD_ADDR", addr.as_str())];
    let release = ["admin", "release", "--namespace", NS, "--key", "order-1", "--attempt", "1", "--reason", "stuck"];
    let released = idemd_with_env(&[&release[..], &["--outcome-unknown", "true"]].concat(), &from_env).await.ok();
    assert!(released.contains("aborted_by        operator"), "{released}");
    let lookup = idemd_with_env(&["lookup", "--namespace", NS, "--key", "order-1", "--json"], &from_env).await.json();
    assert_eq!(lookup["outcome_unknown"], true);

    let events =
        idemd_with_env(&["admin", "history", "--namespace", NS, "--key", "order-1", "--json"], &from_env).await;
    let events = events.json_lines();
    assert_eq!(events.last().expect("released")["kind"], "EVENT_KIND_RELEASED");
    assert_eq!(events.last().expect("released")["principal"], "oncall", "the credential's name is the principal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_a_client_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let (server_ca, client_ca) = (Ca::new("server ca"), Ca::new("client ca"));
    // The operator's certificate may use the Admin service (and Lookup); the
    // harness's own client certificate ("probe-client") may call Begin.
    let tokens = write(dir.path(), "tokens", "subject:operator admin:payments\nsubject:probe-client payments\n");
    let app = tls_app(dir.path(), &server_ca, Some(&client_ca), |c| c.auth_tokens_file = Some(tokens)).await;
    let (cert, key) = client_ca.leaf("operator", None);
    let ca_file = write(dir.path(), "server-ca.pem", &server_ca.pem()).display().to_string();
    let cert_file = write(dir.path(), "operator.crt", &cert).display().to_string();
    let key_file = write(dir.path(), "operator.key", &key).display().to_string();
    let addr = app.addr.to_string();
    let tls = ["--addr", &addr, "--tls-ca", &ca_file, "--tls-cert", &cert_file, "--tls-key", &key_file];

    let list = ["admin", "list", "--namespace", NS, "--json"];
    assert!(idemd_with_env(&[&list[..], &tls[..]].concat(), &[]).await.json_lines().is_empty());

    let mut client = pb::idempotency_client::IdempotencyClient::new(app.channel());
    let Some(pb::begin_response::Outcome::Acquired(lease)) =
        client.begin(begin_req("over-tls")).await.expect("begin").into_inner().outcome
    else {
        panic!("acquired");
    };
    client
        .complete(pb::CompleteRequest {
            namespace: NS.into(),
            key: "over-tls".into(),
            lease_token: lease.lease_token,
            response: b"ok".to_vec(),
            response_code: 200,
            content_type: String::new(),
        })
        .await
        .expect("complete");
    let lookup = ["lookup", "--namespace", NS, "--key", "over-tls", "--json"];
    assert_eq!(idemd_with_env(&[&lookup[..], &tls[..]].concat(), &[]).await.json()["response_text"], "ok");
    let history = ["admin", "history", "--namespace", NS, "--key", "over-tls", "--json"];
    let events = idemd_with_env(&[&history[..], &tls[..]].concat(), &[]).await.json_lines();
    assert_eq!(events.len(), 2);

    // Without the client certificate the server does not answer.
    let stderr = idemd_with_env(&[&list[..], &tls[..4]].concat(), &[]).await.fails();
    assert!(stderr.contains(&addr), "{stderr}");
    // Without the server's CA the handshake fails, and says where.
    let other_ca = write(dir.path(), "other-ca.pem", &Ca::new("other ca").pem()).display().to_string();
    let untrusted = ["--addr", &addr, "--tls-ca", &other_ca, "--tls-cert", &cert_file, "--tls-key", &key_file];
    let stderr = idemd_with_env(&[&list[..], &untrusted[..]].concat(), &[]).await.fails();
    assert!(stderr.contains(&format!("https://{addr}")), "{stderr}");
    // Plaintext to a TLS port is refused too.
    let stderr = idemd_with_env(&[&list[..], &["--addr", &format!("http://{addr}")]].concat(), &[]).await.fails();
    assert!(stderr.contains(&addr), "{stderr}");
}
