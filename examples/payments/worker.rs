//! `payments worker`: the Rust worker of the demo with several languages
//! (its protocol is in `polyglot.rs`). It charges its share of the payments
//! through the HTTP provider with `run_once`, and exits between charging
//! and completing when the provider says so.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use idemd_client::{Attempt, Client, Failure, Policy, Response, entity_key, fingerprint};
use rand::Rng;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set (the worker runs under examples/payments/run)"))
}

/// An HTTP/1.1 exchange on a fresh connection: (status, headers, body).
/// Headers are lowercase `name: value` lines.
async fn http(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String, String)> {
    let authority = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = TcpStream::connect(authority).await?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n");
    for (name, value) in headers {
        request += &format!("{name}: {value}\r\n");
    }
    request += &format!("content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).ok_or_else(bad)?;
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
}

fn stored(code: i32, body: String) -> Response {
    Response { body: body.into_bytes(), code, content_type: "application/json".into() }
}

/// The charge: what the provider's answer means for idemd.
async fn charge(provider: &str, worker: &str, payment: u64, attempt: Attempt) -> Result<Response, Failure<String>> {
    let body = format!(r#"{{"payment":"pay-{payment}","amount":"{}","currency":"EUR"}}"#, 1000 + 7 * payment);
    let headers = [("idempotency-key", attempt.downstream_key.as_str()), ("demo-worker", worker)];
    match http(provider, "POST", "/v1/charges", &headers, &body).await {
        Ok((201, head, body)) => {
            if head.contains("\r\ndemo-crash: now") {
                // Charged, and the process dies before telling idemd.
                std::process::exit(3);
            }
            Ok(stored(201, body))
        }
        Ok((402, _, body)) => Err(Failure::Final(stored(402, body))),
        Ok((504, _, _)) => Err(Failure::OutcomeUnknown("the provider's answer was lost".into())),
        Ok((status, _, _)) => Err(Failure::Retryable(format!("the provider answered {status}"))),
        // The request may have left: whether it charged is unknown.
        Err(error) => Err(Failure::OutcomeUnknown(error.to_string())),
    }
}

/// The reconcile hook: what the provider holds for the downstream key.
async fn find(provider: &str, attempt: Attempt) -> Result<Option<Response>, String> {
    let path = format!("/v1/charges?idempotency_key={}", attempt.downstream_key);
    match http(provider, "GET", &path, &[], "").await {
        Ok((200, _, body)) => Ok(Some(stored(201, body))),
        Ok((402, _, body)) => Ok(Some(stored(402, body))),
        Ok((404, _, _)) => Ok(None),
        Ok((status, _, _)) => Err(format!("the lookup answered {status}")),
        Err(error) => Err(error.to_string()),
    }
}

pub async fn run() {
    let (provider, worker, reconcile) = (env("PROVIDER_URL"), env("WORKER"), env("RECONCILE") == "on");
    let payments: Vec<u64> = env("PAYMENTS").split(',').filter_map(|p| p.parse().ok()).collect();
    let concurrency = env("CONCURRENCY").parse().unwrap_or(8);
    let policy = Policy {
        lease_ttl: Duration::from_secs(1),
        wait: Duration::from_millis(500),
        in_progress_budget: Duration::from_secs(2),
        ..Policy::default()
    };
    let client = match Client::connect_lazy(&env("IDEMD_ADDR"), env("NAMESPACE"), policy) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("IDEMD_ADDR, NAMESPACE: {error}");
            std::process::exit(2);
        }
    };
    // The first call opens the connection: done before the race; its
    // failure is no matter.
    let warm_up = format!("warm-up-{}", rand::rng().random::<u64>());
    let _ = client.run_once(&warm_up, b"", |_| async { Ok::<_, Failure<String>>(stored(200, String::new())) }).await;
    println!("ready");
    let mut go = String::new();
    let _ = BufReader::new(tokio::io::stdin()).read_line(&mut go).await;

    let counts = [AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0)];
    futures::stream::iter(payments)
        .for_each_concurrent(concurrency, |payment| {
            let (client, provider, worker, counts) = (&client, &provider, &worker, &counts);
            async move {
                let id = format!("pay-{payment}");
                let key = entity_key(&id, "charge");
                let amount = (1000 + 7 * payment).to_string();
                let fp =
                    fingerprint(&[("payment", id.as_bytes()), ("amount", amount.as_bytes()), ("currency", b"EUR")]);
                for _ in 0..60 {
                    let operation = |attempt| charge(provider, worker, payment, attempt);
                    let result = if reconcile {
                        client.run_once_with_reconcile(&key, &fp, |attempt| find(provider, attempt), operation).await
                    } else {
                        client.run_once(&key, &fp, operation).await
                    };
                    if let Ok(done) = result {
                        let (how, index) = match (done.replayed, done.reconciled) {
                            (true, _) => ("replayed", 1),
                            (_, true) => ("reconciled", 2),
                            _ => ("completed", 0),
                        };
                        counts[index].fetch_add(1, Ordering::SeqCst);
                        let body = String::from_utf8_lossy(&done.response.body).into_owned();
                        println!("result {id} {how} {} {body}", done.response.code);
                        return;
                    }
                    let pause = rand::rng().random_range(20..200);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                counts[3].fetch_add(1, Ordering::SeqCst);
            }
        })
        .await;
    let [completed, replayed, reconciled, unfinished] = counts.map(|count| count.into_inner());
    println!("summary completed={completed} replayed={replayed} reconciled={reconciled} unfinished={unfinished}");
}
