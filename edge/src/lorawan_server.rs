//! A small LoRaWAN network server in the edge for the LoRa gateways on site: Semtech UDP
//! packet forwarders push what they hear; activated (ABP) devices' uplinks are checked and
//! decrypted (`lora`), decoded (Cayenne LPP, or the raw bytes as hex) and posted as properties
//! of the node, a sub-device of the edge named by its DevEUI (registered in the cloud's
//! registry like vehicle terminals). Confirmed uplinks and LinkCheckReq are answered in RX1
//! through the gateway that heard the uplink best; the cloud's `Downlink` calls wait for the
//! node's next uplink (class A). Frame counters survive restarts (`lorawan-sessions.json`
//! beside the queue). Every dropped packet is counted by its reason.

use crate::config::{LoraDevice, LoraServer};
use crate::link::{Command, Op, Outcome};
use crate::lora::{Dedup, Session};
use crate::semtech::{self, ident, TxPk, Up};
use crate::vehicle::{self, answer, at, Ctx};
use lorawan::creator::DataPayloadCreator;
use lorawan::keys::{AppSKey, NewSKey};
use lorawan::maccommands::SerializableMacCommand;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// A node, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct Node {
    /// DevEUI, lowercase hex (the device name).
    pub dev_eui: String,
    /// Its session.
    pub session: Session,
    /// "cayenne" or "raw".
    pub decoder: String,
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

/// Resolves a configured device (ABP).
pub fn node(d: &LoraDevice) -> Result<Node, String> {
    let eui = hex_bytes::<8>(&d.dev_eui, "dev_eui")?;
    let (Some(addr), Some(nwk), Some(app)) = (&d.dev_addr, &d.nwk_skey, &d.app_skey) else {
        return Err(
            "ABP needs dev_addr, nwk_skey and app_skey (OTAA is not implemented yet)".into(),
        );
    };
    let decoder = d.decoder.clone().unwrap_or_else(|| "cayenne".into());
    if decoder != "cayenne" && decoder != "raw" {
        return Err(format!("decoder: `{decoder}` is not cayenne or raw"));
    }
    Ok(Node {
        dev_eui: eui.iter().map(|b| format!("{b:02x}")).collect(),
        session: Session {
            dev_addr: u32::from_be_bytes(hex_bytes::<4>(addr, "dev_addr")?),
            nwk_skey: hex_bytes::<16>(nwk, "nwk_skey")?,
            app_skey: hex_bytes::<16>(app, "app_skey")?,
            fcnt_up: None,
            fcnt_down: 0,
        },
        decoder,
    })
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
    gateways: HashMap<u64, Gateway>,
    dedup: Dedup,
    /// Class A downlinks waiting for their node's next uplink, by DevEUI.
    queued: HashMap<String, VecDeque<Queued>>,
    counters_file: PathBuf,
    token: u16,
}

impl State {
    fn save_counters(&self) {
        let m: BTreeMap<&str, Value> = self
            .nodes
            .values()
            .map(|n| {
                (
                    n.dev_eui.as_str(),
                    json!({"fcnt_up": n.session.fcnt_up, "fcnt_down": n.session.fcnt_down}),
                )
            })
            .collect();
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
                    crate::lora::Drop::Mic => "bad MIC",
                    crate::lora::Drop::Replay(..) => "replayed frame counter",
                    crate::lora::Drop::NotUplink(_) => "not a data uplink",
                    _ => "malformed PHYPayload",
                });
                return;
            }
        };
        let node = node.clone();
        self.save_counters();
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
        let link_check = up.mac.first() == Some(&0x02);
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
        self.save_counters();
        let built = {
            let margin = rx.lsnr.map_or(0, |s| (s + 20.0).clamp(0.0, 254.0) as u8);
            let lca = LinkCheckAns([margin, 1]);
            let cmds: Vec<&dyn SerializableMacCommand> =
                if link_check { vec![&lca] } else { vec![] };
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
        let tx = TxPk::lora(
            rx.tmst.wrapping_add(rx1),
            rx.freq,
            &rx.data_rate(),
            14,
            &bytes,
        );
        self.token = self.token.wrapping_add(1);
        let _ = sock
            .send_to(
                &semtech::pull_resp(best.version, self.token, &tx),
                best.addr,
            )
            .await;
        if let Some((_, _, cmd, _)) = app {
            answer(cmd, 200, json!({"fcnt_down": fcnt_down}), "");
        }
    }

    fn call(&mut self, cmd: Command) {
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
            _ => answer(
                cmd,
                460,
                json!({}),
                "a LoRa node takes the Downlink service (fport, payload as hex), sent at its next uplink",
            ),
        }
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
    nodes: Vec<Node>,
    dir: PathBuf,
) {
    let (tx, mut calls) = mpsc::channel::<Command>(64);
    for n in &nodes {
        ctx.subs.route(&n.dev_eui, tx.clone());
    }
    let mut st = State {
        ctx: ctx.clone(),
        cfg,
        nodes: nodes.into_iter().map(|n| (n.session.dev_addr, n)).collect(),
        gateways: HashMap::new(),
        dedup: Dedup::new(2_000, 100_000),
        queued: HashMap::new(),
        counters_file: dir.join("lorawan-sessions.json"),
        token: 0,
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
                    Ok(Up::TxAck { error: Some(e), .. }) => {
                        tracing::info!(error = %e, "a gateway did not send a downlink");
                        st.ctx.counters.refuse("downlink refused by the gateway");
                    }
                    Ok(Up::TxAck { .. }) => {}
                    Err(e) => {
                        tracing::info!(%from, error = %e, "packet forwarder datagram dropped");
                        st.ctx.counters.refuse("malformed forwarder datagram");
                    }
                }
            }
            Some(cmd) = calls.recv() => st.call(cmd),
            _ = expire.tick() => {
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
    for n in st.nodes.values() {
        st.ctx.subs.unroute(&n.dev_eui, &tx);
    }
}
