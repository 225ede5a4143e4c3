//! `idemd admin`: the Admin service from a shell. `list` pages (see
//! `list.rs`); `history` prints a key's events; `resolve`, `release` and
//! `invalidate` act on one record and print what it became.

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::builder::NonEmptyStringValueParser;
use clap::{ArgAction, ArgGroup, Args, Parser, Subcommand};

use super::connect::{ConnectArgs, Connection};
use super::error::CliError;
use super::list::{self, ListArgs};
use super::lookup::print_record;
use super::render;
use crate::pb;

/// Inspect and repair records of a running server (needs an `admin:` grant
/// when the server runs with auth).
#[derive(Debug, Clone, Parser)]
pub struct AdminArgs {
    /// JSON instead of text: one object per line for list and history, one
    /// object for the rest.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(subcommand)]
    pub action: AdminAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AdminAction {
    /// Page through a namespace's live records, the most recently changed
    /// first, e.g. `list --namespace payments --state aborted --outcome-unknown --since 1h`.
    List(ListArgs),
    /// A key's events, oldest first.
    History(KeyArgs),
    /// Record the outcome reconciled with the provider: an aborted attempt
    /// (or one whose lease expired) becomes completed with this response.
    Resolve(ResolveArgs),
    /// End an in-progress attempt so that the next Begin acquires.
    Release(ReleaseArgs),
    /// Remove a record: its key starts afresh (attempt 1, a new downstream key).
    Invalidate(InvalidateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// The record's namespace.
    #[arg(long)]
    pub namespace: String,
    /// The record's key.
    #[arg(long)]
    pub key: String,
}

/// The record's current attempt, as lookup and list show it: the server
/// refuses the action if the record has moved on.
fn attempt() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..)
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("body").required(true).args(["response", "response_file"])))]
pub struct ResolveArgs {
    #[command(flatten)]
    pub target: KeyArgs,
    /// The record's current attempt (a fencing check).
    #[arg(long, value_parser = attempt())]
    pub attempt: u32,
    /// Why, for the history: e.g. the provider's charge id.
    #[arg(long, value_parser = NonEmptyStringValueParser::new())]
    pub reason: String,
    /// The response code the attempt would have stored.
    #[arg(long, allow_negative_numbers = true)]
    pub response_code: i32,
    /// The response's content type, as Complete would have stored it.
    #[arg(long, default_value = "")]
    pub content_type: String,
    /// The response body, as text.
    #[arg(long)]
    pub response: Option<String>,
    /// The response body from a file (`-`: standard input).
    #[arg(long, value_name = "PATH")]
    pub response_file: Option<PathBuf>,
}

impl ResolveArgs {
    fn body(&self) -> Result<Vec<u8>, CliError> {
        match (&self.response, &self.response_file) {
            (Some(text), _) => Ok(text.clone().into_bytes()),
            (None, Some(path)) if path.as_os_str() == "-" => {
                let mut body = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut body)
                    .map_err(|e| CliError::Usage(format!("--response-file -: standard input: {e}")))?;
                Ok(body)
            }
            (None, Some(path)) => {
                std::fs::read(path).map_err(|e| CliError::Usage(format!("--response-file {}: {e}", path.display())))
            }
            (None, None) => Err(CliError::Usage("--response or --response-file is required".into())),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub target: KeyArgs,
    /// The record's current attempt (a fencing check).
    #[arg(long, value_parser = attempt())]
    pub attempt: u32,
    /// Why, for the history and the next attempt's `previous.abort_reason`.
    #[arg(long, value_parser = NonEmptyStringValueParser::new())]
    pub reason: String,
    /// Whether the released attempt may have taken effect; the next attempt
    /// is told. Required: say true unless you know it did not.
    #[arg(long, required = true, action = ArgAction::Set, value_name = "true|false")]
    pub outcome_unknown: bool,
}

#[derive(Debug, Clone, Args)]
pub struct InvalidateArgs {
    #[command(flatten)]
    pub target: KeyArgs,
    /// Why, for the history.
    #[arg(long, value_parser = NonEmptyStringValueParser::new())]
    pub reason: String,
}

pub async fn run(args: AdminArgs, out: &mut impl Write, err: &mut impl Write) -> Result<(), CliError> {
    let AdminArgs { json, connect, action } = args;
    // Each action checks its own input (filters, files) before connecting:
    // a typo fails at once, whatever the network does.
    match action {
        AdminAction::List(list) => {
            let request = list.request(chrono::Utc::now())?;
            let connection = connect.connect().await?;
            let client = connection.admin();
            let fetch = |request: pb::ListRecordsRequest| {
                let mut client = client.clone();
                let connection = &connection;
                async move { client.list_records(request).await.map(|r| r.into_inner()).map_err(|s| connection.error(s)) }
            };
            list::print(request, list.limit, json, fetch, out, err).await
        }
        AdminAction::History(target) => {
            let connection = connect.connect().await?;
            history(&connection, target, json, out).await
        }
        AdminAction::Resolve(resolve) => {
            let request = pb::ResolveRequest {
                response: resolve.body()?,
                namespace: resolve.target.namespace,
                key: resolve.target.key,
                attempt: resolve.attempt,
                response_code: resolve.response_code,
                content_type: resolve.content_type,
                reason: resolve.reason,
            };
            let connection = connect.connect().await?;
            let response = connection.admin().resolve(request).await.map_err(|s| connection.error(s))?;
            print_record(&returned(response.into_inner().record)?, json, out)
        }
        AdminAction::Release(release) => {
            let request = pb::ReleaseRequest {
                namespace: release.target.namespace,
                key: release.target.key,
                attempt: release.attempt,
                reason: release.reason,
                outcome_unknown: release.outcome_unknown,
            };
            let connection = connect.connect().await?;
            let response = connection.admin().release(request).await.map_err(|s| connection.error(s))?;
            print_record(&returned(response.into_inner().record)?, json, out)
        }
        AdminAction::Invalidate(invalidate) => {
            let KeyArgs { namespace, key } = invalidate.target;
            let request =
                pb::InvalidateRequest { namespace: namespace.clone(), key: key.clone(), reason: invalidate.reason };
            let connection = connect.connect().await?;
            connection.admin().invalidate(request).await.map_err(|s| connection.error(s))?;
            if json {
                let value = serde_json::json!({ "namespace": namespace, "key": key, "invalidated": true });
                writeln!(out, "{value}")?;
            } else {
                writeln!(out, "invalidated {}/{}", render::clean(&namespace), render::clean(&key))?;
            }
            Ok(())
        }
    }
}

fn returned(record: Option<pb::Record>) -> Result<pb::Record, CliError> {
    record.ok_or_else(|| CliError::Protocol("the server answered without the record".into()))
}

async fn history(connection: &Connection, target: KeyArgs, json: bool, out: &mut impl Write) -> Result<(), CliError> {
    let request = pb::GetHistoryRequest { namespace: target.namespace, key: target.key };
    let events = connection.admin().get_history(request).await.map_err(|s| connection.error(s))?.into_inner().events;
    if json {
        for event in &events {
            writeln!(out, "{}", render::event_json(event))?;
        }
    } else {
        out.write_all(render::history_table(&events).as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<AdminArgs, clap::Error> {
        AdminArgs::try_parse_from(["admin"].iter().chain(args))
    }

    const KEY: [&str; 4] = ["--namespace", "payments", "--key", "order-42"];

    fn with_key(args: &[&'static str]) -> Vec<&'static str> {
        let mut all = vec![args[0]];
        all.extend(KEY);
        all.extend(&args[1..]);
        all
    }

    #[test]
    fn the_command_is_well_formed() {
        AdminArgs::command().debug_assert();
    }

    #[test]
    fn connection_options_and_json_go_before_or_after_the_subcommand() {
        let before = parse(&["--json", "--addr", "https://idemd:1", "history", "--namespace", "p", "--key", "k"]);
        let after = parse(&["history", "--namespace", "p", "--key", "k", "--json", "--addr", "https://idemd:1"]);
        for args in [before, after] {
            let args = args.expect("parses");
            assert!(args.json);
            assert_eq!(args.connect.addr, "https://idemd:1");
        }
    }

    #[test]
    fn release_needs_an_explicit_outcome() {
        let base = ["release", "--attempt", "2", "--reason", "worker stuck"];
        assert!(parse(&with_key(&base)).is_err(), "--outcome-unknown is required");
        let mut without_value = with_key(&base);
        without_value.push("--outcome-unknown");
        assert!(parse(&without_value).is_err(), "a bare --outcome-unknown says nothing");
        for (value, expected) in [("true", true), ("false", false)] {
            let mut args = with_key(&base);
            args.extend(["--outcome-unknown", value]);
            match parse(&args).expect("parses").action {
                AdminAction::Release(release) => assert_eq!(release.outcome_unknown, expected),
                other => panic!("{other:?}"),
            }
        }
        let mut maybe = with_key(&base);
        maybe.extend(["--outcome-unknown", "maybe"]);
        assert!(parse(&maybe).is_err());
    }

    #[test]
    fn attempts_start_at_one_and_reasons_are_required() {
        let release = |attempt: &'static str, reason: &'static str| {
            parse(&with_key(&["release", "--attempt", attempt, "--reason", reason, "--outcome-unknown", "true"]))
        };
        assert!(release("1", "r").is_ok());
        assert!(release("0", "r").is_err());
        assert!(release("-1", "r").is_err());
        assert!(release("1", "").is_err());
        assert!(parse(&with_key(&["invalidate"])).is_err());
        assert!(parse(&with_key(&["invalidate", "--reason", "test data"])).is_ok());
        assert!(parse(&["invalidate", "--namespace", "payments", "--reason", "r"]).is_err(), "--key is required");
    }

    #[test]
    fn resolve_takes_exactly_one_body() {
        let base = ["resolve", "--attempt", "1", "--reason", "ch_1 found", "--response-code", "200"];
        assert!(parse(&with_key(&base)).is_err(), "a body is required");
        let mut both = with_key(&base);
        both.extend(["--response", "{}", "--response-file", "body.json"]);
        assert!(parse(&both).is_err(), "only one body");
        let mut text = with_key(&base);
        text.extend(["--response", r#"{"id":"ch_1"}"#, "--content-type", "application/json"]);
        let AdminAction::Resolve(resolve) = parse(&text).expect("parses").action else { panic!("resolve") };
        assert_eq!(resolve.body().expect("body"), br#"{"id":"ch_1"}"#);
        assert_eq!(resolve.content_type, "application/json");
        let mut negative = with_key(&["resolve", "--attempt", "1", "--reason", "r", "--response-code", "-1"]);
        negative.extend(["--response", ""]);
        assert!(parse(&negative).is_ok());
    }

    #[test]
    fn a_response_file_is_read_and_a_missing_one_named() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("body.bin");
        std::fs::write(&path, [0u8, 255, 1]).expect("write");
        let resolve = |path: &std::path::Path| ResolveArgs {
            target: KeyArgs { namespace: "payments".into(), key: "k".into() },
            attempt: 1,
            reason: "r".into(),
            response_code: 200,
            content_type: String::new(),
            response: None,
            response_file: Some(path.to_path_buf()),
        };
        assert_eq!(resolve(&path).body().expect("read"), [0u8, 255, 1]);
        let missing = dir.path().join("nope");
        match resolve(&missing).body() {
            Err(CliError::Usage(message)) => assert!(message.contains("--response-file"), "{message}"),
            other => panic!("{other:?}"),
        }
    }
}
