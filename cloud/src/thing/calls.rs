//! Calls from the cloud to a device: property set and get, async services (reply on
//! `..._reply`, correlated by message id) and sync services over RRPC. Every call is stored
//! with its status: pending, succeeded, failed or timed_out.

use super::store::ServiceCall;
use super::{code, to_device, Thing};
use crate::metrics::Metrics;
use crate::registry::now_ms;
use bytes::Bytes;
use ironlink_shared::tsl::{AccessMode, DataType};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

type Key = (String, String, String);

/// Calls whose caller waits for the device's answer.
#[derive(Debug)]
pub struct Pending {
    waiters: Mutex<HashMap<Key, oneshot::Sender<ServiceCall>>>,
    next_id: AtomicU32,
}

impl Default for Pending {
    fn default() -> Self {
        // Ids restart from the clock so that a restarted server does not reuse recent ones.
        let seed = (now_ms() / 1000) as u32;
        Self {
            waiters: Mutex::default(),
            next_id: AtomicU32::new(seed),
        }
    }
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, oneshot::Sender<ServiceCall>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a call could not be made; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The device is not connected.
    #[error("device `{0}/{1}` is offline: calls need a connected device (check GET /api/v1/devices/{0}/{1})")]
    Offline(String, String),
    /// The service is not in the thing model.
    #[error("{0}")]
    UnknownService(String),
    /// Parameters do not match the thing model.
    #[error("{0}")]
    InvalidParams(String),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

/// What to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    /// `thing.service.property.set`.
    PropertySet,
    /// `thing.service.property.get`.
    PropertyGet,
    /// A service of the thing model.
    Service(&'a str),
}

/// Marks timed-out calls once a second until `stop`.
pub async fn sweep(thing: Arc<Thing>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        ticks += 1;
        if ticks % 600 == 1 {
            // Duplicate-dropping keys are kept a week: longer than any edge backlog replays.
            let week = 7 * 24 * 3600 * 1000;
            if let Err(e) = thing.db.expire_message_ids(now_ms() - week).await {
                tracing::warn!(error = %e, "expiring message ids failed");
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = thing.db.expire_calls(now_ms()).await {
            tracing::warn!(error = %e, "expiring service calls failed");
        }
    }
}

fn check_params(params: &Value, inputs: &[ironlink_shared::tsl::Param]) -> Result<(), CallError> {
    DataType::Struct {
        fields: inputs.to_vec(),
    }
    .validate(params, "params")
    .map_err(|e| CallError::InvalidParams(e.to_string()))
}

impl Thing {
    /// The next message id for a call (Alink ids are decimal strings of at most 32 bits).
    fn new_call_id(&self) -> String {
        self.calls
            .next_id
            .fetch_add(1, Ordering::Relaxed)
            .to_string()
    }

    /// Records a call that never reached the device as failed, with the reason.
    async fn unsent(&self, call: ServiceCall, why: &str) -> Result<ServiceCall, CallError> {
        let done = self
            .db
            .finish_call(
                &call.product_key,
                &call.device_name,
                &call.message_id,
                "failed",
                None,
                Some(&json!({"error": why}).to_string()),
                now_ms(),
            )
            .await?;
        Ok(done.unwrap_or(call))
    }

    /// Calls a device. Property set/get and sync services wait up to `timeout` for the reply
    /// and return the finished call; async services return the pending call at once (it is
    /// marked timed_out after `timeout`).
    pub async fn call(
        &self,
        pk: &str,
        dn: &str,
        kind: Kind<'_>,
        params: Value,
        timeout: Option<Duration>,
    ) -> Result<ServiceCall, CallError> {
        let model = self.model(pk).await?;
        let (identifier, sync) = match kind {
            Kind::PropertySet => {
                let Some(obj) = params.as_object().filter(|o| !o.is_empty()) else {
                    return Err(CallError::InvalidParams(
                        "params must be an object of property values to set".into(),
                    ));
                };
                if let Some(m) = model.as_deref() {
                    for (id, v) in obj {
                        let Some(p) = m.property(id) else {
                            return Err(CallError::InvalidParams(format!(
                                "`{id}` is not a property of the thing model"
                            )));
                        };
                        if p.access_mode == AccessMode::Read {
                            return Err(CallError::InvalidParams(format!(
                                "property `{id}` is read-only (accessMode r)"
                            )));
                        }
                        p.param
                            .data_type
                            .validate(v, id)
                            .map_err(|e| CallError::InvalidParams(e.to_string()))?;
                    }
                }
                ("property.set".to_owned(), true)
            }
            Kind::PropertyGet => {
                let Some(ids) = params.as_array().filter(|a| a.iter().all(Value::is_string)) else {
                    return Err(CallError::InvalidParams(
                        "params must be a list of property identifiers".into(),
                    ));
                };
                if let Some(m) = model.as_deref() {
                    for id in ids.iter().filter_map(Value::as_str) {
                        if m.property(id).is_none() {
                            return Err(CallError::InvalidParams(format!(
                                "`{id}` is not a property of the thing model"
                            )));
                        }
                    }
                }
                ("property.get".to_owned(), true)
            }
            Kind::Service(id) => {
                let Some(m) = model.as_deref() else {
                    return Err(CallError::UnknownService(format!("product `{pk}` has no thing model, so it has no service `{id}`: import one with PUT /api/v1/products/{pk}/thing-model")));
                };
                let Some(s) = m.services.iter().find(|s| s.identifier == id) else {
                    return Err(CallError::UnknownService(format!(
                        "service `{id}` is not in the thing model of product `{pk}`"
                    )));
                };
                check_params(&params, &s.input)?;
                (id.to_owned(), s.call_type == "sync")
            }
        };
        if !self.is_online(pk, dn) {
            return Err(CallError::Offline(pk.to_owned(), dn.to_owned()));
        }
        let cfg = &self.config.thing;
        let default = if sync {
            cfg.call_timeout
        } else {
            cfg.async_call_timeout
        };
        let timeout = timeout.unwrap_or(default).min(cfg.max_call_timeout);
        let mut id = self.new_call_id();
        let method = format!("thing.service.{identifier}");
        let now = now_ms();
        let mut call = ServiceCall {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
            message_id: id.clone(),
            identifier: identifier.clone(),
            call_type: if kind == Kind::PropertySet || kind == Kind::PropertyGet || !sync {
                "async".into()
            } else {
                "sync".into()
            },
            params: params.to_string(),
            status: "pending".into(),
            code: None,
            reply: None,
            created_at: now,
            deadline: now + i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX / 2),
            replied_at: None,
        };
        // A restart sooner than the calls made restarts the ids among used ones: skip them.
        let mut tries = 0;
        while !self.db.insert_call(&call).await? {
            tries += 1;
            if tries >= 10_000 {
                return Err(crate::storage::StorageError::Conflict(
                    "no free message id for this device's call".into(),
                )
                .into());
            }
            id = self.new_call_id();
            call.message_id = id.clone();
        }
        let body =
            json!({"id": id, "version": "1.0", "params": params, "method": method}).to_string();
        let topic = match kind {
            Kind::PropertySet => format!("/sys/{pk}/{dn}/thing/service/property/set"),
            Kind::PropertyGet => format!("/sys/{pk}/{dn}/thing/service/property/get"),
            Kind::Service(s) if sync => {
                if self.uses_ext_rrpc(pk, dn) {
                    format!("/ext/rrpc/{id}/sys/{pk}/{dn}/thing/service/{s}")
                } else {
                    format!("/sys/{pk}/{dn}/rrpc/request/{id}")
                }
            }
            Kind::Service(s) => format!("/sys/{pk}/{dn}/thing/service/{s}"),
        };
        let key = (pk.to_owned(), dn.to_owned(), id.clone());
        let waiter = if sync {
            let (tx, rx) = oneshot::channel();
            self.calls.lock().insert(key.clone(), tx);
            Some(rx)
        } else {
            None
        };
        // A product with a data-parsing script gets its downlinks as raw bytes on `down_raw`,
        // encoded by `protocolToRawData`.
        let (topic, body) = if self.scripts.has(pk) {
            use crate::rules::script::{Answer, Call};
            let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            match self.scripts.call(pk, Call::Encode(json)).await {
                Ok(Answer::Bytes(b)) => (
                    format!("/sys/{pk}/{dn}/thing/model/down_raw"),
                    Bytes::from(b),
                ),
                other => {
                    self.calls.lock().remove(&key);
                    let why = match other {
                        Err(e) => format!("not sent: {e}"),
                        _ => "not sent: protocolToRawData() returned no bytes".to_owned(),
                    };
                    return self.unsent(call, &why).await;
                }
            }
        } else {
            (topic, Bytes::from(body))
        };
        if self.send(to_device(topic.clone(), body)) == 0 {
            self.calls.lock().remove(&key);
            let why =
                format!("not delivered: the device is online but not subscribed to `{topic}`");
            return self.unsent(call, &why).await;
        }
        let Some(rx) = waiter else {
            return Ok(call);
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(done)) => Ok(done),
            _ => {
                self.calls.lock().remove(&key);
                if let Some(c) = self
                    .db
                    .finish_call(pk, dn, &id, "timed_out", None, None, now_ms())
                    .await?
                {
                    return Ok(c);
                }
                // Answered in the meantime.
                Ok(self.db.get_call(pk, dn, &id).await?.unwrap_or_else(|| {
                    call.status = "timed_out".into();
                    call
                }))
            }
        }
    }

    /// A device answered a call: `{"id", "code", "data"}` on a `_reply` topic, or anything on
    /// `/rrpc/response/{id}` (then `rrpc_id` is the id and a non-JSON body is kept as text).
    pub(super) async fn on_reply(&self, pk: &str, dn: &str, rrpc_id: Option<&str>, payload: &[u8]) {
        let v: Value = serde_json::from_slice(payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
        let id = match (rrpc_id, v.get("id")) {
            (Some(id), _) => id.to_owned(),
            (None, Some(Value::String(s))) => s.clone(),
            (None, Some(Value::Number(n))) => n.to_string(),
            _ => {
                Metrics::inc(&self.metrics.alink_malformed);
                tracing::warn!(
                    product_key = pk,
                    device_name = dn,
                    "reply without an id, ignored"
                );
                return;
            }
        };
        // A number, or a number as text (what data-parsing scripts often return).
        let code = v
            .get("code")
            .and_then(|c| {
                c.as_i64()
                    .or_else(|| c.as_str().and_then(|s| s.trim().parse().ok()))
            })
            .or(rrpc_id.map(|_| code::OK));
        let data = match (rrpc_id, v.get("data")) {
            (None, Some(d)) => d.clone(),
            (None, None) => Value::Null,
            (Some(_), Some(d)) if v.get("code").is_some() => d.clone(),
            (Some(_), _) => v.clone(),
        };
        let status = if code == Some(code::OK) {
            "succeeded"
        } else {
            "failed"
        };
        match self
            .db
            .finish_call(pk, dn, &id, status, code, Some(&data.to_string()), now_ms())
            .await
        {
            Ok(Some(call)) => {
                // Alibaba's "downlink reply" message for applications.
                let body = json!({
                    "iotId": format!("{pk}.{dn}"), "productKey": pk, "deviceName": dn,
                    "requestId": call.message_id, "code": call.code, "data": data,
                    "topic": format!("/sys/{pk}/{dn}/thing/service/{}", call.identifier.replace('.', "/")),
                    "gmtCreate": now_ms(),
                });
                let topic = format!("/{pk}/{dn}/thing/downlink/reply/message");
                if !self
                    .to_apps(
                        pk,
                        crate::apps::MessageType::ServiceReply,
                        topic,
                        body.to_string().into_bytes(),
                    )
                    .await
                {
                    tracing::error!(
                        product_key = pk,
                        device_name = dn,
                        "a call reply could not be queued for consumer groups"
                    );
                }
                let waiter = self
                    .calls
                    .lock()
                    .remove(&(pk.to_owned(), dn.to_owned(), id));
                if let Some(w) = waiter {
                    let _ = w.send(call);
                }
            }
            Ok(None) => {
                Metrics::inc(&self.metrics.replies_unmatched);
                tracing::warn!(product_key = pk, device_name = dn, message_id = %id, "reply matches no pending call (unknown id, already answered or timed out), ignored");
            }
            Err(e) => tracing::error!(error = %e, "recording a call reply failed"),
        }
    }
}
