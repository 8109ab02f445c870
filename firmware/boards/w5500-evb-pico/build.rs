//! The memory map, cortex-m-rt's linker script, and the lamp's thing model generated from the
//! same TSL file the cloud imports (firmware/host/lamp.tsl.json).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    const TSL: &str = "../../host/lamp.tsl.json";
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed={TSL}");
    for var in [
        "IRONLINK_PRODUCT_KEY",
        "IRONLINK_DEVICE_NAME",
        "IRONLINK_DEVICE_SECRET",
        "IRONLINK_BROKER",
        "IRONLINK_OTA_PUBLIC_KEY",
        "IRONLINK_SERVER_NAME",
        "IRONLINK_CA_DER",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        eprintln!("OUT_DIR is not set (not run by cargo?)");
        return ExitCode::FAILURE;
    };
    let model = match std::fs::read_to_string(TSL)
        .map_err(|e| e.to_string())
        .and_then(|t| ironlink_shared::tsl::parse(&t).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{TSL}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The broker's CA for the `tls` feature (empty without one: every handshake then fails).
    let ca = match std::env::var_os("IRONLINK_CA_DER") {
        Some(path) => match std::fs::read(&path) {
            Ok(der) => der,
            Err(e) => {
                eprintln!("IRONLINK_CA_DER {}: {e}", PathBuf::from(path).display());
                return ExitCode::FAILURE;
            }
        },
        None => Vec::new(),
    };
    let written = std::fs::write(out.join("model.rs"), model.firmware_model("LAMP"))
        .and_then(|()| std::fs::write(out.join("ca.der"), &ca))
        .and_then(|()| std::fs::copy("memory.x", out.join("memory.x")).map(|_| ()));
    if let Err(e) = written {
        eprintln!("writing to {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg-bins=--nmagic");
    println!("cargo:rustc-link-arg-bins=-Tlink.x");
    ExitCode::SUCCESS
}
