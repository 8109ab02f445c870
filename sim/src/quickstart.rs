//! `ironlink-sim quickstart`: a living plant in one command. Starts the cloud on embedded
//! defaults (in this process: embedded broker, SQLite), creates the products, thing models and
//! devices it needs (once; kept in the data directory for the next start), serves a few Modbus
//! power meters (in-process tokio-modbus servers whose values move: sine plus noise, random
//! walks, a counter), runs an edge gateway that polls them and forwards over one Alink uplink,
//! and connects a few direct MQTT sensors posting their own readings. Then prints what to open
//! and what to try, and runs until Ctrl-C (or for a set time), shutting down cleanly.

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};
use std::future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_modbus::prelude::*;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};

/// Options of `quickstart`.
#[derive(Debug, Clone)]
pub struct Quickstart {
    /// Where the cloud, the edge queue and `quickstart.json` live.
    pub data_dir: PathBuf,
    /// HTTP API listener.
    pub http_listen: SocketAddr,
    /// MQTT listener.
    pub mqtt_listen: SocketAddr,
    /// Edge status listener.
    pub edge_status_listen: SocketAddr,
    /// Modbus meters behind the edge gateway.
    pub meters: usize,
    /// Direct MQTT sensors.
    pub sensors: usize,
}

/// What a running quickstart offers.
#[derive(Debug, Clone)]
pub struct Plant {
    /// HTTP API base, e.g. `http://127.0.0.1:8080/api/v1`.
    pub api: String,
    /// Admin token.
    pub token: String,
    /// MQTT address.
    pub mqtt: SocketAddr,
    /// Edge status address.
    pub edge_status: Option<SocketAddr>,
    /// The meters' product key.
    pub meter_product: String,
    /// The sensors' product key.
    pub sensor_product: String,
    /// The gateway's product key.
    pub gateway_product: String,
    /// Meter device names.
    pub meters: Vec<String>,
    /// Sensor device names.
    pub sensors: Vec<String>,
}

const METER_TSL: &str = r#"{
  "properties": [
    {"identifier": "Voltage", "name": "Voltage", "accessMode": "r", "dataType": {"type": "float", "specs": {"min": "0", "max": "500", "unit": "V"}}},
    {"identifier": "Current", "name": "Current", "accessMode": "r", "dataType": {"type": "float", "specs": {"min": "0", "max": "100", "unit": "A"}}},
    {"identifier": "Power", "name": "Active power", "accessMode": "r", "dataType": {"type": "float", "specs": {"min": "0", "max": "50000", "unit": "W"}}},
    {"identifier": "Energy", "name": "Energy", "accessMode": "r", "dataType": {"type": "double", "specs": {"min": "0", "max": "100000000", "unit": "kWh"}}},
    {"identifier": "Relay", "name": "Relay", "accessMode": "rw", "dataType": {"type": "bool", "specs": {"0": "open", "1": "closed"}}}
  ],
  "events": [
    {"identifier": "ModbusFault", "name": "Modbus fault", "type": "error", "outputData": [
      {"identifier": "kind", "name": "Kind", "dataType": {"type": "text", "specs": {"length": "32"}}},
      {"identifier": "message", "name": "Message", "dataType": {"type": "text", "specs": {"length": "1024"}}}
    ]}
  ],
  "services": [
    {"identifier": "Trip", "name": "Trip the relay", "callType": "async", "inputData": [], "outputData": []}
  ]
}"#;

const SENSOR_TSL: &str = r#"{
  "properties": [
    {"identifier": "temperature", "name": "Temperature", "accessMode": "r", "dataType": {"type": "float", "specs": {"min": "-40", "max": "120", "unit": "°C"}}},
    {"identifier": "humidity", "name": "Humidity", "accessMode": "r", "dataType": {"type": "int", "specs": {"min": "0", "max": "100", "unit": "%"}}}
  ],
  "events": [],
  "services": []
}"#;

/// The meter's registers: holding 0..7 = Voltage, Current, Power (f32 ABCD, x1), Energy (f32,
/// kWh), coil 0 = relay.
#[derive(Debug)]
struct MeterState {
    holding: [u16; 8],
    relay: bool,
    energy: f64,
    current: f64,
    t: f64,
    seed: u64,
}

impl MeterState {
    fn new(seed: u64) -> Self {
        Self {
            holding: [0; 8],
            relay: true,
            energy: 1000.0 + seed as f64 * 37.0,
            current: 5.0 + seed as f64,
            t: 0.0,
            seed,
        }
    }

    /// xorshift noise in [-1, 1).
    fn noise(&mut self) -> f64 {
        let mut x = self.seed | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed = x;
        (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// Advances the simulation by `dt` seconds.
    fn step(&mut self, dt: f64) {
        self.t += dt;
        let voltage = 230.0 + 4.0 * (self.t / 30.0).sin() + 0.5 * self.noise();
        self.current = if self.relay {
            (self.current + 0.3 * self.noise()).clamp(0.5, 60.0)
        } else {
            0.0
        };
        let power = voltage * self.current;
        self.energy += power * dt / 3_600_000.0;
        for (i, v) in [voltage, self.current, power, self.energy]
            .into_iter()
            .enumerate()
        {
            let b = (v as f32).to_bits();
            self.holding[2 * i] = (b >> 16) as u16;
            self.holding[2 * i + 1] = (b & 0xFFFF) as u16;
        }
    }
}

struct MeterService(Arc<Mutex<MeterState>>);

impl tokio_modbus::server::Service for MeterService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Request<'static>) -> Self::Future {
        let Ok(mut m) = self.0.lock() else {
            return future::ready(Err(ExceptionCode::ServerDeviceFailure));
        };
        future::ready(match req {
            Request::ReadHoldingRegisters(a, n) => usize::from(a)
                .checked_add(usize::from(n))
                .and_then(|end| m.holding.get(usize::from(a)..end))
                .map(|w| Response::ReadHoldingRegisters(w.to_vec()))
                .ok_or(ExceptionCode::IllegalDataAddress),
            Request::ReadCoils(0, 1) => Ok(Response::ReadCoils(vec![m.relay])),
            Request::WriteSingleCoil(0, v) => {
                m.relay = v;
                Ok(Response::WriteSingleCoil(0, v))
            }
            _ => Err(ExceptionCode::IllegalDataAddress),
        })
    }
}

async fn serve_meter(state: Arc<Mutex<MeterState>>) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                if let Ok(mut m) = state.lock() {
                    m.step(0.5);
                }
            }
        });
    }
    tokio::spawn(async move {
        let server = Server::new(l);
        let new_service = move |_| Ok(Some(Arc::new(MeterService(state.clone()))));
        let on_connected = |stream, a| {
            let new_service = new_service.clone();
            async move { accept_tcp_connection(stream, a, new_service) }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    Ok(addr)
}

/// The API, as the quickstart uses it.
struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path}: {status} {v}");
        }
        Ok(v)
    }
}

/// Products and devices, created once and remembered in `quickstart.json`.
async fn provision(api: &Api, dir: &Path, meters: usize, sensors: usize) -> Result<Value> {
    let path = dir.join("quickstart.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let v: Value = serde_json::from_str(&text).context("quickstart.json")?;
        if v["meters"].as_array().map(Vec::len) == Some(meters)
            && v["sensors"].as_array().map(Vec::len) == Some(sensors)
        {
            return Ok(v);
        }
    }
    let product = |name: &str, node: &str| {
        api.call(
            reqwest::Method::POST,
            "/products",
            Some(json!({"name": name, "node_type": node})),
        )
    };
    let gpk = product("Quickstart edge gateway", "gateway").await?["product_key"]
        .as_str()
        .context("product_key")?
        .to_owned();
    let mpk = product("Power meter (Modbus)", "sub-device").await?["product_key"]
        .as_str()
        .context("product_key")?
        .to_owned();
    let spk = product("Environment sensor", "direct").await?["product_key"]
        .as_str()
        .context("product_key")?
        .to_owned();
    for (pk, tsl) in [(&mpk, METER_TSL), (&spk, SENSOR_TSL)] {
        api.call(
            reqwest::Method::PUT,
            &format!("/products/{pk}/thing-model"),
            Some(serde_json::from_str(tsl)?),
        )
        .await?;
    }
    let device = |pk: String, name: String| async move {
        let v = api
            .call(
                reqwest::Method::POST,
                &format!("/products/{pk}/devices"),
                Some(json!({"device_name": name})),
            )
            .await?;
        anyhow::Ok(json!({"name": name, "secret": v["device_secret"]}))
    };
    let gateway = device(gpk.clone(), "edge-gateway-01".into()).await?;
    let mut ms = Vec::new();
    for i in 1..=meters {
        ms.push(device(mpk.clone(), format!("meter-{i:02}")).await?);
    }
    let mut ss = Vec::new();
    for i in 1..=sensors {
        ss.push(device(spk.clone(), format!("sensor-{i:02}")).await?);
    }
    let v = json!({"gateway_product": gpk, "meter_product": mpk, "sensor_product": spk,
                   "gateway": gateway, "meters": ms, "sensors": ss});
    std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    Ok(v)
}

fn s(v: &Value) -> Result<&str> {
    v.as_str()
        .ok_or_else(|| anyhow!("quickstart.json: missing text in {v}"))
}

/// A direct sensor: posts temperature and humidity every 2 s, QoS 1, until `stop`.
async fn sensor(
    mqtt: SocketAddr,
    pk: String,
    dn: String,
    secret: String,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut t = 20.0 + seed as f64;
    let mut n = 0u64;
    loop {
        let Ok(o) =
            crate::cloud_process::device_options(mqtt, &pk, &dn, &secret, Duration::from_secs(60))
        else {
            return;
        };
        let (client, mut events) = AsyncClient::new(o, 16);
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                ev = events.poll() => {
                    if ev.is_err() {
                        break;
                    }
                    if let Ok(Event::Incoming(Packet::ConnAck(_))) = ev {
                        tick.reset_immediately();
                    }
                }
                _ = tick.tick() => {
                    n += 1;
                    t += ((n * 7919 + seed) % 21) as f64 / 100.0 - 0.1;
                    let body = json!({"id": n.to_string(), "version": "1.0", "params": {
                        "temperature": (t * 10.0).round() / 10.0,
                        "humidity": 40 + ((n + seed) % 20)}, "method": "thing.event.property.post"});
                    let _ = client.try_publish(
                        format!("/sys/{pk}/{dn}/thing/event/property/post"),
                        QoS::AtLeastOnce,
                        false,
                        body.to_string(),
                    );
                }
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        if *stop.borrow() {
            let _ = client.disconnect().await;
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// A running quickstart.
pub struct Running {
    /// What it offers.
    pub plant: Plant,
    cloud: ironlink_cloud::server::Running,
    edge: ironlink_edge::run::Running,
    stop: watch::Sender<bool>,
    sensors: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("plant", &self.plant)
            .finish()
    }
}

impl Running {
    /// Stops the sensors, the edge and the cloud, in that order.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for s in self.sensors {
            let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
        }
        self.edge.shutdown().await;
        self.cloud.shutdown().await;
    }
}

/// Starts the plant.
pub async fn start(o: &Quickstart) -> Result<Running> {
    std::fs::create_dir_all(&o.data_dir)
        .with_context(|| format!("creating {}", o.data_dir.display()))?;
    let mut config = ironlink_cloud::config::Config {
        data_dir: o.data_dir.join("cloud"),
        ..Default::default()
    };
    config.mqtt.listen = Some(o.mqtt_listen);
    config.mqtt.tls_listen = None;
    config.apps.amqps_listen = None;
    config.http.listen = o.http_listen;
    let cloud = ironlink_cloud::server::start(config).await?;
    let mqtt = cloud.mqtt_addr.context("no MQTT listener")?;
    let api = Api {
        base: format!("http://{}/api/v1", cloud.http_addr),
        token: cloud.admin_token.clone(),
        http: reqwest::Client::new(),
    };
    let p = provision(&api, &o.data_dir, o.meters, o.sensors).await?;
    let (gpk, mpk, spk) = (
        s(&p["gateway_product"])?.to_owned(),
        s(&p["meter_product"])?.to_owned(),
        s(&p["sensor_product"])?.to_owned(),
    );

    // The plant: meters behind the edge gateway.
    let mut edge_toml = format!(
        "[gateway]\nproduct_key = \"{gpk}\"\ndevice_name = \"{}\"\ndevice_secret = \"{}\"\n\
         [uplink]\nhost = \"{}\"\nport = {}\n[queue]\ndir = \"{}\"\n[status]\nlisten = \"{}\"\n",
        s(&p["gateway"]["name"])?,
        s(&p["gateway"]["secret"])?,
        mqtt.ip(),
        mqtt.port(),
        o.data_dir.join("edge-queue").display(),
        o.edge_status_listen,
    );
    let mut meters = Vec::new();
    for (i, m) in p["meters"].as_array().context("meters")?.iter().enumerate() {
        let addr = serve_meter(Arc::new(Mutex::new(MeterState::new(i as u64 + 1)))).await?;
        let name = s(&m["name"])?;
        meters.push(name.to_owned());
        edge_toml.push_str(&format!(
            "\n[[devices]]\nname = \"{name}\"\nproduct_key = \"{mpk}\"\ndevice_secret = \"{}\"\n\
             transport = \"tcp\"\naddress = \"{addr}\"\npoll_interval = \"2s\"\n",
            s(&m["secret"])?
        ));
        for (j, (id, deadband)) in [
            ("Voltage", 0.2),
            ("Current", 0.05),
            ("Power", 5.0),
            ("Energy", 0.001),
        ]
        .into_iter()
        .enumerate()
        {
            edge_toml.push_str(&format!(
                "[[devices.points]]\nidentifier = \"{id}\"\nkind = \"holding\"\naddress = \"{}\"\ntype = \"f32\"\ndeadband = {deadband}\n",
                j * 2
            ));
        }
        edge_toml.push_str(
            "[[devices.points]]\nidentifier = \"Relay\"\nkind = \"coil\"\naddress = \"0\"\ntype = \"bool\"\n\
             [[devices.services]]\nidentifier = \"Trip\"\nset = { Relay = false }\n",
        );
    }
    let edge_file = o.data_dir.join("edge.toml");
    std::fs::write(&edge_file, &edge_toml)?;
    let edge_config =
        ironlink_edge::config::Config::parse(&edge_file.display().to_string(), &edge_toml)
            .map_err(|e| anyhow!("{e}"))?;
    let edge = ironlink_edge::run::start(edge_config)?;

    // Direct sensors.
    let (stop, stop_rx) = watch::channel(false);
    let mut sensors = Vec::new();
    let mut tasks = Vec::new();
    for (i, d) in p["sensors"]
        .as_array()
        .context("sensors")?
        .iter()
        .enumerate()
    {
        let name = s(&d["name"])?.to_owned();
        sensors.push(name.clone());
        tasks.push(tokio::spawn(sensor(
            mqtt,
            spk.clone(),
            name,
            s(&d["secret"])?.to_owned(),
            i as u64,
            stop_rx.clone(),
        )));
    }
    Ok(Running {
        plant: Plant {
            api: api.base,
            token: api.token,
            mqtt,
            edge_status: edge.status_addr,
            meter_product: mpk,
            sensor_product: spk,
            gateway_product: gpk,
            meters,
            sensors,
        },
        cloud,
        edge,
        stop,
        sensors: tasks,
    })
}

/// What to open and what to try.
pub fn guide(p: &Plant, data_dir: &Path) -> String {
    let m = p.meters.first().map_or("meter-01", String::as_str);
    let sn = p.sensors.first().map_or("sensor-01", String::as_str);
    let edge = p
        .edge_status
        .map_or_else(String::new, |a| format!("http://{a}/status"));
    format!(
        "\
Ironlink quickstart is running: a cloud, an edge gateway with {meters} Modbus power meters, and
{sensors} MQTT environment sensors, all on this machine. Data: {dir}

  HTTP API      {api}   (OpenAPI: {api}/openapi.json)
  Console       {url}/console/   (sign in with the admin token)
  Admin token   {token}
  MQTT          mqtt://{mqtt}   (Alink, securemode=3)
  Edge status   {edge}   (/metrics for Prometheus)

Try (another terminal):
  export IRONLINK_URL={url} IRONLINK_TOKEN={token}
  ironlink-cloud device properties {mpk} {m}            # latest meter readings (every 2 s)
  ironlink-cloud device properties {spk} {sn}
  ironlink-cloud device history {mpk} {m} Power          # Power over time
  ironlink-cloud device set {mpk} {m} '{{\"Relay\": 0}}'    # a Modbus write (FC05) through the edge
  ironlink-cloud device call {mpk} {m} Trip              # a service mapped to a write
  ironlink-cloud device sub-devices {gpk} edge-gateway-01
  curl -H \"Authorization: Bearer $IRONLINK_TOKEN\" {api}/devices/{mpk}/{m}/properties

(ironlink-cloud is target/release/ironlink-cloud after `cargo build --release -p ironlink-cloud`.)
Ctrl-C stops everything; the next start reuses the same products and devices.
",
        meters = p.meters.len(),
        sensors = p.sensors.len(),
        dir = data_dir.display(),
        api = p.api,
        url = p.api.trim_end_matches("/api/v1"),
        token = p.token,
        mqtt = p.mqtt,
        mpk = p.meter_product,
        spk = p.sensor_product,
        gpk = p.gateway_product,
    )
}
