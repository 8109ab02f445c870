//! GB/T 32960: any bytes through the deframer, the frame parser and the data decoder: no
//! panic, memory bounded by one frame; what decodes re-encodes.
#![no_main]

use ironlink_protocols::gb32960::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut d = Deframer::new();
    let mut frames = Vec::new();
    for piece in data.chunks(97) {
        d.feed(piece, &mut frames);
    }
    assert!(d.pending() <= HEADER + MAX_DATA + 1);
    for f in frames.into_iter().flatten() {
        if let Ok(m) = decode(&f) {
            let _ = encode(&m);
        }
    }
    // The raw bytes as the data of every command.
    for command in [0x01, 0x02, 0x03, 0x04, 0x05, 0x07, 0x08, 0x80, 0x81, 0x82] {
        for response in [0x01, 0xFE] {
            let f = Frame {
                command,
                response,
                vin: "LGHC4V1D9HE204406".into(),
                encryption: 1,
                data: data.to_vec(),
                dollar: false,
            };
            let _ = decode(&f);
        }
    }
});
