//! Device access end to end, in process: Alink authentication, ACL, bad input, presence,
//! kicks, downlinks and dynamic registration.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ironlink_cloud::router::Delivery;
use ironlink_shared::sign::{sign_connect, sign_register, SignMethod};
use rumqttc::mqttbytes::v4::{self, ConnectReturnCode as Rc4, SubscribeReasonCode as Src4};
use rumqttc::v5::mqttbytes::v5;
use serde_json::json;
use std::time::Duration;
use tokio::sync::mpsc;

/// Registers an internal router session that sees every message, in order.
fn monitor(srv: &TestServer, filters: &[&str]) -> mpsc::Receiver<Delivery> {
    let (tx, rx) = mpsc::channel(1024);
    let r = &srv.running.shared.router;
    let sid = r.register(tx);
    for f in filters {
        r.subscribe(sid, f, 1);
    }
    rx
}

async fn next_topic(rx: &mut mpsc::Receiver<Delivery>) -> String {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a routed message")
        .unwrap()
        .message
        .topic
        .clone()
}

#[tokio::test]
async fn every_signmethod_connects_over_311_and_5_and_shows_online() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "dev-0001").await;
    for m in [
        SignMethod::HmacSha1,
        SignMethod::HmacSha256,
        SignMethod::HmacMd5,
    ] {
        let (cid, u, p) = creds(&pk, "dev-0001", &secret, m, false);
        let mut c = Raw::tcp(srv.mqtt()).await;
        assert_eq!(c.connect_v4(&cid, &u, &p, 60).await, Rc4::Success, "{m:?}");
        let (_, d) = srv.get(&format!("/devices/{pk}/dev-0001")).await;
        assert_eq!(d["status"], "online");
        assert_eq!(d["online"], true);
        let mut c5 = Raw::tcp(srv.mqtt()).await;
        assert_eq!(
            c5.connect_v5(&cid, &u, &p).await,
            v5::ConnectReturnCode::Success,
            "{m:?}"
        );
    }
    // Without a timestamp, and with the client id form of the Python SDK (`pk&dn`).
    let cid = format!("{pk}&dev-0001");
    let sig = sign_connect(SignMethod::HmacSha1, &secret, &cid, "dev-0001", &pk, None);
    let mut c = Raw::tcp(srv.mqtt()).await;
    let code = c
        .connect_v4(
            &format!("{cid}|securemode=3,signmethod=hmacsha1,ext=1,_ss=1,lan=Python,_v=1.2.13,|"),
            &format!("dev-0001&{pk}"),
            sig.as_str(),
            60,
        )
        .await;
    assert_eq!(code, Rc4::Success);
}

#[tokio::test]
async fn refused_connects_get_the_right_code_and_spare_other_sessions() {
    let srv = start(|c| c.mqtt.timestamp_window = Some(Duration::from_secs(60))).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "good-01").await;
    srv.device(&pk, "off-0001").await;
    let mut live = device_v4(&srv, &pk, "good-01", &secret).await;
    assert_eq!(
        live.subscribe_v4(&format!("/sys/{pk}/good-01/#"), 1).await,
        vec![Src4::Success(rumqttc::QoS::AtLeastOnce)]
    );

    let (cid, u, _) = creds(&pk, "good-01", &secret, SignMethod::HmacSha1, false);
    let mut c = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        c.connect_v4(&cid, &u, "0000", 60).await,
        Rc4::BadUserNamePassword,
        "wrong signature"
    );

    let (cid, u, p) = creds(&pk, "nobody-1", &secret, SignMethod::HmacSha1, false);
    let mut c = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        c.connect_v4(&cid, &u, &p, 60).await,
        Rc4::BadUserNamePassword,
        "unknown device"
    );

    let (cid, u, p) = creds(&pk, "good-01", &secret, SignMethod::HmacSha1, true);
    let mut c = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        c.connect_v4(&cid, &u, &p, 60).await,
        Rc4::NotAuthorized,
        "securemode=2 over TCP"
    );

    let ts = "1000";
    let stale_cid = format!("{pk}.good-01");
    let sig = sign_connect(
        SignMethod::HmacSha1,
        &secret,
        &stale_cid,
        "good-01",
        &pk,
        Some(ts),
    );
    let mut c = Raw::tcp(srv.mqtt()).await;
    let code = c
        .connect_v4(
            &format!("{stale_cid}|securemode=3,signmethod=hmacsha1,timestamp={ts}|"),
            &u,
            sig.as_str(),
            60,
        )
        .await;
    assert_eq!(code, Rc4::BadUserNamePassword, "stale timestamp");

    // With the window on, a signature without any timestamp cannot be replayed either.
    let sig = sign_connect(
        SignMethod::HmacSha1,
        &secret,
        &stale_cid,
        "good-01",
        &pk,
        None,
    );
    let mut c = Raw::tcp(srv.mqtt()).await;
    let code = c
        .connect_v4(
            &format!("{stale_cid}|securemode=3,signmethod=hmacsha1|"),
            &u,
            sig.as_str(),
            60,
        )
        .await;
    assert_eq!(
        code,
        Rc4::BadUserNamePassword,
        "no timestamp with the window on"
    );

    let mut c = Raw::tcp(srv.mqtt()).await;
    let mut connect = v4::Connect::new("no-login");
    connect.keep_alive = 30;
    let mut b = bytes::BytesMut::new();
    connect.write(&mut b).unwrap();
    c.send(&b).await;
    assert!(
        matches!(c.next_v4().await, Some(v4::Packet::ConnAck(a)) if a.code == Rc4::BadUserNamePassword)
    );

    let (s, _) = srv
        .post(&format!("/devices/{pk}/off-0001/disable"), json!({}))
        .await;
    assert_eq!(s, 200);
    let off_secret = srv
        .get(&format!("/devices/{pk}/off-0001/credentials"))
        .await
        .1["device_secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let (cid, u, p) = creds(&pk, "off-0001", &off_secret, SignMethod::HmacSha1, false);
    let mut c = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        c.connect_v4(&cid, &u, &p, 60).await,
        Rc4::NotAuthorized,
        "disabled, 3.1.1"
    );
    let mut c = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        c.connect_v5(&cid, &u, &p).await,
        v5::ConnectReturnCode::Banned,
        "disabled, 5"
    );

    // The live session was not disturbed.
    let (s, v) = srv
        .post(&format!("/devices/{pk}/good-01/messages"), json!({"topic": format!("/sys/{pk}/good-01/thing/service/property/set"), "payload": {"a": 1}}))
        .await;
    assert_eq!(s, 200, "{v}");
    match live.next_v4().await {
        Some(v4::Packet::Publish(p)) => assert_eq!(&p.payload[..], br#"{"a":1}"#),
        other => panic!("live session lost: {other:?}"),
    }
}

#[tokio::test]
async fn acl_refuses_foreign_topics_and_wildcards() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let sa = srv.device(&pk, "dev-a").await;
    srv.device(&pk, "dev-b").await;
    let mut all = monitor(&srv, &["/sys/#", &format!("/{pk}/#")]);
    let mut a = device_v4(&srv, &pk, "dev-a", &sa).await;

    for refused in [
        format!("/sys/{pk}/+/#"),
        "/sys/#".into(),
        "#".into(),
        "/broadcast/other/#".to_string(),
    ] {
        assert_eq!(
            a.subscribe_v4(&refused, 7).await,
            vec![Src4::Failure],
            "{refused}"
        );
    }
    assert_eq!(
        a.subscribe_v4(&format!("/{pk}/dev-a/user/#"), 8).await,
        vec![Src4::Success(rumqttc::QoS::AtLeastOnce)]
    );
    assert_eq!(
        a.subscribe_v4(&format!("/broadcast/{pk}/#"), 9).await,
        vec![Src4::Success(rumqttc::QoS::AtLeastOnce)]
    );

    // A refused publish is dropped: the next routed message is the allowed one after it.
    a.publish_v4(
        &format!("/sys/{pk}/dev-b/thing/event/property/post"),
        b"x",
        rumqttc::QoS::AtLeastOnce,
        1,
    )
    .await;
    assert!(matches!(a.next_v4().await, Some(v4::Packet::PubAck(p)) if p.pkid == 1));
    a.publish_v4(
        &format!("/{pk}/dev-a/user/data"),
        b"ok",
        rumqttc::QoS::AtLeastOnce,
        2,
    )
    .await;
    assert_eq!(next_topic(&mut all).await, format!("/{pk}/dev-a/user/data"));
    let mut got_ack = false;
    let mut got_msg = false;
    while !(got_ack && got_msg) {
        match a.next_v4().await {
            Some(v4::Packet::PubAck(p)) if p.pkid == 2 => got_ack = true,
            Some(v4::Packet::Publish(p)) if p.topic == format!("/{pk}/dev-a/user/data") => {
                got_msg = true
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let m = &srv.running.shared.metrics;
    assert_eq!(
        m.acl_publish_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        m.acl_subscribe_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );

    // MQTT 5 says why: PUBACK "not authorized" (0x87).
    let (cid, u, p) = creds(&pk, "dev-a", &sa, SignMethod::HmacSha256, false);
    let mut c5 = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        c5.connect_v5(&cid, &u, &p).await,
        v5::ConnectReturnCode::Success
    );
    let mut pb = v5::Publish::new(
        format!("/sys/{pk}/dev-b/x"),
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        b"x".to_vec(),
        None,
    );
    pb.pkid = 5;
    let mut b = bytes::BytesMut::new();
    pb.write(&mut b).unwrap();
    c5.send(&b).await;
    match c5.next_v5().await {
        Some(v5::Packet::PubAck(ack)) => {
            assert_eq!(ack.pkid, 5);
            assert_eq!(ack.reason, v5::PubAckReason::NotAuthorized);
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn repeated_violations_close_the_connection() {
    let srv = start(|c| c.mqtt.max_acl_violations = 3).await;
    let (pk, _) = srv.product(false).await;
    let s = srv.device(&pk, "dev-v").await;
    let mut presence = srv.running.shared.presence.subscribe();
    let mut c = device_v4(&srv, &pk, "dev-v", &s).await;
    for i in 0..4 {
        c.publish_v4("/sys/other/dev/thing/x", b"x", rumqttc::QoS::AtMostOnce, i)
            .await;
    }
    assert!(c.closed().await);
    TestServer::presence(&mut presence, "dev-v", "online").await;
    assert_eq!(
        TestServer::presence(&mut presence, "dev-v", "offline").await,
        "too many ACL violations"
    );
}

#[tokio::test]
async fn malformed_and_oversize_packets_close_only_their_session() {
    let srv = start(|c| c.mqtt.max_packet_size = 1024).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "bad-0001").await;
    let good = srv.device(&pk, "good-001").await;
    let mut live = device_v4(&srv, &pk, "good-001", &good).await;
    live.subscribe_v4(&format!("/sys/{pk}/good-001/#"), 1).await;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("reserved packet type 0", vec![0x00, 0x00]),
        ("AUTH in MQTT 3.1.1", vec![0xf0, 0x00]),
        (
            "remaining length over 4 bytes",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        (
            "SUBSCRIBE with flags 0000",
            vec![
                0x80, 0x09, 0x00, 0x01, 0x00, 0x04, b't', b'e', b's', b't', 0x00,
            ],
        ),
        ("PUBLISH over the size limit", {
            let mut p = vec![0x30, 0x90, 0x10, 0x00, 0x01, b'/'];
            p.extend(std::iter::repeat_n(b'x', 2048));
            p
        }),
        (
            "second CONNECT",
            vec![
                0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x1e, 0x00, 0x00,
            ],
        ),
        (
            "truncated SUBSCRIBE body",
            vec![0x82, 0x03, 0x00, 0x01, 0x00],
        ),
        // MQTT 4.7: topic names are not empty and hold no wildcard and no NUL.
        (
            "PUBLISH with an empty topic",
            vec![0x32, 0x04, 0x00, 0x00, 0x00, 0x01],
        ),
        (
            "PUBLISH on a wildcard topic",
            vec![0x32, 0x08, 0x00, 0x04, b'/', b'a', b'/', b'+', 0x00, 0x01],
        ),
        (
            "PUBLISH on a topic with NUL",
            vec![0x32, 0x08, 0x00, 0x04, b'/', b'a', 0x00, b'b', 0x00, 0x01],
        ),
    ];
    for (what, bytes) in cases {
        let mut c = device_v4(&srv, &pk, "bad-0001", &secret).await;
        c.send(&bytes).await;
        assert!(c.closed().await, "{what}: connection must be closed");
    }
    // Before CONNECT: garbage, and a PUBLISH first.
    for bytes in [
        vec![0xde, 0xad, 0xbe, 0xef],
        vec![0x30, 0x03, 0x00, 0x01, b'/'],
    ] {
        let mut c = Raw::tcp(srv.mqtt()).await;
        c.send(&bytes).await;
        assert!(c.closed().await);
    }
    // MQTT 3.1 (level 3) gets "unacceptable protocol version".
    let mut c = Raw::tcp(srv.mqtt()).await;
    c.send(&[
        0x10, 0x0e, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x1e, 0x00,
        0x00,
    ])
    .await;
    assert!(
        matches!(c.next_v4().await, Some(v4::Packet::ConnAck(a)) if a.code == Rc4::RefusedProtocolVersion)
    );

    let (s, _) = srv
        .post(
            &format!("/devices/{pk}/good-001/messages"),
            json!({"topic": format!("/sys/{pk}/good-001/thing/x"), "payload": "still here"}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(
        matches!(live.next_v4().await, Some(v4::Packet::Publish(p)) if &p.payload[..] == b"still here")
    );
    assert!(
        srv.running
            .shared
            .metrics
            .protocol_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 8
    );
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_connect_timeout() {
    let srv = start(|c| c.mqtt.connect_timeout = Duration::from_millis(300)).await;
    let mut tcp = Raw::tcp(srv.mqtt()).await;
    assert!(tcp.closed().await);
    let mut tls = Raw::tcp(srv.mqtts()).await;
    assert!(tls.closed().await, "no TLS handshake either");
    assert_eq!(
        srv.running
            .shared
            .metrics
            .connect_timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn keepalive_timeout_closes_and_is_recorded() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let s = srv.device(&pk, "sleepy-1").await;
    let mut presence = srv.running.shared.presence.subscribe();
    let (cid, u, p) = creds(&pk, "sleepy-1", &s, SignMethod::HmacSha1, false);
    let mut c = Raw::tcp(srv.mqtt()).await;
    assert_eq!(c.connect_v4(&cid, &u, &p, 1).await, Rc4::Success);
    assert!(c.closed().await);
    TestServer::presence(&mut presence, "sleepy-1", "online").await;
    assert_eq!(
        TestServer::presence(&mut presence, "sleepy-1", "offline").await,
        "keepalive timeout"
    );
}

#[tokio::test]
async fn disable_delete_and_takeover_disconnect_at_once() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let s = srv.device(&pk, "kick-001").await;
    let mut presence = srv.running.shared.presence.subscribe();
    let (cid, u, p) = creds(&pk, "kick-001", &s, SignMethod::HmacSha1, false);

    let mut c5 = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        c5.connect_v5(&cid, &u, &p).await,
        v5::ConnectReturnCode::Success
    );
    let (st, v) = srv
        .post(&format!("/devices/{pk}/kick-001/disable"), json!({}))
        .await;
    assert_eq!((st, v["disconnected"].as_bool()), (200, Some(true)));
    match c5.next_v5().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(
            d.reason_code,
            v5::DisconnectReasonCode::AdministrativeAction
        ),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    TestServer::presence(&mut presence, "kick-001", "online").await;
    assert_eq!(
        TestServer::presence(&mut presence, "kick-001", "offline").await,
        "kicked: device disabled"
    );
    let mut again = Raw::tcp(srv.mqtt()).await;
    assert_eq!(again.connect_v4(&cid, &u, &p, 60).await, Rc4::NotAuthorized);

    srv.post(&format!("/devices/{pk}/kick-001/enable"), json!({}))
        .await;
    let mut first = device_v4(&srv, &pk, "kick-001", &s).await;
    let _second = device_v4(&srv, &pk, "kick-001", &s).await;
    assert!(first.closed().await, "replaced by the second connection");
    TestServer::presence(&mut presence, "kick-001", "online").await;
    assert_eq!(
        TestServer::presence(&mut presence, "kick-001", "offline").await,
        "replaced by a new connection with the same identity"
    );

    let mut third = device_v4(&srv, &pk, "kick-001", &s).await;
    let (st, _) = srv
        .call(
            reqwest::Method::DELETE,
            &format!("/devices/{pk}/kick-001"),
            None,
        )
        .await;
    assert_eq!(st, 200);
    assert!(third.closed().await);
    let mut gone = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        gone.connect_v4(&cid, &u, &p, 60).await,
        Rc4::BadUserNamePassword
    );
}

#[tokio::test]
async fn downlinks_and_broadcasts_reach_only_their_devices() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let (pk2, _) = srv.product(false).await;
    let s = srv.device(&pk, "down-001").await;
    let s2 = srv.device(&pk2, "other-01").await;
    let mut d = device_v4(&srv, &pk, "down-001", &s).await;
    let mut o = device_v4(&srv, &pk2, "other-01", &s2).await;
    d.subscribe_v4(&format!("/sys/{pk}/down-001/thing/service/#"), 1)
        .await;
    d.subscribe_v4(&format!("/broadcast/{pk}/#"), 2).await;
    o.subscribe_v4(&format!("/broadcast/{pk2}/#"), 1).await;

    let topic = format!("/sys/{pk}/down-001/thing/service/property/set");
    let (st, v) = srv
        .post(
            &format!("/devices/{pk}/down-001/messages"),
            json!({"topic": topic, "payload": "{\"p\":1}", "qos": 1}),
        )
        .await;
    assert_eq!((st, v["delivered"].as_u64()), (200, Some(1)), "{v}");
    match d.next_v4().await {
        Some(v4::Packet::Publish(p)) => {
            assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
            assert_eq!(p.topic, topic);
            let mut b = bytes::BytesMut::new();
            v4::PubAck::new(p.pkid).write(&mut b).unwrap();
            d.send(&b).await;
        }
        other => panic!("{other:?}"),
    }

    let (st, v) = srv
        .post(
            &format!("/products/{pk}/broadcast"),
            json!({"topic": "news", "payload": "hello"}),
        )
        .await;
    assert_eq!((st, v["delivered"].as_u64()), (200, Some(1)), "{v}");
    assert!(
        matches!(d.next_v4().await, Some(v4::Packet::Publish(p)) if p.topic == format!("/broadcast/{pk}/news"))
    );
    srv.post(
        &format!("/products/{pk2}/broadcast"),
        json!({"topic": "own", "payload": "x"}),
    )
    .await;
    assert!(
        matches!(o.next_v4().await, Some(v4::Packet::Publish(p)) if p.topic == format!("/broadcast/{pk2}/own")),
        "the other product saw only its own broadcast"
    );

    let (st, v) = srv
        .post(
            &format!("/devices/{pk}/down-001/messages"),
            json!({"topic": format!("/sys/{pk2}/other-01/x"), "payload": "x"}),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_request")));
    srv.device(&pk, "sleep-01").await;
    let (st, v) = srv
        .post(
            &format!("/devices/{pk}/sleep-01/messages"),
            json!({"topic": format!("/sys/{pk}/sleep-01/x"), "payload": "x"}),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (409, Some("device_offline")));
}

#[tokio::test]
async fn dynamic_registration_returns_the_secret_over_tls_only() {
    let srv = start(|_| {}).await;
    let ca = srv.running.generated_ca.clone().unwrap();
    let (pk, ps) = srv.product(true).await;
    let secret = srv.device(&pk, "reg-0001").await;
    let random = "8Yh2kd";
    let sig = sign_register(SignMethod::HmacSha256, &ps, "reg-0001", &pk, random);
    let cid = format!(
        "reg-0001.{pk}|random={random},authType=register,securemode=2,signmethod=hmacsha256|"
    );
    let user = format!("reg-0001&{pk}");

    let mut c = Raw::tls(srv.mqtts(), &ca).await;
    assert_eq!(
        c.connect_v4(&cid, &user, sig.as_str(), 60).await,
        Rc4::Success
    );
    match c.next_v4().await {
        Some(v4::Packet::Publish(p)) => {
            assert_eq!(p.topic, "/ext/register");
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            assert_eq!(v["deviceSecret"], secret.as_str());
            assert_eq!(v["productKey"], pk.as_str());
        }
        other => panic!("{other:?}"),
    }
    assert!(c.closed().await);

    let mut tcp = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        tcp.connect_v4(&cid, &user, sig.as_str(), 60).await,
        Rc4::NotAuthorized,
        "registration needs TLS"
    );
    let mut wrong = Raw::tls(srv.mqtts(), &ca).await;
    assert_eq!(
        wrong.connect_v4(&cid, &user, "bad", 60).await,
        Rc4::BadUserNamePassword
    );

    let (pk_off, ps_off) = srv.product(false).await;
    srv.device(&pk_off, "reg-0002").await;
    let sig = sign_register(SignMethod::HmacSha256, &ps_off, "reg-0002", &pk_off, random);
    let mut off = Raw::tls(srv.mqtts(), &ca).await;
    let code = off
        .connect_v4(&format!("reg-0002.{pk_off}|random={random},authType=register,securemode=2,signmethod=hmacsha256|"), &format!("reg-0002&{pk_off}"), sig.as_str(), 60)
        .await;
    assert_eq!(
        code,
        Rc4::NotAuthorized,
        "product without dynamic registration"
    );

    // And a normal securemode=2 session over TLS.
    let (cid, u, p) = creds(&pk, "reg-0001", &secret, SignMethod::HmacSha256, true);
    let mut t = Raw::tls(srv.mqtts(), &ca).await;
    // The CONNACK comes after the activation is stored.
    assert_eq!(t.connect_v4(&cid, &u, &p, 60).await, Rc4::Success);

    // Once the device is activated, registration does not hand its secret out again
    // (Alibaba's pre-registration mode): whoever holds the product secret gets nothing.
    let sig = sign_register(SignMethod::HmacSha256, &ps, "reg-0001", &pk, random);
    let mut again = Raw::tls(srv.mqtts(), &ca).await;
    assert_eq!(
        again.connect_v4(&format!("reg-0001.{pk}|random={random},authType=register,securemode=2,signmethod=hmacsha256|"), &user, sig.as_str(), 60).await,
        Rc4::NotAuthorized,
        "an activated device is not registered again"
    );
}

#[tokio::test]
async fn connect_rate_is_limited_and_the_server_keeps_serving() {
    let srv = start(|c| {
        c.mqtt.connects_per_second = 1;
        c.mqtt.connect_burst = 5;
    })
    .await;
    let (pk, _) = srv.product(false).await;
    let s = srv.device(&pk, "rate-001").await;
    let (cid, u, p) = creds(&pk, "rate-001", &s, SignMethod::HmacSha1, false);
    let started = std::time::Instant::now();
    let mut accepted = 0u64;
    for _ in 0..100 {
        let mut c = Raw::tcp(srv.mqtt()).await;
        let mut connect = v4::Connect::new(cid.as_str());
        connect.keep_alive = 60;
        connect.set_login(u.as_str(), p.as_str());
        let mut b = bytes::BytesMut::new();
        connect.write(&mut b).unwrap();
        c.send(&b).await;
        if matches!(c.next_v4().await, Some(v4::Packet::ConnAck(a)) if a.code == Rc4::Success) {
            accepted += 1;
        }
    }
    // The bound follows from the token bucket: burst plus what refilled while we ran.
    let bound = 5 + started.elapsed().as_secs() + 1;
    assert!(
        accepted >= 1 && accepted <= bound,
        "accepted {accepted}, bound {bound}"
    );
    let limited = srv
        .running
        .shared
        .metrics
        .rate_limited
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(limited, 100 - accepted);
}

/// Seeded random bytes after a valid CONNECT: each connection ends (closed, never hung), the
/// server keeps serving, and a bystander session is untouched. A failing seed becomes a named
/// regression test.
#[tokio::test]
async fn seeded_garbage_after_connect_never_takes_the_server_down() {
    use tokio::io::AsyncWriteExt;
    let srv = start(|c| c.mqtt.max_packet_size = 4096).await;
    let (pk, _) = srv.product(false).await;
    let noisy = srv.device(&pk, "noisy-01").await;
    let calm = srv.device(&pk, "calm-001").await;
    let mut live = device_v4(&srv, &pk, "calm-001", &calm).await;
    live.subscribe_v4(&format!("/sys/{pk}/calm-001/#"), 1).await;

    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let first_bytes = [
        0x30u8, 0x32, 0x34, 0x82, 0xa2, 0xc0, 0xe0, 0x40, 0x62, 0xf0, 0x10, 0x00,
    ];
    for round in 0..200 {
        let mut c = device_v4(&srv, &pk, "noisy-01", &noisy).await;
        let len = (next() % 300) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if let Some(b) = bytes.first_mut() {
            *b = first_bytes[(next() as usize) % first_bytes.len()];
        }
        c.send(&bytes).await;
        let _ = c.s.shutdown().await;
        assert!(c.closed().await, "round {round}: connection must end");
    }
    let (s, _) = srv
        .post(
            &format!("/devices/{pk}/calm-001/messages"),
            json!({"topic": format!("/sys/{pk}/calm-001/x"), "payload": "ok"}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(
        matches!(live.next_v4().await, Some(v4::Packet::Publish(p)) if &p.payload[..] == b"ok")
    );
}
