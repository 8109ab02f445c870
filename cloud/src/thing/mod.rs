//! The thing layer: what the platform does with a device's uplinks on system topics
//! (properties, events, replies, shadow, tags, gateway sub-devices, raw data, NTP) and what it
//! sends to devices (property set/get, service calls, shadow control).
//!
//! A connection hands each uplink on a system topic to [`Thing::handle`], which validates it
//! against the product's thing model, stores what must be stored and returns the reply for the
//! device. The connection acknowledges the PUBLISH (QoS 1) and sends the reply only after the
//! data is committed, so what a device was told is stored survives a kill -9.

mod alink;
pub mod calls;
mod gateway;
pub mod shadow;
pub mod store;
mod writer;

pub use alink::{parse_request, reply, Request};
pub use calls::CallError;
pub use gateway::{unbind, Change, SubEntry, SubLogin, Subs};

use crate::access::sessions::Sessions;
use crate::apps::{MessageType, Outgoing};
use crate::config::Config;
use crate::jobs::monitor::Alarm;
use crate::metrics::Metrics;
use crate::registry::now_ms;
use crate::router::{Message, Router};
use crate::storage::Db;
use bytes::Bytes;
use ironlink_shared::alink::{classify, Uplink};
use ironlink_shared::tsl::{self, DataType, ThingModel};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use store::{EventRow, RawRow, SeriesKey};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use ironlink_shared::alink::code;

/// What handling one uplink produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// False when storage failed: the connection must close without acknowledging, so the
    /// device sends the message again after reconnecting.
    pub failed: bool,
    /// Messages for the device (replies), published after the acknowledgement.
    pub replies: Vec<Message>,
    /// Sub-device logins or logouts to apply to the connection.
    pub change: Option<Change>,
}

impl Outcome {
    /// Storage failed: close unacknowledged.
    fn failed() -> Self {
        Self {
            failed: true,
            ..Self::default()
        }
    }

    fn reply(m: Message) -> Self {
        Self {
            replies: vec![m],
            ..Self::default()
        }
    }
}

/// Who sent an uplink: the connection's own identity and its sub-devices.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Product key of the connection.
    pub product_key: String,
    /// Device name of the connection.
    pub device_name: String,
    /// The connection's logged-in sub-devices.
    pub subs: Subs,
    /// Remote address of the connection.
    pub addr: String,
}

/// A message to a device's topic.
pub fn to_device(topic: String, payload: impl Into<Bytes>) -> Message {
    Message {
        topic,
        payload: payload.into(),
        qos: 0,
        retain: false,
    }
}

/// The thing layer, shared by every connection and the API.
#[derive(Debug)]
pub struct Thing {
    /// Storage.
    pub db: Db,
    router: Arc<Router>,
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    config: Arc<Config>,
    models: RwLock<HashMap<String, Option<Arc<ThingModel>>>>,
    writer: mpsc::Sender<writer::Job>,
    series: writer::SeriesCache,
    calls: calls::Pending,
    ext_rrpc: Mutex<std::collections::HashSet<(String, String)>>,
    /// Application access: what devices send, for consumer groups.
    pub apps: Arc<crate::apps::Apps>,
    /// Per-product data-parsing scripts (raw uplinks and downlinks).
    pub scripts: Arc<crate::rules::script::Scripts>,
    /// Per-device limits and what they refused.
    pub limits: Arc<crate::access::limits::Limits>,
    /// Over-the-air updates (the OTA topics' handlers).
    pub ota: Arc<crate::ota::Ota>,
    /// Anomaly monitors scoring posted values (set once at start).
    monitors: std::sync::OnceLock<Arc<crate::jobs::monitor::Monitors>>,
}

impl Thing {
    /// Starts the storage writer and the call-expiry sweeper; both end when `stop` turns true
    /// (the writer after storing what is queued).
    #[allow(clippy::too_many_arguments)] // the layer's collaborators, wired once at start
    pub fn start(
        db: Db,
        router: Arc<Router>,
        sessions: Arc<Sessions>,
        metrics: Arc<Metrics>,
        config: Arc<Config>,
        apps: Arc<crate::apps::Apps>,
        scripts: Arc<crate::rules::script::Scripts>,
        ota: Arc<crate::ota::Ota>,
        tsdb: Arc<crate::tsdb::Tsdb>,
        stop: watch::Receiver<bool>,
    ) -> (Arc<Self>, Vec<JoinHandle<()>>) {
        let (tx, rx) = mpsc::channel(16_384);
        let series = writer::SeriesCache::default();
        let writer_task = tokio::spawn(writer::run(
            db.clone(),
            rx,
            series.clone(),
            metrics.clone(),
            tsdb,
            stop.clone(),
        ));
        let thing = Arc::new(Self {
            limits: Arc::new(crate::access::limits::Limits::new(config.limits.clone())),
            db,
            router,
            sessions,
            metrics,
            config,
            models: RwLock::default(),
            writer: tx,
            series,
            calls: calls::Pending::default(),
            ext_rrpc: Mutex::default(),
            apps,
            scripts,
            ota,
            monitors: std::sync::OnceLock::new(),
        });
        let sweeper = tokio::spawn(calls::sweep(thing.clone(), stop));
        (thing, vec![writer_task, sweeper])
    }

    /// The product's latest thing model (cached; `None` when it has none).
    pub async fn model(
        &self,
        pk: &str,
    ) -> Result<Option<Arc<ThingModel>>, crate::storage::StorageError> {
        if let Some(m) = self
            .models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pk)
        {
            return Ok(m.clone());
        }
        let model = match self.db.get_thing_model(pk, None).await? {
            // Stored models were validated when imported; one that no longer parses (a newer
            // parser is stricter) is treated as absent and logged.
            Some((_, tsl_json, _)) => match tsl::parse(&tsl_json) {
                Ok(m) => Some(Arc::new(m)),
                Err(e) => {
                    tracing::error!(product_key = pk, error = %e, "stored thing model does not parse");
                    None
                }
            },
            None => None,
        };
        self.models
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pk.to_owned(), model.clone());
        Ok(model)
    }

    /// Forgets a cached thing model (after an import or a product deletion).
    pub fn forget_model(&self, pk: &str) {
        self.models
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pk);
    }

    /// Lets the anomaly monitors score what devices post (once, at start).
    pub fn set_monitors(&self, m: Arc<crate::jobs::monitor::Monitors>) {
        let _ = self.monitors.set(m);
    }

    /// Scores posted values (before the post goes to applications and rules, so rules'
    /// `anomaly()` finds the scores); the anomalies among them.
    fn score(&self, pk: &str, dn: &str, values: &[(String, i64, f64)]) -> Vec<Alarm> {
        match self.monitors.get() {
            Some(m) if !values.is_empty() => m.observe(pk, dn, values),
            _ => Vec::new(),
        }
    }

    /// The monitors' score of a posted value (for rules' `anomaly()`).
    pub fn anomaly_score(&self, pk: &str, dn: &str, property: &str, time: i64) -> Option<Value> {
        self.monitors.get()?.score_of(pk, dn, property, time)
    }

    /// Raises an `anomaly` event (type `alert`) per anomaly: stored and delivered to consumer
    /// groups and rules like the device's own events.
    async fn raise_anomalies(&self, pk: &str, dn: &str, alarms: Vec<Alarm>) {
        for a in alarms {
            let now = now_ms();
            let output = json!({
                "property": a.property, "value": a.value, "expected": a.expected,
                "lower": a.lower, "upper": a.upper, "sensitivity": a.sensitivity,
                "monitor": a.monitor,
            });
            let row = EventRow {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
                identifier: "anomaly".into(),
                event_type: "alert".into(),
                message_id: format!("anomaly-{}-{}", a.property, a.time),
                output: output.to_string(),
                ts: a.time,
            };
            tracing::info!(product_key = pk, device_name = dn, property = %a.property, value = a.value, expected = a.expected, monitor = %a.monitor, "anomaly");
            let app_message = json!({
                "identifier": "anomaly", "type": "alert", "iotId": format!("{pk}.{dn}"),
                "productKey": pk, "deviceName": dn, "requestId": row.message_id,
                "gmtCreate": now, "time": a.time, "value": output,
            })
            .to_string();
            if !self.store(Vec::new(), vec![row], Vec::new()).await {
                tracing::warn!(
                    product_key = pk,
                    device_name = dn,
                    "an anomaly event could not be stored"
                );
                continue;
            }
            let topic = format!("/{pk}/{dn}/thing/event/anomaly/post");
            let _ = self
                .to_apps(pk, MessageType::Event, topic, app_message.into_bytes())
                .await;
        }
    }

    /// Forgets cached series ids (after devices were deleted).
    pub fn forget_series(&self) {
        self.series.clear();
    }

    /// Records whether a connected device takes sync calls on `/ext/rrpc/...` (client id
    /// parameter `ext=1`, as Alibaba's SDKs send).
    pub fn set_ext_rrpc(&self, pk: &str, dn: &str, on: bool) {
        let mut s = self.ext_rrpc.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            s.insert((pk.to_owned(), dn.to_owned()));
        } else {
            s.remove(&(pk.to_owned(), dn.to_owned()));
        }
    }

    fn uses_ext_rrpc(&self, pk: &str, dn: &str) -> bool {
        self.ext_rrpc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(pk.to_owned(), dn.to_owned()))
    }

    /// Stores values a rule derived as property values of a device (time series), at `ts`.
    /// False when they could not be stored.
    pub async fn store_derived(
        &self,
        pk: &str,
        dn: &str,
        values: &serde_json::Map<String, Value>,
        ts: i64,
    ) -> bool {
        let rows = values
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(id, v)| {
                (
                    (pk.to_owned(), dn.to_owned(), id.clone()),
                    ts,
                    v.to_string(),
                )
            })
            .collect();
        self.store(rows, Vec::new(), Vec::new()).await
    }

    /// Queues rows for storage and waits for their commit; false when they could not be stored.
    async fn store(
        &self,
        props: Vec<(SeriesKey, i64, String)>,
        events: Vec<EventRow>,
        raws: Vec<RawRow>,
    ) -> bool {
        self.store_once(props, events, raws, None).await.is_some()
    }

    /// Like [`Thing::store`], dropping a message whose `dedup` key was stored before:
    /// `Some(true)` for such a duplicate, `Some(false)` when stored, `None` on failure.
    async fn store_once(
        &self,
        props: Vec<(SeriesKey, i64, String)>,
        events: Vec<EventRow>,
        raws: Vec<RawRow>,
        dedup: Option<(String, String, String)>,
    ) -> Option<bool> {
        if props.is_empty() && events.is_empty() && raws.is_empty() && dedup.is_none() {
            return Some(false);
        }
        let (done, committed) = oneshot::channel();
        let job = writer::Job {
            props,
            events,
            raws,
            dedup,
            done,
        };
        self.writer.send(job).await.ok()?;
        committed.await.ok().flatten()
    }

    /// Handles one uplink on a system topic (see [`classify`]). The ACL has already allowed
    /// the topic for `origin`.
    pub async fn handle(self: Arc<Self>, origin: Origin, topic: String, payload: Bytes) -> Outcome {
        let Some((dev, kind)) = classify(&topic) else {
            return Outcome::default();
        };
        let (pk, dn) = (dev.product_key.to_owned(), dev.device_name.to_owned());
        let reply_topic = format!("{topic}_reply");
        match kind {
            Uplink::UpRaw => {
                let out = self.up_raw(&pk, &dn, payload.clone()).await;
                if out.failed || !self.scripts.has(&pk) {
                    return out;
                }
                return Box::pin(self.clone().decode_raw(origin, &pk, &dn, payload)).await;
            }
            Uplink::DownRawReply if self.scripts.has(&pk) => {
                use crate::rules::script::{Answer, Call};
                match self.scripts.call(&pk, Call::Decode(payload.to_vec())).await {
                    Ok(Answer::Json(v)) => {
                        self.on_reply(&pk, &dn, None, v.to_string().as_bytes())
                            .await;
                    }
                    Ok(Answer::Bytes(_)) => {}
                    Err(e) => {
                        Metrics::inc(&self.metrics.alink_malformed);
                        tracing::warn!(product_key = %pk, device_name = %dn, error = %e, "raw reply not decoded by the product's script");
                    }
                }
                return Outcome::default();
            }
            Uplink::DownRawReply => {
                let ok = self
                    .store(
                        Vec::new(),
                        Vec::new(),
                        vec![RawRow {
                            product_key: pk,
                            device_name: dn,
                            direction: "down_reply",
                            payload: payload.to_vec(),
                            ts: now_ms(),
                        }],
                    )
                    .await;
                return Outcome {
                    failed: !ok,
                    ..Outcome::default()
                };
            }
            Uplink::ShadowUpdate => return shadow::on_device(&self, &pk, &dn, &payload).await,
            // A reply to something Ironlink does not send (remote config, OTA...): nothing to
            // record, and answering a reply would start a loop.
            Uplink::Unknown if topic.ends_with("_reply") => {
                tracing::debug!(product_key = %pk, device_name = %dn, %topic, "reply on a topic Ironlink does not serve, ignored");
                return Outcome::default();
            }
            Uplink::NtpRequest => {
                return match Self::ntp_reply(&topic, &payload, now_ms()) {
                    Some(m) => Outcome::reply(m),
                    None => Outcome::default(),
                }
            }
            Uplink::RrpcResponse(id) => {
                let id = id.to_owned();
                self.on_reply(&pk, &dn, Some(&id), &payload).await;
                return Outcome::default();
            }
            Uplink::OtaInform | Uplink::OtaProgress => {
                let done = if kind == Uplink::OtaInform {
                    self.ota.on_inform(&pk, &dn, &payload).await
                } else {
                    self.ota.on_progress(&pk, &dn, &payload).await
                };
                return match done {
                    Ok(()) => Outcome::default(),
                    Err(e) => {
                        tracing::error!(error = %e, product_key = %pk, device_name = %dn, "storing an OTA report failed");
                        Outcome::failed()
                    }
                };
            }
            Uplink::OtaFirmwareGet => {
                return match self
                    .ota
                    .on_firmware_get(&pk, &dn, reply_topic, &payload)
                    .await
                {
                    Ok(m) => Outcome::reply(m),
                    Err(e) => {
                        tracing::error!(error = %e, product_key = %pk, device_name = %dn, "answering firmware/get failed");
                        Outcome::failed()
                    }
                };
            }
            _ => {}
        }
        let req = match parse_request(&payload) {
            Ok(r) => r,
            Err(why) => {
                Metrics::inc(&self.metrics.alink_malformed);
                tracing::warn!(product_key = %pk, device_name = %dn, %topic, %why, "malformed Alink message");
                // Replies to replies would loop; everything else is told what was wrong.
                if matches!(
                    kind,
                    Uplink::ServiceReply(_) | Uplink::PropertySetReply | Uplink::PropertyGetReply
                ) {
                    return Outcome::default();
                }
                return Outcome::reply(to_device(
                    reply_topic,
                    reply(
                        "",
                        code::INVALID_PARAMS,
                        &format!("malformed Alink message: {why}"),
                        json!({}),
                        None,
                    ),
                ));
            }
        };
        match kind {
            Uplink::PropertyPost => self.property_post(&pk, &dn, req, reply_topic).await,
            Uplink::EventPost(id) => self.event_post(&pk, &dn, id, req, reply_topic).await,
            Uplink::PropertySetReply | Uplink::PropertyGetReply | Uplink::ServiceReply(_) => {
                self.on_reply(&pk, &dn, None, &payload).await;
                Outcome::default()
            }
            Uplink::DeviceInfoUpdate | Uplink::DeviceInfoDelete => {
                self.device_info(&pk, &dn, kind == Uplink::DeviceInfoUpdate, req, reply_topic)
                    .await
            }
            Uplink::TopoAdd
            | Uplink::TopoDelete
            | Uplink::TopoGet
            | Uplink::SubRegister
            | Uplink::Login
            | Uplink::BatchLogin
            | Uplink::Logout
            | Uplink::BatchLogout => {
                if (pk.as_str(), dn.as_str())
                    != (origin.product_key.as_str(), origin.device_name.as_str())
                {
                    return Outcome::reply(to_device(
                        reply_topic,
                        reply(
                            &req.id,
                            code::INVALID_PARAMS,
                            "gateway requests must use the gateway's own topics",
                            json!({}),
                            None,
                        ),
                    ));
                }
                gateway::handle(&self, &origin, kind, req, reply_topic).await
            }
            _ => {
                Metrics::inc(&self.metrics.alink_malformed);
                Outcome::reply(to_device(
                    reply_topic,
                    reply(
                        &req.id,
                        code::NO_METHOD,
                        &format!("`{topic}` is not a topic Ironlink serves"),
                        json!({}),
                        None,
                    ),
                ))
            }
        }
    }

    /// NTP over MQTT: answers at once with the server's receive and send times.
    pub fn ntp_reply(topic: &str, payload: &[u8], received_at: i64) -> Option<Message> {
        let rest = topic.strip_suffix("/request")?;
        let v: Value = serde_json::from_slice(payload).ok()?;
        let sent = v.get("deviceSendTime").cloned().unwrap_or(Value::Null);
        let body = json!({
            "deviceSendTime": sent,
            "serverRecvTime": received_at.to_string(),
            "serverSendTime": now_ms().to_string(),
        });
        Some(to_device(format!("{rest}/response"), body.to_string()))
    }

    async fn property_post(
        &self,
        pk: &str,
        dn: &str,
        req: Request,
        reply_topic: String,
    ) -> Outcome {
        let method = "thing.event.property.post";
        let model = match self.model(pk).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "loading thing model failed");
                return Outcome::failed();
            }
        };
        let Some(params) = req.params.as_object() else {
            Metrics::inc(&self.metrics.alink_malformed);
            return self.answer(
                &req,
                reply_topic,
                code::INVALID_PARAMS,
                "params must be an object of property values".into(),
                json!({}),
                method,
            );
        };
        let now = now_ms();
        let mut rows = Vec::with_capacity(params.len());
        let mut invalid = Map::new();
        for (id, raw) in params {
            let (value, ts) = alink::value_and_time(
                raw,
                now,
                model
                    .as_deref()
                    .and_then(|m| m.property(id))
                    .map(|p| &p.param.data_type),
            );
            let skew = self.config.thing.max_future_skew;
            let ahead = ts.saturating_sub(now);
            let check = match model.as_deref() {
                _ if ahead > skew.as_millis() as i64 => Err(format!(
                    "time {ts} is {} s ahead of the server clock (thing.max_future_skew: {} s)",
                    ahead / 1000,
                    skew.as_secs()
                )),
                None => Ok(()),
                Some(m) => match m.property(id) {
                    Some(p) => p
                        .param
                        .data_type
                        .validate(value, id)
                        .map_err(|e| e.to_string()),
                    None => Err(format!("`{id}` is not a property of the thing model")),
                },
            };
            match check {
                Ok(()) => rows.push((
                    (pk.to_owned(), dn.to_owned(), id.clone()),
                    ts,
                    value.to_string(),
                )),
                Err(why) => {
                    invalid.insert(id.clone(), Value::String(why));
                }
            }
        }
        if model.is_none() {
            // Nothing checks what a product without a thing model stores: a daily quota does.
            let bytes: usize = rows
                .iter()
                .map(|((_, _, id), _, v)| id.len() + v.len())
                .sum();
            if let Some(why) = self.over_quota(pk, dn, bytes, now) {
                return self.answer(
                    &req,
                    reply_topic,
                    code::TOO_MANY_REQUESTS,
                    why,
                    json!({}),
                    method,
                );
            }
        }
        let stored = rows.len();
        // The form Alibaba's server-side subscription delivers: `items` plus what failed.
        let app_message = (stored > 0 && self.apps.wants(pk, MessageType::Property)).then(|| {
            let items: Map<String, Value> = rows
                .iter()
                .map(|((_, _, id), ts, v)| {
                    let value: Value = serde_json::from_str(v).unwrap_or(Value::Null);
                    (id.clone(), json!({"value": value, "time": ts}))
                })
                .collect();
            json!({
                "iotId": format!("{pk}.{dn}"), "productKey": pk, "deviceName": dn,
                "requestId": req.id, "gmtCreate": now, "items": items, "checkFailedData": invalid,
            })
            .to_string()
        });
        let dedup = req
            .dedup
            .then(|| (pk.to_owned(), dn.to_owned(), req.id.clone()));
        let scored: Vec<(String, i64, f64)> = match self.monitors.get() {
            Some(m) if m.watches(pk) => rows
                .iter()
                .filter_map(|((_, _, id), ts, v)| {
                    let v: Value = serde_json::from_str(v).ok()?;
                    Some((id.clone(), *ts, crate::tsdb::codec::numeric(&v)?))
                })
                .collect(),
            _ => Vec::new(),
        };
        match self.store_once(rows, Vec::new(), Vec::new(), dedup).await {
            None => return Outcome::failed(),
            Some(true) => {
                // Already stored (and forwarded) under this id: answer as the first time.
                Metrics::inc(&self.metrics.duplicates_dropped);
                return self.success(&req, reply_topic, method);
            }
            Some(false) => {}
        }
        let alarms = self.score(pk, dn, &scored);
        if let Some(body) = app_message {
            let topic = format!("/{pk}/{dn}/thing/event/property/post");
            if !self
                .to_apps(pk, MessageType::Property, topic, body.into_bytes())
                .await
            {
                return Outcome::failed();
            }
        }
        self.metrics
            .properties_stored
            .fetch_add(stored as u64, Ordering::Relaxed);
        if !alarms.is_empty() {
            self.raise_anomalies(pk, dn, alarms).await;
        }
        if invalid.is_empty() {
            return self.success(&req, reply_topic, method);
        }
        self.metrics
            .properties_refused
            .fetch_add(invalid.len() as u64, Ordering::Relaxed);
        tracing::info!(
            product_key = pk,
            device_name = dn,
            refused = %invalid.values().filter_map(serde_json::Value::as_str).collect::<Vec<_>>().join("; "),
            "property values refused by the thing model"
        );
        let message = format!(
            "{} of {} properties refused, the others were stored: {}",
            invalid.len(),
            params.len(),
            invalid
                .values()
                .map(|v| v.as_str().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
                .join("; ")
        );
        self.answer(
            &req,
            reply_topic,
            code::INVALID_PARAMS,
            message,
            json!({ "invalid": invalid }),
            method,
        )
    }

    async fn event_post(
        &self,
        pk: &str,
        dn: &str,
        id: &str,
        req: Request,
        reply_topic: String,
    ) -> Outcome {
        let method = format!("thing.event.{id}.post");
        let model = match self.model(pk).await {
            Ok(m) => m,
            Err(_) => return Outcome::failed(),
        };
        let now = now_ms();
        let value = req.params.get("value").unwrap_or(&req.params);
        let ts = req.params.get("time").and_then(alink::as_ms).unwrap_or(now);
        let skew = self.config.thing.max_future_skew;
        if ts.saturating_sub(now) > skew.as_millis() as i64 {
            Metrics::inc(&self.metrics.alink_malformed);
            return self.answer(
                &req,
                reply_topic,
                code::INVALID_PARAMS,
                format!(
                    "event not stored: time {ts} is {} s ahead of the server clock (thing.max_future_skew: {} s)",
                    (ts - now) / 1000,
                    skew.as_secs()
                ),
                json!({}),
                &method,
            );
        }
        let event_type = match model.as_deref() {
            None => {
                let size = id.len() + value.to_string().len();
                if let Some(why) = self.over_quota(pk, dn, size, now) {
                    return self.answer(
                        &req,
                        reply_topic,
                        code::TOO_MANY_REQUESTS,
                        why,
                        json!({}),
                        &method,
                    );
                }
                "info".to_owned()
            }
            Some(m) => {
                let Some(ev) = m.events.iter().find(|e| e.identifier == id) else {
                    Metrics::inc(&self.metrics.alink_malformed);
                    return self.answer(
                        &req,
                        reply_topic,
                        code::INVALID_PARAMS,
                        format!("event `{id}` is not in the thing model"),
                        json!({}),
                        &method,
                    );
                };
                let ty = DataType::Struct {
                    fields: ev.output.clone(),
                };
                if let Err(e) = ty.validate(value, id) {
                    Metrics::inc(&self.metrics.properties_refused);
                    return self.answer(
                        &req,
                        reply_topic,
                        code::INVALID_PARAMS,
                        format!("event not stored: {e}"),
                        json!({}),
                        &method,
                    );
                }
                ev.kind.clone()
            }
        };
        let row = EventRow {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
            identifier: id.to_owned(),
            event_type,
            message_id: req.id.clone(),
            output: value.to_string(),
            ts,
        };
        let app_message = json!({
            "identifier": row.identifier, "type": row.event_type, "iotId": format!("{pk}.{dn}"),
            "productKey": pk, "deviceName": dn, "requestId": row.message_id, "gmtCreate": now,
            "time": row.ts, "value": value,
        })
        .to_string();
        if !self.store(Vec::new(), vec![row], Vec::new()).await {
            return Outcome::failed();
        }
        let topic = format!("/{pk}/{dn}/thing/event/{id}/post");
        if !self
            .to_apps(pk, MessageType::Event, topic, app_message.into_bytes())
            .await
        {
            return Outcome::failed();
        }
        Metrics::inc(&self.metrics.events_stored);
        self.success(&req, reply_topic, &method)
    }

    /// A raw uplink of a product with a data-parsing script: `rawDataToProtocol` turns it
    /// into Alink JSON, handled as if the device had sent it on the method's topic; the
    /// replies go back through `protocolToRawData` on `up_raw_reply`.
    async fn decode_raw(
        self: Arc<Self>,
        origin: Origin,
        pk: &str,
        dn: &str,
        payload: Bytes,
    ) -> Outcome {
        use crate::rules::script::{Answer, Call};
        let decoded = match self.scripts.call(pk, Call::Decode(payload.to_vec())).await {
            Ok(Answer::Json(v)) => v,
            Ok(Answer::Bytes(_)) => return Outcome::default(),
            Err(e) => {
                Metrics::inc(&self.metrics.alink_malformed);
                tracing::warn!(product_key = pk, device_name = dn, error = %e, "raw uplink not decoded by the product's script (stored raw)");
                return Outcome::default();
            }
        };
        let method = decoded
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let topic = match method
            .strip_prefix("thing.event.")
            .and_then(|m| m.strip_suffix(".post"))
        {
            Some("property") => format!("/sys/{pk}/{dn}/thing/event/property/post"),
            Some(event) if !event.is_empty() && !event.contains('/') => {
                format!("/sys/{pk}/{dn}/thing/event/{event}/post")
            }
            _ => {
                Metrics::inc(&self.metrics.alink_malformed);
                tracing::warn!(product_key = pk, device_name = dn, %method, "the script decoded a raw uplink to a method Ironlink does not take from raw data (thing.event.property.post, thing.event.{{id}}.post); stored raw");
                return Outcome::default();
            }
        };
        let mut out = self
            .clone()
            .handle(origin, topic, Bytes::from(decoded.to_string()))
            .await;
        let mut replies = Vec::new();
        for r in std::mem::take(&mut out.replies) {
            let Ok(json) = serde_json::from_slice::<Value>(&r.payload) else {
                continue;
            };
            match self.scripts.call(pk, Call::Encode(json)).await {
                Ok(Answer::Bytes(b)) => replies.push(to_device(
                    format!("/sys/{pk}/{dn}/thing/model/up_raw_reply"),
                    b,
                )),
                Ok(Answer::Json(_)) => {}
                Err(e) => {
                    tracing::warn!(product_key = pk, device_name = dn, error = %e, "reply not encoded by the product's script: not sent")
                }
            }
        }
        out.replies = replies;
        out
    }

    async fn up_raw(&self, pk: &str, dn: &str, payload: Bytes) -> Outcome {
        if self.over_quota(pk, dn, payload.len(), now_ms()).is_some() {
            // Raw data has no reply of its own: refused, counted, visible per device.
            return Outcome::default();
        }
        let row = RawRow {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
            direction: "up",
            payload: payload.to_vec(),
            ts: now_ms(),
        };
        if !self.store(Vec::new(), Vec::new(), vec![row]).await {
            return Outcome::failed();
        }
        let topic = format!("/{pk}/{dn}/thing/model/up_raw");
        if !self
            .to_apps(pk, MessageType::Raw, topic, payload.to_vec())
            .await
        {
            return Outcome::failed();
        }
        Outcome::default()
    }

    /// Charges unvalidated bytes to the device's daily quota; the refusal's reason when over.
    fn over_quota(&self, pk: &str, dn: &str, bytes: usize, now: i64) -> Option<String> {
        if self.limits.charge_unvalidated(pk, dn, bytes as u64, now) {
            return None;
        }
        let why = format!(
            "over the daily storage quota for data without a thing model ({} bytes, limits.device.unvalidated_bytes_per_day): refused until 00:00 UTC",
            self.limits.of(pk).unvalidated_bytes_per_day
        );
        self.limits.refuse(
            pk,
            dn,
            crate::access::limits::Refusal::StorageQuota,
            &why,
            now,
        );
        Some(why)
    }

    async fn device_info(
        &self,
        pk: &str,
        dn: &str,
        update: bool,
        req: Request,
        reply_topic: String,
    ) -> Outcome {
        let method = if update {
            "thing.deviceinfo.update"
        } else {
            "thing.deviceinfo.delete"
        };
        let Some(items) = req.params.as_array() else {
            return self.answer(
                &req,
                reply_topic,
                code::INVALID_PARAMS,
                "params must be a list of {attrKey, attrValue}".into(),
                json!({}),
                method,
            );
        };
        let mut changes = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let Some(key) = item.get("attrKey").and_then(Value::as_str) else {
                return self.answer(
                    &req,
                    reply_topic,
                    code::INVALID_PARAMS,
                    format!("params[{i}].attrKey is missing"),
                    json!({}),
                    method,
                );
            };
            if key.is_empty() || key.len() > 64 {
                return self.answer(
                    &req,
                    reply_topic,
                    code::INVALID_PARAMS,
                    format!("params[{i}].attrKey must be 1 to 64 characters"),
                    json!({}),
                    method,
                );
            }
            let value = if update {
                match item.get("attrValue") {
                    Some(Value::String(s)) if s.len() <= 1024 => Some(Value::String(s.clone())),
                    Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                        Some(Value::String(v.to_string()))
                    }
                    _ => {
                        return self.answer(
                            &req,
                            reply_topic,
                            code::INVALID_PARAMS,
                            format!("params[{i}].attrValue must be a string of at most 1024 bytes"),
                            json!({}),
                            method,
                        )
                    }
                }
            } else {
                None
            };
            changes.push((key.to_owned(), value));
        }
        let device = match self.db.get_device(pk, dn).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                return self.answer(
                    &req,
                    reply_topic,
                    code::DEVICE_NOT_FOUND,
                    "no such device".into(),
                    json!({}),
                    method,
                )
            }
            Err(_) => return Outcome::failed(),
        };
        let mut tags: Map<String, Value> = serde_json::from_str(&device.tags).unwrap_or_default();
        for (k, v) in changes {
            match v {
                Some(v) => {
                    tags.insert(k, v);
                }
                None => {
                    tags.remove(&k);
                }
            }
        }
        if let Err(e) = self
            .db
            .set_device_tags(pk, dn, &Value::Object(tags).to_string())
            .await
        {
            tracing::error!(error = %e, "storing device tags failed");
            return Outcome::failed();
        }
        self.success(&req, reply_topic, method)
    }

    /// A code-200 reply to `req`.
    fn success(&self, req: &Request, reply_topic: String, method: &str) -> Outcome {
        self.answer(
            req,
            reply_topic,
            code::OK,
            "success".into(),
            json!({}),
            method,
        )
    }

    /// A reply to `req` on `reply_topic`, unless the device asked for none (`sys.ack` 0).
    fn answer(
        &self,
        req: &Request,
        reply_topic: String,
        code: i64,
        message: String,
        data: Value,
        method: &str,
    ) -> Outcome {
        if !req.ack {
            return Outcome::default();
        }
        Outcome::reply(to_device(
            reply_topic,
            reply(&req.id, code, &message, data, Some(method)),
        ))
    }

    /// Hands a device message to the consumer groups that take it and waits for its commit
    /// (nothing to do when none does). False when it could not be queued.
    pub(crate) async fn to_apps(
        &self,
        pk: &str,
        kind: MessageType,
        topic: String,
        payload: Vec<u8>,
    ) -> bool {
        if !self.apps.wants(pk, kind) {
            return true;
        }
        self.apps
            .publish(Outgoing {
                product_key: pk.to_owned(),
                kind,
                topic,
                payload,
                generated_at: now_ms(),
            })
            .await
    }

    /// True when the device is connected directly or logged in through a gateway.
    pub fn is_online(&self, pk: &str, dn: &str) -> bool {
        self.sessions.is_online(pk, dn)
    }

    /// Publishes a message to a device; returns how many sessions it was queued to.
    pub fn send(&self, m: Message) -> usize {
        self.router.publish(m)
    }
}
