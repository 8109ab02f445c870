//! What the vehicle-terminal servers (JT/T 808, GB/T 32960) share: the accept loop with its
//! connection bound, terminal identities from the cloud's registry, queueing readings, calls
//! from the cloud waiting for a terminal's answer, and counters.

use crate::config::VehicleServer;
use crate::link::{Command, Outcome, Sink};
use crate::subdevices::{Identity, SubDevices};
use crate::uplink::Rpc;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Counters of one server (shown on `/metrics`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Terminals connected now.
    pub connected: AtomicUsize,
    /// Frames decoded.
    pub frames: AtomicU64,
    /// Frames or messages refused, by reason.
    pub refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Connections refused because `max_terminals` were connected.
    pub over_limit: AtomicU64,
    /// Parts of valid messages passed over on purpose (e.g. GB/T 32960 custom blocks).
    pub skipped: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counters {
    /// Counts a part passed over on purpose.
    pub fn skip(&self, what: &'static str) {
        *self
            .skipped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(what)
            .or_default() += 1;
    }

    /// Counts a refusal.
    pub fn refuse(&self, why: &'static str) {
        *self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(why)
            .or_default() += 1;
    }
}

/// A server's shared state.
#[derive(Debug)]
pub struct Ctx {
    /// Its configuration.
    pub cfg: VehicleServer,
    /// Where readings go.
    pub sink: Sink,
    /// Run-time sub-devices and their routes.
    pub subs: Arc<SubDevices>,
    /// Requests to the cloud.
    pub rpc: tokio::sync::mpsc::Sender<Rpc>,
    /// Set when the gateway stops.
    pub stop: watch::Receiver<bool>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Firmware upgrades standing for sub-devices.
    pub offers: Arc<crate::sub_ota::Offers>,
}

/// Accepts terminals until stopped; each connection runs `conn` on its own task.
pub async fn serve<F, Fut>(listener: TcpListener, ctx: Arc<Ctx>, conn: F)
where
    F: Fn(TcpStream, Arc<Ctx>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut stop = ctx.stop.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        if ctx.counters.connected.load(Ordering::Relaxed) >= ctx.cfg.max_terminals {
            ctx.counters.over_limit.fetch_add(1, Ordering::Relaxed);
            continue; // dropped: closed at once
        }
        let _ = stream.set_nodelay(true);
        ctx.counters.connected.fetch_add(1, Ordering::Relaxed);
        let fut = conn(stream, ctx.clone());
        let counters = ctx.counters.clone();
        tokio::spawn(async move {
            fut.await;
            counters.connected.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Why a terminal has no identity.
#[derive(Debug)]
pub enum Unknown {
    /// The registry refused it (the message says why).
    Refused(String),
    /// The cloud could not be asked (uplink down, no answer in time).
    Unavailable(String),
}

/// The identity of terminal `dn`: remembered, or registered in the cloud's registry as a
/// sub-device of the gateway (`thing/sub/register`; created if the product allows dynamic
/// registration), then remembered.
pub async fn identity(ctx: &Ctx, dn: &str) -> Result<Identity, Unknown> {
    if let Some(id) = ctx.subs.get(dn) {
        if id.product_key == ctx.cfg.product_key {
            return Ok(id);
        }
    }
    let (tx, rx) = oneshot::channel();
    let rpc = Rpc {
        path: "thing/sub/register".into(),
        method: "thing.sub.register".into(),
        params: json!([{"productKey": ctx.cfg.product_key, "deviceName": dn}]),
        reply: tx,
    };
    let wait = ctx.cfg.answer_timeout;
    if tokio::time::timeout(wait, ctx.rpc.send(rpc)).await.is_err() {
        return Err(Unknown::Unavailable("the uplink is busy".into()));
    }
    let v = match tokio::time::timeout(wait, rx).await {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => return Err(Unknown::Unavailable("the uplink went down".into())),
        Err(_) => {
            return Err(Unknown::Unavailable(
                "no answer from the cloud's registry in time".into(),
            ))
        }
    };
    if v["code"] != 200 {
        return Err(Unknown::Refused(
            v["message"].as_str().unwrap_or("refused").to_owned(),
        ));
    }
    let secret = v["data"][0]["deviceSecret"]
        .as_str()
        .ok_or_else(|| Unknown::Refused(format!("no secret in the registry's answer: {v}")))?;
    let id = Identity {
        product_key: ctx.cfg.product_key.clone(),
        device_secret: secret.to_owned(),
    };
    ctx.subs
        .remember(dn, id.clone())
        .map_err(|e| Unknown::Unavailable(format!("remembering the terminal: {e}")))?;
    Ok(id)
}

/// Queues property values (each `{value, time}`); true once queued.
pub fn post(ctx: &Ctx, dn: &str, params: Map<String, Value>) -> bool {
    if params.is_empty() {
        return true;
    }
    ctx.sink
        .push(crate::now_ms(), &json!({"dn": dn, "params": params}))
}

/// Queues an event; true once queued.
pub fn event(ctx: &Ctx, dn: &str, event: &str, time: i64, params: Value) -> bool {
    ctx.sink.push(
        crate::now_ms(),
        &json!({"dn": dn, "event": event, "time": time, "params": params}),
    )
}

/// Queues the terminal's logout (sent in order after its data).
pub fn logout(ctx: &Ctx, dn: &str) {
    ctx.sink
        .push(crate::now_ms(), &json!({"dn": dn, "logout": true}));
}

/// A value at a time, as the queue carries property values.
pub fn at(v: Value, time: i64) -> Value {
    json!({"value": v, "time": time})
}

/// A number rounded to `digits` decimals (so 65.2 is not posted as 65.19999999); with no
/// decimals, a JSON integer (so `int` properties accept it).
pub fn round(v: f64, digits: i32) -> Value {
    if digits <= 0 && v.abs() < 9e15 {
        return json!(v.round() as i64);
    }
    let m = 10f64.powi(digits);
    json!((v * m).round() / m)
}

/// 64 unpredictable bits: std's per-process random SipHash keys (seeded by the OS) hashing a
/// counter and the time. Enough for tokens and nonces without another dependency.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_i64(crate::now_ms());
    h.finish()
}

/// A call from the cloud waiting for the terminal's answer.
#[derive(Debug)]
pub struct Waiting {
    /// The call.
    pub cmd: Command,
    /// Answered 503 after this.
    pub deadline: Instant,
}

impl Waiting {
    /// Answers the call.
    pub fn answer(self, o: Outcome) {
        let _ = self.cmd.reply.send((self.cmd.tag, o));
    }
}

/// Answers a call at once.
pub fn answer(cmd: Command, code: u32, data: Value, message: &str) {
    let _ = cmd.reply.send((
        cmd.tag,
        Outcome {
            code,
            data,
            message: message.to_owned(),
        },
    ));
}
