//! `bench vehicles`: N simulated JT/T 808 terminals register, authenticate and report a
//! location every interval to the edge gateway process, which forwards them through the cloud
//! process. Reported (one report format): reports acknowledged per second, the answer latency,
//! the edge's RSS and CPU, its RSS per connected terminal, reports refused; every report the
//! edge acknowledged must leave its queue (delivered to the cloud) before the end.
//! `bench codecs`: frames decoded per second on one core, JT/T 808 and GB/T 32960.
//! Loopback only; bounded in count and time.

use crate::cloud_process::{cpu_ticks, rss_kib, Cloud};
use crate::edge_process::{start_edge, wait_drained};
use crate::report::{latencies, Report, TargetReport};
use crate::vehicles::{location, Terminal};
use anyhow::{bail, Result};
use ironlink_protocols::{gb32960 as g, jt808 as j};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Options of `bench vehicles`.
#[derive(Debug, Clone)]
pub struct VehiclesBench {
    /// Terminals.
    pub terminals: usize,
    /// Time between a terminal's reports.
    pub interval: Duration,
    /// Measured reporting phase.
    pub seconds: u64,
    /// ironlink-cloud binary.
    pub cloud_bin: Option<PathBuf>,
    /// ironlink-edge binary.
    pub edge_bin: Option<PathBuf>,
}

/// Runs the benchmark.
pub async fn run(o: &VehiclesBench) -> Result<Report> {
    crate::cloud_process::fd_budget(o.terminals)?;
    let dir = tempfile::tempdir()?;
    let cloud_dir = dir.path().join("cloud");
    std::fs::create_dir_all(&cloud_dir)?;
    let cloud = Cloud::start_bench(o.cloud_bin.as_deref(), &cloud_dir, "")?;
    let (gpk, gsecret) = crate::edge_process::gateway(&cloud, "vehicles-edge").await?;
    let tsl: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/tsl-templates/jt808-terminal.json"))?;
    let tpk = crate::edge_process::sub_product(&cloud, "jt808", Some(tsl)).await?;
    let free = || -> Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (status_port, jt_port) = (free()?, free()?);
    let config = crate::edge_process::config_head(
        &gpk,
        "vehicles-edge",
        &gsecret,
        cloud.mqtt.port(),
        &dir.path().join("queue"),
        status_port,
    ) + &format!(
        "[jt808]\nlisten = \"127.0.0.1:{jt_port}\"\nproduct_key = \"{tpk}\"\nanswer_timeout = \"30s\"\n"
    );
    let (edge, status) =
        start_edge(o.edge_bin.as_deref(), dir.path(), &config, status_port).await?;
    let pid = edge.pid();
    let rss_idle = rss_kib(pid)?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], jt_port).into();

    // Connect, register and authenticate everyone (256 at a time).
    let t0 = Instant::now();
    let gate = Arc::new(Semaphore::new(256));
    let mut joins = Vec::with_capacity(o.terminals);
    for i in 0..o.terminals {
        let gate = gate.clone();
        joins.push(tokio::spawn(async move {
            let _p = gate.acquire_owned().await;
            let mut t = Terminal::connect(addr, &format!("139{i:08}")).await?;
            t.register_and_authenticate().await?;
            anyhow::Ok(t)
        }));
    }
    let mut terminals = Vec::with_capacity(o.terminals);
    for (i, j) in joins.into_iter().enumerate() {
        match j.await? {
            Ok(t) => terminals.push(t),
            Err(e) => bail!(
                "terminal {i}: {e:#}\ncloud log:\n{}",
                crate::cloud_process::log_tail(&cloud_dir, 20)
            ),
        }
    }
    let registered_in = t0.elapsed().as_secs_f64();

    // Reporting: each terminal every interval, starts spread over the first interval.
    let cpu0 = cpu_ticks(pid)?;
    let start = Instant::now();
    let end = start + Duration::from_secs(o.seconds);
    let n = terminals.len().max(1);
    let mut tasks = Vec::with_capacity(n);
    for (i, mut t) in terminals.into_iter().enumerate() {
        let offset = o.interval.mul_f64(i as f64 / n as f64);
        let interval = o.interval;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut sent, mut refused) = (0u64, 0u64);
            let mut next = start + offset;
            let mut k = 0u32;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                k += 1;
                let at = Instant::now();
                let l = location(ironlink_edge::now_ms(), 39_900_000 + k, (k % 1000) as u16);
                sent += 1;
                match t.exchange(&j::Message::Location(l)).await {
                    Ok(0) => lat.push(at.elapsed().as_secs_f64() * 1000.0),
                    _ => refused += 1,
                }
                next += interval;
            }
            (sent, refused, lat, t)
        }));
    }
    let (mut sent, mut refused, mut lat, mut held) = (0, 0, Vec::new(), Vec::new());
    for t in tasks {
        let (s, r, l, term) = t.await?;
        sent += s;
        refused += r;
        lat.extend(l);
        held.push(term);
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid)?.saturating_sub(cpu0)) as f64 / 100.0 / secs.max(1e-9);
    let rss_loaded = rss_kib(pid)?;
    // Everything acknowledged must reach the cloud: the edge's queue empties.
    wait_drained(&status, "reports").await?;
    let acked = sent - refused;
    let per_terminal =
        (rss_loaded.saturating_sub(rss_idle) * 1024) as f64 / held.len().max(1) as f64;
    drop(held);
    let (p50_ms, p99_ms, max_ms) = latencies(lat);
    Ok(Report::new(
        "vehicles",
        "reports/s",
        json!({"terminals": o.terminals, "interval_s": o.interval.as_secs_f64(), "seconds": o.seconds}),
        vec![TargetReport {
            target: "ironlink-edge jt808".into(),
            expected: sent,
            received: acked,
            per_sec: acked as f64 / secs.max(1e-9),
            p50_ms,
            p99_ms,
            max_ms,
            server_rss_kib: rss_loaded,
            server_cpu_cores: cpu,
            connections: o.terminals as u64,
            lost: refused,
            duplicated: 0,
        }],
        json!({"edge_rss_idle_kib": rss_idle, "edge_rss_per_terminal_bytes": per_terminal.round(),
               "register_and_authenticate_s": registered_in}),
        vec![
            "latency: a location sent to the edge's 0x8001 answer (given once the report is in the edge's queue)".into(),
            "server = the edge process; every acknowledged report left the edge's queue for the cloud before the end".into(),
            format!("edge RSS per connected terminal: {per_terminal:.0} bytes ((loaded - idle) / terminals); anchor: go-jt808 reports 1.7 GB for 100,000 terminals (~17,800 bytes each)"),
        ],
    ))
}

/// Frames decoded per second on one core: a JT/T 808 location with extra items (deframe,
/// unescape, check, decode) and a GB/T 32960 real-time report with every information type.
pub fn codecs(frames: usize) -> Result<Report> {
    let loc = crate::vehicles::location(1_700_000_000_000, 39_908_692, 655);
    let h = j::Header::new_2013(0x0200, "13912345678", 126);
    let jt = j::encode_message(&h, &j::Message::Location(loc))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .concat();
    let gb_report = crate::vehicles::report(1_700_000_000_000, 87, 652);
    let gb = g::encode_frame(
        g::cmd::REALTIME,
        g::resp::COMMAND,
        "LGHC4V1D9HE204406",
        &g::encode(&g::Message::Realtime(gb_report)),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut targets = Vec::new();
    for (name, bytes, run) in [
        ("jt808 0x0200 location", &jt, 0u8),
        ("gb32960 0x02 real-time", &gb, 1u8),
    ] {
        // A stream of frames, fed in 4 KiB reads, as a connection would see it.
        let stream: Vec<u8> = bytes.repeat(64);
        let reps = frames.div_ceil(64);
        let t = Instant::now();
        let mut ok = 0u64;
        for _ in 0..reps {
            if run == 0 {
                let mut d = j::Deframer::new();
                let mut out = Vec::new();
                for c in stream.chunks(4096) {
                    d.feed(c, &mut out);
                }
                for f in out.into_iter().flatten() {
                    if let Ok(f) = j::parse_frame(&f) {
                        if j::decode(f.header.msg_id, false, &f.body).is_ok() {
                            ok += 1;
                        }
                    }
                }
            } else {
                let mut d = g::Deframer::new();
                let mut out = Vec::new();
                for c in stream.chunks(4096) {
                    d.feed(c, &mut out);
                }
                for f in out.into_iter().flatten() {
                    if g::decode(&f).is_ok() {
                        ok += 1;
                    }
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        targets.push(TargetReport {
            target: format!("{name} ({} bytes)", bytes.len()),
            expected: (reps * 64) as u64,
            received: ok,
            per_sec: ok as f64 / secs.max(1e-9),
            lost: (reps * 64) as u64 - ok,
            ..TargetReport::default()
        });
    }
    Ok(Report::new(
        "codecs",
        "frames/s (1 core)",
        json!({"frames": frames}),
        targets,
        serde_json::Value::Null,
        vec!["one thread in the simulator process; no server: the server columns are empty".into()],
    ))
}
