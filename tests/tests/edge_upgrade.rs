//! The edge gateway upgrades itself through a cloud campaign, as processes: `ironlink-edge run
//! --supervise` from a copy of the binary in a temp dir; the "new binaries" are small
//! launchers of another copy that report another version, signed with the operator's key.
//! A good one is swapped in and confirmed; a wrongly signed or tampered one is refused and the
//! old binary keeps running; one that exits at start is rolled back and the rollback reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::SigningKey;
use ironlink_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};

/// A launcher script: answers `--version` itself when `version_only`, else runs `real` with
/// IRONLINK_EDGE_VERSION set to `version`.
fn launcher(real: &Path, version: &str, exits: bool) -> Vec<u8> {
    if exits {
        format!("#!/bin/sh\n[ \"$1\" = \"--version\" ] && {{ echo ironlink-edge {version}; exit 0; }}\nexit 3\n")
            .into_bytes()
    } else {
        format!(
            "#!/bin/sh\nIRONLINK_EDGE_VERSION={version} exec {} \"$@\"\n",
            real.display()
        )
        .into_bytes()
    }
}

/// Starts a one-device campaign and waits for its end; returns the campaign.
async fn campaign(cloud: &Cloud, package: &str, gdn: &str) -> Value {
    let (s, c) = cloud
        .api(
            Method::POST,
            "/ota/campaigns",
            Some(json!({"name": "self", "package_id": package, "target": {"devices": [gdn]}, "policy": {"retries": 0}})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{c}");
    let id = c["id"].as_str().unwrap();
    get_until(
        cloud,
        &format!("/ota/campaigns/{id}"),
        "campaign over",
        |v| v["state"] == "finished",
    )
    .await
}

async fn version_of(cloud: &Cloud, gpk: &str, gdn: &str) -> String {
    let (_, v) = cloud
        .api(Method::GET, &format!("/devices/{gpk}/{gdn}/ota"), None)
        .await
        .unwrap();
    v["modules"][0]["version"].as_str().unwrap_or("").to_owned()
}

#[tokio::test]
async fn the_edge_upgrades_itself_refuses_bad_images_and_rolls_back_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud"), &[]).unwrap();
    let (gpk, gsecret) = ironlink_sim::edge_process::gateway(&cloud, "edge-self")
        .await
        .unwrap();
    let gdn = "edge-self";
    let key = SigningKey::from_bytes(&[42u8; 32]);
    let public = hex::encode(key.verifying_key().as_bytes());

    // The running binary is a copy, so the build's is never replaced; a second copy is what
    // the launchers run.
    let built = ironlink_sim::cloud_process::binary("edge", "ironlink-edge").unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("ironlink-edge");
    std::fs::copy(&built, &exe).unwrap();
    let real = dir.path().join("ironlink-edge-real");
    std::fs::copy(&built, &real).unwrap();
    let queue = dir.path().join("queue");
    let status_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "{}[ota]\npublic_key = \"{public}\"\nconfirm_within = \"5s\"\n",
        ironlink_sim::edge_process::config_head(
            &gpk,
            gdn,
            &gsecret,
            cloud.mqtt.port(),
            &queue,
            status_port
        )
    );
    let cfg = dir.path().join("edge.toml");
    std::fs::write(&cfg, config).unwrap();
    let log = std::fs::File::create(dir.path().join("edge.log")).unwrap();
    let mut edge = Command::new(&exe)
        .args(["run", "--supervise", "--config"])
        .arg(&cfg)
        .env("IRONLINK_EDGE_VERSION", "1.0.0")
        .env("IRONLINK_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let log_tail = || std::fs::read_to_string(dir.path().join("edge.log")).unwrap_or_default();
    get_until(
        &cloud,
        &format!("/devices/{gpk}/{gdn}/ota"),
        "version 1.0.0 reported",
        |v| v["modules"][0]["version"] == "1.0.0",
    )
    .await;
    let queue_files = |q: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(q)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let queue_before = queue_files(&queue);

    // A good upgrade: downloaded, checked, swapped in, started on trial, confirmed.
    let good = launcher(&real, "2.0.0", false);
    let pkg = upload_package(&cloud, &gpk, "2.0.0", &good, &sign_image(&key, &good)).await;
    let c = campaign(&cloud, &pkg, gdn).await;
    assert_eq!(c["states"]["succeeded"], 1, "{c}\n{}", log_tail());
    assert_eq!(version_of(&cloud, &gpk, gdn).await, "2.0.0");
    assert!(
        std::fs::read(&exe).unwrap() == good,
        "the new binary is in place"
    );
    // The supervisor confirms the trial (it connected within confirm_within).
    let deadline = std::time::Instant::now() + WAIT;
    while !log_tail().contains("upgrade confirmed") {
        assert!(
            !log_tail().contains("rolling back") && std::time::Instant::now() < deadline,
            "the trial was not confirmed:\n{}",
            log_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!dir.path().join("bin/ironlink-edge.previous").exists());
    assert_eq!(
        queue_files(&queue),
        queue_before,
        "the queue is untouched by the swap"
    );

    // Signed with another key: refused (-3); the running binary stays.
    let other = SigningKey::from_bytes(&[7u8; 32]);
    let img = launcher(&real, "3.0.0", false);
    let pkg = upload_package(&cloud, &gpk, "3.0.0", &img, &sign_image(&other, &img)).await;
    let c = campaign(&cloud, &pkg, gdn).await;
    assert_eq!(c["states"]["failed"], 1, "{c}");
    let why = c["failures"][0]["reason"].as_str().unwrap();
    assert!(why.contains("(-3)") && why.contains("ed25519"), "{why}");
    // Tampered: the operator's signature of another image.
    let img = launcher(&real, "3.0.1", false);
    let pkg = upload_package(&cloud, &gpk, "3.0.1", &img, &sign_image(&key, &good)).await;
    let c = campaign(&cloud, &pkg, gdn).await;
    assert_eq!(c["states"]["failed"], 1, "{c}");
    assert!(
        c["failures"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("(-3)"),
        "{c}"
    );
    assert!(
        std::fs::read(&exe).unwrap() == good,
        "nothing was installed"
    );
    assert_eq!(version_of(&cloud, &gpk, gdn).await, "2.0.0");

    // A binary that exits at start: swapped in, tried, rolled back, the rollback reported.
    let broken = launcher(&real, "4.0.0", true);
    let pkg = upload_package(&cloud, &gpk, "4.0.0", &broken, &sign_image(&key, &broken)).await;
    let c = campaign(&cloud, &pkg, gdn).await;
    assert_eq!(c["states"]["failed"], 1, "{c}\n{}", log_tail());
    let why = c["failures"][0]["reason"].as_str().unwrap();
    assert!(why.contains("(-4)") && why.contains("rolled back"), "{why}");
    assert!(
        std::fs::read(&exe).unwrap() == good,
        "the previous binary is back"
    );
    assert_eq!(version_of(&cloud, &gpk, gdn).await, "2.0.0");
    assert_eq!(queue_files(&queue), queue_before);

    // The supervisor stops the gateway cleanly on SIGTERM.
    let _ = Command::new("kill").arg(edge.id().to_string()).status();
    let status = edge.wait().unwrap();
    assert!(status.success(), "{status}\n{}", log_tail());
    cloud.kill9().unwrap();
}
