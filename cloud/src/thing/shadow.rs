//! Device shadows in Alibaba's format: the device writes `reported` state on
//! `/shadow/update/{pk}/{dn}` (methods `update`, `get`, `delete`) and receives replies and the
//! cloud's `desired` state (method `control`) on `/shadow/get/{pk}/{dn}`.
//!
//! Versions: every update names a version greater than the stored one (409 otherwise); -1
//! clears the shadow. Desired attributes the device reports with an equal value are dropped, so
//! `desired` holds only what is still to be done, and that delta is pushed to the device each
//! time it subscribes to its shadow topic (reconnects included).

use super::store::ShadowRow;
use super::{to_device, Outcome, Thing};
use crate::registry::now_ms;
use serde_json::{json, Map, Value};

/// Most attributes in `reported` or `desired`.
const MAX_ATTRS: usize = 128;

/// A shadow refusal: Alibaba's error code and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (shadow error {code})")]
pub struct ShadowError {
    /// 400-409, 500.
    pub code: u16,
    /// What was wrong.
    pub message: String,
}

fn fail(code: u16, message: impl Into<String>) -> ShadowError {
    ShadowError {
        code,
        message: message.into(),
    }
}

/// A shadow in memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shadow {
    /// Reported state.
    pub reported: Map<String, Value>,
    /// Desired state.
    pub desired: Map<String, Value>,
    /// `{"reported": {attr: {"timestamp"}}, "desired": {...}}`.
    pub metadata: Map<String, Value>,
    /// Version.
    pub version: i64,
    /// Last change, ms.
    pub updated_at: i64,
}

fn object(s: &str) -> Map<String, Value> {
    serde_json::from_str(s).unwrap_or_default()
}

impl Shadow {
    fn from_row(r: &ShadowRow) -> Self {
        Self {
            reported: object(&r.reported),
            desired: object(&r.desired),
            metadata: object(&r.metadata),
            version: r.version,
            updated_at: r.updated_at,
        }
    }

    fn to_row(&self) -> ShadowRow {
        ShadowRow {
            reported: Value::Object(self.reported.clone()).to_string(),
            desired: Value::Object(self.desired.clone()).to_string(),
            metadata: Value::Object(self.metadata.clone()).to_string(),
            version: self.version,
            updated_at: self.updated_at,
        }
    }

    /// The document the API returns and the `get` reply carries.
    pub fn document(&self) -> Value {
        json!({
            "state": {"reported": self.reported, "desired": self.desired},
            "metadata": self.metadata,
            "version": self.version,
            "timestamp": self.updated_at,
        })
    }

    fn stamp(&mut self, side: &str, key: &str, at: i64) {
        let m = self
            .metadata
            .entry(side.to_owned())
            .or_insert_with(|| json!({}));
        if let Some(o) = m.as_object_mut() {
            o.insert(key.to_owned(), json!({ "timestamp": at }));
        }
    }

    fn unstamp(&mut self, side: &str, key: &str) {
        if let Some(o) = self.metadata.get_mut(side).and_then(Value::as_object_mut) {
            o.remove(key);
        }
    }

    /// Merges attributes into one side; `null` or `"null"` deletes an attribute.
    fn merge(
        &mut self,
        side: &str,
        attrs: &Map<String, Value>,
        at: i64,
    ) -> Result<(), ShadowError> {
        for (k, v) in attrs {
            let target = if side == "reported" {
                &mut self.reported
            } else {
                &mut self.desired
            };
            if v.is_null() || v.as_str() == Some("null") {
                target.remove(k);
                self.unstamp(side, k);
            } else {
                target.insert(k.clone(), v.clone());
                self.stamp(side, k, at);
            }
        }
        if self.reported.len() > MAX_ATTRS || self.desired.len() > MAX_ATTRS {
            return Err(fail(
                408,
                format!("a shadow holds at most {MAX_ATTRS} attributes per side"),
            ));
        }
        Ok(())
    }

    /// Desired attributes that differ from the reported ones.
    pub fn delta(&self) -> Map<String, Value> {
        self.desired
            .iter()
            .filter(|(k, v)| self.reported.get(*k) != Some(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Applies a device's `update` or `delete` request (`version` already checked).
    pub fn apply_device(
        &mut self,
        method: &str,
        state: &Value,
        at: i64,
    ) -> Result<(), ShadowError> {
        match method {
            "update" => {
                let reported = state
                    .get("reported")
                    .ok_or_else(|| fail(404, "state.reported is missing"))?;
                let reported = reported
                    .as_object()
                    .filter(|o| !o.is_empty())
                    .ok_or_else(|| fail(405, "state.reported must be a non-empty object"))?;
                self.merge("reported", reported, at)?;
                // Done work leaves `desired`.
                let done: Vec<String> = self
                    .desired
                    .iter()
                    .filter(|(k, v)| self.reported.get(*k) == Some(v))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in done {
                    self.desired.remove(&k);
                    self.unstamp("desired", &k);
                }
            }
            "delete" => {
                for side in ["reported", "desired"] {
                    match state.get(side) {
                        None => {}
                        Some(Value::String(s)) if s == "null" => {
                            if side == "reported" {
                                self.reported.clear();
                            } else {
                                self.desired.clear();
                            }
                            self.metadata.remove(side);
                        }
                        Some(Value::Object(attrs)) => {
                            let nulls: Map<String, Value> =
                                attrs.keys().map(|k| (k.clone(), Value::Null)).collect();
                            self.merge(side, &nulls, at)?;
                        }
                        Some(_) => {
                            return Err(fail(
                                400,
                                format!("state.{side} must be an object or \"null\""),
                            ))
                        }
                    }
                }
            }
            other => {
                return Err(fail(
                    406,
                    format!("method `{other}` is not update, get or delete"),
                ))
            }
        }
        self.updated_at = at;
        Ok(())
    }
}

fn reply_topic(pk: &str, dn: &str) -> String {
    format!("/shadow/get/{pk}/{dn}")
}

fn error_reply(e: &ShadowError) -> String {
    json!({
        "method": "reply",
        "payload": {"status": "error", "content": {"errorcode": e.code.to_string(), "errormessage": e.message}},
        "timestamp": now_ms(),
    })
    .to_string()
}

/// Loads a device's shadow (an empty one at version 0 when none is stored).
pub async fn load(
    thing: &Thing,
    pk: &str,
    dn: &str,
) -> Result<(Shadow, Option<i64>), crate::storage::StorageError> {
    Ok(match thing.db.get_shadow(pk, dn).await? {
        Some(r) => (Shadow::from_row(&r), Some(r.version)),
        None => (Shadow::default(), None),
    })
}

/// A device's request on `/shadow/update/{pk}/{dn}`.
pub async fn on_device(thing: &Thing, pk: &str, dn: &str, payload: &[u8]) -> Outcome {
    let topic = reply_topic(pk, dn);
    let answer = |body: String| Outcome::reply(to_device(topic.clone(), body));
    let v: Value = match serde_json::from_slice(payload) {
        Ok(v @ Value::Object(_)) => v,
        _ => return answer(error_reply(&fail(400, "not a JSON object"))),
    };
    let Some(method) = v.get("method").and_then(Value::as_str) else {
        return answer(error_reply(&fail(401, "method is missing")));
    };
    // Concurrent updates (API and device) retry on a version race.
    for _ in 0..5 {
        let (mut shadow, stored) = match load(thing, pk, dn).await {
            Ok(s) => s,
            Err(_) => return Outcome::failed(),
        };
        if method == "get" {
            let body = json!({
                "method": "reply",
                "payload": {"status": "success", "state": {"reported": shadow.reported, "desired": shadow.desired}, "metadata": shadow.metadata},
                "version": shadow.version,
                "timestamp": now_ms(),
            });
            return answer(body.to_string());
        }
        let Some(state) = v.get("state") else {
            return answer(error_reply(&fail(402, "state is missing")));
        };
        let Some(version) = v.get("version").and_then(Value::as_i64) else {
            return answer(error_reply(&fail(403, "version must be a number")));
        };
        let now = now_ms();
        if version == -1 {
            shadow = Shadow {
                updated_at: now,
                ..Shadow::default()
            };
        } else if version <= shadow.version {
            return answer(error_reply(&fail(
                409,
                format!(
                    "version {version} is not above the shadow's version {}",
                    shadow.version
                ),
            )));
        } else {
            if let Err(e) = shadow.apply_device(method, state, now) {
                return answer(error_reply(&e));
            }
            shadow.version = version;
        }
        match thing.db.put_shadow(pk, dn, stored, &shadow.to_row()).await {
            Ok(true) => {
                let body = json!({
                    "method": "reply",
                    "payload": {"status": "success", "version": shadow.version},
                    "timestamp": now_ms(),
                });
                return answer(body.to_string());
            }
            Ok(false) => continue,
            Err(_) => return Outcome::failed(),
        }
    }
    answer(error_reply(&fail(
        500,
        "the shadow changed concurrently, try again",
    )))
}

fn control(shadow: &Shadow, desired: Map<String, Value>) -> String {
    json!({
        "method": "control",
        "payload": {"status": "success", "state": {"reported": shadow.reported, "desired": desired}, "metadata": shadow.metadata},
        "version": shadow.version,
        "timestamp": now_ms(),
    })
    .to_string()
}

/// Sets desired attributes from the API (`null` deletes one). With `expected`, refused unless
/// the stored version is that one. Sends the device the new desired state when it is online.
pub async fn set_desired(
    thing: &Thing,
    pk: &str,
    dn: &str,
    desired: &Map<String, Value>,
    expected: Option<i64>,
) -> Result<Shadow, ShadowError> {
    for _ in 0..5 {
        let (mut shadow, stored) = load(thing, pk, dn)
            .await
            .map_err(|e| fail(500, e.to_string()))?;
        if let Some(v) = expected {
            if v != shadow.version {
                return Err(fail(
                    409,
                    format!("version {v} is not the shadow's version {}", shadow.version),
                ));
            }
        }
        let now = now_ms();
        shadow.merge("desired", desired, now)?;
        shadow.version += 1;
        shadow.updated_at = now;
        match thing.db.put_shadow(pk, dn, stored, &shadow.to_row()).await {
            Ok(true) => {
                if thing.is_online(pk, dn) {
                    thing.send(to_device(
                        reply_topic(pk, dn),
                        control(&shadow, shadow.desired.clone()),
                    ));
                }
                return Ok(shadow);
            }
            Ok(false) if expected.is_none() => continue,
            Ok(false) => return Err(fail(409, "the shadow changed concurrently")),
            Err(e) => return Err(fail(500, e.to_string())),
        }
    }
    Err(fail(500, "the shadow changed concurrently, try again"))
}

/// Sends a device the desired attributes it has not reported yet (called when it subscribes
/// to its shadow topic, e.g. after reconnecting). Nothing when there is no delta.
pub async fn push_delta(thing: &Thing, pk: &str, dn: &str) {
    match load(thing, pk, dn).await {
        Ok((shadow, _)) => {
            let delta = shadow.delta();
            if !delta.is_empty() {
                thing.send(to_device(reply_topic(pk, dn), control(&shadow, delta)));
            }
        }
        Err(e) => tracing::warn!(error = %e, "loading a shadow for its delta failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_updates_clear_done_desired_and_deletes_work() {
        let mut s = Shadow::default();
        s.merge(
            "desired",
            json!({"color": "red", "on": 1}).as_object().unwrap(),
            1,
        )
        .unwrap();
        assert_eq!(s.delta().len(), 2);
        s.apply_device(
            "update",
            &json!({"reported": {"color": "red", "temp": 20}}),
            2,
        )
        .unwrap();
        assert_eq!(Value::Object(s.desired.clone()), json!({"on": 1}));
        assert_eq!(Value::Object(s.delta()), json!({"on": 1}));
        s.apply_device("delete", &json!({"reported": {"temp": "null"}}), 3)
            .unwrap();
        assert_eq!(Value::Object(s.reported.clone()), json!({"color": "red"}));
        s.apply_device("delete", &json!({"desired": "null"}), 4)
            .unwrap();
        assert!(s.desired.is_empty());
    }

    #[test]
    fn refusals_carry_alibaba_codes() {
        let mut s = Shadow::default();
        assert_eq!(
            s.apply_device("update", &json!({}), 1).unwrap_err().code,
            404
        );
        assert_eq!(
            s.apply_device("update", &json!({"reported": {}}), 1)
                .unwrap_err()
                .code,
            405
        );
        assert_eq!(s.apply_device("frob", &json!({}), 1).unwrap_err().code, 406);
        let many: Map<String, Value> = (0..129).map(|i| (format!("a{i}"), json!(i))).collect();
        assert_eq!(
            s.apply_device("update", &json!({"reported": many}), 1)
                .unwrap_err()
                .code,
            408
        );
    }
}
