//! Bounded resources: byte-bounded connections under hostile publishers, per-device message
//! rate, payload sizes, subscriptions, retained messages, and the HTTP API under idle clients.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bytes::BytesMut;
use common::*;
use rumqttc::mqttbytes::v4;
use rumqttc::QoS;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// One encoded QoS 1 PUBLISH whose packet id sits at `pkid_at`.
fn publish_frame(topic: &str, payload_len: usize) -> (Vec<u8>, usize) {
    let mut p = v4::Publish::new(topic, QoS::AtLeastOnce, vec![b'x'; payload_len]);
    p.pkid = 1;
    let mut b = BytesMut::new();
    p.write(&mut b).unwrap();
    let header = 1 + b[1..].iter().take_while(|x| **x & 0x80 != 0).count() + 1;
    (b.to_vec(), header + 2 + topic.len())
}

/// Four devices pipeline 250 KB QoS 1 posts without waiting for PUBACKs: the server reads
/// each only as fast as it stores (bounded bytes per connection), so its memory stays under
/// a bound; a well-behaved device beside them is served; every post is stored and
/// acknowledged (nothing lost), and once they leave the memory goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_large_posts_keeps_memory_bounded_and_loses_nothing() {
    let srv = start(|c| {
        c.limits.device.messages_per_second = 0;
        if std::env::var("IRONLINK_TEST_UNBOUNDED").is_ok() {
            c.limits.inflight_bytes = usize::MAX;
        }
    })
    .await;
    let (pk, _) = srv.product(false).await;
    let mut hostile = Vec::new();
    for i in 0..4 {
        let dn = format!("flood-{i:02}");
        let secret = srv.device(&pk, &dn).await;
        hostile.push((dn, secret));
    }
    let calm_secret = srv.device(&pk, "calm-0001").await;
    const POSTS: u16 = 200;
    const SIZE: usize = 250_000;
    let baseline = rss_bytes();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut floods = Vec::new();
    for (dn, secret) in &hostile {
        let (cid, u, p) = creds(
            &pk,
            dn,
            secret,
            ironlink_shared::sign::SignMethod::HmacSha256,
            false,
        );
        let mut s = TcpStream::connect(srv.mqtt()).await.unwrap();
        let mut c = v4::Connect::new(cid);
        c.keep_alive = 60;
        c.set_login(u, p);
        let mut b = BytesMut::new();
        c.write(&mut b).unwrap();
        s.write_all(&b).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let topic = format!("/sys/{pk}/{dn}/thing/model/up_raw");
        let (mut frame, at) = publish_frame(&topic, SIZE);
        floods.push(tokio::spawn(async move {
            let writer = async move {
                for id in 1..=POSTS {
                    frame[at..at + 2].copy_from_slice(&id.to_be_bytes());
                    wr.write_all(&frame).await.unwrap();
                }
                wr
            };
            let reader = async move {
                let mut buf = BytesMut::new();
                let mut acks = 0u16;
                while acks < POSTS {
                    match v4::Packet::read(&mut buf, 1 << 20) {
                        Ok(v4::Packet::PubAck(_)) => acks += 1,
                        Ok(_) => {}
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                            if rd.read_buf(&mut buf).await.unwrap() == 0 {
                                break;
                            }
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
                acks
            };
            let (wr, acks) = tokio::join!(writer, reader);
            drop(wr);
            acks
        }));
    }
    // The calm device is served while the floods go on.
    let mut calm = device_v4(&srv, &pk, "calm-0001", &calm_secret).await;
    for id in 1..=10u16 {
        calm.publish_v4(
            &format!("/{pk}/calm-0001/user/data"),
            b"{}",
            QoS::AtLeastOnce,
            id,
        )
        .await;
        loop {
            match calm.next_v4().await {
                Some(v4::Packet::PubAck(a)) if a.pkid == id => break,
                Some(_) => continue,
                None => panic!("calm device disconnected"),
            }
        }
    }
    for f in floods {
        let acks = tokio::time::timeout(Duration::from_secs(240), f)
            .await
            .expect("floods acknowledged in time")
            .unwrap();
        assert_eq!(acks, POSTS, "every post acknowledged");
    }
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    let stored = {
        let (_, raw) = srv
            .get(&format!("/devices/{pk}/flood-00/raw?limit=1000"))
            .await;
        raw["messages"].as_array().map_or(0, |m| m.len())
    };
    assert_eq!(stored, usize::from(POSTS), "every acknowledged post stored");
    let grown = peak.saturating_sub(baseline);
    eprintln!(
        "RSS baseline {} MiB, peak {} MiB (+{} MiB) under 4 x {POSTS} x {SIZE} B pipelined",
        baseline >> 20,
        peak >> 20,
        grown >> 20
    );
    // 4 connections x 4 MiB in processing, plus frames being read and the store's buffers:
    // without the byte bound each connection queued up to 1,024 posts (250 MiB).
    assert!(grown < 160 << 20, "RSS grew by {} MiB", grown >> 20);
    // Gone: the heap goes back (the connections' close released it).
    drop(calm);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut after = rss_bytes();
    while after > baseline + (48 << 20) && tokio::time::Instant::now() < deadline {
        ironlink_telemetry::os::release_memory();
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = rss_bytes();
    }
    eprintln!("RSS after the floods left: {} MiB", after >> 20);
    assert!(
        after <= baseline + (48 << 20),
        "RSS {} MiB after the floods left, baseline {} MiB",
        after >> 20,
        baseline >> 20
    );
}

/// A device over its message rate is slowed (its socket not read), not dropped: every post is
/// acknowledged, the slowing is counted per device and in `/metrics`.
#[tokio::test]
async fn a_device_over_its_rate_is_throttled_counted_and_loses_nothing() {
    let srv = start(|c| {
        c.limits.device.messages_per_second = 50;
        c.limits.device.message_burst = 5;
    })
    .await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "fast-0001").await;
    let mut d = device_v4(&srv, &pk, "fast-0001", &secret).await;
    for id in 1..=40u16 {
        d.publish_v4(
            &format!("/{pk}/fast-0001/user/data"),
            b"{}",
            QoS::AtLeastOnce,
            id,
        )
        .await;
    }
    let mut acks = 0;
    while acks < 40 {
        match d.next_v4().await {
            Some(v4::Packet::PubAck(_)) => acks += 1,
            Some(_) => {}
            None => panic!("throttling must not disconnect ({acks} acks)"),
        }
    }
    let (s, v) = srv.get(&format!("/devices/{pk}/fast-0001/limits")).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["refused"]["throttled"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["limits"]["messages_per_second"], 50);
    assert!(v["refused"]["last_reason"]
        .as_str()
        .unwrap()
        .contains("50 messages per second"));
    let metrics = srv
        .http
        .get(format!("http://{}/metrics", srv.running.http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("ironlink_limit_refusals_total{kind=\"throttled\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_ne!(line.split_whitespace().last(), Some("0"), "{line}");
}

/// Payloads over their class's limit, subscriptions over the connection's, retained messages
/// over the device's are refused (MQTT 5: "quota exceeded"), counted; a deleted device's
/// retained messages go with it.
#[tokio::test]
async fn sizes_subscriptions_and_retained_messages_are_bounded() {
    let srv = start(|c| {
        c.limits.device.max_alink_payload = 1000;
        c.limits.device.max_subscriptions = 3;
        c.limits.device.retained_messages = 4;
        c.limits.device.retained_bytes = 1 << 20;
        c.mqtt.max_acl_violations = 100;
    })
    .await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "lim-0001").await;
    let (cid, u, p) = creds(
        &pk,
        "lim-0001",
        &secret,
        ironlink_shared::sign::SignMethod::HmacSha256,
        false,
    );
    let mut d = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        d.connect_v5(&cid, &u, &p).await,
        rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
    );
    use rumqttc::v5::mqttbytes::v5 as m5;
    let send = |topic: String, payload: Vec<u8>, pkid: u16, retain: bool| {
        let mut p = m5::Publish::new(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            payload,
            None,
        );
        p.pkid = pkid;
        p.retain = retain;
        let mut b = BytesMut::new();
        m5::Packet::Publish(p).write(&mut b, None).unwrap();
        b
    };
    let puback = async |d: &mut Raw, pkid: u16| loop {
        match d.next_v5().await {
            Some(m5::Packet::PubAck(a)) if a.pkid == pkid => return a.reason,
            Some(_) => continue,
            None => panic!("closed"),
        }
    };
    // 1,001 bytes on an Alink topic: refused; the same on a custom topic: taken.
    let post = format!("/sys/{pk}/lim-0001/thing/event/property/post");
    d.send(&send(post, vec![b' '; 1001], 1, false)).await;
    assert_eq!(puback(&mut d, 1).await, m5::PubAckReason::QuotaExceeded);
    d.send(&send(
        format!("/{pk}/lim-0001/user/big"),
        vec![b' '; 1001],
        2,
        false,
    ))
    .await;
    assert_eq!(puback(&mut d, 2).await, m5::PubAckReason::Success);
    // Retained: four kept, the fifth refused; replacing a kept one is fine.
    for i in 0..5u16 {
        let t = format!("/{pk}/lim-0001/user/r{i}");
        d.send(&send(t, b"v".to_vec(), 10 + i, true)).await;
        let want = if i < 4 {
            m5::PubAckReason::Success
        } else {
            m5::PubAckReason::QuotaExceeded
        };
        assert_eq!(puback(&mut d, 10 + i).await, want, "retained {i}");
    }
    d.send(&send(
        format!("/{pk}/lim-0001/user/r0"),
        b"w".to_vec(),
        20,
        true,
    ))
    .await;
    assert_eq!(puback(&mut d, 20).await, m5::PubAckReason::Success);
    assert_eq!(
        srv.running
            .shared
            .router
            .retained_usage(Some((&pk, "lim-0001")))
            .0,
        4
    );
    // Subscriptions: three filters, the fourth refused, a repeat of a held one is fine.
    let mut codes = Vec::new();
    for (i, f) in ["a", "b", "c", "d", "a"].iter().enumerate() {
        let pkid = 30 + i as u16;
        let s = m5::Subscribe::new(
            m5::Filter::new(
                format!("/{pk}/lim-0001/user/{f}"),
                rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            ),
            None,
        );
        let mut s = s;
        s.pkid = pkid;
        let mut b = BytesMut::new();
        m5::Packet::Subscribe(s).write(&mut b, None).unwrap();
        d.send(&b).await;
        loop {
            match d.next_v5().await {
                Some(m5::Packet::SubAck(a)) if a.pkid == pkid => {
                    codes.push(a.return_codes[0]);
                    break;
                }
                Some(_) => continue,
                None => panic!("closed"),
            }
        }
    }
    assert_eq!(
        codes[3],
        m5::SubscribeReasonCode::QuotaExceeded,
        "{codes:?}"
    );
    assert!(
        [0, 1, 2, 4]
            .iter()
            .all(|i| matches!(codes[*i], m5::SubscribeReasonCode::Success(_))),
        "{codes:?}"
    );
    let (_, v) = srv.get(&format!("/devices/{pk}/lim-0001/limits")).await;
    assert_eq!(v["refused"]["payload_too_large"], 1, "{v}");
    assert_eq!(v["refused"]["retained"], 1, "{v}");
    assert_eq!(v["refused"]["subscriptions"], 1, "{v}");
    assert_eq!(v["retained_messages"], 4, "{v}");
    let (s, _) = srv
        .call(
            reqwest::Method::DELETE,
            &format!("/devices/{pk}/lim-0001"),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(srv.running.shared.router.retained_usage(None), (0, 0));
}

/// 2,000 idle HTTP connections: the API keeps at most its cap and closes idle ones after the
/// header timeout; device connects are never starved, and the API answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http_connections_do_not_stop_devices_or_the_api() {
    let srv = start(|c| {
        c.http.max_connections = 500;
        c.http.header_timeout = Duration::from_secs(2);
    })
    .await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "idle-0001").await;
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(TcpStream::connect(srv.running.http_addr).await.unwrap());
    }
    // Devices connect while the API is full of idle clients.
    let _d = device_v4(&srv, &pk, "idle-0001", &secret).await;
    // Idle connections are closed by the server (cap or header timeout), each of them.
    for s in &mut idle {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("closed in time");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    let (s, _) = srv.get(&format!("/devices/{pk}/idle-0001")).await;
    assert_eq!(s, 200);
    let metrics = srv
        .http
        .get(format!("http://{}/metrics", srv.running.http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ironlink_http_refused_total ") && !l.ends_with(" 0")),
        "connections over the cap are counted"
    );
}

/// A request body that stops half-way is given up after the body timeout, not held forever.
#[tokio::test]
async fn a_half_sent_body_times_out() {
    let srv = start(|c| c.http.body_timeout = Duration::from_millis(500)).await;
    let mut s = TcpStream::connect(srv.running.http_addr).await.unwrap();
    s.write_all(
        b"POST /api/v1/products HTTP/1.1\r\nhost: x\r\nauthorization: Bearer test-token\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"name\":",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("answered or closed in time")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.is_empty() || !text.starts_with("HTTP/1.1 2"), "{text}");
}

/// `/metrics` may require the API token.
#[tokio::test]
async fn metrics_can_require_the_token() {
    let srv = start(|c| c.http.metrics_need_token = true).await;
    let url = format!("http://{}/metrics", srv.running.http_addr);
    let r = srv.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = srv
        .http
        .get(&url)
        .bearer_auth("test-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = json!({});
}

/// A device slowed for longer than its keepalive is not taken for a silent one: the time the
/// server did not read is the server's, not the device's.
#[tokio::test]
async fn a_throttled_device_is_not_closed_for_keepalive() {
    let srv = start(|c| {
        c.limits.device.messages_per_second = 2;
        c.limits.device.message_burst = 1;
    })
    .await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "slow-0001").await;
    let (cid, u, p) = creds(
        &pk,
        "slow-0001",
        &secret,
        ironlink_shared::sign::SignMethod::HmacSha256,
        false,
    );
    let mut d = Raw::tcp(srv.mqtt()).await;
    // Keepalive 1 s: the server closes after 1.5 s without a packet it could have read.
    assert_eq!(
        d.connect_v4(&cid, &u, &p, 1).await,
        v4::ConnectReturnCode::Success
    );
    // Ten posts in one write: at 2 per second they take ~4.5 s, three keepalive periods.
    let mut all = BytesMut::new();
    for id in 1..=10u16 {
        let mut p = v4::Publish::new(
            format!("/{pk}/slow-0001/user/data"),
            QoS::AtLeastOnce,
            b"{}".to_vec(),
        );
        p.pkid = id;
        p.write(&mut all).unwrap();
    }
    d.send(&all).await;
    let mut acks = 0;
    while acks < 10 {
        match d.next_v4().await {
            Some(v4::Packet::PubAck(_)) => acks += 1,
            Some(_) => {}
            None => panic!("closed after {acks} acks"),
        }
    }
    // Still open: the device is answered at once after its last PUBACK.
    d.send(&[0xc0, 0x00]).await;
    loop {
        match d.next_v4().await {
            Some(v4::Packet::PingResp) => break,
            Some(_) => {}
            None => panic!("closed for keepalive while it was the server that did not read"),
        }
    }
}

/// A refused PUBLISH is acknowledged in its turn, after the ones before it still being stored
/// (MQTT 4.6: PUBACKs in the order of the PUBLISHes).
#[tokio::test]
async fn refusals_are_acknowledged_in_order() {
    let srv = start(|c| c.limits.device.max_custom_payload = 10).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "order-001").await;
    let (cid, u, p) = creds(
        &pk,
        "order-001",
        &secret,
        ironlink_shared::sign::SignMethod::HmacSha256,
        false,
    );
    let mut d = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        d.connect_v5(&cid, &u, &p).await,
        rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
    );
    use rumqttc::v5::mqttbytes::v5 as m5;
    let mut both = BytesMut::new();
    for (pkid, topic, payload) in [
        (
            1u16,
            format!("/sys/{pk}/order-001/thing/event/property/post"),
            br#"{"id":"1","params":{"t":1}}"#.to_vec(),
        ),
        (2, format!("/{pk}/order-001/user/big"), vec![b'x'; 11]),
    ] {
        let mut p = m5::Publish::new(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            payload,
            None,
        );
        p.pkid = pkid;
        m5::Packet::Publish(p).write(&mut both, None).unwrap();
    }
    d.send(&both).await;
    let mut acks = Vec::new();
    while acks.len() < 2 {
        match d.next_v5().await {
            Some(m5::Packet::PubAck(a)) => acks.push((a.pkid, a.reason)),
            Some(_) => {}
            None => panic!("closed"),
        }
    }
    assert_eq!(
        acks,
        [
            (1, m5::PubAckReason::Success),
            (2, m5::PubAckReason::QuotaExceeded)
        ]
    );
}
