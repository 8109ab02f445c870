//! The rules engine end to end: devices post over MQTT, rules select and act (republish to a
//! subscriber, a webhook into a real HTTP server, the rule table, time series, PostgreSQL,
//! scene linkage), failures end in the dead-letter store, windows aggregate, window state is
//! saved across a clean restart and declared lost otherwise, and data-parsing scripts decode
//! raw uplinks under their limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use rumqttc::mqttbytes::v4;
use rumqttc::QoS;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};

/// A webhook receiver on loopback: answers `status` after `delay`, hands each body over.
struct Hook {
    url: String,
    bodies: Mutex<mpsc::UnboundedReceiver<Value>>,
}

async fn hook(status: u16, delay: Duration) -> Hook {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null));
                tokio::time::sleep(delay).await;
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    Hook {
        url,
        bodies: Mutex::new(rx),
    }
}

impl Hook {
    async fn next(&self) -> Value {
        tokio::time::timeout(WAIT, self.bodies.lock().await.recv())
            .await
            .expect("webhook called in time")
            .unwrap()
    }
}

async fn post_temp(d: &mut Raw, pk: &str, dn: &str, t: f64, pkid: u16) {
    let body = json!({"id": pkid.to_string(), "version": "1.0", "params": {"temp": t}, "method": "thing.event.property.post"});
    d.publish_v4(
        &format!("/sys/{pk}/{dn}/thing/event/property/post"),
        body.to_string().as_bytes(),
        QoS::AtLeastOnce,
        pkid,
    )
    .await;
    // PUBACK: the post is stored (and handed to the rules).
    loop {
        match d.next_v4().await {
            Some(v4::Packet::PubAck(a)) if a.pkid == pkid => return,
            Some(_) => {}
            None => panic!("closed before PUBACK"),
        }
    }
}

/// Waits (bounded) until `f` holds for the rule's description.
async fn rule_until(srv: &TestServer, id: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (s, v) = srv.get(&format!("/rules/{id}")).await;
        assert_eq!(s, 200, "{v}");
        if f(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rule never got there: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn table_until(srv: &TestServer, table: &str, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (s, v) = srv.get(&format!("/rule-tables/{table}?limit=1000")).await;
        assert_eq!(s, 200, "{v}");
        let rows = v.as_array().unwrap().clone();
        if rows.len() >= n {
            return rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "table {table} has {} rows, waiting for {n}",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn create_rule(srv: &TestServer, body: Value) -> String {
    let (s, v) = srv.post("/rules", body).await;
    assert_eq!(s, 201, "{v}");
    v["rule_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_post_is_filtered_and_republished_to_a_subscriber_a_webhook_and_a_table() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "dev1").await;
    let web = hook(200, Duration::ZERO).await;
    let id = create_rule(
        &srv,
        json!({
            "name": "hot",
            "sql": format!("SELECT items.temp.value AS temp, deviceName() AS dev, upper(deviceName()) AS up\nFROM \"/{pk}/+/thing/event/property/post\"\nWHERE items.temp.value > 30"),
            "actions": [
                {"type": "republish", "topic": "/${productKey}/${dev}/user/alarm", "qos": 1},
                {"type": "webhook", "url": web.url, "headers": {"x-device": "${dev}"}},
                {"type": "table", "table": "alarms"},
                {"type": "timeseries"}
            ]
        }),
    )
    .await;
    let mut d = device_v4(&srv, &pk, "dev1", &secret).await;
    d.subscribe_v4(&format!("/{pk}/dev1/user/alarm"), 1).await;
    post_temp(&mut d, &pk, "dev1", 25.0, 10).await;
    post_temp(&mut d, &pk, "dev1", 35.5, 11).await;
    // The subscriber gets only the hot reading.
    let got = loop {
        match d.next_v4().await {
            Some(v4::Packet::Publish(p)) if p.topic == format!("/{pk}/dev1/user/alarm") => {
                break serde_json::from_slice::<Value>(&p.payload).unwrap()
            }
            Some(_) => {}
            None => panic!("closed"),
        }
    };
    let want = json!({"temp": 35.5, "dev": "dev1", "up": "DEV1"});
    assert_eq!(got, want);
    assert_eq!(web.next().await, want);
    let rows = table_until(&srv, "alarms", 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["row"], want);
    assert_eq!(rows[0]["rule_id"], id.as_str());
    let v = rule_until(&srv, &id, |v| v["actions"][3]["done"] == 1).await;
    assert_eq!(v["stats"]["matched"], 2, "{v:#}");
    assert_eq!(v["stats"]["passed"], 1);
    assert_eq!(v["stats"]["filtered"], 1);
    assert_eq!(v["stats"]["failed"], 0);
    // The derived series is in the device's history.
    let (s, h) = srv
        .get(&format!("/devices/{pk}/dev1/properties/up/history"))
        .await;
    assert_eq!(s, 200, "{h}");
    assert!(h.to_string().contains("DEV1"), "{h}");
    let metrics = reqwest::get(format!("http://{}/metrics", srv.running.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("ironlink_rule_messages_total{rule=\"hot\",outcome=\"passed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ironlink_rule_action_total{rule=\"hot\",action=\"1\",kind=\"webhook\",outcome=\"done\"} 1"), "{metrics}");
    // Disabled, the rule no longer sees posts; enabled again, it does.
    let (s, v) = srv.post(&format!("/rules/{id}/disable"), json!({})).await;
    assert_eq!((s, &v["enabled"]), (200, &json!(false)), "{v}");
    post_temp(&mut d, &pk, "dev1", 40.0, 12).await;
    let (s, _) = srv.post(&format!("/rules/{id}/enable"), json!({})).await;
    assert_eq!(s, 200);
    post_temp(&mut d, &pk, "dev1", 41.0, 13).await;
    assert_eq!(web.next().await["temp"], 41.0);
    let rows = table_until(&srv, "alarms", 2).await;
    assert_eq!(rows.len(), 2, "the post while disabled went nowhere");
}

#[tokio::test]
async fn sql_errors_name_line_and_column_and_the_test_endpoint_evaluates() {
    let srv = start(|_| {}).await;
    let (s, v) = srv
        .post(
            "/rules",
            json!({"name": "bad", "sql": "SELECT a\nFROM \"/p/#\"\nWHERE nosuch(a) > 1"}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["code"], "invalid_sql");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("line 3, column 7: unknown function `nosuch()`"),
        "{v}"
    );
    let (s, v) = srv
        .post("/rules", json!({"name": "bad2", "sql": "SELECT a FROM \"/p/#\"", "actions": [{"type": "webhook", "url": "gopher://x"}]}))
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().starts_with("action 0:"),
        "{v}"
    );
    let (s, v) = srv
        .post("/rules/test", json!({
            "sql": "SELECT items.t.value * 2 AS t2, topic(2) AS dn FROM \"/p/+/thing/event/property/post\" WHERE items.t.value > 1",
            "payload": {"items": {"t": {"value": 4}}}
        }))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v,
        json!({"matched": true, "passed": true, "output": {"t2": 8, "dn": "dn"}})
    );
    create_rule(
        &srv,
        json!({"name": "dup", "sql": "SELECT * FROM \"/p/#\""}),
    )
    .await;
    let (s, v) = srv
        .post(
            "/rules",
            json!({"name": "dup", "sql": "SELECT * FROM \"/p/#\""}),
        )
        .await;
    assert_eq!(s, 409, "{v}");
}

#[tokio::test]
async fn a_failing_webhook_ends_in_dead_letters_and_a_slow_one_stalls_nothing_else() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "dev1").await;
    let failing = hook(500, Duration::ZERO).await;
    let slow = hook(200, Duration::from_secs(60)).await;
    let topic = format!("/{pk}/+/thing/event/property/post");
    let fail_id = create_rule(
        &srv,
        json!({"name": "failing", "sql": format!("SELECT items.temp.value AS t FROM \"{topic}\""),
               "actions": [{"type": "webhook", "url": failing.url, "retries": 2, "backoff_ms": 10}]}),
    )
    .await;
    let slow_id = create_rule(
        &srv,
        json!({"name": "slow", "sql": format!("SELECT items.temp.value AS t FROM \"{topic}\""),
               "actions": [{"type": "webhook", "url": slow.url, "concurrency": 1, "queue": 1, "timeout_ms": 120000}]}),
    )
    .await;
    let ok_id = create_rule(
        &srv,
        json!({"name": "fast", "sql": format!("SELECT items.temp.value AS t FROM \"{topic}\""),
               "actions": [{"type": "table", "table": "fast"}]}),
    )
    .await;
    let mut d = device_v4(&srv, &pk, "dev1", &secret).await;
    for i in 0..5u16 {
        post_temp(&mut d, &pk, "dev1", f64::from(i), 20 + i).await;
    }
    // The fast rule got all five while the slow webhook holds its first request.
    let rows = table_until(&srv, "fast", 5).await;
    assert_eq!(rows.len(), 5);
    let _ = slow.next().await;
    let v = rule_until(&srv, &slow_id, |v| {
        v["actions"][0]["dropped"]["queue full"]
            .as_u64()
            .unwrap_or(0)
            >= 3
    })
    .await;
    assert_eq!(v["actions"][0]["done"], 0, "{v:#}");
    // Every output of the failing webhook is tried 3 times, then dead-lettered.
    let v = rule_until(&srv, &fail_id, |v| v["actions"][0]["dead_lettered"] == 5).await;
    assert_eq!(v["actions"][0]["failed_attempts"], 15, "{v:#}");
    assert!(
        v["actions"][0]["last_error"]["error"]
            .as_str()
            .unwrap()
            .contains("webhook answered 500"),
        "{v:#}"
    );
    let (s, letters) = srv.get(&format!("/rules/{fail_id}/dead-letters")).await;
    assert_eq!(s, 200);
    let letters = letters.as_array().unwrap();
    assert_eq!(letters.len(), 5);
    assert_eq!(letters[0]["attempts"], 3);
    assert_eq!(letters[0]["kind"], "webhook");
    let mut ts: Vec<f64> = letters
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l["payload"].as_str().unwrap()).unwrap()["t"]
                .as_f64()
                .unwrap()
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    assert_eq!(ts, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    let v = rule_until(&srv, &ok_id, |_| true).await;
    assert_eq!(v["stats"]["passed"], 5);
    let (s, v) = srv
        .call(
            reqwest::Method::DELETE,
            &format!("/rules/{fail_id}/dead-letters"),
            None,
        )
        .await;
    assert_eq!((s, &v["deleted"]), (200, &json!(5)));
}

#[tokio::test]
async fn a_tumbling_window_averages_per_device_and_survives_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let srv = start(|c| c.data_dir = data.clone()).await;
    let (pk, _) = srv.product(false).await;
    let s1 = srv.device(&pk, "dev-a").await;
    let s2 = srv.device(&pk, "dev-b").await;
    let id = create_rule(
        &srv,
        json!({"name": "avg", "sql": format!(
            "SELECT deviceName() AS dev, count(*) AS n, sum(items.temp.value) AS s, avg(items.temp.value) AS a, max(items.temp.value) AS mx, window_end() - window_start() AS len\n\
             FROM \"/{pk}/+/thing/event/property/post\"\n\
             GROUP BY TUMBLINGWINDOW(ss, 1), deviceName()"),
            "actions": [{"type": "table", "table": "avg"}]}),
    )
    .await;
    let mut a = device_v4(&srv, &pk, "dev-a", &s1).await;
    let mut b = device_v4(&srv, &pk, "dev-b", &s2).await;
    for (i, t) in [10.0, 20.0, 30.0].into_iter().enumerate() {
        post_temp(&mut a, &pk, "dev-a", t, 30 + i as u16).await;
    }
    post_temp(&mut b, &pk, "dev-b", 5.0, 40).await;
    // However the posts fell into windows, the rows add up to them, per device.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rows = table_until(&srv, "avg", 1).await;
        let (mut na, mut sa, mut nb) = (0, 0.0, 0);
        for r in &rows {
            let r = &r["row"];
            assert_eq!(r["len"], 1000, "{r}");
            match r["dev"].as_str().unwrap() {
                "dev-a" => {
                    na += r["n"].as_u64().unwrap();
                    sa += r["s"].as_f64().unwrap();
                    let avg = r["s"].as_f64().unwrap() / r["n"].as_f64().unwrap();
                    assert!((r["a"].as_f64().unwrap() - avg).abs() < 1e-9, "{r}");
                }
                "dev-b" => nb += r["n"].as_u64().unwrap(),
                other => panic!("{other}"),
            }
        }
        if na == 3 && nb == 1 {
            assert_eq!(sa, 60.0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A long window holds its state across a clean restart.
    let (s, v) = srv
        .call(
            reqwest::Method::PUT,
            &format!("/rules/{id}"),
            Some(json!({"name": "avg", "sql": format!("SELECT deviceName() AS dev, count(*) AS n FROM \"/{pk}/+/thing/event/property/post\" GROUP BY TUMBLINGWINDOW(hh, 1), deviceName()"),
                        "actions": [{"type": "table", "table": "hourly"}]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    post_temp(&mut a, &pk, "dev-a", 1.0, 50).await;
    rule_until(&srv, &id, |v| v["stats"]["window_groups"] == 1).await;
    drop((a, b));
    srv.running.shutdown().await;
    let srv = start(|c| c.data_dir = data.clone()).await;
    let v = rule_until(&srv, &id, |_| true).await;
    assert_eq!(v["stats"]["window_groups"], 1, "{v:#}");
    assert!(
        v["stats"]["window_state"]
            .as_str()
            .unwrap()
            .starts_with("window state restored"),
        "{v:#}"
    );
    // Without a saved state (what a kill -9 leaves), the loss is declared on the rule.
    srv.running.shutdown().await;
    {
        use sqlx::Connection;
        let url = format!("sqlite://{}", data.join("ironlink.db").display());
        let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("DELETE FROM rule_state")
            .execute(&mut c)
            .await
            .unwrap();
    }
    let srv = start(|c| c.data_dir = data.clone()).await;
    let v = rule_until(&srv, &id, |_| true).await;
    assert_eq!(v["stats"]["window_groups"], 0);
    assert!(
        v["stats"]["window_state"]
            .as_str()
            .unwrap()
            .contains("window state was lost"),
        "{v:#}"
    );
    srv.running.shutdown().await;
}

#[tokio::test]
async fn scene_linkage_sets_a_property_of_another_device() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let s1 = srv.device(&pk, "sensor").await;
    let s2 = srv.device(&pk, "fan1").await;
    create_rule(
        &srv,
        json!({"name": "scene", "sql": format!("SELECT items.temp.value AS t FROM \"/{pk}/sensor/thing/event/property/post\" WHERE items.temp.value > 30"),
               "actions": [{"type": "scene", "product_key": pk, "device_name": "fan1", "params": {"speed": "${t}", "on": 1}}]}),
    )
    .await;
    let mut fan = device_v4(&srv, &pk, "fan1", &s2).await;
    let set_topic = format!("/sys/{pk}/fan1/thing/service/property/set");
    fan.subscribe_v4(&set_topic, 1).await;
    let mut sensor = device_v4(&srv, &pk, "sensor", &s1).await;
    post_temp(&mut sensor, &pk, "sensor", 33.0, 60).await;
    let set = loop {
        match fan.next_v4().await {
            Some(v4::Packet::Publish(p)) if p.topic == set_topic => {
                break serde_json::from_slice::<Value>(&p.payload).unwrap()
            }
            Some(_) => {}
            None => panic!("closed"),
        }
    };
    assert_eq!(set["method"], "thing.service.property.set");
    assert_eq!(set["params"], json!({"speed": 33.0, "on": 1}));
}

#[tokio::test]
async fn rows_go_into_a_postgresql_table() {
    let Some(pg) = postgres_database("ironlink_rules").await else {
        return;
    };
    use sqlx::Connection;
    let url = pg.url.clone();
    let mut target = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(
        "CREATE TABLE readings (dev TEXT NOT NULL, temp DOUBLE PRECISION, n BIGINT, hot BOOLEAN)",
    )
    .execute(&mut target)
    .await
    .unwrap();
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "dev1").await;
    let id = create_rule(
        &srv,
        json!({"name": "pg", "sql": format!("SELECT deviceName() AS dev, items.temp.value AS temp, 7 AS n, items.temp.value > 30 AS hot FROM \"/{pk}/+/thing/event/property/post\""),
               "actions": [{"type": "postgres", "url": url, "table": "readings"}]}),
    )
    .await;
    let mut d = device_v4(&srv, &pk, "dev1", &secret).await;
    post_temp(&mut d, &pk, "dev1", 31.5, 70).await;
    post_temp(&mut d, &pk, "dev1", 12.0, 71).await;
    rule_until(&srv, &id, |v| v["actions"][0]["done"] == 2).await;
    let rows: Vec<(String, f64, i64, bool)> =
        sqlx::query_as("SELECT dev, temp, n, hot FROM readings ORDER BY temp")
            .fetch_all(&mut target)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            ("dev1".into(), 12.0, 7, false),
            ("dev1".into(), 31.5, 7, true)
        ]
    );
    drop(target);
    pg.drop_db().await;
}

const RAW_TSL: &str = r#"{"properties": [
  {"identifier": "prop_float", "name": "f", "accessMode": "rw", "dataType": {"type": "float", "specs": {"min": "-1000", "max": "1000"}}},
  {"identifier": "prop_int16", "name": "i", "accessMode": "rw", "dataType": {"type": "int", "specs": {"min": "-1000", "max": "1000"}}},
  {"identifier": "prop_bool", "name": "b", "accessMode": "rw", "dataType": {"type": "bool", "specs": {"0": "off", "1": "on"}}}
]}"#;

#[tokio::test]
async fn a_script_decodes_raw_uplinks_encodes_downlinks_and_a_runaway_call_is_cut_off() {
    let srv = start(|c| c.rules.script_time_limit = Duration::from_millis(100)).await;
    let (s, v) = srv
        .post("/products", json!({"name": "raw", "data_format": "raw"}))
        .await;
    assert_eq!(s, 201, "{v}");
    let pk = v["product_key"].as_str().unwrap().to_owned();
    let (s, v) = srv
        .call(
            reqwest::Method::PUT,
            &format!("/products/{pk}/thing-model"),
            Some(serde_json::from_str(RAW_TSL).unwrap()),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // A script that does not compile is refused with the reason.
    let (s, v) = srv
        .call(
            reqwest::Method::PUT,
            &format!("/products/{pk}/script"),
            Some(json!({"script": "function rawDataToProtocol( {"})),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (422, Some("invalid_script")),
        "{v}"
    );
    let sample = include_str!("data/alibaba_sample_script.js");
    // The test endpoint runs a script on a sample before it is installed.
    let (s, v) = srv
        .post(
            &format!("/products/{pk}/script/test"),
            json!({"script": sample, "direction": "up", "payload_hex": "000000000100320100000000"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["output"]["params"],
        json!({"prop_float": 0, "prop_int16": 50, "prop_bool": 1})
    );
    // A runaway variant: a frame starting 0xee loops forever.
    let runaway = format!("{sample}\nvar decode = rawDataToProtocol;\nrawDataToProtocol = function (b) {{ if ((b[0] & 0xff) == 0xee) {{ for (;;) {{}} }} return decode(b); }};\n");
    let (s, v) = srv
        .call(
            reqwest::Method::PUT,
            &format!("/products/{pk}/script"),
            Some(json!({"script": runaway})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let secret = srv.device(&pk, "raw1").await;
    let mut d = device_v4(&srv, &pk, "raw1", &secret).await;
    let up = format!("/sys/{pk}/raw1/thing/model/up_raw");
    d.subscribe_v4(&format!("{up}_reply"), 1).await;
    d.subscribe_v4(&format!("/sys/{pk}/raw1/thing/model/down_raw"), 2)
        .await;
    d.publish_v4(&up, &[0xee, 1, 2], QoS::AtLeastOnce, 3).await;
    // A truncated frame: the script throws (DataView out of range), counted as an error.
    d.publish_v4(&up, &[0x00, 0x01], QoS::AtLeastOnce, 4).await;
    let frame = hex::decode("0000003009014d0142f6e76d").unwrap();
    d.publish_v4(&up, &frame, QoS::AtLeastOnce, 5).await;
    // The reply to the good frame comes back encoded: COMMAND_REPORT_REPLY, id 0x3009, 200.
    let reply = loop {
        match d.next_v4().await {
            Some(v4::Packet::Publish(p)) if p.topic == format!("{up}_reply") => {
                break p.payload.to_vec()
            }
            Some(_) => {}
            None => panic!("closed"),
        }
    };
    assert_eq!(hex::encode(reply), "0200003009c8");
    let (s, v) = srv.get(&format!("/devices/{pk}/raw1/properties")).await;
    assert_eq!(s, 200, "{v}");
    let text = v.to_string();
    assert!(text.contains("333") && text.contains("123.45"), "{v}");
    let (s, v) = srv.get(&format!("/products/{pk}/script")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stats"]["timeouts"], 1, "{v}");
    assert_eq!(v["stats"]["errors"], 1, "{v}");
    // A property set goes down as bytes; the device's raw reply (COMMAND_SET_REPLY, the id,
    // 200) is decoded by the script and finishes the call.
    let srv2 = Arc::new(srv);
    let s3 = srv2.clone();
    let pk2 = pk.clone();
    let call = tokio::spawn(async move {
        s3.post(
            &format!("/devices/{pk2}/raw1/properties"),
            json!({"params": {"prop_int16": 7, "prop_bool": 0, "prop_float": 1.5}, "timeout_ms": 10000}),
        )
        .await
    });
    let down = loop {
        match d.next_v4().await {
            Some(v4::Packet::Publish(p)) if p.topic.ends_with("/down_raw") => {
                break p.payload.to_vec()
            }
            Some(_) => {}
            None => panic!("closed"),
        }
    };
    assert_eq!(down[0], 0x01);
    assert_eq!(&down[5..8], &[0x00, 0x07, 0x00]);
    assert_eq!(&down[8..12], &1.5f32.to_be_bytes());
    let mut reply = vec![0x03];
    reply.extend_from_slice(&down[1..5]);
    reply.push(0xc8);
    d.publish_v4(
        &format!("/sys/{pk}/raw1/thing/model/down_raw_reply"),
        &reply,
        QoS::AtMostOnce,
        0,
    )
    .await;
    let (s, v) = call.await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["code"], 200, "{v}");
}

#[tokio::test]
async fn lifecycle_changes_and_custom_topics_reach_rules() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "dev1").await;
    create_rule(
        &srv,
        json!({"name": "presence", "sql": format!("SELECT status, deviceName() AS dev FROM \"/as/mqtt/status/{pk}/+\""),
               "actions": [{"type": "table", "table": "presence"}]}),
    )
    .await;
    create_rule(
        &srv,
        json!({"name": "custom", "sql": format!("SELECT payload() AS text, topic(4) AS leaf, deviceName() AS dev FROM \"/{pk}/+/user/#\""),
               "actions": [{"type": "table", "table": "custom"}]}),
    )
    .await;
    let mut d = device_v4(&srv, &pk, "dev1", &secret).await;
    let rows = table_until(&srv, "presence", 1).await;
    assert_eq!(rows[0]["row"], json!({"status": "online", "dev": "dev1"}));
    d.publish_v4(
        &format!("/{pk}/dev1/user/update"),
        b"not json, kept as text",
        QoS::AtLeastOnce,
        80,
    )
    .await;
    let rows = table_until(&srv, "custom", 1).await;
    assert_eq!(
        rows[0]["row"],
        json!({"text": "not json, kept as text", "leaf": "update", "dev": "dev1"})
    );
    drop(d);
    let rows = table_until(&srv, "presence", 2).await;
    assert_eq!(rows[1]["row"]["status"], "offline");
}

#[tokio::test]
async fn a_custom_topic_with_the_parsing_tag_is_parsed_by_transform_payload() {
    let srv = start(|c| c.rules.script_time_limit = Duration::from_secs(10)).await;
    let (pk, _) = srv.product(false).await;
    // Alibaba's documented form, plus a frame the script refuses (it throws on 0xee), and a
    // slow first frame, so the messages after it arrive while it is still being parsed.
    let script = format!(
        "{}\nvar parse = transformPayload;\ntransformPayload = function (t, b) {{ if ((b[0] & 0xff) == 0xee) {{ throw new Error('bad frame'); }} if ((b[1] & 0xff) == 0x32) {{ var end = Date.now() + 200; while (Date.now() < end) {{}} }} return parse(t, b); }};\n",
        include_str!("data/alibaba_sample_script.js")
    );
    let (s, v) = srv
        .call(
            reqwest::Method::PUT,
            &format!("/products/{pk}/script"),
            Some(json!({ "script": script })),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    create_rule(
        &srv,
        json!({"name": "parsed", "sql": format!("SELECT prop_int16, prop_bool, topic() AS t, payload('hex') AS hex FROM \"/{pk}/+/user/#\""),
               "actions": [{"type": "table", "table": "parsed"}]}),
    )
    .await;
    let secret = srv.device(&pk, "dev1").await;
    let mut d = device_v4(&srv, &pk, "dev1", &secret).await;
    let topic = format!("/{pk}/dev1/user/update");
    d.subscribe_v4(&topic, 1).await;
    d.publish_v4(
        &format!("{topic}?_sn=default"),
        &[0x00, 0x32, 0x01],
        QoS::AtLeastOnce,
        2,
    )
    .await;
    // Untagged: as sent, even though the product has a script.
    d.publish_v4(&topic, &[0x00, 0x33, 0x00], QoS::AtLeastOnce, 3)
        .await;
    // Tagged, but the script throws: the payload goes on as sent, the error is counted.
    d.publish_v4(
        &format!("{topic}?_sn=default"),
        &[0xee],
        QoS::AtLeastOnce,
        4,
    )
    .await;
    let mut got = Vec::new();
    let mut acks = Vec::new();
    while got.len() < 3 || acks.len() < 3 {
        match tokio::time::timeout(WAIT, d.next_v4())
            .await
            .expect("in time")
        {
            Some(v4::Packet::Publish(p)) => got.push((p.topic.clone(), p.payload.to_vec())),
            Some(v4::Packet::PubAck(a)) => acks.push(a.pkid),
            Some(_) => {}
            None => panic!("closed"),
        }
    }
    assert_eq!(acks, vec![2, 3, 4], "acknowledged in order");
    // The subscriber sees the topic without the tag, and the parsed JSON.
    assert!(got.iter().all(|(t, _)| *t == topic), "{got:?}");
    let first: Value = serde_json::from_slice(&got[0].1).unwrap();
    assert_eq!(
        first,
        json!({"topic": topic, "prop_int16": 50, "prop_bool": 1})
    );
    assert_eq!(got[1].1, vec![0x00, 0x33, 0x00]);
    assert_eq!(got[2].1, vec![0xee]);
    let rows = table_until(&srv, "parsed", 3).await;
    let rows: Vec<&Value> = rows.iter().map(|r| &r["row"]).collect();
    assert!(
        rows.contains(&&json!({"prop_int16": 50, "prop_bool": 1, "t": topic,
                               "hex": hex::encode(first.to_string())})),
        "{rows:?}"
    );
    assert!(
        rows.contains(&&json!({"t": topic, "hex": "003300"})),
        "{rows:?}"
    );
    assert!(
        rows.contains(&&json!({"t": topic, "hex": "ee"})),
        "{rows:?}"
    );
    let (s, v) = srv.get(&format!("/products/{pk}/script")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["stats"]["ok"].as_u64(), v["stats"]["errors"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
}

#[tokio::test]
async fn attribute_reads_the_device_tags_as_they_change() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "dev1").await;
    let (s, v) = srv
        .call(
            reqwest::Method::PUT,
            &format!("/devices/{pk}/dev1/tags"),
            Some(json!({"room": "B2"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    create_rule(
        &srv,
        json!({"name": "tagged", "sql": format!("SELECT attribute('room') AS room, attribute('none') AS none, items.temp.value AS t FROM \"/{pk}/+/thing/event/property/post\""),
               "actions": [{"type": "table", "table": "tagged"}]}),
    )
    .await;
    let mut d = device_v4(&srv, &pk, "dev1", &secret).await;
    post_temp(&mut d, &pk, "dev1", 1.0, 1).await;
    let rows = table_until(&srv, "tagged", 1).await;
    assert_eq!(rows[0]["row"], json!({"room": "B2", "t": 1.0}));
    // Changed through the API: the next message sees the new value.
    let (s, v) = srv
        .call(
            reqwest::Method::PUT,
            &format!("/devices/{pk}/dev1/tags"),
            Some(json!({"room": "C3"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    post_temp(&mut d, &pk, "dev1", 2.0, 2).await;
    let rows = table_until(&srv, "tagged", 2).await;
    assert_eq!(rows[1]["row"], json!({"room": "C3", "t": 2.0}));
    // Changed by the device itself (Alink deviceinfo/update), acknowledged once stored.
    let body =
        json!({"id": "3", "version": "1.0", "params": [{"attrKey": "room", "attrValue": "D4"}]});
    d.publish_v4(
        &format!("/sys/{pk}/dev1/thing/deviceinfo/update"),
        body.to_string().as_bytes(),
        QoS::AtLeastOnce,
        3,
    )
    .await;
    loop {
        match d.next_v4().await {
            Some(v4::Packet::PubAck(a)) if a.pkid == 3 => break,
            Some(_) => {}
            None => panic!("closed before PUBACK"),
        }
    }
    post_temp(&mut d, &pk, "dev1", 3.0, 4).await;
    let rows = table_until(&srv, "tagged", 3).await;
    assert_eq!(rows[2]["row"], json!({"room": "D4", "t": 3.0}));
    // The test endpoint has no device: attribute() is null there (as in Alibaba's debugging).
    let (s, v) = srv
        .post(
            "/rules/test",
            json!({"sql": format!("SELECT attribute('room') AS room, 1 AS one FROM \"/{pk}/+/user/x\""),
                   "topic": format!("/{pk}/dev1/user/x"), "payload": {}}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["output"], json!({"one": 1}), "{v}");
}

#[tokio::test]
async fn action_secrets_are_hidden_and_kept_when_a_rule_is_sent_back() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "dev1").await;
    // A webhook receiver that hands over the Authorization header it got.
    let (tx, mut auth) = mpsc::unbounded_channel::<String>();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |h: axum::http::HeaderMap| {
            let tx = tx.clone();
            async move {
                let a = h
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let _ = tx.send(a.to_owned());
                axum::http::StatusCode::OK
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    let sql = format!("SELECT items.temp.value AS t FROM \"/{pk}/+/thing/event/property/post\"");
    let id = create_rule(
        &srv,
        json!({"name": "hook", "sql": sql, "actions": [{"type": "webhook", "url": url,
               "headers": {"Authorization": "Bearer s3cret", "X-Plain": "visible"}}]}),
    )
    .await;
    let mqtt = create_rule(
        &srv,
        json!({"name": "broker", "sql": format!("SELECT 1 AS one FROM \"/{pk}/+/user/never\""),
               "actions": [{"type": "mqtt", "host": "127.0.0.1", "topic": "x",
                            "username": "u", "password": "pw"},
                           {"type": "postgres", "url": "postgres://u:dbpass@127.0.0.1:1/db", "table": "t"}]}),
    )
    .await;
    let (_, v) = srv.get(&format!("/rules/{mqtt}")).await;
    let text = v.to_string();
    assert!(!text.contains("\"pw\"") && !text.contains("dbpass"), "{v}");
    assert_eq!(v["actions"][0]["spec"]["password"], "***", "{v}");
    let (_, v) = srv.get(&format!("/rules/{id}")).await;
    let spec = v["actions"][0]["spec"].clone();
    assert_eq!(
        spec["headers"],
        json!({"Authorization": "***", "X-Plain": "visible"}),
        "{v}"
    );
    // Sent back as read, with a new SQL: the header keeps its stored value.
    let (s, v) = srv
        .call(
            reqwest::Method::PUT,
            &format!("/rules/{id}"),
            Some(json!({"name": "hook", "sql": format!("{sql} WHERE items.temp.value > 0"), "actions": [spec]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let mut d = device_v4(&srv, &pk, "dev1", &secret).await;
    post_temp(&mut d, &pk, "dev1", 5.0, 1).await;
    let got = tokio::time::timeout(WAIT, auth.recv())
        .await
        .expect("webhook called")
        .unwrap();
    assert_eq!(got, "Bearer s3cret");
}

#[tokio::test]
async fn an_mqtt_output_the_broker_never_acknowledges_is_dead_lettered_not_done() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "dev1").await;
    // A port nothing listens on: the action's client keeps failing to connect.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let id = create_rule(
        &srv,
        json!({"name": "down", "sql": format!("SELECT items.temp.value AS t FROM \"/{pk}/+/thing/event/property/post\""),
               "actions": [{"type": "mqtt", "host": "127.0.0.1", "port": port, "topic": "x", "qos": 1,
                            "timeout_ms": 300, "retries": 0}]}),
    )
    .await;
    let mut d = device_v4(&srv, &pk, "dev1", &secret).await;
    post_temp(&mut d, &pk, "dev1", 7.0, 1).await;
    let v = rule_until(&srv, &id, |v| v["actions"][0]["dead_lettered"] == 1).await;
    assert_eq!(v["actions"][0]["done"], 0, "{v:#}");
    let e = v["actions"][0]["last_error"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(e.contains("not acknowledged (PUBACK) within 300 ms"), "{e}");
    let (s, letters) = srv.get(&format!("/rules/{id}/dead-letters")).await;
    assert_eq!(s, 200);
    assert_eq!(letters.as_array().unwrap().len(), 1, "{letters}");
}

#[tokio::test]
async fn a_durable_rule_takes_its_messages_from_its_own_queue() {
    let srv = start(|_| {}).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "dev1").await;
    let (s, v) = srv
        .post("/rules", json!({"name": "w", "durable": true, "sql": "SELECT count(*) AS n FROM \"/p/#\" GROUP BY TUMBLINGWINDOW(ss, 10)"}))
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("durable applies to rules without windows"),
        "{v}"
    );
    let id = create_rule(
        &srv,
        json!({"name": "kept", "durable": true,
               "sql": format!("SELECT items.temp.value AS t FROM \"/{pk}/+/thing/event/property/post\" WHERE items.temp.value > 1"),
               "actions": [{"type": "table", "table": "kept"}]}),
    )
    .await;
    let mut d = device_v4(&srv, &pk, "dev1", &secret).await;
    for (i, t) in [1.0, 2.0, 3.0].into_iter().enumerate() {
        post_temp(&mut d, &pk, "dev1", t, 90 + i as u16).await;
    }
    let rows = table_until(&srv, "kept", 2).await;
    let mut ts: Vec<f64> = rows
        .iter()
        .map(|r| r["row"]["t"].as_f64().unwrap())
        .collect();
    ts.sort_by(f64::total_cmp);
    assert_eq!(ts, vec![2.0, 3.0]);
    let v = rule_until(&srv, &id, |v| v["stats"]["matched"] == 3).await;
    assert_eq!(
        (
            v["durable"].clone(),
            v["stats"]["passed"].clone(),
            v["stats"]["filtered"].clone()
        ),
        (json!(true), json!(2), json!(1))
    );
    // Its queue is a consumer group of the platform, visible on /metrics, and empties.
    let group = format!("$rule:{id}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = reqwest::get(format!("http://{}/metrics", srv.running.http_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let acked = metrics
            .lines()
            .find(|l| l.contains(&group) && l.contains("acknowledged"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok());
        if acked == Some(3) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, _) = srv
        .call(reqwest::Method::DELETE, &format!("/rules/{id}"), None)
        .await;
    assert_eq!(s, 204);
}
