//! The `idemd` command line: wiring only; everything lives in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idemd::config::{DatabaseConfig, LogFormat, ServeConfig};
use idemd::{cli, server, telemetry};

/// A standalone gRPC idempotency service: no customer is ever charged twice.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server (applies migrations first unless --no-migrate).
    Serve(Box<ServeConfig>),
    /// Apply migrations and exit (for a Kubernetes Job).
    Migrate(DatabaseConfig),
    /// Draw a new random token and print it, then its line for the tokens file.
    Token {
        /// A namespace (or `prefix.*` pattern) the token grants; repeat for more.
        #[arg(long = "grant", required = true)]
        grants: Vec<String>,
    },
    /// Load generator against a running server (Begin → Complete pairs).
    Bench(idemd::bench::BenchConfig),
    /// Print one record of a running server (--json: as JSON).
    Lookup(cli::LookupArgs),
    /// Inspect and repair records of a running server: list, history,
    /// resolve, release, invalidate (the Admin service).
    Admin(cli::AdminArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Serve(config) => {
            let telemetry = telemetry::init(config.log_format)?;
            config.validate()?;
            let listeners = server::Listeners::bind(&config).await?;
            let result = server::run(*config, listeners, server::shutdown_signal()).await;
            telemetry.shutdown();
            result.map(|()| ExitCode::SUCCESS)
        }
        Command::Migrate(database) => {
            let _telemetry = telemetry::init(LogFormat::Text)?;
            server::migrate(&database).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(config) => {
            let json = config.json;
            let report = idemd::bench::run(config).await?;
            if json {
                println!("{report}");
            } else {
                println!("{}", idemd::bench::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { grants } => {
            let (token, line) = idemd::auth::new_token(&grants).map_err(anyhow::Error::msg)?;
            println!("{token}");
            println!("{line}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Lookup(args) => Ok(cli::lookup(args).await),
        Command::Admin(args) => Ok(cli::admin(args).await),
    }
}
