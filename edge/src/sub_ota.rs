//! Firmware upgrades of sub-devices through the gateway. The cloud's notice for a sub-device
//! (`/ota/device/upgrade/{pk}/{dn}`, on the gateway's connection) is carried out here: the
//! gateway downloads the image once per digest (resuming with Range requests), checks its size
//! and digest (and its ed25519 signature when `ota.public_key` is set), then hands an
//! [`Offer`] to the link that reaches the device, which delivers it in its own protocol:
//! CoAP devices pull it (`thing/ota/firmware/get`, then a block-wise GET from the gateway),
//! JT/T 808 terminals get 0x8108 packages; Modbus, LoRaWAN and GB/T 32960 links answer why
//! they cannot. Progress and the new version go to the cloud as queued records (so they
//! follow the sub-device's login and survive a restart of the gateway).

use crate::link::{Command, Op, Sink};
use crate::ota::{download, verify_image, Failure, Notice, OtaConfig};
use crate::subdevices::SubDevices;
use crate::uplink::Routes;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// An upgrade ready on the gateway for one sub-device.
#[derive(Debug)]
pub struct Offer {
    /// The sub-device's product key.
    pub pk: String,
    /// Its name.
    pub dn: String,
    /// The cloud's notice.
    pub notice: Notice,
    /// The notice's `data` as the cloud sent it.
    pub data: Value,
    /// The checked image on the gateway's disk.
    pub image: PathBuf,
    /// The capability that serves the image on the local side (CoAP `/ota/{token}`).
    pub token: String,
    sink: Sink,
}

impl PartialEq for Offer {
    fn eq(&self, other: &Self) -> bool {
        self.token == other.token
    }
}

impl Offer {
    /// Queues a progress report of the sub-device (Alibaba's step: 1..100, or -1..-4).
    pub fn progress(&self, step: i64, desc: &str) -> bool {
        report(
            &self.sink,
            &self.dn,
            "progress",
            json!({"step": step.to_string(), "desc": desc, "module": self.notice.module}),
        )
    }

    /// Queues the sub-device's version of the offer's module.
    pub fn inform(&self, version: &str) -> bool {
        report(
            &self.sink,
            &self.dn,
            "inform",
            json!({"version": version, "module": self.notice.module}),
        )
    }
}

/// Queues an OTA report (`inform` or `progress`) of sub-device `dn`: the uplink publishes it on
/// `/ota/device/{kind}/{pk}/{dn}` after the sub-device's login. True once queued.
pub fn report(sink: &Sink, dn: &str, kind: &str, params: Value) -> bool {
    sink.push(
        crate::now_ms(),
        &json!({"dn": dn, "ota": kind, "params": params}),
    )
}

/// The offers standing, by device and by token (shared by the links that deliver them).
#[derive(Debug, Default)]
pub struct Offers(Mutex<HashMap<String, Arc<Offer>>>);

impl Offers {
    fn put(&self, o: Arc<Offer>) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(o.dn.clone(), o);
        }
    }

    /// The offer for device `dn`.
    pub fn get(&self, dn: &str) -> Option<Arc<Offer>> {
        self.0.lock().ok()?.get(dn).cloned()
    }

    /// The offer with this token.
    pub fn by_token(&self, token: &str) -> Option<Arc<Offer>> {
        self.0
            .lock()
            .ok()?
            .values()
            .find(|o| o.token == token)
            .cloned()
    }

    /// The device reported `version` of `module`: an offer of it is done.
    pub fn reported(&self, dn: &str, module: &str, version: &str) {
        self.remove_if(dn, |o| {
            o.notice.module == module && o.notice.version == version
        });
    }

    fn remove(&self, dn: &str, token: &str) {
        self.remove_if(dn, |o| o.token == token);
    }

    fn remove_if(&self, dn: &str, ended: impl Fn(&Offer) -> bool) {
        if let Ok(mut m) = self.0.lock() {
            if m.get(dn).is_some_and(|o| ended(o)) {
                m.remove(dn);
            }
        }
    }
}

/// A notice for a sub-device: (product key, device name, payload).
pub type SubNotice = (String, String, Vec<u8>);

/// The sub-device upgrade task.
#[derive(Debug)]
pub struct SubUpgrades {
    config: OtaConfig,
    /// Where images are kept (`{queue.dir}/ota-images`).
    dir: PathBuf,
    sink: Sink,
    routes: Arc<Routes>,
    subs: Arc<SubDevices>,
    offers: Arc<Offers>,
    /// One download per digest: concurrent notices of one campaign wait for the first.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// How long an offer waits for the link to take charge of it.
const DELIVERY: Duration = Duration::from_secs(60);

impl SubUpgrades {
    /// The task's state.
    pub fn new(
        config: OtaConfig,
        dir: PathBuf,
        sink: Sink,
        routes: Arc<Routes>,
        subs: Arc<SubDevices>,
        offers: Arc<Offers>,
    ) -> Self {
        Self {
            config,
            dir,
            sink,
            routes,
            subs,
            offers,
            locks: Mutex::default(),
        }
    }

    /// Runs until `stop`: carries out notices, one task per device (a newer notice for a
    /// device replaces the one in progress; the same one again is ignored).
    pub async fn run(
        self,
        mut notices: mpsc::Receiver<SubNotice>,
        mut stop: watch::Receiver<bool>,
    ) {
        sweep(&self.dir);
        let this = Arc::new(self);
        let mut busy: HashMap<String, (String, tokio::task::JoinHandle<()>)> = HashMap::new();
        loop {
            let (pk, dn, payload) = tokio::select! {
                n = notices.recv() => match n { Some(n) => n, None => return },
                _ = stop.wait_for(|s| *s) => return,
            };
            busy.retain(|_, (_, h)| !h.is_finished());
            let n = match crate::ota::parse_notice(&payload) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(device = %dn, error = %e, "malformed sub-device notice");
                    let _ = report(
                        &this.sink,
                        &dn,
                        "progress",
                        json!({"step": "-1", "desc": format!("malformed notice: {e}")}),
                    );
                    continue;
                }
            };
            let key = format!("{}@{}", n.version, n.module);
            if busy.get(&dn).is_some_and(|(k, _)| *k == key) {
                continue;
            }
            if let Some((_, h)) = busy.remove(&dn) {
                h.abort();
            }
            let data = serde_json::from_slice::<Value>(&payload)
                .map(|v| v["data"].clone())
                .unwrap_or(Value::Null);
            let t = this.clone();
            let d = dn.clone();
            busy.insert(
                dn,
                (
                    key,
                    tokio::spawn(async move { t.upgrade(pk, d, n, data).await }),
                ),
            );
        }
    }

    async fn upgrade(&self, pk: String, dn: String, n: Notice, data: Value) {
        let fail = |f: Failure| {
            let (step, why) = f.report();
            tracing::warn!(device = %dn, step, why, "sub-device upgrade stopped");
            let _ = report(
                &self.sink,
                &dn,
                "progress",
                json!({"step": step.to_string(), "desc": why, "module": n.module}),
            );
        };
        let image = match self.fetch(&n).await {
            Ok(p) => p,
            Err(f) => return fail(f),
        };
        let Some(link) = self
            .routes
            .get(&dn)
            .cloned()
            .or_else(|| self.subs.route_of(&dn))
        else {
            return fail(Failure::Other(
                "the sub-device is not connected to the gateway".into(),
            ));
        };
        // The same upgrade again (the cloud renews its notice when the device or the gateway
        // reconnects): the standing offer's token stays, so a download or transfer under way
        // goes on; the notice's data is the newest.
        let token = self
            .offers
            .get(&dn)
            .filter(|o| {
                o.notice.version == n.version && o.notice.module == n.module && o.image == image
            })
            .map_or_else(
                || {
                    format!(
                        "{:016x}{:016x}",
                        crate::vehicle::random_u64(),
                        crate::vehicle::random_u64()
                    )
                },
                |o| o.token.clone(),
            );
        let offer = Arc::new(Offer {
            pk,
            dn: dn.clone(),
            notice: n.clone(),
            data,
            image,
            token,
            sink: self.sink.clone(),
        });
        self.offers.put(offer.clone());
        let (reply, mut outcome) = mpsc::unbounded_channel();
        let cmd = Command {
            device: dn.clone(),
            op: Op::Upgrade(offer.clone()),
            tag: (String::new(), String::new()),
            reply,
        };
        if link.send(Box::new(cmd)).await.is_err() {
            self.offers.remove(&dn, &offer.token);
            return fail(Failure::Other("the sub-device's link has stopped".into()));
        }
        match tokio::time::timeout(DELIVERY, outcome.recv()).await {
            Ok(Some((_, o))) if o.code == 200 => {
                tracing::info!(device = %dn, version = %n.version, "sub-device upgrade handed to its link");
            }
            Ok(Some((_, o))) => {
                self.offers.remove(&dn, &offer.token);
                fail(Failure::Other(o.message));
            }
            Ok(None) | Err(_) => {
                self.offers.remove(&dn, &offer.token);
                fail(Failure::Other(
                    "the sub-device's link gave no answer".into(),
                ));
            }
        }
    }

    /// The checked image of `n`, downloaded once for every device it is offered to.
    async fn fetch(&self, n: &Notice) -> Result<PathBuf, Failure> {
        let name = format!(
            "{}-{}",
            n.sign_method.to_ascii_lowercase(),
            n.sign
                .chars()
                .filter(char::is_ascii_hexdigit)
                .collect::<String>()
        );
        let lock = self
            .locks
            .lock()
            .map_err(|_| Failure::Other("lock poisoned".into()))?
            .entry(name.clone())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Failure::Install(format!("{}: {e}", self.dir.display())))?;
        let path = self.dir.join(format!("{name}.img"));
        let key = self.config.key().map_err(Failure::Other)?;
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == n.size) {
            // Checked when it was stored; the signature is the notice's to match.
            if key.is_none() || verify_image(&path, n, key.as_ref()).is_ok() {
                touch(&path);
                return Ok(path);
            }
        }
        let part = self.dir.join(format!("{name}.part"));
        download(n, &part, self.config.max_bytes, |_| {}).await?;
        if let Err(f) = verify_image(&part, n, key.as_ref()) {
            let _ = std::fs::remove_file(&part);
            return Err(f);
        }
        std::fs::rename(&part, &path).map_err(|e| Failure::Install(e.to_string()))?;
        Ok(path)
    }
}

/// Marks an image as used now (the sweep keeps what was used in the last week).
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// Removes images not used for a week, and downloads not touched for a day.
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        let name = e.file_name().to_string_lossy().into_owned();
        let limit = if name.ends_with(".part") { 1 } else { 7 };
        if age > Duration::from_secs(limit * 24 * 3600) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The JT/T 808 upgrade type of an OTA module (`gnss` 52, `ic_card` 12, the terminal 0).
pub fn jt808_kind(module: &str) -> u8 {
    match module {
        "gnss" => 52,
        "ic_card" => 12,
        _ => 0,
    }
}

/// The OTA module of a JT/T 808 upgrade type.
pub fn jt808_module(kind: u8) -> &'static str {
    match kind {
        52 => "gnss",
        12 => "ic_card",
        _ => "default",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jt808_kinds_and_modules_map_both_ways() {
        for m in ["default", "gnss", "ic_card"] {
            assert_eq!(jt808_module(jt808_kind(m)), m);
        }
        assert_eq!(jt808_kind("anything"), 0);
    }
}
