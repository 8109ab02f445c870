//! `ironlink-cloud`: thin binary over the library.

use clap::Parser;
use ironlink_cloud::cli::{run_admin, Cli, Command};
use ironlink_cloud::server;

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
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("IRONLINK_LOG")
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let config = args.config()?;
            let running = server::start(config).await?;
            if let Some(a) = running.mqtt_addr {
                println!("MQTT        mqtt://{a}  (Alink securemode=3)");
            }
            if let Some(a) = running.mqtts_addr {
                println!("MQTT/TLS    mqtts://{a} (Alink securemode=2)");
            }
            if let Some(a) = running.amqps_addr {
                println!("AMQP/TLS    amqps://{a} (applications: consumer groups)");
            }
            if let Some(ca) = &running.generated_ca {
                println!(
                    "TLS CA      {} (development certificate; trust this CA in clients)",
                    ca.display()
                );
            }
            println!(
                "HTTP API    http://{}/api/v1  (OpenAPI: /api/v1/openapi.json)",
                running.http_addr
            );
            if running.token_generated {
                println!(
                    "Admin token {}  (shown once; kept in the data dir as admin-token)",
                    running.admin_token
                );
            }
            println!("Ironlink cloud ready (Ctrl-C to stop)");
            shutdown_signal().await;
            tracing::info!("shutting down");
            running.shutdown().await;
            Ok(())
        }
        other => run_admin(other).await,
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
