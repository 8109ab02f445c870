//! The gateway upgrades itself: a notice on `/ota/device/upgrade/{gpk}/{gdn}` (module
//! `default`, or `ota.module`) names a new `ironlink-edge` binary. It is downloaded (resuming
//! an interrupted download with a Range request), its digest and its ed25519 signature (over
//! the image's SHA-512, with `ota.public_key`) are checked, it must answer `--version`, and
//! then it replaces the running binary atomically (the old one is kept as `{exe}.previous`).
//! A marker (`{exe}.upgrade.json`) tells the supervisor (`ironlink-edge run --supervise`) that
//! the next start is a trial: the new binary must connect to the cloud within
//! `ota.confirm_within`, else the supervisor puts the previous binary back and starts it, and
//! that one reports the rollback (-4). The queue and the data directory are never touched.
//!
//! What survives a kill -9 at any point: the binary path always holds a whole executable (a
//! hard link keeps the old one, a rename puts the new one in place); a marker without a swap
//! is ignored; a partial download resumes.

use crate::uplink::State;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// `[ota]`: self-upgrade.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtaConfig {
    /// The operator's ed25519 public key (hex, from `ironlink-cloud ota keygen`); without it
    /// every self-upgrade is refused.
    pub public_key: Option<String>,
    /// OTA module of the gateway's own binary.
    pub module: String,
    /// How long a new binary has to connect to the cloud before it is rolled back.
    #[serde(with = "humantime_serde")]
    pub confirm_within: Duration,
    /// Largest binary accepted, bytes.
    pub max_bytes: u64,
}

impl Default for OtaConfig {
    fn default() -> Self {
        Self {
            public_key: None,
            module: "default".into(),
            confirm_within: Duration::from_secs(120),
            max_bytes: 512 << 20,
        }
    }
}

impl OtaConfig {
    /// The public key, checked.
    pub fn key(&self) -> Result<Option<ed25519_dalek::VerifyingKey>, String> {
        let Some(hex_key) = &self.public_key else {
            return Ok(None);
        };
        let mut b = [0u8; 32];
        hex::decode_to_slice(hex_key.trim(), &mut b)
            .map_err(|_| "ota.public_key: must be 64 hex digits".to_owned())?;
        ed25519_dalek::VerifyingKey::from_bytes(&b)
            .map(Some)
            .map_err(|_| "ota.public_key: not an ed25519 public key".into())
    }
}

/// The version this gateway reports: `IRONLINK_EDGE_VERSION` (packagers name their releases)
/// or the build's.
pub fn version() -> String {
    std::env::var("IRONLINK_EDGE_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

/// The exit code with which a worker asks its supervisor to start the (new) binary.
pub const RESTART_FOR_UPGRADE: i32 = 75;

/// What the marker next to the binary says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// Version being replaced.
    pub from: String,
    /// Version being tried.
    pub to: String,
    /// The campaign's notice id, for the reports.
    pub notice: String,
    /// Seconds the new binary has to connect.
    pub confirm_secs: u64,
    /// Set by the supervisor once it started the new binary.
    #[serde(default)]
    pub started: bool,
}

/// Set by the supervisor after a rollback, reported (-4) by the restored binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    /// The version that failed.
    pub to: String,
    /// Why.
    pub why: String,
}

/// `{exe}.upgrade.json`.
pub fn marker_path(exe: &Path) -> PathBuf {
    sibling(exe, ".upgrade.json")
}

/// `{exe}.rolled-back.json`.
pub fn rollback_path(exe: &Path) -> PathBuf {
    sibling(exe, ".rolled-back.json")
}

/// `{exe}.previous`.
pub fn previous_path(exe: &Path) -> PathBuf {
    sibling(exe, ".previous")
}

fn sibling(exe: &Path, suffix: &str) -> PathBuf {
    let mut s = exe.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes `value` as JSON to `path` atomically (temp file, fsync, rename).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = sibling(path, ".tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(value).map_err(std::io::Error::other)?,
    )?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads a JSON file; `None` when absent or unreadable.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// An upgrade notice for the gateway itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Version offered.
    pub version: String,
    /// Image size, bytes.
    pub size: u64,
    /// Download URL.
    pub url: String,
    /// `Md5` or `SHA256`.
    pub sign_method: String,
    /// Hex digest by `sign_method`.
    pub sign: String,
    /// ed25519 signature over the SHA-512, hex.
    pub ed25519: Option<String>,
    /// OTA module.
    pub module: String,
    /// The notice's id.
    pub id: String,
}

/// Reads a notice (Alibaba's form, `data.{version,size,url,sign,signMethod,module,ed25519}`).
pub fn parse_notice(payload: &[u8]) -> Result<Notice, String> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    let d = &v["data"];
    let text = |k: &str| d[k].as_str().map(str::to_owned);
    let size = match &d["size"] {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .ok_or("data.size is missing")?;
    let sign_method = text("signMethod").unwrap_or_else(|| "Md5".into());
    if !sign_method.eq_ignore_ascii_case("md5") && !sign_method.eq_ignore_ascii_case("sha256") {
        return Err(format!(
            "signMethod `{sign_method}` is neither Md5 nor SHA256"
        ));
    }
    Ok(Notice {
        version: text("version").ok_or("data.version is missing")?,
        size,
        url: text("url").ok_or("data.url is missing")?,
        sign_method,
        sign: text("sign")
            .ok_or("data.sign is missing")?
            .to_ascii_lowercase(),
        ed25519: text("ed25519"),
        module: text("module").unwrap_or_else(|| "default".into()),
        id: match &v["id"] {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => String::new(),
        },
    })
}

/// Why an upgrade stopped, as Alibaba's progress codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// -1: refused or failed otherwise.
    Other(String),
    /// -2: the download failed.
    Download(String),
    /// -3: digest or signature wrong.
    Verify(String),
    /// -4: the binary could not be installed or does not start.
    Install(String),
}

impl Failure {
    /// Step and description of the progress report.
    pub fn report(&self) -> (i64, &str) {
        match self {
            Failure::Other(w) => (-1, w),
            Failure::Download(w) => (-2, w),
            Failure::Verify(w) => (-3, w),
            Failure::Install(w) => (-4, w),
        }
    }
}

/// Checks a downloaded image: its size and digest by the notice's method, and, given a key,
/// the ed25519 signature over its SHA-512 (a notice without one is then refused).
pub fn verify_image(
    path: &Path,
    n: &Notice,
    key: Option<&ed25519_dalek::VerifyingKey>,
) -> Result<(), Failure> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Failure::Download(e.to_string()))?;
    let (mut md5, mut s256, mut s512) = (md5::Md5::new(), sha2::Sha256::new(), sha2::Sha512::new());
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .map_err(|e| Failure::Download(e.to_string()))?;
        if k == 0 {
            break;
        }
        md5.update(&buf[..k]);
        s256.update(&buf[..k]);
        s512.update(&buf[..k]);
        size += k as u64;
    }
    if size != n.size {
        return Err(Failure::Verify(format!(
            "{size} bytes, the notice says {}",
            n.size
        )));
    }
    let digest = if n.sign_method.eq_ignore_ascii_case("sha256") {
        hex::encode(s256.finalize())
    } else {
        hex::encode(md5.finalize())
    };
    if digest != n.sign {
        return Err(Failure::Verify(format!(
            "{} {digest} is not the notice's {}",
            n.sign_method, n.sign
        )));
    }
    let Some(key) = key else {
        return Ok(());
    };
    let Some(sig_hex) = &n.ed25519 else {
        return Err(Failure::Verify(
            "the notice carries no ed25519 signature".into(),
        ));
    };
    let mut sig = [0u8; 64];
    hex::decode_to_slice(sig_hex, &mut sig)
        .map_err(|_| Failure::Verify("ed25519 is not 128 hex digits".into()))?;
    let sha512: [u8; 64] = s512.finalize().into();
    key.verify_strict(&sha512, &ed25519_dalek::Signature::from_bytes(&sig))
        .map_err(|_| {
            Failure::Verify("the ed25519 signature does not verify with ota.public_key".into())
        })
}

/// Downloads `n.url` into `path`, resuming from what `path` already holds (a Range request);
/// `progress` gets percentages as they pass tens.
pub(crate) async fn download(
    n: &Notice,
    path: &Path,
    max: u64,
    mut progress: impl FnMut(i64),
) -> Result<(), Failure> {
    use tokio::io::AsyncWriteExt;
    if n.size > max {
        return Err(Failure::Other(format!(
            "the image has {} bytes, more than ota.max_bytes ({max})",
            n.size
        )));
    }
    let mut have = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if have > n.size {
        have = 0;
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| Failure::Download(e.to_string()))?;
    let mut req = client.get(&n.url);
    if have > 0 {
        req = req.header("Range", format!("bytes={have}-"));
    }
    let mut resp = req
        .send()
        .await
        .map_err(|e| Failure::Download(format!("{}: {e}", n.url)))?;
    let status = resp.status().as_u16();
    let append = match status {
        206 if have > 0 => true,
        200 => false,
        _ => return Err(Failure::Download(format!("the server answered {status}"))),
    };
    if !append {
        have = 0;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .await
        .map_err(|e| Failure::Install(format!("{}: {e}", path.display())))?;
    let mut last = -1;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Failure::Download(format!("after {have} bytes: {e}")))?
    {
        have += chunk.len() as u64;
        if have > n.size {
            return Err(Failure::Download(
                "the server sent more than the notice's size".into(),
            ));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| Failure::Install(e.to_string()))?;
        let pct = (have * 100 / n.size.max(1)) as i64 / 10 * 10;
        if pct != last {
            last = pct;
            progress(pct.min(99));
        }
    }
    file.sync_all()
        .await
        .map_err(|e| Failure::Install(e.to_string()))?;
    if have != n.size {
        return Err(Failure::Download(format!(
            "{have} of {} bytes arrived",
            n.size
        )));
    }
    Ok(())
}

/// Runs `bin --version` (bounded): the new binary must at least start on this machine.
async fn preflight(bin: &Path) -> Result<(), Failure> {
    let run = tokio::process::Command::new(bin)
        .arg("--version")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(Failure::Install(format!(
            "the new binary does not start here: `--version` exited with {}",
            out.status
        ))),
        Ok(Err(e)) => Err(Failure::Install(format!(
            "the new binary does not start here: {e}"
        ))),
        Err(_) => Err(Failure::Install(
            "the new binary's `--version` did not answer within 10 s".into(),
        )),
    }
}

/// Puts `new` in place of `exe`, keeping the running one as `{exe}.previous`: a hard link
/// first (so `exe` always names a whole binary), then one atomic rename.
pub fn swap_in(exe: &Path, new: &Path) -> std::io::Result<()> {
    let previous = previous_path(exe);
    let _ = std::fs::remove_file(&previous);
    std::fs::hard_link(exe, &previous)?;
    std::fs::rename(new, exe)?;
    if let Some(dir) = exe.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Puts `{exe}.previous` back in place of `exe`.
pub fn roll_back(exe: &Path) -> std::io::Result<()> {
    std::fs::rename(previous_path(exe), exe)?;
    if let Some(dir) = exe.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// What the self-upgrade task needs.
#[derive(Debug)]
pub struct SelfUpgrade {
    /// Settings.
    pub config: OtaConfig,
    /// The gateway's (product key, device name).
    pub gateway: (String, String),
    /// True under `run --supervise` (only then can a new binary be tried and rolled back).
    pub supervised: bool,
    /// The running binary.
    pub exe: PathBuf,
    /// Messages for the cloud (topic, body), published by the uplink.
    pub outbox: mpsc::Sender<(String, String)>,
    /// Set to an exit code to end the process (the upgrade's restart).
    pub exit: watch::Sender<Option<i32>>,
}

impl SelfUpgrade {
    fn topic(&self, what: &str) -> String {
        format!("/ota/device/{what}/{}/{}", self.gateway.0, self.gateway.1)
    }

    async fn send(&self, what: &str, params: Value) {
        let body = json!({"id": crate::now_ms().to_string(), "params": params}).to_string();
        let _ = self.outbox.send((self.topic(what), body)).await;
    }

    async fn progress(&self, step: i64, desc: &str) {
        self.send(
            "progress",
            json!({"step": step.to_string(), "desc": desc, "module": self.config.module}),
        )
        .await;
    }

    /// Runs until `stop`: informs the cloud of the version at every connect (committing a
    /// trial and reporting a rollback), and carries out notices.
    pub async fn run(
        self,
        mut notices: mpsc::Receiver<Vec<u8>>,
        mut state: watch::Receiver<State>,
        mut stop: watch::Receiver<bool>,
    ) {
        let version = version();
        let mut busy: Option<tokio::task::JoinHandle<Result<String, Failure>>> = None;
        loop {
            tokio::select! {
                r = stop.changed() => {
                    let stopped = r.is_err() || *stop.borrow();
                    if stopped {
                        return;
                    }
                }
                changed = state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let up = *state.borrow_and_update() == State::Up;
                    if up {
                        self.on_up(&version).await;
                    }
                }
                Some(payload) = notices.recv() => {
                    if busy.as_ref().is_some_and(|b| !b.is_finished()) {
                        tracing::info!("self-upgrade already in progress; notice ignored");
                        continue;
                    }
                    let n = match parse_notice(&payload) {
                        Ok(n) => n,
                        Err(e) => {
                            tracing::warn!(error = %e, "malformed self-upgrade notice");
                            self.progress(-1, &format!("malformed notice: {e}")).await;
                            continue;
                        }
                    };
                    if n.module != self.config.module {
                        continue;
                    }
                    if n.version == version {
                        self.send("inform", json!({"version": version, "module": self.config.module})).await;
                        continue;
                    }
                    busy = Some(self.start(n));
                }
                Some(done) = async { match busy.as_mut() { Some(b) => Some(b.await), None => None } } => {
                    busy = None;
                    match done {
                        Ok(Ok(to)) => {
                            tracing::info!(to = %to, "new binary in place; restarting into it");
                            self.progress(100, "installed; restarting").await;
                            // Give the uplink a moment to hand the report to the network.
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            let _ = self.exit.send(Some(RESTART_FOR_UPGRADE));
                        }
                        Ok(Err(f)) => {
                            let (step, why) = f.report();
                            tracing::warn!(step, why, "self-upgrade refused");
                            self.progress(step, why).await;
                        }
                        Err(e) => self.progress(-1, &format!("upgrade task failed: {e}")).await,
                    }
                }
            }
        }
    }

    async fn on_up(&self, version: &str) {
        let marker = marker_path(&self.exe);
        if let Some(m) = read_json::<Marker>(&marker) {
            if m.to == version && m.started {
                // The trial connected: it stays.
                let _ = std::fs::remove_file(&marker);
                let _ = std::fs::remove_file(previous_path(&self.exe));
                tracing::info!(from = %m.from, to = %m.to, "self-upgrade confirmed");
            }
        }
        let rolled = rollback_path(&self.exe);
        if let Some(r) = read_json::<RolledBack>(&rolled) {
            self.progress(-4, &format!("{} was rolled back: {}", r.to, r.why))
                .await;
            let _ = std::fs::remove_file(&rolled);
        }
        self.send(
            "inform",
            json!({"version": version, "module": self.config.module}),
        )
        .await;
    }

    /// Starts downloading, checking and swapping in `n`; the task answers the new version.
    fn start(&self, n: Notice) -> tokio::task::JoinHandle<Result<String, Failure>> {
        let exe = self.exe.clone();
        let config = self.config.clone();
        let supervised = self.supervised;
        let outbox = self.outbox.clone();
        let topic = self.topic("progress");
        let module = self.config.module.clone();
        let from = version();
        tokio::spawn(async move {
            if !supervised {
                return Err(Failure::Other(
                    "this gateway runs without `--supervise`: a new binary could not be rolled back, so it is not installed".into(),
                ));
            }
            let key = config.key().map_err(Failure::Other)?.ok_or_else(|| {
                Failure::Verify(
                    "no ota.public_key is configured: unsigned binaries are never installed".into(),
                )
            })?;
            let part = sibling(&exe, ".download");
            let report = |step: i64| {
                let body = json!({"id": crate::now_ms().to_string(), "params": {"step": step.to_string(), "desc": "downloading", "module": module}}).to_string();
                let _ = outbox.try_send((topic.clone(), body));
            };
            download(&n, &part, config.max_bytes, report).await?;
            if let Err(f) = verify_image(&part, &n, Some(&key)) {
                let _ = std::fs::remove_file(&part);
                return Err(f);
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| Failure::Install(e.to_string()))?;
            }
            if let Err(f) = preflight(&part).await {
                let _ = std::fs::remove_file(&part);
                return Err(f);
            }
            let marker = Marker {
                from,
                to: n.version.clone(),
                notice: n.id.clone(),
                confirm_secs: config.confirm_within.as_secs().max(1),
                started: false,
            };
            // The marker first: a crash after it but before the swap leaves a marker the
            // supervisor ignores (its `to` is not what runs).
            write_json(&marker_path(&exe), &marker).map_err(|e| Failure::Install(e.to_string()))?;
            swap_in(&exe, &part).map_err(|e| {
                let _ = std::fs::remove_file(marker_path(&exe));
                Failure::Install(format!("swapping the binary: {e}"))
            })?;
            Ok(n.version)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn notice_for(img: &[u8], key: &SigningKey, sign_method: &str) -> Notice {
        let sha512: [u8; 64] = sha2::Sha512::digest(img).into();
        Notice {
            version: "2.0.0".into(),
            size: img.len() as u64,
            url: String::new(),
            sign: if sign_method == "SHA256" {
                hex::encode(sha2::Sha256::digest(img))
            } else {
                hex::encode(md5::Md5::digest(img))
            },
            sign_method: sign_method.into(),
            ed25519: Some(hex::encode(key.sign(&sha512).to_bytes())),
            module: "default".into(),
            id: "1".into(),
        }
    }

    #[test]
    fn images_are_checked_by_digest_size_and_signature() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[9u8; 32]);
        let img: Vec<u8> = (0..100_000u32).map(|i| (i * 13) as u8).collect();
        let path = dir.path().join("img");
        std::fs::write(&path, &img).unwrap();
        for m in ["Md5", "SHA256"] {
            verify_image(
                &path,
                &notice_for(&img, &key, m),
                Some(&key.verifying_key()),
            )
            .unwrap();
        }
        let n = notice_for(&img, &key, "Md5");
        // Another key.
        let other = SigningKey::from_bytes(&[8u8; 32]).verifying_key();
        assert!(matches!(
            verify_image(&path, &n, Some(&other)),
            Err(Failure::Verify(_))
        ));
        // A changed byte with the digest the notice carries for it (a tampered image
        // re-announced) still fails the signature.
        let mut tampered = img.clone();
        tampered[5] ^= 1;
        std::fs::write(&path, &tampered).unwrap();
        let mut n2 = n.clone();
        n2.sign = hex::encode(md5::Md5::digest(&tampered));
        let e = verify_image(&path, &n2, Some(&key.verifying_key())).unwrap_err();
        assert!(
            matches!(&e, Failure::Verify(w) if w.contains("ed25519")),
            "{e:?}"
        );
        // Unsigned notices are refused.
        std::fs::write(&path, &img).unwrap();
        let mut n3 = n.clone();
        n3.ed25519 = None;
        assert!(matches!(
            verify_image(&path, &n3, Some(&key.verifying_key())),
            Err(Failure::Verify(_))
        ));
        // Truncated.
        std::fs::write(&path, &img[..1000]).unwrap();
        assert!(matches!(
            verify_image(&path, &n, Some(&key.verifying_key())),
            Err(Failure::Verify(_))
        ));
    }

    #[test]
    fn notices_in_alibabas_form_are_read() {
        let n = parse_notice(br#"{"code":"1000","id":5,"data":{"size":"12","version":"2","url":"http://h/x","sign":"ABC","signMethod":"Md5","module":"default","ed25519":"00"}}"#).unwrap();
        assert_eq!((n.size, n.sign.as_str(), n.id.as_str()), (12, "abc", "5"));
        assert!(parse_notice(br#"{"data":{"version":"2","url":"u","sign":"a"}}"#).is_err());
        assert!(parse_notice(
            br#"{"data":{"size":1,"version":"2","url":"u","sign":"a","signMethod":"crc"}}"#
        )
        .is_err());
        assert!(parse_notice(b"nope").is_err());
    }

    #[test]
    fn the_binary_path_always_holds_a_whole_binary() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("ironlink-edge");
        std::fs::write(&exe, b"old").unwrap();
        let new = dir.path().join("new");
        std::fs::write(&new, b"new").unwrap();
        swap_in(&exe, &new).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"new");
        assert_eq!(std::fs::read(previous_path(&exe)).unwrap(), b"old");
        roll_back(&exe).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"old");
        assert!(!previous_path(&exe).exists());
        let m = Marker {
            from: "1".into(),
            to: "2".into(),
            notice: "n".into(),
            confirm_secs: 5,
            started: false,
        };
        write_json(&marker_path(&exe), &m).unwrap();
        assert_eq!(read_json::<Marker>(&marker_path(&exe)), Some(m));
    }
}
