//! `bench connections`: authenticated connects per second and RSS per idle connection,
//! Ironlink against mosquitto in the same run. Loopback only; bounded in count and time.

use crate::cloud_process::{alink_connect, connect_raw, cpu_ticks, rss_kib, Cloud, WAIT};
use crate::report::{Report, TargetReport};
use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Options of `bench connections`.
#[derive(Debug, Clone)]
pub struct ConnectionsBench {
    /// Devices (connections) per target.
    pub devices: usize,
    /// Connects in flight at once.
    pub concurrency: usize,
    /// Also measure mosquitto.
    pub vs_mosquitto: bool,
    /// The ironlink-cloud binary (default: next to this executable).
    pub cloud_bin: Option<PathBuf>,
}

/// What one target measured.
#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    /// `ironlink` or `mosquitto`.
    pub target: String,
    /// Connections attempted.
    pub attempted: usize,
    /// Connections that got a successful CONNACK and were held.
    pub held: usize,
    /// Successful connects per second over the connect phase.
    pub connects_per_sec: f64,
    /// CONNECT-to-CONNACK latency percentiles, ms.
    pub latency_ms_p50: f64,
    /// p99, ms.
    pub latency_ms_p99: f64,
    /// max, ms.
    pub latency_ms_max: f64,
    /// Server RSS before connecting, KiB.
    pub rss_idle_kib: u64,
    /// Server RSS with every connection held, KiB.
    pub rss_loaded_kib: u64,
    /// (loaded - idle) / held, bytes.
    pub rss_per_connection_bytes: f64,
    /// Server CPU seconds spent during the connect phase.
    pub server_cpu_sec: f64,
    /// The same over the phase's wall time, cores.
    pub server_cpu_cores: f64,
}

/// The `p` quantile (0..1) of sorted values; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ticks_per_sec() -> f64 {
    // USER_HZ is 100 on every Linux platform Ironlink targets.
    100.0
}

async fn drive(
    target: &str,
    addr: SocketAddr,
    pid: u32,
    connects: Vec<bytes::BytesMut>,
    concurrency: usize,
) -> Result<(TargetResult, Vec<TcpStream>)> {
    let attempted = connects.len();
    let rss_idle = rss_kib(pid)?;
    let cpu0 = cpu_ticks(pid)?;
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let mut tasks = tokio::task::JoinSet::new();
    for c in connects {
        if Instant::now() > deadline {
            break;
        }
        let permit = sem.clone().acquire_owned().await?;
        tasks.spawn(async move {
            let t = Instant::now();
            let s = connect_raw(addr, &c).await;
            drop(permit);
            (s, t.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let mut held = Vec::with_capacity(attempted);
    let mut lat = Vec::with_capacity(attempted);
    while let Some(r) = tasks.join_next().await {
        let (s, ms) = r?;
        if let Some(s) = s {
            held.push(s);
            lat.push(ms);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks(pid)?;
    // Let the server settle (accept queues drained, buffers released) before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_loaded = rss_kib(pid)?;
    lat.sort_by(|a, b| a.total_cmp(b));
    let n = held.len();
    Ok((
        TargetResult {
            target: target.into(),
            attempted,
            held: n,
            connects_per_sec: n as f64 / elapsed.max(1e-9),
            latency_ms_p50: percentile(&lat, 0.50),
            latency_ms_p99: percentile(&lat, 0.99),
            latency_ms_max: lat.last().copied().unwrap_or(0.0),
            rss_idle_kib: rss_idle,
            rss_loaded_kib: rss_loaded,
            rss_per_connection_bytes: if n == 0 {
                0.0
            } else {
                (rss_loaded.saturating_sub(rss_idle) * 1024) as f64 / n as f64
            },
            server_cpu_sec: (cpu1.saturating_sub(cpu0)) as f64 / ticks_per_sec(),
            server_cpu_cores: (cpu1.saturating_sub(cpu0)) as f64
                / ticks_per_sec()
                / elapsed.max(1e-9),
        },
        held,
    ))
}

async fn bench_ironlink(o: &ConnectionsBench) -> Result<Vec<TargetResult>> {
    let dir = tempfile::tempdir()?;
    let config = format!(
        "[mqtt]\nconnects_per_second = 10000000\nconnect_burst = 10000000\nmax_connections = {}\n",
        o.devices + 100
    );
    let cloud = Cloud::start_bench(o.cloud_bin.as_deref(), dir.path(), &config)?;
    let pk = cloud
        .create_product(serde_json::json!({"name": "bench"}))
        .await?;
    let connects = cloud
        .create_devices(&pk, o.devices)
        .await?
        .iter()
        .map(|(dn, secret)| alink_connect(&pk, dn, secret, 600))
        .collect::<Result<Vec<_>>>()?;
    // Round 1 activates every device (its first online is committed before CONNACK);
    // round 2 is the reconnect storm after an outage, the common case in production.
    let (first, held) = drive(
        "ironlink first connect",
        cloud.mqtt,
        cloud.pid(),
        connects.clone(),
        o.concurrency,
    )
    .await?;
    drop(held);
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = reqwest::get(format!("http://{}/metrics", cloud.http))
            .await?
            .text()
            .await?;
        if metrics.lines().any(|l| l == "ironlink_mqtt_connections 0") {
            break;
        }
        if Instant::now() > deadline {
            bail!("connections of round 1 were not closed within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (again, held) = drive(
        "ironlink reconnect",
        cloud.mqtt,
        cloud.pid(),
        connects,
        o.concurrency,
    )
    .await?;
    drop(held);
    Ok(vec![first, again])
}

/// A mosquitto broker this process started; killed when dropped.
#[derive(Debug)]
pub struct Mosquitto(pub Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts mosquitto (Debian package) on an ephemeral loopback port with a generated config.
pub async fn start_mosquitto(dir: &std::path::Path) -> Result<(Mosquitto, SocketAddr)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\nlog_type error\nmax_queued_messages 100000\n"))?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto (apt-get install mosquitto)")?;
    let m = Mosquitto(child);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("mosquitto did not listen on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((m, addr))
}

async fn bench_mosquitto(o: &ConnectionsBench) -> Result<TargetResult> {
    let dir = tempfile::tempdir()?;
    let (m, addr) = start_mosquitto(dir.path()).await?;
    let connects = (0..o.devices)
        .map(|i| {
            let mut c = rumqttc::mqttbytes::v4::Connect::new(format!("bench-{i}"));
            c.keep_alive = 600;
            c.set_login(format!("dev{i}&bench"), "unused");
            let mut b = bytes::BytesMut::new();
            c.write(&mut b)
                .map(|_| b)
                .map_err(|e| anyhow::anyhow!("{e:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let (r, held) = drive("mosquitto", addr, m.0.id(), connects, o.concurrency).await?;
    drop(held);
    Ok(r)
}

/// Runs the benchmark: Ironlink, then (optionally) mosquitto, one after the other.
pub async fn run_connections(o: &ConnectionsBench) -> Result<Report> {
    crate::cloud_process::fd_budget(o.devices)?;
    let mut out = bench_ironlink(o).await?;
    if o.vs_mosquitto {
        out.push(bench_mosquitto(o).await?);
    }
    let details = out
        .iter()
        .map(|r| {
            (
                r.target.clone(),
                serde_json::json!({
                    "rss_idle_kib": r.rss_idle_kib,
                    "rss_per_connection_bytes": r.rss_per_connection_bytes,
                    "server_cpu_sec": r.server_cpu_sec,
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>();
    let mut notes = vec![
        "latency: CONNECT to CONNACK; server RSS with every connection held; CPU over the connect phase".to_owned(),
        "Ironlink checks each device's HMAC signature against the registry; mosquitto runs anonymous".to_owned(),
    ];
    if let Some(b) = out.iter().find(|r| r.target == "mosquitto") {
        for i in out.iter().filter(|r| r.target != "mosquitto") {
            notes.push(format!(
                "{} / mosquitto: RSS per connection {:.0} / {:.0} bytes = {:.2}x",
                i.target,
                i.rss_per_connection_bytes,
                b.rss_per_connection_bytes,
                i.rss_per_connection_bytes / b.rss_per_connection_bytes.max(1e-9)
            ));
        }
    }
    let targets = out
        .iter()
        .map(|r| TargetReport {
            target: r.target.clone(),
            expected: r.attempted as u64,
            received: r.held as u64,
            per_sec: r.connects_per_sec,
            p50_ms: r.latency_ms_p50,
            p99_ms: r.latency_ms_p99,
            max_ms: r.latency_ms_max,
            server_rss_kib: r.rss_loaded_kib,
            server_cpu_cores: r.server_cpu_cores,
            connections: r.held as u64,
            lost: r.attempted.saturating_sub(r.held) as u64,
            duplicated: 0,
        })
        .collect();
    Ok(Report::new(
        "connections",
        "connects/s",
        serde_json::json!({"devices": o.devices, "concurrency": o.concurrency}),
        targets,
        serde_json::Value::Object(details),
        notes,
    ))
}

/// Subscribes a connected MQTT 3.1.1 client to `filter` at `qos` and waits (bounded) for the
/// SUBACK; returns the bytes read past it. A refused filter is an error.
pub(crate) async fn subscribe_v4(
    s: &mut TcpStream,
    filter: &str,
    qos: rumqttc::QoS,
) -> Result<BytesMut> {
    let mut sub = v4::Subscribe::new(filter, qos);
    sub.pkid = 1;
    let mut b = BytesMut::new();
    sub.write(&mut b).map_err(|e| anyhow!("{e:?}"))?;
    s.write_all(&b).await?;
    let mut buf = BytesMut::new();
    loop {
        match v4::Packet::read(&mut buf, 1 << 20) {
            Ok(v4::Packet::SubAck(a)) => {
                if a.return_codes
                    .iter()
                    .any(|c| matches!(c, v4::SubscribeReasonCode::Failure))
                {
                    bail!("subscription to {filter} refused");
                }
                return Ok(buf);
            }
            Ok(_) => {}
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                match tokio::time::timeout(WAIT, s.read_buf(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(Ok(_)) => bail!("the server closed the subscriber"),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => bail!("no SUBACK within {WAIT:?}"),
                }
            }
            Err(e) => bail!("malformed packet from the server: {e:?}"),
        }
    }
}
