//! The memory map and cortex-m-rt's linker script.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    println!("cargo:rerun-if-changed=memory.x");
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        eprintln!("OUT_DIR is not set (not run by cargo?)");
        return ExitCode::FAILURE;
    };
    if let Err(e) = std::fs::copy("memory.x", out.join("memory.x")) {
        eprintln!("copying memory.x: {e}");
        return ExitCode::FAILURE;
    }
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg-bins=--nmagic");
    println!("cargo:rustc-link-arg-bins=-Tlink.x");
    ExitCode::SUCCESS
}
