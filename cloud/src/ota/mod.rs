//! Over-the-air updates, cloud side: firmware packages (streamed to disk, digested and
//! signed as they arrive), campaigns that target devices and notify them at a paced rate
//! with canaries and abort thresholds, the Alink OTA topics devices speak (inform, upgrade
//! push, `thing/ota/firmware/get`, progress), and resumable downloads whose URLs carry a
//! per-device token that expires.
//!
//! Signatures are in the scheme the firmware SDK verifies (`ironlink_firmware::ota`): an
//! ed25519 signature over the image's SHA-512 digest (what embassy-boot checks), next to the
//! SHA-256 or MD5 that Alibaba's notices carry in `sign`/`signMethod`.
//!
//! What survives a kill -9: every package row points at a file that was synced before the
//! row was committed; every job change is committed before the notice it leads to is
//! published, so a restarted scheduler neither repeats an attempt nor forgets a job (an
//! attempt whose notice was lost times out, or is renewed when the device reconnects).

mod campaign;
mod device;
pub mod download;
mod package;
pub mod plan;
pub mod reports;
pub mod scheduler;
pub mod sign;
pub mod store;

use crate::apps::{Apps, MessageType, Notices};
use crate::metrics::Metrics;
use crate::router::{Message, Router};
use crate::storage::{Db, StorageError, TagMap};
use plan::{JobState, Pacer, Policy, Stage};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use store::{CampaignRow, Job, Package};
use tokio::sync::Notify;

/// OTA errors, as the API shows them.
#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    /// A value was refused.
    #[error("{0}")]
    Invalid(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It exists already, or is in use.
    #[error("{0}")]
    Conflict(String),
    /// The image is larger than `ota.max_package_bytes`.
    #[error("{0}")]
    TooLarge(String),
    /// The database failed.
    #[error(transparent)]
    Storage(StorageError),
    /// The package directory failed.
    #[error("package storage: {0}")]
    Io(#[from] std::io::Error),
}

impl From<StorageError> for OtaError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Conflict(m) => Self::Conflict(m),
            e => Self::Storage(e),
        }
    }
}

/// Which devices a campaign takes (all conditions must hold). Kept as data so that new kinds
/// of target (queries, dynamic groups) add fields or a [`Selector`], not a new scheduler.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Target {
    /// Only these devices (names within the package's product); empty for every device.
    pub devices: Vec<String>,
    /// Only devices that reported one of these versions of the package's module; empty for
    /// any (devices that never reported a version included).
    pub src_versions: Vec<String>,
    /// Only devices carrying all these tags.
    pub tags: BTreeMap<String, String>,
    /// Gray release: only this share of the devices (0 < percent <= 100), picked by a hash
    /// of the campaign id and the device, so the same devices every time.
    pub percent: Option<f64>,
}

/// A device as targeting sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Device name.
    pub device_name: &'a str,
    /// Its tags.
    pub tags: &'a TagMap,
    /// The version it reported of the campaign's module.
    pub version: Option<&'a str>,
}

/// Decides whether a device belongs to a campaign.
pub trait Selector {
    /// True when the campaign `campaign` of product `pk` takes the device.
    fn selects(&self, campaign: &str, pk: &str, d: &Candidate<'_>) -> bool;
}

impl Selector for Target {
    fn selects(&self, campaign: &str, pk: &str, d: &Candidate<'_>) -> bool {
        (self.devices.is_empty() || self.devices.iter().any(|n| n == d.device_name))
            && (self.src_versions.is_empty()
                || d.version
                    .is_some_and(|v| self.src_versions.iter().any(|s| s == v)))
            && self
                .tags
                .iter()
                .all(|(k, v)| d.tags.get(k).and_then(Value::as_str) == Some(v.as_str()))
            && self
                .percent
                .is_none_or(|p| plan::hash_share(campaign, pk, d.device_name) * 100.0 < p)
    }
}

impl Target {
    fn check(&self) -> Result<(), String> {
        if let Some(p) = self.percent.filter(|p| !(*p > 0.0 && *p <= 100.0)) {
            return Err(format!(
                "target.percent {p} must be above 0 and at most 100"
            ));
        }
        if self.devices.len() > 100_000 {
            return Err("target.devices names at most 100000 devices".into());
        }
        for v in &self.src_versions {
            check_version(v).map_err(|e| format!("target.src_versions: {e}"))?;
        }
        Ok(())
    }
}

/// A version or module name: 1..=64 of letters, digits and `._-+`.
fn check_name(what: &str, v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 64 {
        return Err(format!("{what} `{v}` must be 1 to 64 characters"));
    }
    if !v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
    {
        return Err(format!(
            "{what} `{}` may hold only letters, digits and . _ - +",
            v.escape_debug()
        ));
    }
    Ok(())
}

fn check_version(v: &str) -> Result<(), String> {
    check_name("version", v)
}

/// A package being uploaded.
#[derive(Debug, Clone, Default)]
pub struct NewPackage {
    /// Product.
    pub product_key: String,
    /// OTA module (`default` when empty).
    pub module: String,
    /// Version.
    pub version: String,
    /// Versions it may be installed over.
    pub src_versions: Vec<String>,
    /// File name to show.
    pub file_name: String,
    /// `Md5` or `SHA256`.
    pub sign_method: String,
    /// An ed25519 signature made by the operator (`ota sign`), hex.
    pub ed25519: Option<String>,
    /// Free text.
    pub description: String,
}

/// A campaign to create.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCampaign {
    /// Human name (1..=128 characters).
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub name: String,
    /// The package to install.
    pub package_id: String,
    /// Which devices (every device of the package's product when absent).
    #[serde(default)]
    pub target: Target,
    /// How it runs.
    #[serde(default)]
    pub policy: Policy,
}

/// What creating a campaign did.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Created {
    /// The campaign id.
    pub id: String,
    /// Jobs made.
    pub jobs: usize,
    /// Of which canaries.
    pub canaries: usize,
    /// Devices left out: already at the package's version.
    pub already_current: usize,
    /// Devices left out: on a version the package may not be installed over.
    pub wrong_source: usize,
    /// Devices left out: upgrading the same module in another campaign.
    pub busy: usize,
}

/// A running campaign as the scheduler and the device handlers use it.
#[derive(Debug, Clone)]
pub struct Live {
    /// The stored row.
    pub row: CampaignRow,
    /// Parsed target.
    pub target: Target,
    /// Parsed policy.
    pub policy: Policy,
    /// The package.
    pub package: Package,
}

impl Live {
    fn from_row(row: CampaignRow, package: Package) -> Self {
        Self {
            target: serde_json::from_str(&row.target).unwrap_or_default(),
            policy: serde_json::from_str(&row.policy).unwrap_or_default(),
            row,
            package,
        }
    }

    /// When a campaign with a run time ends, ms.
    pub fn ends_at(&self) -> Option<i64> {
        self.policy
            .run_for
            .map(|d| self.row.created_at + d.as_millis() as i64)
    }

    fn stage(&self) -> Stage {
        Stage::parse(&self.row.stage)
    }
}

/// OTA settings (`[ota]` in the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtaConfig {
    /// Base of the download URLs in notices, e.g. `https://ota.example.com` (the path
    /// `/ota/download/...` is added); default: `http://` and the HTTP API's address.
    pub download_url: Option<String>,
    /// Key file (from `ironlink-cloud ota keygen`) the cloud signs uploaded images with when
    /// the upload carries no signature; without it such images go out unsigned.
    pub signing_key: Option<PathBuf>,
    /// Largest image accepted, bytes.
    pub max_package_bytes: u64,
    /// Notices per second the server sends at most, over every campaign (shared fairly
    /// between tenants).
    pub max_notices_per_second: u32,
    /// How often the scheduler looks at campaigns.
    #[serde(with = "humantime_serde")]
    pub tick: std::time::Duration,
}

impl Default for OtaConfig {
    fn default() -> Self {
        Self {
            download_url: None,
            signing_key: None,
            max_package_bytes: 1 << 30,
            max_notices_per_second: 5_000,
            tick: std::time::Duration::from_millis(200),
        }
    }
}

/// The OTA service, shared by the device handlers, the API and the scheduler.
#[derive(Debug)]
pub struct Ota {
    db: Db,
    router: Arc<Router>,
    apps: Arc<Apps>,
    metrics: Arc<Metrics>,
    config: OtaConfig,
    dir: PathBuf,
    token_key: [u8; 32],
    signing_key: Option<ed25519_dalek::SigningKey>,
    download_base: OnceLock<String>,
    limiters: Mutex<HashMap<String, Arc<download::Limiter>>>,
    live: RwLock<HashMap<String, Arc<Live>>>,
    pacers: Mutex<HashMap<String, Pacer>>,
    wake: Notify,
    reports: reports::Reports,
}

impl Ota {
    /// Opens the package directory (`{data_dir}/ota`), reads or creates the download token
    /// key, and loads the configured signing key.
    pub async fn open(
        db: Db,
        router: Arc<Router>,
        apps: Arc<Apps>,
        metrics: Arc<Metrics>,
        config: OtaConfig,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        let dir = data_dir.join("ota");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the package directory {}", dir.display()))?;
        let fresh = hex::encode(rand::random::<[u8; 32]>());
        let stored = db.ota_setting("download_token_key", &fresh).await?;
        let mut token_key = [0u8; 32];
        hex::decode_to_slice(stored.trim(), &mut token_key)
            .context("ota_settings.download_token_key is not 64 hex digits")?;
        let signing_key = match &config.signing_key {
            Some(p) => Some(sign::read_key(p)?),
            None => None,
        };
        let reports = reports::Reports::start(db.clone());
        let ota = Arc::new(Self {
            db,
            router,
            apps,
            metrics,
            config,
            dir,
            token_key,
            signing_key,
            download_base: OnceLock::new(),
            limiters: Mutex::default(),
            live: RwLock::default(),
            pacers: Mutex::default(),
            wake: Notify::new(),
            reports,
        });
        ota.sweep_files().await?;
        Ok(ota)
    }

    /// Sets the download base from the HTTP listener's address unless the config names one.
    pub fn set_http_address(&self, addr: std::net::SocketAddr) {
        let base = match &self.config.download_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let ip = if addr.ip().is_unspecified() {
                    outward_ip().unwrap_or(addr.ip())
                } else {
                    addr.ip()
                };
                format!("http://{}", std::net::SocketAddr::new(ip, addr.port()))
            }
        };
        tracing::info!(download_url = %base, "OTA downloads are offered at this base URL (set ota.download_url to change it)");
        let _ = self.download_base.set(base);
    }

    fn base(&self) -> &str {
        self.download_base
            .get()
            .map_or("http://127.0.0.1", String::as_str)
    }

    fn package_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.bin"))
    }

    fn has_live(&self, pk: &str) -> bool {
        self.live
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|l| l.row.product_key == pk)
    }

    /// The notice for a job's current attempt: Alibaba's upgrade message, with the
    /// signature the firmware SDK checks in `data.ed25519` and a download URL carrying a
    /// token for this device and campaign that expires after the policy's `token_ttl`.
    fn notice_body(&self, live: &Live, job: &Job, now: i64) -> String {
        let p = &live.package;
        let exp = now + live.policy.token_ttl.as_millis() as i64;
        let token = download::mint(&self.token_key, &live.row.id, &job.device_name, exp);
        let mut data = json!({
            "size": p.size,
            "version": p.version,
            "isDiff": 0,
            "url": format!("{}/ota/download/{token}", self.base()),
            "md5": p.md5,
            "sign": p.sign(),
            "signMethod": p.sign_method,
            "module": p.module,
            "extData": {"campaign": live.row.id, "attempt": job.attempt},
        });
        if let (Some(sig), Some(o)) = (&p.ed25519, data.as_object_mut()) {
            o.insert("ed25519".into(), json!(sig));
        }
        json!({"code": "1000", "data": data, "id": now, "message": "success"}).to_string()
    }

    fn push(&self, live: &Live, job: &Job, now: i64) {
        let body = self.notice_body(live, job, now);
        self.router.publish(Message {
            topic: format!(
                "/ota/device/upgrade/{}/{}",
                job.product_key, job.device_name
            ),
            payload: body.into(),
            qos: 1,
            retain: false,
        });
        Metrics::inc(&self.metrics.ota_notices);
    }

    /// Tells consumer groups, rules and MQTT subscribers about a job's change, as Alibaba's
    /// `ota` message (`/{pk}/{dn}/ota/upgrade`).
    async fn announce(&self, live: Option<&Live>, job: &Job, desc: &str, now: i64) {
        let state = job.job_state();
        let body = upgrade_message(live, job, desc, now);
        let mut n = Notices::new(&self.apps, &self.router);
        n.push(
            &job.product_key,
            MessageType::Ota,
            format!("/{}/{}/ota/upgrade", job.product_key, job.device_name),
            body.to_string(),
            now,
        );
        if !n.commit().await {
            tracing::warn!(campaign = %job.campaign_id, device = %job.device_name, "OTA message for consumer groups could not be queued");
        }
        if state == JobState::Succeeded {
            Metrics::inc(&self.metrics.ota_succeeded);
        } else if state == JobState::Failed {
            Metrics::inc(&self.metrics.ota_failed);
        }
    }

    /// [`Ota::announce`] for many jobs of one campaign, in one batch.
    async fn announce_many(&self, live: &Live, jobs: &[Job], desc: &str, now: i64) {
        if jobs.is_empty() {
            return;
        }
        let mut n = Notices::new(&self.apps, &self.router);
        for job in jobs {
            n.push(
                &job.product_key,
                MessageType::Ota,
                format!("/{}/{}/ota/upgrade", job.product_key, job.device_name),
                upgrade_message(Some(live), job, desc, now).to_string(),
                now,
            );
        }
        if !n.commit().await {
            tracing::warn!(campaign = %live.row.id, jobs = jobs.len(), "OTA messages for consumer groups could not be queued");
        }
    }

    async fn live_of(&self, campaign: &str) -> Result<Option<Arc<Live>>, StorageError> {
        if let Some(l) = self
            .live
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(campaign)
        {
            return Ok(Some(l.clone()));
        }
        let Some(row) = self.db.get_campaign(campaign).await? else {
            return Ok(None);
        };
        let Some(pkg) = self.db.get_package(&row.package_id).await? else {
            return Ok(None);
        };
        Ok(Some(Arc::new(Live::from_row(row, pkg))))
    }
}

/// Alibaba's `ota` message about a job (`/{pk}/{dn}/ota/upgrade`), with Ironlink's finer
/// `state` beside Alibaba's `status`.
fn upgrade_message(live: Option<&Live>, job: &Job, desc: &str, now: i64) -> Value {
    let state = job.job_state();
    json!({
        "iotId": format!("{}.{}", job.product_key, job.device_name),
        "productKey": job.product_key,
        "deviceName": job.device_name,
        "moduleName": job.module,
        "srcVersion": job.from_version,
        "destVersion": live.map(|l| l.package.version.as_str()),
        "status": state.alibaba(),
        "state": state.as_str(),
        "step": job.step,
        "desc": desc,
        "jobId": job.campaign_id,
        "taskId": format!("{}/{}/{}", job.campaign_id, job.device_name, job.attempt),
        "messageCreateTime": now,
    })
}

/// The address this host uses towards other hosts (no packet is sent: a UDP socket is only
/// connected, which picks the route).
fn outward_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_select_by_list_version_tags_and_share() {
        let mut tags = TagMap::new();
        tags.insert("site".into(), json!("north"));
        let d = |name, version| Candidate {
            device_name: name,
            tags: &tags,
            version,
        };
        let all = Target::default();
        assert!(all.selects("c", "pk", &d("a", None)));
        let t = Target {
            devices: vec!["a".into()],
            ..Target::default()
        };
        assert!(t.selects("c", "pk", &d("a", None)));
        assert!(!t.selects("c", "pk", &d("b", None)));
        let t = Target {
            src_versions: vec!["1.0".into()],
            tags: BTreeMap::from([("site".into(), "north".into())]),
            ..Target::default()
        };
        assert!(t.selects("c", "pk", &d("a", Some("1.0"))));
        assert!(!t.selects("c", "pk", &d("a", Some("1.1"))));
        assert!(!t.selects("c", "pk", &d("a", None)), "no version reported");
        let empty = TagMap::new();
        let untagged = Candidate {
            device_name: "a",
            tags: &empty,
            version: Some("1.0"),
        };
        assert!(!t.selects("c", "pk", &untagged));
        let half = Target {
            percent: Some(50.0),
            ..Target::default()
        };
        let n = (0..2000)
            .filter(|i| {
                let name = format!("d{i}");
                let c = Candidate {
                    device_name: &name,
                    tags: &tags,
                    version: None,
                };
                half.selects("c", "pk", &c)
            })
            .count();
        assert!((900..1100).contains(&n), "{n}");
        assert!(Target {
            percent: Some(0.0),
            ..Target::default()
        }
        .check()
        .is_err());
    }

    #[test]
    fn names_and_versions_are_checked() {
        assert!(check_version("1.2.3-rc.1+b7").is_ok());
        assert!(check_version("").is_err());
        assert!(check_version("1 2").is_err());
        assert!(check_version(&"9".repeat(65)).is_err());
        assert!(check_name("module", "MCU_2").is_ok());
        assert!(check_name("module", "a/b").is_err());
    }
}
