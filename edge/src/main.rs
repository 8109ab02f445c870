//! `ironlink-edge`: thin binary over the library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Ironlink edge gateway: Modbus sub-devices, a durable queue, one Alink uplink.
#[derive(Debug, Parser)]
#[command(name = "ironlink-edge", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the gateway.
    Run {
        /// The configuration file (see edge/edge.example.toml).
        #[arg(long, env = "IRONLINK_EDGE_CONFIG")]
        config: PathBuf,
    },
    /// Check a configuration file and exit.
    Check {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
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
        Cmd::Check { config } => {
            let c = ironlink_edge::config::Config::load(&config)?;
            let points: usize = c.devices.iter().map(|d| d.points.len()).sum();
            println!(
                "{}: ok, {} sub-devices, {points} points",
                config.display(),
                c.devices.len()
            );
        }
        Cmd::Run { config } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("IRONLINK_LOG")
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let c = ironlink_edge::config::Config::load(&config)?;
            if let Some(l) = ironlink_telemetry::os::raise_nofile_limit() {
                tracing::info!(
                    open_files_limit = l.now,
                    before = l.before,
                    hard = l.hard,
                    "open-files limit"
                );
            }
            let running = ironlink_edge::run::start(c)?;
            if let Some(a) = running.status_addr {
                println!("Status      http://{a}/status  (also /metrics, /healthz)");
            }
            println!("Ironlink edge ready");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            running.shutdown().await;
        }
    }
    Ok(())
}
