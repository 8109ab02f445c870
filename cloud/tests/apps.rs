//! Application access in process: consumer groups receive device messages in real time, share
//! the load, get back what a client left unsettled, and replay a backlog beside fresh messages.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ironlink_cloud::apps::{AppMessage, Consumer};
use rumqttc::QoS;
use serde_json::{json, Value};
use std::collections::HashSet;

async fn group_for(srv: &TestServer, pk: &str, types: &[&str]) -> String {
    let (s, g) = srv
        .post(
            "/consumer-groups",
            json!({"name": format!("g-{pk}-{}", types.join("-"))}),
        )
        .await;
    assert_eq!(s, 201, "{g}");
    let gid = g["group_id"].as_str().unwrap().to_owned();
    let (s, v) = srv
        .post(
            "/subscriptions",
            json!({"product_key": pk, "group_ids": [gid], "message_types": types}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    gid
}

async fn next(c: &mut Consumer) -> AppMessage {
    tokio::time::timeout(WAIT, c.next())
        .await
        .expect("a message in time")
        .expect("open")
}

async fn post_props(d: &mut Raw, pk: &str, dn: &str, from: u16, n: u16) {
    for i in from..from + n {
        let body = json!({"id": i.to_string(), "params": {"v": i}});
        d.publish_v4(
            &format!("/sys/{pk}/{dn}/thing/event/property/post"),
            body.to_string().as_bytes(),
            QoS::AtLeastOnce,
            i,
        )
        .await;
    }
}

fn value_of(m: &AppMessage) -> i64 {
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    v["items"]["v"]["value"].as_i64().unwrap()
}

#[tokio::test]
async fn a_group_gets_status_and_properties_in_alibaba_form() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "app-0001").await;
    let gid = group_for(&srv, &pk, &["property", "status"]).await;
    let mut c = srv.running.shared.apps.attach(&gid);
    let mut d = device_v4(&srv, &pk, "app-0001", &secret).await;
    let m = next(&mut c).await;
    assert_eq!(m.topic, format!("/as/mqtt/status/{pk}/app-0001"));
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["status"], "online");
    c.settle(m.id, true).await.unwrap();
    post_props(&mut d, &pk, "app-0001", 1, 1).await;
    let m = next(&mut c).await;
    assert_eq!(m.topic, format!("/{pk}/app-0001/thing/event/property/post"));
    assert_eq!(value_of(&m), 1);
    assert!(!m.replayed);
    c.settle(m.id, true).await.unwrap();
    let (_, g) = srv.get(&format!("/consumer-groups/{gid}")).await;
    assert_eq!(
        (g["clients"].as_u64(), g["acknowledged"].as_u64()),
        (Some(1), Some(2)),
        "{g}"
    );
    let text = srv
        .http
        .get(format!("http://{}/metrics", srv.running.http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(&format!(
            "ironlink_group_acknowledged_total{{group=\"{gid}\"}} 2"
        )),
        "{text}"
    );
    assert!(text.contains(&format!("ironlink_group_clients{{group=\"{gid}\"}} 1")));
    // Unknown message types are refused.
    let (s, v) = srv
        .post(
            "/subscriptions",
            json!({"product_key": pk, "group_ids": [gid], "message_types": ["nope"]}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
}

/// `lifecycle` is Alibaba's device lifecycle (`/{pk}/{dn}/thing/lifecycle`: created,
/// disabled, enabled, deleted); online/offline is `status`. The old meaning of `lifecycle`
/// still comes along for one release, and the binding says so.
#[tokio::test]
async fn lifecycle_messages_are_device_lifecycle_changes_and_status_is_separate() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let (s, g) = srv
        .post("/consumer-groups", json!({"name": "lifecycle-only"}))
        .await;
    assert_eq!(s, 201, "{g}");
    let gid = g["group_id"].as_str().unwrap().to_owned();
    let (s, v) = srv
        .post(
            "/subscriptions",
            json!({"product_key": pk, "group_ids": [gid], "message_types": ["lifecycle"]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["message_types"], json!(["status", "lifecycle"]), "{v}");
    assert!(v["warnings"][0].as_str().unwrap().contains("status"), "{v}");
    let status_only = group_for(&srv, &pk, &["status"]).await;
    let mut c = srv.running.shared.apps.attach(&gid);
    let mut st = srv.running.shared.apps.attach(&status_only);
    let secret = srv.device(&pk, "life-01").await;
    let expect = |m: &AppMessage, action: &str| {
        assert_eq!(m.topic, format!("/{pk}/life-01/thing/lifecycle"));
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["action"], action, "{v}");
        assert_eq!(v["productKey"], pk.as_str());
        assert_eq!(v["deviceName"], "life-01");
        assert_eq!(v["iotId"], format!("{pk}.life-01"));
        assert!(v["messageCreateTime"].as_i64().unwrap() > 0);
        v
    };
    let m = next(&mut c).await;
    let v = expect(&m, "create");
    assert_eq!(
        v["deviceSecret"],
        secret.as_str(),
        "create carries the secret"
    );
    c.settle(m.id, true).await.unwrap();
    // Online/offline arrives as status to both groups (the alias keeps it for `lifecycle`).
    let d = device_v4(&srv, &pk, "life-01", &secret).await;
    let m = next(&mut st).await;
    assert_eq!(m.topic, format!("/as/mqtt/status/{pk}/life-01"));
    st.settle(m.id, true).await.unwrap();
    let m = next(&mut c).await;
    assert_eq!(m.topic, format!("/as/mqtt/status/{pk}/life-01"));
    c.settle(m.id, true).await.unwrap();
    drop(d);
    let m = next(&mut st).await;
    assert_eq!(m.topic, format!("/as/mqtt/status/{pk}/life-01"));
    st.settle(m.id, true).await.unwrap();
    let m = next(&mut c).await;
    assert_eq!(m.topic, format!("/as/mqtt/status/{pk}/life-01"));
    c.settle(m.id, true).await.unwrap();
    for (path, action) in [("disable", "disable"), ("enable", "enable")] {
        let (s, v) = srv
            .post(&format!("/devices/{pk}/life-01/{path}"), json!({}))
            .await;
        assert_eq!(s, 200, "{v}");
        let m = next(&mut c).await;
        let v = expect(&m, action);
        assert!(v.get("deviceSecret").is_none(), "{v}");
        c.settle(m.id, true).await.unwrap();
    }
    let (s, v) = srv
        .call(
            reqwest::Method::DELETE,
            &format!("/devices/{pk}/life-01"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let m = next(&mut c).await;
    expect(&m, "delete");
    c.settle(m.id, true).await.unwrap();
    // The status-only group saw no lifecycle message.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), st.next())
            .await
            .is_err(),
        "a status binding takes no lifecycle messages"
    );
}

#[tokio::test]
async fn unsettled_messages_of_a_dropped_client_reach_the_other() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "app-0002").await;
    let gid = group_for(&srv, &pk, &["property"]).await;
    let apps = srv.running.shared.apps.clone();
    let mut a = apps.attach(&gid);
    let mut b = apps.attach(&gid);
    let mut d = device_v4(&srv, &pk, "app-0002", &secret).await;
    const N: u16 = 40;
    post_props(&mut d, &pk, "app-0002", 1, N).await;
    // `a` takes its share and settles none; `b` accepts what it gets.
    let mut seen = HashSet::new();
    let mut held_by_a = 0;
    while seen.len() < usize::from(N) {
        tokio::select! {
            m = a.next(), if held_by_a < 5 => {
                let m = m.unwrap();
                held_by_a += 1;
                let _ = m;
                if held_by_a == 5 {
                    // `a` dies with 5 unsettled messages.
                    drop(std::mem::replace(&mut a, apps.attach("nobody")));
                }
            }
            m = b.next() => {
                let m = m.unwrap();
                seen.insert(value_of(&m));
                b.settle(m.id, true).await.unwrap();
            }
            _ = tokio::time::sleep(WAIT) => panic!("stalled with {} of {N}", seen.len()),
        }
    }
    assert_eq!(
        seen.len(),
        usize::from(N),
        "every message reached b once a died"
    );
    let c = apps.counters(&gid);
    assert!(c.redelivered.load(std::sync::atomic::Ordering::Relaxed) >= 5);
}

#[tokio::test]
async fn a_backlog_is_replayed_beside_fresh_messages_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let srv = start(|c| c.data_dir = data.clone()).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "app-0003").await;
    let gid = group_for(&srv, &pk, &["property"]).await;
    {
        // No client: 20 posts wait in the group's queue. Their PUBACKs mean "queued".
        let mut d = device_v4(&srv, &pk, "app-0003", &secret).await;
        post_props(&mut d, &pk, "app-0003", 1, 20).await;
        let mut acks = 0;
        while acks < 20 {
            if let Some(rumqttc::mqttbytes::v4::Packet::PubAck(_)) = d.next_v4().await {
                acks += 1;
            }
        }
    }
    srv.running.shutdown().await;

    let srv = start(|c| c.data_dir = data.clone()).await;
    let mut c = srv.running.shared.apps.attach(&gid);
    let mut d = device_v4(&srv, &pk, "app-0003", &secret).await;
    post_props(&mut d, &pk, "app-0003", 100, 5).await;
    let mut backlog = HashSet::new();
    let mut fresh = HashSet::new();
    while backlog.len() < 20 || fresh.len() < 5 {
        let m = next(&mut c).await;
        let v = value_of(&m);
        if m.replayed {
            assert!(v < 100, "only old messages are replayed");
            backlog.insert(v);
        } else {
            assert!(v >= 100);
            fresh.insert(v);
        }
        c.settle(m.id, true).await.unwrap();
    }
    assert_eq!(backlog.len(), 20);
}

fn app_login(key_id: &str, secret: &str, group: &str) -> (String, String) {
    let ts = ironlink_cloud::registry::now_ms().to_string();
    let user = format!("app|authMode=aksign,signMethod=hmacsha256,timestamp={ts},authId={key_id},consumerGroupId={group}|");
    let pass = ironlink_cloud::apps::amqp::password("hmacsha256", secret, key_id, &ts).unwrap();
    (user, pass)
}

#[tokio::test]
async fn applications_over_mqtt_share_a_product_wide_subscription() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let (other, _) = srv.product(false).await;
    let secret = srv.device(&pk, "app-0004").await;
    let gid = group_for(&srv, &pk, &["property"]).await;
    let (s, key) = srv.post("/access-keys", json!({})).await;
    assert_eq!(s, 201, "{key}");
    let (kid, ksecret) = (
        key["access_key_id"].as_str().unwrap(),
        key["access_key_secret"].as_str().unwrap(),
    );
    let (user, pass) = app_login(kid, ksecret, &gid);

    let mut apps = Vec::new();
    for i in 0..2u16 {
        let mut a = Raw::tcp(srv.mqtt()).await;
        assert_eq!(
            a.connect_v4(&format!("app-{i}"), &user, &pass, 60).await,
            rumqttc::mqttbytes::v4::ConnectReturnCode::Success
        );
        // Topics start with `/`, so the shared filter has an empty level after the share name.
        let filter = format!("$share/workers//sys/{pk}/+/thing/event/property/post");
        assert_eq!(
            a.subscribe_v4(&filter, 1).await,
            vec![rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(
                QoS::AtLeastOnce
            )]
        );
        // Another product's topics, and publishing, are not an application's.
        assert_eq!(
            a.subscribe_v4(&format!("/sys/{other}/+/thing/event/property/post"), 2)
                .await,
            vec![rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure]
        );
        apps.push(a);
    }
    let (bad_user, _) = app_login(kid, "wrong", &gid);
    let mut refused = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        refused.connect_v4("app-x", &bad_user, "nope", 60).await,
        rumqttc::mqttbytes::v4::ConnectReturnCode::BadUserNamePassword
    );

    let mut d = device_v4(&srv, &pk, "app-0004", &secret).await;
    post_props(&mut d, &pk, "app-0004", 1, 10).await;
    let mut counts = [0usize; 2];
    let mut total = 0;
    let (a0, a1) = apps.split_at_mut(1);
    tokio::time::timeout(WAIT, async {
        while total < 10 {
            tokio::select! {
                p = a0[0].next_v4() => if let Some(rumqttc::mqttbytes::v4::Packet::Publish(_)) = p { counts[0] += 1; total += 1; },
                p = a1[0].next_v4() => if let Some(rumqttc::mqttbytes::v4::Packet::Publish(_)) = p { counts[1] += 1; total += 1; },
            }
        }
    })
    .await
    .expect("all 10 messages in time");
    assert_eq!(total, 10);
    assert!(
        counts[0] > 0 && counts[1] > 0,
        "shared between both: {counts:?}"
    );
}

/// An application receives the fan-in of a whole product: a burst well past a device
/// session's queue (1,024) reaches it whole while it is not reading.
#[tokio::test]
async fn an_application_session_takes_a_burst_past_a_device_queue() {
    // The burst is the point here, not the device's message rate.
    let srv = start(|c| c.limits.device.messages_per_second = 0).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "app-0005").await;
    let gid = group_for(&srv, &pk, &["property"]).await;
    let (_, key) = srv.post("/access-keys", json!({})).await;
    let (user, pass) = app_login(
        key["access_key_id"].as_str().unwrap(),
        key["access_key_secret"].as_str().unwrap(),
        &gid,
    );
    let mut a = Raw::tcp(srv.mqtt()).await;
    assert_eq!(
        a.connect_v4("app-burst", &user, &pass, 60).await,
        rumqttc::mqttbytes::v4::ConnectReturnCode::Success
    );
    let filter = format!("/sys/{pk}/+/thing/event/property/post");
    assert_eq!(
        a.subscribe_v4(&filter, 1).await,
        vec![rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(
            QoS::AtLeastOnce
        )]
    );
    let mut d = device_v4(&srv, &pk, "app-0005", &secret).await;
    post_props(&mut d, &pk, "app-0005", 1, 3000).await;
    // Every post is routed before the application reads anything (QoS 1: at most 64 are in
    // flight to it; the rest wait in its session's queue).
    let mut acked = 0;
    tokio::time::timeout(WAIT, async {
        while acked < 3000 {
            if let Some(rumqttc::mqttbytes::v4::Packet::PubAck(_)) = d.next_v4().await {
                acked += 1;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{acked} of 3000 posts acknowledged"));
    let mut got = 0;
    tokio::time::timeout(WAIT, async {
        while got < 3000 {
            if let Some(rumqttc::mqttbytes::v4::Packet::Publish(p)) = a.next_v4().await {
                got += 1;
                let mut b = bytes::BytesMut::new();
                rumqttc::mqttbytes::v4::PubAck::new(p.pkid)
                    .write(&mut b)
                    .unwrap();
                a.send(&b).await;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{got} of 3000 arrived"));
    assert_eq!(srv.running.shared.router.dropped(), 0);
}

/// A client whose realtime window is mostly full: fresh messages alternate between the live
/// path and the backlog replay. Each one must reach the client exactly once (the replay used
/// to pick up rows the writer was still offering live, and rows the acker had just deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_and_replayed_paths_never_deliver_a_message_twice() {
    let srv = start(|c| c.apps.realtime_window = 2).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "app-0009").await;
    let gid = group_for(&srv, &pk, &["property"]).await;
    let mut c = srv.running.shared.apps.attach(&gid);
    let mut d = device_v4(&srv, &pk, "app-0009", &secret).await;
    const N: u16 = 600;
    let consumer = tokio::spawn(async move {
        let mut seen = HashSet::new();
        let mut dups = Vec::new();
        while seen.len() < usize::from(N) {
            let m = next(&mut c).await;
            let v = value_of(&m);
            if !seen.insert(v) {
                dups.push(v);
            }
            c.settle(m.id, true).await.unwrap();
        }
        (dups, c)
    });
    post_props(&mut d, &pk, "app-0009", 1, N).await;
    let (dups, _c) = consumer.await.unwrap();
    assert!(dups.is_empty(), "delivered twice: {dups:?}");
    let counters = srv.running.shared.apps.counters(&gid);
    let sent = counters.pushed.load(std::sync::atomic::Ordering::Relaxed)
        + counters.replayed.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(sent, u64::from(N), "every message sent to a client once");
}
