//! OTA storage: packages, reported module versions, campaigns, jobs and their history. Same
//! SQL on SQLite and PostgreSQL. Every job change is one conditional `UPDATE` (on the state
//! it expects, and for device reports on the attempt) plus its history row, in one
//! transaction: two writers racing on a job (the scheduler timing it out, the device
//! reporting) cannot both move it.

use super::plan::{Counts, JobState};
use crate::storage::{Db, StorageError};
use serde::Serialize;
use sqlx::Row;
use std::collections::HashMap;

/// A firmware package as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Package {
    /// Generated id (`pkg-...`).
    pub id: String,
    /// The product whose devices take it.
    pub product_key: String,
    /// OTA module (`default` for the whole device).
    pub module: String,
    /// The version devices report once upgraded.
    pub version: String,
    /// Versions it may be installed over, as a JSON array (empty: any).
    #[serde(serialize_with = "json_list")]
    #[schema(value_type = Vec<String>)]
    pub src_versions: String,
    /// File name shown to users (the image is stored under the package id).
    pub file_name: String,
    /// Bytes.
    pub size: i64,
    /// SHA-256 of the image, hex.
    pub sha256: String,
    /// MD5 of the image, hex.
    pub md5: String,
    /// ed25519 signature over the image's SHA-512 digest, hex; absent when unsigned.
    pub ed25519: Option<String>,
    /// The digest notices carry as Alibaba's `sign`: `Md5` or `SHA256`.
    pub sign_method: String,
    /// Free text.
    pub description: String,
    /// ms since the Unix epoch.
    pub created_at: i64,
}

fn json_list<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    let list: Vec<String> = serde_json::from_str(v).unwrap_or_default();
    list.serialize(s)
}

impl Package {
    /// The versions it may be installed over (empty: any).
    pub fn sources(&self) -> Vec<String> {
        serde_json::from_str(&self.src_versions).unwrap_or_default()
    }

    /// The digest Alibaba's `sign` carries, by `sign_method`.
    pub fn sign(&self) -> &str {
        if self.sign_method == "SHA256" {
            &self.sha256
        } else {
            &self.md5
        }
    }
}

/// A campaign as stored (target, policy and pacing as JSON text).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CampaignRow {
    /// Generated id (`cmp-...`).
    pub id: String,
    /// Human name.
    pub name: String,
    /// The package it installs.
    pub package_id: String,
    /// The package's product.
    pub product_key: String,
    /// The package's module.
    pub module: String,
    /// The product's tenant (for fair scheduling).
    pub tenant: String,
    /// JSON of [`super::Target`].
    pub target: String,
    /// JSON of [`super::plan::Policy`].
    pub policy: String,
    /// `running`, `paused`, `cancelled`, `aborted` or `finished`.
    pub state: String,
    /// `canary` or `main`.
    pub stage: String,
    /// Why it was aborted or ended.
    pub reason: String,
    /// JSON of [`super::plan::Pacer`].
    pub rate: String,
    /// ms since the Unix epoch.
    pub created_at: i64,
    /// ms since the Unix epoch.
    pub updated_at: i64,
    /// ms since the Unix epoch, once over.
    pub finished_at: Option<i64>,
}

const CAMPAIGN_COLS: &str = "id, name, package_id, product_key, module, tenant, target, policy, state, stage, reason, rate, created_at, updated_at, finished_at";
const PACKAGE_COLS: &str = "id, product_key, module, version, src_versions, file_name, size, sha256, md5, ed25519, sign_method, description, created_at";
const JOB_COLS: &str = "campaign_id, product_key, device_name, module, canary, state, attempt, retries, step, reason, from_version, notified_at, deadline, updated_at";

/// One device's job in one campaign.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Job {
    /// Campaign.
    pub campaign_id: String,
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// OTA module.
    pub module: String,
    /// 1 when part of the canary stage.
    pub canary: i64,
    /// `queued`, `notified`, `downloading`, `verifying`, `flashing`, `succeeded`, `failed`
    /// or `cancelled`.
    pub state: String,
    /// Notices sent so far (each notice is one attempt, numbered from 1).
    pub attempt: i64,
    /// Retries used after timeouts and retryable failures.
    pub retries: i64,
    /// Last progress step (0..100, or -1..-4).
    pub step: Option<i64>,
    /// Why it failed or was cancelled.
    pub reason: String,
    /// The module version the device reported when the job was made.
    pub from_version: Option<String>,
    /// Last notice, ms since the Unix epoch.
    pub notified_at: Option<i64>,
    /// When the current attempt times out, ms since the Unix epoch.
    pub deadline: Option<i64>,
    /// Last change, ms since the Unix epoch.
    pub updated_at: i64,
}

impl Job {
    /// The job's state (an unknown stored name reads as failed).
    pub fn job_state(&self) -> JobState {
        JobState::parse(&self.state).unwrap_or(JobState::Failed)
    }
}

/// One entry of a job's history.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct HistoryRow {
    /// Campaign.
    pub campaign_id: String,
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// Attempt it belongs to.
    pub attempt: i64,
    /// State entered.
    pub state: String,
    /// Progress step, if reported.
    pub step: Option<i64>,
    /// What happened.
    pub detail: String,
    /// ms since the Unix epoch.
    pub at: i64,
}

/// A module version a device reported.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ModuleVersion {
    /// OTA module.
    pub module: String,
    /// Version.
    pub version: String,
    /// ms since the Unix epoch.
    pub reported_at: i64,
}

/// A job to create.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Device name (the campaign's product).
    pub device_name: String,
    /// Part of the canary stage.
    pub canary: bool,
    /// The module version the device reported, if any.
    pub from_version: Option<String>,
}

/// A job change to make.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    /// States the job must be in.
    pub from: &'a [JobState],
    /// The attempt it must be at (device reports), or any.
    pub attempt: Option<i64>,
    /// State it enters.
    pub to: JobState,
    /// Progress step to record.
    pub step: Option<i64>,
    /// Failure or cancellation reason (kept), or what happened (history only).
    pub detail: String,
    /// New deadline (`None` clears it).
    pub deadline: Option<i64>,
    /// Counts one retry.
    pub retry: bool,
}

fn in_list(states: &[JobState], first: usize) -> String {
    (0..states.len())
        .map(|i| format!("${}", first + i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `($1, ..., $cols), ($cols+1, ...), ...` for `rows` rows of a multi-row INSERT.
fn values(rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| {
            let row: Vec<String> = (1..=cols).map(|c| format!("${}", r * cols + c)).collect();
            format!("({})", row.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn history_sql(rows: usize) -> String {
    format!(
        "INSERT INTO ota_history (campaign_id, product_key, device_name, attempt, state, step, detail, at) VALUES {}",
        values(rows, 8)
    )
}

impl Db {
    /// Reads a setting, creating it with `value` when absent (first writer wins).
    pub async fn ota_setting(&self, name: &str, value: &str) -> Result<String, StorageError> {
        sqlx::query(
            "INSERT INTO ota_settings (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT value FROM ota_settings WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }

    /// Stores a package; a second one with the same product, module and version is a
    /// conflict.
    pub async fn insert_package(&self, p: &Package) -> Result<(), StorageError> {
        let sql = format!(
            "INSERT INTO ota_packages ({PACKAGE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        );
        sqlx::query(&sql)
            .bind(&p.id)
            .bind(&p.product_key)
            .bind(&p.module)
            .bind(&p.version)
            .bind(&p.src_versions)
            .bind(&p.file_name)
            .bind(p.size)
            .bind(&p.sha256)
            .bind(&p.md5)
            .bind(&p.ed25519)
            .bind(&p.sign_method)
            .bind(&p.description)
            .bind(p.created_at)
            .execute(&self.pool)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(d) if d.is_unique_violation() => {
                    StorageError::Conflict(format!(
                        "product `{}` already has version `{}` of module `{}`",
                        p.product_key, p.version, p.module
                    ))
                }
                _ => e.into(),
            })?;
        Ok(())
    }

    /// One package.
    pub async fn get_package(&self, id: &str) -> Result<Option<Package>, StorageError> {
        let sql = format!("SELECT {PACKAGE_COLS} FROM ota_packages WHERE id = $1");
        Ok(sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Packages, newest first, of one product or of all.
    pub async fn list_packages(&self, pk: Option<&str>) -> Result<Vec<Package>, StorageError> {
        let rows = match pk {
            Some(pk) => {
                let sql = format!("SELECT {PACKAGE_COLS} FROM ota_packages WHERE product_key = $1 ORDER BY created_at DESC, id");
                sqlx::query_as(&sql).bind(pk).fetch_all(&self.pool).await?
            }
            None => {
                let sql =
                    format!("SELECT {PACKAGE_COLS} FROM ota_packages ORDER BY created_at DESC, id");
                sqlx::query_as(&sql).fetch_all(&self.pool).await?
            }
        };
        Ok(rows)
    }

    /// Deletes a package no campaign uses; false when there was none, a conflict when a
    /// campaign uses it.
    pub async fn delete_package(&self, id: &str) -> Result<bool, StorageError> {
        let mut tx = self.write_tx().await?;
        let used: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM ota_campaigns WHERE package_id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
        if used > 0 {
            return Err(StorageError::Conflict(format!(
                "package `{id}` is used by {used} campaign(s); delete those first"
            )));
        }
        let r = sqlx::query("DELETE FROM ota_packages WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    /// Records the version a device reported for a module.
    pub async fn report_version(
        &self,
        pk: &str,
        dn: &str,
        module: &str,
        version: &str,
        at: i64,
    ) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO ota_modules (product_key, device_name, module, version, reported_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (product_key, device_name, module) DO UPDATE SET version = excluded.version, reported_at = excluded.reported_at",
        )
        .bind(pk)
        .bind(dn)
        .bind(module)
        .bind(version)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The module versions a device reported.
    pub async fn device_versions(
        &self,
        pk: &str,
        dn: &str,
    ) -> Result<Vec<ModuleVersion>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT module, version, reported_at FROM ota_modules WHERE product_key = $1 AND device_name = $2 ORDER BY module",
        )
        .bind(pk)
        .bind(dn)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every device's reported version of a module, by device name.
    pub async fn module_versions(
        &self,
        pk: &str,
        module: &str,
    ) -> Result<HashMap<String, String>, StorageError> {
        let rows = sqlx::query(
            "SELECT device_name, version FROM ota_modules WHERE product_key = $1 AND module = $2",
        )
        .bind(pk)
        .bind(module)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("device_name")?, r.try_get("version")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Creates a campaign and its jobs in one transaction.
    pub async fn insert_campaign(
        &self,
        c: &CampaignRow,
        jobs: &[NewJob],
    ) -> Result<(), StorageError> {
        let mut tx = self.write_tx().await?;
        let sql = format!(
            "INSERT INTO ota_campaigns ({CAMPAIGN_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        );
        sqlx::query(&sql)
            .bind(&c.id)
            .bind(&c.name)
            .bind(&c.package_id)
            .bind(&c.product_key)
            .bind(&c.module)
            .bind(&c.tenant)
            .bind(&c.target)
            .bind(&c.policy)
            .bind(&c.state)
            .bind(&c.stage)
            .bind(&c.reason)
            .bind(&c.rate)
            .bind(c.created_at)
            .bind(c.updated_at)
            .bind(c.finished_at)
            .execute(&mut *tx)
            .await?;
        insert_jobs(&mut tx, c, jobs, c.created_at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Adds jobs to a running campaign (devices that started to match); devices that already
    /// have a job in it are left alone. Returns the jobs added.
    pub async fn add_jobs(
        &self,
        c: &CampaignRow,
        jobs: &[NewJob],
        now: i64,
    ) -> Result<usize, StorageError> {
        let mut tx = self.write_tx().await?;
        let n = insert_jobs(&mut tx, c, jobs, now).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// One campaign.
    pub async fn get_campaign(&self, id: &str) -> Result<Option<CampaignRow>, StorageError> {
        let sql = format!("SELECT {CAMPAIGN_COLS} FROM ota_campaigns WHERE id = $1");
        Ok(sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Campaigns, newest first; only those in `states` when given.
    pub async fn list_campaigns(&self, states: &[&str]) -> Result<Vec<CampaignRow>, StorageError> {
        let sql = if states.is_empty() {
            format!("SELECT {CAMPAIGN_COLS} FROM ota_campaigns ORDER BY created_at DESC, id")
        } else {
            let list = (1..=states.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            format!("SELECT {CAMPAIGN_COLS} FROM ota_campaigns WHERE state IN ({list}) ORDER BY created_at DESC, id")
        };
        let mut q = sqlx::query_as(&sql);
        for s in states {
            q = q.bind(*s);
        }
        Ok(q.fetch_all(&self.pool).await?)
    }

    /// Changes a campaign's state, stage, reason and pacing, if it is in one of `from`
    /// (any when empty). False when it was not.
    #[allow(clippy::too_many_arguments)]
    pub async fn update_campaign(
        &self,
        id: &str,
        from: &[&str],
        state: &str,
        stage: &str,
        reason: &str,
        rate: &str,
        now: i64,
    ) -> Result<bool, StorageError> {
        let finished = matches!(state, "cancelled" | "aborted" | "finished").then_some(now);
        let mut sql = String::from(
            "UPDATE ota_campaigns SET state = $1, stage = $2, reason = $3, rate = $4, updated_at = $5, finished_at = COALESCE(finished_at, $6) WHERE id = $7",
        );
        if !from.is_empty() {
            let list = (0..from.len())
                .map(|i| format!("${}", 8 + i))
                .collect::<Vec<_>>()
                .join(", ");
            sql.push_str(&format!(" AND state IN ({list})"));
        }
        let mut q = sqlx::query(&sql)
            .bind(state)
            .bind(stage)
            .bind(reason)
            .bind(rate)
            .bind(now)
            .bind(finished)
            .bind(id);
        for f in from {
            q = q.bind(*f);
        }
        Ok(q.execute(&self.pool).await?.rows_affected() > 0)
    }

    /// Job counts of a campaign.
    pub async fn job_counts(
        &self,
        id: &str,
    ) -> Result<(Counts, HashMap<String, u64>), StorageError> {
        let rows = sqlx::query(
            "SELECT state, canary, COUNT(*) AS n FROM ota_jobs WHERE campaign_id = $1 GROUP BY state, canary",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let mut c = Counts::default();
        let mut by_state = HashMap::new();
        for r in rows {
            let state: String = r.try_get("state")?;
            let canary: i64 = r.try_get("canary")?;
            let n = u64::try_from(r.try_get::<i64, _>("n")?).unwrap_or(0);
            *by_state.entry(state.clone()).or_insert(0) += n;
            let s = JobState::parse(&state).unwrap_or(JobState::Failed);
            match s {
                JobState::Queued => c.queued += n,
                JobState::Succeeded => c.succeeded += n,
                JobState::Failed => c.failed += n,
                JobState::Cancelled => c.cancelled += n,
                _ => c.active += n,
            }
            if canary != 0 {
                c.canary += n;
                if s == JobState::Queued || s.is_active() {
                    c.canary_open += n;
                }
                if s == JobState::Succeeded {
                    c.canary_succeeded += n;
                }
            }
        }
        Ok((c, by_state))
    }

    /// Failure reasons of a campaign's failed jobs, with their counts.
    pub async fn failure_reasons(&self, id: &str) -> Result<Vec<(String, i64)>, StorageError> {
        let rows = sqlx::query(
            "SELECT reason, COUNT(*) AS n FROM ota_jobs WHERE campaign_id = $1 AND state = 'failed' GROUP BY reason ORDER BY n DESC",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("reason")?, r.try_get("n")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Queued jobs whose devices are online and enabled, canaries only when `canary_only`.
    pub async fn due_jobs(
        &self,
        id: &str,
        canary_only: bool,
        limit: usize,
    ) -> Result<Vec<Job>, StorageError> {
        let cols = JOB_COLS
            .split(", ")
            .map(|c| format!("j.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {cols} FROM ota_jobs j JOIN devices d ON d.product_key = j.product_key AND d.device_name = j.device_name \
             WHERE j.campaign_id = $1 AND j.state = 'queued' AND j.canary >= $2 AND d.status = 'online' AND d.enabled = 1 \
             LIMIT $3"
        );
        Ok(sqlx::query_as(&sql)
            .bind(id)
            .bind(i64::from(canary_only))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?)
    }

    /// Active jobs of a campaign whose deadline passed.
    pub async fn expired_jobs(
        &self,
        id: &str,
        now: i64,
        limit: usize,
    ) -> Result<Vec<Job>, StorageError> {
        let sql = format!(
            "SELECT {JOB_COLS} FROM ota_jobs WHERE campaign_id = $1 AND state IN ('notified', 'downloading', 'verifying', 'flashing') AND deadline < $2 LIMIT $3"
        );
        Ok(sqlx::query_as(&sql)
            .bind(id)
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?)
    }

    /// Marks queued jobs notified (one more attempt, a new deadline) in one transaction,
    /// with their history. Returns the jobs it moved, as they are now: only those are to be
    /// notified (a job another writer moved meanwhile is left out).
    pub async fn notify_jobs(
        &self,
        id: &str,
        devices: &[String],
        now: i64,
        deadline: i64,
        detail: &str,
    ) -> Result<Vec<Job>, StorageError> {
        let mut tx = self.write_tx().await?;
        let mut moved: Vec<Job> = Vec::with_capacity(devices.len());
        for chunk in devices.chunks(128) {
            let list = (0..chunk.len())
                .map(|i| format!("${}", 4 + i))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "UPDATE ota_jobs SET state = 'notified', attempt = attempt + 1, notified_at = $1, deadline = $2, updated_at = $1, step = NULL \
                 WHERE campaign_id = $3 AND state = 'queued' AND device_name IN ({list}) RETURNING {JOB_COLS}"
            );
            let mut q = sqlx::query_as(&sql).bind(now).bind(deadline).bind(id);
            for dn in chunk {
                q = q.bind(dn);
            }
            let jobs: Vec<Job> = q.fetch_all(&mut *tx).await?;
            moved.extend(jobs);
        }
        for chunk in moved.chunks(64) {
            let sql = history_sql(chunk.len());
            let mut q = sqlx::query(&sql);
            for j in chunk {
                q = q
                    .bind(&j.campaign_id)
                    .bind(&j.product_key)
                    .bind(&j.device_name)
                    .bind(j.attempt)
                    .bind("notified")
                    .bind(None::<i64>)
                    .bind(detail)
                    .bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(moved)
    }

    /// Moves one job if it is as `change` expects, with its history row. Returns the job as
    /// it is now, `None` when it was not in an expected state (or attempt).
    pub async fn move_job(
        &self,
        id: &str,
        dn: &str,
        change: &Change<'_>,
        now: i64,
    ) -> Result<Option<Job>, StorageError> {
        let mut tx = self.write_tx().await?;
        let job = move_job_in(&mut tx, id, dn, change, now).await?;
        tx.commit().await?;
        Ok(job)
    }

    /// Device reports in one transaction: each module version recorded, and each report's
    /// open jobs (in running or paused campaigns) handed to `decide`, whose change is made.
    /// Returns, per report, the jobs moved (with the change's detail) and whether the device
    /// had no open job for the module.
    pub async fn apply_reports<F>(
        &self,
        reports: &[super::reports::Report],
        mut decide: F,
    ) -> Result<Vec<(Vec<(Job, String)>, bool)>, StorageError>
    where
        F: FnMut(&super::reports::Report, &OpenJob) -> Option<Change<'static>>,
    {
        let cols = JOB_COLS
            .split(", ")
            .map(|c| format!("j.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let open_sql = format!(
            "SELECT {cols}, p.version AS target, c.policy AS policy FROM ota_jobs j \
             JOIN ota_campaigns c ON c.id = j.campaign_id JOIN ota_packages p ON p.id = c.package_id \
             WHERE j.product_key = $1 AND j.device_name = $2 AND j.module = $3 \
             AND j.state IN ('queued', 'notified', 'downloading', 'verifying', 'flashing') \
             AND c.state IN ('running', 'paused') ORDER BY j.updated_at"
        );
        let mut tx = self.write_tx().await?;
        let mut out = Vec::with_capacity(reports.len());
        for r in reports {
            if let super::reports::Kind::Inform { version } = &r.kind {
                sqlx::query(
                    "INSERT INTO ota_modules (product_key, device_name, module, version, reported_at) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (product_key, device_name, module) DO UPDATE SET version = excluded.version, reported_at = excluded.reported_at",
                )
                .bind(&r.product_key)
                .bind(&r.device_name)
                .bind(&r.module)
                .bind(version)
                .bind(r.at)
                .execute(&mut *tx)
                .await?;
            }
            let open: Vec<OpenJob> = sqlx::query_as(&open_sql)
                .bind(&r.product_key)
                .bind(&r.device_name)
                .bind(&r.module)
                .fetch_all(&mut *tx)
                .await?;
            let mut moved = Vec::new();
            for o in &open {
                if let Some(change) = decide(r, o) {
                    if let Some(j) =
                        move_job_in(&mut tx, &o.job.campaign_id, &r.device_name, &change, r.at)
                            .await?
                    {
                        moved.push((j, change.detail.clone()));
                    }
                }
            }
            out.push((moved, open.is_empty()));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Cancels a campaign's jobs in `states` (with history); returns how many.
    pub async fn cancel_jobs(
        &self,
        id: &str,
        states: &[JobState],
        reason: &str,
        now: i64,
    ) -> Result<u64, StorageError> {
        self.move_all(id, states, JobState::Cancelled, reason, now)
            .await
    }

    /// Moves every job of a campaign in `states` to `to` (with history; the reason is kept
    /// on cancelled and failed jobs); returns how many.
    pub async fn move_all(
        &self,
        id: &str,
        states: &[JobState],
        to: JobState,
        reason: &str,
        now: i64,
    ) -> Result<u64, StorageError> {
        let mut tx = self.write_tx().await?;
        let list = in_list(states, 5);
        let hist = format!(
            "INSERT INTO ota_history (campaign_id, product_key, device_name, attempt, state, step, detail, at) \
             SELECT campaign_id, product_key, device_name, attempt, $1, step, $2, $3 FROM ota_jobs WHERE campaign_id = $4 AND state IN ({list})"
        );
        let mut q = sqlx::query(&hist)
            .bind(to.as_str())
            .bind(reason)
            .bind(now)
            .bind(id);
        for s in states {
            q = q.bind(s.as_str());
        }
        q.execute(&mut *tx).await?;
        let keep = if to == JobState::Failed || to == JobState::Cancelled {
            reason
        } else {
            ""
        };
        let upd = format!(
            "UPDATE ota_jobs SET state = $1, reason = $2, updated_at = $3, deadline = NULL WHERE campaign_id = $4 AND state IN ({list})"
        );
        let mut q = sqlx::query(&upd)
            .bind(to.as_str())
            .bind(keep)
            .bind(now)
            .bind(id);
        for s in states {
            q = q.bind(s.as_str());
        }
        let n = q.execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    /// A device's open jobs (queued or active) for a module, in campaigns that are running
    /// or paused, with their campaign.
    pub async fn open_jobs(
        &self,
        pk: &str,
        dn: &str,
        module: &str,
    ) -> Result<Vec<(Job, CampaignRow)>, StorageError> {
        let sql = format!(
            "SELECT {JOB_COLS} FROM ota_jobs WHERE product_key = $1 AND device_name = $2 AND module = $3 \
             AND state IN ('queued', 'notified', 'downloading', 'verifying', 'flashing') ORDER BY updated_at"
        );
        let jobs: Vec<Job> = sqlx::query_as(&sql)
            .bind(pk)
            .bind(dn)
            .bind(module)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(jobs.len());
        for j in jobs {
            if let Some(c) = self
                .get_campaign(&j.campaign_id)
                .await?
                .filter(|c| c.state == "running" || c.state == "paused")
            {
                out.push((j, c));
            }
        }
        Ok(out)
    }

    /// One job.
    pub async fn get_job(&self, id: &str, dn: &str) -> Result<Option<Job>, StorageError> {
        let sql =
            format!("SELECT {JOB_COLS} FROM ota_jobs WHERE campaign_id = $1 AND device_name = $2");
        Ok(sqlx::query_as(&sql)
            .bind(id)
            .bind(dn)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Devices of a product with an open job for `module` in a running or paused campaign
    /// (they are not targeted by another campaign meanwhile).
    pub async fn busy_devices(
        &self,
        pk: &str,
        module: &str,
    ) -> Result<std::collections::HashSet<String>, StorageError> {
        let rows = sqlx::query(
            "SELECT j.device_name FROM ota_jobs j JOIN ota_campaigns c ON c.id = j.campaign_id \
             WHERE j.product_key = $1 AND j.module = $2 AND c.state IN ('running', 'paused') \
             AND j.state IN ('queued', 'notified', 'downloading', 'verifying', 'flashing')",
        )
        .bind(pk)
        .bind(module)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("device_name"))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// A page of a campaign's jobs, by device name; only one state when given.
    pub async fn list_jobs(
        &self,
        id: &str,
        state: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<Job>, StorageError> {
        let (cond, rest) = match state {
            Some(_) => ("AND state = $2", (3, 4)),
            None => ("", (2, 3)),
        };
        let sql = format!(
            "SELECT {JOB_COLS} FROM ota_jobs WHERE campaign_id = $1 {cond} ORDER BY device_name LIMIT ${} OFFSET ${}",
            rest.0, rest.1
        );
        let mut q = sqlx::query_as(&sql).bind(id);
        if let Some(s) = state {
            q = q.bind(s);
        }
        Ok(q.bind(limit).bind(offset).fetch_all(&self.pool).await?)
    }

    /// A device's jobs in every campaign, newest first.
    pub async fn device_jobs(&self, pk: &str, dn: &str) -> Result<Vec<Job>, StorageError> {
        let sql = format!(
            "SELECT {JOB_COLS} FROM ota_jobs WHERE product_key = $1 AND device_name = $2 ORDER BY updated_at DESC LIMIT 100"
        );
        Ok(sqlx::query_as(&sql)
            .bind(pk)
            .bind(dn)
            .fetch_all(&self.pool)
            .await?)
    }

    /// A device's OTA history, newest first.
    pub async fn device_history(
        &self,
        pk: &str,
        dn: &str,
        limit: i64,
    ) -> Result<Vec<HistoryRow>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT campaign_id, product_key, device_name, attempt, state, step, detail, at FROM ota_history \
             WHERE product_key = $1 AND device_name = $2 ORDER BY at DESC, id DESC LIMIT $3",
        )
        .bind(pk)
        .bind(dn)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// An open job with what deciding on a report needs: the package's version and the
/// campaign's policy (JSON).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OpenJob {
    /// The job.
    #[sqlx(flatten)]
    pub job: Job,
    /// The version the campaign installs.
    pub target: String,
    /// The campaign's policy, JSON.
    pub policy: String,
}

async fn move_job_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    id: &str,
    dn: &str,
    change: &Change<'_>,
    now: i64,
) -> Result<Option<Job>, StorageError> {
    let keep_reason = change.to == JobState::Failed || change.to == JobState::Cancelled;
    let mut sql = format!(
        "UPDATE ota_jobs SET state = $1, step = COALESCE($2, step), reason = $3, deadline = $4, updated_at = $5, retries = retries + $6 \
         WHERE campaign_id = $7 AND device_name = $8 AND state IN ({})",
        in_list(change.from, 9)
    );
    let next = 9 + change.from.len();
    if change.attempt.is_some() {
        sql.push_str(&format!(" AND attempt = ${next}"));
    }
    sql.push_str(&format!(" RETURNING {JOB_COLS}"));
    let mut q = sqlx::query_as(&sql)
        .bind(change.to.as_str())
        .bind(change.step)
        .bind(if keep_reason {
            change.detail.as_str()
        } else {
            ""
        })
        .bind(change.deadline)
        .bind(now)
        .bind(i64::from(change.retry))
        .bind(id)
        .bind(dn);
    for s in change.from {
        q = q.bind(s.as_str());
    }
    if let Some(a) = change.attempt {
        q = q.bind(a);
    }
    let job: Option<Job> = q.fetch_optional(&mut **tx).await?;
    if let Some(j) = &job {
        sqlx::query(&history_sql(1))
            .bind(&j.campaign_id)
            .bind(&j.product_key)
            .bind(&j.device_name)
            .bind(j.attempt)
            .bind(change.to.as_str())
            .bind(change.step)
            .bind(&change.detail)
            .bind(now)
            .execute(&mut **tx)
            .await?;
    }
    Ok(job)
}

async fn insert_jobs(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    c: &CampaignRow,
    jobs: &[NewJob],
    now: i64,
) -> Result<usize, StorageError> {
    let mut added = 0;
    for chunk in jobs.chunks(100) {
        let mut sql = format!(
            "INSERT INTO ota_jobs (campaign_id, product_key, device_name, module, canary, state, from_version, updated_at) VALUES {}",
            values(chunk.len(), 8)
        );
        sql.push_str(" ON CONFLICT DO NOTHING");
        let mut q = sqlx::query(&sql);
        for j in chunk {
            q = q
                .bind(&c.id)
                .bind(&c.product_key)
                .bind(&j.device_name)
                .bind(&c.module)
                .bind(i64::from(j.canary))
                .bind("queued")
                .bind(&j.from_version)
                .bind(now);
        }
        added += q.execute(&mut **tx).await?.rows_affected() as usize;
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    #[test]
    fn multi_row_values_number_their_parameters_in_order() {
        assert_eq!(super::values(2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(super::values(1, 1), "($1)");
    }
}
