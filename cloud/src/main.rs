//! `ironlink-cloud`: thin binary over the library.

use clap::Parser;
use ironlink_cloud::cli::{run_admin, Cli, Command};
use ironlink_cloud::server;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::AnalyticsWorker) {
        return ironlink_cloud::jobs::worker::main().await;
    }
    if !matches!(cli.command, Command::Serve(_)) {
        quiet_on_closed_pipe();
    }
    let json = cli.command.wants_json();
    // Errors are for people: the message and its causes, without a backtrace; or one JSON
    // object under --json.
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if json => {
            let mut v = serde_json::json!({"error": format!("{e:#}")});
            if let Some(api) = e.downcast_ref::<ironlink_cloud::cli::ApiCallError>() {
                v = serde_json::json!({"error": api.message, "status": api.status, "code": api.code});
            } else if let Some(call) = e.downcast_ref::<ironlink_cloud::cli::CallFailed>() {
                v = serde_json::json!({"error": call.to_string(), "id": call.id, "status": call.status, "code": call.code});
            }
            eprintln!("{v}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.config()?;
            let mut logging =
                ironlink_cloud::logging::init(args.log_format, config.log.as_deref())?;
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
            println!(
                "Console     http://{}/console/  (sign in with the admin token)",
                running.http_addr
            );
            let config = &running.shared.config;
            if running.token_generated {
                println!(
                    "Admin token {}  (shown once; kept in the data dir as admin-token)",
                    running.admin_token
                );
            } else if config.admin_token.is_some() {
                println!("Admin token from --admin-token / IRONLINK_ADMIN_TOKEN / the config file");
            } else {
                println!(
                    "Admin token in {} (the CLI reads it from there)",
                    config.data_dir.join("admin-token").display()
                );
            }
            println!("Ironlink cloud ready (Ctrl-C to stop, SIGHUP to reload the log filter and TLS certificate)");
            #[cfg(unix)]
            let mut hangups =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            loop {
                #[cfg(unix)]
                let hangup = hangups.recv();
                #[cfg(not(unix))]
                let hangup = std::future::pending::<Option<()>>();
                tokio::select! {
                    _ = shutdown_signal() => break,
                    _ = hangup => reload(&args, &running, &mut logging),
                }
            }
            tracing::info!("shutting down");
            running.shutdown().await;
            Ok(())
        }
        other => run_admin(other).await,
    }
}

/// SIGHUP: reads the configuration again and applies what can change while running.
fn reload(
    args: &ironlink_cloud::cli::ServeArgs,
    running: &server::Running,
    logging: &mut ironlink_cloud::logging::Logging,
) {
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: configuration not reloaded: {e:#}");
            return;
        }
    };
    let mut report = running.reload(&config);
    let src = ironlink_cloud::logging::choose(config.log.as_deref());
    match logging.set_filter(src) {
        Ok(true) => report.applied.push(format!(
            "log filter now `{}` (from {})",
            logging.source.filter, logging.source.from
        )),
        Ok(false) => {}
        Err(e) => report.failed.push(format!("{e:#}")),
    }
    for a in &report.applied {
        tracing::info!("SIGHUP: applied: {a}");
    }
    for f in &report.failed {
        tracing::error!("SIGHUP: not applied, the old value stays: {f}");
    }
    if !report.needs_restart.is_empty() {
        tracing::warn!(
            "SIGHUP: changed but taken only at the next start: {}",
            report.needs_restart.join(", ")
        );
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

/// `ironlink-cloud device list | head`: when the reader of the output goes away, the command
/// ends quietly with success, as Unix tools do, instead of a panic about a broken pipe
/// (`println!` panics on EPIPE; the server never prints after start-up).
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}
