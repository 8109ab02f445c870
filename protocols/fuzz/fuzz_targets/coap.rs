//! CoAP: any datagram through the parser: no panic; what parses re-encodes to the same message;
//! Block option values decode without a panic.
#![no_main]

use ironlink_protocols::coap::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = parse(data) {
        assert_eq!(parse(&encode(&m)).ok().as_ref(), Some(&m));
        for v in m.option(opt::BLOCK1).chain(m.option(opt::BLOCK2)) {
            let _ = Block::decode(v);
        }
        let _ = m.path();
        let _ = m.unknown_critical();
    }
});
