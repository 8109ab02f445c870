//! A packet forwarder's datagram through the Semtech protocol parser, every rxpk's PHYPayload
//! through the multi-gateway de-duplicator and a LoRaWAN session (keys of the public vector):
//! no panic; the raw bytes as a PHYPayload too.
#![no_main]

use ironlink_protocols::lorawan::{Dedup, Session};
use ironlink_protocols::semtech::{parse, Up};
use libfuzzer_sys::fuzz_target;

fn session() -> Session {
    Session {
        dev_addr: 0x49BE_7DF1,
        nwk_skey: [0x44, 0x02, 0x42, 0x41, 0xed, 0x4c, 0xe9, 0xa6, 0x8c, 0x6a, 0x8b, 0xc0, 0x55, 0x23, 0x3f, 0xd3],
        app_skey: [0xec, 0x92, 0x58, 0x02, 0xae, 0x43, 0x0c, 0xa7, 0x7f, 0xd3, 0xdd, 0x73, 0xcb, 0x2c, 0xc5, 0x88],
        fcnt_up: None,
        fcnt_down: 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut dedup = Dedup::new(1000, 64);
    let mut s = session();
    if let Ok(Up::Push { body, .. }) = parse(data) {
        for rx in body.rxpk {
            let _ = rx.lora_rate();
            if let Ok(phy) = rx.payload() {
                if dedup.first(&phy, 0) {
                    let _ = s.uplink(&phy);
                }
            }
        }
    }
    let _ = session().uplink(data);
});
