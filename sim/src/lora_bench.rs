//! `bench lora`: N simulated ABP LoRa nodes behind F simulated Semtech packet forwarders (UDP),
//! each node reporting a Cayenne LPP temperature every interval, through the edge process's
//! LoRaWAN server and the cloud process. A warm-up round registers every node in the cloud's
//! registry first (it is paced by the registry, see the notes). Reported: uplinks the edge
//! accepted per second (its counter), the edge's RSS and CPU; the run fails unless the edge's
//! queue drains into the cloud afterwards. Loopback only; bounded in count and time.

use crate::cloud_process::{cpu_ticks, rss_kib, Cloud};
use crate::edge_process::{metric, start_edge, wait_drained};
use crate::report::{Report, TargetReport};
use anyhow::{bail, Result};
use base64::Engine;
use lorawan::creator::DataPayloadCreator;
use lorawan::keys::{AppSKey, NewSKey};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Options of `bench lora`.
#[derive(Debug, Clone)]
pub struct LoraBench {
    /// Nodes.
    pub nodes: usize,
    /// Packet forwarders.
    pub forwarders: usize,
    /// Time between a node's uplinks.
    pub interval: Duration,
    /// Measured phase.
    pub seconds: u64,
    /// ironlink-cloud binary.
    pub cloud_bin: Option<PathBuf>,
    /// ironlink-edge binary.
    pub edge_bin: Option<PathBuf>,
}

fn key(i: usize, salt: u8) -> [u8; 16] {
    let mut k = [salt; 16];
    k[..8].copy_from_slice(&(i as u64).to_be_bytes());
    k
}

fn dev_addr(i: usize) -> u32 {
    0x0100_0000 | i as u32
}

fn uplink(i: usize, fcnt: u32) -> Vec<u8> {
    let t = 200 + (fcnt % 50) as i16;
    let lpp = [0x01, 0x67, (t >> 8) as u8, t as u8];
    let mut phy = DataPayloadCreator::new();
    phy.set_uplink(true)
        .set_confirmed(false)
        .set_f_port(1)
        .set_dev_addr(&dev_addr(i).to_le_bytes())
        .set_fctrl(&lorawan::parser::FCtrl::new(0, true))
        .set_fcnt(fcnt);
    phy.build(
        &lpp,
        &[],
        &NewSKey::from(key(i, 0x11)),
        &AppSKey::from(key(i, 0x22)),
    )
    .map(<[u8]>::to_vec)
    .unwrap_or_default()
}

fn push(gw: usize, token: u16, phy: &[u8]) -> Vec<u8> {
    let t = token.to_be_bytes();
    let mut b = vec![2, t[0], t[1], 0x00];
    b.extend_from_slice(&(0xAA00_0000_0000_0000u64 | gw as u64).to_be_bytes());
    let data = base64::engine::general_purpose::STANDARD.encode(phy);
    b.extend_from_slice(
        json!({"rxpk": [{"tmst": 1, "freq": 868.1, "chan": 0, "rfch": 0, "stat": 1, "modu": "LORA",
                         "datr": "SF7BW125", "codr": "4/5", "rssi": -60, "lsnr": 7.0, "size": phy.len(), "data": data}]})
        .to_string()
        .as_bytes(),
    );
    b
}

/// Runs the benchmark.
pub async fn run(o: &LoraBench) -> Result<Report> {
    let dir = tempfile::tempdir()?;
    let cloud_dir = dir.path().join("cloud");
    std::fs::create_dir_all(&cloud_dir)?;
    let cloud = Cloud::start_bench(o.cloud_bin.as_deref(), &cloud_dir, "")?;
    let (gpk, gsecret) = crate::edge_process::gateway(&cloud, "lora-edge").await?;
    let npk = crate::edge_process::sub_product(&cloud, "lora-nodes", None).await?;
    let status_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let lora_port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut config =
        crate::edge_process::config_head(
            &gpk,
            "lora-edge",
            &gsecret,
            cloud.mqtt.port(),
            &dir.path().join("queue"),
            status_port,
        ) + &format!("[lorawan]\nlisten = \"127.0.0.1:{lora_port}\"\nproduct_key = \"{npk}\"\n");
    let hex = |k: &[u8]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
    for i in 0..o.nodes {
        config.push_str(&format!(
            "[[lorawan.devices]]\ndev_eui = \"{:016x}\"\ndev_addr = \"{:08x}\"\nnwk_skey = \"{}\"\napp_skey = \"{}\"\n",
            0x70B3_D57E_0000_0000u64 | i as u64,
            dev_addr(i),
            hex(&key(i, 0x11)),
            hex(&key(i, 0x22)),
        ));
    }
    let (edge, status) =
        start_edge(o.edge_bin.as_deref(), dir.path(), &config, status_port).await?;
    let pid = edge.pid();
    let lns: std::net::SocketAddr = ([127, 0, 0, 1], lora_port).into();
    let mut fwds = Vec::new();
    for g in 0..o.forwarders.max(1) {
        let s = UdpSocket::bind("127.0.0.1:0").await?;
        let mut pull = vec![2, 0, 1, 0x02];
        pull.extend_from_slice(&(0xAA00_0000_0000_0000u64 | g as u64).to_be_bytes());
        s.send_to(&pull, lns).await?;
        fwds.push(s);
    }
    let frames = |status: String| async move {
        metric(&status, "ironlink_edge_frames_total{protocol=\"lorawan\"}")
            .await
            .unwrap_or(0.0)
    };
    // Warm-up: every node's first uplink (registration in the cloud's registry), paced.
    let t0 = Instant::now();
    let mut fcnt = vec![0u32; o.nodes];
    let warm_deadline = Instant::now() + Duration::from_secs(600);
    let mut pending: Vec<usize> = (0..o.nodes).collect();
    while !pending.is_empty() {
        for &i in pending.iter().take(200) {
            fcnt[i] += 1;
            let f = &fwds[i % fwds.len()];
            f.send_to(
                &push(i % fwds.len(), fcnt[i] as u16, &uplink(i, fcnt[i])),
                lns,
            )
            .await?;
        }
        let target = (o.nodes - pending.len() + pending.len().min(200)) as f64;
        let wait_until = Instant::now() + Duration::from_secs(30);
        while frames(status.clone()).await < target && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let done = frames(status.clone()).await as usize;
        pending = (done..o.nodes).collect();
        if Instant::now() > warm_deadline {
            bail!("warm-up: {done} of {} nodes registered in 600 s", o.nodes);
        }
    }
    let registered_in = t0.elapsed().as_secs_f64();
    let before = frames(status.clone()).await;
    let refused_before =
        metric(&status, "ironlink_edge_refused_total{protocol=\"lorawan\"").await?;

    // Measured phase: every node every interval, spread evenly, bounded in count and time.
    let cpu0 = cpu_ticks(pid)?;
    let start = Instant::now();
    let total = (o.nodes as f64 * o.seconds as f64 / o.interval.as_secs_f64()).ceil() as usize;
    let gap = o.interval.as_secs_f64() / o.nodes.max(1) as f64;
    let mut sent = 0usize;
    for k in 0..total {
        let i = k % o.nodes;
        let due = start + Duration::from_secs_f64(k as f64 * gap);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        fcnt[i] += 1;
        let g = i % fwds.len();
        fwds[g]
            .send_to(&push(g, k as u16, &uplink(i, fcnt[i])), lns)
            .await?;
        sent += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    // Let the edge finish what it has received.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut accepted = frames(status.clone()).await - before;
    while accepted < sent as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = frames(status.clone()).await - before;
        if now == accepted {
            break;
        }
        accepted = now;
    }
    let cpu = (cpu_ticks(pid)?.saturating_sub(cpu0)) as f64 / 100.0 / secs.max(1e-9);
    let rss = rss_kib(pid)?;
    let refused =
        metric(&status, "ironlink_edge_refused_total{protocol=\"lorawan\"").await? - refused_before;
    wait_drained(&status, "uplinks").await?;
    drop(edge);
    let accepted = accepted as u64;
    Ok(Report::new(
        "lora",
        "uplinks/s",
        json!({"nodes": o.nodes, "forwarders": o.forwarders, "interval_s": o.interval.as_secs_f64(), "seconds": o.seconds}),
        vec![TargetReport {
            target: "ironlink-edge lorawan".into(),
            expected: sent as u64,
            received: accepted,
            per_sec: accepted as f64 / secs.max(1e-9),
            server_rss_kib: rss,
            server_cpu_cores: cpu,
            connections: o.forwarders as u64,
            lost: (sent as u64).saturating_sub(accepted),
            ..TargetReport::default()
        }],
        json!({"offered_per_sec": sent as f64 / secs.max(1e-9), "refused_during_run": refused,
               "warm_up_registration_s": registered_in}),
        vec![
            "uplinks/s: uplinks the edge accepted (MIC, counters, decrypted, decoded, queued) per second of the measured phase; every one left the edge's queue for the cloud before the end".into(),
            "UDP: an uplink the edge did not read in time is lost (as with a real forwarder); lost counts them".into(),
        ],
    ))
}
