//! The Semtech UDP packet forwarder protocol (versions 1 and 2), sans IO: PUSH_DATA / PUSH_ACK,
//! PULL_DATA / PULL_ACK, PULL_RESP and TX_ACK datagrams, and the `rxpk` / `stat` / `txpk` JSON
//! they carry. Lenient where real forwarders are sloppy: base64 with or without padding (and
//! with whitespace), FSK `datr` as a number, unknown fields ignored; an `rxpk` with `stat` -1
//! (CRC error) is kept but marked so the caller drops it, counted.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Datagram identifiers.
pub mod ident {
    /// Gateway -> server: received packets and status.
    pub const PUSH_DATA: u8 = 0x00;
    /// Server -> gateway.
    pub const PUSH_ACK: u8 = 0x01;
    /// Gateway -> server: keep-alive, opens the downlink path.
    pub const PULL_DATA: u8 = 0x02;
    /// Server -> gateway: a packet to send.
    pub const PULL_RESP: u8 = 0x03;
    /// Server -> gateway.
    pub const PULL_ACK: u8 = 0x04;
    /// Gateway -> server: the outcome of a PULL_RESP (version 2).
    pub const TX_ACK: u8 = 0x05;
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Shorter than its header.
    #[error("datagram of {0} bytes is shorter than its header")]
    Short(usize),
    /// A protocol version other than 1 or 2.
    #[error("protocol version {0} (1 and 2 are known)")]
    Version(u8),
    /// An identifier this side does not expect.
    #[error("unexpected identifier 0x{0:02x}")]
    Identifier(u8),
    /// The JSON part is not valid.
    #[error("bad JSON: {0}")]
    Json(String),
}

/// A received packet (`rxpk`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RxPk {
    /// Concentrator timestamp, µs (wraps at 2^32).
    #[serde(default)]
    pub tmst: u32,
    /// UTC time of reception, when the gateway has GPS.
    #[serde(default)]
    pub time: Option<String>,
    /// Frequency, MHz.
    #[serde(default)]
    pub freq: f64,
    /// IF channel.
    #[serde(default)]
    pub chan: u32,
    /// RF chain.
    #[serde(default)]
    pub rfch: u32,
    /// CRC status: 1 OK, -1 failed, 0 no CRC.
    #[serde(default = "one")]
    pub stat: i32,
    /// "LORA" or "FSK".
    #[serde(default)]
    pub modu: String,
    /// "SF7BW125" for LoRa, a bit rate for FSK.
    #[serde(default)]
    pub datr: Value,
    /// Coding rate, e.g. "4/5".
    #[serde(default)]
    pub codr: Option<String>,
    /// RSSI, dBm.
    #[serde(default)]
    pub rssi: f64,
    /// LoRa SNR, dB.
    #[serde(default)]
    pub lsnr: Option<f64>,
    /// Payload size, bytes.
    #[serde(default)]
    pub size: u32,
    /// Payload, base64.
    pub data: String,
}

fn one() -> i32 {
    1
}

impl RxPk {
    /// The PHYPayload, decoding base64 leniently (padding optional, whitespace ignored).
    pub fn payload(&self) -> Result<Vec<u8>, String> {
        let clean: String = self
            .data
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '=')
            .collect();
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(clean.as_bytes())
            .map_err(|e| format!("rxpk.data is not base64: {e}"))
    }

    /// The data rate as text ("SF7BW125", or "50000" for FSK).
    pub fn data_rate(&self) -> String {
        match &self.datr {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => String::new(),
        }
    }

    /// The spreading factor (7-12) and bandwidth (kHz) of a LoRa data rate.
    pub fn lora_rate(&self) -> Option<(u8, u32)> {
        let d = self.data_rate();
        let rest = d.strip_prefix("SF")?;
        let (sf, bw) = rest.split_once("BW")?;
        Some((sf.parse().ok()?, bw.parse().ok()?))
    }
}

/// The body of a PUSH_DATA.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Push {
    /// Received packets.
    #[serde(default)]
    pub rxpk: Vec<RxPk>,
    /// Gateway status, as sent.
    #[serde(default)]
    pub stat: Option<Value>,
}

/// A datagram from a gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum Up {
    /// PUSH_DATA: answer PUSH_ACK with the token.
    Push {
        /// Protocol version.
        version: u8,
        /// Token.
        token: u16,
        /// Gateway EUI.
        gateway: u64,
        /// Packets and status.
        body: Push,
    },
    /// PULL_DATA: answer PULL_ACK; remember where the gateway is for PULL_RESP.
    Pull {
        /// Protocol version.
        version: u8,
        /// Token.
        token: u16,
        /// Gateway EUI.
        gateway: u64,
    },
    /// TX_ACK: the gateway's answer to a PULL_RESP.
    TxAck {
        /// Protocol version.
        version: u8,
        /// The PULL_RESP's token.
        token: u16,
        /// Gateway EUI.
        gateway: u64,
        /// `txpk_ack.error`: "NONE" (or absent) on success, else the reason.
        error: Option<String>,
    },
}

/// Parses a datagram from a gateway.
pub fn parse(b: &[u8]) -> Result<Up, Error> {
    let h = b.get(..4).ok_or(Error::Short(b.len()))?;
    let version = h[0];
    if version != 1 && version != 2 {
        return Err(Error::Version(version));
    }
    let token = u16::from_be_bytes([h[1], h[2]]);
    let eui = |b: &[u8]| -> Result<u64, Error> {
        let e = b.get(4..12).ok_or(Error::Short(b.len()))?;
        let mut a = [0u8; 8];
        a.copy_from_slice(e);
        Ok(u64::from_be_bytes(a))
    };
    match h[3] {
        ident::PUSH_DATA => {
            let gateway = eui(b)?;
            let body: Push =
                serde_json::from_slice(&b[12..]).map_err(|e| Error::Json(e.to_string()))?;
            Ok(Up::Push {
                version,
                token,
                gateway,
                body,
            })
        }
        ident::PULL_DATA => Ok(Up::Pull {
            version,
            token,
            gateway: eui(b)?,
        }),
        ident::TX_ACK => {
            let gateway = eui(b)?;
            let rest = &b[12..];
            let error = if rest.iter().all(|c| c.is_ascii_whitespace() || *c == 0) {
                None
            } else {
                let v: Value =
                    serde_json::from_slice(rest.split(|c| *c == 0).next().unwrap_or(rest))
                        .map_err(|e| Error::Json(e.to_string()))?;
                v["txpk_ack"]["error"]
                    .as_str()
                    .filter(|e| *e != "NONE")
                    .map(str::to_owned)
            };
            Ok(Up::TxAck {
                version,
                token,
                gateway,
                error,
            })
        }
        other => Err(Error::Identifier(other)),
    }
}

/// PUSH_ACK or PULL_ACK (`id`) for a token.
pub fn ack(version: u8, token: u16, id: u8) -> [u8; 4] {
    let t = token.to_be_bytes();
    [version, t[0], t[1], id]
}

/// A packet to send (`txpk`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TxPk {
    /// Send immediately (class C) instead of at `tmst`.
    pub imme: bool,
    /// Concentrator time to send at, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tmst: Option<u32>,
    /// Frequency, MHz.
    pub freq: f64,
    /// RF chain.
    pub rfch: u32,
    /// TX power, dBm.
    pub powe: u32,
    /// "LORA".
    pub modu: String,
    /// e.g. "SF9BW125".
    pub datr: String,
    /// e.g. "4/5".
    pub codr: String,
    /// Polarity inversion (true for downlinks to nodes).
    pub ipol: bool,
    /// Payload size.
    pub size: u32,
    /// Payload, base64.
    pub data: String,
}

impl TxPk {
    /// A LoRa downlink of `payload` at `tmst`.
    pub fn lora(tmst: u32, freq: f64, datr: &str, power: u32, payload: &[u8]) -> Self {
        Self {
            imme: false,
            tmst: Some(tmst),
            freq,
            rfch: 0,
            powe: power,
            modu: "LORA".into(),
            datr: datr.into(),
            codr: "4/5".into(),
            ipol: true,
            size: payload.len() as u32,
            data: base64::engine::general_purpose::STANDARD.encode(payload),
        }
    }
}

/// A PULL_RESP carrying `tx` (version 1 expects a zero token; version 2 matches TX_ACK by it).
pub fn pull_resp(version: u8, token: u16, tx: &TxPk) -> Vec<u8> {
    let token = if version == 1 { 0 } else { token };
    let t = token.to_be_bytes();
    let mut out = vec![version, t[0], t[1], ident::PULL_RESP];
    out.extend_from_slice(serde_json::json!({ "txpk": tx }).to_string().as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(json: &str) -> Vec<u8> {
        let mut b = vec![
            2,
            0x12,
            0x34,
            ident::PUSH_DATA,
            0xAA,
            0x55,
            0x5A,
            0,
            0,
            0,
            0,
            1,
        ];
        b.extend_from_slice(json.as_bytes());
        b
    }

    #[test]
    fn push_data_with_quirks_parses() {
        // The lora-packet vector's PHYPayload, padding removed; FSK datr as a number; an
        // unknown field; a CRC failure.
        let b = push(
            r#"{"rxpk":[
              {"tmst":3512348611,"chan":2,"rfch":0,"freq":866.349812,"stat":1,"modu":"LORA","datr":"SF7BW125","codr":"4/6","rssi":-35,"lsnr":5.1,"size":17,"data":"QPF9vkkAAgABlUN4disR/w0","brd":0},
              {"tmst":1,"freq":868.8,"stat":1,"modu":"FSK","datr":50000,"rssi":-75,"size":3,"data":"AQID"},
              {"tmst":2,"freq":868.1,"stat":-1,"modu":"LORA","datr":"SF12BW125","rssi":-120,"size":2,"data":"AQI="}
            ],"stat":{"time":"2026-11-26 10:00:00 GMT","rxnb":3}}"#,
        );
        let Up::Push {
            version,
            token,
            gateway,
            body,
        } = parse(&b).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (version, token, gateway),
            (2, 0x1234, 0xAA55_5A00_0000_0001)
        );
        assert_eq!(body.rxpk.len(), 3);
        let p = body.rxpk[0].payload().unwrap();
        assert_eq!(p.len(), 17);
        assert_eq!(p[0], 0x40);
        assert_eq!(body.rxpk[0].lora_rate(), Some((7, 125)));
        assert_eq!(body.rxpk[1].data_rate(), "50000");
        assert_eq!(body.rxpk[1].lora_rate(), None);
        assert_eq!(body.rxpk[2].stat, -1);
        assert!(body.stat.is_some());
        assert_eq!(ack(2, 0x1234, ident::PUSH_ACK), [2, 0x12, 0x34, 1]);
    }

    #[test]
    fn pull_data_tx_ack_and_pull_resp() {
        let b = [1, 0, 7, ident::PULL_DATA, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(
            parse(&b).unwrap(),
            Up::Pull {
                version: 1,
                token: 7,
                gateway: 0x0102_0304_0506_0708
            }
        );
        let mut t = vec![2, 0, 9, ident::TX_ACK, 1, 2, 3, 4, 5, 6, 7, 8];
        assert!(matches!(parse(&t).unwrap(), Up::TxAck { error: None, .. }));
        t.extend_from_slice(br#"{"txpk_ack":{"error":"TOO_LATE"}}"#);
        assert!(matches!(parse(&t).unwrap(), Up::TxAck { error: Some(e), .. } if e == "TOO_LATE"));
        let tx = TxPk::lora(1_000_000, 869.525, "SF9BW125", 14, &[0x20, 1, 2]);
        let r = pull_resp(2, 9, &tx);
        assert_eq!(&r[..4], &[2, 0, 9, ident::PULL_RESP]);
        let v: Value = serde_json::from_slice(&r[4..]).unwrap();
        assert_eq!(v["txpk"]["data"], "IAEC");
        assert_eq!(v["txpk"]["ipol"], true);
        assert_eq!(
            &pull_resp(1, 9, &tx)[1..3],
            &[0, 0],
            "version 1: zero token"
        );
    }

    #[test]
    fn bad_datagrams_are_clean_errors() {
        assert_eq!(parse(&[2, 0]), Err(Error::Short(2)));
        assert_eq!(parse(&[3, 0, 0, 0]), Err(Error::Version(3)));
        assert_eq!(parse(&[2, 0, 0, 9]), Err(Error::Identifier(9)));
        assert!(matches!(
            parse(&[2, 0, 0, ident::PUSH_DATA, 1, 2]),
            Err(Error::Short(_))
        ));
        assert!(matches!(
            parse(&push("{\"rxpk\":[{\"tmst\":1}")),
            Err(Error::Json(_))
        ));
        assert!(
            matches!(
                parse(&push("{\"rxpk\":[{\"tmst\":1}]}")),
                Err(Error::Json(_))
            ),
            "data is required"
        );
        let r = RxPk {
            tmst: 0,
            time: None,
            freq: 0.0,
            chan: 0,
            rfch: 0,
            stat: 1,
            modu: "LORA".into(),
            datr: Value::Null,
            codr: None,
            rssi: 0.0,
            lsnr: None,
            size: 0,
            data: "@@@".into(),
        };
        assert!(r.payload().is_err());
        // Every prefix of a good datagram: an error or a parse, never a panic.
        let good = push(r#"{"rxpk":[{"data":"AQID"}]}"#);
        for n in 0..good.len() {
            let _ = parse(&good[..n]);
        }
    }
}
