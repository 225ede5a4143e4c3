//! `idemd admin list`: the filters an operator types during an incident
//! (`--state aborted --outcome-unknown --since 1h`), turned into a
//! ListRecords request, and the paging that prints each page as it arrives
//! so that a listing of any size holds one page in memory.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};

use super::error::CliError;
use super::render;
use crate::pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    #[value(name = "in_progress", alias = "in-progress")]
    InProgress,
    Completed,
    Aborted,
}

impl StateArg {
    fn to_pb(self) -> pb::State {
        match self {
            StateArg::InProgress => pb::State::InProgress,
            StateArg::Completed => pb::State::Completed,
            StateArg::Aborted => pb::State::Aborted,
        }
    }
}

fn rfc3339(value: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{e} (write instants like 2026-11-03T10:15:00Z)"))
}

/// Page through a namespace's live records, the most recently changed first.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// The namespace to list (an admin grant on it is needed with auth).
    #[arg(long)]
    pub namespace: String,
    /// Only records in this state.
    #[arg(long, value_enum)]
    pub state: Option<StateArg>,
    /// Only aborted records whose attempt may have taken effect (its lease
    /// expired, or Abort or Release said so): reconcile these with the provider.
    #[arg(long)]
    pub outcome_unknown: bool,
    /// Only records changed within this long before now, e.g. 15m, 1h, 2d.
    #[arg(long, value_parser = crate::config::duration, conflicts_with = "after")]
    pub since: Option<Duration>,
    /// Only records changed at or after this instant (RFC 3339).
    #[arg(long, value_parser = rfc3339)]
    pub after: Option<DateTime<Utc>>,
    /// Only records changed before this instant (RFC 3339).
    #[arg(long, value_parser = rfc3339)]
    pub before: Option<DateTime<Utc>>,
    /// Only keys starting with this.
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// Records per call (1-1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub page_size: u32,
    /// Stop after this many records (default: all).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
}

fn timestamp(value: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: value.timestamp(),
        nanos: i32::try_from(value.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

impl ListArgs {
    /// The first page's request, with `--since` counted back from `now`.
    pub fn request(&self, now: DateTime<Utc>) -> Result<pb::ListRecordsRequest, CliError> {
        if self.outcome_unknown && self.state.is_some_and(|state| state != StateArg::Aborted) {
            return Err(CliError::Usage(
                "--outcome-unknown lists aborted records only; drop --state or say --state aborted".into(),
            ));
        }
        let after = match self.since {
            Some(since) => {
                let since = chrono::Duration::from_std(since)
                    .ok()
                    .and_then(|since| now.checked_sub_signed(since))
                    .ok_or_else(|| CliError::Usage(format!("--since {since:?} reaches before any date")))?;
                Some(since)
            }
            None => self.after,
        };
        if let (Some(after), Some(before)) = (after, self.before)
            && before <= after
        {
            let from = if self.since.is_some() { "the start of --since" } else { "--after" };
            let instant = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            return Err(CliError::Usage(format!(
                "--before {} is not later than {from} ({}): nothing could match",
                instant(before),
                instant(after)
            )));
        }
        Ok(pb::ListRecordsRequest {
            namespace: self.namespace.clone(),
            state: self.state.map_or(pb::State::Unspecified, StateArg::to_pb) as i32,
            outcome_unknown_only: self.outcome_unknown,
            updated_before: self.before.map(timestamp),
            updated_after: after.map(timestamp),
            key_prefix: self.key_prefix.clone().unwrap_or_default(),
            page_size: self.page_size,
            page_token: String::new(),
        })
    }
}

/// How a listing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    pub records: u64,
    /// `--limit` stopped it while the server had more.
    pub more: bool,
}

/// Asks for page after page, handing each record to `emit` and calling
/// `page_done` before the next page is asked for; stops after the last page
/// or `limit` records (asking for no more than are still wanted).
pub async fn page_through<F, Fut>(
    mut request: pb::ListRecordsRequest,
    limit: Option<u64>,
    mut fetch: F,
    mut emit: impl FnMut(&pb::Record) -> Result<(), CliError>,
    mut page_done: impl FnMut() -> Result<(), CliError>,
) -> Result<Listed, CliError>
where
    F: FnMut(pb::ListRecordsRequest) -> Fut,
    Fut: Future<Output = Result<pb::ListRecordsResponse, CliError>>,
{
    let page_size = request.page_size;
    let mut records = 0u64;
    loop {
        if let Some(limit) = limit {
            let wanted = limit.saturating_sub(records);
            request.page_size = u32::try_from(wanted).map_or(page_size, |wanted| wanted.min(page_size));
        }
        let sent_token = request.page_token.clone();
        let page = fetch(request.clone()).await?;
        for record in &page.records {
            if limit.is_some_and(|limit| records >= limit) {
                break;
            }
            emit(record)?;
            records += 1;
        }
        page_done()?;
        if page.next_page_token.is_empty() {
            return Ok(Listed { records, more: false });
        }
        if limit.is_some_and(|limit| records >= limit) {
            return Ok(Listed { records, more: true });
        }
        // A server that hands back the token it was given would page forever.
        if page.next_page_token == sent_token {
            return Err(CliError::Protocol("the server returned the same page token twice".into()));
        }
        request.page_token = page.next_page_token;
    }
}

/// Runs the listing against `fetch`, printing a table (header once, above
/// the first page) or, with `json`, one JSON object per line.
pub async fn print<F, Fut>(
    request: pb::ListRecordsRequest,
    limit: Option<u64>,
    json: bool,
    fetch: F,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<(), CliError>
where
    F: FnMut(pb::ListRecordsRequest) -> Fut,
    Fut: Future<Output = Result<pb::ListRecordsResponse, CliError>>,
{
    let mut header_printed = false;
    let out = std::cell::RefCell::new(out);
    let listed = page_through(
        request,
        limit,
        fetch,
        |record| {
            let mut out = out.borrow_mut();
            if json {
                serde_json::to_writer(&mut **out, &render::record_json(record, render::Response::NotSent))
                    .map_err(std::io::Error::from)?;
                writeln!(out)?;
            } else {
                if !header_printed {
                    out.write_all(render::list_header().as_bytes())?;
                    header_printed = true;
                }
                out.write_all(render::list_row(record).as_bytes())?;
            }
            Ok(())
        },
        || Ok(out.borrow_mut().flush()?),
    )
    .await?;
    if !json {
        // On stderr: the table on stdout stays clean for grep and awk.
        let records = if listed.records == 1 { "1 record".to_string() } else { format!("{} records", listed.records) };
        if listed.more {
            writeln!(err, "{records} (--limit reached; more match)")?;
        } else {
            writeln!(err, "{records}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::sync::{Arc, Mutex};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        list: ListArgs,
    }

    fn parse(args: &[&str]) -> Result<ListArgs, clap::Error> {
        Cli::try_parse_from(["list", "--namespace", "payments"].iter().chain(args)).map(|cli| cli.list)
    }

    fn now() -> DateTime<Utc> {
        rfc3339("2026-11-03T12:00:00Z").expect("instant")
    }

    fn usage(result: Result<pb::ListRecordsRequest, CliError>) -> String {
        match result {
            Err(CliError::Usage(message)) => message,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn the_on_call_query_becomes_its_request() {
        let args = parse(&["--state", "aborted", "--outcome-unknown", "--since", "1h"]).expect("parses");
        let request = args.request(now()).expect("valid");
        assert_eq!(request.namespace, "payments");
        assert_eq!(request.state, pb::State::Aborted as i32);
        assert!(request.outcome_unknown_only);
        assert_eq!(request.updated_after, Some(timestamp(rfc3339("2026-11-03T11:00:00Z").expect("t"))));
        assert_eq!(request.updated_before, None);
        assert_eq!(request.page_size, 100);
        assert!(request.page_token.is_empty() && request.key_prefix.is_empty());
    }

    #[test]
    fn durations_and_instants_parse() {
        let args = parse(&["--since", "90m"]).expect("parses");
        assert_eq!(args.since, Some(Duration::from_secs(5400)));
        let args = parse(&["--after", "2026-11-03T10:00:00+02:00", "--before", "2026-11-03T09:30:00.5Z"]).expect("p");
        let request = args.request(now()).expect("valid");
        assert_eq!(request.updated_after, Some(prost_types::Timestamp { seconds: 1_793_692_800, nanos: 0 }));
        assert_eq!(request.updated_before, Some(prost_types::Timestamp { seconds: 1_793_698_200, nanos: 500_000_000 }));
        assert!(parse(&["--since", "an hour"]).is_err());
        assert!(parse(&["--since", "-1h"]).is_err());
        assert!(parse(&["--after", "yesterday"]).is_err());
        assert!(parse(&["--after", "2026-11-03 10:00"]).is_err());
    }

    #[test]
    fn option_rules() {
        assert!(parse(&["--since", "1h", "--after", "2026-11-03T10:00:00Z"]).is_err(), "one lower bound");
        assert!(parse(&["--state", "in_progress"]).is_ok());
        assert!(parse(&["--state", "in-progress"]).is_ok());
        assert!(parse(&["--state", "running"]).is_err());
        assert!(parse(&["--page-size", "0"]).is_err());
        assert!(parse(&["--page-size", "1001"]).is_err());
        assert!(parse(&["--page-size", "1000"]).is_ok());
        assert!(parse(&["--limit", "0"]).is_err());
        assert!(Cli::try_parse_from(["list"]).is_err(), "--namespace is required");
        let args = parse(&["--state", "completed", "--outcome-unknown"]).expect("parses");
        assert!(usage(args.request(now())).contains("--outcome-unknown"));
        let args = parse(&["--state", "aborted", "--outcome-unknown"]).expect("parses");
        assert!(args.request(now()).is_ok());
    }

    #[test]
    fn an_empty_window_is_refused() {
        let args = parse(&["--after", "2026-11-03T10:00:00Z", "--before", "2026-11-03T10:00:00Z"]).expect("parses");
        assert!(usage(args.request(now())).contains("--before"));
        let args = parse(&["--since", "1h", "--before", "2026-11-03T10:00:00Z"]).expect("parses");
        assert!(usage(args.request(now())).contains("--since"));
        let args = parse(&["--since", "3h", "--before", "2026-11-03T10:00:00Z"]).expect("parses");
        assert!(args.request(now()).is_ok());
    }

    fn record(key: String) -> pb::Record {
        pb::Record { namespace: "payments".into(), key, ..Default::default() }
    }

    /// A fake server holding `total` records; it logs each request with the
    /// number of records printed before it was asked.
    struct FakeServer {
        total: usize,
        calls: Arc<Mutex<Vec<(pb::ListRecordsRequest, usize)>>>,
        printed: Arc<Mutex<usize>>,
    }

    impl FakeServer {
        fn new(total: usize) -> FakeServer {
            FakeServer { total, calls: Arc::default(), printed: Arc::default() }
        }

        fn fetch(
            &self,
        ) -> impl FnMut(pb::ListRecordsRequest) -> std::future::Ready<Result<pb::ListRecordsResponse, CliError>> + use<>
        {
            let (total, calls, printed) = (self.total, Arc::clone(&self.calls), Arc::clone(&self.printed));
            move |request| {
                calls.lock().expect("lock").push((request.clone(), *printed.lock().expect("lock")));
                let start: usize = request.page_token.parse().unwrap_or(0);
                let end = (start + request.page_size as usize).min(total);
                let records = (start..end).map(|i| record(format!("k{i:05}"))).collect();
                let next_page_token = if end < total { end.to_string() } else { String::new() };
                std::future::ready(Ok(pb::ListRecordsResponse { records, next_page_token }))
            }
        }
    }

    #[tokio::test]
    async fn pages_are_printed_as_they_arrive() {
        let server = FakeServer::new(250);
        let mut keys = Vec::new();
        let request = parse(&[]).expect("parses").request(now()).expect("valid");
        let printed = Arc::clone(&server.printed);
        let listed = page_through(
            request,
            None,
            server.fetch(),
            |record| {
                keys.push(record.key.clone());
                *printed.lock().expect("lock") += 1;
                Ok(())
            },
            || Ok(()),
        )
        .await
        .expect("listed");
        assert_eq!(listed, Listed { records: 250, more: false });
        assert_eq!(keys.len(), 250);
        keys.dedup();
        assert_eq!(keys.len(), 250);
        let calls = server.calls.lock().expect("lock");
        let seen: Vec<(&str, usize)> = calls.iter().map(|(r, printed)| (r.page_token.as_str(), *printed)).collect();
        // Page 2 is asked for only once page 1 is out, and so on.
        assert_eq!(seen, [("", 0), ("100", 100), ("200", 200)]);
    }

    #[tokio::test]
    async fn a_limit_stops_early_and_asks_for_no_more_than_it_needs() {
        let server = FakeServer::new(250);
        let request = parse(&["--page-size", "100"]).expect("parses").request(now()).expect("valid");
        let mut count = 0;
        let listed = page_through(
            request,
            Some(120),
            server.fetch(),
            |_| {
                count += 1;
                Ok(())
            },
            || Ok(()),
        )
        .await
        .expect("listed");
        assert_eq!((listed, count), (Listed { records: 120, more: true }, 120));
        let sizes: Vec<u32> = server.calls.lock().expect("lock").iter().map(|(r, _)| r.page_size).collect();
        assert_eq!(sizes, [100, 20]);
    }

    #[tokio::test]
    async fn a_repeated_page_token_is_an_error_not_a_loop() {
        let request = parse(&[]).expect("parses").request(now()).expect("valid");
        let fetch = |_| {
            std::future::ready(Ok(pb::ListRecordsResponse {
                records: vec![record("k".into())],
                next_page_token: "same".into(),
            }))
        };
        let error = page_through(request, None, fetch, |_| Ok(()), || Ok(())).await.expect_err("stops");
        assert!(matches!(error, CliError::Protocol(_)), "{error:?}");
    }

    #[tokio::test]
    async fn the_table_has_one_header_and_json_has_one_object_per_line() {
        let request = parse(&["--page-size", "2"]).expect("parses").request(now()).expect("valid");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        print(request.clone(), None, false, FakeServer::new(5).fetch(), &mut out, &mut err).await.expect("printed");
        let table = String::from_utf8(out).expect("utf-8");
        assert_eq!(table.lines().count(), 6, "{table}");
        assert_eq!(table.lines().filter(|line| line.starts_with("KEY ")).count(), 1, "{table}");
        assert_eq!(String::from_utf8(err).expect("utf-8"), "5 records\n");

        let (mut out, mut err) = (Vec::new(), Vec::new());
        print(request.clone(), None, true, FakeServer::new(5).fetch(), &mut out, &mut err).await.expect("printed");
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .expect("utf-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON object per line"))
            .collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[4]["key"], "k00004");
        assert!(err.is_empty());

        let (mut out, mut err) = (Vec::new(), Vec::new());
        print(request, Some(3), false, FakeServer::new(5).fetch(), &mut out, &mut err).await.expect("printed");
        assert_eq!(String::from_utf8(err).expect("utf-8"), "3 records (--limit reached; more match)\n");
    }

    #[tokio::test]
    async fn a_closed_pipe_stops_the_listing() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let server = FakeServer::new(1000);
        let request = parse(&[]).expect("parses").request(now()).expect("valid");
        let error = print(request, None, true, server.fetch(), &mut Closed, &mut Vec::new()).await.expect_err("stops");
        assert!(error.is_closed_pipe());
        assert_eq!(server.calls.lock().expect("lock").len(), 1, "no page is asked for after the pipe closed");
    }
}
