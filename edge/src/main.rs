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
        /// Run under a supervisor that restarts the gateway and makes self-upgrades safe
        /// (a new binary that does not connect in time is rolled back).
        #[arg(long)]
        supervise: bool,
        /// Internal: the supervised gateway (ends when its standard input closes).
        #[arg(long, hide = true)]
        worker: bool,
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
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<i32> {
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
        Cmd::Run {
            config,
            supervise: true,
            worker: false,
        } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("IRONLINK_LOG")
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            // Checked here so that a wrong file is reported once, not in a restart loop.
            ironlink_edge::config::Config::load(&config)?;
            let exe = std::env::current_exe()?;
            let args = vec![
                "run".into(),
                "--worker".into(),
                "--config".into(),
                config.into_os_string(),
            ];
            return ironlink_edge::supervise::run(exe, args).await;
        }
        Cmd::Run { config, worker, .. } => {
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
            let running = ironlink_edge::run::start_with(
                c,
                ironlink_edge::run::StartOptions { supervised: worker },
            )?;
            if let Some(a) = running.status_addr {
                println!("Status      http://{a}/status  (also /metrics, /healthz)");
            }
            println!("Ironlink edge ready");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let mut exit = running.exit.clone();
            let code = tokio::select! {
                _ = tokio::signal::ctrl_c() => 0,
                _ = term.recv() => 0,
                _ = supervisor_gone(worker) => 0,
                r = exit.wait_for(Option::is_some) => r.ok().and_then(|c| *c).unwrap_or(0),
            };
            running.shutdown().await;
            return Ok(code);
        }
    }
    Ok(0)
}

/// Under a supervisor: resolves when its end of our standard input closes (it stopped, or
/// died). Otherwise never.
async fn supervisor_gone(worker: bool) {
    if !worker {
        return std::future::pending().await;
    }
    // A plain thread: it may stay blocked in read() at exit without holding the runtime.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let _ = rx.await;
}
