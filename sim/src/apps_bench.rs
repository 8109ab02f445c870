//! `bench apps`: device -> application delivery through a consumer group over AMQP (TLS),
//! against mosquitto relaying the same publishers to one MQTT subscriber, in the same run; then
//! the backlog replay rate while fresh messages keep flowing, with their latency.
//! Loopback only; bounded in count and time.

use crate::bench::{percentile, start_mosquitto, subscribe_v4};
use crate::cloud_process::{alink_connect, connect_raw, Cloud, WAIT};
use crate::report::{latencies, tally, Probe, Report, TargetReport};
use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use fe2o3_amqp::connection::{Connection, ConnectionHandle};
use fe2o3_amqp::link::Receiver;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::{Session, SessionHandle};
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value as AmqpValue;
use rumqttc::mqttbytes::v4;
use serde::Serialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Options of `bench apps`.
#[derive(Debug, Clone)]
pub struct AppsBench {
    /// Publishing devices.
    pub devices: usize,
    /// Messages per device in the throughput phase.
    pub messages: usize,
    /// Messages left for the group while no client is connected (backlog phase).
    pub backlog: usize,
    /// Fresh messages per second during the backlog replay.
    pub fresh_rate: u32,
    /// Also run mosquitto.
    pub vs_mosquitto: bool,
    /// The ironlink-cloud binary.
    pub cloud_bin: Option<PathBuf>,
}

/// Backlog phase.
#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    /// Backlog size.
    pub backlog: usize,
    /// Backlog messages replayed per second.
    pub replay_per_sec: f64,
    /// Fresh messages sent during the replay.
    pub fresh: usize,
    /// Their latency, ms.
    pub fresh_p50_ms: f64,
    /// p99, ms.
    pub fresh_p99_ms: f64,
}

pub(crate) fn now_ms_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Connects every publisher (256 connects in flight: a burst of thousands overflows the
/// server's accept queue), before anyone publishes, so that the rate measured is publishing.
async fn connect_all(addr: SocketAddr, connects: Vec<BytesMut>) -> Result<Vec<TcpStream>> {
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::with_capacity(connects.len());
    for c in connects {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            crate::cloud_process::connect_raw_why(addr, &c).await
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for (i, t) in tasks.into_iter().enumerate() {
        out.push(t.await?.with_context(|| format!("publisher {i}"))?);
    }
    Ok(out)
}

/// Every device publishes `n` stamped messages on its property topic (sequence numbers from
/// `base + i * n` for device `i`), as fast as its window allows; all connect first.
async fn spawn_publishers(
    addr: SocketAddr,
    pk: &str,
    devices: &[(String, String)],
    base: usize,
    n: usize,
) -> Result<Vec<tokio::task::JoinHandle<Result<()>>>> {
    let connects = devices
        .iter()
        .map(|(dn, secret)| alink_connect(pk, dn, secret, 600))
        .collect::<Result<Vec<_>>>()?;
    let streams = connect_all(addr, connects).await?;
    Ok(streams
        .into_iter()
        .zip(devices)
        .enumerate()
        .map(|(i, (s, (dn, _)))| {
            tokio::spawn(publish(
                s,
                format!("/sys/{pk}/{dn}/thing/event/property/post"),
                base + i * n,
                n,
                None,
            ))
        })
        .collect())
}

/// QoS 1 property posts carrying their send time; waits for every PUBACK.
async fn publish(
    mut s: TcpStream,
    topic: String,
    first: usize,
    n: usize,
    rate: Option<u32>,
) -> Result<()> {
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let start = Instant::now();
    let mut acked = 0;
    let mut sent = 0;
    while acked < n {
        while sent < n && sent - acked < 64 {
            if let Some(r) = rate {
                let due = start + Duration::from_secs_f64(sent as f64 / f64::from(r.max(1)));
                if Instant::now() < due {
                    break;
                }
            }
            let body = json!({"id": (first + sent).to_string(), "params": {"seq": first + sent, "t": now_ms_f64()}});
            let mut p = v4::Publish::new(
                &topic,
                rumqttc::QoS::AtLeastOnce,
                body.to_string().into_bytes(),
            );
            p.pkid = u16::try_from(sent % 60_000 + 1).unwrap_or(1);
            p.write(&mut out).map_err(|e| anyhow!("{e:?}"))?;
            sent += 1;
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        let wait = if sent < n && sent - acked < 64 {
            Duration::from_millis(2)
        } else {
            WAIT
        };
        match tokio::time::timeout(wait, s.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => bail!("publisher connection closed"),
            Ok(Ok(_)) => {}
            Err(_) if wait < WAIT => {}
            Err(_) => bail!("no PUBACK within {WAIT:?}"),
        }
        while buf.len() >= 4 && buf[0] == 0x40 {
            let _ = buf.split_to(4);
            acked += 1;
        }
        if !buf.is_empty() && buf[0] != 0x40 {
            bail!("unexpected packet 0x{:02x}", buf[0]);
        }
    }
    Ok(())
}

/// (seq, send time ms) from a property message as applications receive it (Ironlink's
/// `items` form, or the device's own `params` form from mosquitto).
fn stamp(body: &[u8]) -> Option<(u64, f64)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    if let Some(items) = v.get("items") {
        return Some((
            items["seq"]["value"].as_u64()?,
            items["t"]["value"].as_f64()?,
        ));
    }
    Some((v["params"]["seq"].as_u64()?, v["params"]["t"].as_f64()?))
}

pub(crate) async fn amqp_receiver(
    cloud: &Cloud,
    key_id: &str,
    secret: &str,
    group: &str,
) -> Result<(ConnectionHandle<()>, SessionHandle<()>, Receiver)> {
    let addr = cloud.amqps.context("the cloud has no AMQP listener")?;
    let ca = std::fs::read(cloud.data_dir.join("tls/ca.pem"))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca[..]) {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    let ts = format!("{}", now_ms_f64() as u64);
    let user = format!("bench|authMode=aksign,signMethod=hmacsha1,timestamp={ts},authId={key_id},consumerGroupId={group}|");
    let pass =
        ironlink_cloud::apps::amqp::password("hmacsha1", secret, key_id, &ts).context("sign")?;
    let mut conn = Connection::builder()
        .container_id("bench-app")
        .hostname("localhost")
        .idle_time_out(60_000u32)
        .sasl_profile(SaslProfile::Plain {
            username: user,
            password: pass,
        })
        .open_with_stream(tls)
        .await
        .map_err(|e| anyhow!("AMQP open: {e}"))?;
    let mut session = Session::begin(&mut conn)
        .await
        .map_err(|e| anyhow!("AMQP begin: {e}"))?;
    let receiver = Receiver::builder()
        .name("bench")
        .source("group")
        .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Auto(500))
        .attach(&mut session)
        .await
        .map_err(|e| anyhow!("AMQP attach: {e}"))?;
    Ok((conn, session, receiver))
}

/// Receives until `until` says stop; returns (seq, latency ms, replayed by arrival order).
async fn receive_amqp(r: &mut Receiver, n: usize) -> Result<Vec<(u64, f64)>> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let d = tokio::time::timeout(WAIT, r.recv::<Body<AmqpValue>>())
            .await
            .map_err(|_| {
                anyhow!(
                    "AMQP: {} of {n} received, then nothing for {WAIT:?}",
                    got.len()
                )
            })?
            .map_err(|e| anyhow!("AMQP recv: {e}"))?;
        let now = now_ms_f64();
        let body: Vec<u8> = match d.body() {
            Body::Data(batch) => batch.iter().flat_map(|d| d.0.to_vec()).collect(),
            _ => Vec::new(),
        };
        r.accept(&d)
            .await
            .map_err(|e| anyhow!("AMQP accept: {e}"))?;
        if let Some((seq, t)) = stamp(&body) {
            got.push((seq, now - t));
        }
    }
    Ok(got)
}

fn summarize(
    target: &str,
    published: usize,
    got: &[(u64, f64)],
    secs: f64,
    probe: &Probe,
    connections: usize,
) -> Result<TargetReport> {
    let (server_rss_kib, server_cpu_cores) = probe.finish()?;
    let (received, duplicated) = tally(got.iter().map(|g| g.0));
    let (p50_ms, p99_ms, max_ms) = latencies(got.iter().map(|g| g.1).collect());
    Ok(TargetReport {
        target: target.into(),
        expected: published as u64,
        received,
        per_sec: got.len() as f64 / secs.max(1e-9),
        p50_ms,
        p99_ms,
        max_ms,
        server_rss_kib,
        server_cpu_cores,
        connections: connections as u64,
        lost: (published as u64).saturating_sub(received),
        duplicated,
    })
}

/// An access key and a consumer group `name` subscribed to the property posts of product
/// `pk`: (access key id, secret, group id).
pub(crate) async fn property_group(
    cloud: &Cloud,
    pk: &str,
    name: &str,
) -> Result<(String, String, String)> {
    let (_, key) = cloud
        .api(reqwest::Method::POST, "/access-keys", Some(json!({})))
        .await?;
    let key_id = key["access_key_id"].as_str().context("key")?.to_owned();
    let secret = key["access_key_secret"]
        .as_str()
        .context("secret")?
        .to_owned();
    let (_, g) = cloud
        .api(
            reqwest::Method::POST,
            "/consumer-groups",
            Some(json!({"name": name})),
        )
        .await?;
    let group = g["group_id"].as_str().context("group")?.to_owned();
    let (s, v) = cloud
        .api(
            reqwest::Method::POST,
            "/subscriptions",
            Some(json!({"product_key": pk, "group_ids": [group], "message_types": ["property"]})),
        )
        .await?;
    if s != 201 {
        bail!("subscription: {s} {v}");
    }
    Ok((key_id, secret, group))
}

/// Receives `total` stamped messages over the MQTT subscribers together (each acknowledging
/// its QoS 1 messages); returns (seq, latency ms). Stops early when nothing arrives for 5 s
/// after the first message (live routing drops what a full session queue cannot take: the
/// caller reports the shortfall as lost).
async fn receive_mqtt(
    subs: Vec<(TcpStream, BytesMut)>,
    total: usize,
) -> Result<(Vec<(u64, f64)>, Instant)> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = Vec::new();
    for (mut app, mut buf) in subs {
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            let mut acks = BytesMut::new();
            loop {
                match v4::Packet::read(&mut buf, 1 << 20) {
                    Ok(v4::Packet::Publish(p)) => {
                        let now = now_ms_f64();
                        if let Some((seq, t)) = stamp(&p.payload) {
                            let _ = tx.send((seq, now - t));
                        }
                        if p.qos != rumqttc::QoS::AtMostOnce {
                            let _ = v4::PubAck::new(p.pkid).write(&mut acks);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if !acks.is_empty() {
                            if app.write_all(&acks).await.is_err() {
                                return;
                            }
                            acks.clear();
                        }
                        match app.read_buf(&mut buf).await {
                            Ok(n) if n > 0 => {}
                            _ => return,
                        }
                    }
                }
            }
        }));
    }
    drop(tx);
    let mut got = Vec::with_capacity(total);
    let mut last = Instant::now();
    while got.len() < total {
        let idle = if got.is_empty() {
            WAIT
        } else {
            Duration::from_secs(5)
        };
        match tokio::time::timeout(idle, rx.recv()).await {
            Ok(Some(g)) => {
                got.push(g);
                last = Instant::now();
            }
            _ if !got.is_empty() => break,
            _ => {
                for r in &readers {
                    r.abort();
                }
                bail!("MQTT: nothing received");
            }
        }
    }
    for r in readers {
        r.abort();
    }
    Ok((got, last))
}

/// Runs the benchmark.
pub async fn run(o: &AppsBench) -> Result<Report> {
    crate::cloud_process::fd_budget(o.devices)?;
    let dir = tempfile::tempdir()?;
    let cloud = Cloud::start_bench_with(
        o.cloud_bin.as_deref(),
        dir.path(),
        "[mqtt]\nconnects_per_second = 1000000\nconnect_burst = 1000000\n",
        &["--amqps-listen", "127.0.0.1:0"],
    )?;
    let pk = cloud.create_product(json!({"name": "apps-bench"})).await?;
    let devices = cloud.create_devices(&pk, o.devices).await?;
    let (key_id, secret, group) = property_group(&cloud, &pk, "bench").await?;
    let topic = |dn: &str| format!("/sys/{pk}/{dn}/thing/event/property/post");

    // Throughput: every device publishes while the application receives.
    let total = o.devices * o.messages;
    let (conn, session, mut receiver) = amqp_receiver(&cloud, &key_id, &secret, &group).await?;
    let pubs = spawn_publishers(cloud.mqtt, &pk, &devices, 0, o.messages).await?;
    let probe = Probe::start(cloud.pid())?;
    let start = Instant::now();
    let got = receive_amqp(&mut receiver, total).await?;
    let secs = start.elapsed().as_secs_f64();
    for p in pubs {
        p.await??;
    }
    let mut throughput = vec![summarize(
        "ironlink amqp (consumer group)",
        total,
        &got,
        secs,
        &probe,
        o.devices + 1,
    )?];
    let _ = receiver.close().await;
    drop(session);
    drop(conn);

    // Backlog: no client while `backlog` messages arrive; then a client connects while fresh
    // messages keep coming at `fresh_rate`.
    let per = o.backlog.div_ceil(devices.len().max(1));
    let pubs = spawn_publishers(cloud.mqtt, &pk, &devices, 1_000_000, per).await?;
    for p in pubs {
        p.await??;
    }
    let backlog = per * devices.len();
    let fresh_n = (o.fresh_rate as usize * 2).max(1);
    let (_conn, _session, mut receiver) = amqp_receiver(&cloud, &key_id, &secret, &group).await?;
    let (dn, sec) = devices.first().context("no device")?.clone();
    let fresh = connect_raw(cloud.mqtt, &alink_connect(&pk, &dn, &sec, 600)?)
        .await
        .context("fresh publisher: connect refused")?;
    let fresh_pub = tokio::spawn(publish(
        fresh,
        topic(&dn),
        10_000_000,
        fresh_n,
        Some(o.fresh_rate),
    ));
    let start = Instant::now();
    let mut replayed = 0usize;
    let mut replay_secs = 0.0;
    let mut fresh = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while (replayed < backlog || fresh.len() < fresh_n) && Instant::now() < deadline {
        let got = receive_amqp(&mut receiver, 1).await?;
        for (seq, lat) in got {
            if seq >= 10_000_000 {
                fresh.push(lat);
            } else {
                replayed += 1;
                if replayed == backlog {
                    replay_secs = start.elapsed().as_secs_f64();
                }
            }
        }
    }
    fresh_pub.await??;
    fresh.sort_by(f64::total_cmp);
    let backlog = Backlog {
        backlog,
        replay_per_sec: replayed as f64 / replay_secs.max(1e-9),
        fresh: fresh.len(),
        fresh_p50_ms: percentile(&fresh, 0.5),
        fresh_p99_ms: percentile(&fresh, 0.99),
    };

    // The same publishers, received by two application instances over MQTT with one shared
    // subscription (live routing; aksign credentials of the same consumer group).
    let ts = format!("{}", now_ms_f64() as u64);
    let user = format!("bench|authMode=aksign,signMethod=hmacsha1,timestamp={ts},authId={key_id},consumerGroupId={group}|");
    let pass =
        ironlink_cloud::apps::amqp::password("hmacsha1", &secret, &key_id, &ts).context("sign")?;
    let mut subs = Vec::new();
    for i in 0..2 {
        let mut c = v4::Connect::new(format!("bench-app-{i}"));
        c.keep_alive = 600;
        c.set_login(user.clone(), pass.clone());
        let mut b = BytesMut::new();
        c.write(&mut b).map_err(|e| anyhow!("{e:?}"))?;
        let mut app = connect_raw(cloud.mqtt, &b)
            .await
            .context("application MQTT login")?;
        let buf = subscribe_v4(
            &mut app,
            &format!("$share/bench//sys/{pk}/+/thing/event/property/post"),
            rumqttc::QoS::AtLeastOnce,
        )
        .await?;
        subs.push((app, buf));
    }
    let pubs = spawn_publishers(cloud.mqtt, &pk, &devices, 20_000_000, o.messages).await?;
    let probe = Probe::start(cloud.pid())?;
    let start = Instant::now();
    let (got, last) = receive_mqtt(subs, total).await?;
    let secs = last.duration_since(start).as_secs_f64();
    for p in pubs {
        p.await??;
    }
    throughput.push(summarize(
        "ironlink mqtt (shared subscription, 2 instances)",
        total,
        &got,
        secs,
        &probe,
        o.devices + 2,
    )?);
    drop(cloud);

    if o.vs_mosquitto {
        let mdir = tempfile::tempdir()?;
        let (m, addr) = start_mosquitto(mdir.path()).await?;
        let mut sub = v4::Connect::new("bench-app");
        sub.keep_alive = 600;
        let mut b = BytesMut::new();
        sub.write(&mut b).map_err(|e| anyhow!("{e:?}"))?;
        let mut app = connect_raw(addr, &b)
            .await
            .context("mosquitto subscriber")?;
        let buf = subscribe_v4(
            &mut app,
            "/sys/+/+/thing/event/property/post",
            rumqttc::QoS::AtLeastOnce,
        )
        .await?;
        let connects = (0..devices.len())
            .map(|i| {
                let mut c = v4::Connect::new(format!("bench-{i}"));
                c.keep_alive = 600;
                let mut b = BytesMut::new();
                c.write(&mut b).map(|_| b).map_err(|e| anyhow!("{e:?}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let streams = connect_all(addr, connects).await?;
        let probe = Probe::start(m.0.id())?;
        let start = Instant::now();
        let mut pubs = Vec::new();
        for (i, (s, (dn, _))) in streams.into_iter().zip(&devices).enumerate() {
            pubs.push(tokio::spawn(publish(
                s,
                format!("/sys/{pk}/{dn}/thing/event/property/post"),
                i * o.messages,
                o.messages,
                None,
            )));
        }
        let (got, last) = receive_mqtt(vec![(app, buf)], total).await?;
        let secs = last.duration_since(start).as_secs_f64();
        for p in pubs {
            p.await??;
        }
        throughput.push(summarize(
            "mosquitto mqtt (one subscriber)",
            total,
            &got,
            secs,
            &probe,
            o.devices + 1,
        )?);
    }
    Ok(Report::new(
        "apps",
        "msgs/s",
        json!({"devices": o.devices, "messages_per_device": o.messages, "qos": 1}),
        throughput,
        serde_json::to_value(&backlog)?,
        vec![
            "latency: device publish to application receive (same clock)".into(),
            format!(
                "backlog: {} messages queued for the consumer group with no client, replayed at {:.0} msgs/s while {} fresh messages arrived (p50 {:.2} ms, p99 {:.2} ms)",
                backlog.backlog, backlog.replay_per_sec, backlog.fresh, backlog.fresh_p50_ms, backlog.fresh_p99_ms
            ),
        ],
    ))
}
