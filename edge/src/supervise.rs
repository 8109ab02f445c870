//! `ironlink-edge run --supervise`: a small parent that runs the gateway as its child and is
//! what makes self-upgrades safe. It restarts a child that dies (backing off), starts the new
//! binary when the child exits to install one ([`RESTART_FOR_UPGRADE`]), and rolls back to
//! `{exe}.previous` when a new binary exits, or does not connect to the cloud within the
//! marker's time. The child reads its standard input: when the supervisor goes (even by kill
//! -9) the pipe closes and the child shuts down cleanly, so no gateway is left orphaned.
//!
//! The supervisor's own code is the binary it was started from: it changes at the next start
//! of the service, not at a self-upgrade.

use crate::ota::{
    marker_path, previous_path, read_json, roll_back, rollback_path, write_json, Marker,
    RolledBack, RESTART_FOR_UPGRADE,
};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How a child ended.
enum End {
    /// The supervisor was asked to stop.
    Stop,
    /// The child exited.
    Exited(std::process::ExitStatus),
    /// A trial did not confirm in time.
    Unconfirmed,
}

fn spawn(exe: &Path, args: &[OsString]) -> std::io::Result<Child> {
    Command::new(exe)
        .args(args)
        // The path the supervisor swaps (the child may be a launcher running another file).
        .env("IRONLINK_EDGE_EXE", exe)
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
}

/// Puts the previous binary back and records why, for the restored binary to report.
fn undo(exe: &Path, m: &Marker, why: String) {
    tracing::warn!(to = %m.to, %why, "rolling back to the previous binary");
    if let Err(e) = roll_back(exe) {
        tracing::error!(error = %e, "rolling back failed: the new binary stays");
    }
    let _ = write_json(
        &rollback_path(exe),
        &RolledBack {
            to: m.to.clone(),
            why,
        },
    );
    let _ = std::fs::remove_file(marker_path(exe));
}

/// Runs `exe` with `args` until SIGTERM or Ctrl-C; returns the exit code for the supervisor.
pub async fn run(exe: PathBuf, args: Vec<OsString>) -> anyhow::Result<i32> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut backoff = Duration::from_secs(1);
    loop {
        let marker = marker_path(&exe);
        let mut trial = match read_json::<Marker>(&marker) {
            // A marker without the swap (a crash between them): nothing to try.
            Some(_) if !previous_path(&exe).exists() => {
                let _ = std::fs::remove_file(&marker);
                None
            }
            Some(mut m) => {
                m.started = true;
                write_json(&marker, &m)?;
                tracing::info!(from = %m.from, to = %m.to, confirm_secs = m.confirm_secs, "starting the new binary on trial");
                Some(m)
            }
            None => None,
        };
        let deadline = trial
            .as_ref()
            .map(|m| Instant::now() + Duration::from_secs(m.confirm_secs));
        let started = Instant::now();
        let mut child = match spawn(&exe, &args) {
            Ok(c) => c,
            Err(e) => {
                if let Some(m) = &trial {
                    undo(&exe, m, format!("could not be started: {e}"));
                    continue;
                }
                return Err(anyhow::anyhow!("starting {}: {e}", exe.display()));
            }
        };
        // Held here: `Child::wait` would close it, and the child takes a closed input as
        // the supervisor being gone.
        let input = child.stdin.take();
        let end = loop {
            tokio::select! {
                s = child.wait() => break End::Exited(s?),
                _ = tokio::signal::ctrl_c() => break End::Stop,
                _ = term.recv() => break End::Stop,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if trial.is_some() => {
                    if marker.exists() {
                        break End::Unconfirmed;
                    }
                    trial = None;
                }
                _ = tokio::time::sleep(Duration::from_millis(200)), if trial.is_some() => {
                    if !marker.exists() {
                        tracing::info!("the new binary connected: upgrade confirmed");
                        trial = None;
                    }
                }
            }
        };
        match end {
            End::Stop => {
                // Closing its input asks the child to stop cleanly; bounded.
                drop(input);
                if tokio::time::timeout(Duration::from_secs(30), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
                return Ok(0);
            }
            End::Unconfirmed => {
                let _ = child.kill().await;
                if let Some(m) = &trial {
                    undo(
                        &exe,
                        m,
                        format!(
                            "it did not connect to the cloud within {} s",
                            m.confirm_secs
                        ),
                    );
                }
            }
            End::Exited(status) => {
                if let Some(m) = trial.as_ref().filter(|_| marker.exists()) {
                    undo(
                        &exe,
                        m,
                        format!("it exited ({status}) before connecting to the cloud"),
                    );
                    continue;
                }
                if status.code() == Some(RESTART_FOR_UPGRADE) {
                    continue;
                }
                if status.success() {
                    return Ok(0);
                }
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_secs(1);
                }
                tracing::warn!(%status, retry_in_s = backoff.as_secs(), "the gateway exited; restarting it");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
