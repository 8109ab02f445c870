//! A small benchmark run through the binary completes and writes its JSON.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn a_small_fanout_bench_writes_its_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("fanout.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ironlink-sim"))
        .args([
            "bench",
            "fanout",
            "--devices",
            "20",
            "--rounds",
            "2",
            "--qos",
            "1",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v[0]["target"], "ironlink");
    assert_eq!(v[0]["devices"], 20);
    assert_eq!(v[0]["missing"], 0, "{v}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("deliveries/s"));
}
