//! `bench downlinks`: an application sets properties on N online devices through the HTTP
//! API (`POST /devices/{pk}/{dn}/properties`, `concurrency` requests in flight); each device
//! answers its `property/set` with a `set_reply`. Reported: property sets per second delivered
//! to devices and answered, and the API-to-device latency. Baseline in the same run: mosquitto
//! with one publisher client sending the same number of QoS 1 messages to the devices' topics
//! (`concurrency` in flight), the devices answering on a reply topic the publisher reads.
//! Loopback only; bounded in count and time.

use crate::bench::{start_mosquitto, subscribe_v4};
use crate::cloud_process::{alink_connect, connect_raw, Cloud, WAIT};
use crate::report::{latencies, tally, Probe, Report, TargetReport};
use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::QoS;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

/// Options of `bench downlinks`.
#[derive(Debug, Clone)]
pub struct DownlinkBench {
    /// Online devices.
    pub devices: usize,
    /// Property sets in total.
    pub sets: usize,
    /// Requests in flight.
    pub concurrency: usize,
    /// Also run mosquitto.
    pub vs_mosquitto: bool,
    /// The ironlink-cloud binary.
    pub cloud_bin: Option<PathBuf>,
}

/// A device: subscribes to `sub`, and answers every message on `reply_to(topic)` with its id.
async fn device(
    addr: SocketAddr,
    connect: BytesMut,
    sub: String,
    arrivals: mpsc::UnboundedSender<(u64, Instant)>,
    ready: mpsc::UnboundedSender<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let Some(mut s) = connect_raw(addr, &connect).await else {
        let _ = ready.send(false);
        return;
    };
    let Ok(mut buf) = subscribe_v4(&mut s, &sub, QoS::AtLeastOnce).await else {
        let _ = ready.send(false);
        return;
    };
    // Connected and subscribed: let the next device connect.
    drop(permit);
    let _ = ready.send(true);
    loop {
        match v4::Packet::read(&mut buf, 1 << 16) {
            Ok(v4::Packet::Publish(p)) => {
                let at = Instant::now();
                let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                let _ = arrivals.send((v["params"]["n"].as_u64().unwrap_or(u64::MAX), at));
                let reply = v4::Publish::new(
                    format!("{}_reply", p.topic),
                    QoS::AtMostOnce,
                    json!({"id": v["id"], "code": 200, "data": {}}).to_string(),
                );
                let mut out = BytesMut::new();
                if p.qos == QoS::AtLeastOnce {
                    let _ = v4::PubAck::new(p.pkid).write(&mut out);
                }
                let _ = reply.write(&mut out);
                if s.write_all(&out).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                match s.read_buf(&mut buf).await {
                    Ok(n) if n > 0 => {}
                    _ => return,
                }
            }
            Err(_) => return,
        }
    }
}

/// Starts the devices and waits for every SUBACK.
async fn devices(
    addr: SocketAddr,
    connects: Vec<(BytesMut, String)>,
) -> Result<mpsc::UnboundedReceiver<(u64, Instant)>> {
    let (arr_tx, arrivals) = mpsc::unbounded_channel();
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(256));
    let n = connects.len();
    for (c, sub) in connects {
        let (gate, arr_tx, ready_tx) = (gate.clone(), arr_tx.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let Ok(permit) = gate.acquire_owned().await else {
                return;
            };
            device(addr, c, sub, arr_tx, ready_tx, permit).await;
        });
    }
    for i in 0..n {
        match tokio::time::timeout(WAIT * 4, ready.recv()).await {
            Ok(Some(true)) => {}
            _ => bail!("device {i} of {n} did not subscribe"),
        }
    }
    Ok(arrivals)
}

/// Collects `n` arrivals (bounded by WAIT after the last); returns their set numbers and times.
async fn collect(
    arrivals: &mut mpsc::UnboundedReceiver<(u64, Instant)>,
    n: usize,
) -> Vec<(u64, Instant)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(WAIT, arrivals.recv()).await {
            Ok(Some(t)) => out.push(t),
            _ => break,
        }
    }
    out
}

fn summarize(
    target: &str,
    sets: usize,
    sent_at: &[Instant],
    got: &[(u64, Instant)],
    t0: Instant,
    probe: &Probe,
    connections: usize,
) -> Result<TargetReport> {
    let end = got.iter().map(|g| g.1).max().unwrap_or(t0);
    // Sends are numbered: each arrival is matched to its own send (the API path records
    // when the request went out, the mosquitto path when the PUBLISH was written).
    let lat = got
        .iter()
        .filter_map(|(n, at)| {
            let sent = sent_at.get(usize::try_from(*n).ok()?)?;
            Some(at.saturating_duration_since(*sent).as_secs_f64() * 1000.0)
        })
        .collect();
    let (p50_ms, p99_ms, max_ms) = latencies(lat);
    let (received, duplicated) = tally(got.iter().map(|g| g.0));
    let (server_rss_kib, server_cpu_cores) = probe.finish()?;
    Ok(TargetReport {
        target: target.into(),
        expected: sets as u64,
        received,
        per_sec: got.len() as f64 / end.duration_since(t0).as_secs_f64().max(1e-9),
        p50_ms,
        p99_ms,
        max_ms,
        server_rss_kib,
        server_cpu_cores,
        connections: connections as u64,
        lost: (sets as u64).saturating_sub(received),
        duplicated,
    })
}

async fn bench_ironlink(o: &DownlinkBench) -> Result<TargetReport> {
    let dir = tempfile::tempdir()?;
    let cloud = Cloud::start_bench(
        o.cloud_bin.as_deref(),
        dir.path(),
        "[mqtt]\nconnects_per_second = 1000000\nconnect_burst = 1000000\n",
    )?;
    let pk = cloud.create_product(json!({"name": "downlinks"})).await?;
    let devs = cloud.create_devices(&pk, o.devices).await?;
    let connects = devs
        .iter()
        .map(|(dn, secret)| {
            Ok((
                alink_connect(&pk, dn, secret, 600)?,
                format!("/sys/{pk}/{dn}/thing/service/property/set"),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut arrivals = devices(cloud.mqtt, connects).await?;
    let probe = Probe::start(cloud.pid())?;
    let http = reqwest::Client::new();
    let gate = Arc::new(Semaphore::new(o.concurrency));
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    for i in 0..o.sets {
        let permit = gate.clone().acquire_owned().await?;
        let (dn, _) = devs.get(i % devs.len()).context("device")?;
        let req = http
            .post(format!(
                "http://{}/api/v1/devices/{pk}/{dn}/properties",
                cloud.http
            ))
            .bearer_auth(&cloud.token)
            .json(&json!({"params": {"n": i}}));
        let sent_tx = sent_tx.clone();
        tokio::spawn(async move {
            let at = Instant::now();
            let ok = matches!(req.send().await, Ok(r) if r.status().is_success());
            drop(permit);
            let _ = sent_tx.send((i, at, ok));
        });
    }
    drop(sent_tx);
    let got = collect(&mut arrivals, o.sets).await;
    let mut sent = vec![t0; o.sets];
    let mut refused = 0;
    while let Some((i, at, ok)) = sent_rx.recv().await {
        if ok {
            if let Some(s) = sent.get_mut(i) {
                *s = at;
            }
        } else {
            refused += 1;
        }
    }
    if refused > 0 {
        bail!("{refused} property sets refused by the API");
    }
    summarize("ironlink api", o.sets, &sent, &got, t0, &probe, o.devices)
}

async fn bench_mosquitto(o: &DownlinkBench) -> Result<TargetReport> {
    let dir = tempfile::tempdir()?;
    let (m, addr) = start_mosquitto(dir.path()).await?;
    let connects = (0..o.devices)
        .map(|i| {
            let mut c = v4::Connect::new(format!("dl-{i}"));
            c.keep_alive = 600;
            let mut b = BytesMut::new();
            c.write(&mut b).map_err(|e| anyhow!("{e:?}"))?;
            Ok((b, format!("/sys/pk/dev{i}/thing/service/property/set")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut arrivals = devices(addr, connects).await?;
    let probe = Probe::start(m.0.id())?;
    let mut c = v4::Connect::new("dl-app");
    c.keep_alive = 600;
    let mut b = BytesMut::new();
    c.write(&mut b).map_err(|e| anyhow!("{e:?}"))?;
    let app = connect_raw(addr, &b).await.context("publisher")?;
    let (mut rd, mut wr) = app.into_split();
    // The publisher: `concurrency` QoS 1 messages in flight, the next sent at each PUBACK.
    let (ack_tx, mut acks) = mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        loop {
            match v4::Packet::read(&mut buf, 1 << 16) {
                Ok(v4::Packet::PubAck(_)) => {
                    let _ = ack_tx.send(());
                }
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    match rd.read_buf(&mut buf).await {
                        Ok(n) if n > 0 => {}
                        _ => return,
                    }
                }
                Err(_) => return,
            }
        }
    });
    let t0 = Instant::now();
    let mut sent = Vec::with_capacity(o.sets);
    let mut inflight = 0;
    for i in 0..o.sets {
        while inflight >= o.concurrency {
            match tokio::time::timeout(WAIT, acks.recv()).await {
                Ok(Some(())) => inflight -= 1,
                _ => bail!("mosquitto stopped acknowledging"),
            }
        }
        let mut p = v4::Publish::new(
            format!("/sys/pk/dev{}/thing/service/property/set", i % o.devices),
            QoS::AtLeastOnce,
            json!({"id": i.to_string(), "version": "1.0", "params": {"n": i}, "method": "thing.service.property.set"}).to_string(),
        );
        p.pkid = u16::try_from(i % 65_000 + 1).unwrap_or(1);
        let mut b = BytesMut::new();
        p.write(&mut b).map_err(|e| anyhow!("{e:?}"))?;
        sent.push(Instant::now());
        wr.write_all(&b).await?;
        inflight += 1;
    }
    let got = collect(&mut arrivals, o.sets).await;
    summarize("mosquitto", o.sets, &sent, &got, t0, &probe, o.devices + 1)
}

/// Runs Ironlink, then (optionally) mosquitto.
pub async fn run(o: &DownlinkBench) -> Result<Report> {
    crate::cloud_process::fd_budget(o.devices)?;
    let mut out = vec![bench_ironlink(o).await?];
    if o.vs_mosquitto {
        out.push(bench_mosquitto(o).await?);
    }
    Ok(Report::new(
        "downlinks",
        "sets/s",
        json!({"devices": o.devices, "sets": o.sets, "concurrency": o.concurrency}),
        out,
        serde_json::Value::Null,
        vec![
            "Ironlink: POST /devices/{pk}/{dn}/properties (a stored call each), devices reply; mosquitto: QoS 1 PUBLISH of the same JSON, no reply tracking".into(),
            "latency: request sent (or PUBLISH written) to the device's arrival".into(),
        ],
    ))
}
