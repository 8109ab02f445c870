//! The uplink: one MQTT connection to the cloud as an Alink gateway. After every (re)connect
//! it adds its sub-devices to its topology and logs them in (`batch_login`), then sends the
//! queued readings in order, each as a property post on the sub-device's own topic with the
//! queue's sequence number as its Alink id, and acknowledges them in the queue once the cloud's
//! PUBACK (sent after the cloud committed them) arrives. Reconnects back off with jitter.

use crate::config::{Config, Device};
use crate::now_ms;
use crate::queue::Queue;
use ironlink_shared::credentials::write_device_credentials;
use ironlink_shared::sign::{sign_connect, SignMethod};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Messages in flight (sent, not yet acknowledged by the cloud).
const WINDOW: usize = 256;

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
    Ok(o)
}

/// The signed entry of one sub-device in topo/add and batch_login.
fn signed(d: &Device) -> Value {
    let cid = format!("{}.{}|_ss=1|", d.product_key, d.name);
    let ts = now_ms().to_string();
    let sign = sign_connect(
        SignMethod::HmacSha256,
        &d.device_secret,
        &cid,
        &d.name,
        &d.product_key,
        Some(&ts),
    );
    json!({"productKey": d.product_key, "deviceName": d.name, "clientId": cid, "timestamp": ts,
           "signmethod": "hmacSha256", "signMethod": "hmacSha256", "sign": sign.as_str()})
}

/// Runs the uplink until `stop`: connects, logs in, drains the queue; reconnects on failure.
/// `wake` is notified when new readings are queued.
pub async fn run(
    config: Arc<Config>,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    state: watch::Sender<State>,
    mut stop: watch::Receiver<bool>,
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
                tracing::error!(error = %e, "uplink credentials");
                return;
            }
        };
        let result = tokio::select! {
            r = session(&config, options, &queue, &wake, &state) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
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

/// One connection's life. Returns when the connection fails.
async fn session(
    config: &Config,
    options: MqttOptions,
    queue: &Arc<Mutex<Queue>>,
    wake: &Notify,
    state: &watch::Sender<State>,
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
    let subs: Vec<Value> = config.devices.iter().map(signed).collect();
    for (i, chunk) in subs.chunks(200).enumerate() {
        let add = json!({"id": format!("topo-{i}"), "version": "1.0", "params": chunk, "method": "thing.topo.add"});
        client
            .publish(
                format!("/sys/{gpk}/{gdn}/thing/topo/add"),
                QoS::AtLeastOnce,
                false,
                add.to_string(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let login =
            json!({"id": format!("login-{i}"), "version": "1.0", "params": {"deviceList": chunk}});
        client
            .publish(
                format!("/ext/session/{gpk}/{gdn}/combine/batch_login"),
                QoS::AtLeastOnce,
                false,
                login.to_string(),
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    // Wait for every batch_login reply (the cloud applies a login before later packets).
    let mut pending_logins = subs.chunks(200).count();
    while pending_logins > 0 {
        if let Event::Incoming(Packet::Publish(p)) =
            events.poll().await.map_err(|e| e.to_string())?
        {
            if p.topic.ends_with("/combine/batch_login_reply") {
                let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                if v["code"] != 200 {
                    return Err(format!("batch_login refused: {v}"));
                }
                pending_logins -= 1;
            }
        }
    }
    let _ = state.send(State::Up);
    tracing::info!(sub_devices = config.devices.len(), "uplink up");
    let pk_of: BTreeMap<&str, &str> = config
        .devices
        .iter()
        .map(|d| (d.name.as_str(), d.product_key.as_str()))
        .collect();
    // Sent, waiting for PUBACK: packet id order = send order; seq per send.
    let mut inflight: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    let mut sent_upto = queue.lock().map_err(|_| "queue lock")?.acked();
    loop {
        // Fill the window.
        if inflight.len() < WINDOW {
            let records = {
                let mut q = queue.lock().map_err(|_| "queue lock")?;
                q.read_after(sent_upto, WINDOW - inflight.len())
                    .map_err(|e| e.to_string())?
            };
            for r in records {
                let v: Value = serde_json::from_slice(&r.payload).unwrap_or(Value::Null);
                let Some(dn) = v["dn"].as_str() else {
                    // Not a reading this version understands: skip it rather than block.
                    sent_upto = r.seq;
                    continue;
                };
                let pk = pk_of.get(dn).copied().unwrap_or("");
                // `sys.dedup`: the cloud drops a second copy of this id (at-least-once delivery).
                let body = json!({"id": r.seq.to_string(), "version": "1.0", "sys": {"ack": 1, "dedup": 1}, "params": v["params"], "method": "thing.event.property.post"});
                client
                    .publish(
                        format!("/sys/{pk}/{dn}/thing/event/property/post"),
                        QoS::AtLeastOnce,
                        false,
                        body.to_string(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                inflight.push_back(r.seq);
                sent_upto = r.seq;
            }
        }
        tokio::select! {
            ev = events.poll() => {
                match ev.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::PubAck(_)) => {
                        // PUBACKs come in send order; topology/login acks were consumed above
                        // only as replies, so count only once the window holds readings.
                        if let Some(seq) = inflight.pop_front() {
                            let mut q = queue.lock().map_err(|_| "queue lock")?;
                            q.ack(seq).map_err(|e| e.to_string())?;
                        }
                    }
                    Event::Incoming(Packet::Disconnect) => return Err("cloud sent DISCONNECT".into()),
                    _ => {}
                }
            }
            _ = wake.notified(), if inflight.len() < WINDOW => {}
        }
    }
}
