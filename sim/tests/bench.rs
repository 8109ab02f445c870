//! A small benchmark run through the binary completes and writes its JSON.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn a_small_fanout_bench_writes_its_json() {
    let (v, table) = bench_report(&[
        "fanout",
        "--devices",
        "20",
        "--rounds",
        "2",
        "--qos",
        "1",
        "--vs",
        "mosquitto",
        "--repeat",
        "2",
    ]);
    assert_eq!(v["bench"], "fanout");
    assert_eq!(v["params"]["devices"], 20);
    let t = &v["targets"][0];
    assert_eq!(t["target"], "ironlink");
    assert_eq!(t["expected"], 40);
    assert_eq!(t["received"], 40, "{v}");
    assert_eq!(t["lost"], 0, "{v}");
    assert_eq!(t["duplicated"], 0, "{v}");
    assert_eq!(t["connections"], 21);
    assert!(t["server_rss_kib"].as_u64().unwrap() > 0, "{v}");
    let m = &v["targets"][1];
    assert_eq!(m["target"], "mosquitto");
    assert_eq!(m["received"], 40, "{v}");
    assert_eq!(v["ratios"][0]["baseline"], "mosquitto");
    assert!(v["ratios"][0]["per_sec"].as_f64().unwrap() > 0.0, "{v}");
    assert!(table.contains("| deliveries/s |"), "{table}");
    assert!(table.contains("median of 2 runs"), "{table}");
}

/// Runs `ironlink-sim bench ARGS --json FILE`, checks it succeeded, and returns the JSON
/// report and the table it printed.
fn bench_report(args: &[&str]) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ironlink-sim"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Simulated JT/T 808 terminals (this crate's) -> the edge process -> the cloud process: every
/// report acknowledged and delivered, and the report written.
#[test]
fn a_small_vehicles_bench_delivers_every_report() {
    let (v, _) = bench_report(&[
        "vehicles",
        "--terminals",
        "20",
        "--interval-s",
        "1",
        "--seconds",
        "3",
    ]);
    let t = &v["targets"][0];
    assert_eq!(t["expected"], 60, "{v}");
    assert_eq!(t["received"], 60, "{v}");
    assert_eq!(t["connections"], 20);
    assert!(
        v["details"]["edge_rss_per_terminal_bytes"]
            .as_f64()
            .is_some(),
        "{v}"
    );
}

/// Simulated packet forwarders and ABP nodes -> the edge's LoRaWAN server -> the cloud: every
/// uplink accepted and delivered.
#[test]
fn a_small_lora_bench_accepts_every_uplink() {
    let (v, _) = bench_report(&[
        "lora",
        "--nodes",
        "20",
        "--forwarders",
        "2",
        "--interval-s",
        "1",
        "--seconds",
        "2",
    ]);
    let t = &v["targets"][0];
    assert_eq!(t["expected"], 40, "{v}");
    assert_eq!(t["received"], 40, "{v}");
}

/// NB-IoT devices over CoAP -> the edge -> the cloud: every post answered and delivered.
#[test]
fn a_small_coap_bench_answers_every_post() {
    let (v, _) = bench_report(&[
        "coap",
        "--devices",
        "20",
        "--interval-s",
        "1",
        "--seconds",
        "2",
    ]);
    let t = &v["targets"][0];
    assert_eq!(t["expected"], 40, "{v}");
    assert_eq!(t["received"], 40, "{v}");
}
