//! The thing layer end to end over MQTT and the API: properties, events, calls, shadows,
//! device info and gateways with sub-devices.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ironlink_shared::sign::{sign_connect, SignMethod};
use rumqttc::mqttbytes::v4;
use rumqttc::QoS;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

const TSL: &str = r#"{
  "properties": [
    {"identifier": "temperature", "name": "T", "accessMode": "r", "dataType": {"type": "float", "specs": {"min": "-40", "max": "120"}}},
    {"identifier": "humidity", "name": "H", "accessMode": "r", "dataType": {"type": "int", "specs": {"min": "0", "max": "100"}}},
    {"identifier": "mode", "name": "M", "accessMode": "rw", "dataType": {"type": "enum", "specs": {"0": "auto", "1": "manual"}}}
  ],
  "events": [
    {"identifier": "alarm", "name": "A", "type": "alert", "outputData": [
      {"identifier": "level", "name": "L", "dataType": {"type": "int", "specs": {"min": "0", "max": "5"}}}
    ]}
  ],
  "services": [
    {"identifier": "reboot", "name": "R", "callType": "async", "inputData": [
      {"identifier": "delay", "name": "D", "dataType": {"type": "int", "specs": {"min": "0", "max": "60"}}}
    ], "outputData": []},
    {"identifier": "ping", "name": "P", "callType": "sync", "inputData": [], "outputData": []}
  ]
}"#;

async fn with_model(srv: &TestServer, node_type: &str, tenant: &str) -> String {
    srv.product_with_model(
        json!({"name": "t", "node_type": node_type, "tenant": tenant}),
        TSL,
    )
    .await
}

/// The next PUBLISH on `topic`, skipping acknowledgements and other topics.
async fn publish_on(c: &mut Raw, topic: &str) -> Value {
    loop {
        match c.next_v4().await {
            Some(v4::Packet::Publish(p)) if p.topic == topic => {
                return serde_json::from_slice(&p.payload).unwrap();
            }
            Some(_) => {}
            None => panic!("connection closed while waiting for {topic}"),
        }
    }
}

async fn post(c: &mut Raw, topic: &str, body: Value, pkid: u16) {
    c.publish_v4(topic, body.to_string().as_bytes(), QoS::AtLeastOnce, pkid)
        .await;
}

#[tokio::test]
async fn property_post_keeps_valid_values_and_reports_invalid_ones() {
    let srv = start(|_| {}).await;
    let pk = with_model(&srv, "direct", "default").await;
    let secret = srv.device(&pk, "meter-01").await;
    let mut d = device_v4(&srv, &pk, "meter-01", &secret).await;
    let post_topic = format!("/sys/{pk}/meter-01/thing/event/property/post");
    let reply_topic = format!("{post_topic}_reply");
    d.subscribe_v4(&reply_topic, 1).await;

    post(
        &mut d,
        &post_topic,
        json!({"id": "1", "version": "1.0", "method": "thing.event.property.post",
               "params": {"temperature": 21.5, "humidity": {"value": 55, "time": 1000}, "mode": 7, "bogus": 1}}),
        1,
    )
    .await;
    let r = publish_on(&mut d, &reply_topic).await;
    assert_eq!(r["id"], "1");
    assert_eq!(r["code"], 460, "{r}");
    let invalid = r["data"]["invalid"].as_object().unwrap();
    assert!(
        invalid.contains_key("mode") && invalid.contains_key("bogus"),
        "{r}"
    );
    assert_eq!(invalid.len(), 2);

    let (s, v) = srv.get(&format!("/devices/{pk}/meter-01/properties")).await;
    assert_eq!(s, 200);
    let props = v["properties"].as_array().unwrap();
    assert_eq!(props.len(), 2, "{v}");
    assert_eq!(props[0]["identifier"], "humidity");
    assert_eq!(props[0]["time"], 1000);
    assert_eq!(props[1]["value"], 21.5);

    // An older value goes to history but does not replace the latest one.
    post(
        &mut d,
        &post_topic,
        json!({"id": "2", "sys": {"ack": 0}, "params": {"humidity": {"value": 40, "time": 500}}}),
        2,
    )
    .await;
    // Malformed JSON: an error reply with the reason, the connection stays.
    d.publish_v4(&post_topic, b"{not json", QoS::AtLeastOnce, 3)
        .await;
    let r = publish_on(&mut d, &reply_topic).await;
    assert_eq!(r["code"], 460);
    assert!(r["message"].as_str().unwrap().contains("not JSON"), "{r}");
    let (_, v) = srv
        .get(&format!(
            "/devices/{pk}/meter-01/properties/humidity/history?order=asc"
        ))
        .await;
    let points: Vec<i64> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["time"].as_i64().unwrap())
        .collect();
    assert_eq!(points, [500, 1000], "{v}");
    let (_, v) = srv.get(&format!("/devices/{pk}/meter-01/properties")).await;
    assert_eq!(v["properties"][0]["value"], 55);

    let m = &srv.running.shared.metrics;
    assert_eq!(m.properties_stored.load(Ordering::Relaxed), 3);
    assert_eq!(m.properties_refused.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn events_are_checked_against_their_output_data() {
    let srv = start(|_| {}).await;
    let pk = with_model(&srv, "direct", "default").await;
    let secret = srv.device(&pk, "ev-0001").await;
    let mut d = device_v4(&srv, &pk, "ev-0001", &secret).await;
    let topic = format!("/sys/{pk}/ev-0001/thing/event/alarm/post");
    d.subscribe_v4(&format!("/sys/{pk}/ev-0001/thing/event/+/post_reply"), 1)
        .await;
    post(
        &mut d,
        &topic,
        json!({"id": "1", "params": {"value": {"level": 3}, "time": 1234}}),
        1,
    )
    .await;
    assert_eq!(
        publish_on(&mut d, &format!("{topic}_reply")).await["code"],
        200
    );
    post(
        &mut d,
        &topic,
        json!({"id": "2", "params": {"value": {"level": 9}}}),
        2,
    )
    .await;
    let r = publish_on(&mut d, &format!("{topic}_reply")).await;
    assert_eq!(r["code"], 460);
    assert!(r["message"].as_str().unwrap().contains("level"), "{r}");
    let other = format!("/sys/{pk}/ev-0001/thing/event/nosuch/post");
    post(
        &mut d,
        &other,
        json!({"id": "3", "params": {"value": {}}}),
        3,
    )
    .await;
    assert_eq!(
        publish_on(&mut d, &format!("{other}_reply")).await["code"],
        460
    );
    let (_, v) = srv.get(&format!("/devices/{pk}/ev-0001/events")).await;
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{v}");
    assert_eq!(events[0]["type"], "alert");
    assert_eq!(events[0]["time"], 1234);
    assert_eq!(events[0]["output"]["level"], 3);
}

#[tokio::test]
async fn property_set_and_services_reach_the_device_and_record_its_answer() {
    let srv = std::sync::Arc::new(start(|_| {}).await);
    let pk = with_model(&srv, "direct", "default").await;
    let secret = srv.device(&pk, "svc-0001").await;
    srv.device(&pk, "svc-off1").await;
    let mut d = device_v4(&srv, &pk, "svc-0001", &secret).await;
    d.subscribe_v4(&format!("/sys/{pk}/svc-0001/thing/service/#"), 1)
        .await;
    d.subscribe_v4(&format!("/sys/{pk}/svc-0001/rrpc/request/+"), 2)
        .await;

    // Property set: the API waits for the device.
    let s2 = srv.clone();
    let pk2 = pk.clone();
    let set = tokio::spawn(async move {
        s2.post(
            &format!("/devices/{pk2}/svc-0001/properties"),
            json!({"params": {"mode": 1}, "timeout_ms": 10000}),
        )
        .await
    });
    let req = publish_on(
        &mut d,
        &format!("/sys/{pk}/svc-0001/thing/service/property/set"),
    )
    .await;
    assert_eq!(req["params"]["mode"], 1);
    assert_eq!(req["method"], "thing.service.property.set");
    // A reply with an unknown id is ignored and counted; the real one completes the call.
    post(
        &mut d,
        &format!("/sys/{pk}/svc-0001/thing/service/property/set_reply"),
        json!({"id": "999999", "code": 200, "data": {}}),
        1,
    )
    .await;
    post(
        &mut d,
        &format!("/sys/{pk}/svc-0001/thing/service/property/set_reply"),
        json!({"id": req["id"], "code": 200, "data": {}}),
        2,
    )
    .await;
    let (s, v) = set.await.unwrap();
    assert_eq!((s, v["status"].as_str()), (200, Some("succeeded")), "{v}");
    assert_eq!(
        srv.running
            .shared
            .metrics
            .replies_unmatched
            .load(Ordering::Relaxed),
        1
    );

    // Read-only property and wrong types are refused before anything is sent.
    let (s, v) = srv
        .post(
            &format!("/devices/{pk}/svc-0001/properties"),
            json!({"params": {"temperature": 1.0}}),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_params")),
        "{v}"
    );

    // Async service: 202 pending, then succeeded once the device answers.
    let (s, v) = srv
        .post(
            &format!("/devices/{pk}/svc-0001/services/reboot"),
            json!({"params": {"delay": 5}}),
        )
        .await;
    assert_eq!((s, v["status"].as_str()), (202, Some("pending")), "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let req = publish_on(&mut d, &format!("/sys/{pk}/svc-0001/thing/service/reboot")).await;
    assert_eq!(req["id"], id.as_str());
    post(
        &mut d,
        &format!("/sys/{pk}/svc-0001/thing/service/reboot_reply"),
        json!({"id": id, "code": 200, "data": {"ok": true}}),
        3,
    )
    .await;
    // The PUBACK of a reply is sent once the reply is recorded.
    loop {
        match d.next_v4().await {
            Some(v4::Packet::PubAck(a)) if a.pkid == 3 => break,
            Some(_) => {}
            None => panic!("closed"),
        }
    }
    let (_, v) = srv
        .get(&format!("/devices/{pk}/svc-0001/service-calls/{id}"))
        .await;
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["reply"]["ok"], true);

    // Sync service over RRPC: the API call returns the device's answer.
    let s2 = srv.clone();
    let pk2 = pk.clone();
    let sync = tokio::spawn(async move {
        s2.post(
            &format!("/devices/{pk2}/svc-0001/services/ping"),
            json!({"timeout_ms": 10000}),
        )
        .await
    });
    let (topic, req) = loop {
        match d.next_v4().await {
            Some(v4::Packet::Publish(p)) if p.topic.contains("/rrpc/request/") => {
                break (
                    p.topic.clone(),
                    serde_json::from_slice::<Value>(&p.payload).unwrap(),
                )
            }
            Some(_) => {}
            None => panic!("closed"),
        }
    };
    assert_eq!(req["method"], "thing.service.ping");
    let resp_topic = topic.replace("/rrpc/request/", "/rrpc/response/");
    post(
        &mut d,
        &resp_topic,
        json!({"id": req["id"], "code": 200, "data": {"pong": 1}}),
        4,
    )
    .await;
    let (s, v) = sync.await.unwrap();
    assert_eq!((s, v["status"].as_str()), (200, Some("succeeded")), "{v}");
    assert_eq!(v["reply"]["pong"], 1);

    let (s, v) = srv
        .post(
            &format!("/devices/{pk}/svc-0001/services/nosuch"),
            json!({}),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (404, Some("unknown_service")),
        "{v}"
    );
    let (s, v) = srv
        .post(
            &format!("/devices/{pk}/svc-off1/services/reboot"),
            json!({"params": {"delay": 1}}),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("device_offline")),
        "{v}"
    );
}

#[tokio::test]
async fn shadow_desired_state_reaches_a_device_when_it_subscribes() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "lamp-001").await;
    let (s, v) = srv
        .call(
            reqwest::Method::PUT,
            &format!("/devices/{pk}/lamp-001/shadow"),
            Some(json!({"desired": {"color": "red"}})),
        )
        .await;
    assert_eq!((s, v["version"].as_i64()), (200, Some(1)), "{v}");
    let mut d = device_v4(&srv, &pk, "lamp-001", &secret).await;
    let get = format!("/shadow/get/{pk}/lamp-001");
    d.subscribe_v4(&get, 1).await;
    let c = publish_on(&mut d, &get).await;
    assert_eq!(c["method"], "control");
    assert_eq!(c["payload"]["state"]["desired"]["color"], "red");

    let update = format!("/shadow/update/{pk}/lamp-001");
    post(
        &mut d,
        &update,
        json!({"method": "update", "state": {"reported": {"color": "red"}}, "version": 1}),
        1,
    )
    .await;
    let r = publish_on(&mut d, &get).await;
    assert_eq!(r["payload"]["content"]["errorcode"], "409", "{r}");
    post(
        &mut d,
        &update,
        json!({"method": "update", "state": {"reported": {"color": "red"}}, "version": 2}),
        2,
    )
    .await;
    let r = publish_on(&mut d, &get).await;
    assert_eq!(r["payload"]["status"], "success", "{r}");
    let (_, v) = srv.get(&format!("/devices/{pk}/lamp-001/shadow")).await;
    assert_eq!(v["state"]["reported"]["color"], "red");
    assert!(v["state"]["desired"].as_object().unwrap().is_empty(), "{v}");
    post(&mut d, &update, json!({"state": {}}), 3).await;
    assert_eq!(
        publish_on(&mut d, &get).await["payload"]["content"]["errorcode"],
        "401"
    );
}

#[tokio::test]
async fn device_info_updates_and_deletes_tags() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "tag-0001").await;
    let mut d = device_v4(&srv, &pk, "tag-0001", &secret).await;
    let up = format!("/sys/{pk}/tag-0001/thing/deviceinfo/update");
    let del = format!("/sys/{pk}/tag-0001/thing/deviceinfo/delete");
    d.subscribe_v4(&format!("/sys/{pk}/tag-0001/thing/deviceinfo/+"), 1)
        .await;
    post(&mut d, &up, json!({"id": "1", "params": [{"attrKey": "site", "attrValue": "north"}, {"attrKey": "floor", "attrValue": "2"}]}), 1).await;
    assert_eq!(
        publish_on(&mut d, &format!("{up}_reply")).await["code"],
        200
    );
    post(
        &mut d,
        &del,
        json!({"id": "2", "params": [{"attrKey": "floor"}]}),
        2,
    )
    .await;
    assert_eq!(
        publish_on(&mut d, &format!("{del}_reply")).await["code"],
        200
    );
    post(
        &mut d,
        &up,
        json!({"id": "3", "params": [{"attrValue": "x"}]}),
        3,
    )
    .await;
    assert_eq!(
        publish_on(&mut d, &format!("{up}_reply")).await["code"],
        460
    );
    let (_, v) = srv.get(&format!("/devices/{pk}/tag-0001")).await;
    assert_eq!(v["tags"], json!({"site": "north"}), "{v}");
}

fn sub_sign(pk: &str, dn: &str, secret: &str) -> Value {
    let cid = format!("{pk}.{dn}|_ss=1|");
    let ts = "1700000000000";
    let sign = sign_connect(SignMethod::HmacSha256, secret, &cid, dn, pk, Some(ts));
    json!({"productKey": pk, "deviceName": dn, "clientId": cid, "timestamp": ts, "signmethod": "hmacSha256", "sign": sign.as_str()})
}

/// With the timestamp window on, a sub-device signature captured earlier (here: signed for
/// 2023) cannot be replayed by a gateway in topo/add or login; a fresh one is taken.
#[tokio::test]
async fn replayed_sub_device_signatures_are_refused_with_the_window_on() {
    let srv = start(|c| c.mqtt.timestamp_window = Some(std::time::Duration::from_secs(900))).await;
    let gpk = with_model(&srv, "gateway", "acme").await;
    let spk = with_model(&srv, "sub-device", "acme").await;
    let gsecret = srv.device(&gpk, "gw-00009").await;
    let s1 = srv.device(&spk, "sub-0009").await;
    let mut g = device_v4(&srv, &gpk, "gw-00009", &gsecret).await;
    g.subscribe_v4(&format!("/sys/{gpk}/gw-00009/thing/topo/+"), 1)
        .await;
    g.subscribe_v4(&format!("/ext/session/{gpk}/gw-00009/combine/+"), 2)
        .await;
    let topo = format!("/sys/{gpk}/gw-00009/thing/topo/add");
    let login = format!("/ext/session/{gpk}/gw-00009/combine/login");
    let fresh = |dn: &str, secret: &str| {
        let cid = format!("{spk}.{dn}|_ss=1|");
        let ts = ironlink_cloud::registry::now_ms().to_string();
        let sign = sign_connect(SignMethod::HmacSha256, secret, &cid, dn, &spk, Some(&ts));
        json!({"productKey": spk, "deviceName": dn, "clientId": cid, "timestamp": ts, "signmethod": "hmacSha256", "sign": sign.as_str()})
    };
    post(
        &mut g,
        &topo,
        json!({"id": "1", "params": [sub_sign(&spk, "sub-0009", &s1)]}),
        3,
    )
    .await;
    let r = publish_on(&mut g, &format!("{topo}_reply")).await;
    assert_eq!(r["code"], 460, "{r}");
    assert!(r["message"].as_str().unwrap().contains("timestamp"), "{r}");
    post(
        &mut g,
        &topo,
        json!({"id": "2", "params": [fresh("sub-0009", &s1)]}),
        4,
    )
    .await;
    assert_eq!(
        publish_on(&mut g, &format!("{topo}_reply")).await["code"],
        200
    );
    post(
        &mut g,
        &login,
        json!({"id": "3", "params": sub_sign(&spk, "sub-0009", &s1)}),
        5,
    )
    .await;
    let r = publish_on(&mut g, &format!("{login}_reply")).await;
    assert_ne!(r["code"], 200, "a replayed login is refused: {r}");
    post(
        &mut g,
        &login,
        json!({"id": "4", "params": fresh("sub-0009", &s1)}),
        6,
    )
    .await;
    assert_eq!(
        publish_on(&mut g, &format!("{login}_reply")).await["code"],
        200
    );
}

#[tokio::test]
async fn gateway_adds_logs_in_and_speaks_for_its_sub_devices() {
    let srv = start(|_| {}).await;
    let gpk = with_model(&srv, "gateway", "acme").await;
    let spk = with_model(&srv, "sub-device", "acme").await;
    let xpk = with_model(&srv, "sub-device", "other").await;
    let gsecret = srv.device(&gpk, "gw-00001").await;
    let s1 = srv.device(&spk, "sub-0001").await;
    let s2 = srv.device(&spk, "sub-0002").await;
    let x1 = srv.device(&xpk, "foreign1").await;
    let mut presence = srv.running.shared.presence.subscribe();
    let mut g = device_v4(&srv, &gpk, "gw-00001", &gsecret).await;
    g.subscribe_v4(&format!("/sys/{gpk}/gw-00001/thing/topo/+"), 1)
        .await;
    g.subscribe_v4(&format!("/ext/session/{gpk}/gw-00001/combine/+"), 2)
        .await;

    // Before login, the sub-device's topics are not the gateway's.
    let s1_post = format!("/sys/{spk}/sub-0001/thing/event/property/post");
    post(
        &mut g,
        &s1_post,
        json!({"id": "0", "params": {"temperature": 1.0}}),
        1,
    )
    .await;
    assert!(matches!(g.next_v4().await, Some(v4::Packet::PubAck(_))));

    let topo = format!("/sys/{gpk}/gw-00001/thing/topo/add");
    let mut bad = sub_sign(&spk, "sub-0002", &s2);
    bad["sign"] = json!("00");
    post(&mut g, &topo, json!({"id": "1", "params": [bad]}), 2).await;
    let r = publish_on(&mut g, &format!("{topo}_reply")).await;
    assert_eq!(r["code"], 460);
    assert!(r["message"].as_str().unwrap().contains("signature"), "{r}");
    post(
        &mut g,
        &topo,
        json!({"id": "2", "params": [sub_sign(&xpk, "foreign1", &x1)]}),
        3,
    )
    .await;
    let r = publish_on(&mut g, &format!("{topo}_reply")).await;
    assert!(
        r["message"].as_str().unwrap().contains("another tenant"),
        "{r}"
    );
    post(&mut g, &topo, json!({"id": "3", "params": [sub_sign(&spk, "sub-0001", &s1), sub_sign(&spk, "sub-0002", &s2)]}), 4).await;
    assert_eq!(
        publish_on(&mut g, &format!("{topo}_reply")).await["code"],
        200
    );

    let login = format!("/ext/session/{gpk}/gw-00001/combine/batch_login");
    // A wrong signature refuses the whole batch; nothing goes online.
    let mut bad = sub_sign(&spk, "sub-0002", &s2);
    bad["sign"] = json!("deadbeef");
    post(
        &mut g,
        &login,
        json!({"id": "3b", "params": {"deviceList": [sub_sign(&spk, "sub-0001", &s1), bad]}}),
        40,
    )
    .await;
    let r = publish_on(&mut g, &format!("{login}_reply")).await;
    assert_eq!(r["code"], 460, "{r}");
    assert_eq!(
        srv.running
            .shared
            .metrics
            .sub_devices
            .load(Ordering::Relaxed),
        0
    );
    post(&mut g, &login, json!({"id": "4", "params": {"deviceList": [sub_sign(&spk, "sub-0001", &s1), sub_sign(&spk, "sub-0002", &s2)]}}), 5).await;
    // Pipelined right behind the login: waits for it, then is allowed.
    post(
        &mut g,
        &s1_post,
        json!({"id": "5", "params": {"temperature": 22.0}}),
        6,
    )
    .await;
    let r = publish_on(&mut g, &format!("{login}_reply")).await;
    assert_eq!(r["code"], 200, "{r}");
    assert!(TestServer::presence(&mut presence, "sub-0001", "online")
        .await
        .contains("gw-00001"));
    TestServer::presence(&mut presence, "sub-0002", "online").await;
    // `_ss=1`: the gateway was subscribed to the sub-device's replies.
    let r = publish_on(&mut g, &format!("{s1_post}_reply")).await;
    assert_eq!(
        (r["id"].as_str(), r["code"].as_i64()),
        (Some("5"), Some(200)),
        "{r}"
    );
    let (_, v) = srv
        .get(&format!("/devices/{spk}/sub-0001/properties"))
        .await;
    assert_eq!(v["properties"][0]["value"], 22.0, "{v}");
    let (_, v) = srv
        .get(&format!("/devices/{gpk}/gw-00001/sub-devices"))
        .await;
    assert_eq!(v["sub_devices"].as_array().unwrap().len(), 2);
    assert_eq!(v["sub_devices"][0]["online"], true);

    let logout = format!("/ext/session/{gpk}/gw-00001/combine/batch_logout");
    post(
        &mut g,
        &logout,
        json!({"id": "6", "params": [{"productKey": spk, "deviceName": "sub-0002"}]}),
        7,
    )
    .await;
    assert_eq!(
        publish_on(&mut g, &format!("{logout}_reply")).await["code"],
        200
    );
    assert_eq!(
        TestServer::presence(&mut presence, "sub-0002", "offline").await,
        "logout"
    );
    assert_eq!(
        srv.running
            .shared
            .metrics
            .sub_devices
            .load(Ordering::Relaxed),
        1
    );

    drop(g);
    let why = TestServer::presence(&mut presence, "sub-0001", "offline").await;
    assert!(why.starts_with("gateway offline"), "{why}");
    let (s, v) = srv
        .post(
            &format!("/devices/{spk}/sub-0001/services/reboot"),
            json!({"params": {"delay": 1}}),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("device_offline")),
        "{v}"
    );
}

#[tokio::test]
async fn raw_data_is_stored_and_sent_as_bytes() {
    let srv = start(|_| {}).await;
    let (s, v) = srv
        .post("/products", json!({"name": "raw", "data_format": "raw"}))
        .await;
    assert_eq!(s, 201, "{v}");
    let pk = v["product_key"].as_str().unwrap().to_owned();
    let secret = srv.device(&pk, "raw-0001").await;
    let mut d = device_v4(&srv, &pk, "raw-0001", &secret).await;
    let down = format!("/sys/{pk}/raw-0001/thing/model/down_raw");
    d.subscribe_v4(&down, 1).await;
    d.publish_v4(
        &format!("/sys/{pk}/raw-0001/thing/model/up_raw"),
        &[0x01, 0x02, 0xff],
        QoS::AtLeastOnce,
        1,
    )
    .await;
    // The PUBACK comes once the bytes are stored.
    loop {
        match d.next_v4().await {
            Some(v4::Packet::PubAck(a)) if a.pkid == 1 => break,
            Some(_) => {}
            None => panic!("closed"),
        }
    }
    let (s, v) = srv
        .post(
            &format!("/devices/{pk}/raw-0001/raw"),
            json!({"payload_base64": "AAEC"}),
        )
        .await;
    assert_eq!((s, v["delivered"].as_u64()), (200, Some(1)), "{v}");
    loop {
        match d.next_v4().await {
            Some(v4::Packet::Publish(p)) if p.topic == down => {
                assert_eq!(&p.payload[..], &[0, 1, 2]);
                break;
            }
            Some(_) => {}
            None => panic!("closed"),
        }
    }
    let (_, v) = srv.get(&format!("/devices/{pk}/raw-0001/raw")).await;
    let msgs = v["messages"].as_array().unwrap();
    let seen: Vec<(&str, &str)> = msgs
        .iter()
        .map(|m| {
            (
                m["direction"].as_str().unwrap(),
                m["payload_hex"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        seen.contains(&("up", "0102ff")) && seen.contains(&("down", "000102")),
        "{v}"
    );
}

#[tokio::test]
async fn property_get_returns_the_device_answer_and_ntp_answers() {
    let srv = std::sync::Arc::new(start(|_| {}).await);
    let pk = with_model(&srv, "direct", "default").await;
    let secret = srv.device(&pk, "get-0001").await;
    let mut d = device_v4(&srv, &pk, "get-0001", &secret).await;
    d.subscribe_v4(&format!("/sys/{pk}/get-0001/thing/service/property/get"), 1)
        .await;
    d.subscribe_v4(&format!("/ext/ntp/{pk}/get-0001/response"), 2)
        .await;
    let s2 = srv.clone();
    let pk2 = pk.clone();
    let get = tokio::spawn(async move {
        s2.post(
            &format!("/devices/{pk2}/get-0001/properties/get"),
            json!({"identifiers": ["temperature"], "timeout_ms": 10000}),
        )
        .await
    });
    let req = publish_on(
        &mut d,
        &format!("/sys/{pk}/get-0001/thing/service/property/get"),
    )
    .await;
    assert_eq!(req["params"], json!(["temperature"]));
    post(
        &mut d,
        &format!("/sys/{pk}/get-0001/thing/service/property/get_reply"),
        json!({"id": req["id"], "code": 200, "data": {"temperature": 19.5}}),
        1,
    )
    .await;
    let (s, v) = get.await.unwrap();
    assert_eq!(
        (s, v["reply"]["temperature"].as_f64()),
        (200, Some(19.5)),
        "{v}"
    );
    // An unknown identifier is refused before anything is sent.
    let (s, _) = srv
        .post(
            &format!("/devices/{pk}/get-0001/properties/get"),
            json!({"identifiers": ["nope"]}),
        )
        .await;
    assert_eq!(s, 400);

    post(
        &mut d,
        &format!("/ext/ntp/{pk}/get-0001/request"),
        json!({"deviceSendTime": "1000"}),
        2,
    )
    .await;
    let r = publish_on(&mut d, &format!("/ext/ntp/{pk}/get-0001/response")).await;
    assert_eq!(r["deviceSendTime"], "1000");
    let recv: i64 = r["serverRecvTime"].as_str().unwrap().parse().unwrap();
    let sent: i64 = r["serverSendTime"].as_str().unwrap().parse().unwrap();
    assert!(sent >= recv && recv > 1000, "{r}");
}

#[tokio::test]
async fn posts_marked_for_dedup_are_stored_once_per_id() {
    let srv = start(|_| {}).await;
    let pk = with_model(&srv, "direct", "default").await;
    let secret = srv.device(&pk, "dup-0001").await;
    let mut d = device_v4(&srv, &pk, "dup-0001", &secret).await;
    let topic = format!("/sys/{pk}/dup-0001/thing/event/property/post");
    d.subscribe_v4(&format!("{topic}_reply"), 1).await;
    // The same message twice (an at-least-once resend), then an unmarked id reused.
    for (i, body) in [
        json!({"id": "7", "sys": {"dedup": 1}, "params": {"humidity": {"value": 10, "time": 1000}}}),
        json!({"id": "7", "sys": {"dedup": 1}, "params": {"humidity": {"value": 10, "time": 1000}}}),
        json!({"id": "8", "params": {"humidity": {"value": 11, "time": 2000}}}),
        json!({"id": "8", "params": {"humidity": {"value": 11, "time": 2000}}}),
    ]
    .into_iter()
    .enumerate()
    {
        post(&mut d, &topic, body, i as u16 + 1).await;
        assert_eq!(publish_on(&mut d, &format!("{topic}_reply")).await["code"], 200);
    }
    let (_, v) = srv
        .get(&format!(
            "/devices/{pk}/dup-0001/properties/humidity/history?order=asc"
        ))
        .await;
    let times: Vec<i64> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["time"].as_i64().unwrap())
        .collect();
    assert_eq!(
        times,
        [1000, 2000, 2000],
        "marked duplicates dropped, unmarked ones kept: {v}"
    );
    assert_eq!(
        srv.running
            .shared
            .metrics
            .duplicates_dropped
            .load(Ordering::Relaxed),
        1
    );
}

/// A gateway pipelines topo/add, login and a post for each of many new sub-devices without
/// waiting for answers (as the edge does for terminals that appear): every post is accepted.
/// The login used to race the topo/add before it (both ran at once) and fail, and the post
/// behind it was then refused by the ACL, costing the gateway its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_topo_add_login_and_post_are_applied_in_order() {
    let srv = start(|_| {}).await;
    let gpk = with_model(&srv, "gateway", "acme").await;
    let spk = with_model(&srv, "sub-device", "acme").await;
    let gsecret = srv.device(&gpk, "gw-00002").await;
    let mut g = device_v4(&srv, &gpk, "gw-00002", &gsecret).await;
    let mut subs = Vec::new();
    for i in 0..30 {
        let dn = format!("pipe-{i:04}");
        let secret = srv.device(&spk, &dn).await;
        subs.push((dn, secret));
    }
    let mut pkid = 1;
    for (i, (dn, secret)) in subs.iter().enumerate() {
        let entry = sub_sign(&spk, dn, secret);
        for (topic, body) in [
            (
                format!("/sys/{gpk}/gw-00002/thing/topo/add"),
                json!({"id": format!("a{i}"), "params": [entry.clone()]}),
            ),
            (
                format!("/ext/session/{gpk}/gw-00002/combine/login"),
                json!({"id": format!("l{i}"), "params": entry}),
            ),
            (
                format!("/sys/{spk}/{dn}/thing/event/property/post"),
                json!({"id": format!("p{i}"), "params": {"temperature": 20.5}}),
            ),
        ] {
            post(&mut g, &topic, body, pkid).await;
            pkid += 1;
        }
    }
    // Every PUBACK is a success (an ACL refusal is "not authorized").
    let mut acks = 0;
    while acks < 90 {
        match g.next_v4().await {
            Some(v4::Packet::PubAck(_)) => acks += 1,
            Some(_) => {}
            None => panic!("the gateway was disconnected after {acks} acknowledgements"),
        }
    }
    for (dn, _) in &subs {
        let (s, v) = srv
            .call(
                reqwest::Method::GET,
                &format!("/devices/{spk}/{dn}/properties"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["properties"][0]["value"], 20.5, "{dn}: {v}");
    }
    assert_eq!(
        srv.running
            .shared
            .metrics
            .acl_publish_refused
            .load(Ordering::Relaxed),
        0
    );
}

/// A sub-device of gateway A cannot be taken by gateway B with its (valid) signature until A
/// removes it (topo/delete) or an operator does through the API.
#[tokio::test]
async fn a_second_gateway_cannot_take_a_bound_sub_device() {
    let srv = start(|_| {}).await;
    let gpk = with_model(&srv, "gateway", "acme").await;
    let spk = with_model(&srv, "sub-device", "acme").await;
    let sa = srv.device(&gpk, "gw-0000a").await;
    let sb = srv.device(&gpk, "gw-0000b").await;
    let s1 = srv.device(&spk, "sub-0010").await;
    let mut a = device_v4(&srv, &gpk, "gw-0000a", &sa).await;
    let mut b = device_v4(&srv, &gpk, "gw-0000b", &sb).await;
    for (g, dn) in [(&mut a, "gw-0000a"), (&mut b, "gw-0000b")] {
        g.subscribe_v4(&format!("/sys/{gpk}/{dn}/thing/topo/+"), 1)
            .await;
    }
    let add = |dn: &str| format!("/sys/{gpk}/{dn}/thing/topo/add");
    post(
        &mut a,
        &add("gw-0000a"),
        json!({"id": "1", "params": [sub_sign(&spk, "sub-0010", &s1)]}),
        2,
    )
    .await;
    assert_eq!(
        publish_on(&mut a, &format!("{}_reply", add("gw-0000a"))).await["code"],
        200
    );
    post(
        &mut b,
        &add("gw-0000b"),
        json!({"id": "2", "params": [sub_sign(&spk, "sub-0010", &s1)]}),
        3,
    )
    .await;
    let r = publish_on(&mut b, &format!("{}_reply", add("gw-0000b"))).await;
    assert_eq!(r["code"], 460, "{r}");
    assert!(r["message"].as_str().unwrap().contains("gw-0000a"), "{r}");
    let (_, topo) = srv
        .get(&format!("/devices/{gpk}/gw-0000a/sub-devices"))
        .await;
    assert_eq!(
        topo["sub_devices"].as_array().unwrap().len(),
        1,
        "still A's: {topo}"
    );
    // An operator lets it go; then B may add it.
    let (s, v) = srv
        .call(
            reqwest::Method::DELETE,
            &format!("/devices/{gpk}/gw-0000a/sub-devices/{spk}/sub-0010"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = srv
        .call(
            reqwest::Method::DELETE,
            &format!("/devices/{gpk}/gw-0000a/sub-devices/{spk}/sub-0010"),
            None,
        )
        .await;
    assert_eq!(s, 404);
    post(
        &mut b,
        &add("gw-0000b"),
        json!({"id": "3", "params": [sub_sign(&spk, "sub-0010", &s1)]}),
        4,
    )
    .await;
    assert_eq!(
        publish_on(&mut b, &format!("{}_reply", add("gw-0000b"))).await["code"],
        200
    );
}

/// A property or event time beyond `thing.max_future_skew` is refused for that property, so a
/// wrong clock cannot pin a "latest" value into the future; the others in the post are kept.
#[tokio::test]
async fn times_far_in_the_future_are_refused() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "clock-001").await;
    let mut d = device_v4(&srv, &pk, "clock-001", &secret).await;
    d.subscribe_v4(&format!("/sys/{pk}/clock-001/thing/event/+/post_reply"), 1)
        .await;
    let future = ironlink_cloud::registry::now_ms() + 3_600_000;
    let topic = format!("/sys/{pk}/clock-001/thing/event/property/post");
    post(
        &mut d,
        &topic,
        json!({"id": "1", "params": {"ok": 1, "later": {"value": 2, "time": future}}}),
        2,
    )
    .await;
    let r = publish_on(&mut d, &format!("{topic}_reply")).await;
    assert!(r.to_string().contains("ahead of the server clock"), "{r}");
    let (_, latest) = srv
        .get(&format!("/devices/{pk}/clock-001/properties"))
        .await;
    assert!(latest.to_string().contains("\"ok\""), "{latest}");
    assert!(!latest.to_string().contains("\"later\""), "{latest}");
    let ev = format!("/sys/{pk}/clock-001/thing/event/alarm/post");
    post(
        &mut d,
        &ev,
        json!({"id": "2", "params": {"value": {}, "time": future}}),
        3,
    )
    .await;
    assert_eq!(
        publish_on(&mut d, &format!("{ev}_reply")).await["code"],
        460
    );
}

/// `thing/sub/register` of several sub-devices in one request: new ones are created (one
/// statement per product), known ones of this gateway answered with their secrets, in the
/// request's order; a bad name, a product without dynamic registration or a sub-device of
/// another gateway refuses the whole request with the item's path, creating nothing.
#[tokio::test]
async fn gateways_register_sub_devices_in_batches() {
    let srv = start(|_| {}).await;
    let gpk = with_model(&srv, "gateway", "acme").await;
    let spk = with_model(&srv, "sub-device", "acme").await;
    let closed = with_model(&srv, "sub-device", "acme").await;
    let (s, v) = srv
        .call(
            reqwest::Method::PATCH,
            &format!("/products/{spk}"),
            Some(json!({"dynamic_register": true})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let gsecret = srv.device(&gpk, "gw-00001").await;
    let known = srv.device(&spk, "known-01").await;
    let mut g = device_v4(&srv, &gpk, "gw-00001", &gsecret).await;
    g.subscribe_v4(&format!("/sys/{gpk}/gw-00001/thing/sub/+"), 1)
        .await;
    let register = format!("/sys/{gpk}/gw-00001/thing/sub/register");
    let item = |pk: &str, dn: &str| json!({"productKey": pk, "deviceName": dn});

    for (n, (params, why)) in [
        (
            json!([item(&spk, "new-01"), item(&spk, "bad name!")]),
            "params[1]",
        ),
        (
            json!([item(&spk, "new-01"), item(&closed, "new-02")]),
            "params[1]: product",
        ),
        (json!([item(&spk, "new-01"), item(&spk, "new-01")]), "twice"),
    ]
    .into_iter()
    .enumerate()
    {
        post(
            &mut g,
            &register,
            json!({"id": n.to_string(), "params": params}),
            2 + n as u16,
        )
        .await;
        let r = publish_on(&mut g, &format!("{register}_reply")).await;
        assert_eq!(r["code"], 460, "{r}");
        assert!(r["message"].as_str().unwrap().contains(why), "{r}");
    }
    let (s, _) = srv
        .call(
            reqwest::Method::GET,
            &format!("/devices/{spk}/new-01"),
            None,
        )
        .await;
    assert_eq!(s, 404, "a refused request creates nothing");

    post(
        &mut g,
        &register,
        json!({"id": "ok", "params": [item(&spk, "new-01"), item(&spk, "known-01"), item(&spk, "new-02")]}),
        9,
    )
    .await;
    let r = publish_on(&mut g, &format!("{register}_reply")).await;
    assert_eq!(r["code"], 200, "{r}");
    let names: Vec<&str> = r["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["new-01", "known-01", "new-02"]);
    assert_eq!(r["data"][1]["deviceSecret"], known.as_str());
    for dn in ["new-01", "new-02"] {
        let (s, v) = srv
            .call(reqwest::Method::GET, &format!("/devices/{spk}/{dn}"), None)
            .await;
        assert_eq!(s, 200, "{v}");
    }
}
