//! End to end: a simulated Semtech packet forwarder (UDP) with an ABP LoRa node's frames,
//! built and encrypted by the `lorawan` crate's creator -> the edge's LoRaWAN server -> the
//! cloud process -> its API: Cayenne LPP values as properties, a confirmed uplink
//! acknowledged in RX1 through PULL_RESP, the same uplink from a second gateway taken once,
//! and a cloud `Downlink` call sent at the node's next uplink.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use ironlink_tests::*;
use lorawan::creator::{DataPayloadCreator, JoinRequestCreator};
use lorawan::keys::{AppKey, AppSKey, NewSKey, AES128};
use lorawan::parser::{
    parse, DataHeader, DataPayload, DecryptedJoinAcceptPayload, DevNonce, FRMPayload, PhyPayload,
};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::net::UdpSocket;

const NWK: [u8; 16] = [
    0x44, 0x02, 0x42, 0x41, 0xed, 0x4c, 0xe9, 0xa6, 0x8c, 0x6a, 0x8b, 0xc0, 0x55, 0x23, 0x3f, 0xd3,
];
const APP: [u8; 16] = [
    0xec, 0x92, 0x58, 0x02, 0xae, 0x43, 0x0c, 0xa7, 0x7f, 0xd3, 0xdd, 0x73, 0xcb, 0x2c, 0xc5, 0x88,
];
const DEV_ADDR: u32 = 0x49BE_7DF1;

fn uplink(fcnt: u32, confirmed: bool, payload: &[u8]) -> Vec<u8> {
    let mut phy = DataPayloadCreator::new();
    phy.set_uplink(true)
        .set_confirmed(confirmed)
        .set_f_port(1)
        .set_dev_addr(&DEV_ADDR.to_le_bytes())
        .set_fctrl(&lorawan::parser::FCtrl::new(0, true))
        .set_fcnt(fcnt);
    phy.build(payload, &[], &NewSKey::from(NWK), &AppSKey::from(APP))
        .unwrap()
        .to_vec()
}

fn push(gw: u8, token: u16, phy: &[u8]) -> Vec<u8> {
    let t = token.to_be_bytes();
    let mut b = vec![2, t[0], t[1], 0x00, 0xAA, 0, 0, 0, 0, 0, 0, gw];
    let data = base64::engine::general_purpose::STANDARD.encode(phy);
    b.extend_from_slice(
        json!({"rxpk": [{"tmst": 1_000_000, "freq": 868.1, "chan": 0, "rfch": 0, "stat": 1, "modu": "LORA",
                         "datr": "SF7BW125", "codr": "4/5", "rssi": -60, "lsnr": 7.5, "size": phy.len(), "data": data}]})
        .to_string()
        .as_bytes(),
    );
    b
}

async fn recv(s: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(WAIT, s.recv_from(&mut buf))
        .await
        .expect("a datagram from the edge in time")
        .unwrap();
    buf.truncate(n);
    buf
}

/// Receives until a PULL_RESP; returns its PHYPayload and txpk.
async fn pull_resp(s: &UdpSocket) -> (Vec<u8>, Value) {
    let (phy, txpk, _) = pull_resp_token(s).await;
    (phy, txpk)
}

/// The same, with the PULL_RESP's token (for the TX_ACK).
async fn pull_resp_token(s: &UdpSocket) -> (Vec<u8>, Value, [u8; 2]) {
    loop {
        let d = recv(s).await;
        if d.get(3) == Some(&0x03) {
            let v: Value = serde_json::from_slice(&d[4..]).unwrap();
            let phy = base64::engine::general_purpose::STANDARD
                .decode(v["txpk"]["data"].as_str().unwrap())
                .unwrap();
            return (phy, v["txpk"].clone(), [d[1], d[2]]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abp_node_reports_through_a_packet_forwarder_and_gets_its_downlinks() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud"), &[]).unwrap();
    let (gpk, gsecret) = gateway(&cloud, "edge-lora").await.unwrap();
    let num = |id: &str| json!({"identifier": id, "name": id, "accessMode": "r", "dataType": {"type": "double", "specs": {"min": "-1000", "max": "4294967295"}}});
    let tsl = json!({"properties": [num("temperature_1"), num("humidity_2"), num("rssi"), num("snr"), num("fcnt")],
        "events": [], "services": [{"identifier": "Downlink", "name": "Downlink", "callType": "async", "inputData": [
            {"identifier": "fport", "name": "FPort", "dataType": {"type": "int", "specs": {"min": "1", "max": "223"}}},
            {"identifier": "payload", "name": "Payload (hex)", "dataType": {"type": "text", "specs": {"length": "102"}}}], "outputData": []}]});
    let npk = sub_product(&cloud, "lora-nodes", Some(tsl)).await.unwrap();
    let config = format!(
        r#"
[gateway]
product_key = "{gpk}"
device_name = "edge-lora"
device_secret = "{secret}"
[uplink]
host = "127.0.0.1"
port = {port}
[queue]
dir = "{queue}"
[status]
listen = "127.0.0.1:0"
[lorawan]
listen = "127.0.0.1:0"
product_key = "{npk}"
[[lorawan.devices]]
dev_eui = "70B3D57ED0000001"
dev_addr = "49BE7DF1"
nwk_skey = "44024241ed4ce9a68c6a8bc055233fd3"
app_skey = "ec925802ae430ca77fd3dd73cb2cc588"
"#,
        secret = gsecret,
        port = cloud.mqtt.port(),
        queue = dir.path().join("queue").display(),
    );
    let edge = start_edge(&config).await.unwrap();
    let lns = edge.lorawan_addr.unwrap();
    let fwd = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let fwd2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    fwd.send_to(&[2, 0, 1, 0x02, 0xAA, 0, 0, 0, 0, 0, 0, 1], lns)
        .await
        .unwrap();
    assert_eq!(recv(&fwd).await, vec![2, 0, 1, 0x04], "PULL_ACK");

    // A confirmed uplink: Cayenne LPP temperature 21.5 (channel 1), humidity 45 % (channel 2).
    let lpp = [0x01, 0x67, 0x00, 0xD7, 0x02, 0x68, 0x5A];
    let phy = uplink(1, true, &lpp);
    fwd.send_to(&push(1, 7, &phy), lns).await.unwrap();
    // The same frame heard by a second gateway: taken once.
    fwd2.send_to(&push(2, 8, &phy), lns).await.unwrap();
    assert_eq!(recv(&fwd2).await, vec![2, 0, 8, 0x01], "PUSH_ACK");
    let (down, txpk, token) = pull_resp_token(&fwd).await;
    assert_eq!(txpk["tmst"], 2_000_000, "RX1: one second after the uplink");
    // The forwarder could not send it in RX1 (TX_ACK TOO_LATE): the same frame comes for RX2.
    let mut tx_ack = vec![2, token[0], token[1], 0x05, 0xAA, 0, 0, 0, 0, 0, 0, 1];
    tx_ack.extend_from_slice(br#"{"txpk_ack":{"error":"TOO_LATE"}}"#);
    fwd.send_to(&tx_ack, lns).await.unwrap();
    let (again, rx2) = pull_resp(&fwd).await;
    assert_eq!(again, down);
    assert_eq!(
        (
            rx2["tmst"].clone(),
            rx2["freq"].clone(),
            rx2["datr"].clone()
        ),
        (json!(3_000_000), json!(869.525), json!("SF12BW125"))
    );
    assert_eq!(txpk["freq"], 868.1);
    assert_eq!(txpk["ipol"], true);
    let Ok(PhyPayload::Data(DataPayload::Encrypted(d))) = parse(down) else {
        panic!("not a data downlink")
    };
    assert!(
        d.fhdr().fctrl().ack(),
        "the confirmed uplink is acknowledged"
    );
    assert!(d.validate_mic(&AES128(NWK), 0));

    let dn = "70b3d57ed0000001";
    let deadline = std::time::Instant::now() + WAIT;
    let props = loop {
        let (_, v) = cloud
            .api(
                Method::GET,
                &format!("/devices/{npk}/{dn}/properties"),
                None,
            )
            .await
            .unwrap();
        if v["properties"].as_array().is_some_and(|a| a.len() >= 5) {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    let get = |id: &str| {
        props["properties"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["identifier"] == id)
            .map(|p| p["value"].clone())
            .unwrap()
    };
    assert_eq!(get("temperature_1"), json!(21.5));
    assert_eq!(get("humidity_2"), json!(45.0));
    assert_eq!(get("rssi"), json!(-60.0));
    assert_eq!(get("fcnt").as_f64(), Some(1.0));

    // A downlink from the cloud waits for the next uplink, then goes in its RX1.
    let (s, call) = cloud
        .api(
            Method::POST,
            &format!("/devices/{npk}/{dn}/services/Downlink"),
            Some(json!({"params": {"fport": 5, "payload": "0102"}})),
        )
        .await
        .unwrap();
    assert!(s == 200 || s == 202, "{s} {call}");
    // The node reports on (class A) until its next uplink carries the downlink back: the call
    // may reach the edge after an uplink or two.
    let mut fcnt = 1;
    let down = loop {
        fcnt += 1;
        assert!(fcnt < 40, "the downlink never came");
        fwd.send_to(&push(1, 9, &uplink(fcnt, false, &lpp)), lns)
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_millis(500), pull_resp(&fwd)).await;
        if let Ok((down, _)) = got {
            break down;
        }
    };
    let Ok(PhyPayload::Data(DataPayload::Encrypted(d))) = parse(down) else {
        panic!("not a data downlink")
    };
    assert_eq!(d.f_port(), Some(5));
    let dec = d
        .decrypt(Some(&AES128(NWK)), Some(&AES128(APP)), 1)
        .unwrap();
    let FRMPayload::Data(p) = dec.frm_payload() else {
        panic!()
    };
    assert_eq!(p, &[1, 2]);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, c) = cloud
            .api(
                Method::GET,
                &format!(
                    "/devices/{npk}/{dn}/service-calls/{}",
                    call["id"].as_str().unwrap()
                ),
                None,
            )
            .await
            .unwrap();
        if c["status"] == "succeeded" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{c}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let metrics = reqwest::get(format!("http://{}/metrics", edge.status_addr.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("ironlink_edge_refused_total{protocol=\"lorawan\",reason=\"duplicate_another_gateway\"} 1"), "{metrics}");
    edge.shutdown().await;
}

/// OTAA: a node's join request (built by the lorawan crate with its AppKey) is answered with a
/// join accept five seconds later (JOIN_ACCEPT_DELAY1) through PULL_RESP; the node derives its
/// session keys from it and its uplinks reach the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_otaa_node_joins_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud"), &[]).unwrap();
    let (gpk, gsecret) = gateway(&cloud, "edge-otaa").await.unwrap();
    let npk = sub_product(&cloud, "otaa-nodes", None).await.unwrap();
    let prop = |id: &str, mode: &str| json!({"identifier": id, "name": id, "accessMode": mode, "dataType": {"type": "double", "specs": {"min": "-1000", "max": "4294967295"}}});
    let tsl = json!({"properties": [prop("temperature", "r"), prop("setpoint", "rw"), prop("rssi", "r"), prop("snr", "r"), prop("fcnt", "r")], "events": [], "services": []});
    let (s, v) = cloud
        .api(
            Method::PUT,
            &format!("/products/{npk}/thing-model"),
            Some(tsl),
        )
        .await
        .unwrap();
    assert!(s < 300, "{v}");
    let config = format!(
        "[gateway]\nproduct_key = \"{gpk}\"\ndevice_name = \"edge-otaa\"\ndevice_secret = \"{}\"\n\
         [uplink]\nhost = \"127.0.0.1\"\nport = {}\n[queue]\ndir = \"{}\"\n\
         [status]\nlisten = \"127.0.0.1:0\"\n\
         [lorawan]\nlisten = \"127.0.0.1:0\"\nproduct_key = \"{npk}\"\n\
         [[lorawan.devices]]\ndev_eui = \"0004A30B001C0530\"\napp_key = \"98929b92c49edba9676d646d3b612456\"\n\
         decoder = \"layout\"\ndownlink_fport = 7\n\
         [[lorawan.devices.layout]]\nidentifier = \"temperature\"\noffset = 0\ntype = \"i16\"\nscale = 0.01\n\
         [[lorawan.devices.layout]]\nidentifier = \"setpoint\"\noffset = 2\ntype = \"u8\"\nscale = 0.5\n",
        gsecret,
        cloud.mqtt.port(),
        dir.path().join("queue").display(),
    );
    let edge = start_edge(&config).await.unwrap();
    let lns = edge.lorawan_addr.unwrap();
    let fwd = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    fwd.send_to(&[2, 0, 1, 0x02, 0xAA, 0, 0, 0, 0, 0, 0, 1], lns)
        .await
        .unwrap();
    assert_eq!(recv(&fwd).await, vec![2, 0, 1, 0x04]);

    let app_key = [
        0x98, 0x92, 0x9b, 0x92, 0xc4, 0x9e, 0xdb, 0xa9, 0x67, 0x6d, 0x64, 0x6d, 0x3b, 0x61, 0x24,
        0x56,
    ];
    let mut jr = JoinRequestCreator::new();
    let mut dev_eui = [0x00, 0x04, 0xA3, 0x0B, 0x00, 0x1C, 0x05, 0x30];
    dev_eui.reverse(); // little-endian on the wire
    jr.set_app_eui(&[1, 2, 3, 4, 5, 6, 7, 8])
        .set_dev_eui(&dev_eui)
        .set_dev_nonce(&[0x2D, 0x10]);
    let join = jr.build(&AppKey::from(app_key)).to_vec();
    fwd.send_to(&push(1, 3, &join), lns).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), pull_resp(&fwd)).await;
    let metrics = reqwest::get(format!("http://{}/metrics", edge.status_addr.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (accept, txpk) = got.unwrap_or_else(|_| panic!("no join accept: {metrics}"));
    assert_eq!(
        txpk["tmst"], 6_000_000,
        "JOIN_ACCEPT_DELAY1: five seconds after the request"
    );
    let ja = DecryptedJoinAcceptPayload::new(accept, &AppKey::from(app_key)).unwrap();
    assert!(ja.validate_mic(&AppKey::from(app_key)));
    let mut addr = [0u8; 4];
    addr.copy_from_slice(ja.dev_addr().as_ref());
    let nonce = DevNonce::new(&[0x2D, 0x10][..]).unwrap();
    let nwk = ja.derive_newskey(&nonce, &AppKey::from(app_key));
    let app = ja.derive_appskey(&nonce, &AppKey::from(app_key));
    let mut phy = DataPayloadCreator::new();
    phy.set_uplink(true)
        .set_confirmed(false)
        .set_f_port(1)
        .set_dev_addr(&addr)
        .set_fctrl(&lorawan::parser::FCtrl::new(0, true))
        .set_fcnt(1);
    // The layout: temperature i16 x 0.01 (21.50), setpoint u8 x 0.5 (20.0).
    let data = phy
        .build(&[0x08, 0x66, 40], &[], &nwk, &app)
        .unwrap()
        .to_vec();
    fwd.send_to(&push(1, 4, &data), lns).await.unwrap();
    let dn = "0004a30b001c0530";
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, v) = cloud
            .api(
                Method::GET,
                &format!("/devices/{npk}/{dn}/properties"),
                None,
            )
            .await
            .unwrap();
        let t = v["properties"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["identifier"] == "temperature"))
            .map(|p| p["value"].clone());
        if t == Some(json!(21.5)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // A property set from the cloud is encoded with the layout and sent at the next uplink.
    let (s, call) = cloud
        .api(
            Method::POST,
            &format!("/devices/{npk}/{dn}/properties"),
            Some(json!({"params": {"setpoint": 22.0}})),
        )
        .await
        .unwrap();
    assert!(s == 200 || s == 202, "{s} {call}");
    let mut fcnt = 1;
    let down = loop {
        fcnt += 1;
        assert!(fcnt < 40, "the downlink never came");
        let mut phy = DataPayloadCreator::new();
        phy.set_uplink(true)
            .set_confirmed(false)
            .set_f_port(1)
            .set_dev_addr(&addr)
            .set_fctrl(&lorawan::parser::FCtrl::new(0, true))
            .set_fcnt(fcnt);
        let data = phy
            .build(&[0x08, 0x66, 40], &[], &nwk, &app)
            .unwrap()
            .to_vec();
        fwd.send_to(&push(1, 5, &data), lns).await.unwrap();
        if let Ok((down, _)) =
            tokio::time::timeout(Duration::from_millis(500), pull_resp(&fwd)).await
        {
            break down;
        }
    };
    let Ok(PhyPayload::Data(DataPayload::Encrypted(d))) = parse(down) else {
        panic!("not a data downlink")
    };
    assert_eq!(d.f_port(), Some(7));
    let dec = d.decrypt(Some(nwk.inner()), Some(app.inner()), 0).unwrap();
    let FRMPayload::Data(p) = dec.frm_payload() else {
        panic!()
    };
    assert_eq!(p, &[0, 0, 44], "setpoint 22.0 / 0.5");
    edge.shutdown().await;
}

/// Hundreds of run-time sub-devices are logged in again when the uplink reconnects (in
/// batches: one login each used to fill the MQTT client's channel before the loop that drives
/// the connection ran, and the uplink never came back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uplink_comes_back_with_hundreds_of_nodes_to_log_in() {
    const NODES: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    let cloud = Cloud::start(&cloud_dir, &[]).unwrap();
    let (mqtt, http) = (cloud.mqtt, cloud.http);
    let (gpk, gsecret) = gateway(&cloud, "edge-many").await.unwrap();
    let npk = sub_product(&cloud, "many", None).await.unwrap();
    let mut config = format!(
        "[gateway]\nproduct_key = \"{gpk}\"\ndevice_name = \"edge-many\"\ndevice_secret = \"{}\"\n\
         [uplink]\nhost = \"127.0.0.1\"\nport = {}\n[queue]\ndir = \"{}\"\n\
         [lorawan]\nlisten = \"127.0.0.1:0\"\nproduct_key = \"{npk}\"\n",
        gsecret,
        mqtt.port(),
        dir.path().join("queue").display(),
    );
    for i in 0..NODES {
        config.push_str(&format!(
            "[[lorawan.devices]]\ndev_eui = \"{:016x}\"\ndev_addr = \"{:08x}\"\nnwk_skey = \"{}\"\napp_skey = \"{}\"\n",
            0x70B3_D57E_0000_0000u64 | i as u64,
            0x0200_0000 | i,
            "44024241ed4ce9a68c6a8bc055233fd3",
            "ec925802ae430ca77fd3dd73cb2cc588",
        ));
    }
    let edge = ironlink_edge::run::start(
        ironlink_edge::config::Config::parse("edge.toml", &config).unwrap(),
    )
    .unwrap();
    // Every node registered ahead of its first uplink (the identity log has them all).
    let log = dir.path().join("queue").join("subdevices.jsonl");
    let deadline = std::time::Instant::now() + WAIT * 4;
    while std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) < NODES {
        assert!(std::time::Instant::now() < deadline, "nodes not registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cloud goes and comes back on the same ports: the uplink must be up again.
    cloud.kill9().unwrap();
    let mut up = edge.uplink.clone();
    tokio::time::timeout(
        WAIT,
        up.wait_for(|s| *s != ironlink_edge::uplink::State::Up),
    )
    .await
    .unwrap()
    .unwrap();
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
    tokio::time::timeout(
        WAIT * 2,
        up.wait_for(|s| *s == ironlink_edge::uplink::State::Up),
    )
    .await
    .expect("the uplink is up again")
    .unwrap();
    // ...and carrying data: a node's uplink reaches the cloud.
    let mut phy = DataPayloadCreator::new();
    phy.set_uplink(true)
        .set_confirmed(false)
        .set_f_port(1)
        .set_dev_addr(&0x0200_0007u32.to_le_bytes())
        .set_fctrl(&lorawan::parser::FCtrl::new(0, true))
        .set_fcnt(1);
    let data = phy
        .build(
            &[0x01, 0x67, 0x00, 0xD7],
            &[],
            &NewSKey::from(NWK),
            &AppSKey::from(APP),
        )
        .unwrap()
        .to_vec();
    let fwd = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    fwd.send_to(&push(1, 1, &data), edge.lorawan_addr.unwrap())
        .await
        .unwrap();
    let dn = format!("{:016x}", 0x70B3_D57E_0000_0007u64);
    get_until(
        &cloud,
        &format!("/devices/{npk}/{dn}/properties"),
        "no data after the reconnect",
        |v| v.to_string().contains("temperature_1"),
    )
    .await;
    edge.shutdown().await;
}
