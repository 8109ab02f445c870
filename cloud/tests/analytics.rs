//! Analytics through the server: change points over a property's stored history (rows and
//! sealed chunks alike), answered with times; refusals with a reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ironlink_cloud::registry;
use rumqttc::QoS;
use serde_json::json;

const TSL: &str = r#"{
  "properties": [
    {"identifier": "temp", "name": "T", "accessMode": "r", "dataType": {"type": "float", "specs": {"min": "-40", "max": "120"}}},
    {"identifier": "label", "name": "L", "accessMode": "r", "dataType": {"type": "text", "specs": {"length": "32"}}}
  ],
  "events": [],
  "services": []
}"#;

#[tokio::test]
async fn change_points_of_stored_history_come_with_their_times() {
    let srv = start(|c| {
        c.timeseries.chunk_points = 64;
        c.timeseries.seal_every = std::time::Duration::from_secs(3600);
    })
    .await;
    let pk = srv.product_with_model(json!({"name": "cp"}), TSL).await;
    let secret = srv.device(&pk, "dev1").await;
    let mut d = device_v4(&srv, &pk, "dev1", &secret).await;
    let topic = format!("/sys/{pk}/dev1/thing/event/property/post");
    let reply = format!("{topic}_reply");
    d.subscribe_v4(&reply, 1).await;
    let t0 = (registry::now_ms() - 3_600_000) / 1000 * 1000;
    // Three levels, 100 points each, a little deterministic noise; a text property beside.
    for i in 0..300u16 {
        let level = [10.0, 30.0, 15.0][usize::from(i / 100)];
        let temp = level + f64::from(i % 7) * 0.1 - 0.3;
        let ts = t0 + i64::from(i) * 1000;
        let body = json!({"id": i.to_string(), "params": {
            "temp": {"value": temp, "time": ts}, "label": {"value": "x", "time": ts}}});
        d.publish_v4(&topic, body.to_string().as_bytes(), QoS::AtLeastOnce, i + 1)
            .await;
        loop {
            match d.next_v4().await {
                Some(rumqttc::mqttbytes::v4::Packet::Publish(p)) if p.topic == reply => break,
                Some(_) => {}
                None => panic!("closed"),
            }
        }
        if i == 150 {
            // Half the history in sealed chunks, half in rows.
            assert_eq!(srv.post("/timeseries/seal", json!({})).await.0, 200);
        }
    }
    let to = t0 + 300_000;
    let path = format!(
        "/devices/{pk}/dev1/properties/temp/changepoints?from={t0}&to={to}&width=40&jump=5"
    );
    let (s, v) = srv.get(&path).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["points"], 300, "{v}");
    let times: Vec<i64> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["time"].as_i64().unwrap())
        .collect();
    assert_eq!(times, vec![t0 + 100_000, t0 + 200_000], "{v}");
    let means: Vec<f64> = v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["mean"].as_f64().unwrap())
        .collect();
    for (m, want) in means.iter().zip([10.0, 30.0, 15.0]) {
        assert!((m - want).abs() < 0.2, "{means:?}");
    }
    // At most one, by count.
    let (_, v) = srv.get(&format!("{path}&breakpoints=1")).await;
    assert_eq!(v["changes"].as_array().unwrap().len(), 1, "{v}");
    // Text values are not a signal: nothing to find, no error.
    let (s, v) = srv
        .get(&format!(
            "/devices/{pk}/dev1/properties/label/changepoints?from={t0}&to={to}"
        ))
        .await;
    assert_eq!((s, v["points"].as_i64()), (200, Some(0)), "{v}");
    // Refusals name the reason.
    let (s, v) = srv.get(&format!("{path}&cost=l3")).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("l2, normal or clinear"));
    let (s, _) = srv
        .get("/devices/nope/dev1/properties/temp/changepoints")
        .await;
    assert_eq!(s, 404);
    let (s, v) = srv
        .post(
            "/analytics/changepoints",
            json!({"values": [1.0, 2.0], "width": 2}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
}

#[tokio::test]
async fn rule_sql_calls_change_points_and_pv_diagnosis_on_what_a_message_carries() {
    let srv = start(|_| {}).await;
    // A batch of 60 readings with one missing (index 7) and a step at index 31 (the 30th of
    // the values given: the window scores every 5th).
    let mut batch: Vec<serde_json::Value> = (0..60)
        .map(|i| json!(if i < 31 { 10.0 } else { 25.0 } + f64::from(i % 5) * 0.2))
        .collect();
    batch[7] = serde_json::Value::Null;
    let test = |sql: String, payload: serde_json::Value| {
        let srv = &srv;
        async move {
            let (s, v) = srv
                .post("/rules/test", json!({"sql": sql, "payload": payload}))
                .await;
            assert_eq!(s, 200, "{v}");
            v
        }
    };
    let v = test(
        "SELECT changepoints(items.batch.value) AS steps FROM \"/p/+/thing/event/property/post\""
            .into(),
        json!({"items": {"batch": {"value": batch}}}),
    )
    .await;
    assert_eq!(v["output"]["steps"], json!([31]), "{v}");
    let v = test(
        "SELECT changepoints(items.batch.value, 'l3') AS steps FROM \"/p/+/thing/event/property/post\"".into(),
        json!({"items": {"batch": {"value": batch}}}),
    )
    .await;
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("l2, normal or clinear"),
        "{v}"
    );
    // A healthy array's expected curve, as its tracer would post it.
    let (s, curve) = srv
        .post(
            "/analytics/pv/simulate",
            json!({"irradiance": 700, "temperature": 35, "modules": 12, "strings": 3, "points": 80}),
        )
        .await;
    assert_eq!(s, 200, "{curve}");
    let sql = "SELECT pv_diagnose(items.iv.value.v, items.iv.value.i, items.g.value, items.t.value, 12, 3) AS d FROM \"/p/+/thing/event/property/post\"";
    let iv = |v: &serde_json::Value, i: &serde_json::Value| json!({"items": {"iv": {"value": {"v": v, "i": i}}, "g": {"value": 700}, "t": {"value": 35}}});
    let v = test(sql.into(), iv(&curve["voltage"], &curve["current"])).await;
    assert_eq!(v["output"]["d"]["fault"], "normal", "{v}");
    assert!(
        v["output"]["d"]["confidence"].as_f64().unwrap() > 0.5,
        "{v}"
    );
    // Too few points: the message fails with the reason.
    let v = test(sql.into(), iv(&json!([1, 2, 3]), &json!([3, 2, 1]))).await;
    assert!(v["error"].as_str().unwrap().contains("at least 10"), "{v}");
}
