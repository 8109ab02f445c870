//! A sans-IO MQTT 3.1.1 client for microcontrollers: fed received bytes and the time, it
//! returns bytes to send and events. No allocation, no clock, no socket: the transport
//! (embassy-net, a host socket, a test) moves the bytes; the caller owns every buffer.
//!
//! One QoS 1 PUBLISH is in flight at a time (its encoded frame is kept in the client, `P`
//! bytes at most, and sent again with DUP until acknowledged, also after a reconnect).
//! Framing of received bytes goes through `ironlink_protocols::mqtt::check`, so an oversize
//! or malformed packet is an error of this connection, never a panic.

use heapless::Vec;
use ironlink_protocols::mqtt::{self as frame, FrameError, PacketType, PublishOut};

/// Quality of service (Alink uses 0 and 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QoS {
    /// At most once.
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
}

/// Why the client could not do what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The output buffer (or the in-flight copy, `P`) is too small for the packet.
    BufferTooSmall,
    /// A QoS 1 PUBLISH is still waiting for its PUBACK.
    Busy,
    /// Not connected (no CONNACK yet, or refused).
    NotConnected,
    /// The broker sent something MQTT 3.1.1 does not allow here: close the connection.
    Protocol,
    /// The broker answered no PINGREQ within the keepalive: close and reconnect.
    KeepaliveTimeout,
    /// A string longer than MQTT's 65,535 bytes.
    TooLong,
}

/// What a CONNECT carries.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions<'a> {
    /// Client id (with Alink's parameters, see [`crate::Credentials`]).
    pub client_id: &'a str,
    /// User name.
    pub username: Option<&'a str>,
    /// Password.
    pub password: Option<&'a str>,
    /// Keepalive, seconds (0: none).
    pub keepalive_s: u16,
    /// Start a clean session.
    pub clean_session: bool,
    /// Last will: topic, message, QoS, retain.
    pub will: Option<(&'a str, &'a [u8], QoS, bool)>,
}

/// Something the broker told the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'b> {
    /// CONNACK accepted; whether the broker kept a session.
    Connected {
        /// Session present flag.
        session_present: bool,
    },
    /// CONNACK refused with this return code (1 to 5).
    Refused(u8),
    /// A QoS 1 PUBLISH of ours was acknowledged.
    Published(u16),
    /// A message on a subscribed topic (its PUBACK, for QoS 1, is in the reply bytes).
    Message {
        /// Topic name.
        topic: &'b str,
        /// Payload.
        payload: &'b [u8],
        /// QoS it came with.
        qos: QoS,
    },
    /// SUBACK: packet id and the first granted QoS (0x80: refused).
    Subscribed(u16, u8),
    /// UNSUBACK.
    Unsubscribed(u16),
    /// PINGRESP.
    Pong,
    /// A PUBLISH larger than the largest packet accepted: its topic and the start of its
    /// payload (as much as had arrived); the rest is skipped as it arrives. Its PUBACK, for
    /// QoS 1, is in the reply bytes, so the broker does not send it again.
    Oversized {
        /// Topic name.
        topic: &'b str,
        /// The first bytes of the payload.
        head: &'b [u8],
        /// The whole packet's size, in bytes.
        size: usize,
        /// QoS it came with.
        qos: QoS,
    },
}

/// What [`Client::receive`] did with the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received<'b> {
    /// Input bytes used (0: the next packet is not complete yet).
    pub consumed: usize,
    /// The packet's meaning, if any.
    pub event: Option<Event<'b>>,
    /// Bytes written to the output buffer (a PUBACK to send).
    pub reply: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Disconnected,
    Connecting,
    Connected,
}

/// The client. `P`: the largest QoS 1 PUBLISH it can keep for retransmission.
#[derive(Debug)]
pub struct Client<const P: usize> {
    state: State,
    keepalive_ms: u64,
    retry_ms: u64,
    last_tx: u64,
    ping_sent: Option<u64>,
    next_pkid: u16,
    /// Packet id and last send time of the QoS 1 PUBLISH in flight; its frame in `frame`.
    inflight: Option<(u16, u64)>,
    /// Set when the connection was lost: the in-flight PUBLISH goes out after CONNACK.
    resend: bool,
    frame: Vec<u8, P>,
    max_packet: usize,
    /// Bytes of an oversized PUBLISH still to skip.
    discard: usize,
}

struct Out<'o> {
    buf: &'o mut [u8],
    at: usize,
    overflow: bool,
}

impl<'o> Out<'o> {
    fn new(buf: &'o mut [u8]) -> Self {
        Self {
            buf,
            at: 0,
            overflow: false,
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        match self.buf.get_mut(self.at..self.at + bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.at += bytes.len();
            }
            None => self.overflow = true,
        }
    }

    fn u16(&mut self, v: u16) {
        self.put(&v.to_be_bytes());
    }

    fn str(&mut self, s: &[u8]) -> Result<(), Error> {
        let len = u16::try_from(s.len()).map_err(|_| Error::TooLong)?;
        self.u16(len);
        self.put(s);
        Ok(())
    }

    fn remaining_length(&mut self, mut n: usize) {
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            self.put(&[b]);
            if n == 0 {
                break;
            }
        }
    }

    fn done(self) -> Result<usize, Error> {
        if self.overflow {
            Err(Error::BufferTooSmall)
        } else {
            Ok(self.at)
        }
    }
}

fn str_len(s: &[u8]) -> usize {
    2 + s.len()
}

impl<const P: usize> Default for Client<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const P: usize> Client<P> {
    /// A disconnected client; QoS 1 PUBLISHes are sent again after 10 s without a PUBACK.
    pub const fn new() -> Self {
        Self {
            state: State::Disconnected,
            keepalive_ms: 0,
            retry_ms: 10_000,
            last_tx: 0,
            ping_sent: None,
            next_pkid: 1,
            inflight: None,
            resend: false,
            frame: Vec::new(),
            max_packet: 4096,
            discard: 0,
        }
    }

    /// Largest packet accepted from the broker (default 4,096 bytes; at most the receive
    /// buffer). A larger PUBLISH is skipped ([`Event::Oversized`]); any other larger packet is
    /// a protocol error.
    pub fn set_max_packet(&mut self, bytes: usize) {
        self.max_packet = bytes;
    }

    /// True once CONNACK accepted the connection.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// True while a QoS 1 PUBLISH waits for its PUBACK.
    pub fn is_busy(&self) -> bool {
        self.inflight.is_some()
    }

    /// Writes a CONNECT into `out` for a new transport connection; returns its length.
    pub fn connect(
        &mut self,
        o: &ConnectOptions<'_>,
        now_ms: u64,
        out: &mut [u8],
    ) -> Result<usize, Error> {
        let mut flags = 0u8;
        let mut len = 10 + str_len(o.client_id.as_bytes());
        if o.clean_session {
            flags |= 0x02;
        }
        if let Some((topic, msg, qos, retain)) = o.will {
            flags |= 0x04 | ((qos as u8) << 3) | if retain { 0x20 } else { 0 };
            len += str_len(topic.as_bytes()) + str_len(msg);
        }
        if let Some(u) = o.username {
            flags |= 0x80;
            len += str_len(u.as_bytes());
        }
        if let Some(p) = o.password {
            flags |= 0x40;
            len += str_len(p.as_bytes());
        }
        let mut w = Out::new(out);
        w.put(&[0x10]);
        w.remaining_length(len);
        w.str(b"MQTT")?;
        w.put(&[4, flags]);
        w.u16(o.keepalive_s);
        w.str(o.client_id.as_bytes())?;
        if let Some((topic, msg, _, _)) = o.will {
            w.str(topic.as_bytes())?;
            w.str(msg)?;
        }
        if let Some(u) = o.username {
            w.str(u.as_bytes())?;
        }
        if let Some(p) = o.password {
            w.str(p.as_bytes())?;
        }
        let n = w.done()?;
        self.state = State::Connecting;
        self.keepalive_ms = u64::from(o.keepalive_s) * 1000;
        self.last_tx = now_ms;
        self.ping_sent = None;
        Ok(n)
    }

    fn pkid(&mut self) -> u16 {
        let id = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        id
    }

    /// Writes a PUBLISH into `out`; for QoS 1 returns its packet id too (then the client is
    /// busy until [`Event::Published`] with that id).
    pub fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        retain: bool,
        now_ms: u64,
        out: &mut [u8],
    ) -> Result<(usize, Option<u16>), Error> {
        if self.state != State::Connected {
            return Err(Error::NotConnected);
        }
        if qos == QoS::AtLeastOnce && self.inflight.is_some() {
            return Err(Error::Busy);
        }
        let packet_id = if qos == QoS::AtLeastOnce {
            self.next_pkid
        } else {
            0
        };
        let p = PublishOut {
            topic,
            payload,
            qos: qos as u8,
            packet_id,
            retain,
            dup: false,
            v5: false,
        };
        let mut w = Out::new(out);
        frame::encode_publish(&p, |b| w.put(b)).map_err(|_| Error::TooLong)?;
        let n = w.done()?;
        self.last_tx = now_ms;
        if qos == QoS::AtMostOnce {
            return Ok((n, None));
        }
        self.frame.clear();
        self.frame
            .extend_from_slice(&out[..n])
            .map_err(|_| Error::BufferTooSmall)?;
        let id = self.pkid();
        self.inflight = Some((id, now_ms));
        Ok((n, Some(id)))
    }

    /// Writes a SUBSCRIBE of one filter into `out`; returns its length and packet id.
    pub fn subscribe(
        &mut self,
        filter: &str,
        qos: QoS,
        out: &mut [u8],
    ) -> Result<(usize, u16), Error> {
        if self.state != State::Connected {
            return Err(Error::NotConnected);
        }
        let id = self.pkid();
        let mut w = Out::new(out);
        w.put(&[0x82]);
        w.remaining_length(2 + str_len(filter.as_bytes()) + 1);
        w.u16(id);
        w.str(filter.as_bytes())?;
        w.put(&[qos as u8]);
        Ok((w.done()?, id))
    }

    /// Writes a DISCONNECT into `out`; the client is disconnected.
    pub fn disconnect(&mut self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = Out::new(out);
        w.put(&[0xe0, 0x00]);
        self.state = State::Disconnected;
        w.done()
    }

    /// The transport connection was lost: the QoS 1 PUBLISH in flight is sent again (DUP)
    /// after the next CONNACK.
    pub fn connection_lost(&mut self) {
        self.state = State::Disconnected;
        self.discard = 0;
        self.resend = self.inflight.is_some();
    }

    /// What is due at `now_ms`: the QoS 1 PUBLISH again (with DUP) when its PUBACK is late,
    /// or a PINGREQ when nothing was sent for the keepalive. Returns the bytes written.
    /// `Err(KeepaliveTimeout)` when a PINGREQ went unanswered for a whole keepalive.
    pub fn poll(&mut self, now_ms: u64, out: &mut [u8]) -> Result<usize, Error> {
        if self.state != State::Connected {
            return Ok(0);
        }
        if let Some(sent) = self.ping_sent {
            if now_ms.saturating_sub(sent) >= self.keepalive_ms.max(1000) {
                self.state = State::Disconnected;
                return Err(Error::KeepaliveTimeout);
            }
        }
        if let Some((id, sent)) = self.inflight {
            if self.resend || now_ms.saturating_sub(sent) >= self.retry_ms {
                self.resend = false;
                let f = self.frame.as_slice();
                let dst = out.get_mut(..f.len()).ok_or(Error::BufferTooSmall)?;
                dst.copy_from_slice(f);
                dst[0] |= 0x08; // DUP
                self.inflight = Some((id, now_ms));
                self.last_tx = now_ms;
                return Ok(f.len());
            }
        }
        if self.keepalive_ms > 0
            && self.ping_sent.is_none()
            && now_ms.saturating_sub(self.last_tx) >= self.keepalive_ms
        {
            let dst = out.get_mut(..2).ok_or(Error::BufferTooSmall)?;
            dst.copy_from_slice(&[0xc0, 0x00]);
            self.ping_sent = Some(now_ms);
            self.last_tx = now_ms;
            return Ok(2);
        }
        Ok(0)
    }

    /// Takes the next packet from `input` (received bytes, possibly several packets or a part
    /// of one). For a QoS 1 message, its PUBACK is written to `out`.
    pub fn receive<'b>(
        &mut self,
        input: &'b [u8],
        now_ms: u64,
        out: &mut [u8],
    ) -> Result<Received<'b>, Error> {
        let none = Received {
            consumed: 0,
            event: None,
            reply: 0,
        };
        if self.discard > 0 {
            let n = self.discard.min(input.len());
            self.discard -= n;
            return Ok(Received {
                consumed: n,
                ..none
            });
        }
        let h = match frame::check(input, self.max_packet) {
            Ok(h) => h,
            Err(FrameError::Incomplete(_)) => return Ok(none),
            Err(FrameError::TooLarge { .. }) => return self.oversized(input, now_ms, out),
            Err(_) => return Err(Error::Protocol),
        };
        let n = h.frame_len();
        let body = input.get(h.header_len..n).ok_or(Error::Protocol)?;
        let mut r = Received {
            consumed: n,
            event: None,
            reply: 0,
        };
        let id = |b: &[u8]| -> Result<u16, Error> {
            match b {
                [a, c, ..] => Ok(u16::from_be_bytes([*a, *c])),
                _ => Err(Error::Protocol),
            }
        };
        match (h.kind, self.state) {
            (PacketType::ConnAck, State::Connecting) => {
                let [ack_flags, code] = body else {
                    return Err(Error::Protocol);
                };
                if *code == 0 {
                    self.state = State::Connected;
                    r.event = Some(Event::Connected {
                        session_present: ack_flags & 1 == 1,
                    });
                } else {
                    self.state = State::Disconnected;
                    r.event = Some(Event::Refused(*code));
                }
            }
            (PacketType::Publish, State::Connected) => {
                let qos = match h.qos() {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => return Err(Error::Protocol),
                };
                let tlen = usize::from(id(body)?);
                let topic = body.get(2..2 + tlen).ok_or(Error::Protocol)?;
                let topic = core::str::from_utf8(topic).map_err(|_| Error::Protocol)?;
                let mut at = 2 + tlen;
                if qos == QoS::AtLeastOnce {
                    let pkid = id(body.get(at..).ok_or(Error::Protocol)?)?;
                    at += 2;
                    let mut w = Out::new(out);
                    w.put(&[0x40, 0x02]);
                    w.u16(pkid);
                    r.reply = w.done()?;
                    self.last_tx = now_ms;
                }
                r.event = Some(Event::Message {
                    topic,
                    payload: body.get(at..).ok_or(Error::Protocol)?,
                    qos,
                });
            }
            (PacketType::PubAck, State::Connected) => {
                let pkid = id(body)?;
                if self.inflight.is_some_and(|(i, _)| i == pkid) {
                    self.inflight = None;
                    self.frame.clear();
                }
                r.event = Some(Event::Published(pkid));
            }
            (PacketType::SubAck, State::Connected) => {
                let pkid = id(body)?;
                let granted = *body.get(2).ok_or(Error::Protocol)?;
                r.event = Some(Event::Subscribed(pkid, granted));
            }
            (PacketType::UnsubAck, State::Connected) => {
                r.event = Some(Event::Unsubscribed(id(body)?));
            }
            (PacketType::PingResp, State::Connected) => {
                self.ping_sent = None;
                r.event = Some(Event::Pong);
            }
            _ => return Err(Error::Protocol),
        }
        Ok(r)
    }
}

impl<const P: usize> Client<P> {
    /// A PUBLISH over the size limit: reported with its topic and the payload bytes at hand,
    /// acknowledged, and the rest of it skipped.
    fn oversized<'b>(
        &mut self,
        input: &'b [u8],
        now_ms: u64,
        out: &mut [u8],
    ) -> Result<Received<'b>, Error> {
        let h = frame::peek_header(input).map_err(|_| Error::Protocol)?;
        if h.kind != PacketType::Publish || self.state != State::Connected {
            return Err(Error::Protocol);
        }
        let qos = match h.qos() {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => return Err(Error::Protocol),
        };
        let wait = Received {
            consumed: 0,
            event: None,
            reply: 0,
        };
        let body = &input[h.header_len..];
        let Some(tlen) = body
            .get(..2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            return Ok(wait);
        };
        let at = 2 + tlen + if qos == QoS::AtLeastOnce { 2 } else { 0 };
        if at > h.remaining_len {
            return Err(Error::Protocol);
        }
        if body.len() < at {
            // The topic has not all arrived; a receive buffer that cannot hold it never will.
            return if input.len() >= self.max_packet {
                Err(Error::Protocol)
            } else {
                Ok(wait)
            };
        }
        let topic = core::str::from_utf8(&body[2..2 + tlen]).map_err(|_| Error::Protocol)?;
        let mut reply = 0;
        if qos == QoS::AtLeastOnce {
            let mut w = Out::new(out);
            w.put(&[0x40, 0x02]);
            w.put(&body[2 + tlen..at]);
            reply = w.done()?;
            self.last_tx = now_ms;
        }
        let size = h.frame_len();
        let consumed = input.len().min(size);
        self.discard = size - consumed;
        Ok(Received {
            consumed,
            event: Some(Event::Oversized {
                topic,
                head: &body[at..consumed - h.header_len],
                size,
                qos,
            }),
            reply,
        })
    }
}

/// Reconnect delays: exponential from `base_ms` up to `max_ms`, with full jitter from a
/// random number the caller draws (no RNG in here).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    base_ms: u32,
    max_ms: u32,
    attempt: u8,
}

impl Backoff {
    /// Delays between `base_ms` and `max_ms`.
    pub const fn new(base_ms: u32, max_ms: u32) -> Self {
        Self {
            base_ms,
            max_ms,
            attempt: 0,
        }
    }

    /// The delay before the next attempt, from a uniformly random `random`.
    pub fn next_delay(&mut self, random: u32) -> u32 {
        let cap = self
            .base_ms
            .checked_shl(u32::from(self.attempt))
            .unwrap_or(u32::MAX)
            .min(self.max_ms)
            .max(1);
        self.attempt = self.attempt.saturating_add(1).min(31);
        random % cap.saturating_add(1)
    }

    /// After a successful connection: start again from `base_ms`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4;

    fn connected() -> Client<512> {
        let mut c = Client::<512>::new();
        let mut out = [0u8; 128];
        let o = ConnectOptions {
            client_id: "c",
            username: None,
            password: None,
            keepalive_s: 30,
            clean_session: true,
            will: None,
        };
        c.connect(&o, 0, &mut out).unwrap();
        let r = c.receive(&[0x20, 0x02, 0x00, 0x00], 0, &mut out).unwrap();
        assert_eq!(
            r.event,
            Some(Event::Connected {
                session_present: false
            })
        );
        c
    }

    /// The published CONNECT vector (shared/vectors/mqtt.toml), and a full CONNECT read back
    /// by rumqttc's decoder (code we did not write).
    #[test]
    fn connect_matches_the_vector_and_another_decoder() {
        let mut c = Client::<64>::new();
        let mut out = [0u8; 256];
        let o = ConnectOptions {
            client_id: "",
            username: None,
            password: None,
            keepalive_s: 30,
            clean_session: true,
            will: None,
        };
        let n = c.connect(&o, 0, &mut out).unwrap();
        assert_eq!(
            &out[..n],
            &[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 0x1e, 0, 0]
        );
        let o = ConnectOptions {
            client_id: "a1pk.dev|securemode=3,signmethod=hmacsha256|",
            username: Some("dev&a1pk"),
            password: Some("00ff"),
            keepalive_s: 60,
            clean_session: true,
            will: Some(("/a1pk/dev/user/will", b"gone", QoS::AtLeastOnce, false)),
        };
        let n = c.connect(&o, 0, &mut out).unwrap();
        let mut b = BytesMut::from(&out[..n]);
        match v4::Packet::read(&mut b, 1 << 16).unwrap() {
            v4::Packet::Connect(c) => {
                assert_eq!(c.client_id, o.client_id);
                assert_eq!(c.keep_alive, 60);
                let l = c.login.unwrap();
                assert_eq!(
                    (l.username.as_str(), l.password.as_str()),
                    ("dev&a1pk", "00ff")
                );
                let w = c.last_will.unwrap();
                assert_eq!(
                    (w.topic.as_ref(), w.message.as_ref()),
                    (&b"/a1pk/dev/user/will"[..], &b"gone"[..])
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.connect(&o, 0, &mut out[..20]), Err(Error::BufferTooSmall));
    }

    #[test]
    fn qos1_is_kept_until_acked_and_resent_with_dup() {
        let mut c = connected();
        let mut out = [0u8; 256];
        let (n, id) = c
            .publish("/a/b", b"{}", QoS::AtLeastOnce, false, 0, &mut out)
            .unwrap();
        let id = id.unwrap();
        let mut b = BytesMut::from(&out[..n]);
        match v4::Packet::read(&mut b, 1024).unwrap() {
            v4::Packet::Publish(p) => {
                assert_eq!((p.pkid, p.topic.as_ref(), p.dup), (id, &b"/a/b"[..], false))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.publish("/a/b", b"x", QoS::AtLeastOnce, false, 1, &mut out),
            Err(Error::Busy)
        );
        assert_eq!(c.poll(5_000, &mut out), Ok(0), "not late yet");
        let n = c.poll(10_000, &mut out).unwrap();
        let mut b = BytesMut::from(&out[..n]);
        match v4::Packet::read(&mut b, 1024).unwrap() {
            v4::Packet::Publish(p) => assert!(p.dup && p.pkid == id),
            other => panic!("{other:?}"),
        }
        // Lost connection: sent again right after the next CONNACK.
        c.connection_lost();
        let o = ConnectOptions {
            client_id: "c",
            username: None,
            password: None,
            keepalive_s: 30,
            clean_session: false,
            will: None,
        };
        c.connect(&o, 11_000, &mut out).unwrap();
        c.receive(&[0x20, 0x02, 0x01, 0x00], 11_000, &mut out)
            .unwrap();
        assert!(c.poll(11_001, &mut out).unwrap() > 0);
        let mut ack = BytesMut::new();
        v4::PubAck::new(id).write(&mut ack).unwrap();
        let r = c.receive(&ack, 11_002, &mut out).unwrap();
        assert_eq!(r.event, Some(Event::Published(id)));
        assert!(!c.is_busy());
    }

    #[test]
    fn keepalive_pings_and_times_out_with_a_simulated_clock() {
        let mut c = connected();
        let mut out = [0u8; 16];
        assert_eq!(c.poll(29_999, &mut out), Ok(0));
        assert_eq!(c.poll(30_000, &mut out), Ok(2));
        assert_eq!(&out[..2], &[0xc0, 0]);
        let r = c.receive(&[0xd0, 0x00], 30_100, &mut out).unwrap();
        assert_eq!(r.event, Some(Event::Pong));
        assert_eq!(c.poll(60_100, &mut out), Ok(2));
        assert_eq!(c.poll(90_100, &mut out), Err(Error::KeepaliveTimeout));
        assert!(!c.is_connected());
    }

    #[test]
    fn messages_are_acked_and_partial_input_waits() {
        let mut c = connected();
        let mut out = [0u8; 16];
        let mut sub = [0u8; 64];
        let (n, id) = c
            .subscribe("/sys/pk/dn/thing/service/+", QoS::AtLeastOnce, &mut sub)
            .unwrap();
        let mut s = BytesMut::from(&sub[..n]);
        match v4::Packet::read(&mut s, 1024).unwrap() {
            v4::Packet::Subscribe(s) => {
                assert_eq!(s.pkid, id);
                assert_eq!(s.filters[0].path, "/sys/pk/dn/thing/service/+");
            }
            other => panic!("{other:?}"),
        }
        let suback = [0x90, 0x03, (id >> 8) as u8, id as u8, 0x01];
        let r = c.receive(&suback, 0, &mut out).unwrap();
        assert_eq!(r.event, Some(Event::Subscribed(id, 1)));
        let mut b = BytesMut::new();
        let mut p = v4::Publish::new(
            "/sys/pk/dn/thing/service/property/set",
            rumqttc::QoS::AtLeastOnce,
            b"{\"id\":\"1\"}".to_vec(),
        );
        p.pkid = 7;
        p.write(&mut b).unwrap();
        assert_eq!(c.receive(&b[..5], 0, &mut out).unwrap().consumed, 0);
        let r = c.receive(&b, 0, &mut out).unwrap();
        assert_eq!(r.consumed, b.len());
        assert_eq!(
            r.event,
            Some(Event::Message {
                topic: "/sys/pk/dn/thing/service/property/set",
                payload: b"{\"id\":\"1\"}",
                qos: QoS::AtLeastOnce
            })
        );
        assert_eq!(&out[..r.reply], &[0x40, 2, 0, 7]);
    }

    /// Seeded garbage after CONNACK: an error or an event, never a panic.
    /// A PUBLISH larger than the limit is reported with its topic and first bytes, acknowledged,
    /// and skipped as it arrives in pieces; the packet after it is read as usual.
    #[test]
    fn oversized_publish_is_skipped_and_acknowledged() {
        let mut c = connected();
        c.set_max_packet(64);
        let mut out = [0u8; 16];
        let payload = [b'x'; 200];
        let p = v4::Publish {
            dup: false,
            qos: rumqttc::mqttbytes::QoS::AtLeastOnce,
            retain: false,
            topic: "/sys/pk/dn/thing/service/property/set".into(),
            pkid: 9,
            payload: bytes::Bytes::copy_from_slice(&payload),
        };
        let mut b = BytesMut::new();
        p.write(&mut b).unwrap();
        b.extend_from_slice(&[0xd0, 0x00]); // PINGRESP after it
        let wire = b.to_vec();
        // Arrives in a 64-byte receive buffer, a piece at a time.
        let r = c.receive(&wire[..64], 0, &mut out).unwrap();
        match r.event {
            Some(Event::Oversized {
                topic,
                head,
                size,
                qos,
            }) => {
                assert_eq!(topic, "/sys/pk/dn/thing/service/property/set");
                assert_eq!(qos, QoS::AtLeastOnce);
                assert_eq!(size, wire.len() - 2);
                assert!(!head.is_empty() && head.iter().all(|&c| c == b'x'));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(&out[..r.reply], &[0x40, 0x02, 0x00, 0x09]);
        let mut at = r.consumed;
        while at < wire.len() - 2 {
            let r = c
                .receive(&wire[at..(at + 64).min(wire.len())], 0, &mut out)
                .unwrap();
            assert!(r.consumed > 0);
            if at + r.consumed < wire.len() - 2 {
                assert_eq!(r.event, None);
            }
            at += r.consumed;
        }
        assert_eq!(at, wire.len() - 2);
        let r = c.receive(&wire[at..], 0, &mut out).unwrap();
        assert_eq!(r.event, Some(Event::Pong));
        // Any other oversized packet is a protocol error.
        assert_eq!(
            c.receive(&[0x90, 0x7f, 0, 1], 0, &mut out),
            Err(Error::Protocol)
        );
    }

    #[test]
    fn mutated_input_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut base = BytesMut::new();
        let mut p = v4::Publish::new(
            "/sys/pk/dn/thing/service/x",
            rumqttc::QoS::AtLeastOnce,
            b"{}".to_vec(),
        );
        p.pkid = 3;
        p.write(&mut base).unwrap();
        let mut out = [0u8; 32];
        for _ in 0..20_000 {
            let mut c = connected();
            let mut f = base.to_vec();
            for _ in 0..(rnd() % 4 + 1) {
                let i = (rnd() as usize) % f.len();
                f[i] = rnd() as u8;
            }
            f.truncate((rnd() as usize) % (f.len() + 1));
            let _ = c.receive(&f, 0, &mut out);
        }
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new(100, 1_000);
        let caps: std::vec::Vec<u32> = (0..6).map(|_| b.next_delay(u32::MAX - 1)).collect();
        assert!(caps.windows(2).all(|w| w[0] <= w[1]), "{caps:?}");
        assert!(caps.iter().all(|d| *d <= 1_000), "{caps:?}");
        assert_eq!(b.next_delay(0), 0, "full jitter reaches 0");
        b.reset();
        assert!(b.next_delay(u32::MAX - 1) <= 100);
    }
}
