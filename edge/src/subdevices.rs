//! Sub-devices that appear at run time (JT/T 808 terminals, GB/T 32960 vehicles): their
//! product key and secret, learnt from the cloud's registry (`thing/sub/register`), kept in a
//! file beside the queue so that readings queued before a restart can still be sent as them,
//! and the routes from their device names to the tasks serving them.

use crate::link::Command;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use tokio::sync::mpsc;

/// One sub-device's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Product key.
    pub product_key: String,
    /// Device secret.
    pub device_secret: String,
}

/// The run-time sub-devices.
#[derive(Debug)]
pub struct SubDevices {
    path: PathBuf,
    known: RwLock<BTreeMap<String, Identity>>,
    routes: RwLock<HashMap<String, mpsc::Sender<Command>>>,
}

impl SubDevices {
    /// Loads `dir/subdevices.json` (absent: none yet). A file that cannot be read is an error:
    /// starting without it would strand queued readings.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join("subdevices.json");
        let known = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path,
            known: RwLock::new(known),
            routes: RwLock::default(),
        })
    }

    /// True when no run-time sub-device is known.
    pub fn is_empty(&self) -> bool {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// The identity of `name`, if known.
    pub fn get(&self, name: &str) -> Option<Identity> {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Remembers an identity, durably (written to a temporary file, synced, renamed).
    pub fn remember(&self, name: &str, id: Identity) -> std::io::Result<()> {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if known.get(name) == Some(&id) {
            return Ok(());
        }
        known.insert(name.to_owned(), id);
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&*known).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Routes the cloud's calls for `name` to `tx` (while its terminal is connected).
    pub fn route(&self, name: &str, tx: mpsc::Sender<Command>) {
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), tx);
    }

    /// Stops routing to `name`, if `tx` is still its route (a newer connection may own it).
    pub fn unroute(&self, name: &str, tx: &mpsc::Sender<Command>) {
        let mut r = self.routes.write().unwrap_or_else(|e| e.into_inner());
        if r.get(name).is_some_and(|t| t.same_channel(tx)) {
            r.remove(name);
        }
    }

    /// Names with a route (their terminals are connected).
    pub fn routed(&self) -> Vec<String> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The route of `name`.
    pub fn route_of(&self, name: &str) -> Option<mpsc::Sender<Command>> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = SubDevices::open(dir.path()).unwrap();
        assert_eq!(s.get("v1"), None);
        let id = Identity {
            product_key: "pk".into(),
            device_secret: "secret".into(),
        };
        s.remember("v1", id.clone()).unwrap();
        let again = SubDevices::open(dir.path()).unwrap();
        assert_eq!(again.get("v1"), Some(id));
        std::fs::write(dir.path().join("subdevices.json"), b"{not json").unwrap();
        assert!(SubDevices::open(dir.path()).is_err());
    }
}
