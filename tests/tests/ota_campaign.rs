//! An OTA campaign through a kill -9 of the cloud: every upgrade a device was acknowledged
//! for stays succeeded, every other device is notified again after the restart, and no
//! device ever gets two notices for the same attempt.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::BytesMut;
use ironlink_tests::*;
use reqwest::Method;
use rumqttc::mqttbytes::v4;
use rumqttc::QoS;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
struct Seen {
    /// (device, attempt) of every notice received, with repeats.
    notices: Vec<(String, i64)>,
    /// Devices whose report of the new version was acknowledged (PUBACK).
    acked: HashSet<String>,
}

fn encode(p: v4::Packet) -> BytesMut {
    let mut b = BytesMut::new();
    match p {
        v4::Packet::Subscribe(s) => s.write(&mut b),
        v4::Packet::Publish(p) => p.write(&mut b),
        v4::Packet::PubAck(a) => a.write(&mut b),
        _ => unreachable!("not sent by this device"),
    }
    .unwrap();
    b
}

/// A device that reports `version`, then installs whatever it is offered: it acks the notice,
/// takes 400 ms, reports the offered version (QoS 1) and records the acknowledgement. Ends
/// when the cloud goes away.
async fn device(
    addr: SocketAddr,
    pk: String,
    dn: String,
    secret: String,
    version: String,
    seen: Arc<Mutex<Seen>>,
) {
    let Some(mut s) = connect_device(addr, &pk, &dn, &secret).await else {
        return;
    };
    let mut sub = v4::Subscribe::new(format!("/ota/device/upgrade/{pk}/{dn}"), QoS::AtLeastOnce);
    sub.pkid = 1;
    let inform = |v: &str, pkid: u16| {
        let mut p = v4::Publish::new(
            format!("/ota/device/inform/{pk}/{dn}"),
            QoS::AtLeastOnce,
            json!({"id": "1", "params": {"version": v}}).to_string(),
        );
        p.pkid = pkid;
        encode(v4::Packet::Publish(p))
    };
    let mut out = encode(v4::Packet::Subscribe(sub));
    out.extend_from_slice(&inform(&version, 2));
    if s.write_all(&out).await.is_err() {
        return;
    }
    let mut buf = BytesMut::new();
    let mut next_pkid = 10u16;
    let mut upgrade_pkids = HashSet::new();
    loop {
        match v4::Packet::read(&mut buf, 1 << 20) {
            Ok(v4::Packet::Publish(p)) => {
                let notice: Value = serde_json::from_slice(&p.payload).unwrap();
                let attempt = notice["data"]["extData"]["attempt"].as_i64().unwrap();
                let offered = notice["data"]["version"].as_str().unwrap().to_owned();
                seen.lock().unwrap().notices.push((dn.clone(), attempt));
                // Installing takes a while (the device's work, not a wait for an event): a
                // kill -9 finds devices notified that have not reported yet.
                tokio::time::sleep(std::time::Duration::from_millis(400)).await;
                let mut reply = encode(v4::Packet::PubAck(v4::PubAck::new(p.pkid)));
                next_pkid += 1;
                upgrade_pkids.insert(next_pkid);
                reply.extend_from_slice(&inform(&offered, next_pkid));
                if s.write_all(&reply).await.is_err() {
                    return;
                }
            }
            Ok(v4::Packet::PubAck(a)) if upgrade_pkids.contains(&a.pkid) => {
                seen.lock().unwrap().acked.insert(dn.clone());
            }
            Ok(_) => {}
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                match s.read_buf(&mut buf).await {
                    Ok(n) if n > 0 => {}
                    _ => return,
                }
            }
            Err(e) => panic!("{dn}: malformed packet from the cloud: {e:?}"),
        }
    }
}

async fn campaign(cloud: &Cloud, id: &str) -> Value {
    let (s, v) = cloud
        .api(Method::GET, &format!("/ota/campaigns/{id}"), None)
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    v
}

#[tokio::test]
async fn kill_9_mid_campaign_resumes_without_repeating_or_forgetting_a_device() {
    const DEVICES: usize = 120;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cloud.toml");
    std::fs::write(&config, "[ota]\ntick = \"20ms\"\n").unwrap();
    let data = dir.path().join("data");
    let cfg = config.to_str().unwrap();
    let cloud = Cloud::start(&data, &["--config", cfg]).unwrap();
    let pk = cloud
        .create_product(json!({"name": "fleet"}))
        .await
        .unwrap();
    let devices = cloud.create_devices(&pk, DEVICES).await.unwrap();
    let resp = reqwest::Client::new()
        .post(format!(
            "http://{}/api/v1/ota/packages?product_key={pk}&version=2.0",
            cloud.http
        ))
        .bearer_auth(&cloud.token)
        .body(vec![7u8; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let pkg: Value = resp.json().await.unwrap();

    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut tasks = Vec::new();
    for (dn, secret) in &devices {
        tasks.push(tokio::spawn(device(
            cloud.mqtt,
            pk.clone(),
            dn.clone(),
            secret.clone(),
            "1.0".into(),
            seen.clone(),
        )));
    }
    // Every device online and on 1.0 before the campaign starts.
    get_until(
        &cloud,
        &format!("/products/{pk}/devices?status=online&page_size=1"),
        "all online",
        |v| v["total"] == DEVICES,
    )
    .await;
    let (s, created) = cloud
        .api(
            Method::POST,
            "/ota/campaigns",
            Some(json!({"name": "crash", "package_id": pkg["id"], "policy": {"pushes_per_minute": 3000, "retries": 0}})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{created}");
    assert_eq!(created["jobs"], DEVICES);
    let id = created["id"].as_str().unwrap().to_owned();

    // Kill it once a third of the fleet has upgraded.
    get_until(
        &cloud,
        &format!("/ota/campaigns/{id}"),
        "a third succeeded",
        |v| v["states"]["succeeded"].as_u64().unwrap_or(0) >= (DEVICES / 3) as u64,
    )
    .await;
    cloud.kill9().unwrap();
    for t in tasks.drain(..) {
        t.await.unwrap();
    }
    let before = std::mem::take(&mut *seen.lock().unwrap());
    assert!(
        before.acked.len() >= DEVICES / 3 && before.acked.len() < DEVICES,
        "{}",
        before.acked.len()
    );

    let started = std::time::Instant::now();
    let cloud = Cloud::start(&data, &["--config", cfg]).unwrap();
    let v = campaign(&cloud, &id).await;
    assert_eq!(v["state"], "running", "{v}");
    let succeeded_after_restart = v["states"]["succeeded"].as_u64().unwrap();
    assert!(
        succeeded_after_restart >= before.acked.len() as u64,
        "every acknowledged upgrade survives: {succeeded_after_restart} < {}",
        before.acked.len()
    );
    // Devices come back, reporting what they run now.
    for (dn, secret) in &devices {
        let version = if before.acked.contains(dn) {
            "2.0"
        } else {
            "1.0"
        };
        tasks.push(tokio::spawn(device(
            cloud.mqtt,
            pk.clone(),
            dn.clone(),
            secret.clone(),
            version.into(),
            seen.clone(),
        )));
    }
    let v = get_until(&cloud, &format!("/ota/campaigns/{id}"), "finished", |v| {
        v["state"] == "finished"
    })
    .await;
    eprintln!(
        "resumed and finished {:.1} s after the restart",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(v["states"]["succeeded"], DEVICES, "{v}");
    let after = std::mem::take(&mut *seen.lock().unwrap());
    cloud.kill9().unwrap();

    // No device got two notices for one attempt, across both lives of the cloud.
    let mut count: HashMap<(String, i64), usize> = HashMap::new();
    for n in before.notices.iter().chain(&after.notices) {
        *count.entry(n.clone()).or_default() += 1;
    }
    let repeated: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "notices repeated for the same attempt: {repeated:?}"
    );
    // Devices acknowledged as upgraded before the kill were left alone after it; every other
    // device was notified after it (none forgotten).
    let notified_after: HashSet<&String> = after.notices.iter().map(|(d, _)| d).collect();
    for (dn, _) in &devices {
        if before.acked.contains(dn) {
            assert!(
                !notified_after.contains(dn),
                "{dn} upgraded before the kill, notified again"
            );
        } else if !notified_after.contains(dn) {
            // Its report may have been stored without its PUBACK reaching it: then the cloud
            // counts it as succeeded and need not notify it again.
            let (_, d) = cloud_device_job(&data, &pk, dn).await;
            assert_eq!(
                d, "succeeded",
                "{dn} was neither upgraded nor notified again"
            );
        }
    }
    for t in tasks {
        t.abort();
    }
}

/// A device's job state, read from a fresh cloud on the same data dir.
async fn cloud_device_job(data: &std::path::Path, pk: &str, dn: &str) -> (u16, String) {
    let cloud = Cloud::start(data, &[]).unwrap();
    let (s, v) = cloud
        .api(Method::GET, &format!("/devices/{pk}/{dn}/ota"), None)
        .await
        .unwrap();
    let state = v["jobs"][0]["state"].as_str().unwrap_or("none").to_owned();
    cloud.kill9().unwrap();
    (s, state)
}
