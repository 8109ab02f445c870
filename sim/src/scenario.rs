//! Scenarios: a fleet of simulated Alink devices described in TOML, values from generators
//! with labelled anomalies, and faults injected on a schedule; run against a cloud on embedded
//! defaults started in this process. Every run is bounded in time and sends only to loopback.
//!
//! ```toml
//! name = "sensors with a link cut"
//! duration = "20s"
//!
//! [[fleet]]
//! product = "Environment sensor"
//! count = 10
//! interval = "500ms"
//! [fleet.properties.temperature]
//! generator = "sine"        # constant | sine | random-walk | step
//! base = 21.0
//! amplitude = 3.0
//! period = "60s"
//! noise = 0.1
//! [[fleet.properties.temperature.anomalies]]
//! kind = "spike"            # spike | drift
//! at = "5s"
//! duration = "2s"
//! magnitude = 15.0
//!
//! [[gateway]]               # an edge gateway polling simulated Modbus TCP meters
//! product = "Power meter"   # the meters' product (sub-devices of the gateway)
//! meters = 5
//! interval = "1s"           # poll interval
//! [gateway.properties.voltage]   # each property an f32 holding register pair, in name order
//! generator = "sine"
//! base = 230.0
//! amplitude = 5.0
//! period = "30s"
//!
//! [[fault]]
//! kind = "link-cut"         # link-cut | storm | silent | malformed
//! fleet = 0                 # or gateway = 0 (link-cut: its uplink; silent: its meters)
//! at = "8s"
//! duration = "3s"
//! ```
//!
//! The report counts, per fleet, messages sent, acknowledged (PUBACK), and stored (read back
//! through the API): an acknowledged message missing from storage is a loss. Per gateway, the
//! polls its meters answered and the readings stored: every answered poll must be stored
//! exactly once, whatever happened to the uplink (the edge's queue keeps them). The anomalies'
//! labels (device, property, kind, start, end) are written out for the analytics work.

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// Longest scenario accepted.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Most devices in one scenario.
pub const MAX_DEVICES: usize = 20_000;

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Shown in the report.
    pub name: String,
    /// How long the devices run.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Seed of every generator (same seed, same values).
    #[serde(default)]
    pub seed: u64,
    /// Direct-device fleets.
    #[serde(default)]
    pub fleet: Vec<Fleet>,
    /// Edge gateways with Modbus meters.
    #[serde(default)]
    pub gateway: Vec<GatewayFleet>,
    /// Faults.
    #[serde(default)]
    pub fault: Vec<Fault>,
}

/// Devices of one product posting properties.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Product name (created with a thing model of these properties, all `double`).
    pub product: String,
    /// Devices.
    pub count: usize,
    /// Time between posts.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Property identifier -> generator.
    pub properties: BTreeMap<String, Generator>,
}

/// How a property's values move.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generator {
    /// `constant`, `sine`, `random-walk` or `step`.
    pub generator: String,
    /// Centre or start value.
    #[serde(default)]
    pub base: f64,
    /// Sine amplitude, step height.
    #[serde(default)]
    pub amplitude: f64,
    /// Sine period, step length.
    #[serde(default, with = "humantime_serde")]
    pub period: Option<Duration>,
    /// Uniform noise added to every value (sine), or the step of the walk (random-walk).
    #[serde(default)]
    pub noise: f64,
    /// Lower bound (random-walk).
    #[serde(default)]
    pub min: Option<f64>,
    /// Upper bound (random-walk).
    #[serde(default)]
    pub max: Option<f64>,
    /// Injected anomalies (labelled in the report).
    #[serde(default)]
    pub anomalies: Vec<Anomaly>,
}

/// An injected anomaly.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anomaly {
    /// `spike` (added while it lasts) or `drift` (ramps up to `magnitude` over `duration`,
    /// then stays).
    pub kind: String,
    /// Start, from the scenario's start.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// Length.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Size.
    pub magnitude: f64,
    /// Only these device indices of the fleet (all when empty).
    #[serde(default)]
    pub devices: Vec<usize>,
}

/// An edge gateway (an `ironlink-edge` in this process) polling simulated Modbus TCP meters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFleet {
    /// The meters' product name.
    pub product: String,
    /// Meters behind the gateway.
    pub meters: usize,
    /// Poll interval.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Property -> generator; each an f32 in two holding registers, in name order.
    pub properties: BTreeMap<String, Generator>,
}

/// A fault injected into one fleet or gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// `link-cut` (connections through the simulator's proxy cut and refused for `duration`),
    /// `storm` (every device disconnects and reconnects at once), `silent` (devices stop
    /// sending for `duration`, connection kept), `malformed` (one device sends a malformed
    /// frame; only its session may suffer).
    pub kind: String,
    /// Fleet index.
    #[serde(default)]
    pub fleet: Option<usize>,
    /// Gateway index (link-cut: the gateway's uplink; silent: its meters stop answering).
    #[serde(default)]
    pub gateway: Option<usize>,
    /// When, from the start.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// How long (link-cut, silent).
    #[serde(default, with = "humantime_serde")]
    pub duration: Duration,
}

impl Scenario {
    /// Parses and checks a scenario; errors name the field.
    pub fn parse(text: &str) -> Result<Self> {
        let s: Scenario = toml::from_str(text).map_err(|e| anyhow!("{}", e.message().trim()))?;
        if s.duration.is_zero() || s.duration > MAX_DURATION {
            bail!("duration: between 1 ms and {MAX_DURATION:?}");
        }
        let devices: usize = s.fleet.iter().map(|f| f.count).sum::<usize>()
            + s.gateway.iter().map(|g| g.meters + 1).sum::<usize>();
        if devices > MAX_DEVICES {
            bail!("fleet: {devices} devices, at most {MAX_DEVICES}");
        }
        for (i, f) in s.fleet.iter().enumerate() {
            if f.count == 0 || f.interval < Duration::from_millis(10) {
                bail!("fleet[{i}]: count >= 1 and interval >= 10ms");
            }
            if f.properties.is_empty() {
                bail!("fleet[{i}].properties: at least one");
            }
            for (id, g) in &f.properties {
                check_generator(g, &format!("fleet[{i}].properties.{id}"), f.count)?;
            }
        }
        for (i, g) in s.gateway.iter().enumerate() {
            if g.meters == 0 || g.meters > 500 || g.interval < Duration::from_millis(100) {
                bail!("gateway[{i}]: meters between 1 and 500, interval >= 100ms");
            }
            if g.properties.is_empty() || g.properties.len() > 60 {
                bail!("gateway[{i}].properties: between 1 and 60");
            }
            for (id, gen) in &g.properties {
                check_generator(gen, &format!("gateway[{i}].properties.{id}"), g.meters)?;
            }
        }
        for (i, f) in s.fault.iter().enumerate() {
            match (f.fleet, f.gateway) {
                (Some(n), None) if n >= s.fleet.len() => bail!("fault[{i}].fleet: no fleet {n}"),
                (None, Some(n)) if n >= s.gateway.len() => {
                    bail!("fault[{i}].gateway: no gateway {n}")
                }
                (None, Some(_)) if !matches!(f.kind.as_str(), "link-cut" | "silent") => {
                    bail!("fault[{i}].kind: a gateway takes link-cut or silent")
                }
                (Some(_), None) | (None, Some(_)) => {}
                _ => bail!("fault[{i}]: name one fleet or one gateway"),
            }
            match f.kind.as_str() {
                "link-cut" | "silent" if f.duration.is_zero() => {
                    bail!("fault[{i}].duration: required for {}", f.kind)
                }
                "link-cut" | "silent" | "storm" | "malformed" => {}
                other => {
                    bail!("fault[{i}].kind: `{other}` is not link-cut, storm, silent or malformed")
                }
            }
        }
        Ok(s)
    }
}

/// Checks one generator of a group of `count` devices; `here` names it in errors.
fn check_generator(g: &Generator, here: &str, count: usize) -> Result<()> {
    match g.generator.as_str() {
        "constant" | "random-walk" => {}
        "sine" | "step" if g.period.is_some_and(|p| !p.is_zero()) => {}
        "sine" | "step" => bail!("{here}.period: required for {}", g.generator),
        other => bail!("{here}.generator: `{other}` is not constant, sine, random-walk or step"),
    }
    for (k, a) in g.anomalies.iter().enumerate() {
        if a.kind != "spike" && a.kind != "drift" {
            bail!(
                "{here}.anomalies[{k}].kind: `{}` is not spike or drift",
                a.kind
            );
        }
        if let Some(d) = a.devices.iter().find(|d| **d >= count) {
            bail!("{here}.anomalies[{k}].devices: {d} is past the group's {count} devices");
        }
    }
    Ok(())
}

/// Deterministic noise in [-1, 1) from a seed and a sample number.
fn noise(seed: u64, n: u64) -> f64 {
    let mut x = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// The state of one property of one device.
#[derive(Debug, Clone)]
pub struct Series {
    g: Generator,
    device: usize,
    seed: u64,
    walk: f64,
    n: u64,
}

impl Series {
    /// A series for device `device` (seeded per device and property).
    pub fn new(g: &Generator, device: usize, seed: u64) -> Self {
        Self {
            walk: g.base,
            g: g.clone(),
            device,
            seed,
            n: 0,
        }
    }

    /// The value at `t` since the start; call with increasing `t`.
    pub fn next(&mut self, t: Duration) -> f64 {
        self.n += 1;
        let g = &self.g;
        let secs = t.as_secs_f64();
        let period = g.period.map_or(1.0, |p| p.as_secs_f64());
        let mut v = match g.generator.as_str() {
            "sine" => {
                g.base
                    + g.amplitude * (std::f64::consts::TAU * secs / period).sin()
                    + g.noise * noise(self.seed, self.n)
            }
            "random-walk" => {
                self.walk += g.noise * noise(self.seed, self.n);
                self.walk = self
                    .walk
                    .clamp(g.min.unwrap_or(f64::MIN), g.max.unwrap_or(f64::MAX));
                self.walk
            }
            "step" => g.base + g.amplitude * ((secs / period).floor() % 2.0),
            _ => g.base,
        };
        for a in &g.anomalies {
            if !a.devices.is_empty() && !a.devices.contains(&self.device) {
                continue;
            }
            let into = secs - a.at.as_secs_f64();
            let len = a.duration.as_secs_f64();
            match a.kind.as_str() {
                "spike" if into >= 0.0 && into < len => v += a.magnitude,
                "drift" if into >= 0.0 => v += a.magnitude * (into / len.max(1e-9)).min(1.0),
                _ => {}
            }
        }
        v
    }
}

/// A TCP proxy the simulator controls: `cut` closes every connection through it and refuses
/// new ones until it is lifted.
struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
}

async fn proxy(upstream: SocketAddr) -> Result<Proxy> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (cut, cut_rx) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut down, _)) = l.accept().await {
            if *cut_rx.borrow() {
                continue; // dropped: refused
            }
            let mut cut = cut_rx.clone();
            tokio::spawn(async move {
                let Ok(mut up) = TcpStream::connect(upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                    _ = cut.wait_for(|c| *c) => {}
                }
            });
        }
    });
    Ok(Proxy { addr, cut })
}

/// Counters of one fleet.
#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    disconnects: AtomicU64,
}

/// What happened to one fleet.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    /// Product key.
    pub product_key: String,
    /// Devices.
    pub devices: usize,
    /// Property posts sent (QoS 1).
    pub sent: u64,
    /// Acknowledged by the cloud.
    pub acked: u64,
    /// Found in storage afterwards (history rows of the first property).
    pub stored: u64,
    /// Acknowledged but not stored (must be 0).
    pub lost: u64,
    /// Connections the devices saw fail.
    pub disconnects: u64,
}

/// One labelled anomaly.
#[derive(Debug, Clone, Serialize)]
pub struct Label {
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device: String,
    /// Property.
    pub property: String,
    /// `spike` or `drift`.
    pub kind: String,
    /// Start, ms since the Unix epoch.
    pub start_ms: i64,
    /// End, ms since the Unix epoch.
    pub end_ms: i64,
}

/// The report of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Seconds run.
    pub seconds: f64,
    /// Per fleet.
    pub fleets: Vec<FleetReport>,
    /// Per gateway.
    pub gateways: Vec<GatewayReport>,
    /// Faults injected, as `kind@fleet+at`.
    pub faults: Vec<String>,
    /// Anomaly labels.
    pub labels: Vec<Label>,
}

fn now_ms() -> i64 {
    ironlink_edge::now_ms()
}

/// Control of one device's behaviour, shared with the fault injector.
#[derive(Debug, Default)]
struct Control {
    silent: AtomicBool,
    storm: AtomicU64,
}

#[allow(clippy::too_many_arguments)]
async fn device(
    addr: SocketAddr,
    pk: String,
    dn: String,
    secret: String,
    interval: Duration,
    mut series: Vec<(String, Series)>,
    counters: Arc<Counters>,
    control: Arc<Control>,
    start: Instant,
    end: Instant,
) {
    let mut storms_seen = 0;
    let mut n = 0u64;
    while Instant::now() < end {
        let Ok(o) =
            crate::cloud_process::device_options(addr, &pk, &dn, &secret, Duration::from_secs(30))
        else {
            return;
        };
        let (client, mut events) = AsyncClient::new(o, 64);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut connected = false;
        // Publishes not yet acknowledged, by packet id, and in send order before they have one.
        let mut waiting: u64 = 0;
        loop {
            tokio::select! {
                ev = events.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                        waiting = waiting.saturating_sub(1);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => {}
                    Ok(_) => {}
                    Err(_) => {
                        counters.disconnects.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                },
                _ = tick.tick(), if connected => {
                    if Instant::now() >= end {
                        break;
                    }
                    let storms = control.storm.load(Ordering::Relaxed);
                    if storms != storms_seen {
                        storms_seen = storms;
                        counters.disconnects.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    if control.silent.load(Ordering::Relaxed) || waiting >= 32 {
                        continue;
                    }
                    n += 1;
                    let t = start.elapsed();
                    let ts = now_ms();
                    let params: serde_json::Map<String, Value> = series
                        .iter_mut()
                        .map(|(id, s)| (id.clone(), json!({"value": s.next(t), "time": ts})))
                        .collect();
                    let body = json!({"id": n.to_string(), "version": "1.0", "sys": {"dedup": 1},
                                      "params": params, "method": "thing.event.property.post"});
                    if client
                        .try_publish(
                            format!("/sys/{pk}/{dn}/thing/event/property/post"),
                            QoS::AtLeastOnce,
                            false,
                            body.to_string(),
                        )
                        .is_ok()
                    {
                        counters.sent.fetch_add(1, Ordering::Relaxed);
                        waiting += 1;
                    }
                }
            }
        }
        // Drain the acknowledgements still on their way, briefly, then go.
        let grace = Instant::now() + Duration::from_secs(2);
        while waiting > 0 && Instant::now() < grace && Instant::now() >= end {
            match tokio::time::timeout_at(grace, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                    counters.acked.fetch_add(1, Ordering::Relaxed);
                    waiting -= 1;
                }
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        if Instant::now() >= end {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends one malformed frame as a connected device (a PUBLISH whose remaining length runs past
/// the bytes sent, then garbage) and returns whether the cloud closed that connection.
async fn malformed(addr: SocketAddr, pk: &str, dn: &str, secret: &str) -> Result<bool> {
    let connect = crate::cloud_process::alink_connect(pk, dn, secret, 30)?;
    let mut s = crate::cloud_process::connect_raw(addr, &connect)
        .await
        .context("malformed-frame device could not connect")?;
    s.write_all(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F, 0x00, 0x01])
        .await?;
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    Ok(closed)
}

/// Runs a scenario against a cloud started in this process (data in `dir`).
pub async fn run(s: &Scenario, dir: &Path) -> Result<Report> {
    let mut config = ironlink_cloud::config::Config {
        data_dir: dir.join("cloud"),
        ..Default::default()
    };
    config.mqtt.listen = Some("127.0.0.1:0".parse()?);
    config.mqtt.tls_listen = None;
    config.apps.amqps_listen = None;
    config.http.listen = "127.0.0.1:0".parse()?;
    let cloud = ironlink_cloud::server::start(config).await?;
    let result = run_against(s, &cloud, dir).await;
    cloud.shutdown().await;
    result
}

/// Creates `count` devices of product `pk` through the API (at most 1,000 per call).
async fn create_devices<F, Fut>(call: &F, pk: &str, count: usize) -> Result<Vec<(String, String)>>
where
    F: Fn(reqwest::Method, String, Option<Value>) -> Fut,
    Fut: std::future::Future<Output = Result<Value>>,
{
    let mut devices: Vec<(String, String)> = Vec::with_capacity(count);
    while devices.len() < count {
        let before = devices.len();
        let v = call(
            reqwest::Method::POST,
            format!("/products/{pk}/devices"),
            Some(json!({"count": (count - devices.len()).min(1000)})),
        )
        .await?;
        devices.extend(
            v["devices"]
                .as_array()
                .context("devices")?
                .iter()
                .filter_map(|d| {
                    Some((
                        d["device_name"].as_str()?.to_owned(),
                        d["device_secret"].as_str()?.to_owned(),
                    ))
                }),
        );
        if devices.len() == before {
            bail!("creating devices of {pk}: the API created none");
        }
    }
    Ok(devices)
}

/// A running gateway of a scenario.
struct Gateway {
    mpk: String,
    meters: Vec<String>,
    controls: Vec<Arc<crate::modbus_slave::SlaveControl>>,
    proxy: Proxy,
    edge: ironlink_edge::run::Running,
}

/// Per device of an edge (its `/status`): (poll errors of every kind, points read).
async fn edge_devices(
    http: &reqwest::Client,
    edge: &ironlink_edge::run::Running,
) -> Result<BTreeMap<String, (u64, u64)>> {
    let addr = edge.status_addr.context("edge without status endpoint")?;
    let v: Value = http
        .get(format!("http://{addr}/status"))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["devices"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, d)| {
            let n = d["errors"]
                .as_object()
                .into_iter()
                .flat_map(|e| e.values())
                .filter_map(Value::as_u64)
                .sum();
            (k.clone(), (n, d["points"].as_u64().unwrap_or(0)))
        })
        .collect())
}

async fn run_against(
    s: &Scenario,
    cloud: &ironlink_cloud::server::Running,
    dir: &Path,
) -> Result<Report> {
    let mqtt = cloud.mqtt_addr.context("no MQTT listener")?;
    let api = format!("http://{}/api/v1", cloud.http_addr);
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut req = http
            .request(method, format!("{api}{path}"))
            .bearer_auth(&cloud.admin_token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await?;
            let status = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                bail!("{status} {v}");
            }
            anyhow::Ok(v)
        }
    };
    let start = Instant::now() + Duration::from_millis(500);
    let end = start + s.duration;
    let start_ms = now_ms() + 500;
    let mut fleets = Vec::new();
    let mut labels = Vec::new();
    let mut tasks = Vec::new();
    for (fi, f) in s.fleet.iter().enumerate() {
        let pk = call(
            reqwest::Method::POST,
            "/products".into(),
            Some(json!({"name": f.product})),
        )
        .await?["product_key"]
            .as_str()
            .context("product_key")?
            .to_owned();
        let properties: Vec<Value> = f.properties.keys().map(|id| json!({"identifier": id, "name": id, "accessMode": "r", "dataType": {"type": "double", "specs": {"min": "-1e12", "max": "1e12"}}})).collect();
        call(
            reqwest::Method::PUT,
            format!("/products/{pk}/thing-model"),
            Some(json!({"properties": properties, "events": [], "services": []})),
        )
        .await?;
        let devices = create_devices(&call, &pk, f.count).await?;
        let proxy = proxy(mqtt).await?;
        let counters = Arc::new(Counters::default());
        let control = Arc::new(Control::default());
        for (di, (dn, secret)) in devices.iter().enumerate() {
            let series = f
                .properties
                .iter()
                .enumerate()
                .map(|(pi, (id, g))| {
                    let seed = s.seed ^ ((fi as u64) << 48) ^ ((di as u64) << 16) ^ pi as u64;
                    (id.clone(), Series::new(g, di, seed))
                })
                .collect();
            for (id, g) in &f.properties {
                for a in &g.anomalies {
                    if a.devices.is_empty() || a.devices.contains(&di) {
                        let from = start_ms + a.at.as_millis() as i64;
                        labels.push(Label {
                            product_key: pk.clone(),
                            device: dn.clone(),
                            property: id.clone(),
                            kind: a.kind.clone(),
                            start_ms: from,
                            end_ms: from + a.duration.as_millis() as i64,
                        });
                    }
                }
            }
            tasks.push(tokio::spawn(device(
                proxy.addr,
                pk.clone(),
                dn.clone(),
                secret.clone(),
                f.interval,
                series,
                counters.clone(),
                control.clone(),
                start,
                end,
            )));
        }
        fleets.push((pk, devices, proxy, counters, control));
    }
    let mut gateways = Vec::new();
    for (gi, g) in s.gateway.iter().enumerate() {
        let product = |name: String, node: &'static str| {
            call(
                reqwest::Method::POST,
                "/products".into(),
                Some(json!({"name": name, "node_type": node})),
            )
        };
        let gpk = product(format!("{} gateway", g.product), "gateway").await?["product_key"]
            .as_str()
            .context("product_key")?
            .to_owned();
        let mpk = product(g.product.clone(), "sub-device").await?["product_key"]
            .as_str()
            .context("product_key")?
            .to_owned();
        let properties: Vec<Value> = g.properties.keys().map(|id| json!({"identifier": id, "name": id, "accessMode": "r", "dataType": {"type": "double", "specs": {"min": "-1e12", "max": "1e12"}}})).collect();
        call(
            reqwest::Method::PUT,
            format!("/products/{mpk}/thing-model"),
            Some(json!({"properties": properties, "services": [], "events": [
                {"identifier": "ModbusFault", "name": "Modbus fault", "type": "error", "outputData": [
                    {"identifier": "kind", "name": "Kind", "dataType": {"type": "text", "specs": {"length": "32"}}},
                    {"identifier": "message", "name": "Message", "dataType": {"type": "text", "specs": {"length": "1024"}}}]}]})),
        )
        .await?;
        let gw = create_devices(&call, &gpk, 1).await?;
        let (gdn, gsecret) = gw.first().context("gateway device")?;
        let meters = create_devices(&call, &mpk, g.meters).await?;
        let proxy = proxy(mqtt).await?;
        let mut edge_toml = format!(
            "[gateway]\nproduct_key = \"{gpk}\"\ndevice_name = \"{gdn}\"\ndevice_secret = \"{gsecret}\"\n\
             [uplink]\nhost = \"127.0.0.1\"\nport = {}\n[queue]\ndir = \"{}\"\n[status]\nlisten = \"127.0.0.1:0\"\n",
            proxy.addr.port(),
            dir.join(format!("edge-{gi}")).display(),
        );
        let mut controls = Vec::new();
        for (di, (dn, secret)) in meters.iter().enumerate() {
            let series = g
                .properties
                .values()
                .enumerate()
                .map(|(pi, gen)| {
                    let seed = s.seed
                        ^ (0xED6E << 48)
                        ^ ((gi as u64) << 40)
                        ^ ((di as u64) << 16)
                        ^ pi as u64;
                    Series::new(gen, di, seed)
                })
                .collect();
            for (id, gen) in &g.properties {
                for a in &gen.anomalies {
                    if a.devices.is_empty() || a.devices.contains(&di) {
                        let from = start_ms + a.at.as_millis() as i64;
                        labels.push(Label {
                            product_key: mpk.clone(),
                            device: dn.clone(),
                            property: id.clone(),
                            kind: a.kind.clone(),
                            start_ms: from,
                            end_ms: from + a.duration.as_millis() as i64,
                        });
                    }
                }
            }
            let control = Arc::new(crate::modbus_slave::SlaveControl::default());
            let addr = crate::modbus_slave::serve(series, start, control.clone()).await?;
            controls.push(control);
            edge_toml.push_str(&format!(
                "\n[[devices]]\nname = \"{dn}\"\nproduct_key = \"{mpk}\"\ndevice_secret = \"{secret}\"\n\
                 transport = \"tcp\"\naddress = \"{addr}\"\npoll_interval = \"{}ms\"\nallow_fast_poll = true\ntimeout = \"500ms\"\nretries = 0\n",
                g.interval.as_millis()
            ));
            for (j, id) in g.properties.keys().enumerate() {
                edge_toml.push_str(&format!(
                    "[[devices.points]]\nidentifier = \"{id}\"\nkind = \"holding\"\naddress = \"{}\"\ntype = \"f32\"\n",
                    j * 2
                ));
            }
        }
        let name = format!("scenario gateway[{gi}]");
        let config =
            ironlink_edge::config::Config::parse(&name, &edge_toml).map_err(|e| anyhow!("{e}"))?;
        let edge = ironlink_edge::run::start(config).map_err(|e| anyhow!("{name}: {e}"))?;
        gateways.push(Gateway {
            mpk,
            meters: meters.into_iter().map(|m| m.0).collect(),
            controls,
            proxy,
            edge,
        });
    }
    // Faults, in time order.
    let mut faults: Vec<&Fault> = s.fault.iter().collect();
    faults.sort_by_key(|f| f.at);
    let mut done = Vec::new();
    let mut malformed_closed = Vec::new();
    for f in faults {
        tokio::time::sleep_until(start + f.at).await;
        if let Some(g) = f.gateway.and_then(|i| gateways.get(i)) {
            done.push(format!(
                "{}@gateway{}+{:?}",
                f.kind,
                f.gateway.unwrap_or_default(),
                f.at
            ));
            if f.kind == "link-cut" {
                let _ = g.proxy.cut.send(true);
                let cut = g.proxy.cut.clone();
                let d = f.duration;
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    let _ = cut.send(false);
                });
            } else {
                let controls = g.controls.clone();
                for c in &controls {
                    c.silent.store(true, Ordering::Relaxed);
                }
                let d = f.duration;
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    for c in controls {
                        c.silent.store(false, Ordering::Relaxed);
                    }
                });
            }
            continue;
        }
        let Some((pk, devices, proxy, _, control)) = f.fleet.and_then(|i| fleets.get(i)) else {
            continue;
        };
        done.push(format!(
            "{}@{}+{:?}",
            f.kind,
            f.fleet.unwrap_or_default(),
            f.at
        ));
        match f.kind.as_str() {
            "link-cut" => {
                let _ = proxy.cut.send(true);
                let cut = proxy.cut.clone();
                let d = f.duration;
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    let _ = cut.send(false);
                });
            }
            "silent" => {
                control.silent.store(true, Ordering::Relaxed);
                let c = control.clone();
                let d = f.duration;
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    c.silent.store(false, Ordering::Relaxed);
                });
            }
            "storm" => {
                control.storm.fetch_add(1, Ordering::Relaxed);
            }
            "malformed" => {
                // A device of its own, so that the fleet's devices are not kicked by it.
                let _ = devices;
                let dn = format!("malformed-{}", done.len());
                let v = call(
                    reqwest::Method::POST,
                    format!("/products/{pk}/devices"),
                    Some(json!({"device_name": dn})),
                )
                .await?;
                let secret = v["device_secret"].as_str().context("device_secret")?;
                malformed_closed.push(malformed(mqtt, pk, &dn, secret).await?);
            }
            _ => {}
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    if malformed_closed.contains(&false) {
        bail!("the cloud kept a connection open after a malformed frame");
    }
    // Gateways: the meters stop answering, so the edge's count of readings taken is final once
    // every meter's poller has seen a failure after that (a link polls one request at a time);
    // then the edge's queue must empty into the cloud, and every reading be stored once.
    tokio::time::sleep_until(end).await;
    let mut gateway_out = Vec::new();
    for g in gateways {
        for c in &g.controls {
            c.stopped.store(true, Ordering::Relaxed);
        }
        let at_stop = edge_devices(&http, &g.edge).await?;
        let errors = |d: &BTreeMap<String, (u64, u64)>, m: &String| d.get(m).map_or(0, |e| e.0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let last = loop {
            let now = edge_devices(&http, &g.edge).await?;
            if g.meters
                .iter()
                .all(|m| errors(&now, m) > errors(&at_stop, m))
            {
                break now;
            }
            if Instant::now() > deadline {
                bail!(
                    "gateway {}: pollers did not notice the meters stopping within 30 s",
                    g.mpk
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = g.proxy.cut.send(false);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let depth = g
                .edge
                .queue
                .lock()
                .map(|q| q.stats().depth)
                .unwrap_or(u64::MAX);
            if depth == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "gateway {}: {depth} readings still queued at the edge after 60 s",
                    g.mpk
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        g.edge.shutdown().await;
        let poll_errors: u64 = last.values().map(|d| d.0).sum();
        let points: u64 = last.values().map(|d| d.1).sum();
        let answered: u64 = g
            .controls
            .iter()
            .map(|c| c.answered.load(Ordering::Relaxed))
            .sum();
        let gf = s.gateway.get(gateway_out.len()).context("gateway")?;
        let first = gf.properties.keys().next().context("no property")?;
        let polled = points / gf.properties.len().max(1) as u64;
        let mut stored = 0u64;
        for dn in &g.meters {
            let v = call(
                reqwest::Method::GET,
                format!(
                    "/devices/{}/{dn}/properties/{first}/history?limit=100000",
                    g.mpk
                ),
                None,
            )
            .await?;
            let times: HashSet<i64> = v["points"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["time"].as_i64())
                .collect();
            stored += times.len() as u64;
        }
        gateway_out.push(GatewayReport {
            product_key: g.mpk.clone(),
            meters: g.meters.len(),
            answered,
            polled,
            stored,
            lost: polled.saturating_sub(stored),
            poll_errors,
        });
    }
    // Storage: every acknowledged post must be there (history of the first property).
    let mut out = Vec::new();
    for ((pk, devices, _, counters, _), f) in fleets.iter().zip(&s.fleet) {
        let first = f.properties.keys().next().context("no property")?;
        let mut stored = 0u64;
        let mut seen = HashSet::new();
        for (dn, _) in devices {
            let v = call(
                reqwest::Method::GET,
                format!("/devices/{pk}/{dn}/properties/{first}/history?limit=100000"),
                None,
            )
            .await?;
            for p in v["points"].as_array().into_iter().flatten() {
                if seen.insert((dn.clone(), p["time"].as_i64(), p["value"].to_string())) {
                    stored += 1;
                }
            }
        }
        let acked = counters.acked.load(Ordering::Relaxed);
        out.push(FleetReport {
            product_key: pk.clone(),
            devices: devices.len(),
            sent: counters.sent.load(Ordering::Relaxed),
            acked,
            stored,
            lost: acked.saturating_sub(stored),
            disconnects: counters.disconnects.load(Ordering::Relaxed),
        });
    }
    Ok(Report {
        name: s.name.clone(),
        seconds: s.duration.as_secs_f64(),
        fleets: out,
        gateways: gateway_out,
        faults: done,
        labels,
    })
}

/// One gateway's figures.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayReport {
    /// The meters' product key.
    pub product_key: String,
    /// Meters.
    pub meters: usize,
    /// Reads the meters answered with values (seen from the meters).
    pub answered: u64,
    /// Polls the gateway completed (its own count: each reading it took must be stored).
    pub polled: u64,
    /// Readings stored (distinct timestamps of the first property, over every meter).
    pub stored: u64,
    /// Polled but not stored.
    pub lost: u64,
    /// Polls that failed at the gateway (timeouts, exceptions; the end-of-run stop included).
    pub poll_errors: u64,
}

/// A human-readable summary.
pub fn table(r: &Report) -> String {
    let mut s = format!(
        "scenario `{}` ({} s), faults: {}\n{:<14} {:>7} {:>8} {:>8} {:>8} {:>6} {:>11}\n",
        r.name,
        r.seconds,
        if r.faults.is_empty() {
            "none".into()
        } else {
            r.faults.join(", ")
        },
        "product",
        "devices",
        "sent",
        "acked",
        "stored",
        "lost",
        "disconnects"
    );
    for f in &r.fleets {
        s.push_str(&format!(
            "{:<14} {:>7} {:>8} {:>8} {:>8} {:>6} {:>11}\n",
            f.product_key, f.devices, f.sent, f.acked, f.stored, f.lost, f.disconnects
        ));
    }
    if !r.gateways.is_empty() {
        s.push_str(&format!(
            "{:<14} {:>7} {:>8} {:>8} {:>8} {:>6} {:>11}\n",
            "gateway meters", "meters", "answered", "polled", "stored", "lost", "poll errors"
        ));
        for g in &r.gateways {
            s.push_str(&format!(
                "{:<14} {:>7} {:>8} {:>8} {:>8} {:>6} {:>11}\n",
                g.product_key, g.meters, g.answered, g.polled, g.stored, g.lost, g.poll_errors
            ));
        }
    }
    s.push_str(&format!("{} anomaly labels\n", r.labels.len()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
duration = "10s"
seed = 7
[[fleet]]
product = "P"
count = 3
interval = "100ms"
[fleet.properties.temp]
generator = "sine"
base = 20.0
amplitude = 2.0
period = "4s"
noise = 0.5
[[fleet.properties.temp.anomalies]]
kind = "spike"
at = "1s"
duration = "1s"
magnitude = 100.0
devices = [1]
[fleet.properties.level]
generator = "random-walk"
base = 50.0
noise = 1.0
min = 0.0
max = 100.0
[[fleet.properties.level.anomalies]]
kind = "drift"
at = "2s"
duration = "2s"
magnitude = 10.0
[[fault]]
kind = "link-cut"
fleet = 0
at = "3s"
duration = "1s"
"#;

    #[test]
    fn scenarios_parse_and_bad_ones_name_the_field() {
        let s = Scenario::parse(GOOD).unwrap();
        assert_eq!(s.fleet[0].count, 3);
        assert_eq!(s.fault[0].duration, Duration::from_secs(1));
        for (from, to, field) in [
            (
                "generator = \"sine\"",
                "generator = \"saw\"",
                "fleet[0].properties.temp.generator",
            ),
            ("period = \"4s\"", "", "fleet[0].properties.temp.period"),
            ("kind = \"spike\"", "kind = \"dip\"", "anomalies[0].kind"),
            ("devices = [1]", "devices = [3]", "anomalies[0].devices"),
            ("fleet = 0", "fleet = 2", "fault[0].fleet"),
            ("kind = \"link-cut\"", "kind = \"flood\"", "fault[0].kind"),
            (
                "at = \"3s\"\nduration = \"1s\"",
                "at = \"3s\"",
                "fault[0].duration",
            ),
            ("duration = \"10s\"", "duration = \"2h\"", "duration"),
            ("count = 3", "count = 30000", "fleet: 30000 devices"),
            ("interval = \"100ms\"", "interval = \"1ms\"", "fleet[0]"),
            ("seed = 7", "seed = 7\ncolour = 1", "unknown field `colour`"),
        ] {
            let text = GOOD.replace(from, to);
            let e = Scenario::parse(&text).unwrap_err().to_string();
            assert!(e.contains(field), "{field} in: {e}");
        }
        let gateway = "[[gateway]]\nproduct = \"M\"\nmeters = 2\ninterval = \"1s\"\n\
                       [gateway.properties.v]\ngenerator = \"constant\"\nbase = 1.0\n";
        let with = |fault: &str| {
            format!("{GOOD}{gateway}[[fault]]\n{fault}\nat = \"1s\"\nduration = \"1s\"\n")
        };
        let s = Scenario::parse(&with("kind = \"link-cut\"\ngateway = 0")).unwrap();
        assert_eq!(s.gateway[0].meters, 2);
        assert_eq!(s.fault[1].gateway, Some(0));
        for (fault, field) in [
            (
                "kind = \"storm\"\ngateway = 0",
                "a gateway takes link-cut or silent",
            ),
            (
                "kind = \"silent\"\ngateway = 1",
                "fault[1].gateway: no gateway 1",
            ),
            (
                "kind = \"silent\"\ngateway = 0\nfleet = 0",
                "name one fleet or one gateway",
            ),
            ("kind = \"silent\"", "name one fleet or one gateway"),
        ] {
            let e = Scenario::parse(&with(fault)).unwrap_err().to_string();
            assert!(e.contains(field), "{field} in: {e}");
        }
        let e = Scenario::parse(&format!(
            "{GOOD}{}",
            gateway.replace("meters = 2", "meters = 0")
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("gateway[0]: meters"), "{e}");
    }

    #[test]
    fn generators_are_deterministic_and_anomalies_land_where_labelled() {
        let s = Scenario::parse(GOOD).unwrap();
        let g = &s.fleet[0].properties["temp"];
        let at = |dev: usize, secs: f64| {
            let mut a = Series::new(g, dev, 42);
            a.next(Duration::from_secs_f64(secs))
        };
        assert_eq!(at(0, 0.5), at(0, 0.5), "same seed, same value");
        // Device 1 spikes by 100 between 1 s and 2 s; device 0 does not.
        assert!(at(1, 1.5) > 90.0);
        assert!(at(0, 1.5) < 30.0);
        assert!(at(1, 2.5) < 30.0);
        // The sine stays within amplitude + noise of its base.
        for i in 0..100 {
            let v = at(0, 0.1 * f64::from(i) + 5.0);
            assert!((v - 20.0).abs() <= 2.5, "{v}");
        }
        // The walk stays within its bounds and drifts by the full magnitude after 4 s.
        let w = &s.fleet[0].properties["level"];
        let mut a = Series::new(w, 0, 1);
        let mut last = 0.0;
        for i in 0..1000 {
            last = a.next(Duration::from_millis(i * 5));
            assert!((0.0..=110.0).contains(&last), "{last}");
        }
        let mut b = Series::new(w, 0, 1);
        let mut flat = 0.0;
        for i in 0..1000 {
            flat = b.next(Duration::from_millis(i * 5))
                - if i * 5 >= 2000 {
                    10.0 * (((i * 5) as f64 - 2000.0) / 2000.0).min(1.0)
                } else {
                    0.0
                };
        }
        assert!((last - flat - 10.0).abs() < 1e-9, "{last} {flat}");
    }
}
