//! CoAP (RFC 7252, RFC 7959): the vectors of `shared/vectors/coap.toml` (RFC 7252 Appendix A,
//! hand-encoded) decode and re-encode byte for byte; extended option deltas and lengths;
//! every malformed message is a clean error; Block options; de-duplication.
#![cfg(feature = "alloc")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_protocols::coap::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn rfc_7252_appendix_a_get_and_its_piggybacked_answer() {
    let req = hex("40 01 7D 34 BB 74 65 6D 70 65 72 61 74 75 72 65");
    let m = parse(&req).unwrap();
    assert_eq!(m.kind, Kind::Con);
    assert_eq!(m.code, Code::GET);
    assert_eq!(m.message_id, 0x7D34);
    assert!(m.token.is_empty());
    assert_eq!(m.path(), "/temperature");
    assert_eq!(encode(&m), req);

    let reply = hex("60 45 7D 34 FF 32 32 2E 33 20 43");
    let r = parse(&reply).unwrap();
    assert_eq!(r.kind, Kind::Ack);
    assert_eq!(r.code, Code::CONTENT);
    assert_eq!(r.code.to_string(), "2.05");
    assert_eq!(r.payload, b"22.3 C");
    let mut built = Message::response_to(&m, Code::CONTENT, 0);
    built.payload = b"22.3 C".to_vec();
    assert_eq!(encode(&built), reply);
}

#[test]
fn options_with_extended_deltas_and_lengths_round_trip() {
    let mut m = Message::new(Kind::Non, Code::POST, 7, &[1, 2, 3, 4, 5, 6, 7, 8]);
    m.set_path("/topic/a1PK/dev-01/thing/event/property/post");
    m.add(opt::URI_QUERY, b"token=abc");
    m.add_uint(opt::CONTENT_FORMAT, 50);
    m.add_uint(opt::SIZE1, 4000); // delta 13 + ext
    m.add(2048, &[0xAA; 300]); // delta and length with 16-bit extensions
    m.add_uint(opt::BLOCK1, 0);
    m.payload = b"{\"id\":\"1\"}".to_vec();
    let b = encode(&m);
    let back = parse(&b).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.path(), "/topic/a1PK/dev-01/thing/event/property/post");
    assert_eq!(back.queries(), vec!["token=abc".to_string()]);
    assert_eq!(back.uint(opt::CONTENT_FORMAT), Some(50));
    assert_eq!(back.uint(opt::SIZE1), Some(4000));
    assert_eq!(back.uint(opt::BLOCK1), Some(0));
    assert_eq!(
        back.option(opt::BLOCK1).next(),
        Some(&[][..]),
        "zero is the empty value"
    );
    assert_eq!(back.unknown_critical(), None);
    let mut odd = back.clone();
    odd.add(2049, b"x");
    assert_eq!(odd.unknown_critical(), Some(2049));
}

#[test]
fn malformed_messages_are_clean_errors() {
    assert_eq!(parse(&[0x40, 0x01]), Err(Error::Truncated));
    assert_eq!(parse(&[0x80, 0x01, 0, 1]), Err(Error::Version(2)));
    assert_eq!(parse(&[0x49, 0x01, 0, 1]), Err(Error::TokenLength(9)));
    assert_eq!(parse(&[0x44, 0x01, 0, 1, 1, 2]), Err(Error::Truncated)); // short token
    assert_eq!(
        parse(&[0x40, 0x01, 0, 1, 0xF1, 0]),
        Err(Error::ReservedNibble)
    );
    assert_eq!(
        parse(&[0x40, 0x01, 0, 1, 0x1F, 0]),
        Err(Error::ReservedNibble)
    );
    assert_eq!(parse(&[0x40, 0x01, 0, 1, 0xD1]), Err(Error::Truncated)); // missing delta ext
    assert_eq!(
        parse(&[0x40, 0x01, 0, 1, 0x15, 1, 2]),
        Err(Error::Truncated)
    ); // value short
    assert_eq!(parse(&[0x40, 0x01, 0, 1, 0xFF]), Err(Error::EmptyPayload));
    assert_eq!(parse(&[0x41, 0x00, 0, 1, 9]), Err(Error::NotEmpty));
    // Option numbers past 65535.
    assert_eq!(
        parse(&[0x40, 0x01, 0, 1, 0xE0, 0xFF, 0xFF, 0xE0, 0xFF, 0xFF]),
        Err(Error::OptionNumber)
    );
    // An empty CON is a ping; RST answers it.
    let ping = parse(&[0x40, 0x00, 0x12, 0x34]).unwrap();
    assert_eq!(ping.code, Code::EMPTY);
    // Every prefix of a valid message: an error or a message, never a panic.
    let full = hex("44 02 12 34 01 02 03 04 B5 74 6F 70 69 63 11 32 FF 7B 7D");
    for n in 0..full.len() {
        let _ = parse(&full[..n]);
    }
    assert!(parse(&full).is_ok());
}

#[test]
fn block_options() {
    for (num, more, szx) in [
        (0, true, 2),
        (1, false, 6),
        (4095, true, 0),
        (1_048_575, false, 6),
    ] {
        let b = Block { num, more, szx };
        let v = b.encode();
        assert!(v.len() <= 3);
        assert_eq!(Block::decode(&v), Some(b));
    }
    let b = Block::decode(&[0x1A]).unwrap(); // num 1, more, szx 2 (64 bytes)
    assert_eq!((b.num, b.more, b.size(), b.offset()), (1, true, 64, 64));
    assert_eq!(Block::decode(&[0x07]), None, "SZX 7 is reserved");
    assert_eq!(Block::decode(&[1, 2, 3, 4]), None);
    assert_eq!(Block::decode(&[]).unwrap().num, 0);
}

#[test]
fn duplicates_get_the_first_answer_within_the_lifetime() {
    let mut d: Dedup<String> = Dedup::new(3, 247_000);
    let a = "10.0.0.1:5683".to_string();
    assert_eq!(d.check(&a, 1, 0), None);
    assert_eq!(d.check(&a, 1, 10), Some(None), "not answered yet");
    d.answered(&a, 1, vec![0x60, 0x44, 0, 1]);
    assert_eq!(d.check(&a, 1, 20), Some(Some(vec![0x60, 0x44, 0, 1])));
    assert_eq!(
        d.check(&"10.0.0.2:5683".to_string(), 1, 20),
        None,
        "keyed by peer"
    );
    // After the lifetime, the same id is a new message.
    assert_eq!(d.check(&a, 1, 300_000), None);
    // Bounded in entries.
    for mid in 100..200 {
        let _ = d.check(&a, mid, 300_001);
    }
    assert!(d.len() <= 4, "{}", d.len());
}

#[test]
fn random_and_mutated_input_never_panics() {
    let seed = hex("44 02 12 34 01 02 03 04 B5 74 6F 70 69 63 11 32 FF 7B 7D");
    let mut x: u64 = 0x1234_5678_9ABC_DEF1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..50_000 {
        let mut b = seed.clone();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() as usize) % b.len().max(1);
            match next() % 3 {
                0 => {
                    if let Some(v) = b.get_mut(at) {
                        *v = next() as u8;
                    }
                }
                1 => b.truncate(at),
                _ => b.insert(at.min(b.len()), next() as u8),
            }
        }
        if let Ok(m) = parse(&b) {
            // What parses re-encodes to something that parses to the same message.
            assert_eq!(parse(&encode(&m)).unwrap(), m);
        }
    }
}
