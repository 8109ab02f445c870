//! The quickstart comes up, its data is visible through the API (meters through the edge
//! gateway, direct sensors), a cloud write reaches a meter, and it shuts down cleanly; a second
//! start reuses what the first created.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_sim::quickstart::{guide, start, Quickstart};
use serde_json::Value;
use std::time::{Duration, Instant};

async fn get(p: &ironlink_sim::quickstart::Plant, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}{path}", p.api))
        .bearer_auth(&p.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn has(v: &Value, id: &str) -> bool {
    v["properties"]
        .as_array()
        .is_some_and(|a| a.iter().any(|p| p["identifier"] == id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_produces_data_within_30_s_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let o = Quickstart {
        data_dir: dir.path().join("qs"),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        mqtt_listen: "127.0.0.1:0".parse().unwrap(),
        edge_status_listen: "127.0.0.1:0".parse().unwrap(),
        meters: 2,
        sensors: 2,
    };
    let running = start(&o).await.unwrap();
    let p = running.plant.clone();
    let text = guide(&p, &o.data_dir);
    assert!(
        text.contains(&p.meter_product) && text.contains(&p.token),
        "{text}"
    );
    // A generous bound for an eventual state, not a performance assertion.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = get(
            &p,
            &format!("/devices/{}/meter-01/properties", p.meter_product),
        )
        .await;
        let s = get(
            &p,
            &format!("/devices/{}/sensor-01/properties", p.sensor_product),
        )
        .await;
        if has(&m, "Power") && has(&m, "Relay") && has(&s, "temperature") {
            break;
        }
        assert!(Instant::now() < deadline, "no data after 30 s: {m} {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The service the guide suggests trips the relay through the edge (a Modbus write).
    let v: Value = reqwest::Client::new()
        .post(format!(
            "{}/devices/{}/meter-02/services/Trip",
            p.api, p.meter_product
        ))
        .bearer_auth(&p.token)
        .json(&serde_json::json!({"params": {}, "timeout_ms": 10000}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = get(
            &p,
            &format!("/devices/{}/meter-02/service-calls/{id}", p.meter_product),
        )
        .await;
        if c["status"] == "succeeded" {
            break;
        }
        assert!(c["status"] == "pending", "{c}");
        assert!(Instant::now() < deadline, "call not answered: {c}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::timeout(Duration::from_secs(30), running.shutdown())
        .await
        .expect("clean shutdown");

    // Again, on the same data directory: same products, no duplicates.
    let again = start(&o).await.unwrap();
    assert_eq!(again.plant.meter_product, p.meter_product);
    let products = get(&again.plant, "/products").await;
    assert_eq!(
        products["products"].as_array().map(Vec::len),
        Some(3),
        "{products}"
    );
    tokio::time::timeout(Duration::from_secs(30), again.shutdown())
        .await
        .expect("clean shutdown");
}
