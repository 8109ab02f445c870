//! `bench gateway`: how many sub-devices one gateway connection carries. The gateway
//! registers its new sub-devices (`thing/sub/register`, the product allowing dynamic
//! registration), adds them to its topology, logs them in (`batch_login`), then posts one
//! property for each on the sub-device's own topic over its one connection. Loopback only;
//! bounded.

use crate::cloud_process::{alink_connect, connect_raw, rss_kib, Cloud, WAIT};
use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use ironlink_shared::sign::{sign_connect, SignMethod};
use rumqttc::mqttbytes::v4;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Options of `bench gateway`.
#[derive(Debug, Clone)]
pub struct GatewayBench {
    /// Sub-devices behind the one gateway.
    pub subs: usize,
    /// The ironlink-cloud binary.
    pub cloud_bin: Option<PathBuf>,
}

/// Results.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayResult {
    /// Sub-devices logged in at once through one connection.
    pub sub_devices_online: u64,
    /// Seconds for sub/register of all sub-devices, created by it (batches of 200).
    pub sub_register_sec: f64,
    /// Seconds for topo/add of all sub-devices (batches of 200).
    pub topo_add_sec: f64,
    /// Seconds for batch_login of all sub-devices (batches of 200).
    pub login_sec: f64,
    /// Property posts per second for the sub-devices, over the one connection.
    pub sub_posts_per_sec: f64,
    /// Server RSS growth per logged-in sub-device, bytes.
    pub rss_per_sub_device_bytes: f64,
}

/// One MQTT connection's reader: waits for the reply on `topic` (skipping PUBACKs).
pub(crate) async fn reply(s: &mut TcpStream, buf: &mut BytesMut, topic: &str) -> Result<Value> {
    loop {
        match v4::Packet::read(buf, 1 << 20) {
            Ok(v4::Packet::Publish(p)) if p.topic == topic => {
                return Ok(serde_json::from_slice(&p.payload)?)
            }
            Ok(_) => {}
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                match tokio::time::timeout(WAIT, s.read_buf(buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => bail!("no reply on {topic}"),
                }
            }
            Err(e) => bail!("bad packet: {e:?}"),
        }
    }
}

pub(crate) async fn publish(s: &mut TcpStream, topic: &str, body: &Value, pkid: u16) -> Result<()> {
    let mut p = v4::Publish::new(
        topic,
        rumqttc::QoS::AtLeastOnce,
        body.to_string().into_bytes(),
    );
    p.pkid = pkid;
    let mut b = BytesMut::new();
    p.write(&mut b)
        .map_err(|e| anyhow::anyhow!("encode: {e:?}"))?;
    s.write_all(&b).await?;
    Ok(())
}

/// Publishes a gateway request on `topic` and waits for its reply; an error unless the reply
/// has code 200 (`what` names the request in it).
pub(crate) async fn ask(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    topic: &str,
    body: &Value,
    pkid: u16,
    what: &str,
) -> Result<Value> {
    publish(s, topic, body, pkid).await?;
    let r = reply(s, buf, &format!("{topic}_reply")).await?;
    if r["code"] != 200 {
        bail!("{what} refused: {r}");
    }
    Ok(r)
}

pub(crate) async fn metric(cloud: &Cloud, name: &str) -> Result<i64> {
    let text = reqwest::get(format!("http://{}/metrics", cloud.http))
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .with_context(|| format!("metric {name}"))
}

/// The `batch_login`/`topo/add` entries of sub-devices (with auto-subscription, `_ss=1`).
pub(crate) fn signed_logins(spk: &str, subs: &[(String, String)]) -> Vec<Value> {
    subs.iter()
        .map(|(dn, secret)| {
            let cid = format!("{spk}.{dn}|_ss=1|");
            let ts = "1700000000000";
            let sign = sign_connect(SignMethod::HmacSha256, secret, &cid, dn, spk, Some(ts));
            json!({"productKey": spk, "deviceName": dn, "clientId": cid, "timestamp": ts, "signmethod": "hmacSha256", "sign": sign.as_str()})
        })
        .collect()
}

/// Connects a gateway and subscribes to the replies of its topology and login requests.
pub(crate) async fn gateway_connect(
    addr: std::net::SocketAddr,
    gpk: &str,
    gdn: &str,
    secret: &str,
) -> Result<TcpStream> {
    let mut s = connect_raw(addr, &alink_connect(gpk, gdn, secret, 600)?)
        .await
        .context("gateway connect refused")?;
    let mut sub = v4::Subscribe::new(
        format!("/sys/{gpk}/{gdn}/thing/topo/add_reply"),
        rumqttc::QoS::AtMostOnce,
    );
    sub.add(
        format!("/ext/session/{gpk}/{gdn}/combine/batch_login_reply"),
        rumqttc::QoS::AtMostOnce,
    );
    sub.add(
        format!("/sys/{gpk}/{gdn}/thing/sub/register_reply"),
        rumqttc::QoS::AtMostOnce,
    );
    sub.pkid = 1;
    let mut b = BytesMut::new();
    sub.write(&mut b).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    s.write_all(&b).await?;
    Ok(s)
}

/// Runs the benchmark.
pub async fn run(o: &GatewayBench) -> Result<GatewayResult> {
    let dir = tempfile::tempdir()?;
    let config = format!("[thing]\nmax_sub_devices = {}\n", o.subs.max(1));
    let cloud = Cloud::start_bench(o.cloud_bin.as_deref(), dir.path(), &config)?;
    let gpk = cloud
        .create_product(json!({"name": "gateway", "node_type": "gateway"}))
        .await?;
    let spk = cloud
        .create_product(json!({"name": "sub-device", "node_type": "sub-device"}))
        .await?;
    let (_, gd) = cloud
        .api(
            reqwest::Method::POST,
            &format!("/products/{gpk}/devices"),
            Some(json!({"device_name": "gw-bench"})),
        )
        .await?;
    let gsecret = gd["device_secret"]
        .as_str()
        .context("gateway secret")?
        .to_owned();
    cloud.allow_dynamic_register(&spk).await?;
    let mut s = gateway_connect(cloud.mqtt, &gpk, "gw-bench", &gsecret).await?;
    let mut buf = BytesMut::new();

    // The gateway registers its new sub-devices: the registry creates them.
    let register = format!("/sys/{gpk}/gw-bench/thing/sub/register");
    let names: Vec<String> = (0..o.subs).map(|i| format!("sub{i:06}")).collect();
    let mut subs = Vec::with_capacity(o.subs);
    let start = Instant::now();
    for (i, chunk) in names.chunks(200).enumerate() {
        let params: Vec<Value> = chunk
            .iter()
            .map(|dn| json!({"productKey": spk, "deviceName": dn}))
            .collect();
        let body = json!({"id": i.to_string(), "params": params});
        let r = ask(&mut s, &mut buf, &register, &body, 4, "sub/register").await?;
        for d in r["data"].as_array().context("registered devices")? {
            let dn = d["deviceName"].as_str().context("deviceName")?;
            let secret = d["deviceSecret"].as_str().context("deviceSecret")?;
            subs.push((dn.to_owned(), secret.to_owned()));
        }
    }
    let sub_register_sec = start.elapsed().as_secs_f64();
    let signed = signed_logins(&spk, &subs);
    let rss0 = rss_kib(cloud.pid())?;

    let topo = format!("/sys/{gpk}/gw-bench/thing/topo/add");
    let start = Instant::now();
    for (i, chunk) in signed.chunks(200).enumerate() {
        let body = json!({"id": i.to_string(), "params": chunk});
        ask(&mut s, &mut buf, &topo, &body, 2, "topo/add").await?;
    }
    let topo_add_sec = start.elapsed().as_secs_f64();
    let login = format!("/ext/session/{gpk}/gw-bench/combine/batch_login");
    let start = Instant::now();
    for (i, chunk) in signed.chunks(200).enumerate() {
        let body = json!({"id": i.to_string(), "params": {"signMethod": "hmacSha256", "deviceList": chunk}});
        ask(&mut s, &mut buf, &login, &body, 3, "batch_login").await?;
    }
    let login_sec = start.elapsed().as_secs_f64();
    let online = metric(&cloud, "ironlink_sub_devices_online ").await?;
    let rss1 = rss_kib(cloud.pid())?;

    // One post per sub-device on its own topic; the replies come back (auto-subscribed).
    let start = Instant::now();
    let mut out = BytesMut::new();
    for (i, (dn, _)) in subs.iter().enumerate() {
        let mut p = v4::Publish::new(
            format!("/sys/{spk}/{dn}/thing/event/property/post"),
            rumqttc::QoS::AtMostOnce,
            json!({"id": i.to_string(), "params": {"v": i}})
                .to_string()
                .into_bytes(),
        );
        p.pkid = 0;
        p.write(&mut out).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    s.write_all(&out).await?;
    let mut replies = 0usize;
    while replies < subs.len() {
        match v4::Packet::read(&mut buf, 1 << 20) {
            Ok(v4::Packet::Publish(p)) if p.topic.ends_with("/post_reply") => replies += 1,
            Ok(_) => {}
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                match tokio::time::timeout(WAIT, s.read_buf(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => bail!("{replies} of {} sub-device replies", subs.len()),
                }
            }
            Err(e) => bail!("bad packet: {e:?}"),
        }
    }
    let sub_posts_per_sec = subs.len() as f64 / start.elapsed().as_secs_f64();
    Ok(GatewayResult {
        sub_devices_online: u64::try_from(online).unwrap_or(0),
        sub_register_sec,
        topo_add_sec,
        login_sec,
        sub_posts_per_sec,
        rss_per_sub_device_bytes: (rss1.saturating_sub(rss0) * 1024) as f64
            / subs.len().max(1) as f64,
    })
}
