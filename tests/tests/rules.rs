//! The rules engine with the cloud as a process: a rule's output forwarded to an external
//! mosquitto broker (plain and over TLS), and window state across SIGTERM (saved, restored) and kill -9 (declared
//! lost on the rule).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn device(c: &Cloud, dn: &str) -> (String, String) {
    let (s, p) = c
        .api(Method::POST, "/products", Some(json!({"name": "rules"})))
        .await
        .unwrap();
    assert_eq!(s, 201, "{p}");
    let pk = p["product_key"].as_str().unwrap().to_owned();
    let (s, v) = c
        .api(
            Method::POST,
            &format!("/products/{pk}/devices"),
            Some(json!({"device_names": [dn]})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    (
        pk,
        v["devices"][0]["device_secret"]
            .as_str()
            .unwrap()
            .to_owned(),
    )
}

/// Posts `temps` as QoS 1 property posts and waits for every PUBACK.
async fn post(c: &Cloud, pk: &str, dn: &str, secret: &str, temps: &[f64]) {
    let mut dev = connect_device(c.mqtt, pk, dn, secret)
        .await
        .expect("connected");
    let topic = format!("/sys/{pk}/{dn}/thing/event/property/post");
    let mut out = bytes::BytesMut::new();
    for (i, t) in temps.iter().enumerate() {
        let body = json!({"id": i.to_string(), "params": {"temp": t}});
        let mut p = rumqttc::mqttbytes::v4::Publish::new(
            &topic,
            rumqttc::QoS::AtLeastOnce,
            body.to_string().into_bytes(),
        );
        p.pkid = u16::try_from(i + 1).unwrap();
        p.write(&mut out).unwrap();
    }
    dev.write_all(&out).await.unwrap();
    let mut acks = vec![0u8; 4 * temps.len()];
    tokio::time::timeout(WAIT, dev.read_exact(&mut acks))
        .await
        .expect("all PUBACKs in time")
        .unwrap();
}

async fn rule(c: &Cloud, name: &str) -> Value {
    let (s, v) = c
        .api(Method::GET, &format!("/rules/{name}"), None)
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    v
}

/// A subscriber on the mosquitto at 127.0.0.1:`port`, subscribed (SUBACK seen) to `filter`.
async fn subscriber(port: u16, filter: &str) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let mut o = rumqttc::MqttOptions::new(format!("sub-{port}"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (sub, mut events) = rumqttc::AsyncClient::new(o, 16);
    sub.subscribe(filter, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while !matches!(
            events.poll().await.unwrap(),
            rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))
        ) {}
    })
    .await
    .expect("subscribed in time");
    (sub, events)
}

#[tokio::test]
async fn rule_outputs_reach_an_external_mosquitto_broker() {
    let dir = tempfile::tempdir().unwrap();
    let (_mosquitto, broker) = ironlink_sim::bench::start_mosquitto(dir.path())
        .await
        .expect("mosquitto (apt-get install mosquitto)");
    let cloud = Cloud::start(&dir.path().join("cloud"), &[]).unwrap();
    let (pk, secret) = device(&cloud, "boiler-1").await;
    // A subscriber on mosquitto, subscribed before anything is published.
    let (_sub, mut events) = subscriber(broker.port(), "plant/+/temp").await;
    let sql = format!(
        "SELECT deviceName() AS dev, items.temp.value AS t FROM \"/{pk}/+/thing/event/property/post\" WHERE items.temp.value >= 50"
    );
    let (s, v) = cloud
        .api(
            Method::POST,
            "/rules",
            Some(json!({"name": "to-mosquitto", "sql": sql, "actions": [
                {"type": "mqtt", "host": broker.ip().to_string(), "port": broker.port(), "topic": "plant/${dev}/temp", "qos": 1}
            ]})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    post(&cloud, &pk, "boiler-1", &secret, &[40.0, 55.0, 60.5]).await;
    let mut got = Vec::new();
    // One deadline for the whole wait (keep-alive pings would satisfy a per-poll one).
    tokio::time::timeout(WAIT, async {
        while got.len() < 2 {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                events.poll().await.unwrap()
            {
                assert_eq!(p.topic, "plant/boiler-1/temp");
                got.push(serde_json::from_slice::<Value>(&p.payload).unwrap());
            }
        }
    })
    .await
    .expect("forwarded in time");
    // The action's first output may have waited for its connection; order is not promised.
    got.sort_by(|a, b| {
        a["t"]
            .as_f64()
            .unwrap()
            .total_cmp(&b["t"].as_f64().unwrap())
    });
    assert_eq!(
        got,
        vec![
            json!({"dev": "boiler-1", "t": 55.0}),
            json!({"dev": "boiler-1", "t": 60.5})
        ]
    );
}

/// mosquitto with a plain listener (for the test's subscriber) and a TLS listener using the
/// certificate the cloud generated for itself (CA `tls/ca.pem`, SAN 127.0.0.1).
async fn mosquitto_with_tls(
    dir: &std::path::Path,
    tls: &std::path::Path,
) -> (std::process::Child, u16, u16) {
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (plain, secure) = (free(), free());
    // Started as root, mosquitto would switch to its own user, which cannot read the cloud's
    // key (mode 0600): it stays the user running the test.
    let me = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    let me = String::from_utf8(me.stdout).unwrap();
    let conf = dir.join("mosquitto-tls.conf");
    std::fs::write(
        &conf,
        format!(
            "user {}\nper_listener_settings false\nallow_anonymous true\npersistence false\nlog_type error\n\
             listener {plain} 127.0.0.1\n\
             listener {secure} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            me.trim(),
            tls.join("ca.pem").display(),
            tls.join("server.pem").display(),
            tls.join("server.key").display()
        ),
    )
    .unwrap();
    let child = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto (apt-get install mosquitto)");
    for port in [plain, secure] {
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "mosquitto did not listen on {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (child, plain, secure)
}

#[tokio::test]
async fn rule_outputs_reach_mosquitto_over_tls_verified_against_the_given_ca() {
    let dir = tempfile::tempdir().unwrap();
    // The cloud generates its own CA and server certificate for its MQTT/TLS listener.
    let cloud = Cloud::start(
        &dir.path().join("cloud"),
        &["--mqtts-listen", "127.0.0.1:0"],
    )
    .unwrap();
    let tls = dir.path().join("cloud").join("tls");
    let (mut mosquitto, plain, secure) = mosquitto_with_tls(dir.path(), &tls).await;
    let ca = std::fs::read_to_string(tls.join("ca.pem")).unwrap();
    let (pk, secret) = device(&cloud, "boiler-1").await;
    let (_sub, mut events) = subscriber(plain, "secure/+/temp").await;
    // Settings that cannot work are refused when the rule is created, with the reason.
    let sql = format!("SELECT deviceName() AS dev, items.temp.value AS t FROM \"/{pk}/+/thing/event/property/post\"");
    for (action, why) in [
        (
            json!({"type": "mqtt", "host": "127.0.0.1", "port": secure, "topic": "x", "tls": true, "ca_pem": "not a certificate"}),
            "ca_pem",
        ),
        (
            json!({"type": "mqtt", "host": "127.0.0.1", "port": secure, "topic": "x", "ca_pem": ca}),
            "tls",
        ),
        (
            json!({"type": "mqtt", "host": "127.0.0.1", "port": secure, "topic": "x", "tls": true, "ca_pem": ca, "client_cert_pem": ca}),
            "go together",
        ),
    ] {
        let (s, v) = cloud
            .api(
                Method::POST,
                "/rules",
                Some(json!({"name": "bad", "sql": sql, "actions": [action]})),
            )
            .await
            .unwrap();
        assert_eq!(s, 400, "{v}");
        assert!(v.to_string().contains(why), "{why}: {v}");
    }
    let (s, v) = cloud
        .api(
            Method::POST,
            "/rules",
            Some(json!({"name": "to-mosquitto-tls", "sql": sql, "actions": [
                {"type": "mqtt", "host": "127.0.0.1", "port": secure, "topic": "secure/${dev}/temp",
                 "qos": 1, "tls": true, "ca_pem": ca}
            ]})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    // The same broker checked against the system's CAs: its certificate is refused, and the
    // output ends in the dead-letter store with the reason instead of counting as done.
    let (s, v) = cloud
        .api(
            Method::POST,
            "/rules",
            Some(json!({"name": "untrusted", "sql": sql, "actions": [
                {"type": "mqtt", "host": "127.0.0.1", "port": secure, "topic": "secure/${dev}/temp",
                 "qos": 1, "tls": true, "timeout_ms": 500, "retries": 0}
            ]})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    post(&cloud, &pk, "boiler-1", &secret, &[21.5]).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let v = loop {
        let v = rule(&cloud, "untrusted").await;
        if v["actions"][0]["dead_lettered"] == 1 {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(v["actions"][0]["done"], 0, "{v:#}");
    let e = v["actions"][0]["last_error"]["error"].as_str().unwrap();
    assert!(
        e.contains("certificate") || e.contains("Certificate"),
        "{e}"
    );
    // One deadline for the whole wait (keep-alive pings would satisfy a per-poll one).
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                events.poll().await.unwrap()
            {
                break (
                    p.topic,
                    serde_json::from_slice::<Value>(&p.payload).unwrap(),
                );
            }
        }
    })
    .await
    .expect("forwarded over TLS in time");
    assert_eq!(
        got,
        (
            "secure/boiler-1/temp".to_owned(),
            json!({"dev": "boiler-1", "t": 21.5})
        )
    );
    let _ = mosquitto.kill();
    let _ = mosquitto.wait();
}

#[tokio::test]
async fn window_state_is_restored_after_sigterm_and_declared_lost_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path(), &[]).unwrap();
    let (pk, secret) = device(&cloud, "meter-01").await;
    let sql = format!(
        "SELECT deviceName() AS dev, count(*) AS n, avg(items.temp.value) AS a FROM \"/{pk}/+/thing/event/property/post\" GROUP BY TUMBLINGWINDOW(hh, 1), deviceName()"
    );
    let (s, v) = cloud
        .api(Method::POST, "/rules", Some(json!({"name": "hourly", "sql": sql, "actions": [{"type": "table", "table": "hourly"}]})))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    post(&cloud, &pk, "meter-01", &secret, &[1.0, 2.0, 3.0]).await;
    let deadline = std::time::Instant::now() + WAIT;
    while rule(&cloud, "hourly").await["stats"]["matched"] != 3 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cloud.signal("TERM").unwrap();
    assert!(cloud.wait_exit().unwrap(), "clean exit");
    let cloud = Cloud::start(dir.path(), &[]).unwrap();
    let v = rule(&cloud, "hourly").await;
    assert_eq!(v["stats"]["window_groups"], 1, "{v:#}");
    assert!(
        v["stats"]["window_state"]
            .as_str()
            .unwrap()
            .starts_with("window state restored"),
        "{v:#}"
    );
    cloud.kill9().unwrap();
    let cloud = Cloud::start(dir.path(), &[]).unwrap();
    let v = rule(&cloud, "hourly").await;
    assert_eq!(v["stats"]["window_groups"], 0, "{v:#}");
    assert!(
        v["stats"]["window_state"]
            .as_str()
            .unwrap()
            .contains("was lost"),
        "{v:#}"
    );
}

/// Runs the admin CLI against `c`; stdout, or the failure with stderr.
fn cli(c: &Cloud, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(binary("cloud", "ironlink-cloud").unwrap())
        .args(args)
        .args(["--url", &format!("http://{}", c.http), "--token", &c.token])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn the_cli_manages_rules_and_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path(), &[]).unwrap();
    let (pk, _) = device(&cloud, "meter-01").await;
    let sql = format!("SELECT items.temp.value AS t FROM \"/{pk}/+/thing/event/property/post\"");
    let err = cli(
        &cloud,
        &[
            "rule",
            "create",
            "bad",
            "--sql",
            "SELECT a FROM \"t\"\nWHERE upper(1)",
        ],
    )
    .unwrap_err();
    assert!(err.contains("line 2, column 7"), "{err}");
    cli(
        &cloud,
        &[
            "rule",
            "create",
            "to-table",
            "--sql",
            &sql,
            "--action",
            r#"{"type":"table","table":"t1"}"#,
        ],
    )
    .unwrap();
    let list = cli(&cloud, &["rule", "list"]).unwrap();
    assert!(
        list.contains("to-table") && list.contains("MATCHED"),
        "{list}"
    );
    cli(&cloud, &["rule", "disable", "to-table"]).unwrap();
    let shown: Value =
        serde_json::from_str(&cli(&cloud, &["rule", "show", "to-table", "--json"]).unwrap())
            .unwrap();
    assert_eq!(shown["enabled"], false);
    let tested: Value = serde_json::from_str(
        &cli(
            &cloud,
            &[
                "rule",
                "test",
                "--sql",
                &sql,
                "--payload",
                r#"{"items":{"temp":{"value":3}}}"#,
                "--json",
            ],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(tested["output"], json!({"t": 3}));
    let script = dir.path().join("decoder.js");
    std::fs::write(&script, "function rawDataToProtocol(b) { return {method: 'thing.event.property.post', params: {first: b[0]}}; }").unwrap();
    cli(&cloud, &["script", "set", &pk, script.to_str().unwrap()]).unwrap();
    let out: Value = serde_json::from_str(
        &cli(
            &cloud,
            &["script", "test", &pk, "up", "--hex", "2a00", "--json"],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(out["output"]["params"]["first"], 42);
    cli(&cloud, &["rule", "delete", "to-table"]).unwrap();
    assert!(cli(&cloud, &["rule", "show", "to-table"])
        .unwrap_err()
        .contains("404"));
}

/// A webhook receiver that hangs every request until `answer` turns true, then answers 200;
/// it reports every body it is sent (hung or answered) with whether it was answered.
async fn gated_hook(
    answer: tokio::sync::watch::Receiver<bool>,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<(bool, Value)>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (tx, mut answer) = (tx.clone(), answer.clone());
            async move {
                let v = serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
                let open = *answer.borrow();
                let _ = tx.send((open, v));
                if !open {
                    let _ = answer.wait_for(|a| *a).await;
                    // Hung requests never get an answer: their sender was killed.
                    std::future::pending::<()>().await;
                }
                "ok"
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, rx)
}

/// A durable rule: posts acknowledged to the device while its webhook hangs are delivered
/// after kill -9 and a restart (at least once). With `durable` false this fails: the outputs
/// waiting in memory die with the process.
#[tokio::test]
async fn a_durable_rule_delivers_what_was_acknowledged_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (open, open_rx) = tokio::sync::watch::channel(false);
    let (url, mut bodies) = gated_hook(open_rx).await;
    let cloud = Cloud::start(dir.path(), &[]).unwrap();
    let (pk, secret) = device(&cloud, "boiler-1").await;
    let sql = format!("SELECT items.temp.value AS t FROM \"/{pk}/+/thing/event/property/post\"");
    let (s, v) = cloud
        .api(
            Method::POST,
            "/rules",
            Some(json!({"name": "durable-hook", "durable": true, "sql": sql,
                        "actions": [{"type": "webhook", "url": url, "timeout_ms": 60000}]})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["durable"], true);
    post(&cloud, &pk, "boiler-1", &secret, &[1.0, 2.0, 3.0, 4.0, 5.0]).await;
    // The first output is at the webhook, which hangs; the rest wait in the durable queue.
    let (answered, first) = tokio::time::timeout(WAIT, bodies.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(!answered);
    // (Pipelined posts are stored concurrently: which one comes first is not fixed.)
    assert!(
        (1.0..=5.0).contains(&first["t"].as_f64().unwrap()),
        "{first}"
    );
    cloud.kill9().unwrap();
    open.send(true).unwrap();
    let cloud = Cloud::start(dir.path(), &[]).unwrap();
    let mut got = std::collections::BTreeSet::new();
    while got.len() < 5 {
        let (answered, v) = tokio::time::timeout(WAIT, bodies.recv())
            .await
            .expect("every output delivered after the restart")
            .unwrap();
        if !answered {
            continue; // sent before the kill, never answered
        }
        got.insert(v["t"].as_f64().unwrap() as i64);
    }
    assert_eq!(got.into_iter().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    // Nothing stays queued once delivered.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = rule(&cloud, "durable-hook").await;
        if v["actions"][0]["done"] == 5 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{v:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
