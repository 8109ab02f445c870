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

pub mod download;
pub mod plan;
pub mod reports;
pub mod scheduler;
pub mod sign;
pub mod store;

use crate::apps::{Apps, MessageType, Notices};
use crate::metrics::Metrics;
use crate::registry::now_ms;
use crate::router::{Message, Router};
use crate::storage::{Db, StorageError, TagMap};
use plan::{JobState, Pacer, Policy, Stage};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use store::{CampaignRow, Change, Job, NewJob, Package};
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

    /// Removes uploads a crash interrupted and images whose package row never committed.
    async fn sweep_files(&self) -> Result<(), OtaError> {
        let known: HashSet<String> = self
            .db
            .list_packages(None)
            .await?
            .into_iter()
            .map(|p| format!("{}.bin", p.id))
            .collect();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".upload-") || (name.ends_with(".bin") && !known.contains(&name)) {
                tracing::info!(file = %name, "removing an OTA image no package refers to");
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Stores an uploaded image: `body` yields its pieces; they go to disk as they arrive,
    /// digested on the way, never held whole. Signs it when no signature came with it and a
    /// signing key is configured; checks a signature that came with it against that key.
    pub async fn upload<S, E>(&self, meta: NewPackage, mut body: S) -> Result<Package, OtaError>
    where
        S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let meta = self.check_package(meta).await?;
        let tmp = self.dir.join(format!(
            ".upload-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut digests = sign::Digests::default();
        let max = self.config.max_package_bytes;
        let outcome: Result<(), OtaError> = async {
            while let Some(piece) = body.next().await {
                let piece =
                    piece.map_err(|e| OtaError::Invalid(format!("reading the upload: {e}")))?;
                digests.update(&piece);
                let seen = digests.clone().finish().size;
                if seen > max {
                    return Err(OtaError::TooLarge(format!(
                        "the image is larger than ota.max_package_bytes ({max} bytes)"
                    )));
                }
                file.write_all(&piece).await?;
            }
            file.sync_all().await?;
            Ok(())
        }
        .await;
        drop(file);
        if let Err(e) = outcome {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        let d = digests.finish();
        let done = self.finish_upload(meta, d, &tmp).await;
        if done.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        done
    }

    async fn check_package(&self, mut meta: NewPackage) -> Result<NewPackage, OtaError> {
        if self.db.get_product(&meta.product_key).await?.is_none() {
            return Err(OtaError::NotFound(format!(
                "product `{}` does not exist",
                meta.product_key
            )));
        }
        if meta.module.is_empty() {
            meta.module = "default".into();
        }
        check_name("module", &meta.module).map_err(OtaError::Invalid)?;
        check_version(&meta.version).map_err(OtaError::Invalid)?;
        if meta.src_versions.len() > 100 {
            return Err(OtaError::Invalid(
                "src_versions: at most 100 versions".into(),
            ));
        }
        for v in &meta.src_versions {
            check_version(v).map_err(|e| OtaError::Invalid(format!("src_versions: {e}")))?;
        }
        meta.sign_method = match meta.sign_method.to_ascii_lowercase().as_str() {
            "" | "md5" => "Md5".into(),
            "sha256" => "SHA256".into(),
            _ => {
                return Err(OtaError::Invalid(format!(
                    "sign_method `{}` must be Md5 or SHA256",
                    meta.sign_method
                )))
            }
        };
        if meta.file_name.is_empty() {
            meta.file_name = format!("{}-{}.bin", meta.module, meta.version);
        }
        if meta.file_name.len() > 128
            || meta
                .file_name
                .chars()
                .any(|c| c.is_control() || c == '/' || c == '\\')
        {
            return Err(OtaError::Invalid(
                "file_name must be at most 128 characters, without slashes or control characters"
                    .into(),
            ));
        }
        if meta.description.chars().count() > 1024 {
            return Err(OtaError::Invalid(
                "description must be at most 1024 characters".into(),
            ));
        }
        if let Some(s) = &meta.ed25519 {
            if s.len() != 128 || hex::decode(s).is_err() {
                return Err(OtaError::Invalid(
                    "ed25519 must be 128 hex digits (from `ironlink-cloud ota sign`)".into(),
                ));
            }
        }
        Ok(meta)
    }

    async fn finish_upload(
        &self,
        meta: NewPackage,
        d: sign::Digested,
        tmp: &std::path::Path,
    ) -> Result<Package, OtaError> {
        use ed25519_dalek::Signer;
        if d.size == 0 {
            return Err(OtaError::Invalid("the image is empty".into()));
        }
        let ed25519 = match (&meta.ed25519, &self.signing_key) {
            (Some(given), Some(key)) => {
                if !sign::verify(&key.verifying_key(), &d.sha512, given) {
                    return Err(OtaError::Invalid(
                        "the ed25519 signature does not verify this image with the cloud's signing key (ota.signing_key)".into(),
                    ));
                }
                Some(given.to_ascii_lowercase())
            }
            (Some(given), None) => Some(given.to_ascii_lowercase()),
            (None, Some(key)) => Some(hex::encode(key.sign(&d.sha512).to_bytes())),
            (None, None) => None,
        };
        let p = Package {
            id: format!("pkg-{}", hex::encode(rand::random::<[u8; 6]>())),
            product_key: meta.product_key,
            module: meta.module,
            version: meta.version,
            src_versions: serde_json::to_string(&meta.src_versions).unwrap_or_else(|_| "[]".into()),
            file_name: meta.file_name,
            size: i64::try_from(d.size).unwrap_or(i64::MAX),
            sha256: d.sha256,
            md5: d.md5,
            ed25519,
            sign_method: meta.sign_method,
            description: meta.description,
            created_at: now_ms(),
        };
        let path = self.package_path(&p.id);
        tokio::fs::rename(tmp, &path).await?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        if let Err(e) = self.db.insert_package(&p).await {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e.into());
        }
        Ok(p)
    }

    /// Deletes a package no campaign uses, with its image.
    pub async fn delete_package(&self, id: &str) -> Result<(), OtaError> {
        if !self.db.delete_package(id).await? {
            return Err(OtaError::NotFound(format!("package `{id}` does not exist")));
        }
        let _ = tokio::fs::remove_file(self.package_path(id)).await;
        Ok(())
    }

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
