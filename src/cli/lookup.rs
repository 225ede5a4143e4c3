//! `idemd lookup`: one record of a running server, as aligned text or, with
//! `--json`, the JSON object scripts read (the response as base64, plus as
//! text when it is UTF-8; never the lease token, which Lookup does not send).

use std::io::Write;

use clap::Parser;

use super::connect::ConnectArgs;
use super::error::CliError;
use super::render;
use crate::pb;

/// Print one record of a running server.
#[derive(Debug, Clone, Parser)]
pub struct LookupArgs {
    /// The record's namespace.
    #[arg(long)]
    pub namespace: String,
    /// The record's key.
    #[arg(long)]
    pub key: String,
    /// Print the record as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

pub async fn run(args: LookupArgs, out: &mut impl Write) -> Result<(), CliError> {
    let connection = args.connect.connect().await?;
    let response = connection
        .idempotency()
        .lookup(pb::LookupRequest { namespace: args.namespace, key: args.key })
        .await
        .map_err(|status| connection.error(status))?;
    let record = response
        .into_inner()
        .record
        .ok_or_else(|| CliError::Protocol("the server answered without a record".into()))?;
    print_record(&record, args.json, out)
}

/// One record with its response, as text or pretty JSON.
pub fn print_record(record: &pb::Record, json: bool, out: &mut impl Write) -> Result<(), CliError> {
    if json {
        let value = render::record_json(record, render::Response::Included);
        serde_json::to_writer_pretty(&mut *out, &value).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        out.write_all(render::record_text(record).as_bytes())?;
    }
    Ok(())
}
