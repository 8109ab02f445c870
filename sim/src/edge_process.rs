//! The edge gateway as a process for the benchmarks: spawning it, reading its `/metrics`,
//! waiting for its uplink and for its queue to drain, and the cloud-side set-up it needs (a
//! gateway device, a sub-device product with dynamic registration).

use crate::cloud_process::{binary, Cloud, WAIT};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An `ironlink-edge run` process; killed when dropped.
#[derive(Debug)]
pub struct EdgeProcess(pub Child);

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl EdgeProcess {
    /// Starts `ironlink-edge run --config cfg` (`bin`, or the one next to this executable);
    /// its log level is `IRONLINK_EDGE_LOG` or `error`.
    pub fn spawn(bin: Option<&Path>, cfg: &Path) -> Result<Self> {
        let bin = match bin {
            Some(b) => b.to_path_buf(),
            None => binary("edge", "ironlink-edge")?,
        };
        Ok(Self(
            Command::new(&bin)
                .args(["run", "--config"])
                .arg(cfg)
                .env(
                    "IRONLINK_LOG",
                    std::env::var("IRONLINK_EDGE_LOG").unwrap_or_else(|_| "error".into()),
                )
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?,
        ))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// The sum of a metric's samples (lines starting with `name`) on the edge's `/metrics`.
pub async fn metric(status: &str, name: &str) -> Result<f64> {
    let text = reqwest::get(format!("http://{status}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Waits (bounded) until the edge's uplink is up.
pub async fn wait_uplink(status: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while metric(status, "ironlink_edge_uplink_up")
        .await
        .unwrap_or(0.0)
        < 1.0
    {
        if Instant::now() > deadline {
            bail!("the edge's uplink did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits (bounded, 120 s) until the edge's queue is empty: everything it acknowledged reached
/// the cloud. `what` names the records in the error.
pub async fn wait_drained(status: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let depth = metric(status, "ironlink_edge_queue_depth").await?;
        if depth == 0.0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{depth} {what} still queued at the edge 120 s after the run");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gateway product and device `name`: (product key, device secret).
pub async fn gateway(cloud: &Cloud, name: &str) -> Result<(String, String)> {
    let gpk = cloud
        .create_product(json!({"name": format!("{name}-gw"), "node_type": "gateway"}))
        .await?;
    let (_, gw) = cloud
        .api(
            reqwest::Method::POST,
            &format!("/products/{gpk}/devices"),
            Some(json!({"device_name": name})),
        )
        .await?;
    let secret = gw["device_secret"]
        .as_str()
        .context("gateway secret")?
        .to_owned();
    Ok((gpk, secret))
}

/// A sub-device product with dynamic registration on and, if given, a thing model.
pub async fn sub_product(cloud: &Cloud, name: &str, tsl: Option<Value>) -> Result<String> {
    let pk = cloud
        .create_product(json!({"name": name, "node_type": "sub-device"}))
        .await?;
    if let Some(tsl) = tsl {
        let (s, v) = cloud
            .api(
                reqwest::Method::PUT,
                &format!("/products/{pk}/thing-model"),
                Some(tsl),
            )
            .await?;
        if s >= 300 {
            bail!("thing model: {s} {v}");
        }
    }
    cloud.allow_dynamic_register(&pk).await?;
    Ok(pk)
}

/// Writes `config` as `edge.toml` in `dir`, starts the edge process on it and waits until its
/// uplink is up; returns the process and its status address (`127.0.0.1:status_port`).
pub async fn start_edge(
    bin: Option<&Path>,
    dir: &Path,
    config: &str,
    status_port: u16,
) -> Result<(EdgeProcess, String)> {
    let cfg = dir.join("edge.toml");
    std::fs::write(&cfg, config)?;
    let edge = EdgeProcess::spawn(bin, &cfg)?;
    let status = format!("127.0.0.1:{status_port}");
    wait_uplink(&status).await?;
    Ok((edge, status))
}

/// The common head of an edge configuration: identity, uplink, queue, status.
pub fn config_head(
    gpk: &str,
    gdn: &str,
    secret: &str,
    mqtt_port: u16,
    queue: &Path,
    status_port: u16,
) -> String {
    format!(
        "[gateway]\nproduct_key = \"{gpk}\"\ndevice_name = \"{gdn}\"\ndevice_secret = \"{secret}\"\n\
         [uplink]\nhost = \"127.0.0.1\"\nport = {mqtt_port}\n[queue]\ndir = \"{}\"\n\
         [status]\nlisten = \"127.0.0.1:{status_port}\"\n",
        queue.display()
    )
}
