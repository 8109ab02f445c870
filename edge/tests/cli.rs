//! The `ironlink-edge` binary: `check` accepts the shipped example and names the file, line
//! and field of an error. (Building this test also builds the binary that the cross-process
//! tests in `tests/` run.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn check_accepts_the_example_and_locates_errors() {
    let bin = env!("CARGO_BIN_EXE_ironlink-edge");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/edge.example.toml");
    let out = Command::new(bin)
        .args(["check", "--config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 sub-devices, 4 points"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("edge.toml");
    std::fs::write(&bad, "[gateway]\nproduct_key = \"a\"\n").unwrap();
    let out = Command::new(bin)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("edge.toml:1:") && err.contains("device_name"),
        "{err}"
    );
}
