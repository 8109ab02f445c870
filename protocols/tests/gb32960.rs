//! GB/T 32960.3-2016: the public vector (`shared/vectors/gb32960.toml`, a vehicle login from a
//! public vehicle-platform tool's unit tests) decodes to its stated values and re-encodes byte
//! for byte; real-time data with every information type round-trips; sentinels read as
//! abnormal/invalid; bad input of every kind is a clean error and the stream resynchronises.
#![cfg(feature = "alloc")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_protocols::gb32960::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const LOGIN: &str = "232301fe4c4748433456314439484532303434303601001e140215171f29008a3839383630313137373935393530303839323938010063";
const VIN: &str = "LGHC4V1D9HE204406";

fn t(y: u16, mo: u8, d: u8, h: u8, mi: u8, s: u8) -> Time {
    Time {
        year: y,
        month: mo,
        day: d,
        hour: h,
        minute: mi,
        second: s,
    }
}

#[test]
fn the_login_vector_decodes_and_re_encodes() {
    let bytes = hex(LOGIN);
    let f = parse_frame(&bytes).unwrap();
    assert_eq!(f.command, cmd::LOGIN);
    assert_eq!(f.response, resp::COMMAND);
    assert_eq!(f.vin, VIN);
    assert_eq!(f.encryption, 0x01);
    assert_eq!(f.data.len(), 30);
    let Message::Login(l) = decode(&f).unwrap() else {
        panic!()
    };
    assert_eq!(l.time, t(2020, 2, 21, 23, 31, 41));
    assert_eq!(l.serial, 138);
    assert_eq!(l.iccid, "89860117795950089298");
    assert_eq!(l.systems, vec![String::new()]);
    assert_eq!(
        encode_frame(f.command, f.response, &f.vin, &encode(&Message::Login(l))).unwrap(),
        bytes
    );
}

#[test]
fn responses_are_encoded_byte_for_byte() {
    let f = parse_frame(&hex(LOGIN)).unwrap();
    let r = response(&f, resp::OK, t(2020, 2, 21, 23, 31, 42)).unwrap();
    // ## 01 01 VIN 01 0006 <the login's time> BCC
    let mut want = b"##".to_vec();
    want.extend_from_slice(&[0x01, 0x01]);
    want.extend_from_slice(VIN.as_bytes());
    want.extend_from_slice(&[0x01, 0x00, 0x06, 0x14, 0x02, 0x15, 0x17, 0x1f, 0x29]);
    want.push(want[2..].iter().fold(0, |a, b| a ^ b));
    assert_eq!(r, want);
    // Heartbeat and time sync carry no time: the answer has the platform's.
    let hb = parse_frame(&encode_frame(cmd::HEARTBEAT, resp::COMMAND, VIN, &[]).unwrap()).unwrap();
    let r = parse_frame(&response(&hb, resp::OK, t(2020, 1, 1, 0, 0, 0)).unwrap()).unwrap();
    assert_eq!(r.data, vec![20, 1, 1, 0, 0, 0]);
    let ts = parse_frame(&encode_frame(cmd::TIME_SYNC, resp::COMMAND, VIN, &[]).unwrap()).unwrap();
    assert_eq!(decode(&ts).unwrap(), Message::TimeSync(None));
    let r = parse_frame(&response(&ts, resp::OK, t(2024, 5, 6, 7, 8, 9)).unwrap()).unwrap();
    assert_eq!(r.data, vec![24, 5, 6, 7, 8, 9]);
}

fn full_report() -> Report {
    Report {
        time: t(2024, 3, 4, 10, 20, 30),
        items: vec![
            Info::Vehicle(Vehicle {
                state: 1,
                charging: 3,
                mode: 1,
                speed: 652,
                mileage: 123_456,
                voltage: 3_801,
                current: 10_250,
                soc: 87,
                dcdc: 1,
                gear: 0x0E,
                insulation: 5_000,
                accelerator: 20,
                brake: 0,
            }),
            Info::Motors(vec![Motor {
                seq: 1,
                state: 1,
                controller_temp: 85,
                speed: 23_000,
                torque: 2_500,
                temp: 90,
                voltage: 3_790,
                current: 10_300,
            }]),
            Info::FuelCell(FuelCell {
                voltage: 3_000,
                current: 1_200,
                consumption: 90,
                temps: vec![60, 61, 62],
                h2_max_temp: 900,
                h2_max_temp_probe: 2,
                h2_max_concentration: 300,
                h2_max_concentration_sensor: 1,
                h2_max_pressure: 350,
                h2_max_pressure_sensor: 3,
                dcdc: 1,
            }),
            Info::Engine(Engine {
                state: 2,
                speed: 0,
                consumption: 0xFFFF,
            }),
            Info::Position(Position {
                status: 0,
                lon: 121_473_701,
                lat: 31_230_416,
            }),
            Info::Extremes(Extremes {
                max_v_system: 1,
                max_v_cell: 17,
                max_v: 4_012,
                min_v_system: 1,
                min_v_cell: 3,
                min_v: 3_987,
                max_t_system: 1,
                max_t_probe: 4,
                max_t: 72,
                min_t_system: 1,
                min_t_probe: 9,
                min_t: 65,
            }),
            Info::Alarms(Alarms {
                level: 1,
                general: 0x0000_0004,
                storage: vec![0x1001],
                motor: vec![],
                engine: vec![],
                other: vec![7, 8],
            }),
            Info::Voltages(vec![CellVoltages {
                system: 1,
                voltage: 3_801,
                current: 10_250,
                cells: 96,
                first: 1,
                voltages: vec![4_001, 4_002, 3_999],
            }]),
            Info::Temperatures(vec![ProbeTemps {
                system: 1,
                temps: vec![70, 71, 72, 73],
            }]),
            Info::Custom {
                kind: 0x80,
                data: vec![1, 2, 3],
            },
        ],
        rest_error: None,
    }
}

#[test]
fn real_time_data_with_every_information_type_round_trips() {
    let rep = full_report();
    let bytes = encode_frame(
        cmd::REALTIME,
        resp::COMMAND,
        VIN,
        &encode(&Message::Realtime(rep.clone())),
    )
    .unwrap();
    let f = parse_frame(&bytes).unwrap();
    assert_eq!(decode(&f).unwrap(), Message::Realtime(rep.clone()));
    // Values: scale and offset, and the sentinels.
    let Info::Vehicle(v) = rep.items[0] else {
        panic!()
    };
    assert_eq!(Reading::word(v.speed, 0.1, 0.0).value(), Some(65.2));
    assert_eq!(Reading::word(v.current, 0.1, -1000.0).value(), Some(25.0));
    assert_eq!(Reading::word(0xFFFF, 0.1, 0.0), Reading::Invalid);
    assert_eq!(Reading::word(0xFFFE, 0.1, 0.0), Reading::Abnormal);
    assert_eq!(Reading::byte(0xFE, 1.0, -40.0), Reading::Abnormal);
    assert_eq!(Reading::dword(0xFFFF_FFFF, 0.1, 0.0), Reading::Invalid);
    let Info::Position(p) = rep.items[4] else {
        panic!()
    };
    assert!((p.latitude().unwrap() - 31.230416).abs() < 1e-9);
    let invalid = Position { status: 1, ..p };
    assert_eq!(invalid.latitude(), None);
    // Re-issued data decodes the same way.
    let f = parse_frame(
        &encode_frame(
            cmd::REISSUE,
            resp::COMMAND,
            VIN,
            &encode(&Message::Reissue(rep.clone())),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(decode(&f).unwrap(), Message::Reissue(rep.clone()));
    assert_eq!(rep.time.unix_ms(), 1_709_518_830_000);
}

#[test]
fn an_unknown_information_type_keeps_the_items_before_it() {
    let mut data = encode(&Message::Realtime(full_report()));
    // Cut after the vehicle item (6 time bytes + 1 type + 20), then an unknown type 0x0A.
    data.truncate(27);
    data.extend_from_slice(&[0x0A, 1, 2, 3]);
    let f = parse_frame(&encode_frame(cmd::REALTIME, resp::COMMAND, VIN, &data).unwrap()).unwrap();
    let Message::Realtime(r) = decode(&f).unwrap() else {
        panic!()
    };
    assert_eq!(r.items.len(), 1);
    assert_eq!(r.rest_error, Some(Error::UnknownInfo(0x0A)));
    // A truncated item: the same.
    let mut data = encode(&Message::Realtime(full_report()));
    data.truncate(27 + 5);
    let f = parse_frame(&encode_frame(cmd::REALTIME, resp::COMMAND, VIN, &data).unwrap()).unwrap();
    let Message::Realtime(r) = decode(&f).unwrap() else {
        panic!()
    };
    assert_eq!(r.items.len(), 1);
    assert!(r.rest_error.is_some());
}

#[test]
fn parameters_control_and_logout_round_trip() {
    let now = t(2024, 1, 2, 3, 4, 5);
    let params = vec![
        Param::Word(0x01, 30_000),
        Param::Word(0x02, 10),
        Param::Byte(0x04, 15),
        Param::Text(0x05, "iot.example.com".into()),
        Param::Word(0x06, 9000),
        Param::Text(0x07, "HW1.0".into()),
        Param::Byte(0x09, 30),
    ];
    for (command, flag, m) in [
        (
            cmd::SETUP,
            resp::COMMAND,
            Message::Setup {
                time: now,
                params: params.clone(),
            },
        ),
        (
            cmd::QUERY,
            resp::COMMAND,
            Message::Query {
                time: now,
                ids: vec![1, 2, 4, 5],
                params: vec![],
            },
        ),
        (
            cmd::QUERY,
            resp::OK,
            Message::Query {
                time: now,
                ids: vec![],
                params,
            },
        ),
        (
            cmd::CONTROL,
            resp::COMMAND,
            Message::Control {
                time: now,
                command: 0x03,
                params: vec![],
            },
        ),
        (
            cmd::LOGOUT,
            resp::COMMAND,
            Message::Logout {
                time: now,
                serial: 9,
            },
        ),
        (cmd::HEARTBEAT, resp::COMMAND, Message::Heartbeat),
    ] {
        let f = parse_frame(&encode_frame(command, flag, VIN, &encode(&m)).unwrap()).unwrap();
        assert_eq!(decode(&f).unwrap(), m);
    }
}

#[test]
fn bad_frames_are_clean_errors() {
    let good = hex(LOGIN);
    let mut b = good.clone();
    *b.last_mut().unwrap() ^= 1;
    assert!(matches!(parse_frame(&b), Err(Error::Bcc { .. })));
    assert!(matches!(
        parse_frame(&good[..30]),
        Err(Error::Truncated { .. })
    ));
    let mut b = good.clone();
    b[0] = b'@';
    assert_eq!(parse_frame(&b), Err(Error::Start));
    // Encrypted (AES-128): refused, with the reason.
    let mut b = good.clone();
    b[21] = 0x03;
    let n = b.len();
    b[n - 1] = b[2..n - 1].iter().fold(0, |a, x| a ^ x);
    let e = parse_frame(&b).unwrap_err();
    assert_eq!(e, Error::Encrypted(0x03));
    assert!(e.to_string().contains("AES-128"), "{e}");
    // A bad VIN.
    let mut b = good.clone();
    b[6] = 0x01;
    let n = b.len();
    b[n - 1] = b[2..n - 1].iter().fold(0, |a, x| a ^ x);
    assert_eq!(parse_frame(&b), Err(Error::Vin));
    // A bad time in the login.
    let mut data = parse_frame(&good).unwrap().data;
    data[1] = 13;
    let f = parse_frame(&encode_frame(cmd::LOGIN, resp::COMMAND, VIN, &data).unwrap()).unwrap();
    assert_eq!(decode(&f), Err(Error::Time));
    // Every truncation of the login data: an error, never a panic.
    let data = parse_frame(&good).unwrap().data;
    for n in 0..data.len() {
        let f = parse_frame(&encode_frame(cmd::LOGIN, resp::COMMAND, VIN, &data[..n]).unwrap())
            .unwrap();
        assert!(decode(&f).is_err(), "{n}");
    }
}

#[test]
fn streams_resynchronise_across_garbage_and_split_reads() {
    let login = hex(LOGIN);
    let rt = encode_frame(
        cmd::REALTIME,
        resp::COMMAND,
        VIN,
        &encode(&Message::Realtime(full_report())),
    )
    .unwrap();
    let mut corrupt = login.clone();
    corrupt[30] ^= 0x55; // BCC now wrong
    let mut stream = b"garbage#".to_vec();
    stream.extend_from_slice(&login);
    stream.extend_from_slice(&corrupt);
    stream.extend_from_slice(&rt);
    stream.extend_from_slice(&[0x00, 0x23]);
    stream.extend_from_slice(&login);
    for chunk in [1, 2, 7, 24, 25, 100, stream.len()] {
        let mut d = Deframer::new();
        let mut out = Vec::new();
        for piece in stream.chunks(chunk) {
            d.feed(piece, &mut out);
        }
        let ok: Vec<u8> = out
            .iter()
            .filter_map(|f| f.as_ref().ok().map(|f| f.command))
            .collect();
        assert_eq!(
            ok,
            vec![cmd::LOGIN, cmd::REALTIME, cmd::LOGIN],
            "chunk {chunk}"
        );
        assert!(out.iter().any(|f| matches!(f, Err(Error::Bcc { .. }))));
        assert!(d.pending() < 2, "chunk {chunk}: {}", d.pending());
    }
}

#[test]
fn random_and_mutated_input_never_panics() {
    let seeds = [
        hex(LOGIN),
        encode_frame(
            cmd::REALTIME,
            resp::COMMAND,
            VIN,
            &encode(&Message::Realtime(full_report())),
        )
        .unwrap(),
    ];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut d = Deframer::new();
    let mut out = Vec::new();
    for i in 0..20_000 {
        let mut b = seeds[i % 2].clone();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() as usize) % b.len();
            match next() % 3 {
                0 => b[at] = next() as u8,
                1 => b.truncate(at.max(25)),
                _ => b.insert(at, next() as u8),
            }
        }
        // Keep the framing valid half the time so that the data gets decoded.
        if i % 2 == 0 && b.len() > 25 {
            let len = (b.len() - 25) as u16;
            b[22..24].copy_from_slice(&len.to_be_bytes());
            b[0] = b'#';
            b[1] = b'#';
            let n = b.len();
            b[n - 1] = b[2..n - 1].iter().fold(0, |a, v| a ^ v);
        }
        if let Ok(f) = parse_frame(&b) {
            let _ = decode(&f);
        }
        d.feed(&b, &mut out);
        out.clear();
    }
    assert!(d.pending() <= HEADER + MAX_DATA + 1);
}
