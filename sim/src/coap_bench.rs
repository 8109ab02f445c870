//! `bench coap`: N NB-IoT devices (created in the cloud's registry first) authenticate with the
//! edge's CoAP server (Alibaba `/auth`), then each posts a property every interval (CON, the
//! token in option 2088), from one UDP socket per 500 devices. Reported: posts answered 2.04
//! per second, the answer latency, the edge's RSS and CPU; every answered post must leave the
//! edge's queue for the cloud. Loopback only; bounded in count and time.

use crate::cloud_process::{cpu_ticks, rss_kib, Cloud};
use crate::edge_process::{start_edge, wait_drained};
use crate::report::{latencies, Report, TargetReport};
use anyhow::{bail, Result};
use ironlink_protocols::coap::{self, opt, Code, Kind, Message};
use ironlink_shared::sign::SignMethod;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Options of `bench coap`.
#[derive(Debug, Clone)]
pub struct CoapBench {
    /// Devices.
    pub devices: usize,
    /// Time between a device's posts.
    pub interval: Duration,
    /// Measured phase.
    pub seconds: u64,
    /// ironlink-cloud binary.
    pub cloud_bin: Option<PathBuf>,
    /// ironlink-edge binary.
    pub edge_bin: Option<PathBuf>,
}

/// One CON request and its answer (bounded wait, retransmitted twice like a real client).
async fn request(s: &UdpSocket, to: std::net::SocketAddr, m: &Message) -> Result<Message> {
    let bytes = coap::encode(m);
    let mut buf = vec![0u8; 2048];
    for attempt in 0..3u32 {
        s.send_to(&bytes, to).await?;
        let wait = Duration::from_secs(2) * (attempt + 1);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, s.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => {
                    if let Ok(r) = coap::parse(&buf[..n]) {
                        if r.message_id == m.message_id {
                            return Ok(r);
                        }
                    }
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => break,
            }
        }
    }
    bail!("no answer to message {} after 3 tries", m.message_id)
}

fn con(mid: u16, path: &str, token: Option<&str>, body: &Value) -> Message {
    let mut m = Message::new(Kind::Con, Code::POST, mid, &mid.to_be_bytes());
    m.set_path(path);
    m.add_uint(opt::CONTENT_FORMAT, 50);
    if let Some(t) = token {
        m.add(2088, t.as_bytes());
    }
    m.payload = body.to_string().into_bytes();
    m
}

/// Runs the benchmark.
pub async fn run(o: &CoapBench) -> Result<Report> {
    let dir = tempfile::tempdir()?;
    let cloud_dir = dir.path().join("cloud");
    std::fs::create_dir_all(&cloud_dir)?;
    let cloud = Cloud::start_bench(o.cloud_bin.as_deref(), &cloud_dir, "")?;
    let (gpk, gsecret) = crate::edge_process::gateway(&cloud, "coap-edge").await?;
    let pk = crate::edge_process::sub_product(&cloud, "nb-iot", None).await?;
    let devices = cloud.create_devices(&pk, o.devices).await?;
    let status_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let coap_port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config =
        crate::edge_process::config_head(
            &gpk,
            "coap-edge",
            &gsecret,
            cloud.mqtt.port(),
            &dir.path().join("queue"),
            status_port,
        ) + &format!("[coap]\nlisten = \"127.0.0.1:{coap_port}\"\nproduct_key = \"{pk}\"\n");
    let (edge, status) =
        start_edge(o.edge_bin.as_deref(), dir.path(), &config, status_port).await?;
    let pid = edge.pid();
    let srv: std::net::SocketAddr = ([127, 0, 0, 1], coap_port).into();
    // One socket per 500 devices; each socket's devices take turns (one exchange at a time).
    let groups: Vec<Vec<(String, String)>> = devices.chunks(500).map(<[_]>::to_vec).collect();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for group in groups {
        let pk = pk.clone();
        tasks.push(tokio::spawn(async move {
            let s = UdpSocket::bind("127.0.0.1:0").await?;
            let mut tokens = HashMap::new();
            let mut mid: u16 = 1;
            for (dn, secret) in &group {
                let mut f: Map<String, Value> = serde_json::from_value(json!({
                    "productKey": pk, "deviceName": dn, "clientId": dn, "signmethod": "hmacsha1"}))?;
                let sign = ironlink_edge::coap_server::auth_sign(SignMethod::HmacSha1, secret, &f);
                f.insert("sign".into(), json!(sign));
                mid = mid.wrapping_add(1);
                let r = request(&s, srv, &con(mid, "/auth", None, &Value::Object(f))).await?;
                if r.code != Code::CONTENT {
                    bail!("{dn}: /auth answered {}", r.code);
                }
                let v: Value = serde_json::from_slice(&r.payload)?;
                tokens.insert(dn.clone(), v["token"].as_str().unwrap_or("").to_owned());
            }
            anyhow::Ok((s, tokens, mid))
        }));
    }
    let mut sockets = Vec::new();
    for t in tasks {
        sockets.push(t.await??);
    }
    let auth_s = t0.elapsed().as_secs_f64();

    let cpu0 = cpu_ticks(pid)?;
    let start = Instant::now();
    let rounds = (o.seconds as f64 / o.interval.as_secs_f64())
        .ceil()
        .max(1.0) as usize;
    let pk = Arc::new(pk);
    let mut tasks = Vec::new();
    for (s, tokens, mut mid) in sockets {
        let pk = pk.clone();
        let interval = o.interval;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut sent, mut ok) = (0u64, 0u64);
            let names: Vec<&String> = tokens.keys().collect();
            for r in 0..rounds {
                let round_start = start + interval * r as u32;
                for (k, dn) in names.iter().enumerate() {
                    let due = round_start + interval.mul_f64(k as f64 / names.len().max(1) as f64);
                    tokio::time::sleep_until(due.into()).await;
                    mid = mid.wrapping_add(1);
                    let topic = format!("/topic/sys/{pk}/{dn}/thing/event/property/post");
                    let body = json!({"id": mid.to_string(), "params": {"temperature": 20.0 + (r % 10) as f64}});
                    let at = Instant::now();
                    sent += 1;
                    if let Ok(a) = request(&s, srv, &con(mid, &topic, tokens.get(*dn).map(String::as_str), &body)).await {
                        if a.code == Code::CHANGED {
                            ok += 1;
                            lat.push(at.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                }
            }
            (sent, ok, lat)
        }));
    }
    let (mut sent, mut ok, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        let (s, k, l) = t.await?;
        sent += s;
        ok += k;
        lat.extend(l);
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid)?.saturating_sub(cpu0)) as f64 / 100.0 / secs.max(1e-9);
    let rss = rss_kib(pid)?;
    wait_drained(&status, "posts").await?;
    drop(edge);
    let (p50_ms, p99_ms, max_ms) = latencies(lat);
    Ok(Report::new(
        "coap",
        "posts/s",
        json!({"devices": o.devices, "interval_s": o.interval.as_secs_f64(), "seconds": o.seconds}),
        vec![TargetReport {
            target: "ironlink-edge coap".into(),
            expected: sent,
            received: ok,
            per_sec: ok as f64 / secs.max(1e-9),
            p50_ms,
            p99_ms,
            max_ms,
            server_rss_kib: rss,
            server_cpu_cores: cpu,
            connections: o.devices as u64,
            lost: sent - ok,
            duplicated: 0,
        }],
        json!({"auth_s": auth_s}),
        vec![
            "posts/s: CON property posts answered 2.04 (queued at the edge) per second; every one left the edge's queue for the cloud before the end".into(),
            "each socket carries 500 devices, one exchange at a time (as a NAT'd group of modules would)".into(),
        ],
    ))
}
