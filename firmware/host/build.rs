//! The lamp's thing model, from the same TSL file the cloud imports, as the firmware SDK's
//! static tables.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    println!("cargo:rerun-if-changed=lamp.tsl.json");
    let text = match std::fs::read_to_string("lamp.tsl.json") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("reading lamp.tsl.json: {e}");
            return ExitCode::FAILURE;
        }
    };
    let model = match ironlink_shared::tsl::parse(&text) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("lamp.tsl.json: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        eprintln!("OUT_DIR is not set (not run by cargo?)");
        return ExitCode::FAILURE;
    };
    if let Err(e) = std::fs::write(out.join("model.rs"), model.firmware_model("LAMP")) {
        eprintln!("writing model.rs: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
