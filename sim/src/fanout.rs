//! `bench fanout`: one product broadcast (`POST /products/{pk}/broadcast`, published on
//! `/broadcast/{pk}/cmd`) reaching N online devices subscribed to it, QoS 0 or 1, against
//! mosquitto fanning one topic out to N subscribers, in the same run. Per round: time until
//! the last device has the message, per-device latency percentiles, deliveries per second,
//! messages missing. Loopback only; bounded in count and time.

use crate::bench::{percentile, start_mosquitto, subscribe_v4};
use crate::cloud_process::{alink_connect, connect_raw, Cloud, WAIT};
use crate::report::{latencies, tally, Probe, Report, TargetReport};
use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::QoS;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

/// Options of `bench fanout`.
#[derive(Debug, Clone)]
pub struct FanoutBench {
    /// Subscribed devices.
    pub devices: usize,
    /// QoS of the subscriptions and the broadcast.
    pub qos: u8,
    /// Broadcasts measured.
    pub rounds: usize,
    /// Also run mosquitto.
    pub vs_mosquitto: bool,
    /// The ironlink-cloud binary.
    pub cloud_bin: Option<PathBuf>,
}

/// One target's figures: the common report, and the median time until the last device had a
/// broadcast, ms.
pub type FanoutResult = (TargetReport, f64);

/// A subscriber: reads broadcasts, acknowledges QoS 1, reports each arrival's round.
async fn subscriber(
    mut s: TcpStream,
    mut buf: BytesMut,
    qos: QoS,
    idx: usize,
    arrivals: mpsc::UnboundedSender<(u16, usize, Instant)>,
) {
    loop {
        match v4::Packet::read(&mut buf, 1 << 16) {
            Ok(v4::Packet::Publish(p)) => {
                let round = p.payload.first().map_or(0, |b| u16::from(*b));
                let _ = arrivals.send((round, idx, Instant::now()));
                if qos == QoS::AtLeastOnce {
                    let mut b = BytesMut::new();
                    if v4::PubAck::new(p.pkid).write(&mut b).is_err()
                        || s.write_all(&b).await.is_err()
                    {
                        return;
                    }
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

/// Connects and subscribes everyone (256 at a time); returns once every SUBACK is in.
async fn subscribe_all(
    addr: SocketAddr,
    connects: Vec<BytesMut>,
    topic: String,
    qos: u8,
    arrivals: mpsc::UnboundedSender<(u16, usize, Instant)>,
) -> Result<()> {
    let gate = Arc::new(Semaphore::new(256));
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<bool>();
    let n = connects.len();
    for (idx, c) in connects.into_iter().enumerate() {
        let (gate, ready_tx, arrivals, topic) = (
            gate.clone(),
            ready_tx.clone(),
            arrivals.clone(),
            topic.clone(),
        );
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let Some(mut s) = connect_raw(addr, &c).await else {
                let _ = ready_tx.send(false);
                return;
            };
            let qos = if qos == 1 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            let subscribed = subscribe_v4(&mut s, &topic, qos).await;
            drop(permit);
            let _ = ready_tx.send(subscribed.is_ok());
            if let Ok(buf) = subscribed {
                subscriber(s, buf, qos, idx, arrivals).await;
            }
        });
    }
    let mut good = 0;
    for _ in 0..n {
        match tokio::time::timeout(WAIT * 4, ready.recv()).await {
            Ok(Some(true)) => good += 1,
            Ok(Some(false)) => {}
            _ => bail!("subscribers stalled: {good} of {n} ready"),
        }
    }
    if good != n {
        bail!("only {good} of {n} subscribers connected and subscribed");
    }
    Ok(())
}

/// Runs the rounds: `publish(round)` sends the broadcast; waits for every arrival.
async fn rounds<F, Fut>(
    target: &str,
    o: &FanoutBench,
    pid: u32,
    arrivals: &mut mpsc::UnboundedReceiver<(u16, usize, Instant)>,
    mut publish: F,
) -> Result<FanoutResult>
where
    F: FnMut(u8) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let probe = Probe::start(pid)?;
    let mut all = Vec::new();
    let mut lat = Vec::new();
    let (mut received, mut duplicated) = (0, 0);
    for round in 1..=o.rounds {
        let r = u8::try_from(round % 256).unwrap_or(0);
        let t0 = Instant::now();
        publish(r).await?;
        let mut got = Vec::with_capacity(o.devices);
        let mut last = t0;
        let deadline = t0 + WAIT;
        while got.len() < o.devices {
            match tokio::time::timeout_at(deadline.into(), arrivals.recv()).await {
                Ok(Some((rr, idx, at))) if rr == u16::from(r) => {
                    got.push(idx);
                    last = at;
                    lat.push(at.duration_since(t0).as_secs_f64() * 1000.0);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        // Late copies of this round show up as duplicates too.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while let Ok((rr, idx, _)) = arrivals.try_recv() {
            if rr == u16::from(r) {
                got.push(idx);
            }
        }
        let (distinct, dup) = tally(got);
        received += distinct;
        duplicated += dup;
        all.push(last.duration_since(t0).as_secs_f64() * 1000.0);
    }
    all.sort_by(f64::total_cmp);
    let median = percentile(&all, 0.5);
    let (server_rss_kib, server_cpu_cores) = probe.finish()?;
    let (p50_ms, p99_ms, max_ms) = latencies(lat);
    let expected = (o.devices * o.rounds) as u64;
    Ok((
        TargetReport {
            target: target.into(),
            expected,
            received,
            per_sec: o.devices as f64 / (median / 1000.0).max(1e-9),
            p50_ms,
            p99_ms,
            max_ms,
            server_rss_kib,
            server_cpu_cores,
            connections: o.devices as u64 + 1,
            lost: expected.saturating_sub(received),
            duplicated,
        },
        median,
    ))
}

async fn bench_ironlink(o: &FanoutBench) -> Result<FanoutResult> {
    let dir = tempfile::tempdir()?;
    let cloud = Cloud::start_bench(
        o.cloud_bin.as_deref(),
        dir.path(),
        "[mqtt]\nconnects_per_second = 1000000\nconnect_burst = 1000000\n",
    )?;
    let pk = cloud.create_product(json!({"name": "fanout"})).await?;
    let connects = cloud
        .create_devices(&pk, o.devices)
        .await?
        .iter()
        .map(|(dn, secret)| alink_connect(&pk, dn, secret, 600))
        .collect::<Result<Vec<_>>>()?;
    let (tx, mut arrivals) = mpsc::unbounded_channel();
    subscribe_all(
        cloud.mqtt,
        connects,
        format!("/broadcast/{pk}/cmd"),
        o.qos,
        tx,
    )
    .await?;
    let cloud = &cloud;
    let pk = &pk;
    rounds("ironlink", o, cloud.pid(), &mut arrivals, |r| async move {
        let (s, v) = cloud
            .api(
                reqwest::Method::POST,
                &format!("/products/{pk}/broadcast"),
                Some(json!({"topic": "cmd", "payload_base64": base64_byte(r), "qos": o.qos})),
            )
            .await?;
        if s != 200 {
            bail!("broadcast: {s} {v}");
        }
        Ok(())
    })
    .await
}

/// One byte in base64 (the round number is the payload).
fn base64_byte(b: u8) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let hi = A.get(usize::from(b >> 2)).copied().unwrap_or(b'A');
    let lo = A.get(usize::from((b & 3) << 4)).copied().unwrap_or(b'A');
    String::from_utf8_lossy(&[hi, lo, b'=', b'=']).into_owned()
}

async fn bench_mosquitto(o: &FanoutBench) -> Result<FanoutResult> {
    let dir = tempfile::tempdir()?;
    let (m, addr) = start_mosquitto(dir.path()).await?;
    let connects = (0..o.devices)
        .map(|i| {
            let mut c = v4::Connect::new(format!("fan-{i}"));
            c.keep_alive = 600;
            let mut b = BytesMut::new();
            c.write(&mut b).map(|_| b).map_err(|e| anyhow!("{e:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let (tx, mut arrivals) = mpsc::unbounded_channel();
    subscribe_all(addr, connects, "/broadcast/pk/cmd".into(), o.qos, tx).await?;
    let mut c = v4::Connect::new("fan-publisher");
    c.keep_alive = 600;
    let mut b = BytesMut::new();
    c.write(&mut b).map_err(|e| anyhow!("{e:?}"))?;
    let publisher = connect_raw(addr, &b).await.context("publisher")?;
    let publisher = tokio::sync::Mutex::new(publisher);
    let publisher = &publisher;
    rounds("mosquitto", o, m.0.id(), &mut arrivals, |r| async move {
        let mut p = v4::Publish::new(
            "/broadcast/pk/cmd",
            if o.qos == 1 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            },
            vec![r],
        );
        p.pkid = u16::from(r).max(1);
        let mut b = BytesMut::new();
        p.write(&mut b).map_err(|e| anyhow!("{e:?}"))?;
        publisher.lock().await.write_all(&b).await?;
        Ok(())
    })
    .await
}

/// Runs Ironlink, then (optionally) mosquitto.
pub async fn run(o: &FanoutBench) -> Result<Report> {
    crate::cloud_process::fd_budget(o.devices)?;
    let mut out = vec![bench_ironlink(o).await?];
    if o.vs_mosquitto {
        out.push(bench_mosquitto(o).await?);
    }
    let details = out
        .iter()
        .map(|(t, ms)| (t.target.clone(), json!({ "all_reached_ms_median": ms })))
        .collect::<serde_json::Map<_, _>>();
    Ok(Report::new(
        "fanout",
        "deliveries/s",
        json!({"devices": o.devices, "qos": o.qos, "rounds": o.rounds}),
        out.into_iter().map(|(t, _)| t).collect(),
        serde_json::Value::Object(details),
        vec![
            "deliveries/s: devices / median time until the last device had the broadcast".into(),
            "latency: broadcast sent (API call or publish) to each device's arrival".into(),
        ],
    ))
}
