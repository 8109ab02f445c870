//! Makes a signed firmware image for the example lamp, as an operator's signing step would:
//! writes the image and prints, as JSON, what an upgrade notice carries (size, SHA-256, the
//! ed25519 signature over the image's SHA-512) and the public key the lamp checks it with.
//! (The cloud's own `ota keygen|sign` is the OTA campaign issue's; this is the same scheme.)

use clap::Parser;
use ed25519_dalek::{Signer, SigningKey};
use sha2::Digest;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(about = "Make a signed firmware image for the example lamp")]
struct Args {
    /// Version written into the image's header.
    #[arg(long)]
    version: String,
    /// Image size in bytes.
    #[arg(long, default_value_t = 40_000)]
    size: usize,
    /// The signing key's 32-byte seed, hex (keep it off devices).
    #[arg(long, env = "IRONLINK_IMAGE_KEY", hide_env_values = true)]
    key: String,
    /// Where to write the image.
    #[arg(long)]
    out: PathBuf,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut seed = [0u8; 32];
    let ok = args.key.len() == 64
        && seed.iter_mut().enumerate().all(|(i, s)| {
            u8::from_str_radix(&args.key[2 * i..2 * i + 2], 16)
                .map(|v| *s = v)
                .is_ok()
        });
    if !ok {
        eprintln!("--key: expected 64 hex digits (a 32-byte seed)");
        return ExitCode::FAILURE;
    }
    let key = SigningKey::from_bytes(&seed);
    let img = ironlink_firmware_host::image::build(&args.version, args.size);
    if let Err(e) = std::fs::write(&args.out, &img) {
        eprintln!("writing {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    let signature = key.sign(&sha2::Sha512::digest(&img));
    println!(
        "{{\"version\":\"{}\",\"size\":{},\"sha256\":\"{}\",\"ed25519\":\"{}\",\"public_key\":\"{}\"}}",
        args.version,
        img.len(),
        hex(&sha2::Sha256::digest(&img)),
        hex(&signature.to_bytes()),
        hex(key.verifying_key().as_bytes())
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
