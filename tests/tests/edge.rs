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

async fn field() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let server = Server::new(l);
        let new_service = |_| Ok(Some(Arc::new(Field)));
        let on_connected = |stream, a| async move { accept_tcp_connection(stream, a, new_service) };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    addr
}

async fn create(c: &Cloud, path: &str, body: Value) -> Value {
    let (s, v) = c.api(Method::POST, path, Some(body)).await.unwrap();
    assert_eq!(s, 201, "{path}: {v}");
    v
}

#[tokio::test]
async fn modbus_readings_reach_the_cloud_through_the_edge_gateway() {
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
        json!({"name": "meter", "node_type": "sub-device"}),
    )
    .await["product_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let gw = create(
        &cloud,
        &format!("/products/{gpk}/devices"),
        json!({"device_name": "edge-01"}),
    )
    .await;
    let meter = create(
        &cloud,
        &format!("/products/{spk}/devices"),
        json!({"device_name": "meter-01"}),
    )
    .await;
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
        gsecret = gw["device_secret"].as_str().unwrap(),
        port = cloud.mqtt.port(),
        queue = dir.path().join("queue").display(),
        msecret = meter["device_secret"].as_str().unwrap(),
    );
    let config = ironlink_edge::config::Config::parse("edge.toml", &config).unwrap();
    let edge = ironlink_edge::run::start(config).unwrap();

    // The sub-device's properties appear in the cloud (bounded wait for an eventual state).
    let deadline = std::time::Instant::now() + WAIT;
    let props = loop {
        let (_, v) = cloud
            .api(
                Method::GET,
                &format!("/devices/{spk}/meter-01/properties"),
                None,
            )
            .await
            .unwrap();
        if v["properties"].as_array().is_some_and(|a| a.len() == 2) {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no readings in the cloud: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
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
        json!({"name": "meter", "node_type": "sub-device"}),
    )
    .await["product_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let gw = create(
        &cloud,
        &format!("/products/{gpk}/devices"),
        json!({"device_name": "edge-02"}),
    )
    .await;
    let meter = create(
        &cloud,
        &format!("/products/{spk}/devices"),
        json!({"device_name": "meter-02"}),
    )
    .await;
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
[[devices.points]]
identifier = "Voltage"
kind = "holding"
address = "40001"
type = "f32"
"#,
            gsecret = gw["device_secret"].as_str().unwrap(),
            queue = queue_dir.display(),
            msecret = meter["device_secret"].as_str().unwrap(),
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
