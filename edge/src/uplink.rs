//! The uplink: one MQTT connection (plain or TLS) to the cloud as an Alink gateway. After every
//! (re)connect it adds its sub-devices to its topology and logs them in (`batch_login`), then
//! sends the queue: each reading as a property post (each fault as an event) on the
//! sub-device's own topic, with the queue's sequence number as its Alink id and `sys.dedup`,
//! acknowledged in the queue once the cloud's PUBACK (sent after the cloud committed it)
//! arrives. What was queued before the connection came up is the backlog: live readings go
//! first, and the backlog drains beside them at `queue.drain_rate` messages per second, in
//! order, with its original timestamps. The cloud's property sets, gets and service calls for
//! a sub-device go to the link that reaches it, and the outcome comes back as the reply.
//! Reconnects back off with jitter.
//!
//! Sub-devices that appear at run time (vehicle terminals) are logged in just before their
//! first queued record of a session (the cloud applies a login before the packets behind it),
//! and logged out by a queued record when their terminal goes, in order with their data.
//! Requests of the servers to the cloud (`thing/sub/register`) go out as [`Rpc`]s.

use crate::config::{Config, Device};
use crate::link::{Command, Op, Outcome};
use crate::now_ms;
use crate::queue::{Queue, Record};
use crate::subdevices::SubDevices;
use ironlink_shared::credentials::write_device_credentials;
use ironlink_shared::sign::{sign_connect, SignMethod};
use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

/// A request to the cloud on the gateway's own topics (`/sys/{gpk}/{gdn}/{path}`), answered by
/// the `_reply` with the same id. Dropped (the receiver sees its sender closed) when the
/// connection goes before the answer.
#[derive(Debug)]
pub struct Rpc {
    /// Topic below the gateway, e.g. `thing/sub/register`.
    pub path: String,
    /// Alink method, e.g. `thing.sub.register`.
    pub method: String,
    /// Params.
    pub params: Value,
    /// The whole reply (`code`, `data`, `message`).
    pub reply: oneshot::Sender<Value>,
}

/// The self-upgrade's side of the uplink: notices for the gateway itself go in, its reports
/// (inform, progress) come out to be published.
#[derive(Debug)]
pub struct OtaLink {
    /// Notices on `/ota/device/upgrade/{gpk}/{gdn}`.
    pub notices: mpsc::Sender<Vec<u8>>,
    /// (topic, body) to publish at QoS 1.
    pub outbox: mpsc::Receiver<(String, String)>,
    /// Notices for sub-devices: (product key, device name, payload).
    pub sub_notices: mpsc::Sender<crate::sub_ota::SubNotice>,
}

/// The path of sub-device registrations: several waiting ones go out as one request.
const REGISTER: &str = "thing/sub/register";

/// Who waits for a request's reply.
#[derive(Debug)]
enum Waiting {
    /// One [`Rpc`].
    One(oneshot::Sender<Value>),
    /// Registrations merged into one request: each item and its waiter.
    Registrations(Vec<(Value, oneshot::Sender<Value>)>),
}

impl Waiting {
    /// Hands each waiter its answer: its own item of a merged registration's `data`; when the
    /// cloud refused a merged request, its registrations go to `singles` to be asked alone.
    fn answer(self, v: Value, singles: &mut VecDeque<Rpc>) {
        let items = match self {
            Waiting::One(w) => {
                let _ = w.send(v);
                return;
            }
            Waiting::Registrations(items) => items,
        };
        if v["code"] != 200 {
            if items.len() == 1 {
                for (_, w) in items {
                    let _ = w.send(v.clone());
                }
                return;
            }
            singles.extend(items.into_iter().map(|(p, w)| Rpc {
                path: REGISTER.into(),
                method: "thing.sub.register".into(),
                params: Value::Array(vec![p]),
                reply: w,
            }));
            return;
        }
        let data = v["data"].as_array().cloned().unwrap_or_default();
        for (p, w) in items {
            let mine = data
                .iter()
                .find(|d| d["productKey"] == p["productKey"] && d["deviceName"] == p["deviceName"]);
            let answer = match mine {
                Some(d) => json!({"id": v["id"], "code": 200, "data": [d]}),
                None => json!({"id": v["id"], "code": 500,
                               "message": "the registry's answer does not name this device"}),
            };
            let _ = w.send(answer);
        }
    }
}

/// Messages in flight (sent, not yet acknowledged by the cloud).
const WINDOW: usize = 256;
/// Of which the backlog may hold at most this many, so live data always finds room.
const BACKLOG_WINDOW: usize = 32;

/// Routes from sub-device name to the link task that reaches it.
pub type Routes = HashMap<String, crate::link::Inbox>;

/// Uplink state for the status endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum State {
    /// Not connected.
    #[default]
    Down,
    /// Connected, logging sub-devices in.
    LoggingIn,
    /// Sending.
    Up,
}

/// MQTT options of the gateway's own identity, asking for auto-subscription (`_ss=1`) so the
/// replies to its topology and login requests reach it.
pub fn mqtt_options(c: &Config) -> Result<MqttOptions, String> {
    let (mut cid, mut user) = (String::new(), String::new());
    let sig = write_device_credentials(
        &c.gateway.product_key,
        &c.gateway.device_name,
        &c.gateway.device_secret,
        SignMethod::HmacSha256,
        if c.uplink.tls { 2 } else { 3 },
        Some(u64::try_from(now_ms()).unwrap_or(0)),
        &mut cid,
        &mut user,
    )
    .map_err(|_| "cannot format credentials".to_owned())?;
    // Extension parameters are not signed: ask for auto-subscription.
    if let Some(stripped) = cid.strip_suffix('|') {
        cid = format!("{stripped},_ss=1|");
    }
    let mut o = MqttOptions::new(cid, c.uplink.host.clone(), c.uplink.port);
    o.set_credentials(user, sig.as_str().to_owned());
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(true);
    o.set_max_packet_size(1 << 20, 1 << 20);
    if c.uplink.tls {
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
            tls_config(c)?,
        ))));
    }
    Ok(o)
}

/// Debian's bundle of public CAs, used when `ca_file` is not set.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The TLS client configuration: the configured CA file (or the system's CAs), TLS 1.2+.
fn tls_config(c: &Config) -> Result<rustls::ClientConfig, String> {
    let path = c
        .uplink
        .ca_file
        .clone()
        .unwrap_or_else(|| SYSTEM_CAS.into());
    let pem =
        std::fs::read(&path).map_err(|e| format!("uplink.ca_file {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("uplink.ca_file {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("uplink.ca_file {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "uplink.ca_file {}: no certificate in it",
            path.display()
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The signed entry of one sub-device in topo/add and batch_login.
fn signed(d: &Device) -> Value {
    signed_entry(&d.product_key, &d.name, &d.device_secret)
}

/// The signed entry of a sub-device given by its identity.
pub fn signed_entry(pk: &str, dn: &str, secret: &str) -> Value {
    let cid = format!("{pk}.{dn}|_ss=1|");
    let ts = now_ms().to_string();
    let sign = sign_connect(SignMethod::HmacSha256, secret, &cid, dn, pk, Some(&ts));
    json!({"productKey": pk, "deviceName": dn, "clientId": cid, "timestamp": ts,
           "signmethod": "hmacSha256", "signMethod": "hmacSha256", "sign": sign.as_str()})
}

/// Runs the uplink until `stop`: connects, logs in, drains the queue; reconnects on failure.
/// `wake` is notified when new readings are queued.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: Arc<Config>,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    routes: Arc<Routes>,
    subs: Arc<SubDevices>,
    mut rpc: mpsc::Receiver<Rpc>,
    mut ota: OtaLink,
    state: watch::Sender<State>,
    mut stop: watch::Receiver<bool>,
    rtt: ironlink_telemetry::Latency,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *stop.borrow() {
            return;
        }
        let _ = state.send(State::Down);
        let options = match mqtt_options(&config) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "uplink configuration");
                return;
            }
        };
        let mut up = false;
        let result = tokio::select! {
            r = session(&config, options, &queue, &wake, &routes, &subs, &mut rpc, &mut ota, &state, &mut up, &rtt) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        if up {
            backoff = Duration::from_millis(200);
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "uplink down");
        }
        // Exponential backoff with jitter, capped at 30 s.
        let jitter =
            Duration::from_millis(now_ms().unsigned_abs() % (backoff.as_millis() as u64 / 2 + 1));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// A downlink for a sub-device, parsed from its topic: the op, and the reply topic.
fn downlink(topic: &str, payload: &[u8]) -> Option<(String, String, Op, String)> {
    let parts: Vec<&str> = topic.split('/').collect();
    // "", "sys", pk, dn, ...
    let (pk, dn) = match parts.as_slice() {
        ["", "sys", pk, dn, ..] => (*pk, *dn),
        _ => return None,
    };
    let v: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    let id = match &v["id"] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    let params = v["params"].as_object().cloned().unwrap_or_default();
    let service_op = |name: &str| match name {
        "property/set" => Op::Set(params.clone()),
        "property/get" => Op::Get(
            v["params"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        s => Op::Service(s.to_owned(), params.clone()),
    };
    match parts.get(4..)? {
        ["thing", "service", rest @ ..] if !rest.is_empty() => {
            let name = rest.join("/");
            if name.ends_with("_reply") {
                return None;
            }
            let reply = format!("{topic}_reply");
            Some((dn.to_owned(), id, service_op(&name), reply))
        }
        ["rrpc", "request", msg_id] => {
            let method = v["method"].as_str().unwrap_or("");
            let name = method
                .strip_prefix("thing.service.")
                .map(|m| m.replace('.', "/"))
                .unwrap_or_default();
            let reply = format!("/sys/{pk}/{dn}/rrpc/response/{msg_id}");
            Some((dn.to_owned(), id, service_op(&name), reply))
        }
        _ => None,
    }
}

/// Publishes and remembers, in send order, which queue record each publish carries.
struct Sender<'a> {
    client: &'a AsyncClient,
    /// One entry per publish not yet handed to the network: its record, if any.
    order: VecDeque<Option<u64>>,
    /// Packet id -> record, for publishes on the wire.
    pkids: HashMap<u16, u64>,
    /// Packet ids of QoS 1 publishes that carry no record (logins, requests).
    untracked: HashSet<u16>,
    /// Those not yet acknowledged: they count against the window like records, so that the
    /// client's request channel never fills (a full channel would block this loop, which is
    /// also what drives the connection).
    extra: usize,
}

impl Sender<'_> {
    async fn publish(
        &mut self,
        topic: String,
        body: String,
        record: Option<u64>,
    ) -> Result<(), String> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .map_err(|e| e.to_string())?;
        if record.is_none() {
            self.extra += 1;
        }
        self.order.push_back(record);
        Ok(())
    }

    /// A reply: never waits (dropped, with a warning, if the client's queue is full).
    fn reply(&mut self, topic: String, body: String) {
        match self.client.try_publish(topic, QoS::AtMostOnce, false, body) {
            Ok(()) => self.order.push_back(None),
            Err(e) => tracing::warn!(error = %e, "reply dropped"),
        }
    }

    /// The network took the next publish with this packet id.
    fn outgoing(&mut self, pkid: u16) {
        match self.order.pop_front() {
            Some(Some(seq)) if pkid != 0 => {
                self.pkids.insert(pkid, seq);
            }
            Some(None) if pkid != 0 => {
                self.untracked.insert(pkid);
            }
            _ => {}
        }
    }

    /// A PUBACK for a publish that carried no record.
    fn untracked_ack(&mut self, pkid: u16) {
        if self.untracked.remove(&pkid) {
            self.extra = self.extra.saturating_sub(1);
        }
    }
}

/// The post for one queued record: topic and body. `gw` is the gateway (pk, dn), for logouts.
fn post_for(r: &Record, pk: &str, gw: (&str, &str)) -> Option<(String, String)> {
    let v: Value = serde_json::from_slice(&r.payload).ok()?;
    let dn = v["dn"].as_str()?;
    let id = r.seq.to_string();
    if v["logout"] == true {
        let (gpk, gdn) = gw;
        return Some((
            format!("/ext/session/{gpk}/{gdn}/combine/logout"),
            json!({"id": id, "version": "1.0", "params": {"productKey": pk, "deviceName": dn}})
                .to_string(),
        ));
    }
    if let Some(kind) = v["ota"].as_str() {
        return Some((
            format!("/ota/device/{kind}/{pk}/{dn}"),
            json!({"id": id, "params": v["params"]}).to_string(),
        ));
    }
    // `sys.dedup`: the cloud drops a second copy of this id (at-least-once delivery).
    Some(match v["event"].as_str() {
        Some(event) => (
            format!("/sys/{pk}/{dn}/thing/event/{event}/post"),
            json!({"id": id, "version": "1.0", "sys": {"ack": 1, "dedup": 1},
                   "params": {"value": v["params"], "time": v["time"]},
                   "method": format!("thing.event.{event}.post")})
            .to_string(),
        ),
        None => (
            format!("/sys/{pk}/{dn}/thing/event/property/post"),
            json!({"id": id, "version": "1.0", "sys": {"ack": 1, "dedup": 1},
                   "params": v["params"], "method": "thing.event.property.post"})
            .to_string(),
        ),
    })
}

/// Paces the backlog: `rate` messages per second (0: no limit), bursts of a fifth of a second.
struct Pace {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Pace {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: 1.0,
            at: Instant::now(),
        }
    }

    /// How many may go now.
    fn available(&mut self) -> usize {
        if self.rate == 0.0 {
            return usize::MAX;
        }
        let now = Instant::now();
        let burst = (self.rate / 5.0).max(1.0);
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(burst);
        self.at = now;
        self.tokens.max(0.0) as usize
    }

    fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// When the next message may go.
    fn next(&self) -> Instant {
        if self.rate == 0.0 || self.tokens >= 1.0 {
            return self.at;
        }
        self.at + Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
    }
}

/// One connection's life. Returns when the connection fails.
#[allow(clippy::too_many_arguments)]
async fn session(
    config: &Config,
    options: MqttOptions,
    queue: &Arc<Mutex<Queue>>,
    wake: &Notify,
    routes: &Routes,
    subs: &SubDevices,
    rpc: &mut mpsc::Receiver<Rpc>,
    ota: &mut OtaLink,
    state: &watch::Sender<State>,
    up: &mut bool,
    rtt: &ironlink_telemetry::Latency,
) -> Result<(), String> {
    let (client, mut events) = AsyncClient::new(options, WINDOW * 2);
    let gpk = &config.gateway.product_key;
    let gdn = &config.gateway.device_name;
    // Wait for CONNACK.
    loop {
        match events.poll().await.map_err(|e| e.to_string())? {
            Event::Incoming(Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    let _ = state.send(State::LoggingIn);
    let mut tx = Sender {
        client: &client,
        order: VecDeque::new(),
        pkids: HashMap::new(),
        untracked: HashSet::new(),
        extra: 0,
    };
    // Configured sub-devices, and run-time ones whose terminals are connected now (their
    // logins travel in the same batches: thousands of single logins would fill the client's
    // channel before the loop that drives the connection runs).
    let routed: Vec<(String, crate::subdevices::Identity)> = subs
        .routed()
        .into_iter()
        .filter(|dn| !config.devices.iter().any(|d| &d.name == dn))
        .filter_map(|dn| subs.get(&dn).map(|id| (dn, id)))
        .collect();
    let entries: Vec<Value> = config
        .devices
        .iter()
        .map(signed)
        .chain(
            routed
                .iter()
                .map(|(dn, id)| signed_entry(&id.product_key, dn, &id.device_secret)),
        )
        .collect();
    for (i, chunk) in entries.chunks(200).enumerate() {
        let add = json!({"id": format!("topo-{i}"), "version": "1.0", "params": chunk, "method": "thing.topo.add"});
        tx.publish(
            format!("/sys/{gpk}/{gdn}/thing/topo/add"),
            add.to_string(),
            None,
        )
        .await?;
        let login =
            json!({"id": format!("login-{i}"), "version": "1.0", "params": {"deviceList": chunk}});
        tx.publish(
            format!("/ext/session/{gpk}/{gdn}/combine/batch_login"),
            login.to_string(),
            None,
        )
        .await?;
    }
    // Wait for every batch_login reply (the cloud applies a login before later packets).
    let mut pending_logins = entries.chunks(200).count();
    while pending_logins > 0 {
        match events.poll().await.map_err(|e| e.to_string())? {
            Event::Incoming(Packet::Publish(p))
                if p.topic.ends_with("/combine/batch_login_reply") =>
            {
                let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                if v["code"] != 200 {
                    return Err(format!("batch_login refused: {v}"));
                }
                pending_logins -= 1;
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => tx.outgoing(pkid),
            _ => {}
        }
    }
    let _ = state.send(State::Up);
    *up = true;
    let pk_of: BTreeMap<&str, &str> = config
        .devices
        .iter()
        .map(|d| (d.name.as_str(), d.product_key.as_str()))
        .collect();
    let mut out = Out {
        pk_of,
        subs,
        gw: (gpk, gdn),
        logged_in: HashSet::new(),
    };
    out.logged_in.extend(routed.into_iter().map(|(dn, _)| dn));
    let mut pending_rpcs: HashMap<String, (Instant, Waiting)> = HashMap::new();
    // Registrations of a merged request the cloud refused: asked again one by one, so one
    // refused terminal does not refuse the others.
    let mut singles: VecDeque<Rpc> = VecDeque::new();
    let own_notices = format!("/ota/device/upgrade/{gpk}/{gdn}");
    let mut rpc_n = 0u64;
    // Everything queued so far is the backlog; what comes after is live.
    let (acked, backlog_end) = {
        let q = queue.lock().map_err(|_| "queue lock")?;
        (q.acked(), q.last_seq())
    };
    tracing::info!(
        sub_devices = config.devices.len(),
        backlog = backlog_end - acked,
        "uplink up"
    );
    let mut live_sent = backlog_end;
    let mut backlog_sent = acked;
    let (mut inflight, mut backlog_inflight) = (0usize, 0usize);
    // When each packet id went out, for the PUBLISH -> PUBACK histogram.
    let mut sent_at: HashMap<u16, std::time::Instant> = HashMap::new();
    let mut pace = Pace::new(config.queue.drain_rate);
    let (reply_tx, mut replies) = mpsc::unbounded_channel::<((String, String), Outcome)>();
    // Run-time sub-devices logged in for their queued records whose terminals are gone (a
    // restart after a crash, say) are logged out once the queue is caught up.
    let mut stale = tokio::time::interval(Duration::from_secs(5));
    stale.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Requests the cloud never answered stop holding their place.
        if !pending_rpcs.is_empty() {
            pending_rpcs.retain(|_, (at, _)| at.elapsed() < Duration::from_secs(60));
        }
        // Each record may bring a login of its run-time sub-device (two more publishes).
        let per = if out.subs.is_empty() { 1 } else { 3 };
        // Live first.
        let busy = inflight + tx.extra;
        if busy < WINDOW {
            let room = ((WINDOW - busy) / per).max(1);
            let records = queue
                .lock()
                .map_err(|_| "queue lock")?
                .read_range(live_sent, u64::MAX, room)
                .map_err(|e| e.to_string())?;
            for r in records {
                live_sent = r.seq;
                send(&mut tx, queue, &r, &mut out, &mut inflight).await?;
            }
        }
        // Then the backlog, paced, in its share of the window.
        let backlog_pending = backlog_sent < backlog_end;
        let busy = inflight + tx.extra;
        if backlog_pending && busy < WINDOW && backlog_inflight < BACKLOG_WINDOW {
            let room = ((WINDOW - busy) / per)
                .max(1)
                .min(BACKLOG_WINDOW - backlog_inflight)
                .min(pace.available());
            if room > 0 {
                let records = queue
                    .lock()
                    .map_err(|_| "queue lock")?
                    .read_range(backlog_sent, backlog_end, room)
                    .map_err(|e| e.to_string())?;
                if records.is_empty() {
                    backlog_sent = backlog_end;
                    tracing::info!("backlog drained");
                }
                pace.take(records.len());
                for r in records {
                    backlog_sent = r.seq;
                    let before = inflight;
                    send(&mut tx, queue, &r, &mut out, &mut inflight).await?;
                    backlog_inflight += inflight - before;
                }
            }
        }
        let busy = inflight + tx.extra;
        let backlog_waits =
            backlog_sent < backlog_end && busy < WINDOW && backlog_inflight < BACKLOG_WINDOW;
        tokio::select! {
            ev = events.poll() => {
                match ev.map_err(|e| e.to_string())? {
                    Event::Outgoing(Outgoing::Publish(pkid)) => {
                        sent_at.insert(pkid, std::time::Instant::now());
                        tx.outgoing(pkid);
                    }
                    Event::Incoming(Packet::PubAck(a)) => {
                        if let Some(t) = sent_at.remove(&a.pkid) {
                            rtt.since(t);
                        }
                        tx.untracked_ack(a.pkid);
                        if let Some(seq) = tx.pkids.remove(&a.pkid) {
                            inflight = inflight.saturating_sub(1);
                            if seq <= backlog_end {
                                backlog_inflight = backlog_inflight.saturating_sub(1);
                            }
                            queue.lock().map_err(|_| "queue lock")?.ack_one(seq);
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        if p.topic == own_notices {
                            if ota.notices.try_send(p.payload.to_vec()).is_err() {
                                tracing::warn!("self-upgrade busy: notice dropped (the cloud sends it again)");
                            }
                        } else if let Some((pk, dn)) = p.topic.strip_prefix("/ota/device/upgrade/").and_then(|r| r.split_once('/')) {
                            if ota.sub_notices.try_send((pk.to_owned(), dn.to_owned(), p.payload.to_vec())).is_err() {
                                tracing::warn!(device = dn, "sub-device upgrades busy: notice dropped (the cloud sends it again)");
                            }
                        } else if p.topic.ends_with("_reply") {
                            let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                            if let Some((_, waiting)) = v["id"].as_str().and_then(|id| pending_rpcs.remove(id)) {
                                waiting.answer(v, &mut singles);
                            }
                        } else if let Some((dn, id, op, reply)) = downlink(&p.topic, &p.payload) {
                            dispatch(routes, subs, gdn, dn, id, op, reply, &reply_tx);
                        }
                    }
                    Event::Incoming(Packet::Disconnect) => return Err("cloud sent DISCONNECT".into()),
                    _ => {}
                }
            }
            Some(((topic, id), o)) = replies.recv() => {
                let mut body = json!({"id": id, "code": o.code, "data": o.data});
                if o.code != 200 {
                    body["message"] = json!(o.message);
                }
                tx.reply(topic, body.to_string());
            }
            Some((topic, body)) = ota.outbox.recv(), if busy + 1 < WINDOW => {
                tx.publish(topic, body, None).await?;
            }
            Some((r, alone)) = async { match singles.pop_front() { Some(r) => Some((r, true)), None => rpc.recv().await.map(|r| (r, false)) } }, if busy + 1 < WINDOW && pending_rpcs.len() < 32 => {
                rpc_n += 1;
                let id = format!("rpc-{rpc_n}");
                // Registrations waiting behind this one travel with it (up to 200), unless it
                // is asked again alone.
                let (params, waiting) = if !alone && r.path == REGISTER && r.params.as_array().is_some_and(|a| a.len() == 1) {
                    let mut items = vec![(r.params[0].clone(), r.reply)];
                    while items.len() < 200 {
                        match rpc.try_recv() {
                            Ok(more) if more.path == REGISTER && more.params.as_array().is_some_and(|a| a.len() == 1) => {
                                items.push((more.params[0].clone(), more.reply));
                            }
                            Ok(other) => {
                                singles.push_back(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let params = Value::Array(items.iter().map(|(p, _)| p.clone()).collect());
                    (params, Waiting::Registrations(items))
                } else {
                    (r.params, Waiting::One(r.reply))
                };
                let body = json!({"id": id, "version": "1.0", "params": params, "method": r.method});
                tx.publish(format!("/sys/{gpk}/{gdn}/{}", r.path), body.to_string(), None).await?;
                pending_rpcs.insert(id, (Instant::now(), waiting));
            }
            _ = stale.tick(), if !out.logged_in.is_empty() => {
                let caught_up = backlog_sent >= backlog_end
                    && queue.lock().map_err(|_| "queue lock")?.last_seq() <= live_sent;
                if caught_up {
                    let routed: HashSet<String> = subs.routed().into_iter().collect();
                    let gone: Vec<String> = out
                        .logged_in
                        .iter()
                        .filter(|d| !routed.contains(*d))
                        .cloned()
                        .collect();
                    for dn in gone {
                        if let Some(id) = subs.get(&dn) {
                            let body = json!({"id": format!("logout-{dn}"), "version": "1.0",
                                              "params": {"productKey": id.product_key, "deviceName": dn}});
                            tx.publish(format!("/ext/session/{gpk}/{gdn}/combine/logout"), body.to_string(), None).await?;
                        }
                        out.logged_in.remove(&dn);
                    }
                }
            }
            _ = wake.notified(), if busy < WINDOW => {}
            _ = tokio::time::sleep_until(pace.next()), if backlog_waits => {}
        }
    }
}

/// Sends one record (or skips one this version cannot send, acknowledging it so it does not
/// block the queue).
/// Adds a run-time sub-device to the topology and logs it in (answers not awaited: the cloud
/// applies them in order, before anything behind them).
async fn login_dynamic(
    tx: &mut Sender<'_>,
    (gpk, gdn): (&str, &str),
    dn: &str,
    id: &crate::subdevices::Identity,
) -> Result<(), String> {
    let entry = signed_entry(&id.product_key, dn, &id.device_secret);
    let add = json!({"id": format!("topo-{dn}"), "version": "1.0", "params": [entry.clone()], "method": "thing.topo.add"});
    tx.publish(
        format!("/sys/{gpk}/{gdn}/thing/topo/add"),
        add.to_string(),
        None,
    )
    .await?;
    let login = json!({"id": format!("login-{dn}"), "version": "1.0", "params": entry});
    tx.publish(
        format!("/ext/session/{gpk}/{gdn}/combine/login"),
        login.to_string(),
        None,
    )
    .await
}

/// What a session needs to turn records into publishes.
struct Out<'a> {
    /// Configured sub-devices: name -> product key.
    pk_of: BTreeMap<&'a str, &'a str>,
    /// Run-time sub-devices.
    subs: &'a SubDevices,
    /// The gateway (pk, dn).
    gw: (&'a str, &'a str),
    /// Run-time sub-devices logged in during this session.
    logged_in: HashSet<String>,
}

async fn send(
    tx: &mut Sender<'_>,
    queue: &Mutex<Queue>,
    r: &Record,
    out: &mut Out<'_>,
    inflight: &mut usize,
) -> Result<(), String> {
    let dn = serde_json::from_slice::<Value>(&r.payload)
        .ok()
        .and_then(|v| v["dn"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let (pk, dynamic) = match out.pk_of.get(dn.as_str()) {
        Some(pk) => ((*pk).to_owned(), None),
        None => match out.subs.get(&dn) {
            Some(id) => (id.product_key.clone(), Some(id)),
            None => (String::new(), None),
        },
    };
    let post = (!pk.is_empty()).then(|| post_for(r, &pk, out.gw)).flatten();
    match post {
        Some((topic, body)) => {
            let logout = topic.ends_with("/combine/logout");
            if let Some(id) = dynamic {
                if !logout && !out.logged_in.contains(&dn) {
                    // Just in time: the cloud applies these before the post behind them.
                    login_dynamic(tx, out.gw, &dn, &id).await?;
                    out.logged_in.insert(dn.clone());
                }
            }
            if logout && !out.logged_in.remove(&dn) {
                // Not logged in during this session: nothing to log out.
                queue.lock().map_err(|_| "queue lock")?.ack_one(r.seq);
                return Ok(());
            }
            tx.publish(topic, body, Some(r.seq)).await?;
            *inflight += 1;
        }
        None => {
            tracing::warn!(
                seq = r.seq,
                "queued record for no configured sub-device: skipped"
            );
            queue.lock().map_err(|_| "queue lock")?.ack_one(r.seq);
        }
    }
    Ok(())
}

/// Hands a downlink to the link of its sub-device, or answers at once.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    routes: &Routes,
    subs: &SubDevices,
    gateway: &str,
    dn: String,
    id: String,
    op: Op,
    reply: String,
    reply_tx: &mpsc::UnboundedSender<((String, String), Outcome)>,
) {
    let tag = (reply, id);
    let answer = |code, message: &str| {
        let _ = reply_tx.send((
            tag.clone(),
            Outcome {
                code,
                data: json!({}),
                message: message.to_owned(),
            },
        ));
    };
    let Some(link) = routes.get(&dn).cloned().or_else(|| subs.route_of(&dn)) else {
        // The gateway itself has no points: a get answers empty, anything else is refused
        // (rather than left to time out). A run-time sub-device whose terminal is not
        // connected cannot be reached. A sub-device this configuration no longer has is not
        // ours to answer.
        if subs.get(&dn).is_some() {
            answer(503, "the terminal is not connected to the edge gateway");
        } else if dn == gateway {
            match op {
                Op::Get(_) => answer(200, ""),
                _ => answer(
                    460,
                    "the edge gateway itself has no writable properties or services: address its sub-devices",
                ),
            }
        }
        return;
    };
    if let Op::Service(name, _) = &op {
        if name.is_empty() {
            answer(460, "not a service call");
            return;
        }
    }
    let cmd = Command {
        device: dn,
        op,
        tag: tag.clone(),
        reply: reply_tx.clone(),
    };
    if link.try_send(Box::new(cmd)).is_err() {
        answer(
            503,
            "the sub-device's link is busy: too many requests waiting",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(dn: &str) -> Value {
        json!({"productKey": "pk", "deviceName": dn})
    }

    /// A merged registration answers each waiter with its own device; one the answer does not
    /// name gets an error; a refused merged request sends each registration again alone, and
    /// a refused lone one is answered with the refusal.
    #[test]
    fn merged_registrations_are_answered_one_by_one() {
        let mut singles = VecDeque::new();
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        let (c, mut rc) = oneshot::channel();
        Waiting::Registrations(vec![(item("a1"), a), (item("b1"), b), (item("c1"), c)]).answer(
            json!({"id": "rpc-1", "code": 200, "data": [
                {"productKey": "pk", "deviceName": "b1", "deviceSecret": "sb"},
                {"productKey": "pk", "deviceName": "a1", "deviceSecret": "sa"}]}),
            &mut singles,
        );
        assert_eq!(ra.try_recv().unwrap()["data"][0]["deviceSecret"], "sa");
        assert_eq!(rb.try_recv().unwrap()["data"][0]["deviceSecret"], "sb");
        assert_eq!(rc.try_recv().unwrap()["code"], 500);
        assert!(singles.is_empty());

        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        let refused = json!({"id": "rpc-2", "code": 460, "message": "params[1]: bad name"});
        Waiting::Registrations(vec![(item("a1"), a), (item("x"), b)])
            .answer(refused.clone(), &mut singles);
        assert!(
            ra.try_recv().is_err() && rb.try_recv().is_err(),
            "not answered yet"
        );
        assert_eq!(singles.len(), 2);
        assert!(singles
            .iter()
            .all(|r| r.path == REGISTER && r.params.as_array().is_some_and(|a| a.len() == 1)));
        let lone = singles.pop_back().unwrap();
        assert_eq!(lone.params[0]["deviceName"], "x");
        Waiting::Registrations(vec![(lone.params[0].clone(), lone.reply)])
            .answer(refused, &mut singles);
        assert_eq!(rb.try_recv().unwrap()["code"], 460);
        assert_eq!(singles.len(), 1);
    }
}
