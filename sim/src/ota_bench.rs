//! `bench ota`: a campaign over many simulated devices, carried as sub-devices by a few
//! gateway connections (so the open-files limit is respected), each sub-device installing at
//! once what it is offered (it reports the new version as soon as the notice arrives); then
//! the image server under many concurrent ranged downloads, against nginx serving the same
//! file in the same run. Loopback only; every phase is bounded.

use crate::cloud_process::{cpu_ticks, rss_kib, Cloud, WAIT};
use crate::gateway::{ask, gateway_connect, signed_logins};
use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Options of `bench ota`.
#[derive(Debug, Clone)]
pub struct OtaBench {
    /// Devices in the campaign.
    pub devices: usize,
    /// Gateway connections carrying them.
    pub gateways: usize,
    /// Concurrent ranged downloads in the download phase (0: skip it).
    pub downloads: usize,
    /// Image size for the download phase, KiB.
    pub image_kib: usize,
    /// Baseline for the download phase (`nginx`), measured in the same run.
    pub vs: Option<String>,
    /// The ironlink-cloud binary.
    pub cloud_bin: Option<PathBuf>,
}

/// Results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OtaResult {
    /// Devices in the campaign.
    pub devices: usize,
    /// Seconds to create the campaign (target resolved, jobs written).
    pub create_sec: f64,
    /// Notices received by the devices.
    pub notices: u64,
    /// Notices per minute, first to last notice.
    pub notices_per_min: f64,
    /// Seconds from the campaign's creation to its end (every device succeeded).
    pub campaign_sec: f64,
    /// Notice to success (the cloud storing the new version), ms: p50, p90, p99, max.
    pub notice_to_success_ms: [f64; 4],
    /// Cloud CPU over the campaign, percent of one core.
    pub cloud_cpu_percent: f64,
    /// Cloud RSS at the end of the campaign, MiB (peak sampled every 500 ms).
    pub cloud_rss_peak_mib: f64,
    /// Download phase: Ironlink's image server.
    pub download: Option<DownloadResult>,
    /// Download phase: the baseline serving the same file.
    pub baseline: Option<DownloadResult>,
}

/// One download phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DownloadResult {
    /// Server.
    pub server: String,
    /// Concurrent ranged downloads.
    pub downloads: usize,
    /// Bytes in all.
    pub bytes: u64,
    /// Seconds.
    pub sec: f64,
    /// MiB per second.
    pub mib_per_sec: f64,
}

struct Gateway {
    pk: String,
    dn: String,
    secret: String,
}

/// Connects a gateway and logs its sub-devices in (auto-subscribed, so their notices reach
/// it); returns the stream and any bytes read past the replies.
async fn gateway_up(
    cloud: &Cloud,
    g: &Gateway,
    spk: &str,
    subs: &[(String, String)],
) -> Result<(TcpStream, BytesMut)> {
    let mut s = gateway_connect(cloud.mqtt, &g.pk, &g.dn, &g.secret).await?;
    let signed = signed_logins(spk, subs);
    let mut buf = BytesMut::new();
    let topo = format!("/sys/{}/{}/thing/topo/add", g.pk, g.dn);
    let login = format!("/ext/session/{}/{}/combine/batch_login", g.pk, g.dn);
    for (i, chunk) in signed.chunks(200).enumerate() {
        let body = json!({"id": i.to_string(), "params": chunk});
        ask(&mut s, &mut buf, &topo, &body, 2, "topo/add").await?;
        let body = json!({"id": i.to_string(), "params": {"signMethod": "hmacSha256", "deviceList": chunk}});
        ask(&mut s, &mut buf, &login, &body, 3, "batch_login").await?;
    }
    Ok((s, buf))
}

/// What the gateways saw.
#[derive(Default)]
struct Seen {
    first: Option<Instant>,
    last: Option<Instant>,
    urls: Vec<String>,
}

/// A gateway's reader: each notice for a sub-device is answered with the new version at
/// once (or, with `answer` false, its URL is kept).
async fn carry(
    mut s: TcpStream,
    mut buf: BytesMut,
    answer: bool,
    notices: Arc<AtomicU64>,
    seen: Arc<Mutex<Seen>>,
) -> Result<()> {
    loop {
        match v4::Packet::read(&mut buf, 1 << 20) {
            Ok(v4::Packet::Publish(p)) if p.topic.starts_with("/ota/device/upgrade/") => {
                let now = Instant::now();
                notices.fetch_add(1, Ordering::Relaxed);
                let v: Value = serde_json::from_slice(&p.payload)?;
                {
                    let mut s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                    s.first.get_or_insert(now);
                    s.last = Some(now);
                    if !answer {
                        s.urls
                            .push(v["data"]["url"].as_str().unwrap_or_default().to_owned());
                    }
                }
                let mut out = BytesMut::new();
                if p.qos == rumqttc::QoS::AtLeastOnce {
                    v4::PubAck::new(p.pkid)
                        .write(&mut out)
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                }
                if answer {
                    let rest = p.topic.trim_start_matches("/ota/device/upgrade/");
                    let mut inform = v4::Publish::new(
                        format!("/ota/device/inform/{rest}"),
                        rumqttc::QoS::AtMostOnce,
                        json!({"id": "1", "params": {"version": v["data"]["version"]}}).to_string(),
                    );
                    inform.pkid = 0;
                    inform
                        .write(&mut out)
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                }
                s.write_all(&out).await?;
            }
            Ok(_) => {}
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                match s.read_buf(&mut buf).await {
                    Ok(n) if n > 0 => {}
                    _ => return Ok(()),
                }
            }
            Err(e) => bail!("bad packet: {e:?}"),
        }
    }
}

async fn upload(cloud: &Cloud, pk: &str, version: &str, image: Vec<u8>) -> Result<String> {
    let resp = reqwest::Client::new()
        .post(format!(
            "http://{}/api/v1/ota/packages?product_key={pk}&version={version}",
            cloud.http
        ))
        .bearer_auth(&cloud.token)
        .body(image)
        .send()
        .await?;
    let v: Value = resp.json().await?;
    Ok(v["id"].as_str().context("package id")?.to_owned())
}

/// Waits (bounded) until `n` devices of `pk` are recorded online.
async fn online(cloud: &Cloud, pk: &str, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = cloud
            .api(
                reqwest::Method::GET,
                &format!("/products/{pk}/devices?status=online&page_size=1"),
                None,
            )
            .await?;
        if v["total"].as_u64() == Some(n as u64) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} of {n} devices online", v["total"]);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark.
pub async fn run(o: &OtaBench) -> Result<OtaResult> {
    let dir = tempfile::tempdir()?;
    let per_gateway = o.devices.div_ceil(o.gateways.max(1));
    let config = format!(
        "[thing]\nmax_sub_devices = {}\n[ota]\nmax_notices_per_second = 100000\ntick = \"100ms\"\n",
        per_gateway.max(o.downloads).max(1)
    );
    let cloud = Cloud::start_bench(o.cloud_bin.as_deref(), dir.path(), &config)?;
    let gpk = cloud
        .create_product(json!({"name": "gateways", "node_type": "gateway"}))
        .await?;
    let spk = cloud
        .create_product(json!({"name": "fleet", "node_type": "sub-device"}))
        .await?;
    let gws = cloud.create_devices(&gpk, o.gateways.max(1) + 1).await?;
    eprintln!("creating {} devices", o.devices);
    let subs = cloud.create_devices(&spk, o.devices).await?;
    let notices = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut readers = Vec::new();
    eprintln!("logging them in through {} gateways", o.gateways);
    for (i, chunk) in subs.chunks(per_gateway.max(1)).enumerate() {
        let (dn, secret) = &gws[i];
        let g = Gateway {
            pk: gpk.clone(),
            dn: dn.clone(),
            secret: secret.clone(),
        };
        let (s, buf) = gateway_up(&cloud, &g, &spk, chunk).await?;
        readers.push(tokio::spawn(carry(
            s,
            buf,
            true,
            notices.clone(),
            seen.clone(),
        )));
    }
    online(&cloud, &spk, o.devices).await?;
    let package = upload(&cloud, &spk, "2.0.0", vec![0x5a; 64 * 1024]).await?;

    let pid = cloud.pid();
    let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
    let (s, created) = cloud
        .api(
            reqwest::Method::POST,
            "/ota/campaigns",
            Some(json!({"name": "bench", "package_id": package,
                        "policy": {"pushes_per_minute": 1_000_000, "max_concurrent": o.devices}})),
        )
        .await?;
    if s != 201 {
        bail!("campaign refused: {s} {created}");
    }
    let create_sec = t0.elapsed().as_secs_f64();
    let id = created["id"].as_str().context("campaign id")?.to_owned();
    eprintln!(
        "campaign {id}: {} jobs in {create_sec:.1} s",
        created["jobs"]
    );
    let mut rss_peak = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        rss_peak = rss_peak.max(rss_kib(pid)?);
        let (_, v) = cloud
            .api(reqwest::Method::GET, &format!("/ota/campaigns/{id}"), None)
            .await?;
        if v["state"] != "running" {
            eprintln!("campaign {}: {}", v["state"], v["states"]);
            break;
        }
        if Instant::now() > deadline {
            bail!("the campaign did not finish within 600 s: {}", v["states"]);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let campaign_sec = t0.elapsed().as_secs_f64();
    let ticks = cpu_ticks(pid)?.saturating_sub(cpu0) as f64;
    let (first, last) = {
        let s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        (s.first, s.last)
    };
    let span = match (first, last) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-3),
        _ => bail!("no notice arrived"),
    };
    let n = notices.load(Ordering::Relaxed);
    let mut lat = Vec::with_capacity(o.devices);
    let mut offset = 0;
    loop {
        let (_, v) = cloud
            .api(
                reqwest::Method::GET,
                &format!("/ota/campaigns/{id}/devices?state=succeeded&offset={offset}&limit=1000"),
                None,
            )
            .await?;
        let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
        for j in &jobs {
            if let (Some(a), Some(b)) = (j["notified_at"].as_i64(), j["updated_at"].as_i64()) {
                lat.push((b - a) as f64);
            }
        }
        offset += jobs.len();
        if jobs.len() < 1000 {
            break;
        }
    }
    lat.sort_by(f64::total_cmp);
    let mut r = OtaResult {
        devices: o.devices,
        create_sec,
        notices: n,
        notices_per_min: n as f64 / span * 60.0,
        campaign_sec,
        notice_to_success_ms: [
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99),
            lat.last().copied().unwrap_or(0.0),
        ],
        cloud_cpu_percent: ticks / 100.0 / campaign_sec * 100.0,
        cloud_rss_peak_mib: rss_peak as f64 / 1024.0,
        ..OtaResult::default()
    };

    if o.downloads > 0 {
        // Devices that keep their notices: their links serve the download phase.
        let dpk = cloud
            .create_product(json!({"name": "downloaders", "node_type": "sub-device"}))
            .await?;
        let dsubs = cloud.create_devices(&dpk, o.downloads).await?;
        let (gdn, gsecret) = &gws[gws.len() - 1];
        let g = Gateway {
            pk: gpk.clone(),
            dn: gdn.clone(),
            secret: gsecret.clone(),
        };
        let (s, buf) = gateway_up(&cloud, &g, &dpk, &dsubs).await?;
        let kept = Arc::new(Mutex::new(Seen::default()));
        let reader = tokio::spawn(carry(
            s,
            buf,
            false,
            Arc::new(AtomicU64::new(0)),
            kept.clone(),
        ));
        online(&cloud, &dpk, o.downloads).await?;
        let image: Vec<u8> = (0..o.image_kib * 1024).map(|i| (i % 251) as u8).collect();
        let pkg = upload(&cloud, &dpk, "9.9.9", image.clone()).await?;
        let (s, v) = cloud
            .api(
                reqwest::Method::POST,
                "/ota/campaigns",
                Some(json!({"name": "downloads", "package_id": pkg, "policy": {"pushes_per_minute": 1_000_000}})),
            )
            .await?;
        if s != 201 {
            bail!("download campaign refused: {s} {v}");
        }
        let deadline = Instant::now() + WAIT;
        let urls = loop {
            let got = kept
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .urls
                .clone();
            if got.len() >= o.downloads {
                break got;
            }
            if Instant::now() > deadline {
                bail!("{} of {} download notices", got.len(), o.downloads);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        r.download = Some(fetch_all("ironlink", urls, image.len()).await?);
        if o.vs.as_deref() == Some("nginx") {
            r.baseline = Some(nginx(dir.path(), &image, o.downloads).await?);
        }
        reader.abort();
    }
    for t in readers {
        t.abort();
    }
    cloud.kill9()?;
    // The cloud's warnings, for a post-mortem (the data dir goes with the temp dir).
    let _ = std::fs::copy(
        dir.path().join("cloud.log"),
        std::env::temp_dir().join("ironlink-bench-ota-cloud.log"),
    );
    Ok(r)
}

/// Fetches every URL at once, each with `Range: bytes=0-` (a resumable download from its
/// start), and checks the lengths.
async fn fetch_all(server: &str, urls: Vec<String>, size: usize) -> Result<DownloadResult> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(urls.len())
        .timeout(Duration::from_secs(300))
        .build()?;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(urls.len());
    for u in urls.clone() {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let r = c.get(&u).header("Range", "bytes=0-").send().await?;
            let status = r.status().as_u16();
            let b = r.bytes().await?;
            anyhow::Ok((status, b.len()))
        }));
    }
    let mut bytes = 0u64;
    for t in tasks {
        let (status, n) = t.await??;
        if status != 206 || n != size {
            bail!("{server}: status {status}, {n} of {size} bytes");
        }
        bytes += n as u64;
    }
    let sec = started.elapsed().as_secs_f64();
    Ok(DownloadResult {
        server: server.into(),
        downloads: urls.len(),
        bytes,
        sec,
        mib_per_sec: bytes as f64 / sec / (1024.0 * 1024.0),
    })
}

/// nginx (Debian's `nginx-light`) serving the same image on loopback.
async fn nginx(dir: &std::path::Path, image: &[u8], downloads: usize) -> Result<DownloadResult> {
    let root = dir.join("nginx");
    std::fs::create_dir_all(root.join("www"))?;
    std::fs::write(root.join("www/fw.bin"), image)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = format!(
        "daemon off; worker_processes auto; pid {r}/nginx.pid; error_log {r}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; client_body_temp_path {r}/tmp; proxy_temp_path {r}/tmp; fastcgi_temp_path {r}/tmp; uwsgi_temp_path {r}/tmp; scgi_temp_path {r}/tmp;\n\
         server {{ listen 127.0.0.1:{port}; root {r}/www; }} }}\n",
        r = root.display()
    );
    std::fs::write(root.join("nginx.conf"), conf)?;
    let mut child = tokio::process::Command::new("nginx")
        .args([
            "-c",
            &root.join("nginx.conf").display().to_string(),
            "-p",
            &root.display().to_string(),
        ])
        .kill_on_drop(true)
        .spawn()
        .context("starting nginx (apt-get install nginx-light)")?;
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("nginx did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let urls = vec![format!("http://127.0.0.1:{port}/fw.bin"); downloads];
    let r = fetch_all("nginx", urls, image.len()).await;
    let _ = child.kill().await;
    r
}
