//! Campaigns: creation (the target resolved into jobs, canaries picked), pause, resume and
//! cancel.

use super::plan::{self, JobState, Pacer, Stage};
use super::store::{CampaignRow, NewJob};
use super::{Candidate, Created, NewCampaign, Ota, OtaError, Selector};
use crate::registry::now_ms;
use crate::storage::{StorageError, TagMap};
use std::collections::HashSet;

impl Ota {
    /// Creates a campaign: resolves its target now (devices that start to match later are
    /// added while it runs) and wakes the scheduler.
    pub async fn create_campaign(&self, req: NewCampaign) -> Result<Created, OtaError> {
        let name = req.name.trim();
        if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
            return Err(OtaError::Invalid(
                "name must be 1 to 128 characters, without control characters".into(),
            ));
        }
        req.policy.check().map_err(OtaError::Invalid)?;
        req.target.check().map_err(OtaError::Invalid)?;
        let package = self.db.get_package(&req.package_id).await?.ok_or_else(|| {
            OtaError::NotFound(format!("package `{}` does not exist", req.package_id))
        })?;
        let product = self
            .db
            .get_product(&package.product_key)
            .await?
            .ok_or_else(|| {
                OtaError::NotFound(format!("product `{}` does not exist", package.product_key))
            })?;
        let now = now_ms();
        let id = format!("cmp-{}", hex::encode(rand::random::<[u8; 6]>()));
        let devices = self.all_devices(&package.product_key).await?;
        let names: HashSet<&str> = devices.iter().map(|(n, _)| n.as_str()).collect();
        let missing: Vec<&str> = req
            .target
            .devices
            .iter()
            .chain(req.policy.canary.iter().flat_map(|c| c.devices.iter()))
            .map(String::as_str)
            .filter(|d| !names.contains(d))
            .take(5)
            .collect();
        if !missing.is_empty() {
            return Err(OtaError::Invalid(format!(
                "devices not in product `{}`: {}",
                package.product_key,
                missing.join(", ")
            )));
        }
        let versions = self
            .db
            .module_versions(&package.product_key, &package.module)
            .await?;
        let busy = self
            .db
            .busy_devices(&package.product_key, &package.module)
            .await?;
        let mut out = Created {
            id: id.clone(),
            ..Created::default()
        };
        let sources = package.sources();
        let mut jobs = Vec::new();
        for (dn, tags) in &devices {
            let version = versions.get(dn).map(String::as_str);
            let c = Candidate {
                device_name: dn,
                tags,
                version,
            };
            if !req.target.selects(&id, &package.product_key, &c) {
                continue;
            }
            if version == Some(package.version.as_str()) {
                out.already_current += 1;
                continue;
            }
            if !sources.is_empty() && !version.is_some_and(|v| sources.iter().any(|s| s == v)) {
                out.wrong_source += 1;
                continue;
            }
            if busy.contains(dn) {
                out.busy += 1;
                continue;
            }
            jobs.push(NewJob {
                device_name: dn.clone(),
                canary: false,
                from_version: version.map(str::to_owned),
            });
        }
        if let Some(canary) = &req.policy.canary {
            let explicit: HashSet<&str> = canary.devices.iter().map(String::as_str).collect();
            for j in jobs.iter_mut() {
                j.canary = explicit.contains(j.device_name.as_str());
            }
            let mut rest: Vec<(f64, usize)> = jobs
                .iter()
                .enumerate()
                .filter(|(_, j)| !j.canary)
                .map(|(i, j)| {
                    (
                        plan::hash_share(&id, &package.product_key, &j.device_name),
                        i,
                    )
                })
                .collect();
            rest.sort_by(|a, b| a.0.total_cmp(&b.0));
            for (_, i) in rest.into_iter().take(canary.count as usize) {
                jobs[i].canary = true;
            }
        }
        out.jobs = jobs.len();
        out.canaries = jobs.iter().filter(|j| j.canary).count();
        if jobs.is_empty() && req.policy.run_for.is_none() {
            return Err(OtaError::Invalid(format!(
                "no device of product `{}` is to be upgraded ({} already on {}, {} on a version the package does not take, {} busy in another campaign, the rest outside the target); set policy.run_for to keep the campaign waiting for devices that come later",
                package.product_key, out.already_current, package.version, out.wrong_source, out.busy
            )));
        }
        let stage = if out.canaries > 0 {
            Stage::Canary
        } else {
            Stage::Main
        };
        let row = CampaignRow {
            id: id.clone(),
            name: name.to_owned(),
            package_id: package.id.clone(),
            product_key: package.product_key.clone(),
            module: package.module.clone(),
            tenant: product.tenant,
            target: serde_json::to_string(&req.target).unwrap_or_default(),
            policy: serde_json::to_string(&req.policy).unwrap_or_default(),
            state: "running".into(),
            stage: stage.as_str().into(),
            reason: String::new(),
            rate: serde_json::to_string(&Pacer::new(&req.policy, now)).unwrap_or_default(),
            created_at: now,
            updated_at: now,
            finished_at: None,
        };
        self.db.insert_campaign(&row, &jobs).await?;
        tracing::info!(campaign = %id, package = %package.id, jobs = out.jobs, canaries = out.canaries, "OTA campaign created");
        self.wake.notify_one();
        Ok(out)
    }

    /// Every device of a product with its tags.
    async fn all_devices(&self, pk: &str) -> Result<Vec<(String, TagMap)>, StorageError> {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let (page, total) = self
                .db
                .list_devices(pk, &crate::storage::DeviceFilter::default(), offset, 1000)
                .await?;
            let n = page.len() as i64;
            out.extend(page.into_iter().map(|d| {
                let tags = serde_json::from_str(&d.tags).unwrap_or_default();
                (d.device_name, tags)
            }));
            offset += n;
            if n == 0 || offset >= total {
                return Ok(out);
            }
        }
    }

    /// Pauses, resumes or cancels a campaign.
    pub async fn control(&self, id: &str, action: &str) -> Result<(), OtaError> {
        let c = self
            .db
            .get_campaign(id)
            .await?
            .ok_or_else(|| OtaError::NotFound(format!("campaign `{id}` does not exist")))?;
        let now = now_ms();
        let (from, to): (&[&str], &str) = match action {
            "pause" => (&["running"], "paused"),
            "resume" => (&["paused"], "running"),
            "cancel" => (&["running", "paused"], "cancelled"),
            _ => return Err(OtaError::Invalid(format!("unknown action `{action}`"))),
        };
        let reason = if to == "cancelled" {
            "cancelled through the API"
        } else {
            ""
        };
        if !self
            .db
            .update_campaign(id, from, to, &c.stage, reason, &c.rate, now)
            .await?
        {
            return Err(OtaError::Conflict(format!(
                "campaign `{id}` is {}: it cannot {action}",
                c.state
            )));
        }
        if to == "cancelled" {
            let n = self
                .db
                .cancel_jobs(
                    id,
                    &[
                        JobState::Queued,
                        JobState::Notified,
                        JobState::Downloading,
                        JobState::Verifying,
                        JobState::Flashing,
                    ],
                    "campaign cancelled",
                    now,
                )
                .await?;
            tracing::info!(campaign = %id, jobs = n, "OTA campaign cancelled");
        }
        self.wake.notify_one();
        Ok(())
    }
}
