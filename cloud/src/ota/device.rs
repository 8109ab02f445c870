//! What devices send on the OTA topics: versions (inform), progress, and `firmware/get`; and
//! what happens when a device comes back online.

use super::plan::{self, JobState, Stage};
use super::store::{Change, Job, NewJob};
use super::{check_name, check_version, reports, Candidate, Live, Ota, Selector};
use crate::apps::{MessageType, Notices};
use crate::metrics::Metrics;
use crate::registry::now_ms;
use crate::router::Message;
use crate::storage::{StorageError, TagMap};
use serde_json::{json, Value};
use std::sync::Arc;

impl Ota {
    /// `/ota/device/inform/{pk}/{dn}`: the device runs `version` of `module`. Records it;
    /// the package's version ends the device's job in success (a different version after
    /// flashing means the image did not stay); a device that now matches a running campaign
    /// joins it. `Err` when storage failed (the message is then not acknowledged).
    pub async fn on_inform(&self, pk: &str, dn: &str, payload: &[u8]) -> Result<(), StorageError> {
        let Some((module, params)) = self.parse(pk, dn, "inform", payload) else {
            return Ok(());
        };
        let Some(version) = params.get("version").and_then(Value::as_str) else {
            self.malformed(pk, dn, "inform", "params.version is missing or not text");
            return Ok(());
        };
        if let Err(e) = check_version(version) {
            self.malformed(pk, dn, "inform", &e);
            return Ok(());
        }
        let now = now_ms();
        let (moved, no_job) = self
            .reports
            .apply(reports::Report {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
                module: module.clone(),
                kind: reports::Kind::Inform {
                    version: version.to_owned(),
                },
                at: now,
            })
            .await?;
        let mut n = Notices::new(&self.apps, &self.router);
        n.push(
            pk,
            MessageType::Ota,
            format!("/{pk}/{dn}/ota/version/post"),
            json!({"iotId": format!("{pk}.{dn}"), "productKey": pk, "deviceName": dn, "moduleName": module, "moduleVersion": version, "messageCreateTime": now}).to_string(),
            now,
        );
        n.commit().await;
        self.moved(moved, now).await?;
        if no_job {
            self.pick_up(pk, dn, Some((&module, version)), now).await?;
        }
        Ok(())
    }

    /// Tells about jobs a report moved, and wakes the scheduler when one left the active
    /// states (room for another notice, or a retry queued).
    async fn moved(&self, moved: Vec<(Job, String)>, now: i64) -> Result<(), StorageError> {
        let mut wake = false;
        for (j, detail) in moved {
            let live = self.live_of(&j.campaign_id).await?;
            wake |= !j.job_state().is_active();
            self.announce(live.as_deref(), &j, &detail, now).await;
        }
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Adds the device to running campaigns it now matches (by version, tags, share), for
    /// the module it just reported or for every module when `reported` is `None`.
    async fn pick_up(
        &self,
        pk: &str,
        dn: &str,
        reported: Option<(&str, &str)>,
        now: i64,
    ) -> Result<(), StorageError> {
        if !self.has_live(pk) {
            return Ok(());
        }
        let lives: Vec<Arc<Live>> = self
            .live
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|l| {
                l.row.product_key == pk
                    && l.row.state == "running"
                    && reported.is_none_or(|(m, _)| l.row.module == m)
            })
            .cloned()
            .collect();
        if lives.is_empty() {
            return Ok(());
        }
        let Some(device) = self.db.get_device(pk, dn).await? else {
            return Ok(());
        };
        let tags: TagMap = serde_json::from_str(&device.tags).unwrap_or_default();
        let versions = self.db.device_versions(pk, dn).await?;
        for live in lives {
            if live.ends_at().is_some_and(|e| now >= e) {
                continue;
            }
            let version = match reported {
                Some((_, v)) => Some(v.to_owned()),
                None => versions
                    .iter()
                    .find(|m| m.module == live.row.module)
                    .map(|m| m.version.clone()),
            };
            let c = Candidate {
                device_name: dn,
                tags: &tags,
                version: version.as_deref(),
            };
            let sources = live.package.sources();
            if !live.target.selects(&live.row.id, pk, &c)
                || version.as_deref() == Some(live.package.version.as_str())
                || (!sources.is_empty()
                    && !version
                        .as_deref()
                        .is_some_and(|v| sources.iter().any(|s| s == v)))
                || !self
                    .db
                    .open_jobs(pk, dn, &live.row.module)
                    .await?
                    .is_empty()
            {
                continue;
            }
            let added = self
                .db
                .add_jobs(
                    &live.row,
                    &[NewJob {
                        device_name: dn.to_owned(),
                        canary: false,
                        from_version: version,
                    }],
                    now,
                )
                .await?;
            if added > 0 {
                tracing::info!(campaign = %live.row.id, device = %dn, "device joined a running OTA campaign");
                self.wake.notify_one();
            }
        }
        Ok(())
    }

    /// A device came online: a notice it may have missed is renewed (its job goes back to
    /// the queue, to be notified again under a new attempt), and it joins running
    /// campaigns it matches.
    pub async fn on_online(&self, pk: &str, dn: &str) -> Result<(), StorageError> {
        if !self.has_live(pk) {
            return Ok(());
        }
        let now = now_ms();
        for job in self.db.device_jobs(pk, dn).await? {
            if job.job_state() != JobState::Notified {
                continue;
            }
            if !self
                .live
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&job.campaign_id)
            {
                continue;
            }
            let change = Change {
                from: &[JobState::Notified],
                attempt: Some(job.attempt),
                to: JobState::Queued,
                step: None,
                detail: "device reconnected before reporting progress: notice renewed".into(),
                deadline: None,
                retry: false,
            };
            self.db.move_job(&job.campaign_id, dn, &change, now).await?;
        }
        self.pick_up(pk, dn, None, now).await
    }

    /// `/ota/device/progress/{pk}/{dn}`: moves the device's job for the module.
    pub async fn on_progress(
        &self,
        pk: &str,
        dn: &str,
        payload: &[u8],
    ) -> Result<(), StorageError> {
        let Some((module, params)) = self.parse(pk, dn, "progress", payload) else {
            return Ok(());
        };
        let step = match params.get("step") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        let Some(step) = step else {
            self.malformed(
                pk,
                dn,
                "progress",
                "params.step is missing or not a whole number",
            );
            return Ok(());
        };
        let desc: String = params
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(256)
            .collect();
        if let Err(e) = plan::report(step, &desc) {
            self.malformed(pk, dn, "progress", &e);
            return Ok(());
        }
        let now = now_ms();
        let (moved, _) = self
            .reports
            .apply(reports::Report {
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
                module,
                kind: reports::Kind::Progress {
                    step,
                    desc: desc.clone(),
                },
                at: now,
            })
            .await?;
        // Download steps are told at every quarter, not each.
        let moved: Vec<(Job, String)> = moved
            .into_iter()
            .filter(|(j, _)| j.job_state() != JobState::Downloading || step % 25 == 0)
            .collect();
        self.moved(moved, now).await
    }

    /// `/sys/{pk}/{dn}/thing/ota/firmware/get`: answers with the device's pending upgrade
    /// for the module (notifying a queued job now, outside the campaign's pace: the device
    /// asked), or with empty data when there is none.
    pub async fn on_firmware_get(
        &self,
        pk: &str,
        dn: &str,
        reply_topic: String,
        payload: &[u8],
    ) -> Result<Message, StorageError> {
        let v: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let id = match v.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        let module = v
            .pointer("/params/module")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .unwrap_or("default")
            .to_owned();
        let answer = |data: Value| Message {
            topic: reply_topic.clone(),
            payload: json!({"id": id, "code": 200, "data": data, "message": "success"})
                .to_string()
                .into(),
            qos: 0,
            retain: false,
        };
        let now = now_ms();
        for (job, row) in self.db.open_jobs(pk, dn, &module).await? {
            if row.state != "running" {
                continue;
            }
            let Some(live) = self.live_of(&row.id).await? else {
                continue;
            };
            if live.stage() == Stage::Canary && job.canary == 0 {
                continue;
            }
            let job = if job.job_state() == JobState::Queued {
                let deadline = now + live.policy.timeout.as_millis() as i64;
                match self
                    .db
                    .notify_jobs(
                        &row.id,
                        &[dn.to_owned()],
                        now,
                        deadline,
                        "device asked (firmware/get)",
                    )
                    .await?
                    .pop()
                {
                    Some(j) => {
                        self.announce(Some(&live), &j, "device asked (firmware/get)", now)
                            .await;
                        j
                    }
                    None => continue,
                }
            } else {
                job
            };
            Metrics::inc(&self.metrics.ota_notices);
            let body: Value =
                serde_json::from_str(&self.notice_body(&live, &job, now)).unwrap_or(Value::Null);
            return Ok(answer(body.get("data").cloned().unwrap_or(json!({}))));
        }
        Ok(answer(json!({})))
    }

    /// The module and params of an inform or progress message; `None` (logged, counted)
    /// when malformed.
    fn parse(
        &self,
        pk: &str,
        dn: &str,
        what: &str,
        payload: &[u8],
    ) -> Option<(String, serde_json::Map<String, Value>)> {
        let v: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => {
                self.malformed(pk, dn, what, &format!("not JSON: {e}"));
                return None;
            }
        };
        let Some(params) = v.get("params").and_then(Value::as_object) else {
            self.malformed(pk, dn, what, "params is missing or not an object");
            return None;
        };
        let module = match params.get("module") {
            None | Some(Value::Null) => "default".to_owned(),
            Some(Value::String(m)) if m.is_empty() => "default".to_owned(),
            Some(Value::String(m)) => m.clone(),
            Some(_) => {
                self.malformed(pk, dn, what, "params.module is not text");
                return None;
            }
        };
        if let Err(e) = check_name("module", &module) {
            self.malformed(pk, dn, what, &e);
            return None;
        }
        Some((module, params.clone()))
    }

    fn malformed(&self, pk: &str, dn: &str, what: &str, why: &str) {
        Metrics::inc(&self.metrics.alink_malformed);
        tracing::warn!(product_key = %pk, device_name = %dn, message = what, %why, "malformed OTA message, ignored");
    }
}
