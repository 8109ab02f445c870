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

    /// QoS of a PUBLISH (bits 1-2 of the flags).
    pub fn qos(&self) -> u8 {
        (self.flags >> 1) & 0b11
    }
}

/// Finds the frame at the start of `buf`. The size is checked against `max` as soon as the
/// length field is read, so an oversize frame is refused before its body is buffered.
pub fn check(buf: &[u8], max: usize) -> Result<FrameHeader, FrameError> {
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
    let header = FrameHeader {
        kind,
        flags: first & 0x0f,
        header_len: i,
        remaining_len: remaining,
    };
    let size = header.frame_len();
    if size > max {
        return Err(FrameError::TooLarge { size, max });
    }
    if buf.len() < size {
        return Err(FrameError::Incomplete(size - buf.len()));
    }
    Ok(header)
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

        let suback = hex("90 06 00 06 00 01 02 80");
        assert_eq!(check(&suback, 1024).unwrap().kind, PacketType::SubAck);
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let publish = hex("3D 0C 00 04 74 65 73 74 00 0A 74 65 73 74");
        assert_eq!(check(&[], 1024), Err(FrameError::Incomplete(2)));
        assert_eq!(check(&publish[..1], 1024), Err(FrameError::Incomplete(1)));
        assert_eq!(check(&publish[..5], 1024), Err(FrameError::Incomplete(9)));
        // A multi-byte length split across reads.
        assert_eq!(check(&[0x30, 0x80], 1 << 20), Err(FrameError::Incomplete(1)));
    }

    #[test]
    fn oversize_refused_before_body() {
        // PUBLISH announcing 2,097,151 bytes, only the header present.
        assert_eq!(
            check(&[0x30, 0xff, 0xff, 0x7f], 256 * 1024),
            Err(FrameError::TooLarge { size: 2_097_155, max: 256 * 1024 })
        );
    }

    #[test]
    fn malformed_headers() {
        assert_eq!(check(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX), Err(FrameError::MalformedLength));
        assert_eq!(check(&[0x00, 0x00], 10), Err(FrameError::ReservedType));
    }

    #[test]
    fn qos0_has_no_packet_id() {
        let p = hex("30 06 00 01 61 68 69 21");
        let h = check(&p, 100).unwrap();
        assert_eq!(publish_packet_id(&p, &h), None);
    }
}
