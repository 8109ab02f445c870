#!/usr/bin/env bash
# Builds the firmware SDK's self-test for a Cortex-M4F and runs it on qemu-system-arm
# (machine mps2-an386, semihosting for output and exit code). Exits non-zero on a failed check,
# a panic, or a run longer than 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --profile firmware -p ironlink-firmware-qemu --target thumbv7em-none-eabihf
timeout 300 qemu-system-arm -machine mps2-an386 -nographic -monitor none -serial none \
    -semihosting-config enable=on,target=native \
    -kernel "$TARGET_DIR/thumbv7em-none-eabihf/firmware/ironlink-firmware-qemu"
