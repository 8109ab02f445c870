//! `bench edge`: the edge gateway process polling simulated Modbus TCP devices (in-process
//! tokio-modbus servers, each answering fresh values on every read) and forwarding through the
//! cloud process to an application over AMQP.
//!
//! Phase 1 (steady state): points polled and forwarded per second, CPU of the edge process
//! (and of the cloud), live latency from the poll to the application.
//! Phase 2 (backlog drain): the cloud is killed (-9) for a while, the edge keeps polling into
//! its queue; the cloud comes back on the same ports and the backlog drains at the configured
//! rate while live readings keep flowing: drain rate, and live latency meanwhile.
//! Loopback only; bounded in count and time.

use crate::apps_bench::{amqp_receiver, now_ms_f64, property_group};
use crate::bench::percentile;
use crate::cloud_process::{cpu_ticks, Cloud, WAIT};
use crate::edge_process::{metric, EdgeProcess};
use anyhow::{anyhow, bail, Context, Result};
use fe2o3_amqp::link::Receiver;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value as AmqpValue;
use serde::Serialize;
use serde_json::{json, Value};
use std::future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_modbus::prelude::*;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};

/// Options of `bench edge`.
#[derive(Debug, Clone)]
pub struct EdgeBench {
    /// Simulated Modbus TCP devices.
    pub devices: usize,
    /// Points per device (u16 holding registers, read in one request).
    pub points: u16,
    /// Poll interval.
    pub interval: Duration,
    /// Steady-state measurement time.
    pub seconds: u64,
    /// Cloud outage in the drain phase (0: no drain phase).
    pub outage_seconds: u64,
    /// Edge `queue.drain_rate` (backlog messages per second).
    pub drain_rate: u32,
    /// The ironlink-cloud binary.
    pub cloud_bin: Option<PathBuf>,
    /// The ironlink-edge binary.
    pub edge_bin: Option<PathBuf>,
}

/// Results.
#[derive(Debug, Clone, Serialize)]
pub struct EdgeResult {
    /// Devices x points.
    pub devices: usize,
    /// Points per device.
    pub points: u16,
    /// Poll interval, ms.
    pub interval_ms: u64,
    /// Points the configuration asks for per second.
    pub offered_points_per_sec: f64,
    /// Points polled per second (edge metrics).
    pub polled_points_per_sec: f64,
    /// Points that reached the application per second.
    pub forwarded_points_per_sec: f64,
    /// Edge CPU, cores.
    pub edge_cpu_cores: f64,
    /// Edge cores per 10,000 points/s polled and forwarded.
    pub edge_cores_per_10k_points: f64,
    /// Cloud CPU, cores (ingest, storage, AMQP delivery).
    pub cloud_cpu_cores: f64,
    /// Edge RSS, KiB.
    pub edge_rss_kib: u64,
    /// Poll-to-application latency in steady state, ms.
    pub live_p50_ms: f64,
    /// p99.
    pub live_p99_ms: f64,
    /// Drain phase, if run.
    pub drain: Option<DrainResult>,
}

/// The drain phase.
#[derive(Debug, Clone, Serialize)]
pub struct DrainResult {
    /// Outage, s.
    pub outage_s: u64,
    /// Queue depth (messages) when the edge's uplink came back up.
    pub backlog_messages: u64,
    /// Configured drain rate.
    pub drain_rate: u32,
    /// Seconds from the uplink's return until the queue was back to its steady depth.
    pub drain_s: f64,
    /// Backlog messages per second.
    pub drained_per_sec: f64,
    /// Live readings (polled after the uplink's return) received meanwhile.
    pub live_received: usize,
    /// Their latency p50, ms.
    pub live_p50_ms: f64,
    /// p99.
    pub live_p99_ms: f64,
    /// max.
    pub live_max_ms: f64,
}

/// A field device: `points` holding registers that change on every read.
struct Meter(Arc<AtomicU16>, u16);

impl tokio_modbus::server::Service for Meter {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Request<'static>) -> Self::Future {
        future::ready(match req {
            Request::ReadHoldingRegisters(a, n)
                if u32::from(a) + u32::from(n) <= u32::from(self.1) =>
            {
                let base = self.0.fetch_add(1, Ordering::Relaxed);
                Ok(Response::ReadHoldingRegisters(
                    (0..n).map(|i| base.wrapping_add(a + i)).collect(),
                ))
            }
            _ => Err(ExceptionCode::IllegalDataAddress),
        })
    }
}

async fn meter(points: u16) -> Result<std::net::SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let counter = Arc::new(AtomicU16::new(0));
    tokio::spawn(async move {
        let server = Server::new(l);
        let new_service = move |_| Ok(Some(Arc::new(Meter(counter.clone(), points))));
        let on_connected = |stream, a| {
            let new_service = new_service.clone();
            async move { accept_tcp_connection(stream, a, new_service) }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    Ok(addr)
}

/// Receives for `dur`; returns (poll time ms, latency ms, points) per message.
async fn collect(r: &mut Receiver, dur: Duration) -> Result<Vec<(f64, f64, usize)>> {
    let end = Instant::now() + dur;
    let mut out = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(out);
        }
        let Ok(d) = tokio::time::timeout(left, r.recv::<Body<AmqpValue>>()).await else {
            return Ok(out);
        };
        let d = d.map_err(|e| anyhow!("AMQP recv: {e}"))?;
        let now = now_ms_f64();
        let body: Vec<u8> = match d.body() {
            Body::Data(batch) => batch.iter().flat_map(|d| d.0.to_vec()).collect(),
            _ => Vec::new(),
        };
        r.accept(&d)
            .await
            .map_err(|e| anyhow!("AMQP accept: {e}"))?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let items = v["items"].as_object().or_else(|| v["params"].as_object());
        if let Some(items) = items {
            let t = items
                .values()
                .filter_map(|i| i["time"].as_f64())
                .fold(f64::NAN, f64::min);
            if t.is_finite() {
                out.push((t, now - t, items.len()));
            }
        }
    }
}

/// Runs the benchmark.
pub async fn run(o: &EdgeBench) -> Result<EdgeResult> {
    let dir = tempfile::tempdir()?;
    let cloud_dir = dir.path().join("cloud");
    std::fs::create_dir_all(&cloud_dir)?;
    let cloud = Cloud::start_bench_with(
        o.cloud_bin.as_deref(),
        &cloud_dir,
        "",
        &["--amqps-listen", "127.0.0.1:0"],
    )?;
    let gpk = cloud
        .create_product(json!({"name": "edge-bench-gw", "node_type": "gateway"}))
        .await?;
    let spk = cloud
        .create_product(json!({"name": "edge-bench-meter", "node_type": "sub-device"}))
        .await?;
    let (_, gw) = cloud
        .api(
            reqwest::Method::POST,
            &format!("/products/{gpk}/devices"),
            Some(json!({"device_name": "edge-bench"})),
        )
        .await?;
    let subs = cloud.create_devices(&spk, o.devices).await?;
    if subs.len() != o.devices {
        bail!("created {} of {} devices", subs.len(), o.devices);
    }
    // The application: a consumer group subscribed to the meters' property posts.
    let (key_id, secret, group) = property_group(&cloud, &spk, "edge-bench").await?;

    // The plant and the edge's configuration.
    let status_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut config = format!(
        "[gateway]\nproduct_key = \"{gpk}\"\ndevice_name = \"edge-bench\"\ndevice_secret = \"{}\"\n\
         [uplink]\nhost = \"127.0.0.1\"\nport = {}\n[queue]\ndir = \"{}\"\ndrain_rate = {}\n\
         [status]\nlisten = \"127.0.0.1:{status_port}\"\n",
        gw["device_secret"].as_str().context("gateway secret")?,
        cloud.mqtt.port(),
        dir.path().join("queue").display(),
        o.drain_rate,
    );
    for (dn, sec) in &subs {
        let addr = meter(o.points).await?;
        config.push_str(&format!(
            "\n[[devices]]\nname = \"{dn}\"\nproduct_key = \"{spk}\"\ndevice_secret = \"{sec}\"\n\
             transport = \"tcp\"\naddress = \"{addr}\"\npoll_interval = \"{}ms\"\nallow_fast_poll = true\nfault_event = \"\"\n",
            o.interval.as_millis()
        ));
        for p in 0..o.points {
            config.push_str(&format!(
                "[[devices.points]]\nidentifier = \"p{p}\"\nkind = \"holding\"\naddress = \"{p}\"\ntype = \"u16\"\n"
            ));
        }
    }
    let cfg = dir.path().join("edge.toml");
    std::fs::write(&cfg, config)?;
    let edge = EdgeProcess::spawn(o.edge_bin.as_deref(), &cfg)?;
    let status = format!("127.0.0.1:{status_port}");
    let (conn, session, mut receiver) = amqp_receiver(&cloud, &key_id, &secret, &group).await?;
    // Warm up until every device is polled and the uplink is up.
    let deadline = Instant::now() + WAIT * 2;
    loop {
        let up = metric(&status, "ironlink_edge_uplink_up")
            .await
            .unwrap_or(0.0);
        let polled = metric(&status, "ironlink_edge_points_total")
            .await
            .unwrap_or(0.0);
        if up == 1.0 && polled >= (o.devices * usize::from(o.points) * 2) as f64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the edge did not come up (uplink {up}, {polled} points polled)");
        }
        let _ = collect(&mut receiver, Duration::from_millis(200)).await?;
    }
    // ...and until the application has caught up with what queued during start-up.
    loop {
        let got = collect(&mut receiver, Duration::from_secs(1)).await?;
        if got.iter().all(|g| g.1 < 500.0) && !got.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the application never caught up with the edge");
        }
    }

    // Phase 1: steady state.
    let tck = 100.0; // USER_HZ on Linux
    let (epid, cpid) = (edge.pid(), cloud.pid());
    let (p0, e0, c0) = (
        metric(&status, "ironlink_edge_points_total").await?,
        cpu_ticks(epid)?,
        cpu_ticks(cpid)?,
    );
    let t0 = Instant::now();
    let got = collect(&mut receiver, Duration::from_secs(o.seconds)).await?;
    let secs = t0.elapsed().as_secs_f64();
    let (p1, e1, c1) = (
        metric(&status, "ironlink_edge_points_total").await?,
        cpu_ticks(epid)?,
        cpu_ticks(cpid)?,
    );
    let polled = (p1 - p0) / secs;
    let forwarded = got.iter().map(|g| g.2).sum::<usize>() as f64 / secs;
    let edge_cores = (e1 - e0) as f64 / tck / secs;
    let mut lat: Vec<f64> = got.iter().map(|g| g.1).collect();
    lat.sort_by(f64::total_cmp);
    let edge_rss_kib = crate::cloud_process::rss_kib(epid)?;
    let mut result = EdgeResult {
        devices: o.devices,
        points: o.points,
        interval_ms: o.interval.as_millis() as u64,
        offered_points_per_sec: (o.devices * usize::from(o.points)) as f64
            / o.interval.as_secs_f64(),
        polled_points_per_sec: polled,
        forwarded_points_per_sec: forwarded,
        edge_cpu_cores: edge_cores,
        edge_cores_per_10k_points: edge_cores / (polled / 10_000.0).max(1e-9),
        cloud_cpu_cores: (c1 - c0) as f64 / tck / secs,
        edge_rss_kib,
        live_p50_ms: percentile(&lat, 0.5),
        live_p99_ms: percentile(&lat, 0.99),
        drain: None,
    };
    if o.outage_seconds == 0 {
        return Ok(result);
    }

    // Phase 2: the cloud dies, the backlog builds, the cloud returns, the backlog drains.
    drop(receiver);
    drop(session);
    drop(conn);
    let (mqtt, http, amqps) = (cloud.mqtt, cloud.http, cloud.amqps.context("amqps")?);
    let steady_depth = metric(&status, "ironlink_edge_queue_depth").await?;
    cloud.kill9()?;
    tokio::time::sleep(Duration::from_secs(o.outage_seconds)).await;
    let cloud = Cloud::start_bench_with(
        o.cloud_bin.as_deref(),
        &cloud_dir,
        "",
        &[
            "--mqtt-listen",
            &mqtt.to_string(),
            "--http-listen",
            &http.to_string(),
            "--amqps-listen",
            &amqps.to_string(),
        ],
    )?;
    // The edge reconnects after its backoff: the drain starts when its uplink is up.
    let deadline = Instant::now() + WAIT * 2;
    while metric(&status, "ironlink_edge_uplink_up").await? != 1.0 {
        if Instant::now() > deadline {
            bail!("the edge did not reconnect");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back = now_ms_f64();
    let backlog = metric(&status, "ironlink_edge_queue_depth").await? as u64;
    let t0 = Instant::now();
    let (_conn, _session, mut receiver) = amqp_receiver(&cloud, &key_id, &secret, &group).await?;
    let mut live = Vec::new();
    let limit = Duration::from_secs(o.outage_seconds * 10 + 120);
    let drain_s = loop {
        for (t, l, _) in collect(&mut receiver, Duration::from_millis(500)).await? {
            if t >= back {
                live.push(l);
            }
        }
        let depth = metric(&status, "ironlink_edge_queue_depth").await?;
        if depth <= steady_depth.max(o.devices as f64) {
            break t0.elapsed().as_secs_f64();
        }
        if t0.elapsed() > limit {
            bail!("backlog not drained after {limit:?}: {depth} messages left");
        }
    };
    // The group also receives the backlog: only live readings count for latency.
    live.sort_by(f64::total_cmp);
    result.drain = Some(DrainResult {
        outage_s: o.outage_seconds,
        backlog_messages: backlog,
        drain_rate: o.drain_rate,
        drain_s,
        drained_per_sec: backlog as f64 / drain_s.max(1e-9),
        live_received: live.len(),
        live_p50_ms: percentile(&live, 0.5),
        live_p99_ms: percentile(&live, 0.99),
        live_max_ms: live.last().copied().unwrap_or(0.0),
    });
    drop(edge);
    Ok(result)
}

/// A human-readable summary.
pub fn table(r: &EdgeResult) -> String {
    let mut s = format!(
        "edge: {} devices x {} points every {} ms (offered {:.0} points/s)\n\
         polled {:.0} points/s, forwarded to the application {:.0} points/s\n\
         edge CPU {:.2} cores ({:.2} cores per 10k points/s; Neuron's published anchor: 0.83), RSS {} KiB; cloud CPU {:.2} cores\n\
         poll -> application latency p50 {:.1} ms, p99 {:.1} ms\n",
        r.devices,
        r.points,
        r.interval_ms,
        r.offered_points_per_sec,
        r.polled_points_per_sec,
        r.forwarded_points_per_sec,
        r.edge_cpu_cores,
        r.edge_cores_per_10k_points,
        r.edge_rss_kib,
        r.cloud_cpu_cores,
        r.live_p50_ms,
        r.live_p99_ms,
    );
    if let Some(d) = &r.drain {
        s.push_str(&format!(
            "drain: {} s outage -> {} messages queued; drained in {:.1} s ({:.0}/s, rate limit {}/s); live meanwhile: {} readings, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
            d.outage_s,
            d.backlog_messages,
            d.drain_s,
            d.drained_per_sec,
            d.drain_rate,
            d.live_received,
            d.live_p50_ms,
            d.live_p99_ms,
            d.live_max_ms,
        ));
    }
    s
}
