//! OTA end to end on an in-process server: a package uploaded and signed by the cloud, a
//! campaign with a canary stage, devices on raw MQTT speaking Alink's OTA topics, ranged
//! downloads with per-device tokens, success by reported version, failures, pull through
//! `firmware/get`, and a device that comes online later. Runs on SQLite, and on PostgreSQL
//! when IRONLINK_TEST_POSTGRES_URL is set.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{device_v4, start, Raw, TestServer, WAIT};
use rumqttc::mqttbytes::v4;
use rumqttc::QoS;
use serde_json::{json, Value};
use sha2::Digest;
use std::time::Duration;

fn image(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// A device on raw MQTT that keeps what arrives while it waits for something else.
struct Dev {
    c: Raw,
    early: std::collections::VecDeque<v4::Publish>,
}

impl Dev {
    /// The next PUBLISH (QoS 1 is acknowledged), kept ones first.
    async fn publish(&mut self) -> v4::Publish {
        if let Some(p) = self.early.pop_front() {
            return p;
        }
        loop {
            match self.c.next_v4().await {
                Some(v4::Packet::Publish(p)) => {
                    self.ack(&p).await;
                    return p;
                }
                Some(_) => continue,
                None => panic!("closed while waiting for a message"),
            }
        }
    }

    async fn ack(&mut self, p: &v4::Publish) {
        if p.qos == QoS::AtLeastOnce {
            let mut b = bytes::BytesMut::new();
            v4::PubAck::new(p.pkid).write(&mut b).unwrap();
            self.c.send(&b).await;
        }
    }
}

/// The next OTA notice for this device (other messages are skipped).
async fn notice(d: &mut Dev) -> Value {
    loop {
        let p = d.publish().await;
        if p.topic.starts_with("/ota/device/upgrade/") {
            return serde_json::from_slice(&p.payload).unwrap();
        }
    }
}

/// Publishes at QoS 1 and waits for the acknowledgement (so the server has handled it);
/// messages that arrive meanwhile are kept.
async fn send(d: &mut Dev, topic: &str, body: Value, pkid: u16) {
    d.c.publish_v4(topic, body.to_string().as_bytes(), QoS::AtLeastOnce, pkid)
        .await;
    loop {
        match d.c.next_v4().await {
            Some(v4::Packet::PubAck(a)) if a.pkid == pkid => return,
            Some(v4::Packet::Publish(p)) => {
                d.ack(&p).await;
                d.early.push_back(p);
            }
            Some(_) => continue,
            None => panic!("closed before PUBACK"),
        }
    }
}

/// Publishes a request and returns the reply on `{topic}_reply`.
async fn request(d: &mut Dev, topic: &str, body: Value, pkid: u16) -> Value {
    send(d, topic, body, pkid).await;
    let want = format!("{topic}_reply");
    loop {
        let p = d.publish().await;
        if p.topic == want {
            return serde_json::from_slice(&p.payload).unwrap();
        }
    }
}

/// Polls the campaign until `ok` holds (bounded by WAIT).
async fn until(srv: &TestServer, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (s, v) = srv.get(&format!("/ota/campaigns/{id}")).await;
        assert_eq!(s, 200, "{v}");
        if ok(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: campaign stays {v}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn online(srv: &TestServer, pk: &str, dn: &str, secret: &str, version: &str) -> Dev {
    let mut c = device_v4(srv, pk, dn, secret).await;
    c.subscribe_v4(&format!("/ota/device/upgrade/{pk}/{dn}"), 1)
        .await;
    c.subscribe_v4(&format!("/sys/{pk}/{dn}/thing/ota/firmware/get_reply"), 2)
        .await;
    let mut c = Dev {
        c,
        early: Default::default(),
    };
    send(
        &mut c,
        &format!("/ota/device/inform/{pk}/{dn}"),
        json!({"id": "1", "params": {"version": version}}),
        3,
    )
    .await;
    c
}

async fn get_range(url: &str, range: Option<&str>) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut r = reqwest::Client::new().get(url);
    if let Some(range) = range {
        r = r.header("Range", range);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

async fn campaign_end_to_end(database_url: Option<String>) {
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("ota.key");
    let public = ironlink_cloud::ota::sign::keygen(&key_file).unwrap();
    let srv = start(|c| {
        c.database_url = database_url;
        c.ota.signing_key = Some(key_file.clone());
        c.ota.tick = Duration::from_millis(20);
    })
    .await;
    let (pk, _) = srv.product(false).await;
    let mut secrets = Vec::new();
    for dn in ["lamp-1", "lamp-2", "lamp-3", "lamp-4"] {
        secrets.push(srv.device(&pk, dn).await);
    }

    // Upload: streamed, digested, signed with the configured key.
    let img = image(300_000);
    let resp = srv
        .http
        .post(format!(
            "{}/ota/packages?product_key={pk}&version=2.0.0&src_versions=1.0.0&file_name=lamp.bin",
            srv.base
        ))
        .bearer_auth("test-token")
        .body(img.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let pkg: Value = resp.json().await.unwrap();
    assert_eq!(pkg["size"], 300_000);
    assert_eq!(pkg["sha256"], hex::encode(sha2::Sha256::digest(&img)));
    assert_eq!(pkg["module"], "default");
    assert_eq!(pkg["src_versions"], json!(["1.0.0"]));
    let mut pubkey = [0u8; 32];
    hex::decode_to_slice(&public, &mut pubkey).unwrap();
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&pubkey).unwrap();
    let sha512: [u8; 64] = sha2::Sha512::digest(&img).into();
    assert!(ironlink_cloud::ota::sign::verify(
        &vk,
        &sha512,
        pkg["ed25519"].as_str().unwrap()
    ));
    // The same version again is a conflict; an empty image is refused.
    let again = srv
        .http
        .post(format!(
            "{}/ota/packages?product_key={pk}&version=2.0.0",
            srv.base
        ))
        .bearer_auth("test-token")
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 409);
    let empty = srv
        .http
        .post(format!(
            "{}/ota/packages?product_key={pk}&version=3.0.0",
            srv.base
        ))
        .bearer_auth("test-token")
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status().as_u16(), 400);

    // Three devices online on 1.0.0; d4 stays offline for now.
    let mut d1 = online(&srv, &pk, "lamp-1", &secrets[0], "1.0.0").await;
    let mut d2 = online(&srv, &pk, "lamp-2", &secrets[1], "1.0.0").await;
    let mut d3 = online(&srv, &pk, "lamp-3", &secrets[2], "1.0.0").await;

    let (s, created) = srv
        .post(
            "/ota/campaigns",
            json!({"name": "lamp 2.0", "package_id": pkg["id"],
                   "policy": {"pushes_per_minute": 6000, "canary": {"devices": ["lamp-1"]}, "retries": 0, "run_for": "1h"}}),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    // lamp-4 never reported a version: the package's source versions leave it out (for now).
    assert_eq!(created["jobs"], 3);
    assert_eq!(created["wrong_source"], 1);
    assert_eq!(created["canaries"], 1);
    let id = created["id"].as_str().unwrap().to_owned();

    // Canary stage: only lamp-1 is notified.
    let n1 = notice(&mut d1).await;
    assert_eq!(n1["code"], "1000");
    let data = &n1["data"];
    assert_eq!(data["version"], "2.0.0");
    assert_eq!(data["size"], 300_000);
    assert_eq!(data["signMethod"], "Md5");
    assert_eq!(data["sign"], hex::encode(md5::Md5::digest(&img)));
    assert_eq!(data["ed25519"], pkg["ed25519"]);
    let url = data["url"].as_str().unwrap().to_owned();
    let v = until(&srv, &id, "lamp-1 notified", |v| {
        v["states"]["notified"] == 1
    })
    .await;
    assert_eq!(v["stage"], "canary");
    assert_eq!(v["states"]["queued"], 2);

    // A ranged download in two pieces, as a resumed one would be.
    let (st, h, first) = get_range(&url, Some("bytes=0-99999")).await;
    assert_eq!(st, 206);
    assert_eq!(h["content-range"], "bytes 0-99999/300000");
    let (st, _, rest) = get_range(&url, Some("bytes=100000-")).await;
    assert_eq!(st, 206);
    assert_eq!([first, rest].concat(), img);
    let (st, _, whole) = get_range(&url, None).await;
    assert_eq!((st, whole.len()), (200, img.len()));
    let (st, _, _) = get_range(&url, Some("bytes=300000-")).await;
    assert_eq!(st, 416);
    until(&srv, &id, "lamp-1 downloading", |v| {
        v["states"]["downloading"] == 1
    })
    .await;
    // The token is this device's: another device's name under it is refused.
    let token = url.rsplit('/').next().unwrap();
    let (claims, mac) = token.split_once('.').unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let text = String::from_utf8(b64.decode(claims).unwrap()).unwrap();
    let forged = format!("{}.{mac}", b64.encode(text.replace(":lamp-1", ":lamp-2")));
    let (st, _, _) = get_range(&url.replace(token, &forged), None).await;
    assert_eq!(st, 403);

    let progress = format!("/ota/device/progress/{pk}/lamp-1");
    send(
        &mut d1,
        &progress,
        json!({"id": "2", "params": {"step": "50", "desc": "downloading"}}),
        4,
    )
    .await;
    send(
        &mut d1,
        &progress,
        json!({"id": "3", "params": {"step": 100, "desc": "flashing"}}),
        5,
    )
    .await;
    until(&srv, &id, "lamp-1 flashing", |v| {
        v["states"]["flashing"] == 1
    })
    .await;
    send(
        &mut d1,
        &format!("/ota/device/inform/{pk}/lamp-1"),
        json!({"id": "4", "params": {"version": "2.0.0"}}),
        6,
    )
    .await;

    // Canary succeeded: the others are notified.
    let v = until(&srv, &id, "promoted", |v| v["stage"] == "main").await;
    assert_eq!(v["states"]["succeeded"], 1);
    // Once the job is over, its link stops serving.
    let (st, _, _) = get_range(&url, None).await;
    assert_eq!(st, 403);
    let n3 = notice(&mut d3).await;
    assert_eq!(n3["data"]["version"], "2.0.0");
    let n2 = notice(&mut d2).await;
    // d2 also pulls: the same upgrade, with a link of its own.
    let pulled = request(
        &mut d2,
        &format!("/sys/{pk}/lamp-2/thing/ota/firmware/get"),
        json!({"id": "77", "version": "1.0", "params": {"module": "default"}, "method": "thing.ota.firmware.get"}),
        7,
    )
    .await;
    assert_eq!(pulled["id"], "77");
    assert_eq!(pulled["code"], 200);
    assert_eq!(pulled["data"]["version"], "2.0.0");
    assert_eq!(pulled["data"]["md5"], n2["data"]["md5"]);
    // d3: the image does not verify (-3): failed for good, with the reason.
    send(
        &mut d3,
        &format!("/ota/device/progress/{pk}/lamp-3"),
        json!({"id": "5", "params": {"step": "-3", "desc": "digest mismatch"}}),
        8,
    )
    .await;
    send(
        &mut d2,
        &format!("/ota/device/inform/{pk}/lamp-2"),
        json!({"id": "6", "params": {"version": "2.0.0"}}),
        9,
    )
    .await;
    let v = until(&srv, &id, "lamp-2 and lamp-3 done", |v| {
        v["states"]["succeeded"] == 2 && v["states"]["failed"] == 1
    })
    .await;
    assert_eq!(v["state"], "running", "it runs for an hour: {v}");
    assert!(
        v["failures"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("verification failed (-3): digest mismatch"),
        "{v}"
    );

    // lamp-4 comes online later on a source version: it joins, is notified and succeeds.
    let mut d4 = online(&srv, &pk, "lamp-4", &secrets[3], "1.0.0").await;
    let n4 = notice(&mut d4).await;
    assert_eq!(n4["data"]["version"], "2.0.0");
    send(
        &mut d4,
        &format!("/ota/device/inform/{pk}/lamp-4"),
        json!({"id": "7", "params": {"version": "2.0.0"}}),
        10,
    )
    .await;
    until(&srv, &id, "lamp-4 done", |v| v["states"]["succeeded"] == 3).await;
    // Cancelled through the API; nothing is open any more.
    let (s, v) = srv
        .post(&format!("/ota/campaigns/{id}/cancel"), json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "cancelled");
    let (s, _) = srv
        .post(&format!("/ota/campaigns/{id}/resume"), json!({}))
        .await;
    assert_eq!(s, 409);

    // Per-device state and history.
    let (s, d) = srv.get(&format!("/devices/{pk}/lamp-3/ota")).await;
    assert_eq!(s, 200);
    assert_eq!(d["modules"][0]["version"], "1.0.0");
    assert_eq!(d["jobs"][0]["state"], "failed");
    let states: Vec<&str> = d["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["failed", "notified"], "newest first");
    // The package is in use: not deleted.
    let (s, _) = srv
        .call(
            reqwest::Method::DELETE,
            &format!("/ota/packages/{}", pkg["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s, 409);
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
        metrics.contains("ironlink_ota_succeeded_total 3"),
        "{metrics}"
    );
    assert!(metrics.contains("ironlink_ota_failed_total 1"));
    srv.running.shutdown().await;
}

#[tokio::test]
async fn a_campaign_runs_canary_first_and_tracks_every_device_sqlite() {
    campaign_end_to_end(None).await;
}

#[tokio::test]
async fn a_campaign_runs_canary_first_and_tracks_every_device_postgres() {
    let Some(db) = common::postgres_database("ota").await else {
        return;
    };
    campaign_end_to_end(Some(db.url.clone())).await;
    db.drop_db().await;
}

#[tokio::test]
async fn silent_devices_time_out_and_are_retried_then_failed() {
    let srv = start(|c| c.ota.tick = Duration::from_millis(20)).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "quiet-1").await;
    let resp = srv
        .http
        .post(format!(
            "{}/ota/packages?product_key={pk}&version=9",
            srv.base
        ))
        .bearer_auth("test-token")
        .body(image(1000))
        .send()
        .await
        .unwrap();
    let pkg: Value = resp.json().await.unwrap();
    assert!(
        pkg["ed25519"].is_null(),
        "no key configured, none given: unsigned"
    );
    let mut c = online(&srv, &pk, "quiet-1", &secret, "1").await;
    let (s, created) = srv
        .post(
            "/ota/campaigns",
            json!({"name": "t", "package_id": pkg["id"], "policy": {"timeout": "1s", "retries": 1, "token_ttl": "1s"}}),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let first = notice(&mut c).await;
    let second = notice(&mut c).await;
    assert_eq!(first["data"]["extData"]["attempt"], 1);
    assert_eq!(second["data"]["extData"]["attempt"], 2);
    let v = until(&srv, id, "failed after its retry", |v| {
        v["state"] == "finished"
    })
    .await;
    assert_eq!(v["states"]["failed"], 1);
    assert!(
        v["failures"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("timed out"),
        "{v}"
    );
    srv.running.shutdown().await;
}

#[tokio::test]
async fn bad_reports_and_requests_are_refused_without_harm() {
    let srv = start(|c| c.ota.tick = Duration::from_millis(20)).await;
    let (pk, _) = srv.product(false).await;
    let secret = srv.device(&pk, "dev-d").await;
    let mut c = online(&srv, &pk, "dev-d", &secret, "1").await;
    for junk in [
        json!("not an object"),
        json!({"params": {"version": 3}}),
        json!({"params": {"version": "a b"}}),
        json!({"params": {"version": "1", "module": "x/y"}}),
    ] {
        send(&mut c, &format!("/ota/device/inform/{pk}/dev-d"), junk, 11).await;
    }
    for junk in [
        json!({"params": {"step": "x"}}),
        json!({"params": {"step": 101}}),
    ] {
        send(
            &mut c,
            &format!("/ota/device/progress/{pk}/dev-d"),
            junk,
            12,
        )
        .await;
    }
    // Nothing pending: firmware/get answers with empty data.
    let r = request(
        &mut c,
        &format!("/sys/{pk}/dev-d/thing/ota/firmware/get"),
        json!({"id": "1", "params": {}}),
        13,
    )
    .await;
    assert_eq!(r["data"], json!({}));
    // The session survived all of it and its version is still the good one.
    let (_, d) = srv.get(&format!("/devices/{pk}/dev-d/ota")).await;
    assert_eq!(d["modules"][0]["version"], "1");
    // API refusals name what was wrong.
    let (s, v) = srv
        .post(
            "/ota/campaigns",
            json!({"name": "x", "package_id": "pkg-none"}),
        )
        .await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = srv
        .post(
            "/ota/campaigns",
            json!({"name": "x", "package_id": "p", "policy": {"utc_offset": "8"}}),
        )
        .await;
    assert_eq!(s, 400);
    assert!(v["message"].as_str().unwrap().contains("utc_offset"), "{v}");
    let (s, _) = srv.get("/ota/campaigns/cmp-none").await;
    assert_eq!(s, 404);
    let (st, _, _) = get_range(
        &format!("http://{}/ota/download/garbage", srv.running.http_addr),
        None,
    )
    .await;
    assert_eq!(st, 403);
    // A campaign that would upgrade nobody says why instead of finishing at once.
    let pkg: Value = srv
        .http
        .post(format!(
            "{}/ota/packages?product_key={pk}&version=1",
            srv.base
        ))
        .bearer_auth("test-token")
        .body(image(10))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (s, v) = srv
        .post(
            "/ota/campaigns",
            json!({"name": "x", "package_id": pkg["id"]}),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        v["message"].as_str().unwrap().contains("1 already on 1"),
        "{v}"
    );
    srv.running.shutdown().await;
}
