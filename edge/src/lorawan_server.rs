//! A small LoRaWAN network server in the edge for the LoRa gateways on site: Semtech UDP
//! packet forwarders push what they hear; nodes join over the air (OTAA: the join request's
//! MIC checked with the AppKey, DevNonces never reused, a DevAddr derived from the DevEUI,
//! session keys derived, the join accept sent through PULL_RESP at JOIN_ACCEPT_DELAY1) or are
//! activated by personalisation (ABP); their uplinks are checked and
//! decrypted (`lora`), decoded (Cayenne LPP, or the raw bytes as hex) and posted as properties
//! of the node, a sub-device of the edge named by its DevEUI (registered in the cloud's
//! registry like vehicle terminals). Confirmed uplinks and LinkCheckReq are answered in RX1
//! through the gateway that heard the uplink best; the cloud's `Downlink` calls wait for the
//! node's next uplink (class A). Frame counters survive restarts (`lorawan-sessions.json`
//! beside the queue, written once a second and at shutdown; joins at once). Every dropped
//! packet is counted by its reason.

use crate::config::{LoraDevice, LoraServer};
use crate::link::{Command, Op, Outcome};
use crate::vehicle::{self, answer, at, Ctx};
use ironlink_protocols::lorawan::{Dedup, Session};
use ironlink_protocols::semtech::{self, ident, TxPk, Up};
use lorawan::creator::{DataPayloadCreator, JoinAcceptCreator};
use lorawan::keys::{AppKey, AppSKey, NewSKey, AES128};
use lorawan::maccommands::SerializableMacCommand;
use lorawan::parser::{parse, DecryptedJoinAcceptPayload, PhyPayload};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;

/// A node, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct Node {
    /// DevEUI, lowercase hex (the device name).
    pub dev_eui: String,
    /// Its session.
    pub session: Session,
    /// "cayenne", "layout" or "raw".
    pub decoder: String,
    /// The byte layout (decoder "layout"; also encodes property sets).
    pub layout: Vec<crate::layout::Field>,
    /// FPort of property-set downlinks.
    pub downlink_fport: u8,
}

fn hex_bytes<const N: usize>(s: &str, what: &str) -> Result<[u8; N], String> {
    let s: String = s
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | ' '))
        .collect();
    if s.len() != N * 2 {
        return Err(format!("{what}: {} hex digits expected", N * 2));
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o =
            u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).map_err(|_| format!("{what}: not hex"))?;
    }
    Ok(out)
}

/// A node over the air, before or between joins.
#[derive(Debug, Clone)]
pub struct Otaa {
    /// DevEUI, lowercase hex.
    pub dev_eui: String,
    /// AppKey.
    pub app_key: [u8; 16],
    /// Decoder.
    pub decoder: String,
    /// The byte layout.
    pub layout: Vec<crate::layout::Field>,
    /// FPort of property-set downlinks.
    pub downlink_fport: u8,
}

/// A configured node.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// Activated by personalisation.
    Abp(Node),
    /// Joins over the air.
    Otaa(Otaa),
}

/// Resolves a configured device: OTAA with `app_key`, else ABP with `dev_addr`, `nwk_skey`
/// and `app_skey`.
pub fn resolve(d: &LoraDevice) -> Result<Resolved, String> {
    let eui = hex_bytes::<8>(&d.dev_eui, "dev_eui")?;
    let decoder = d.decoder.clone().unwrap_or_else(|| "cayenne".into());
    if !matches!(decoder.as_str(), "cayenne" | "raw" | "layout") {
        return Err(format!(
            "decoder: `{decoder}` is not cayenne, layout or raw"
        ));
    }
    if decoder == "layout" && d.layout.is_empty() {
        return Err("decoder = \"layout\" needs [[lorawan.devices.layout]] fields".into());
    }
    for f in &d.layout {
        f.check()?;
    }
    let downlink_fport = d.downlink_fport.unwrap_or(1);
    if !(1..=223).contains(&downlink_fport) {
        return Err("downlink_fport: 1-223".into());
    }
    let layout = d.layout.clone();
    if let Some(k) = &d.app_key {
        if d.dev_addr.is_some() || d.nwk_skey.is_some() || d.app_skey.is_some() {
            return Err("either app_key (OTAA) or dev_addr, nwk_skey and app_skey (ABP)".into());
        }
        return Ok(Resolved::Otaa(Otaa {
            dev_eui: eui.iter().map(|b| format!("{b:02x}")).collect(),
            app_key: hex_bytes::<16>(k, "app_key")?,
            decoder,
            layout,
            downlink_fport,
        }));
    }
    let (Some(addr), Some(nwk), Some(app)) = (&d.dev_addr, &d.nwk_skey, &d.app_skey) else {
        return Err("ABP needs dev_addr, nwk_skey and app_skey; OTAA needs app_key".into());
    };
    Ok(Resolved::Abp(Node {
        dev_eui: eui.iter().map(|b| format!("{b:02x}")).collect(),
        session: Session {
            dev_addr: u32::from_be_bytes(hex_bytes::<4>(addr, "dev_addr")?),
            nwk_skey: hex_bytes::<16>(nwk, "nwk_skey")?,
            app_skey: hex_bytes::<16>(app, "app_skey")?,
            fcnt_up: None,
            fcnt_down: 0,
        },
        decoder,
        layout,
        downlink_fport,
    }))
}

/// The DevAddr given to an OTAA node: NwkID 0, the other 25 bits from the DevEUI (FNV-1a),
/// moved on while another node holds it.
fn dev_addr_for(dev_eui: &str, taken: impl Fn(u32) -> bool) -> u32 {
    let mut h: u32 = 0x811C_9DC5;
    for b in dev_eui.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let mut a = h & 0x01FF_FFFF;
    while taken(a) {
        a = (a + 1) & 0x01FF_FFFF;
    }
    a
}

/// Where a gateway's downlinks go.
#[derive(Debug, Clone, Copy)]
struct Gateway {
    addr: SocketAddr,
    version: u8,
}

/// A class A downlink: FPort, payload, the call, when it was queued.
type Queued = (u8, Vec<u8>, Command, std::time::Instant);

struct State {
    ctx: Arc<Ctx>,
    cfg: LoraServer,
    nodes: HashMap<u32, Node>,
    /// OTAA nodes by DevEUI (wire order: little-endian bytes), with the DevNonces they used.
    otaa: HashMap<[u8; 8], (Otaa, Vec<u16>)>,
    gateways: HashMap<u64, Gateway>,
    dedup: Dedup,
    /// Class A downlinks waiting for their node's next uplink, by DevEUI.
    queued: HashMap<String, VecDeque<Queued>>,
    counters_file: PathBuf,
    token: u16,
    /// When each node last answered (or was asked) DevStatusReq.
    dev_status_at: HashMap<String, std::time::Instant>,
    /// Frame counters changed since the last save.
    dirty: bool,
    /// RX2 variants of downlinks sent in RX1, by PULL_RESP token, until their TX_ACK.
    rx2: HashMap<u16, (Gateway, TxPk, std::time::Instant)>,
}

impl State {
    fn save_counters(&self) {
        let hex = |k: &[u8]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut m: BTreeMap<&str, Value> = self
            .nodes
            .values()
            .map(|n| {
                (
                    n.dev_eui.as_str(),
                    json!({"fcnt_up": n.session.fcnt_up, "fcnt_down": n.session.fcnt_down,
                           "dev_addr": n.session.dev_addr, "nwk_skey": hex(&n.session.nwk_skey),
                           "app_skey": hex(&n.session.app_skey)}),
                )
            })
            .collect();
        for (o, nonces) in self.otaa.values() {
            let e = m.entry(o.dev_eui.as_str()).or_insert_with(|| json!({}));
            e["dev_nonces"] = json!(nonces);
        }
        let tmp = self.counters_file.with_extension("json.tmp");
        if std::fs::write(&tmp, serde_json::to_vec(&m).unwrap_or_default())
            .and_then(|_| std::fs::rename(&tmp, &self.counters_file))
            .is_err()
        {
            tracing::warn!("LoRaWAN frame counters not saved");
        }
    }

    fn load_counters(&mut self) {
        let Ok(b) = std::fs::read(&self.counters_file) else {
            return;
        };
        let Ok(m) = serde_json::from_slice::<BTreeMap<String, Value>>(&b) else {
            tracing::warn!("lorawan-sessions.json unreadable: counters start over");
            return;
        };
        for n in self.nodes.values_mut() {
            if let Some(v) = m.get(&n.dev_eui) {
                n.session.fcnt_up = v["fcnt_up"].as_u64().map(|x| x as u32);
                n.session.fcnt_down = v["fcnt_down"].as_u64().unwrap_or(0) as u32;
            }
        }
        // Joined OTAA nodes keep their sessions; every node keeps its used DevNonces.
        for (o, nonces) in self.otaa.values_mut() {
            let Some(v) = m.get(&o.dev_eui) else { continue };
            nonces.extend(
                v["dev_nonces"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n.as_u64().map(|n| n as u16)),
            );
            let (Some(addr), Some(nwk), Some(app)) = (
                v["dev_addr"].as_u64(),
                v["nwk_skey"]
                    .as_str()
                    .and_then(|k| hex_bytes::<16>(k, "").ok()),
                v["app_skey"]
                    .as_str()
                    .and_then(|k| hex_bytes::<16>(k, "").ok()),
            ) else {
                continue;
            };
            self.nodes.insert(
                addr as u32,
                Node {
                    dev_eui: o.dev_eui.clone(),
                    session: Session {
                        dev_addr: addr as u32,
                        nwk_skey: nwk,
                        app_skey: app,
                        fcnt_up: v["fcnt_up"].as_u64().map(|x| x as u32),
                        fcnt_down: v["fcnt_down"].as_u64().unwrap_or(0) as u32,
                    },
                    decoder: o.decoder.clone(),
                    layout: o.layout.clone(),
                    downlink_fport: o.downlink_fport,
                },
            );
        }
    }

    async fn push(&mut self, sock: &UdpSocket, from: SocketAddr, rx: semtech::RxPk, gw: u64) {
        let c = &self.ctx.counters;
        if rx.stat == -1 {
            c.refuse("CRC error");
            return;
        }
        let phy = match rx.payload() {
            Ok(p) => p,
            Err(_) => {
                c.refuse("bad base64");
                return;
            }
        };
        if !self.dedup.first(&phy, crate::now_ms()) {
            c.refuse("duplicate (another gateway)");
            return;
        }
        if phy.first().is_some_and(|m| m >> 5 == 0) {
            self.join(sock, &rx, &phy, gw).await;
            return;
        }
        let Some(addr) = phy
            .get(1..5)
            .map(|a| u32::from_le_bytes([a[0], a[1], a[2], a[3]]))
        else {
            c.refuse("malformed PHYPayload");
            return;
        };
        let Some(node) = self.nodes.get_mut(&addr) else {
            c.refuse("unknown DevAddr");
            return;
        };
        let up = match node.session.uplink(&phy) {
            Ok(u) => u,
            Err(e) => {
                tracing::info!(dev_addr = format!("{addr:08X}"), error = %e, "LoRaWAN uplink dropped");
                c.refuse(match e {
                    ironlink_protocols::lorawan::Drop::Mic => "bad MIC",
                    ironlink_protocols::lorawan::Drop::Replay(..) => "replayed frame counter",
                    ironlink_protocols::lorawan::Drop::NotUplink(_) => "not a data uplink",
                    _ => "malformed PHYPayload",
                });
                return;
            }
        };
        let node = node.clone();
        // Written once a second (and at shutdown), not per uplink: the file holds every node.
        self.dirty = true;
        c.frames.fetch_add(1, Ordering::Relaxed);
        // Properties.
        let now = crate::now_ms();
        let mut params = Map::new();
        if up.fport.is_some_and(|p| p > 0) && !up.payload.is_empty() {
            match node.decoder.as_str() {
                "cayenne" => match crate::lpp::decode(&up.payload) {
                    Ok(m) => params.extend(m.into_iter().map(|(k, v)| (k, at(v, now)))),
                    Err(e) => {
                        tracing::info!(dev_eui = %node.dev_eui, error = %e, "LPP payload not decoded");
                        c.refuse("payload not decoded");
                    }
                },
                "layout" => match crate::layout::decode(&node.layout, &up.payload) {
                    Ok(m) => params.extend(m.into_iter().map(|(k, v)| (k, at(v, now)))),
                    Err(e) => {
                        tracing::info!(dev_eui = %node.dev_eui, error = %e, "payload not decoded");
                        c.refuse("payload not decoded");
                    }
                },
                _ => {
                    let h: String = up.payload.iter().map(|b| format!("{b:02x}")).collect();
                    params.insert("payload".into(), at(json!(h), now));
                }
            }
        }
        params.insert("rssi".into(), at(vehicle::round(rx.rssi, 1), now));
        if let Some(snr) = rx.lsnr {
            params.insert("snr".into(), at(vehicle::round(snr, 1), now));
        }
        params.insert("fcnt".into(), at(json!(up.fcnt), now));
        // DevStatusAns: battery (0 external power, 1-254 level, 255 unknown), SNR margin (dB).
        for (cid, p) in uplink_mac(&up.mac) {
            if let (0x06, [battery, margin]) = (cid, p.as_slice()) {
                params.insert("battery".into(), at(json!(battery), now));
                let m = ((*margin as i8) << 2) >> 2;
                params.insert("margin".into(), at(json!(m), now));
                self.dev_status_at
                    .insert(node.dev_eui.clone(), std::time::Instant::now());
            }
        }
        let queued = match vehicle::identity(&self.ctx, &node.dev_eui).await {
            Ok(_) => vehicle::post(&self.ctx, &node.dev_eui, params),
            Err(_) => false,
        };
        if !queued {
            // Not in the queue: do not acknowledge a confirmed uplink (the node repeats it).
            c.refuse("not queued (registry or queue unavailable)");
            return;
        }
        // The downlink: ACK, LinkCheckAns, or a queued application payload.
        let mac = uplink_mac(&up.mac);
        let link_check = mac.iter().any(|(cid, _)| *cid == 0x02);
        let app = self
            .queued
            .get_mut(&node.dev_eui)
            .and_then(VecDeque::pop_front);
        if !up.confirmed && !link_check && app.is_none() {
            return;
        }
        let Some(best) = self.gateways.get(&gw).copied() else {
            c.refuse("no PULL_DATA from the gateway yet: downlink not sent");
            return;
        };
        let _ = from;
        let mut fcnt_down = 0;
        if let Some(n) = self.nodes.get_mut(&addr) {
            fcnt_down = n.session.fcnt_down;
            n.session.fcnt_down = n.session.fcnt_down.wrapping_add(1);
        }
        self.dirty = true;
        let built = {
            let margin = rx.lsnr.map_or(0, |s| (s + 20.0).clamp(0.0, 254.0) as u8);
            let lca = LinkCheckAns([margin, 1]);
            let dsr = DevStatusReq;
            let mut cmds: Vec<&dyn SerializableMacCommand> =
                if link_check { vec![&lca] } else { vec![] };
            // Ask for the device's status with a downlink going anyway, once a day at most.
            if self
                .dev_status_at
                .get(&node.dev_eui)
                .is_none_or(|t| t.elapsed() > Duration::from_secs(24 * 3600))
            {
                cmds.push(&dsr);
                self.dev_status_at
                    .insert(node.dev_eui.clone(), std::time::Instant::now());
            }
            let (fport, payload) = app
                .as_ref()
                .map_or((None, &[][..]), |(p, b, _, _)| (Some(*p), b.as_slice()));
            let mut phy = DataPayloadCreator::new();
            let mut fctrl = lorawan::parser::FCtrl::new(0, false);
            if up.confirmed {
                fctrl.set_ack();
            }
            phy.set_uplink(false)
                .set_confirmed(false)
                .set_dev_addr(&node.session.dev_addr.to_le_bytes())
                .set_fctrl(&fctrl)
                .set_fcnt(fcnt_down);
            if let Some(p) = fport {
                phy.set_f_port(p);
            }
            let built = phy
                .build(
                    payload,
                    &cmds,
                    &NewSKey::from(node.session.nwk_skey),
                    &AppSKey::from(node.session.app_skey),
                )
                .map(<[u8]>::to_vec);
            built
        };
        let bytes = match built {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = ?e, "LoRaWAN downlink not built");
                if let Some((_, _, cmd, _)) = app {
                    answer(cmd, 460, json!({}), "the payload does not fit a downlink");
                }
                return;
            }
        };
        let rx1 = self.cfg.rx1_delay.as_micros() as u32;
        self.send_down(sock, best, &rx, rx1, &bytes).await;
        if let Some((_, _, cmd, _)) = app {
            answer(cmd, 200, json!({"fcnt_down": fcnt_down}), "");
        }
    }

    /// A join request: checked, answered with a join accept in JOIN_ACCEPT_DELAY1 (5 s).
    async fn join(&mut self, sock: &UdpSocket, rx: &semtech::RxPk, phy: &[u8], gw: u64) {
        let c = self.ctx.counters.clone();
        let Ok(PhyPayload::JoinRequest(jr)) = parse(phy.to_vec()) else {
            c.refuse("malformed join request");
            return;
        };
        let mut eui = [0u8; 8];
        eui.copy_from_slice(jr.dev_eui().as_ref());
        let Some((node, nonces)) = self.otaa.get(&eui).cloned() else {
            c.refuse("join from an unknown DevEUI");
            return;
        };
        if !jr.validate_mic(&AES128(node.app_key)) {
            c.refuse("bad join MIC");
            return;
        }
        let dn = jr.dev_nonce();
        let nonce = u16::from_le_bytes([dn.as_ref()[0], dn.as_ref()[1]]);
        if nonces.contains(&nonce) {
            c.refuse("DevNonce used before (replayed join)");
            return;
        }
        let Some(best) = self.gateways.get(&gw).copied() else {
            c.refuse("no PULL_DATA from the gateway yet: downlink not sent");
            return;
        };
        // A fresh session: the old one (if any) goes.
        self.nodes.retain(|_, n| n.dev_eui != node.dev_eui);
        let dev_addr = dev_addr_for(&node.dev_eui, |a| self.nodes.contains_key(&a));
        let t = vehicle::random_u64();
        let app_nonce = [(t >> 16) as u8, (t >> 8) as u8, t as u8];
        let mut ja = JoinAcceptCreator::new();
        ja.set_app_nonce(&app_nonce)
            .set_net_id(&[0, 0, 0])
            .set_dev_addr(&dev_addr.to_le_bytes())
            .set_dl_settings(0)
            .set_rx_delay(1);
        // Without a CFList the accept is 17 bytes; `build` hands back its whole 33-byte buffer.
        let Ok(encrypted) = ja
            .build(&AES128(node.app_key))
            .map(|b| b.get(..17).unwrap_or(b).to_vec())
        else {
            c.refuse("join accept not built");
            return;
        };
        let app_key = AppKey::from(node.app_key);
        let Ok(dec) = DecryptedJoinAcceptPayload::new(encrypted.clone(), &app_key) else {
            c.refuse("join accept not built");
            return;
        };
        let nwk_skey = dec.derive_newskey(&dn, &app_key).inner().0;
        let app_skey = dec.derive_appskey(&dn, &app_key).inner().0;
        self.nodes.insert(
            dev_addr,
            Node {
                dev_eui: node.dev_eui.clone(),
                session: Session {
                    dev_addr,
                    nwk_skey,
                    app_skey,
                    fcnt_up: None,
                    fcnt_down: 0,
                },
                decoder: node.decoder.clone(),
                layout: node.layout.clone(),
                downlink_fport: node.downlink_fport,
            },
        );
        if let Some((_, used)) = self.otaa.get_mut(&eui) {
            used.push(nonce);
            if used.len() > 1000 {
                used.remove(0);
            }
        }
        self.save_counters();
        self.send_down(sock, best, rx, 5_000_000, &encrypted).await;
        tracing::info!(dev_eui = %node.dev_eui, dev_addr = format!("{dev_addr:08X}"), "LoRaWAN node joined");
    }

    /// Sends a downlink in RX1 (`delay_us` after the uplink, its frequency and data rate); a
    /// version 2 forwarder that answers TX_ACK with an error gets it again for RX2 (one second
    /// later, 869.525 MHz SF12BW125, EU868's RX2 defaults).
    async fn send_down(
        &mut self,
        sock: &UdpSocket,
        gw: Gateway,
        rx: &semtech::RxPk,
        delay_us: u32,
        phy: &[u8],
    ) {
        let rx1 = TxPk::lora(
            rx.tmst.wrapping_add(delay_us),
            rx.freq,
            &rx.data_rate(),
            14,
            phy,
        );
        let rx2 = TxPk::lora(
            rx.tmst.wrapping_add(delay_us + 1_000_000),
            869.525,
            "SF12BW125",
            27,
            phy,
        );
        self.token = self.token.wrapping_add(1);
        if gw.version >= 2 {
            self.rx2
                .insert(self.token, (gw, rx2, std::time::Instant::now()));
            if self.rx2.len() > 10_000 {
                self.rx2
                    .retain(|_, (_, _, at)| at.elapsed() < Duration::from_secs(10));
            }
        }
        let _ = sock
            .send_to(&semtech::pull_resp(gw.version, self.token, &rx1), gw.addr)
            .await;
    }

    fn call(&mut self, cmd: Command) {
        let layout = self
            .nodes
            .values()
            .find(|n| n.dev_eui == cmd.device)
            .map(|n| (n.layout.clone(), n.downlink_fport))
            .or_else(|| {
                self.otaa
                    .values()
                    .find(|(o, _)| o.dev_eui == cmd.device)
                    .map(|(o, _)| (o.layout.clone(), o.downlink_fport))
            });
        if let (Op::Set(set), Some((layout, fport))) = (&cmd.op, &layout) {
            if !layout.is_empty() {
                match crate::layout::encode(layout, set) {
                    Ok(b) if b.len() <= 51 => {
                        let q = self.queued.entry(cmd.device.clone()).or_default();
                        if q.len() >= 8 {
                            answer(
                                cmd,
                                503,
                                json!({}),
                                "8 downlinks already wait for this node",
                            );
                        } else {
                            q.push_back((*fport, b, cmd, std::time::Instant::now()));
                        }
                    }
                    Ok(_) => answer(cmd, 460, json!({}), "the layout is longer than a downlink"),
                    Err(e) => answer(cmd, 460, json!({}), &e),
                }
                return;
            }
        }
        match &cmd.op {
            Op::Service(name, p) if name == "Downlink" => {
                let fport = p.get("fport").and_then(Value::as_u64).unwrap_or(1);
                let hex = p.get("payload").and_then(Value::as_str).unwrap_or("");
                let bytes: Option<Vec<u8>> = (0..hex.len())
                    .step_by(2)
                    .map(|i| hex.get(i..i + 2).and_then(|x| u8::from_str_radix(x, 16).ok()))
                    .collect();
                match (u8::try_from(fport).ok().filter(|p| (1..=223).contains(p)), bytes) {
                    (Some(fport), Some(b)) if b.len() <= 51 => {
                        let q = self.queued.entry(cmd.device.clone()).or_default();
                        if q.len() >= 8 {
                            answer(cmd, 503, json!({}), "8 downlinks already wait for this node");
                        } else {
                            q.push_back((fport, b, cmd, std::time::Instant::now()));
                        }
                    }
                    _ => answer(
                        cmd,
                        460,
                        json!({}),
                        "fport: 1-223; payload: hex, at most 51 bytes",
                    ),
                }
            }
            Op::Upgrade(_) => answer(
                cmd,
                460,
                json!({}),
                "LoRaWAN firmware upgrades (FUOTA: multicast and fragmented data blocks) are not supported by this gateway",
            ),
            _ => answer(
                cmd,
                460,
                json!({}),
                "a LoRa node takes the Downlink service (fport, payload as hex), sent at its next uplink",
            ),
        }
    }
}

/// The MAC commands of an uplink (LoRaWAN 1.0.x lengths); stops at an unknown CID.
pub fn uplink_mac(b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(&cid) = b.get(at) {
        let len = match cid {
            0x02 | 0x04 | 0x08 => 0,
            0x03 | 0x05 | 0x07 | 0x0A => 1,
            0x06 => 2,
            _ => break,
        };
        let Some(p) = b.get(at + 1..at + 1 + len) else {
            break;
        };
        out.push((cid, p.to_vec()));
        at += 1 + len;
    }
    out
}

/// DevStatusReq (CID 0x06, no payload).
struct DevStatusReq;

impl SerializableMacCommand for DevStatusReq {
    fn payload_bytes(&self) -> &[u8] {
        &[]
    }
    fn cid(&self) -> u8 {
        0x06
    }
    fn payload_len(&self) -> usize {
        0
    }
}

/// LinkCheckAns (CID 0x03): margin, gateway count.
struct LinkCheckAns([u8; 2]);

impl SerializableMacCommand for LinkCheckAns {
    fn payload_bytes(&self) -> &[u8] {
        &self.0
    }
    fn cid(&self) -> u8 {
        0x03
    }
    fn payload_len(&self) -> usize {
        2
    }
}

/// Serves packet forwarders on `sock` until stopped.
pub async fn serve(
    sock: UdpSocket,
    ctx: Arc<Ctx>,
    cfg: LoraServer,
    resolved: Vec<Resolved>,
    dir: PathBuf,
) {
    let (tx, mut calls) = crate::link::inbox(64);
    let mut nodes = Vec::new();
    let mut otaa = HashMap::new();
    for r in resolved {
        match r {
            Resolved::Abp(n) => nodes.push(n),
            Resolved::Otaa(o) => {
                let mut wire = hex_bytes::<8>(&o.dev_eui, "dev_eui").unwrap_or_default();
                wire.reverse();
                otaa.insert(wire, (o, Vec::new()));
            }
        }
    }
    let names: Vec<String> = nodes
        .iter()
        .map(|n| n.dev_eui.clone())
        .chain(otaa.values().map(|(o, _)| o.dev_eui.clone()))
        .collect();
    for n in &names {
        ctx.subs.route(n, tx.clone());
    }
    // Register the configured nodes in the cloud's registry ahead of their first uplink (16 at
    // a time); an uplink of a node not registered yet waits for its own registration.
    {
        let ctx = ctx.clone();
        let pending: Vec<String> = names
            .iter()
            .filter(|n| ctx.subs.get(n).is_none())
            .cloned()
            .collect();
        tokio::spawn(async move {
            let gate = Arc::new(tokio::sync::Semaphore::new(16));
            let mut set = tokio::task::JoinSet::new();
            for n in pending {
                let Ok(permit) = gate.clone().acquire_owned().await else {
                    return;
                };
                let ctx = ctx.clone();
                set.spawn(async move {
                    let _permit = permit;
                    for _ in 0..3 {
                        if vehicle::identity(&ctx, &n).await.is_ok() || *ctx.stop.borrow() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                });
                while set.try_join_next().is_some() {}
            }
            while set.join_next().await.is_some() {}
        });
    }
    let mut st = State {
        ctx: ctx.clone(),
        cfg,
        nodes: nodes.into_iter().map(|n| (n.session.dev_addr, n)).collect(),
        otaa,
        gateways: HashMap::new(),
        dedup: Dedup::new(2_000, 100_000),
        queued: HashMap::new(),
        counters_file: dir.join("lorawan-sessions.json"),
        token: 0,
        dev_status_at: HashMap::new(),
        dirty: false,
        rx2: HashMap::new(),
    };
    st.load_counters();
    let mut stop = ctx.stop.clone();
    let mut buf = vec![0u8; 65_536];
    let mut expire = tokio::time::interval(Duration::from_secs(1));
    loop {
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                match semtech::parse(&buf[..n]) {
                    Ok(Up::Push { version, token, gateway, body }) => {
                        let _ = sock.send_to(&semtech::ack(version, token, ident::PUSH_ACK), from).await;
                        for rx in body.rxpk {
                            st.push(&sock, from, rx, gateway).await;
                        }
                    }
                    Ok(Up::Pull { version, token, gateway }) => {
                        st.gateways.insert(gateway, Gateway { addr: from, version });
                        let _ = sock.send_to(&semtech::ack(version, token, ident::PULL_ACK), from).await;
                    }
                    Ok(Up::TxAck { error: Some(e), token, .. }) => {
                        tracing::info!(error = %e, "a gateway did not send a downlink");
                        st.ctx.counters.refuse("downlink refused by the gateway");
                        // Too late, too early, busy...: try RX2 once.
                        if let Some((gw, tx, _)) = st.rx2.remove(&token) {
                            st.token = st.token.wrapping_add(1);
                            let _ = sock.send_to(&semtech::pull_resp(gw.version, st.token, &tx), gw.addr).await;
                        }
                    }
                    Ok(Up::TxAck { token, .. }) => {
                        st.rx2.remove(&token);
                    }
                    Err(e) => {
                        tracing::info!(%from, error = %e, "packet forwarder datagram dropped");
                        st.ctx.counters.refuse("malformed forwarder datagram");
                    }
                }
            }
            Some(cmd) = calls.recv() => st.call(*cmd),
            _ = expire.tick() => {
                if st.dirty {
                    st.save_counters();
                    st.dirty = false;
                }
                // Calls whose node never came back in time fail with the reason.
                let wait = st.cfg.answer_timeout;
                for q in st.queued.values_mut() {
                    while q.front().is_some_and(|(_, _, _, t)| t.elapsed() > wait) {
                        if let Some((_, _, cmd, _)) = q.pop_front() {
                            let _ = cmd.reply.send((cmd.tag.clone(), Outcome {
                                code: 503,
                                data: json!({}),
                                message: "the node did not send an uplink in time (class A)".into(),
                            }));
                        }
                    }
                }
            }
            _ = stop.changed() => break,
        }
    }
    if st.dirty {
        st.save_counters();
    }
    for n in &names {
        st.ctx.subs.unroute(n, &tx);
    }
}

#[cfg(test)]
mod mac_tests {
    use super::*;

    #[test]
    fn uplink_mac_commands_split_by_their_lengths() {
        assert_eq!(
            uplink_mac(&[0x02, 0x06, 0xFE, 0x3F, 0x03, 0x07]),
            vec![(0x02, vec![]), (0x06, vec![0xFE, 0x3F]), (0x03, vec![0x07])]
        );
        assert_eq!(uplink_mac(&[0x06, 0x01]), vec![], "truncated");
        assert_eq!(uplink_mac(&[0x80, 1, 2]), vec![], "proprietary: stops");
    }
}
