//! The cloud signs, the firmware SDK verifies: an image signed by `ironlink-cloud ota sign`
//! with a key from `ota keygen` is accepted by the device's check (SHA-256 against the notice,
//! ed25519 over SHA-512 through embassy-boot) on a simulated flash, and refused when one byte
//! differs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use embassy_boot::{BlockingFirmwareUpdater, FirmwareUpdaterConfig};
use ironlink_firmware::ota::sim::{Power, SimFlash};
use ironlink_firmware::ota::{Journal, Notice, OtaError, Writer};
use ironlink_sim::cloud_process::binary;
use serde_json::Value;
use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(binary("cloud", "ironlink-cloud").unwrap())
        .args(args)
        .output()
        .unwrap()
}

/// Writes `image` to a simulated update slot as a device would, and checks it.
fn device_check(image: &[u8], notice: &str, public_key: &[u8; 32]) -> Result<(), OtaError> {
    let power = Power::on();
    let mut dfu = SimFlash::<_, 1024, 4>::with([0u8; 33 * 1024], &power);
    let mut state = SimFlash::<_, 1024, 4>::with([0u8; 1024], &power);
    let mut jmem = SimFlash::<_, 256, 4>::with([0u8; 256], &power);
    let mut aligned = [0u8; 4];
    let mut up = BlockingFirmwareUpdater::new(
        FirmwareUpdaterConfig {
            dfu: &mut dfu,
            state: &mut state,
        },
        &mut aligned,
    );
    let mut journal = Journal::new(&mut jmem);
    let n = Notice::parse(notice.as_bytes())?;
    let mut w = Writer::start(&mut up, &mut journal, n, "1.0.0", 32 * 1024)?;
    for piece in image.chunks(1000) {
        w.push(piece)?;
    }
    w.finish(public_key)
}

#[test]
fn images_signed_by_the_cloud_verify_on_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ota.key");
    let out = run(&["ota", "keygen", key.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public_hex = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let again = run(&["ota", "keygen", key.to_str().unwrap()]);
    assert!(
        !again.status.success(),
        "an existing key is never overwritten"
    );

    let image: Vec<u8> = (0..30_000u32)
        .map(|i| (i as u8).wrapping_mul(13) ^ 0x5a)
        .collect();
    let path = dir.path().join("fw.bin");
    std::fs::write(&path, &image).unwrap();
    let out = run(&[
        "ota",
        "sign",
        "--key",
        key.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let signed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(signed["size"], 30_000);
    assert_eq!(signed["public_key"], public_hex.as_str());

    let mut public = [0u8; 32];
    for (i, b) in public.iter_mut().enumerate() {
        *b = u8::from_str_radix(&public_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let notice = serde_json::json!({"code": "1000", "id": 1, "data": {
        "version": "1.1.0", "size": signed["size"], "url": "http://192.0.2.1/fw.bin",
        "sign": signed["sha256"], "signMethod": "SHA256", "md5": signed["md5"],
        "ed25519": signed["ed25519"]}})
    .to_string();
    assert_eq!(device_check(&image, &notice, &public), Ok(()));

    let mut tampered = image.clone();
    tampered[12_345] ^= 1;
    assert_eq!(
        device_check(&tampered, &notice, &public),
        Err(OtaError::DigestMismatch)
    );
    // The same bytes under another key's public key: the signature does not verify.
    let mut other = public;
    other[0] ^= 1;
    assert!(device_check(&image, &notice, &other).is_err());
}
