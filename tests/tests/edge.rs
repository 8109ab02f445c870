//! End to end: a Modbus field device (in-process tokio-modbus server) -> the edge gateway
//! (pollers, durable queue, one uplink as an Alink gateway) -> the cloud process -> its API.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::future;
use std::sync::Arc;
use tokio_modbus::prelude::*;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};

/// Holding 0..1 = 123.456 as f32 ABCD; input 0 = 2150 (tenths of a degree + offset below).
struct Field;

impl tokio_modbus::server::Service for Field {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Request<'static>) -> Self::Future {
        let bits = 123.456f32.to_bits();
        future::ready(match req {
            Request::ReadHoldingRegisters(0, 2) => Ok(Response::ReadHoldingRegisters(vec![
                (bits >> 16) as u16,
                (bits & 0xFFFF) as u16,
            ])),
            Request::ReadInputRegisters(0, 1) => Ok(Response::ReadInputRegisters(vec![2150])),
            _ => Err(ExceptionCode::IllegalDataAddress),
        })
    }
}

/// Serves a Modbus TCP device on an ephemeral loopback port.
async fn serve<S>(service: S) -> std::net::SocketAddr
where
    S: tokio_modbus::server::Service<
            Request = Request<'static>,
            Response = Response,
            Exception = ExceptionCode,
        > + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    let service = Arc::new(service);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let server = Server::new(l);
        let new_service = move |_| Ok(Some(service.clone()));
        let on_connected = |stream, a| {
            let new_service = new_service.clone();
            async move { accept_tcp_connection(stream, a, new_service) }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    addr
}

async fn field() -> std::net::SocketAddr {
    serve(Field).await
}

async fn create(c: &Cloud, path: &str, body: Value) -> Value {
    let (s, v) = c.api(Method::POST, path, Some(body)).await.unwrap();
    assert_eq!(s, 201, "{path}: {v}");
    v
}

#[tokio::test]
async fn modbus_readings_reach_the_cloud_through_the_edge_gateway_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(
        &dir.path().join("cloud"),
        &["--mqtts-listen", "127.0.0.1:0"],
    )
    .unwrap();
    let mqtts = cloud.mqtts.expect("MQTT/TLS listener");
    let (gpk, gsecret, spk, msecret) = gateway_and_meter(&cloud, "edge-01", "meter-01").await;
    let field = field().await;
    let config = format!(
        r#"
[gateway]
product_key = "{gpk}"
device_name = "edge-01"
device_secret = "{gsecret}"
[uplink]
host = "127.0.0.1"
port = {port}
tls = true
ca_file = "{ca}"
[queue]
dir = "{queue}"
[status]
listen = "127.0.0.1:0"
[[devices]]
name = "meter-01"
product_key = "{spk}"
device_secret = "{msecret}"
transport = "tcp"
address = "{field}"
poll_interval = "50ms"
allow_fast_poll = true
[[devices.points]]
identifier = "Voltage"
kind = "holding"
address = "40001"
type = "f32"
deadband = 1.0
[[devices.points]]
identifier = "Temperature"
kind = "input"
address = "0"
type = "i16"
scale = 0.1
offset = -200.0
deadband = 1.0
"#,
        port = mqtts.port(),
        ca = cloud.data_dir.join("tls/ca.pem").display(),
        queue = dir.path().join("queue").display(),
    );
    let config = ironlink_edge::config::Config::parse("edge.toml", &config).unwrap();
    let edge = ironlink_edge::run::start(config).unwrap();

    // The sub-device's properties appear in the cloud (bounded wait for an eventual state).
    let props = get_until(
        &cloud,
        &format!("/devices/{spk}/meter-01/properties"),
        "no readings in the cloud",
        |v| v["properties"].as_array().is_some_and(|a| a.len() == 2),
    )
    .await;
    let by_id = |id: &str| {
        props["properties"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["identifier"] == id)
            .map(|p| p["value"].as_f64().unwrap())
            .unwrap()
    };
    assert!((by_id("Voltage") - 123.456).abs() < 1e-3);
    assert!((by_id("Temperature") - 15.0).abs() < 1e-9);
    let (_, subs) = cloud
        .api(
            Method::GET,
            &format!("/devices/{gpk}/edge-01/sub-devices"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(subs["sub_devices"][0]["online"], true, "{subs}");
    // The local status endpoint tells the same story.
    let status_url = format!("http://{}", edge.status_addr.unwrap());
    let st: Value = reqwest::get(format!("{status_url}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["uplink"], "up", "{st}");
    assert_eq!(st["devices"]["meter-01"]["state"], "ok", "{st}");
    let metrics = reqwest::get(format!("{status_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("ironlink_edge_points_total{device=\"meter-01\"}"),
        "{metrics}"
    );
    // Everything sent was acknowledged and left the queue.
    let deadline = std::time::Instant::now() + WAIT;
    while edge.queue.lock().unwrap().stats().depth > 0 {
        assert!(std::time::Instant::now() < deadline, "queue never drained");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    edge.shutdown().await;
}

/// The cloud is down while the edge polls: readings pile up in the queue. The edge is killed
/// with kill -9, restarted with the cloud up, and every queued reading reaches the cloud's
/// history.
#[tokio::test]
async fn a_backlog_survives_kill_9_of_the_edge_and_drains_when_the_cloud_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud"), &[]).unwrap();
    let (gpk, gsecret, spk, msecret) = gateway_and_meter(&cloud, "edge-02", "meter-02").await;
    let field = field().await;
    let queue_dir = dir.path().join("queue");
    let config = |port: u16| {
        format!(
            r#"
[gateway]
product_key = "{gpk}"
device_name = "edge-02"
device_secret = "{gsecret}"
[uplink]
host = "127.0.0.1"
port = {port}
[queue]
dir = "{queue}"
[[devices]]
name = "meter-02"
product_key = "{spk}"
device_secret = "{msecret}"
transport = "tcp"
address = "{field}"
poll_interval = "20ms"
allow_fast_poll = true
[[devices.points]]
identifier = "Voltage"
kind = "holding"
address = "40001"
type = "f32"
"#,
            queue = queue_dir.display(),
        )
    };
    // A port nobody listens on: the uplink stays down.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("edge.toml");
    std::fs::write(&cfg, config(dead)).unwrap();
    let bin = ironlink_sim::cloud_process::binary("edge", "ironlink-edge").unwrap();
    let mut edge = std::process::Command::new(&bin)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("IRONLINK_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until a backlog has built up (each poll appends one reading).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let n = std::fs::read_dir(&queue_dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
                    .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                    .sum::<u64>()
            })
            .unwrap_or(0);
        if n > 2000 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no backlog built");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    edge.kill().unwrap(); // SIGKILL
    edge.wait().unwrap();
    let queued = {
        let q =
            ironlink_edge::queue::Queue::open(&queue_dir, ironlink_edge::queue::Limits::default())
                .unwrap();
        q.stats().depth
    };
    assert!(queued > 0);

    // Restart against the cloud, with the field device unreachable so that only the backlog
    // can reach the cloud.
    std::fs::write(
        &cfg,
        config(cloud.mqtt.port()).replace(&field.to_string(), "127.0.0.1:1"),
    )
    .unwrap();
    let mut edge = std::process::Command::new(&bin)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("IRONLINK_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let stored = loop {
        let (_, v) = cloud
            .api(
                Method::GET,
                &format!("/devices/{spk}/meter-02/properties/Voltage/history?limit=10000"),
                None,
            )
            .await
            .unwrap();
        let n = v["points"].as_array().map_or(0, Vec::len) as u64;
        if n >= queued {
            break n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} of {queued} queued readings reached the cloud"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let _ = edge.kill();
    let _ = edge.wait();
    assert_eq!(stored, queued, "every queued reading once");
}

/// A field device with state: 16 holding registers and 8 coils, every request's function code
/// logged.
#[derive(Default)]
struct Plc {
    holding: std::sync::Mutex<[u16; 16]>,
    coils: std::sync::Mutex<[bool; 8]>,
    functions: std::sync::Mutex<Vec<u8>>,
}

struct PlcService(Arc<Plc>);

impl tokio_modbus::server::Service for PlcService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Request<'static>) -> Self::Future {
        let p = &self.0;
        p.functions
            .lock()
            .unwrap()
            .push(req.function_code().value());
        let mut h = p.holding.lock().unwrap();
        let mut c = p.coils.lock().unwrap();
        let range = |a: u16, n: usize, len: usize| {
            let a = usize::from(a);
            (a + n <= len).then_some(a..a + n)
        };
        future::ready(match req {
            Request::ReadHoldingRegisters(a, n) => range(a, n.into(), 16)
                .map(|r| Response::ReadHoldingRegisters(h[r].to_vec()))
                .ok_or(ExceptionCode::IllegalDataAddress),
            Request::ReadCoils(a, n) => range(a, n.into(), 8)
                .map(|r| Response::ReadCoils(c[r].to_vec()))
                .ok_or(ExceptionCode::IllegalDataAddress),
            Request::WriteSingleRegister(a, v) => range(a, 1, 16)
                .map(|r| {
                    h[r].copy_from_slice(&[v]);
                    Response::WriteSingleRegister(a, v)
                })
                .ok_or(ExceptionCode::IllegalDataAddress),
            Request::WriteMultipleRegisters(a, w) => range(a, w.len(), 16)
                .map(|r| {
                    h[r].copy_from_slice(&w);
                    Response::WriteMultipleRegisters(a, w.len() as u16)
                })
                .ok_or(ExceptionCode::IllegalDataAddress),
            Request::WriteSingleCoil(a, v) => range(a, 1, 8)
                .map(|r| {
                    c[r].copy_from_slice(&[v]);
                    Response::WriteSingleCoil(a, v)
                })
                .ok_or(ExceptionCode::IllegalDataAddress),
            Request::WriteMultipleCoils(a, bits) => range(a, bits.len(), 8)
                .map(|r| {
                    c[r].copy_from_slice(&bits);
                    Response::WriteMultipleCoils(a, bits.len() as u16)
                })
                .ok_or(ExceptionCode::IllegalDataAddress),
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

async fn plc(state: Arc<Plc>) -> std::net::SocketAddr {
    serve(PlcService(state)).await
}

const PLC_TSL: &str = r#"{
  "properties": [
    {"identifier": "Setpoint", "name": "S", "accessMode": "rw", "dataType": {"type": "float", "specs": {"min": "0", "max": "100"}}},
    {"identifier": "Mode", "name": "M", "accessMode": "rw", "dataType": {"type": "int", "specs": {"min": "0", "max": "9"}}},
    {"identifier": "Pump", "name": "P", "accessMode": "rw", "dataType": {"type": "bool", "specs": {"0": "off", "1": "on"}}},
    {"identifier": "Fan", "name": "F", "accessMode": "rw", "dataType": {"type": "bool", "specs": {"0": "off", "1": "on"}}}
  ],
  "events": [
    {"identifier": "ModbusFault", "name": "Fault", "type": "error", "outputData": [
      {"identifier": "kind", "name": "K", "dataType": {"type": "text", "specs": {"length": "32"}}},
      {"identifier": "message", "name": "M", "dataType": {"type": "text", "specs": {"length": "1024"}}}
    ]}
  ],
  "services": [
    {"identifier": "StartAll", "name": "Start", "callType": "async", "inputData": [
      {"identifier": "Mode", "name": "M", "dataType": {"type": "int", "specs": {"min": "0", "max": "9"}}}
    ], "outputData": []}
  ]
}"#;

/// Waits until a service call has finished and returns it.
async fn finished(cloud: &Cloud, pk: &str, dn: &str, id: &str) -> Value {
    get_until(
        cloud,
        &format!("/devices/{pk}/{dn}/service-calls/{id}"),
        "call never finished",
        |v| v["status"] != "pending",
    )
    .await
}

/// Property sets and service calls from the cloud's API become Modbus writes (adjacent points
/// in one FC16 or FC15 request, single ones FC06 or FC05) with the inverse scaling; the reply
/// carries the outcome, the new values come back as readings, a property get answers from the
/// last poll, and the fault event of an unreachable device reaches the cloud.
#[tokio::test]
async fn cloud_sets_and_service_calls_become_modbus_writes() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud"), &[]).unwrap();
    let gpk = create(
        &cloud,
        "/products",
        json!({"name": "edge", "node_type": "gateway"}),
    )
    .await["product_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let spk = create(
        &cloud,
        "/products",
        json!({"name": "plc", "node_type": "sub-device"}),
    )
    .await["product_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, v) = cloud
        .api(
            Method::PUT,
            &format!("/products/{spk}/thing-model"),
            Some(serde_json::from_str(PLC_TSL).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let gw = create(
        &cloud,
        &format!("/products/{gpk}/devices"),
        json!({"device_name": "edge-03"}),
    )
    .await;
    let mut secrets = Vec::new();
    for dn in ["plc-01", "plc-gone"] {
        let d = create(
            &cloud,
            &format!("/products/{spk}/devices"),
            json!({"device_name": dn}),
        )
        .await;
        secrets.push(d["device_secret"].as_str().unwrap().to_owned());
    }
    let state = Arc::new(Plc::default());
    let field = plc(state.clone()).await;
    let config = format!(
        r#"
[gateway]
product_key = "{gpk}"
device_name = "edge-03"
device_secret = "{gsecret}"
[uplink]
host = "127.0.0.1"
port = {port}
[queue]
dir = "{queue}"
[[devices]]
name = "plc-01"
product_key = "{spk}"
device_secret = "{s0}"
transport = "tcp"
address = "{field}"
poll_interval = "50ms"
allow_fast_poll = true
[[devices.points]]
identifier = "Setpoint"
kind = "holding"
address = "40003"
type = "f32"
order = "CDAB"
scale = 0.1
[[devices.points]]
identifier = "Mode"
kind = "holding"
address = "40005"
type = "u16"
[[devices.points]]
identifier = "Pump"
kind = "coil"
address = "0"
type = "bool"
[[devices.points]]
identifier = "Fan"
kind = "coil"
address = "1"
type = "bool"
[[devices.services]]
identifier = "StartAll"
set = {{ Pump = true, Fan = true }}
[[devices]]
name = "plc-gone"
product_key = "{spk}"
device_secret = "{s1}"
transport = "tcp"
address = "127.0.0.1:1"
[[devices.points]]
identifier = "Mode"
kind = "holding"
address = "0"
type = "u16"
"#,
        port = cloud.mqtt.port(),
        queue = dir.path().join("queue").display(),
        gsecret = gw["device_secret"].as_str().unwrap(),
        s0 = secrets[0],
        s1 = secrets[1],
    );
    let config = ironlink_edge::config::Config::parse("edge.toml", &config).unwrap();
    let edge = ironlink_edge::run::start(config).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while *edge.uplink.borrow() != ironlink_edge::uplink::State::Up {
        assert!(std::time::Instant::now() < deadline, "uplink never up");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Two adjacent holding points: one FC16 request; 21.5 with scale 0.1 is the f32 215.0.
    let (s, v) = cloud
        .api(
            Method::POST,
            &format!("/devices/{spk}/plc-01/properties"),
            Some(json!({"params": {"Setpoint": 21.5, "Mode": 3}})),
        )
        .await
        .unwrap();
    assert!(s == 200 || s == 202, "{s} {v}");
    let call = finished(&cloud, &spk, "plc-01", v["id"].as_str().unwrap()).await;
    assert_eq!(call["status"], "succeeded", "{call}");
    let bits = 215.0f32.to_bits();
    assert_eq!(
        state.holding.lock().unwrap()[2..5],
        [(bits & 0xFFFF) as u16, (bits >> 16) as u16, 3],
        "CDAB: low word first"
    );
    assert!(state.functions.lock().unwrap().contains(&16));

    // The service writes both coils (adjacent: one FC15) and its Mode parameter (FC06).
    let (_, v) = cloud
        .api(
            Method::POST,
            &format!("/devices/{spk}/plc-01/services/StartAll"),
            Some(json!({"params": {"Mode": 7}})),
        )
        .await
        .unwrap();
    let call = finished(&cloud, &spk, "plc-01", v["id"].as_str().unwrap()).await;
    assert_eq!(call["status"], "succeeded", "{call}");
    assert_eq!(state.coils.lock().unwrap()[..2], [true, true]);
    assert_eq!(state.holding.lock().unwrap()[4], 7);
    let fcs = state.functions.lock().unwrap().clone();
    assert!(fcs.contains(&15) && fcs.contains(&6), "{fcs:?}");

    // A single coil is FC05.
    let (_, v) = cloud
        .api(
            Method::POST,
            &format!("/devices/{spk}/plc-01/properties"),
            Some(json!({"params": {"Fan": 0}})),
        )
        .await
        .unwrap();
    let call = finished(&cloud, &spk, "plc-01", v["id"].as_str().unwrap()).await;
    assert_eq!(call["status"], "succeeded", "{call}");
    assert!(state.functions.lock().unwrap().contains(&5));
    assert!(!state.coils.lock().unwrap()[1]);

    // The new values come back as readings.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, v) = cloud
            .api(
                Method::GET,
                &format!("/devices/{spk}/plc-01/properties"),
                None,
            )
            .await
            .unwrap();
        let get = |id: &str| {
            v["properties"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["identifier"] == id))
                .map(|p| p["value"].clone())
        };
        if get("Setpoint")
            .and_then(|x| x.as_f64())
            .is_some_and(|x| (x - 21.5).abs() < 1e-6)
            && get("Mode") == Some(json!(7))
            && get("Fan") == Some(json!(0))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "values not read back: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // A property get is answered from the last poll.
    let (_, v) = cloud
        .api(
            Method::POST,
            &format!("/devices/{spk}/plc-01/properties/get"),
            Some(json!({"identifiers": ["Mode"]})),
        )
        .await
        .unwrap();
    let call = finished(&cloud, &spk, "plc-01", v["id"].as_str().unwrap()).await;
    assert_eq!(call["status"], "succeeded", "{call}");
    assert_eq!(call["reply"]["Mode"], 7, "{call}");

    // The gateway itself has no points: a set addressed to it is refused, not left to time out.
    let (_, v) = cloud
        .api(
            Method::POST,
            &format!("/devices/{gpk}/edge-03/properties"),
            Some(json!({"params": {"Mode": 1}})),
        )
        .await
        .unwrap();
    let call = finished(&cloud, &gpk, "edge-03", v["id"].as_str().unwrap()).await;
    assert_eq!(
        (call["status"].as_str(), call["code"].as_i64()),
        (Some("failed"), Some(460)),
        "{call}"
    );

    // A write to the unreachable device fails at once with the reason.
    let (_, v) = cloud
        .api(
            Method::POST,
            &format!("/devices/{spk}/plc-gone/properties"),
            Some(json!({"params": {"Mode": 1}})),
        )
        .await
        .unwrap();
    let call = finished(&cloud, &spk, "plc-gone", v["id"].as_str().unwrap()).await;
    assert_eq!(call["status"], "failed", "{call}");
    assert_eq!(call["code"], 503, "{call}");
    // And its fault event is in the cloud.
    get_until(
        &cloud,
        &format!("/devices/{spk}/plc-gone/events"),
        "no fault event",
        |v| v.to_string().contains("unreachable"),
    )
    .await;
    edge.shutdown().await;
}

/// A meter whose register counts its reads: every reading is a different, increasing value,
/// and the meter remembers which values it served. `frozen`: answers with an exception.
#[derive(Default)]
struct Counter {
    next: std::sync::atomic::AtomicU16,
    frozen: std::sync::atomic::AtomicBool,
}

struct CounterService(Arc<Counter>);

impl tokio_modbus::server::Service for CounterService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Request<'static>) -> Self::Future {
        use std::sync::atomic::Ordering::SeqCst;
        future::ready(match req {
            _ if self.0.frozen.load(SeqCst) => Err(ExceptionCode::ServerDeviceBusy),
            Request::ReadHoldingRegisters(0, 1) => Ok(Response::ReadHoldingRegisters(vec![
                self.0.next.fetch_add(1, SeqCst) + 1,
            ])),
            _ => Err(ExceptionCode::IllegalDataAddress),
        })
    }
}

async fn counter(state: Arc<Counter>) -> std::net::SocketAddr {
    serve(CounterService(state)).await
}

async fn gateway_and_meter(
    cloud: &Cloud,
    gdn: &str,
    mdn: &str,
) -> (String, String, String, String) {
    let gpk = create(
        cloud,
        "/products",
        json!({"name": "edge", "node_type": "gateway"}),
    )
    .await["product_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let spk = create(
        cloud,
        "/products",
        json!({"name": "meter", "node_type": "sub-device"}),
    )
    .await["product_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let gw = create(
        cloud,
        &format!("/products/{gpk}/devices"),
        json!({"device_name": gdn}),
    )
    .await;
    let m = create(
        cloud,
        &format!("/products/{spk}/devices"),
        json!({"device_name": mdn}),
    )
    .await;
    (
        gpk,
        gw["device_secret"].as_str().unwrap().to_owned(),
        spk,
        m["device_secret"].as_str().unwrap().to_owned(),
    )
}

/// The failure test of the edge issue: polling at 10 Hz, the cloud is killed (-9) and stays
/// down for 60 s, then comes back on the same port. Every reading the meter served reaches the
/// cloud's history exactly once, in order, with its own timestamp.
#[tokio::test]
async fn a_60_s_cloud_outage_at_10_hz_loses_and_duplicates_nothing() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    let cloud = Cloud::start(&cloud_dir, &[]).unwrap();
    let (gpk, gsecret, spk, msecret) = gateway_and_meter(&cloud, "edge-04", "meter-04").await;
    let meter = Arc::new(Counter::default());
    let field = counter(meter.clone()).await;
    let (mqtt, http) = (cloud.mqtt, cloud.http);
    let config = format!(
        r#"
[gateway]
product_key = "{gpk}"
device_name = "edge-04"
device_secret = "{gsecret}"
[uplink]
host = "127.0.0.1"
port = {port}
[queue]
dir = "{queue}"
drain_rate = 200
[[devices]]
name = "meter-04"
product_key = "{spk}"
device_secret = "{msecret}"
transport = "tcp"
address = "{field}"
poll_interval = "100ms"
fault_event = ""
[[devices.points]]
identifier = "Count"
kind = "holding"
address = "0"
type = "u16"
"#,
        port = mqtt.port(),
        queue = dir.path().join("queue").display(),
    );
    let config = ironlink_edge::config::Config::parse("edge.toml", &config).unwrap();
    let edge = ironlink_edge::run::start(config).unwrap();
    let mut up = edge.uplink.clone();
    tokio::time::timeout(
        WAIT,
        up.wait_for(|s| *s == ironlink_edge::uplink::State::Up),
    )
    .await
    .expect("uplink up")
    .unwrap();
    // Some readings flow, then the cloud dies.
    while meter.next.load(SeqCst) < 20 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    cloud.kill9().unwrap();
    let at_kill = meter.next.load(SeqCst);
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    let during = meter.next.load(SeqCst) - at_kill;
    assert!(
        during >= 300,
        "the edge kept polling: {during} readings in 60 s"
    );
    let cloud = Cloud::start(
        &cloud_dir,
        &[
            "--mqtt-listen",
            &mqtt.to_string(),
            "--http-listen",
            &http.to_string(),
        ],
    )
    .unwrap();
    // Live data flows at once; the backlog drains beside it. Then the meter stops answering,
    // and everything it served must be in the cloud.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while edge.queue.lock().unwrap().stats().depth > 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "backlog never drained"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    meter.frozen.store(true, SeqCst);
    let served = u64::from(meter.next.load(SeqCst));
    let deadline = std::time::Instant::now() + WAIT;
    let points = loop {
        let (_, v) = cloud
            .api(
                Method::GET,
                &format!("/devices/{spk}/meter-04/properties/Count/history?limit=100000"),
                None,
            )
            .await
            .unwrap();
        let points = v["points"].as_array().cloned().unwrap_or_default();
        if points.len() as u64 >= served {
            break points;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {served} readings in the cloud",
            points.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    edge.shutdown().await;
    let mut by_time: Vec<(i64, u64)> = points
        .iter()
        .map(|p| (p["time"].as_i64().unwrap(), p["value"].as_u64().unwrap()))
        .collect();
    by_time.sort_unstable();
    let values: Vec<u64> = by_time.iter().map(|p| p.1).collect();
    assert_eq!(
        values,
        (1..=served).collect::<Vec<_>>(),
        "each reading exactly once, in the order of its timestamps"
    );
}

/// A full queue applies its policy and says so in the metrics.
#[tokio::test]
async fn a_full_queue_drops_the_oldest_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let meter = Arc::new(Counter::default());
    let field = counter(meter).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        r#"
[gateway]
product_key = "g"
device_name = "edge-05"
device_secret = "s"
[uplink]
host = "127.0.0.1"
port = {dead}
[queue]
dir = "{queue}"
max_bytes = 2000
[status]
listen = "127.0.0.1:0"
[[devices]]
name = "meter-05"
product_key = "p"
device_secret = "x"
transport = "tcp"
address = "{field}"
poll_interval = "10ms"
allow_fast_poll = true
[[devices.points]]
identifier = "Count"
kind = "holding"
address = "0"
type = "u16"
"#,
        queue = dir.path().join("queue").display(),
    );
    let config = ironlink_edge::config::Config::parse("edge.toml", &config).unwrap();
    let edge = ironlink_edge::run::start(config).unwrap();
    let url = format!("http://{}/metrics", edge.status_addr.unwrap());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let m = reqwest::get(&url).await.unwrap().text().await.unwrap();
        let dropped = m
            .lines()
            .find_map(|l| l.strip_prefix("ironlink_edge_queue_dropped_full_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if dropped > 0 {
            let bytes: u64 = m
                .lines()
                .find_map(|l| l.strip_prefix("ironlink_edge_queue_bytes "))
                .and_then(|v| v.parse().ok())
                .unwrap();
            assert!(bytes <= 2000, "{m}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never full: {m}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The oldest went: what is left starts after the dropped ones.
    let first = edge.queue.lock().unwrap().read_after(0, 1).unwrap();
    assert!(first[0].seq > 1);
    edge.shutdown().await;
}
