//! MQTT fixed-header framing (MQTT 3.1.1 section 2.2, MQTT 5 section 2.1).

/// Why bytes are not a frame yet, or never will be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// At least this many more bytes are needed before a frame can be decided.
    Incomplete(usize),
    /// The remaining-length field uses more than four bytes.
    MalformedLength,
    /// The frame (header included) is larger than the limit.
    TooLarge {
        /// Size the frame announces, in bytes.
        size: usize,
        /// The configured limit, in bytes.
        max: usize,
    },
    /// Packet type 0 is reserved.
    ReservedType,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Incomplete(n) => write!(f, "need {n} more bytes"),
            Self::MalformedLength => f.write_str("remaining length longer than 4 bytes"),
            Self::TooLarge { size, max } => {
                write!(f, "packet of {size} bytes exceeds the limit of {max} bytes")
            }
            Self::ReservedType => f.write_str("packet type 0 is reserved"),
        }
    }
}

/// MQTT control packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum PacketType {
    Connect,
    ConnAck,
    Publish,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    PingReq,
    PingResp,
    Disconnect,
    Auth,
}

impl PacketType {
    fn from_nibble(n: u8) -> Option<Self> {
        Some(match n {
            1 => Self::Connect,
            2 => Self::ConnAck,
            3 => Self::Publish,
            4 => Self::PubAck,
            5 => Self::PubRec,
            6 => Self::PubRel,
            7 => Self::PubComp,
            8 => Self::Subscribe,
            9 => Self::SubAck,
            10 => Self::Unsubscribe,
            11 => Self::UnsubAck,
            12 => Self::PingReq,
            13 => Self::PingResp,
            14 => Self::Disconnect,
            15 => Self::Auth,
            _ => return None,
        })
    }
}

/// A complete frame found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Packet type.
    pub kind: PacketType,
    /// Low nibble of the first byte.
    pub flags: u8,
    /// Size of the fixed header (1 + length bytes).
    pub header_len: usize,
    /// Remaining length: bytes after the fixed header.
    pub remaining_len: usize,
}

impl FrameHeader {
    /// Total frame size in bytes.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }

    /// Whether the low nibble holds what MQTT requires for this packet type: 0010 for
    /// SUBSCRIBE, UNSUBSCRIBE and PUBREL, 0000 for the others but PUBLISH (whose QoS must not
    /// be 3).
    pub fn flags_valid(&self) -> bool {
        match self.kind {
            PacketType::Publish => self.qos() != 3,
            PacketType::Subscribe | PacketType::Unsubscribe | PacketType::PubRel => {
                self.flags == 0b0010
            }
            _ => self.flags == 0,
        }
    }

    /// QoS of a PUBLISH (bits 1-2 of the flags).
    pub fn qos(&self) -> u8 {
        (self.flags >> 1) & 0b11
    }
}

/// Finds the frame at the start of `buf`. The size is checked against `max` as soon as the
/// length field is read, so an oversize frame is refused before its body is buffered.
pub fn check(buf: &[u8], max: usize) -> Result<FrameHeader, FrameError> {
    let header = peek_header(buf)?;
    let size = header.frame_len();
    if size > max {
        return Err(FrameError::TooLarge { size, max });
    }
    if buf.len() < size {
        return Err(FrameError::Incomplete(size - buf.len()));
    }
    Ok(header)
}

/// The fixed header at the start of `buf`, whatever the frame's size and whether its body has
/// arrived (a client skipping an oversized frame needs its type and length).
pub fn peek_header(buf: &[u8]) -> Result<FrameHeader, FrameError> {
    let Some(&first) = buf.first() else {
        return Err(FrameError::Incomplete(2));
    };
    let kind = PacketType::from_nibble(first >> 4).ok_or(FrameError::ReservedType)?;
    let mut remaining: usize = 0;
    let mut shift = 0;
    let mut i = 1;
    loop {
        if i > 4 {
            return Err(FrameError::MalformedLength);
        }
        let Some(&b) = buf.get(i) else {
            return Err(FrameError::Incomplete(1));
        };
        remaining |= usize::from(b & 0x7f) << shift;
        shift += 7;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    Ok(FrameHeader {
        kind,
        flags: first & 0x0f,
        header_len: i,
        remaining_len: remaining,
    })
}

/// The packet id of a complete QoS 1/2 PUBLISH frame (`None` for QoS 0 or a short frame).
pub fn publish_packet_id(frame: &[u8], header: &FrameHeader) -> Option<u16> {
    if header.kind != PacketType::Publish || header.qos() == 0 {
        return None;
    }
    let body = frame.get(header.header_len..header.frame_len())?;
    let topic_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let at = 2 + topic_len;
    Some(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]))
}

/// The topic name of a complete PUBLISH frame, read without decoding the packet (`None` for
/// another packet type or a short frame).
pub fn publish_topic<'a>(frame: &'a [u8], header: &FrameHeader) -> Option<&'a [u8]> {
    if header.kind != PacketType::Publish {
        return None;
    }
    let body = frame.get(header.header_len..header.frame_len())?;
    let topic_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    body.get(2..2 + topic_len)
}

/// An outgoing PUBLISH, encoded by [`encode_publish`].
#[derive(Debug, Clone, Copy)]
pub struct PublishOut<'a> {
    /// Topic name.
    pub topic: &'a str,
    /// Payload bytes.
    pub payload: &'a [u8],
    /// 0 or 1 (2 is encoded as given, but Ironlink never sends it).
    pub qos: u8,
    /// Packet id, written only for QoS above 0.
    pub packet_id: u16,
    /// RETAIN flag.
    pub retain: bool,
    /// DUP flag.
    pub dup: bool,
    /// Encode for MQTT 5 (adds an empty property block).
    pub v5: bool,
}

/// Why a PUBLISH could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The topic is longer than 65,535 bytes.
    TopicTooLong,
    /// The packet exceeds MQTT's 268,435,455-byte remaining-length limit.
    PacketTooLarge,
}

/// Encodes a PUBLISH, handing the bytes to `out` in order (header, topic, packet id,
/// properties, payload) so that a caller can write into any buffer without copies here.
pub fn encode_publish(
    p: &PublishOut<'_>,
    mut out: impl FnMut(&[u8]),
) -> Result<usize, EncodeError> {
    let topic_len = u16::try_from(p.topic.len()).map_err(|_| EncodeError::TopicTooLong)?;
    let id_len = if p.qos > 0 { 2 } else { 0 };
    let props_len = usize::from(p.v5);
    let remaining = 2 + p.topic.len() + id_len + props_len + p.payload.len();
    if remaining > 268_435_455 {
        return Err(EncodeError::PacketTooLarge);
    }
    let mut header = [0u8; 5];
    header[0] = 0x30 | (u8::from(p.dup) << 3) | ((p.qos & 0b11) << 1) | u8::from(p.retain);
    let mut n = 1;
    let mut x = remaining;
    loop {
        let mut byte = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            byte |= 0x80;
        }
        header[n] = byte;
        n += 1;
        if x == 0 {
            break;
        }
    }
    out(&header[..n]);
    out(&topic_len.to_be_bytes());
    out(p.topic.as_bytes());
    if p.qos > 0 {
        out(&p.packet_id.to_be_bytes());
    }
    if p.v5 {
        out(&[0]);
    }
    out(p.payload);
    Ok(n + remaining)
}

/// The protocol level byte of a complete CONNECT frame: 3 (MQTT 3.1), 4 (3.1.1) or 5.
pub fn connect_protocol_level(frame: &[u8], header: &FrameHeader) -> Option<u8> {
    let body = frame.get(header.header_len..header.frame_len())?;
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    body.get(2 + name_len).copied()
}

/// MQTT 5 DISCONNECT reason codes the server sends (MQTT 5 section 3.14.2.1).
pub mod reason {
    /// 0x81 Malformed Packet.
    pub const MALFORMED_PACKET: u8 = 0x81;
    /// Unspecified error (the server could not do its part).
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    /// 0x82 Protocol Error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// 0x87 Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// 0x8B Server shutting down.
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    /// 0x8D Keep Alive timeout.
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    /// 0x8E Session taken over.
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    /// 0x95 Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// 0x98 Administrative action.
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    /// 0x9B QoS not supported.
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    /// 0x90 Topic Name invalid.
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
}

/// An MQTT 5 DISCONNECT with a reason code and an explicit empty property block. (Remaining
/// length 1 would be valid too, but some clients, rumqttc 0.24 among them, fail to parse it.)
pub const fn disconnect_v5(reason: u8) -> [u8; 4] {
    [0xE0, 0x02, reason, 0x00]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    /// Vectors from `shared/vectors/mqtt.toml` (source: the mqttjs/mqtt-packet test suite).
    #[test]
    fn published_vectors() {
        let connect = hex("10 0C 00 04 4D 51 54 54 04 02 00 1E 00 00");
        let h = check(&connect, 1024).unwrap();
        assert_eq!(h.kind, PacketType::Connect);
        assert_eq!(h.frame_len(), connect.len());

        let publish = hex("3D 0C 00 04 74 65 73 74 00 0A 74 65 73 74");
        let h = check(&publish, 1024).unwrap();
        assert_eq!(h.kind, PacketType::Publish);
        assert_eq!(h.qos(), 2);
        assert_eq!(publish_packet_id(&publish, &h), Some(10));
        assert_eq!(publish_topic(&publish, &h), Some(&b"test"[..]));
        let lying = hex("30 04 00 09 74 65");
        let h = check(&lying, 1024).unwrap();
        assert_eq!(
            publish_topic(&lying, &h),
            None,
            "topic length past the frame"
        );

        let suback = hex("90 06 00 06 00 01 02 80");
        let h = check(&suback, 1024).unwrap();
        assert_eq!(h.kind, PacketType::SubAck);
        assert_eq!(publish_topic(&suback, &h), None);
    }

    /// `[[malformed]]` in `shared/vectors/mqtt.toml`: SUBSCRIBE with flags 0000.
    #[test]
    fn reserved_flags_are_checked() {
        let bad = hex("80 09 00 01 00 04 74 65 73 74 00");
        assert!(!check(&bad, 1024).unwrap().flags_valid());
        let good = hex("82 09 00 01 00 04 74 65 73 74 00");
        assert!(check(&good, 1024).unwrap().flags_valid());
        assert!(
            !check(&[0x36, 0x00], 10).unwrap().flags_valid(),
            "PUBLISH QoS 3"
        );
        assert!(
            !check(&[0xc1, 0x00], 10).unwrap().flags_valid(),
            "PINGREQ with flags"
        );
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let publish = hex("3D 0C 00 04 74 65 73 74 00 0A 74 65 73 74");
        assert_eq!(check(&[], 1024), Err(FrameError::Incomplete(2)));
        assert_eq!(check(&publish[..1], 1024), Err(FrameError::Incomplete(1)));
        assert_eq!(check(&publish[..5], 1024), Err(FrameError::Incomplete(9)));
        // A multi-byte length split across reads.
        assert_eq!(
            check(&[0x30, 0x80], 1 << 20),
            Err(FrameError::Incomplete(1))
        );
    }

    #[test]
    fn oversize_refused_before_body() {
        // PUBLISH announcing 2,097,151 bytes, only the header present.
        assert_eq!(
            check(&[0x30, 0xff, 0xff, 0x7f], 256 * 1024),
            Err(FrameError::TooLarge {
                size: 2_097_155,
                max: 256 * 1024
            })
        );
    }

    #[test]
    fn malformed_headers() {
        assert_eq!(
            check(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(FrameError::MalformedLength)
        );
        assert_eq!(check(&[0x00, 0x00], 10), Err(FrameError::ReservedType));
    }

    #[test]
    fn qos0_has_no_packet_id() {
        let p = hex("30 06 00 01 61 68 69 21");
        let h = check(&p, 100).unwrap();
        assert_eq!(publish_packet_id(&p, &h), None);
    }

    #[test]
    fn publish_round_trips_through_check() {
        for v5 in [false, true] {
            for qos in [0u8, 1] {
                let payload = vec![7u8; 300];
                let mut buf = Vec::new();
                let n = encode_publish(
                    &PublishOut {
                        topic: "/a/b",
                        payload: &payload,
                        qos,
                        packet_id: 513,
                        retain: true,
                        dup: false,
                        v5,
                    },
                    |b| buf.extend_from_slice(b),
                )
                .unwrap();
                assert_eq!(n, buf.len());
                let h = check(&buf, 1 << 20).unwrap();
                assert_eq!(h.frame_len(), buf.len());
                assert_eq!(h.qos(), qos);
                assert_eq!(h.flags & 1, 1);
                assert_eq!(publish_packet_id(&buf, &h), (qos > 0).then_some(513));
                assert!(buf.ends_with(&payload));
            }
        }
    }

    #[test]
    fn protocol_level_of_connect_vectors() {
        let connect = hex("10 0C 00 04 4D 51 54 54 04 02 00 1E 00 00");
        let h = check(&connect, 1024).unwrap();
        assert_eq!(connect_protocol_level(&connect, &h), Some(4));
        assert_eq!(
            connect_protocol_level(
                &connect[..4],
                &FrameHeader {
                    remaining_len: 2,
                    ..h
                }
            ),
            None
        );
    }

    /// Seeded random input never panics and never reports a frame longer than the input.
    #[test]
    fn seeded_random_input_is_handled() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 40) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|i| (seed >> (i % 8 * 8)) as u8 ^ i as u8)
                .collect();
            if let Ok(h) = check(&buf, 1 << 16) {
                assert!(h.frame_len() <= buf.len());
                let _ = publish_packet_id(&buf, &h);
                let _ = connect_protocol_level(&buf, &h);
                let _ = h.flags_valid();
            }
        }
    }
}
