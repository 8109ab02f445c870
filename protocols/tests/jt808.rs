//! JT/T 808: the public vectors (`shared/vectors/jt808.toml`, source: the SmallChi/JT808 test
//! suite) decode to their stated values and re-encode byte for byte; bad input of every kind is
//! a clean error; streams deframe whatever the read boundaries; sub-packages reassemble within
//! their bounds.
#![cfg(feature = "alloc")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_protocols::jt808::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The bytes between the flags of a whole frame.
fn inner(frame: &[u8]) -> &[u8] {
    assert_eq!(frame.first(), Some(&FLAG));
    assert_eq!(frame.last(), Some(&FLAG));
    &frame[1..frame.len() - 1]
}

fn parse(h: &str) -> (Frame, Message) {
    let bytes = hex(h);
    let f = parse_frame(inner(&bytes)).unwrap();
    let m = decode(f.header.msg_id, f.header.is_2019(), &f.body).unwrap();
    // Byte for byte: the same header and message encode to the same frame.
    let again = encode_frame(&f.header, &encode(&m, f.header.is_2019())).unwrap();
    assert_eq!(again, bytes, "re-encoding {h}");
    (f, m)
}

#[test]
fn heartbeat() {
    let (f, m) = parse("7E00020000012345678900000A817E");
    assert_eq!(f.header.msg_id, 0x0002);
    assert_eq!(f.header.phone_number(), "12345678900");
    assert_eq!(f.header.serial, 10);
    assert_eq!(m, Message::Heartbeat);
}

#[test]
fn heartbeat_whose_check_code_is_an_escaped_flag() {
    let (f, _) = parse("7E 00 02 00 00 04 00 21 67 92 87 00 2B 7D 02 7E");
    assert_eq!(f.header.phone_number(), "40021679287");
    assert_eq!(f.header.serial, 43);
}

#[test]
fn authentication() {
    let (f, m) = parse("7E010200090123456789003039343536313231313131BE7E");
    assert_eq!(f.header.serial, 12345);
    assert_eq!(f.header.phone_number(), "12345678900");
    let Message::Auth(a) = m else { panic!() };
    assert_eq!(a.code, "456121111");
}

#[test]
fn platform_general_response() {
    let (_, m) = parse("7E80010005012345678900000A0064020000617E");
    assert_eq!(
        m,
        Message::PlatformResponse(GeneralResponse {
            serial: 100,
            msg_id: 0x0200,
            result: 0
        })
    );
}

#[test]
fn location_with_escaped_serial_and_extras() {
    let (f, m) = parse("7E02000026123456789012007D02000000010000000200BA7F0E07E4F11C0028003C00001810151010100104000000640202007D01137E");
    assert_eq!(f.header.serial, 126);
    let Message::Location(l) = m else { panic!() };
    assert_eq!(l.alarm, 1);
    assert_eq!(l.status, 2);
    assert_eq!(l.lat, 12_222_222);
    assert_eq!(l.lon, 132_444_444);
    assert!((l.latitude() - 12.222222).abs() < 1e-9);
    assert_eq!(l.altitude, 40);
    assert_eq!(l.speed, 60);
    assert_eq!(l.direction, 0);
    assert_eq!(
        l.time,
        Time {
            year: 2018,
            month: 10,
            day: 15,
            hour: 10,
            minute: 10,
            second: 10
        }
    );
    // 2018-10-15 10:10:10 GMT+8 = 02:10:10 UTC.
    assert_eq!(l.time.unix_ms(), 1_539_569_410_000);
    assert_eq!(Time::from_unix_ms(1_539_569_410_000), l.time);
    assert_eq!(l.extras, vec![Extra::Mileage(100), Extra::Fuel(125)]);
}

#[test]
fn registration_with_a_gbk_plate() {
    let (_, m) = parse("7E0100002D000123456789000A002800323132333430736D616C6C6368693132333030303030303030304348493132333001D4C1413132333435BA7E");
    let Message::Register(r) = m else { panic!() };
    assert_eq!(r.province, 40);
    assert_eq!(r.city, 50);
    assert_eq!(r.maker, "12340");
    assert_eq!(r.model, "smallchi123000000000");
    assert_eq!(r.terminal_id, "CHI1230");
    assert_eq!(r.plate_color, 1);
    assert_eq!(r.plate, "粤A12345");
}

#[test]
fn a_2019_header_and_messages_round_trip() {
    let h = Header {
        msg_id: 0x0102,
        version: Some(1),
        phone: "00000000013912345678".into(),
        serial: 7,
        encryption: 0,
        package: None,
    };
    let m = Message::Auth(Auth {
        code: "abc".into(),
        imei: Some("861234567890123".into()),
        software: Some("v1.2".into()),
    });
    let frame = encode_frame(&h, &encode(&m, true)).unwrap();
    let f = parse_frame(inner(&frame)).unwrap();
    assert_eq!(f.header, h);
    assert_eq!(f.header.phone_number(), "13912345678");
    assert_eq!(decode(f.header.msg_id, true, &f.body).unwrap(), m);
    let text = Message::Text {
        flags: 0x08,
        kind: Some(2),
        text: "前方拥堵，请绕行".into(),
    };
    assert_eq!(decode(0x8300, true, &encode(&text, true)).unwrap(), text);
}

#[test]
fn platform_messages_and_replies_round_trip() {
    let loc = match parse("7E02000026123456789012007D02000000010000000200BA7F0E07E4F11C0028003C00001810151010100104000000640202007D01137E").1 {
        Message::Location(l) => l,
        _ => panic!(),
    };
    let params = vec![
        Param {
            id: 0x0001,
            value: ParamValue::U32(30),
        },
        Param {
            id: 0x0013,
            value: ParamValue::Text("iot.example.com".into()),
        },
        Param {
            id: 0x0084,
            value: ParamValue::U8(1),
        },
        Param {
            id: 0x0031,
            value: ParamValue::U16(500),
        },
    ];
    for m in [
        Message::RegisterResponse(RegisterResponse {
            serial: 3,
            result: 0,
            auth_code: "TOKEN42".into(),
        }),
        Message::SetParams(params.clone()),
        Message::ParamsReply { serial: 9, params },
        Message::QueryParams,
        Message::QueryLocation,
        Message::LocationReply {
            serial: 5,
            location: loc.clone(),
        },
        Message::Batch {
            reissued: true,
            locations: vec![loc.clone(), loc.clone()],
        },
        Message::MediaEvent(Media {
            id: 1,
            kind: 0,
            format: 0,
            event: 1,
            channel: 2,
        }),
        Message::MediaUpload {
            media: Media {
                id: 1,
                kind: 0,
                format: 0,
                event: 1,
                channel: 2,
            },
            location: Location {
                extras: vec![],
                ..loc.clone()
            },
            data: vec![0xFF, 0xD8, 0x7E, 0x7D],
        },
        Message::TerminalResponse(GeneralResponse {
            serial: 1,
            msg_id: 0x8103,
            result: 0,
        }),
        Message::Text {
            flags: 0x0C,
            kind: None,
            text: "Hello 你好".into(),
        },
        Message::QueryAttributes,
        Message::UpgradeResult { kind: 0, result: 1 },
        Message::Upgrade(Upgrade {
            kind: 52,
            maker: "70111".into(),
            version: "GNSS-2.1".into(),
            package: vec![0x7E, 0x7D, 1, 2, 3],
        }),
    ] {
        let body = encode(&m, false);
        assert_eq!(decode(m.msg_id(), false, &body).unwrap(), m);
    }
    // Attributes differ by edition (model and terminal id widths).
    let a = Message::Attributes(Attributes {
        terminal_type: 0x0006,
        maker: "70111".into(),
        model: "IRONLINK-T1".into(),
        terminal_id: "T000001".into(),
        iccid: [0x89, 0x86, 0, 1, 2, 3, 4, 5, 6, 7],
        hardware: "HW1".into(),
        firmware: "FW-1.0.0".into(),
        gnss: 3,
        comm: 1,
    });
    for v2019 in [false, true] {
        let body = encode(&a, v2019);
        assert_eq!(
            body.len(),
            2 + 5 + if v2019 { 60 } else { 27 } + 10 + 4 + 9 + 2
        );
        assert_eq!(decode(0x0107, v2019, &body).unwrap(), a);
    }
    // The head the edge streams a package behind is the encoded message's start.
    let Message::Upgrade(u) = decode(
        0x8108,
        false,
        &encode(
            &Message::Upgrade(Upgrade {
                kind: 0,
                maker: "M".into(),
                version: "2".into(),
                package: vec![9; 3000],
            }),
            false,
        ),
    )
    .unwrap() else {
        panic!()
    };
    let mut streamed = upgrade_head(0, "M", "2", 3000);
    streamed.extend_from_slice(&u.package);
    assert_eq!(streamed, encode(&Message::Upgrade(u), false));
    // A package shorter than its length is refused.
    let mut cut = upgrade_head(0, "M", "2", 10);
    cut.extend_from_slice(&[1, 2, 3]);
    assert!(decode(0x8108, false, &cut).is_err());
}

#[test]
fn unknown_extra_items_are_skipped_by_length() {
    let mut l = match parse("7E02000026123456789012007D02000000010000000200BA7F0E07E4F11C0028003C00001810151010100104000000640202007D01137E").1 {
        Message::Location(l) => l,
        _ => panic!(),
    };
    l.extras = vec![
        Extra::Unknown {
            id: 0xE1,
            data: vec![1, 2, 3],
        },
        Extra::Satellites(9),
        Extra::Overspeed {
            kind: 1,
            area: Some(77),
        },
    ];
    let body = encode(&Message::Location(l.clone()), false);
    assert_eq!(decode(0x0200, false, &body).unwrap(), Message::Location(l));
}

#[test]
fn bad_frames_are_clean_errors() {
    let good = hex("7E00020000012345678900000A817E");
    let good = inner(&good);
    // Bad check code.
    let mut b = good.to_vec();
    *b.last_mut().unwrap() ^= 0xFF;
    assert!(matches!(parse_frame(&b), Err(Error::Checksum { .. })));
    // Bad escape.
    assert!(matches!(
        parse_frame(&[0x00, 0x02, 0x7D, 0x05]),
        Err(Error::Escape { at: 2 })
    ));
    // Truncated.
    assert!(matches!(
        parse_frame(&good[..6]),
        Err(Error::TooShort { .. })
    ));
    assert!(matches!(parse_frame(&[]), Err(Error::TooShort { .. })));
    // Declared length longer than the body (check code fixed up so that only the length is wrong).
    let mut raw = unescape(good).unwrap();
    raw.pop();
    raw[3] = 5;
    let x = xor(&raw);
    raw.push(x);
    assert!(matches!(
        parse_frame(&raw),
        Err(Error::Length {
            declared: 5,
            actual: 0
        })
    ));
    // RSA-encrypted body: refused with the reason.
    let mut raw = unescape(good).unwrap();
    raw.pop();
    raw[2] |= 0x04;
    let x = xor(&raw);
    raw.push(x);
    let e = parse_frame(&raw).unwrap_err();
    assert_eq!(e, Error::Encrypted { method: 1 });
    assert!(e.to_string().contains("RSA"), "{e}");
    // Non-BCD phone.
    let mut raw = unescape(good).unwrap();
    raw.pop();
    raw[4] = 0xAB;
    let x = xor(&raw);
    raw.push(x);
    assert_eq!(parse_frame(&raw).unwrap_err(), Error::Bcd);
    // Truncated bodies: every prefix of a location body is an error, never a panic.
    let loc = hex("000000010000000200BA7F0E07E4F11C0028003C00001810151010100104000000640202007D");
    for n in 0..loc.len() {
        let _ = decode(0x0200, false, &loc[..n]);
    }
    assert!(decode(0x0200, false, &loc[..27]).is_err());
    // An extra item longer than what is left.
    let mut l = loc[..28].to_vec();
    l.extend_from_slice(&[0x01, 0x09, 0x00]);
    let e = decode(0x0200, false, &l).unwrap_err();
    assert!(e.to_string().contains("0x0200"), "{e}");
    // A bad date.
    let mut l = loc[..28].to_vec();
    l[23] = 0x13; // month 13
    assert_eq!(decode(0x0200, false, &l).unwrap_err(), Error::Bcd);
    let mut l = loc[..28].to_vec();
    l[22] = 0x1A; // not BCD
    assert_eq!(decode(0x0200, false, &l).unwrap_err(), Error::Bcd);
}

#[test]
fn streams_deframe_across_any_read_boundary_and_skip_garbage() {
    let a = hex("7E00020000012345678900000A817E");
    let b = hex("7E 00 02 00 00 04 00 21 67 92 87 00 2B 7D 02 7E");
    let c = hex("7E010200090123456789003039343536313231313131BE7E");
    let mut stream = vec![0x11, 0x22]; // garbage before the first flag
    stream.extend_from_slice(&a);
    stream.extend_from_slice(&b);
    stream.extend_from_slice(&[0x7E, 0x01, 0x02, 0x03, 0x7E]); // a bad frame between good ones
    stream.extend_from_slice(&c);
    for chunk in 1..=stream.len() {
        let mut d = Deframer::new();
        let mut out = Vec::new();
        for piece in stream.chunks(chunk) {
            d.feed(piece, &mut out);
        }
        let parsed: Vec<Result<u16, Error>> = out
            .into_iter()
            .map(|f| f.and_then(|f| parse_frame(&f)).map(|f| f.header.msg_id))
            .collect();
        assert_eq!(parsed.len(), 4, "chunk {chunk}: {parsed:?}");
        assert_eq!(parsed[0], Ok(0x0002));
        assert_eq!(parsed[1], Ok(0x0002));
        assert!(parsed[2].is_err());
        assert_eq!(parsed[3], Ok(0x0102));
        assert_eq!(d.skipped, 2);
        assert_eq!(d.pending(), 0);
    }
}

#[test]
fn an_endless_frame_is_cut_at_the_bound() {
    let mut d = Deframer::new();
    let mut out = Vec::new();
    d.feed(&[FLAG], &mut out);
    for _ in 0..10 {
        d.feed(&[0x55; 1000], &mut out);
    }
    assert!(d.pending() <= MAX_FRAME);
    d.feed(&hex("7E00020000012345678900000A817E"), &mut out);
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[0], Err(Error::Oversized));
    assert!(parse_frame(out[1].as_ref().unwrap()).is_ok());
}

#[test]
fn sub_packages_reassemble_in_any_order_within_bounds() {
    let big = Message::Other {
        msg_id: 0x0801,
        body: (0..2500u32).map(|i| (i % 251) as u8).collect(),
    };
    let h = Header::new_2013(0x0801, "13912345678", 100);
    let frames = encode_message(&h, &big).unwrap();
    assert_eq!(frames.len(), 3);
    let parsed: Vec<Frame> = frames
        .iter()
        .map(|f| parse_frame(inner(f)).unwrap())
        .collect();
    assert_eq!(parsed[1].header.package, Some((3, 2)));
    assert_eq!(parsed[2].header.serial, 102);
    let mut r = Reassembler::new(1 << 20, 30_000);
    assert_eq!(r.push(&parsed[2].header, &parsed[2].body, 0).unwrap(), None);
    assert_eq!(r.push(&parsed[0].header, &parsed[0].body, 1).unwrap(), None);
    let whole = r
        .push(&parsed[1].header, &parsed[1].body, 2)
        .unwrap()
        .unwrap();
    assert_eq!(
        Message::Other {
            msg_id: 0x0801,
            body: whole
        },
        big
    );
    assert_eq!(r.held(), 0);
    // Timeout: an incomplete set is dropped, naming what was missing.
    assert_eq!(
        r.push(&parsed[0].header, &parsed[0].body, 10).unwrap(),
        None
    );
    assert!(r.expire(20).is_empty());
    assert_eq!(r.expire(30_010), vec![(0x0801, vec![2, 3])]);
    assert_eq!(r.held(), 0);
    // Memory bound.
    let mut small = Reassembler::new(1500, 30_000);
    assert_eq!(
        small.push(&parsed[0].header, &parsed[0].body, 0).unwrap(),
        None
    );
    assert_eq!(
        small.push(&parsed[1].header, &parsed[1].body, 0),
        Err(Error::Package("reassembly memory bound reached"))
    );
    // Index outside the set.
    let mut bad = parsed[0].header.clone();
    bad.package = Some((3, 4));
    assert!(r.push(&bad, &[], 0).is_err());
}

/// Random and mutated frames: never a panic, and a frame that parses re-encodes.
#[test]
fn random_and_mutated_input_never_panics() {
    let seeds = [
        hex("7E00020000012345678900000A817E"),
        hex("7E02000026123456789012007D02000000010000000200BA7F0E07E4F11C0028003C00001810151010100104000000640202007D01137E"),
        hex("7E0100002D000123456789000A002800323132333430736D616C6C6368693132333030303030303030304348493132333001D4C1413132333435BA7E"),
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..20_000 {
        let seed = &seeds[i % seeds.len()];
        let mut b = inner(seed).to_vec();
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
        // Fix the check code half the time so that bodies get decoded.
        if i % 2 == 0 {
            if let Ok(mut raw) = unescape(&b) {
                if raw.len() > 1 {
                    raw.pop();
                    let c = xor(&raw);
                    raw.push(c);
                    let mut e = Vec::new();
                    escape_into(&raw, &mut e);
                    b = e;
                }
            }
        }
        if let Ok(f) = parse_frame(&b) {
            let _ = decode(f.header.msg_id, f.header.is_2019(), &f.body);
            for id in [0x0100, 0x0102, 0x0200, 0x0704, 0x0801, 0x0104, 0x8103] {
                let _ = decode(id, i % 3 == 0, &f.body);
            }
        }
        let mut d = Deframer::new();
        let mut out = Vec::new();
        d.feed(&b, &mut out);
    }
}
