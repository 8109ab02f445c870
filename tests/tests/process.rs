//! The cloud as a process: kill -9, SIGTERM, and a connect storm.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_tests::*;
use reqwest::Method;
use serde_json::json;

async fn product_and_devices(c: &Cloud, names: &[&str]) -> (String, Vec<String>) {
    let (s, p) = c
        .api(Method::POST, "/products", Some(json!({"name": "plant"})))
        .await
        .unwrap();
    assert_eq!(s, 201);
    let pk = p["product_key"].as_str().unwrap().to_owned();
    let (s, v) = c
        .api(
            Method::POST,
            &format!("/products/{pk}/devices"),
            Some(json!({"device_names": names})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let secrets = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_secret"].as_str().unwrap().to_owned())
        .collect();
    (pk, secrets)
}

/// Waits until the API reports `dn` with `status` (the API reads live sessions; bounded).
async fn await_status(c: &Cloud, pk: &str, dn: &str, status: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, d) = c
            .api(Method::GET, &format!("/devices/{pk}/{dn}"), None)
            .await
            .unwrap();
        if d["status"] == status {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pk}/{dn} never became {status}: {d}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn kill_9_loses_no_registry_data_and_marks_devices_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path(), &[]).unwrap();
    assert!(
        cloud.banner.iter().any(|l| l.starts_with("Admin token")),
        "token printed at first start"
    );
    let (pk, secrets) = product_and_devices(&cloud, &["pump-001", "pump-002"]).await;
    let _dev = connect_device(cloud.mqtt, &pk, "pump-001", &secrets[0])
        .await
        .expect("connected");
    await_status(&cloud, &pk, "pump-001", "online").await;
    // Every acknowledged API write must survive: the 201 above was the acknowledgement.
    let token = cloud.token.clone();
    cloud.kill9().unwrap();

    let cloud = Cloud::start(dir.path(), &[]).unwrap();
    assert_eq!(cloud.token, token, "the admin token persists");
    assert!(
        !cloud.banner.iter().any(|l| l.contains(&token)),
        "and is printed only once"
    );
    assert!(
        cloud
            .banner
            .iter()
            .any(|l| l.starts_with("Admin token in ") && l.contains("admin-token")),
        "after a restart the banner says where the token is: {:?}",
        cloud.banner
    );
    let (s, d) = cloud
        .api(
            Method::GET,
            &format!("/devices/{pk}/pump-002/credentials"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(d["device_secret"], secrets[1].as_str());
    let (_, d) = cloud
        .api(Method::GET, &format!("/devices/{pk}/pump-001"), None)
        .await
        .unwrap();
    assert_eq!(d["status"], "offline");
    let (_, h) = cloud
        .api(
            Method::GET,
            &format!("/devices/{pk}/pump-001/presence"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(h["events"][0]["reason"], "server restart", "{h}");
    // The online record was committed before the device got its CONNACK.
    assert_eq!(h["events"][1]["reason"], "connected", "{h}");
    // And devices reconnect with the same credentials.
    assert!(connect_device(cloud.mqtt, &pk, "pump-001", &secrets[0])
        .await
        .is_some());
}

#[tokio::test]
async fn sigterm_disconnects_devices_records_why_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path(), &[]).unwrap();
    let (pk, secrets) = product_and_devices(&cloud, &["fan-0001"]).await;
    let mut dev = connect_device(cloud.mqtt, &pk, "fan-0001", &secrets[0])
        .await
        .expect("connected");
    await_status(&cloud, &pk, "fan-0001", "online").await;
    cloud.signal("TERM").unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut dev, &mut buf))
        .await
        .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "device connection closed by shutdown"
    );
    assert!(cloud.wait_exit().unwrap(), "clean exit status");

    let cloud = Cloud::start(dir.path(), &[]).unwrap();
    let (_, h) = cloud
        .api(
            Method::GET,
            &format!("/devices/{pk}/fan-0001/presence"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(h["events"][0]["reason"], "server shutdown", "{h}");
}

#[tokio::test]
async fn a_storm_of_2000_connects_is_limited_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cloud.toml");
    std::fs::write(
        &config,
        "[mqtt]\nconnects_per_second = 200\nconnect_burst = 200\n",
    )
    .unwrap();
    let cloud = Cloud::start(dir.path(), &["--config", config.to_str().unwrap()]).unwrap();
    let names: Vec<String> = (0..100).map(|i| format!("storm-{i:04}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (pk, secrets) = product_and_devices(&cloud, &refs).await;
    let rss_before = cloud.rss_kib().unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..2000usize {
        let (pk, dn, secret, addr) = (
            pk.clone(),
            names[i % 100].clone(),
            secrets[i % 100].clone(),
            cloud.mqtt,
        );
        tasks.spawn(async move { connect_device(addr, &pk, &dn, &secret).await });
    }
    let mut held = Vec::new();
    let mut refused = 0;
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Some(s) => held.push(s),
            None => refused += 1,
        }
    }
    let rss_after = cloud.rss_kib().unwrap();
    assert!(
        refused > 0,
        "a 2,000-connect burst against 200/s must be limited"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", cloud.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let limited: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ironlink_mqtt_rate_limited_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(limited > 0, "{metrics}");
    // Bounded memory: the storm may not grow the server by more than 64 MiB.
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // Still serving: API and a fresh device session after the bucket refills.
    let (s, _) = cloud.api(Method::GET, "/products", None).await.unwrap();
    assert_eq!(s, 200);
    drop(held);
    let deadline = std::time::Instant::now() + WAIT;
    while connect_device(cloud.mqtt, &pk, "storm-0000", &secrets[0])
        .await
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "server never accepted a device again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Property posts acknowledged with PUBACK (QoS 1) are committed first: a kill -9 right after
/// the last acknowledgement loses none of them.
#[tokio::test]
async fn kill_9_keeps_every_acknowledged_property_post() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path(), &[]).unwrap();
    let (pk, secrets) = product_and_devices(&cloud, &["meter-01"]).await;
    let mut dev = connect_device(cloud.mqtt, &pk, "meter-01", &secrets[0])
        .await
        .expect("connected");
    let topic = format!("/sys/{pk}/meter-01/thing/event/property/post");
    const N: u16 = 200;
    let mut out = bytes::BytesMut::new();
    for i in 1..=N {
        let body = json!({"id": i.to_string(), "params": {"energy": {"value": i, "time": 1_000 + i64::from(i)}}});
        let mut p = rumqttc::mqttbytes::v4::Publish::new(
            &topic,
            rumqttc::QoS::AtLeastOnce,
            body.to_string().into_bytes(),
        );
        p.pkid = i;
        p.write(&mut out).unwrap();
    }
    dev.write_all(&out).await.unwrap();
    // Every PUBACK (4 bytes each; the device subscribed to nothing, so nothing else comes).
    let mut acks = vec![0u8; 4 * usize::from(N)];
    tokio::time::timeout(WAIT, dev.read_exact(&mut acks))
        .await
        .expect("all PUBACKs in time")
        .unwrap();
    assert!(acks.chunks(4).all(|a| a[0] == 0x40));
    cloud.kill9().unwrap();

    let cloud = Cloud::start(dir.path(), &[]).unwrap();
    let (s, v) = cloud
        .api(
            Method::GET,
            &format!("/devices/{pk}/meter-01/properties/energy/history?limit=1000"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(v["points"].as_array().unwrap().len(), usize::from(N), "{v}");
    let (_, v) = cloud
        .api(
            Method::GET,
            &format!("/devices/{pk}/meter-01/properties"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(v["properties"][0]["value"], N);
}
