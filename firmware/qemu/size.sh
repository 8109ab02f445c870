#!/usr/bin/env bash
# Flash and RAM of the firmware SDK on a Cortex-M4F, from the self-test image built by run.sh
# (profile `firmware`: opt-level s, fat LTO): the whole image's sections, and the SDK's own
# share: functions and data whose names are in ironlink_firmware (less its selftest module),
# ironlink_shared and ironlink_protocols, plus the float formatting and parsing of core that
# the SDK pulls in (JSON numbers); and apart, what the `ota` feature's crates add. Functions
# inlined into others count where they landed, so the split is approximate. Uses GNU size and nm, which read ARM ELF files.
set -euo pipefail
cd "$(dirname "$0")/../.."
ELF=${1:-${CARGO_TARGET_DIR:-target}/thumbv7em-none-eabihf/firmware/ironlink-firmware-qemu}
echo "image: $ELF"
size -A "$ELF" | awk '$1 ~ /^\.(vector_table|text|rodata|data|bss)$/ { printf "  %-14s %7d bytes\n", $1, $2 }'
nm -S -C --size-sort "$ELF" | python3 -c '
import re, sys
sdk = flt = test = ota = 0
ram = 0
for line in sys.stdin:
    parts = line.rstrip("\n").split(" ", 3)
    if len(parts) < 4:
        continue
    size, kind, name = int(parts[1], 16), parts[2].lower(), parts[3]
    if "selftest" in name:
        test += size
    elif re.search(r"ironlink_(firmware|shared|protocols)::", name):
        if kind in "bd":
            ram += size
        else:
            sdk += size
    elif re.search(r"core::(fmt::float|num::dec2flt|num::flt2dec)|f64 as core::str::traits::FromStr", name):
        flt += size
    elif re.search(r"embassy_boot|curve25519|ed25519|sha2::|md5::|Sha512|Sha256|Md5|digest::|block_buffer|subtle::", name):
        ota += size
share = sdk + flt
print(f"SDK functions and constants:          {sdk:7d} bytes flash")
print(f"core float formatting and parsing:    {flt:7d} bytes flash")
print(f"SDK share (both):                     {share:7d} bytes flash ({share / 1024:.1f} KiB)")
print(f"OTA feature (embassy-boot, ed25519, SHA-2, MD5): {ota:7d} bytes flash ({(share + ota) / 1024:.1f} KiB with the share)")
print(f"SDK statics:                          {ram:7d} bytes RAM")
print(f"self-test code and tables (not SDK):  {test:7d} bytes flash")
'
