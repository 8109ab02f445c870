//! Time-series storage through kill -9: devices post while the sealer moves rows into chunks
//! and the archiver moves chunks into Parquet files, each every 20 ms, and the cloud is killed
//! three times at arbitrary moments. Every point whose PUBACK a device received is read back
//! afterwards (from rows, chunks and archive files), none of them twice, and no archive file
//! is left that the database does not name.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_tests::*;
use reqwest::Method;
use rumqttc::mqttbytes::v4;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEVICES: usize = 4;
const BATCH: u16 = 40;

/// Posts batches of QoS 1 property posts (one point each, times `next..`) until the connection
/// ends; records the times whose PUBACK came back.
async fn post_until_killed(
    addr: SocketAddr,
    pk: String,
    dn: String,
    secret: String,
    next: Arc<Mutex<i64>>,
    acked: Arc<Mutex<Vec<i64>>>,
    total: Arc<AtomicUsize>,
) {
    let Some(mut s) = connect_device(addr, &pk, &dn, &secret).await else {
        return;
    };
    let topic = format!("/sys/{pk}/{dn}/thing/event/property/post");
    // Bounded: at most 500 batches per life of the cloud.
    for _ in 0..500 {
        let start = {
            let mut n = next.lock().unwrap();
            let s = *n;
            *n += i64::from(BATCH);
            s
        };
        let mut out = bytes::BytesMut::new();
        for i in 0..BATCH {
            let ts = start + i64::from(i);
            let body = json!({"id": ts.to_string(), "params": {"level": {"value": ts % 1000, "time": ts}}});
            let mut p = v4::Publish::new(&topic, rumqttc::QoS::AtLeastOnce, body.to_string());
            p.pkid = i + 1;
            p.write(&mut out).unwrap();
        }
        if s.write_all(&out).await.is_err() {
            return;
        }
        for _ in 0..BATCH {
            let mut ack = [0u8; 4];
            match tokio::time::timeout(WAIT, s.read_exact(&mut ack)).await {
                Ok(Ok(_)) if ack[0] == 0x40 => {
                    let pkid = u16::from_be_bytes([ack[2], ack[3]]);
                    acked.lock().unwrap().push(start + i64::from(pkid) - 1);
                    total.fetch_add(1, Ordering::Relaxed);
                }
                _ => return,
            }
        }
    }
}

#[tokio::test]
async fn kill_9_while_sealing_and_archiving_loses_and_duplicates_no_acknowledged_point() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cloud.toml");
    std::fs::write(
        &config,
        "[timeseries]\nchunk_points = 16\nseal_every = \"20ms\"\narchive_after = \"1ms\"\narchive_every = \"20ms\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let cfg = config.to_str().unwrap();
    let mut cloud = Cloud::start(&data, &["--config", cfg]).unwrap();
    let pk = cloud
        .create_product(json!({"name": "levels"}))
        .await
        .unwrap();
    let devices = cloud.create_devices(&pk, DEVICES).await.unwrap();
    let acked: Vec<Arc<Mutex<Vec<i64>>>> = (0..DEVICES).map(|_| Arc::default()).collect();
    let next: Vec<Arc<Mutex<i64>>> = (0..DEVICES)
        .map(|_| Arc::new(Mutex::new(1_000_000)))
        .collect();
    let total = Arc::new(AtomicUsize::new(0));
    for life in 1..=3usize {
        let tasks: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(i, (dn, secret))| {
                tokio::spawn(post_until_killed(
                    cloud.mqtt,
                    pk.clone(),
                    dn.clone(),
                    secret.clone(),
                    next[i].clone(),
                    acked[i].clone(),
                    total.clone(),
                ))
            })
            .collect();
        // Kill once this life has acknowledged some points and sealed some chunks: the
        // sealer runs every 20 ms, so the kill lands among seals.
        let target = life * 1500 + life * 137;
        let deadline = std::time::Instant::now() + WAIT * 4;
        while total.load(Ordering::Relaxed) < target {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} points acknowledged in life {life}",
                total.load(Ordering::Relaxed)
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        cloud.kill9().unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        cloud = Cloud::start(&data, &["--config", cfg]).unwrap();
    }
    // A fourth kill among seals and archives; the cloud that checks does not archive, so that
    // what is on disk stays put while it is compared with what is registered.
    cloud.kill9().unwrap();
    let quiet = dir.path().join("quiet.toml");
    std::fs::write(&quiet, "[timeseries]\nchunk_points = 16\n").unwrap();
    let cloud = Cloud::start(&data, &["--config", quiet.to_str().unwrap()]).unwrap();
    let (s, v) = cloud
        .api(Method::POST, "/timeseries/seal", Some(json!({})))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    // Every Parquet file on disk is registered (a file written before a kill but never
    // committed was removed at the restart), and there are some.
    let (s, v) = cloud
        .api(Method::GET, "/timeseries/archive?limit=10000", None)
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let registered: std::collections::HashSet<String> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_owned())
        .collect();
    assert!(!registered.is_empty(), "nothing archived: {v}");
    let archive = data.join("archive");
    let mut on_disk = Vec::new();
    let mut stack = vec![archive.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                on_disk.push(e.path());
            }
        }
    }
    for p in &on_disk {
        let rel = p
            .strip_prefix(&archive)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            registered.contains(&rel),
            "{rel} is on disk but not registered"
        );
    }
    let metrics = reqwest::get(format!("http://{}/metrics", cloud.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("ironlink_timeseries_chunks_written_total"));
    for (i, (dn, _)) in devices.iter().enumerate() {
        let mut seen: HashMap<i64, usize> = HashMap::new();
        let mut cursor = String::new();
        for _ in 0..1000 {
            let (s, v) = cloud
                .api(
                    Method::GET,
                    &format!(
                        "/devices/{pk}/{dn}/properties/level/history?order=asc&limit=10000{cursor}"
                    ),
                    None,
                )
                .await
                .unwrap();
            assert_eq!(s, 200, "{v}");
            assert!(v.get("damaged").is_none(), "{v}");
            for p in v["points"].as_array().unwrap() {
                *seen.entry(p["time"].as_i64().unwrap()).or_default() += 1;
            }
            match v["next"].as_str() {
                Some(n) => cursor = format!("&cursor={n}"),
                None => break,
            }
        }
        let acked = acked[i].lock().unwrap();
        assert!(acked.len() > 100, "{dn}: {} acknowledged", acked.len());
        let missing: Vec<&i64> = acked.iter().filter(|t| !seen.contains_key(t)).collect();
        assert!(
            missing.is_empty(),
            "{dn}: {} acknowledged points lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        let twice: Vec<(&i64, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "{dn}: points stored twice: {:?}",
            &twice[..twice.len().min(5)]
        );
    }
}
