//! `ironlink-sim`: thin binary over the library.

use clap::{Parser, Subcommand};
use ironlink_sim::bench::{run_connections, table, ConnectionsBench};
use std::path::PathBuf;

/// Ironlink fleet simulator and load generator.
#[derive(Debug, Parser)]
#[command(name = "ironlink-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Benchmarks (loopback only, bounded).
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Authenticated connects per second and RSS per idle connection.
    Connections {
        /// Connections per target.
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Connects in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Baseline to measure in the same run (`mosquitto`).
        #[arg(long)]
        vs: Option<String>,
        /// ironlink-cloud binary (default: next to this executable).
        #[arg(long)]
        cloud_bin: Option<PathBuf>,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Errors are for people: the message and its causes, without a backtrace.
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Bench {
            which:
                Bench::Connections {
                    devices,
                    concurrency,
                    vs,
                    cloud_bin,
                    json,
                },
        } => {
            let vs_mosquitto = match vs.as_deref() {
                None => false,
                Some("mosquitto") => true,
                Some(other) => anyhow::bail!("--vs {other}: only mosquitto is supported"),
            };
            let o = ConnectionsBench {
                devices: devices.min(100_000),
                concurrency,
                vs_mosquitto,
                cloud_bin,
            };
            let results = run_connections(&o).await?;
            print!("{}", table(&results));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
            }
        }
    }
    Ok(())
}
