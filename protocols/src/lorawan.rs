//! LoRaWAN 1.0.x uplinks of one activated device (ABP, or OTAA once joined), on the `lorawan`
//! crate: the MIC checked with the NwkSKey at the 32-bit frame counter reconstructed from the
//! 16 bits on air (with rollover), replays refused, FRMPayload decrypted (FPort 0 with the
//! NwkSKey, others with the AppSKey), MAC commands in FOpts or FPort 0 listed, and the same
//! uplink heard by several gateways taken once.

use ::lorawan::keys::AES128;
use ::lorawan::parser::{parse, DataHeader, DataPayload, FRMPayload, MHDRAble, MType, PhyPayload};
use std::collections::{HashMap, VecDeque};

/// Why an uplink was dropped (each counted by its reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Drop {
    /// Not a PHYPayload (too short, bad MHDR, ...).
    #[error("not a LoRaWAN PHYPayload: {0}")]
    Malformed(String),
    /// A join request, downlink or proprietary frame where a data uplink was expected.
    #[error("not a data uplink ({0})")]
    NotUplink(&'static str),
    /// No device with this DevAddr.
    #[error("unknown DevAddr {0:08X}")]
    UnknownDevAddr(u32),
    /// The MIC does not verify at any plausible frame counter.
    #[error("bad MIC")]
    Mic,
    /// The frame counter is not above the last one accepted.
    #[error("replayed frame counter {0} (last accepted {1})")]
    Replay(u32, u32),
    /// Already taken from another gateway.
    #[error("duplicate (heard by another gateway)")]
    Duplicate,
}

/// A device's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// DevAddr.
    pub dev_addr: u32,
    /// Network session key.
    pub nwk_skey: [u8; 16],
    /// Application session key.
    pub app_skey: [u8; 16],
    /// Last uplink frame counter accepted (None before the first).
    pub fcnt_up: Option<u32>,
    /// Next downlink frame counter.
    pub fcnt_down: u32,
}

/// An accepted uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    /// DevAddr.
    pub dev_addr: u32,
    /// Full 32-bit frame counter.
    pub fcnt: u32,
    /// FPort (None: no FRMPayload).
    pub fport: Option<u8>,
    /// Decrypted application payload (FPort 1-223), empty otherwise.
    pub payload: Vec<u8>,
    /// MAC commands (from FOpts, or the decrypted FRMPayload on FPort 0), raw.
    pub mac: Vec<u8>,
    /// A confirmed uplink: answer with ACK set in the next downlink.
    pub confirmed: bool,
    /// ADR bit.
    pub adr: bool,
}

/// The maximum gap between frame counters accepted (LoRaWAN 1.0's MAX_FCNT_GAP).
pub const MAX_FCNT_GAP: u32 = 16_384;

/// The 32-bit counters a 16-bit one may stand for after `last`, most likely first.
fn candidates(last: Option<u32>, on_air: u16) -> [u32; 2] {
    let base = last.unwrap_or(0);
    let same = (base & 0xFFFF_0000) | u32::from(on_air);
    let next = same.wrapping_add(0x1_0000);
    if last.is_some() && same <= base {
        [next, same]
    } else {
        [same, next]
    }
}

impl Session {
    /// Checks, counts and decrypts an uplink of this session.
    pub fn uplink(&mut self, phy: &[u8]) -> Result<Uplink, Drop> {
        let parsed = parse(phy.to_vec()).map_err(|e| Drop::Malformed(format!("{e:?}")))?;
        let PhyPayload::Data(DataPayload::Encrypted(data)) = parsed else {
            return Err(Drop::NotUplink("join or proprietary frame"));
        };
        let mtype = data.mhdr().mtype();
        let confirmed = match mtype {
            MType::UnconfirmedDataUp => false,
            MType::ConfirmedDataUp => true,
            _ => return Err(Drop::NotUplink("a downlink")),
        };
        let fhdr = data.fhdr();
        let mut addr = [0u8; 4];
        addr.copy_from_slice(fhdr.dev_addr().as_ref());
        let dev_addr = u32::from_le_bytes(addr);
        if dev_addr != self.dev_addr {
            return Err(Drop::UnknownDevAddr(dev_addr));
        }
        let on_air = fhdr.fcnt();
        let adr = fhdr.fctrl().adr();
        let fopts = fhdr.data().to_vec();
        let nwk = AES128(self.nwk_skey);
        let app = AES128(self.app_skey);
        let fcnt = candidates(self.fcnt_up, on_air)
            .into_iter()
            .find(|c| data.validate_mic(&nwk, *c))
            .ok_or(Drop::Mic)?;
        if let Some(last) = self.fcnt_up {
            if fcnt <= last || fcnt - last > MAX_FCNT_GAP {
                return Err(Drop::Replay(fcnt, last));
            }
        }
        let fport = data.f_port();
        let decrypted = data
            .decrypt(Some(&nwk), Some(&app), fcnt)
            .map_err(|e| Drop::Malformed(format!("{e:?}")))?;
        let (payload, mac) = match decrypted.frm_payload() {
            FRMPayload::Data(d) => (d.to_vec(), fopts),
            FRMPayload::MACCommands(m) => (Vec::new(), m.data().to_vec()),
            FRMPayload::None => (Vec::new(), fopts),
        };
        self.fcnt_up = Some(fcnt);
        Ok(Uplink {
            dev_addr,
            fcnt,
            fport,
            payload,
            mac,
            confirmed,
            adr,
        })
    }
}

/// (DevAddr, 16-bit frame counter, MIC): what identifies one transmission.
type Heard = (u32, u16, [u8; 4]);

/// Takes an uplink heard by several gateways once: keyed by (DevAddr, 16-bit counter, MIC),
/// remembered for `window_ms` and at most `max` keys.
#[derive(Debug)]
pub struct Dedup {
    seen: HashMap<Heard, i64>,
    order: VecDeque<(i64, Heard)>,
    window_ms: i64,
    max: usize,
}

impl Dedup {
    /// A de-duplicator.
    pub fn new(window_ms: i64, max: usize) -> Self {
        Self {
            seen: HashMap::new(),
            order: VecDeque::new(),
            window_ms,
            max,
        }
    }

    /// True the first time this PHYPayload's (DevAddr, FCnt, MIC) is seen within the window.
    pub fn first(&mut self, phy: &[u8], now_ms: i64) -> bool {
        while let Some((t, k)) = self.order.front().copied() {
            if now_ms - t < self.window_ms && self.order.len() < self.max {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&k) == Some(&t) {
                self.seen.remove(&k);
            }
        }
        let (Some(addr), Some(fcnt), Some(mic)) = (
            phy.get(1..5),
            phy.get(6..8),
            phy.len().checked_sub(4).and_then(|s| phy.get(s..)),
        ) else {
            return true;
        };
        let mut a = [0u8; 4];
        a.copy_from_slice(addr);
        let mut m = [0u8; 4];
        m.copy_from_slice(mic);
        let key = (
            u32::from_le_bytes(a),
            u16::from_le_bytes([fcnt[0], fcnt[1]]),
            m,
        );
        if self.seen.contains_key(&key) {
            return false;
        }
        self.seen.insert(key, now_ms);
        self.order.push_back((now_ms, key));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn key(s: &str) -> [u8; 16] {
        let v = hex(s);
        let mut k = [0u8; 16];
        k.copy_from_slice(&v);
        k
    }

    /// `shared/vectors/lorawan.toml` (source: lora-packet's tests).
    fn vector_session() -> Session {
        Session {
            dev_addr: 0x49BE_7DF1,
            nwk_skey: key("44024241ed4ce9a68c6a8bc055233fd3"),
            app_skey: key("ec925802ae430ca77fd3dd73cb2cc588"),
            fcnt_up: None,
            fcnt_down: 0,
        }
    }

    const UP: &str = "40F17DBE4900020001954378762B11FF0D";

    #[test]
    fn the_lora_packet_vector_decrypts_and_verifies() {
        let mut s = vector_session();
        let u = s.uplink(&hex(UP)).unwrap();
        assert_eq!(u.dev_addr, 0x49BE_7DF1);
        assert_eq!(u.fcnt, 2);
        assert_eq!(u.fport, Some(1));
        assert_eq!(u.payload, b"test");
        assert!(!u.confirmed);
        // The same frame again is a replay.
        assert_eq!(s.uplink(&hex(UP)), Err(Drop::Replay(2, 2)));
    }

    #[test]
    fn bad_input_is_dropped_with_its_reason() {
        let mut s = vector_session();
        let mut bad = hex(UP);
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert_eq!(s.uplink(&bad), Err(Drop::Mic));
        let mut other = vector_session();
        other.dev_addr = 1;
        assert!(matches!(
            other.uplink(&hex(UP)),
            Err(Drop::UnknownDevAddr(0x49BE_7DF1))
        ));
        assert!(matches!(s.uplink(&[0x40, 1, 2]), Err(Drop::Malformed(_))));
        for n in 0..hex(UP).len() {
            let _ = s.uplink(&hex(UP)[..n]);
        }
        // A join request is not a data uplink.
        let join = hex("0039363463336913AA05693574323831330489C65B1304");
        assert!(matches!(s.uplink(&join), Err(Drop::NotUplink(_))));
        // The downlink vector is not an uplink.
        assert!(matches!(
            s.uplink(&hex("60f17dbe4920020001f9d65d27")),
            Err(Drop::NotUplink(_))
        ));
    }

    #[test]
    fn counters_roll_over_and_replays_are_refused() {
        assert_eq!(candidates(None, 5), [5, 0x1_0005]);
        assert_eq!(candidates(Some(0xFFFE), 3), [0x1_0003, 3], "rollover first");
        assert_eq!(candidates(Some(0x1_0003), 4), [0x1_0004, 0x2_0004]);
        // The vector's counter is 2: a session that already accepted 0xFFFF reads it as 0x10002,
        // which the MIC (computed at 2) does not verify; read as 2 it is a replay.
        let mut s = vector_session();
        s.fcnt_up = Some(0xFFFF);
        assert_eq!(s.uplink(&hex(UP)), Err(Drop::Replay(2, 0xFFFF)));
        let mut s = vector_session();
        s.fcnt_up = Some(1);
        assert_eq!(s.uplink(&hex(UP)).unwrap().fcnt, 2);
    }

    #[test]
    fn an_uplink_heard_by_three_gateways_is_taken_once() {
        let mut d = Dedup::new(1000, 10_000);
        let p = hex(UP);
        assert!(d.first(&p, 0));
        assert!(!d.first(&p, 10));
        assert!(!d.first(&p, 20));
        assert!(
            d.first(&p, 2000),
            "a new window: the session's replay check decides"
        );
    }
}

#[cfg(test)]
mod join_vector {
    /// `shared/vectors/lorawan.toml` `[[join_request]]` (source: lora-packet's tests): its MIC
    /// verifies with the AppKey given, and not with another.
    #[test]
    fn the_join_request_vector_verifies_with_its_app_key() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let phy = hex("0039363463336913AA05693574323831330489C65B1304");
        let mut key = [0u8; 16];
        key.copy_from_slice(&hex("98929b92c49edba9676d646d3b612456"));
        let Ok(::lorawan::parser::PhyPayload::JoinRequest(jr)) = ::lorawan::parser::parse(phy)
        else {
            panic!("not a join request")
        };
        assert!(jr.validate_mic(&::lorawan::keys::AES128(key)));
        key[0] ^= 1;
        assert!(!jr.validate_mic(&::lorawan::keys::AES128(key)));
    }
}
