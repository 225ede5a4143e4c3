//! The `idemd` command line: wiring only; everything lives in the library.

use clap::{Parser, Subcommand};
use idemd::config::{DatabaseConfig, LogFormat, ServeConfig};
use idemd::{lookup, server, telemetry};

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
    /// Print one record of a running server as JSON.
    Lookup {
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        key: String,
        /// The server's gRPC address.
        #[arg(long, env = "IDEMD_ADDR", default_value = "http://127.0.0.1:50051")]
        addr: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(config) => {
            let telemetry = telemetry::init(config.log_format)?;
            config.validate()?;
            let listeners = server::Listeners::bind(&config).await?;
            let result = server::run(*config, listeners, server::shutdown_signal()).await;
            telemetry.shutdown();
            result
        }
        Command::Migrate(database) => {
            let _telemetry = telemetry::init(LogFormat::Text)?;
            server::migrate(&database).await
        }
        Command::Bench(config) => {
            let json = config.json;
            let report = idemd::bench::run(config).await?;
            if json {
                println!("{report}");
            } else {
                println!("{}", idemd::bench::render(&report));
            }
            Ok(())
        }
        Command::Token { grants } => {
            let (token, line) = idemd::auth::new_token(&grants).map_err(anyhow::Error::msg)?;
            println!("{token}");
            println!("{line}");
            Ok(())
        }
        Command::Lookup { namespace, key, addr } => {
            let record = lookup::lookup(addr, namespace, key).await?;
            println!("{}", serde_json::to_string_pretty(&record)?);
            Ok(())
        }
    }
}
