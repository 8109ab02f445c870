//! End to end: simulated JT/T 808 terminals and GB/T 32960 vehicles (frames built with the
//! codecs) -> the edge gateway's servers -> one Alink uplink -> the cloud process -> its API:
//! registration against the registry, authentication, locations and vehicle data with their
//! own times, re-issued data kept as history without replacing newer values, the cloud's calls
//! answered by the terminal, bad frames skipped without dropping the connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::SigningKey;
use ironlink_protocols::gb32960 as g;
use ironlink_protocols::jt808 as j;
use ironlink_sim::vehicles::{location, report as vehicle_report, Terminal, Vehicle};
use ironlink_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const JT808_TSL: &str = include_str!("../../docs/tsl-templates/jt808-terminal.json");
const GB32960_TSL: &str = include_str!("../../docs/tsl-templates/gb32960-vehicle.json");

async fn create(c: &Cloud, path: &str, body: Value) -> Value {
    let (s, v) = c.api(Method::POST, path, Some(body)).await.unwrap();
    assert_eq!(s, 201, "{path}: {v}");
    v
}

/// A cloud, a gateway, a terminal product with `tsl` and dynamic registration, and an edge
/// with both vehicle servers.
async fn setup(
    dir: &std::path::Path,
    tsl: &str,
) -> (Cloud, ironlink_edge::run::Running, String, String) {
    setup_with(dir, tsl, "5s", "").await
}

/// [`setup`] with the terminals' answer timeout and more configuration.
async fn setup_with(
    dir: &std::path::Path,
    tsl: &str,
    answer_timeout: &str,
    extra: &str,
) -> (Cloud, ironlink_edge::run::Running, String, String) {
    let cloud = Cloud::start(&dir.join("cloud"), &[]).unwrap();
    let (gpk, gsecret) = gateway(&cloud, "edge-01").await.unwrap();
    let tpk = sub_product(
        &cloud,
        "terminals",
        Some(serde_json::from_str(tsl).unwrap()),
    )
    .await
    .unwrap();
    let config = format!(
        r#"
[gateway]
product_key = "{gpk}"
device_name = "edge-01"
device_secret = "{secret}"
[uplink]
host = "127.0.0.1"
port = {port}
[queue]
dir = "{queue}"
[status]
listen = "127.0.0.1:0"
[jt808]
listen = "127.0.0.1:0"
product_key = "{tpk}"
answer_timeout = "{answer_timeout}"
[gb32960]
listen = "127.0.0.1:0"
product_key = "{tpk}"
answer_timeout = "{answer_timeout}"
{extra}
"#,
        secret = gsecret,
        port = cloud.mqtt.port(),
        queue = dir.join("queue").display(),
    );
    let edge = start_edge(&config).await.unwrap();
    (cloud, edge, gpk, tpk)
}

/// Waits (bounded) until `f` of a GET is true; returns the body.
async fn until(cloud: &Cloud, path: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, v) = cloud.api(Method::GET, path, None).await.unwrap();
        if f(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{path}: {v}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

fn prop(v: &Value, id: &str) -> Value {
    v["properties"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["identifier"] == id)
        .map(|p| p["value"].clone())
        .unwrap_or(Value::Null)
}

async fn finished(cloud: &Cloud, pk: &str, dn: &str, id: &str) -> Value {
    until(
        cloud,
        &format!("/devices/{pk}/{dn}/service-calls/{id}"),
        |v| v["status"] != "pending",
    )
    .await
}

/// Sends and checks the platform's general response.
async fn expect(t: &mut Terminal, m: &j::Message, result: u8) {
    assert_eq!(t.exchange(m).await.unwrap(), result, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jt808_terminals_register_report_and_answer_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let (cloud, edge, gpk, tpk) = setup(dir.path(), JT808_TSL).await;
    let addr = edge.jt808_addr.unwrap();
    let dn = "13912345678";
    let mut t = Terminal::connect(addr, dn).await.unwrap();

    // Before authenticating, a location is refused (result 1), and nothing is stored.
    let now = ironlink_edge::now_ms() / 1000 * 1000;
    expect(&mut t, &j::Message::Location(location(now, 1, 1)), 1).await;

    // Registration against the registry: the answer carries the authentication code.
    let serial = t
        .send(&j::Message::Register(j::Register {
            province: 11,
            city: 100,
            maker: "70111".into(),
            model: "IRONLINK-T1".into(),
            terminal_id: "T000001".into(),
            plate_color: 1,
            plate: "京A12345".into(),
        }))
        .await
        .unwrap();
    let (_, r) = t.next().await.unwrap();
    let j::Message::RegisterResponse(r) = r else {
        panic!("{r:?}")
    };
    assert_eq!((r.serial, r.result), (serial, 0));
    assert_eq!(r.auth_code.len(), 16);
    // A wrong code is refused; the right one accepted.
    expect(
        &mut t,
        &j::Message::Auth(j::Auth {
            code: "wrong".into(),
            imei: None,
            software: None,
        }),
        1,
    )
    .await;
    expect(
        &mut t,
        &j::Message::Auth(j::Auth {
            code: r.auth_code.clone(),
            imei: None,
            software: None,
        }),
        0,
    )
    .await;

    // A live location, then a blind-area batch of two older ones.
    expect(
        &mut t,
        &j::Message::Location(location(now, 39_908_692, 655)),
        0,
    )
    .await;
    expect(
        &mut t,
        &j::Message::Batch {
            reissued: true,
            locations: vec![
                location(now - 120_000, 39_900_000, 300),
                location(now - 60_000, 39_904_000, 400),
            ],
        },
        0,
    )
    .await;
    // Garbage and a frame with a bad check code between messages: skipped, the connection
    // goes on.
    t.stream
        .write_all(&[0x01, 0x02, 0x7E, 0x00, 0x02, 0x00, 0x7E])
        .await
        .unwrap();
    expect(&mut t, &j::Message::Heartbeat, 0).await;

    let path = format!("/devices/{tpk}/{dn}/properties");
    let v = until(&cloud, &path, |v| {
        v["properties"].as_array().is_some_and(|a| a.len() >= 10)
    })
    .await;
    assert_eq!(prop(&v, "latitude"), json!(39.908692), "{v}");
    assert_eq!(prop(&v, "speed"), json!(65.5));
    assert_eq!(prop(&v, "mileage"), json!(12345.6));
    assert_eq!(prop(&v, "fuel"), json!(40.5));
    assert_eq!(prop(&v, "plate"), json!("京A12345"));
    let h = until(
        &cloud,
        &format!("/devices/{tpk}/{dn}/properties/latitude/history?limit=100"),
        |v| v["points"].as_array().is_some_and(|a| a.len() == 3),
    )
    .await;
    let times: Vec<i64> = h["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["time"].as_i64().unwrap())
        .collect();
    assert!(
        times.contains(&(now - 120_000)) && times.contains(&now),
        "{h}"
    );
    // The terminal is an online sub-device of the gateway.
    let subs = until(
        &cloud,
        &format!("/devices/{gpk}/edge-01/sub-devices"),
        |v| v["sub_devices"][0]["online"] == true,
    )
    .await;
    assert_eq!(subs["sub_devices"][0]["device_name"], dn, "{subs}");

    // The cloud's calls: a text message, a location query.
    let (s, call) = cloud
        .api(
            Method::POST,
            &format!("/devices/{tpk}/{dn}/services/SendText"),
            Some(json!({"params": {"text": "前方拥堵，请绕行", "flags": 12}})),
        )
        .await
        .unwrap();
    assert!(s == 200 || s == 202, "{s} {call}");
    let (h, m) = t.next().await.unwrap();
    assert_eq!(
        m,
        j::Message::Text {
            flags: 12,
            kind: None,
            text: "前方拥堵，请绕行".into()
        }
    );
    t.send(&j::Message::TerminalResponse(j::GeneralResponse {
        serial: h.serial,
        msg_id: 0x8300,
        result: 0,
    }))
    .await
    .unwrap();
    let c = finished(&cloud, &tpk, dn, call["id"].as_str().unwrap()).await;
    assert_eq!(c["status"], "succeeded", "{c}");

    let (_, call) = cloud
        .api(
            Method::POST,
            &format!("/devices/{tpk}/{dn}/services/QueryLocation"),
            Some(json!({})),
        )
        .await
        .unwrap();
    let (h, m) = t.next().await.unwrap();
    assert_eq!(m, j::Message::QueryLocation);
    let serial = t
        .send(&j::Message::LocationReply {
            serial: h.serial,
            location: location(now + 1000, 39_910_000, 100),
        })
        .await
        .unwrap();
    let (_, ack) = t.next().await.unwrap();
    assert!(matches!(ack, j::Message::PlatformResponse(g) if g.serial == serial && g.result == 0));
    let c = finished(&cloud, &tpk, dn, call["id"].as_str().unwrap()).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["reply"]["latitude"], json!(39.91), "{c}");

    // A call the terminal does not answer in time fails with the reason.
    let (_, call) = cloud
        .api(
            Method::POST,
            &format!("/devices/{tpk}/{dn}/services/QueryParams"),
            Some(json!({})),
        )
        .await
        .unwrap();
    let (_, m) = t.next().await.unwrap();
    assert_eq!(m, j::Message::QueryParams);
    let c = finished(&cloud, &tpk, dn, call["id"].as_str().unwrap()).await;
    assert_ne!(c["status"], "succeeded", "{c}");

    // The terminal goes: it is offline in the cloud.
    drop(t);
    until(
        &cloud,
        &format!("/devices/{gpk}/edge-01/sub-devices"),
        |v| v["sub_devices"][0]["online"] == false,
    )
    .await;
    let metrics = reqwest::get(format!("http://{}/metrics", edge.status_addr.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "ironlink_edge_refused_total{protocol=\"jt808\",reason=\"not_authenticated\"} 1"
        ),
        "{metrics}"
    );
    edge.shutdown().await;
}

async fn vexpect(v: &mut Vehicle, command: u8, m: &g::Message, flag: u8) {
    assert_eq!(v.exchange(command, m).await.unwrap(), flag, "{m:?}");
}

const VIN: &str = "LGHC4V1D9HE204406";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gb32960_vehicles_log_in_report_and_answer_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let (cloud, edge, _gpk, tpk) = setup(dir.path(), GB32960_TSL).await;
    let mut v = Vehicle::connect(edge.gb32960_addr.unwrap(), VIN)
        .await
        .unwrap();
    let now = ironlink_edge::now_ms() / 1000 * 1000;
    // Data before login: refused.
    vexpect(
        &mut v,
        g::cmd::REALTIME,
        &g::Message::Realtime(vehicle_report(now, 50, 100)),
        g::resp::ERROR,
    )
    .await;
    vexpect(
        &mut v,
        g::cmd::LOGIN,
        &g::Message::Login(g::Login {
            time: g::Time::from_unix_ms(now),
            serial: 1,
            iccid: "89860117795950089298".into(),
            systems: vec!["BAT01".into()],
        }),
        g::resp::OK,
    )
    .await;
    vexpect(
        &mut v,
        g::cmd::REALTIME,
        &g::Message::Realtime(vehicle_report(now, 87, 652)),
        g::resp::OK,
    )
    .await;
    // Re-issued, older data: history only, the latest values stay.
    vexpect(
        &mut v,
        g::cmd::REISSUE,
        &g::Message::Reissue(vehicle_report(now - 300_000, 95, 0)),
        g::resp::OK,
    )
    .await;
    // A frame with a bad BCC: skipped; the heartbeat after it is answered.
    let mut bad = g::encode_frame(g::cmd::HEARTBEAT, g::resp::COMMAND, VIN, &[]).unwrap();
    *bad.last_mut().unwrap() ^= 0xFF;
    v.stream.write_all(&bad).await.unwrap();
    vexpect(
        &mut v,
        g::cmd::HEARTBEAT,
        &g::Message::Heartbeat,
        g::resp::OK,
    )
    .await;

    let path = format!("/devices/{tpk}/{VIN}/properties");
    let p = until(&cloud, &path, |v| prop(v, "soc") == json!(87)).await;
    assert_eq!(prop(&p, "speed"), json!(65.2), "{p}");
    assert_eq!(prop(&p, "totalCurrent"), json!(25.0));
    assert_eq!(prop(&p, "latitude"), json!(31.230416));
    assert_eq!(prop(&p, "iccid"), json!("89860117795950089298"));
    assert_eq!(
        prop(&p, "insulation"),
        Value::Null,
        "invalid values are left out"
    );
    let h = until(
        &cloud,
        &format!("/devices/{tpk}/{VIN}/properties/soc/history?limit=10"),
        |v| v["points"].as_array().is_some_and(|a| a.len() == 2),
    )
    .await;
    assert!(h["points"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["time"] == json!(now - 300_000) && p["value"] == json!(95)));

    // The cloud's control command reaches the vehicle; its answer finishes the call.
    let (_, call) = cloud
        .api(
            Method::POST,
            &format!("/devices/{tpk}/{VIN}/services/Control"),
            Some(json!({"params": {"command": 3, "params": ""}})),
        )
        .await
        .unwrap();
    let f = v.next().await.unwrap();
    assert_eq!((f.command, f.response), (g::cmd::CONTROL, g::resp::COMMAND));
    let g::Message::Control { command, .. } = g::decode(&f).unwrap() else {
        panic!()
    };
    assert_eq!(command, 3);
    let answer = g::encode_frame(g::cmd::CONTROL, g::resp::OK, VIN, &f.data[..6]).unwrap();
    v.stream.write_all(&answer).await.unwrap();
    let c = finished(&cloud, &tpk, VIN, call["id"].as_str().unwrap()).await;
    assert_eq!(c["status"], "succeeded", "{c}");

    // A firmware campaign for the vehicle: the gateway fetches the image, and says why it
    // cannot deliver it (the vehicle would fetch it by URL itself; not built).
    let key = SigningKey::from_bytes(&[1u8; 32]);
    let pkg = upload(&cloud, &tpk, "V-2", &[5u8; 2000], &key).await;
    let id = campaign(&cloud, &pkg, VIN).await;
    let c = campaign_over(&cloud, &id).await;
    assert_eq!(c["states"]["failed"], 1, "{c}");
    let why = c["failures"][0]["reason"].as_str().unwrap();
    assert!(why.contains("(-1)") && why.contains("GB/T 32960"), "{why}");
    edge.shutdown().await;
}

/// Locations the edge acknowledged while the cloud was down survive a kill -9 of the edge:
/// after a restart (cloud back, the terminal gone) they reach the cloud's history as the
/// terminal, which is then logged out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_locations_survive_kill_9_of_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    let cloud = Cloud::start(&cloud_dir, &[]).unwrap();
    let (mqtt, http) = (cloud.mqtt, cloud.http);
    let create_product = |body: Value| {
        let c = &cloud;
        async move {
            create(c, "/products", body).await["product_key"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let gpk = create_product(json!({"name": "edge", "node_type": "gateway"})).await;
    let gw = create(
        &cloud,
        &format!("/products/{gpk}/devices"),
        json!({"device_name": "edge-09"}),
    )
    .await;
    let tpk = create_product(json!({"name": "trucks", "node_type": "sub-device"})).await;
    let (s, _) = cloud
        .api(
            Method::PUT,
            &format!("/products/{tpk}/thing-model"),
            Some(serde_json::from_str(JT808_TSL).unwrap()),
        )
        .await
        .unwrap();
    assert!(s < 300);
    let (s, _) = cloud
        .api(
            Method::PATCH,
            &format!("/products/{tpk}"),
            Some(json!({"dynamic_register": true})),
        )
        .await
        .unwrap();
    assert_eq!(s, 200);
    let jt_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("edge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nproduct_key = \"{gpk}\"\ndevice_name = \"edge-09\"\ndevice_secret = \"{}\"\n\
             [uplink]\nhost = \"127.0.0.1\"\nport = {}\n[queue]\ndir = \"{}\"\n\
             [jt808]\nlisten = \"127.0.0.1:{jt_port}\"\nproduct_key = \"{tpk}\"\n",
            gw["device_secret"].as_str().unwrap(),
            mqtt.port(),
            dir.path().join("queue").display()
        ),
    )
    .unwrap();
    let bin = ironlink_sim::cloud_process::binary("edge", "ironlink-edge").unwrap();
    let spawn = || {
        std::process::Command::new(&bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("IRONLINK_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut edge = spawn();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], jt_port).into();
    let deadline = std::time::Instant::now() + WAIT;
    let mut t = loop {
        match Terminal::connect(addr, "13800000009").await {
            Ok(t) => break t,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("the edge does not listen: {e}"),
        }
    };
    t.register_and_authenticate().await.unwrap();

    // The cloud goes; the edge still acknowledges what it queued.
    cloud.kill9().unwrap();
    let t0 = ironlink_edge::now_ms() / 1000 * 1000 - 60_000;
    for i in 0..5u32 {
        let l = location(t0 + i64::from(i) * 1000, 39_000_000 + i, 100);
        assert_eq!(t.exchange(&j::Message::Location(l)).await.unwrap(), 0);
    }
    drop(t);
    edge.kill().unwrap(); // SIGKILL
    edge.wait().unwrap();

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
    let mut edge = spawn();
    let h = until(
        &cloud,
        &format!("/devices/{tpk}/13800000009/properties/latitude/history?limit=100"),
        |v| {
            v["points"].as_array().is_some_and(|a| {
                (0..5).all(|i| a.iter().any(|p| p["time"] == json!(t0 + i * 1000)))
            })
        },
    )
    .await;
    assert_eq!(h["points"].as_array().unwrap().len(), 5, "each once: {h}");
    // Its terminal is gone: once the queue is caught up, the sub-device is logged out.
    until(
        &cloud,
        &format!("/devices/{gpk}/edge-09/sub-devices"),
        |v| v["sub_devices"][0]["online"] == false,
    )
    .await;
    edge.kill().unwrap();
    edge.wait().unwrap();
}

/// Uploads `image` for product `pk` signed with `key`; returns the package id.
async fn upload(cloud: &Cloud, pk: &str, version: &str, image: &[u8], key: &SigningKey) -> String {
    upload_package(cloud, pk, version, image, &sign_image(key, image)).await
}

/// Acknowledges a 0x8108 sub-package.
async fn ack_package(t: &mut Terminal, serial: u16) {
    t.send(&j::Message::TerminalResponse(j::GeneralResponse {
        serial,
        msg_id: 0x8108,
        result: 0,
    }))
    .await
    .unwrap();
}

/// Starts a one-device campaign without retries; returns its id.
async fn campaign(cloud: &Cloud, package: &str, dn: &str) -> String {
    let c = create(
        cloud,
        "/ota/campaigns",
        json!({"name": format!("{dn}-{package}"), "package_id": package, "target": {"devices": [dn]}, "policy": {"retries": 0}}),
    )
    .await;
    c["id"].as_str().unwrap().to_owned()
}

async fn campaign_over(cloud: &Cloud, id: &str) -> Value {
    until(cloud, &format!("/ota/campaigns/{id}"), |v| {
        v["state"] == "finished"
    })
    .await
}

/// A JT/T 808 terminal upgraded through the gateway: the gateway fetches and checks the image
/// (one signed with another key is refused, -3, and never reaches the terminal), sends it as
/// 0x8108 sub-packages (one whose acknowledgement is withheld is sent again), the terminal
/// reassembles exactly the image, reports 0x0108 success and answers 0x8107 with its new
/// firmware version: the campaign succeeds with that version recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jt808_terminals_upgrade_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[42u8; 32]);
    let ota = format!(
        "[ota]\npublic_key = \"{}\"\n",
        hex::encode(key.verifying_key().as_bytes())
    );
    let (cloud, edge, _gpk, tpk) = setup_with(dir.path(), JT808_TSL, "2s", &ota).await;
    let dn = "13912345001";
    let mut t = Terminal::connect(edge.jt808_addr.unwrap(), dn)
        .await
        .unwrap();
    t.register_and_authenticate().await.unwrap();
    // Online in the cloud once its first data is there.
    let now = ironlink_edge::now_ms() / 1000 * 1000;
    expect(&mut t, &j::Message::Location(location(now, 1, 1)), 0).await;
    until(&cloud, &format!("/devices/{tpk}/{dn}"), |v| {
        v["online"] == true
    })
    .await;

    // Signed by another key: the gateway refuses it before the terminal sees anything.
    let image: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 300) as u8).collect();
    let other = SigningKey::from_bytes(&[7u8; 32]);
    let bad = upload(&cloud, &tpk, "T-1.9", &image, &other).await;
    let id = campaign(&cloud, &bad, dn).await;
    let c = campaign_over(&cloud, &id).await;
    assert_eq!(c["states"]["failed"], 1, "{c}");
    let why = c["failures"][0]["reason"].as_str().unwrap();
    assert!(why.contains("(-3)") && why.contains("ed25519"), "{why}");

    // The right key: sent in sub-packages.
    let good = upload(&cloud, &tpk, "T-2.0", &image, &key).await;
    let id = campaign(&cloud, &good, dn).await;
    let mut packages = j::Reassembler::new(1 << 20, 60_000);
    let mut body = None;
    let mut withheld = None;
    let mut resent = false;
    while body.is_none() || !resent {
        let f = t.next_frame().await.unwrap();
        assert_eq!(f.header.msg_id, 0x8108, "{:?}", f.header);
        let (total, index) = f.header.package.expect("a sub-package");
        assert_eq!(
            total, 5,
            "5,000 bytes and a 16-byte head in 1,023-byte sub-packages"
        );
        // The second sub-package is acknowledged only when it comes again.
        if index == 2 && withheld.is_none() {
            withheld = Some(f.header.serial);
        } else {
            resent |= index == 2;
            ack_package(&mut t, f.header.serial).await;
        }
        if let Some(b) = packages
            .push(&f.header, &f.body, ironlink_edge::now_ms())
            .unwrap()
        {
            body = Some(b);
        }
    }
    let j::Message::Upgrade(u) = j::decode(0x8108, false, &body.unwrap()).unwrap() else {
        panic!("not an upgrade package")
    };
    assert_eq!((u.kind, u.version.as_str()), (0, "T-2.0"));
    assert_eq!(u.maker, "70111", "the maker id of the registration");
    assert!(u.package == image, "the terminal has exactly the image");
    until(&cloud, &format!("/ota/campaigns/{id}"), |v| {
        v["states"]["flashing"] == 1
    })
    .await;

    // Flashed (a real terminal restarts and reconnects first): 0x0108, then its attributes.
    expect(&mut t, &j::Message::UpgradeResult { kind: 0, result: 0 }, 0).await;
    let (_, m) = t.next().await.unwrap();
    assert_eq!(m, j::Message::QueryAttributes);
    t.send(&j::Message::Attributes(j::Attributes {
        terminal_type: 6,
        maker: "70111".into(),
        model: "IRONLINK-SIM".into(),
        terminal_id: "T000001".into(),
        iccid: [0; 10],
        hardware: "HW1".into(),
        firmware: "T-2.0".into(),
        gnss: 3,
        comm: 1,
    }))
    .await
    .unwrap();
    let c = campaign_over(&cloud, &id).await;
    assert_eq!(c["states"]["succeeded"], 1, "{c}");
    let (_, v) = cloud
        .api(Method::GET, &format!("/devices/{tpk}/{dn}/ota"), None)
        .await
        .unwrap();
    assert_eq!(v["modules"][0]["version"], "T-2.0", "{v}");

    // A terminal that reports the upgrade failed: -4 with the reason.
    let img3: Vec<u8> = vec![3u8; 100];
    let p3 = upload(&cloud, &tpk, "T-3.0", &img3, &key).await;
    let id = campaign(&cloud, &p3, dn).await;
    let f = t.next_frame().await.unwrap();
    assert_eq!((f.header.msg_id, f.header.package), (0x8108, None));
    ack_package(&mut t, f.header.serial).await;
    expect(&mut t, &j::Message::UpgradeResult { kind: 0, result: 1 }, 0).await;
    let c = campaign_over(&cloud, &id).await;
    assert_eq!(c["states"]["failed"], 1, "{c}");
    let why = c["failures"][0]["reason"].as_str().unwrap();
    assert!(why.contains("(-4)") && why.contains("0x0108"), "{why}");
    edge.shutdown().await;
}

/// Twenty terminals register at the same moment (the edge sends waiting registrations as one
/// request) while one of them has a number the registry refuses (`7`: too short for a device
/// name): the refused one is answered 0x8100 result 4, every other one registers and
/// authenticates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_registering_together_are_not_refused_for_one_bad_number() {
    let dir = tempfile::tempdir().unwrap();
    let (cloud, edge, _gpk, tpk) = setup(dir.path(), JT808_TSL).await;
    let addr = edge.jt808_addr.unwrap();
    let mut terminals = Vec::new();
    for i in 0..20 {
        let phone = if i == 7 {
            "000000000007".to_owned()
        } else {
            format!("1391300{i:04}")
        };
        terminals.push(Terminal::connect(addr, &phone).await.unwrap());
    }
    let mut set = tokio::task::JoinSet::new();
    for (i, mut t) in terminals.into_iter().enumerate() {
        set.spawn(async move {
            let r = t.register().await.unwrap();
            if r.result == 0 {
                expect(
                    &mut t,
                    &j::Message::Auth(j::Auth {
                        code: r.auth_code,
                        imei: None,
                        software: None,
                    }),
                    0,
                )
                .await;
            }
            (i, r.result)
        });
    }
    let mut results = vec![u8::MAX; 20];
    while let Some(r) = set.join_next().await {
        let (i, result) = r.unwrap();
        results[i] = result;
    }
    for (i, r) in results.iter().enumerate() {
        assert_eq!(*r, if i == 7 { 4 } else { 0 }, "terminal {i}: {results:?}");
    }
    let (_, v) = cloud
        .api(
            Method::GET,
            &format!("/products/{tpk}/devices?page_size=100"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(v["total"], 19, "{v}");
    edge.shutdown().await;
}
