//! End to end: an NB-IoT device speaking CoAP (messages built with our codec) to the edge's
//! CoAP server -> the cloud process -> its API: Alibaba's `/auth` with a signature, a property
//! post with the token in option 2088, a retransmitted CON answered from the cache and stored
//! once, a block-wise (RFC 7959) post, a wrong token and a malformed datagram refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_protocols::coap::{self, opt, Block, Code, Kind, Message};
use ironlink_tests::*;
use reqwest::Method;
use serde_json::{json, Map, Value};
use tokio::net::UdpSocket;

async fn create(c: &Cloud, path: &str, body: Value) -> Value {
    let (s, v) = c.api(Method::POST, path, Some(body)).await.unwrap();
    assert_eq!(s, 201, "{path}: {v}");
    v
}

async fn exchange(s: &UdpSocket, to: std::net::SocketAddr, m: &Message) -> Message {
    s.send_to(&coap::encode(m), to).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(WAIT, s.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    coap::parse(&buf[..n]).unwrap()
}

fn post(mid: u16, path: &str, token: Option<&str>, body: &Value) -> Message {
    let mut m = Message::new(Kind::Con, Code::POST, mid, &[mid as u8, 0x42]);
    m.set_path(path);
    m.add_uint(opt::CONTENT_FORMAT, 50);
    if let Some(t) = token {
        m.add(ironlink_edge::coap_server::OPT_TOKEN, t.as_bytes());
    }
    m.payload = body.to_string().into_bytes();
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nb_iot_device_authenticates_and_posts_over_coap() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud"), &[]).unwrap();
    let (gpk, gsecret) = gateway(&cloud, "edge-coap").await.unwrap();
    let pk = sub_product(&cloud, "nb", None).await.unwrap();
    let secret = create(
        &cloud,
        &format!("/products/{pk}/devices"),
        json!({"device_name": "nb-0001"}),
    )
    .await["device_secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let config = format!(
        "[gateway]\nproduct_key = \"{gpk}\"\ndevice_name = \"edge-coap\"\ndevice_secret = \"{}\"\n\
         [uplink]\nhost = \"127.0.0.1\"\nport = {}\n[queue]\ndir = \"{}\"\n\
         [coap]\nlisten = \"127.0.0.1:0\"\nproduct_key = \"{pk}\"\n",
        gsecret,
        cloud.mqtt.port(),
        dir.path().join("queue").display(),
    );
    let edge = start_edge(&config).await.unwrap();
    let srv = edge.coap_addr.unwrap();
    let dev = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    // A ping and a malformed datagram get RST.
    let rst = exchange(&dev, srv, &Message::new(Kind::Con, Code::EMPTY, 1, &[])).await;
    assert_eq!(rst.kind, Kind::Rst);
    dev.send_to(&[0x40, 0x02, 0x00, 0x09, 0xF1], srv)
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(WAIT, dev.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let r = coap::parse(&buf[..n]).unwrap();
    assert_eq!((r.kind, r.message_id), (Kind::Rst, 9));

    // /auth with a wrong sign, then the right one.
    let mut auth: Map<String, Value> = serde_json::from_value(json!({
        "productKey": pk, "deviceName": "nb-0001", "clientId": format!("{pk}&nb-0001"),
        "signmethod": "hmacsha1", "timestamp": "1700000000000", "seq": "1"}))
    .unwrap();
    auth.insert("sign".into(), json!("00"));
    let r = exchange(
        &dev,
        srv,
        &post(10, "/auth", None, &Value::Object(auth.clone())),
    )
    .await;
    assert_eq!(
        r.code,
        Code::UNAUTHORIZED,
        "{}",
        String::from_utf8_lossy(&r.payload)
    );
    let sign = ironlink_edge::coap_server::auth_sign(
        ironlink_shared::sign::SignMethod::HmacSha1,
        &secret,
        &auth,
    );
    auth.insert("sign".into(), json!(sign));
    let r = exchange(&dev, srv, &post(11, "/auth", None, &Value::Object(auth))).await;
    assert_eq!(
        (r.kind, r.code, r.message_id),
        (Kind::Ack, Code::CONTENT, 11)
    );
    let token = serde_json::from_slice::<Value>(&r.payload).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();

    // A property post; the same CON again (a retransmission) gets the same answer.
    let topic = format!("/topic/sys/{pk}/nb-0001/thing/event/property/post");
    let body = json!({"id": "1", "params": {"temperature": {"value": 21.5, "time": 1_700_000_000_000i64}}});
    let first = exchange(&dev, srv, &post(12, &topic, Some(&token), &body)).await;
    assert_eq!(
        first.code,
        Code::CHANGED,
        "{}",
        String::from_utf8_lossy(&first.payload)
    );
    let again = exchange(&dev, srv, &post(12, &topic, Some(&token), &body)).await;
    assert_eq!(coap::encode(&again), coap::encode(&first));
    // A wrong token, another device's topic.
    let r = exchange(&dev, srv, &post(13, &topic, Some("nope"), &body)).await;
    assert_eq!(r.code, Code::UNAUTHORIZED);
    let r = exchange(
        &dev,
        srv,
        &post(
            14,
            &format!("/topic/sys/{pk}/other/thing/event/property/post"),
            Some(&token),
            &body,
        ),
    )
    .await;
    assert_eq!(r.code, Code::FORBIDDEN);

    // A block-wise post (64-byte blocks), from another source port (NAT rebinding: the token
    // identifies the device).
    let dev2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let big = json!({"id": "2", "params": {"temperature": {"value": 22.5, "time": 1_700_000_001_000i64}}, "pad": "x".repeat(150)})
        .to_string()
        .into_bytes();
    let chunks: Vec<&[u8]> = big.chunks(64).collect();
    for (i, c) in chunks.iter().enumerate() {
        let mut m = post(20 + i as u16, &topic, Some(&token), &Value::Null);
        m.payload = c.to_vec();
        m.add(
            opt::BLOCK1,
            &Block {
                num: i as u32,
                more: i + 1 < chunks.len(),
                szx: 2,
            }
            .encode(),
        );
        let r = exchange(&dev2, srv, &m).await;
        let want = if i + 1 < chunks.len() {
            Code::CONTINUE
        } else {
            Code::CHANGED
        };
        assert_eq!(
            r.code,
            want,
            "block {i}: {}",
            String::from_utf8_lossy(&r.payload)
        );
    }

    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, h) = cloud
            .api(
                Method::GET,
                &format!("/devices/{pk}/nb-0001/properties/temperature/history?limit=10"),
                None,
            )
            .await
            .unwrap();
        let n = h["points"].as_array().map_or(0, Vec::len);
        if n == 2 {
            break;
        }
        assert!(n <= 2, "stored more than once: {h}");
        assert!(std::time::Instant::now() < deadline, "{h}");
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    edge.shutdown().await;
}
