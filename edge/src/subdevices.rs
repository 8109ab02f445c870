//! Sub-devices that appear at run time (JT/T 808 terminals, GB/T 32960 vehicles, LoRa nodes,
//! CoAP devices): their product key and secret, learnt from the cloud's registry
//! (`thing/sub/register`), kept in a file beside the queue so that readings queued before a
//! restart can still be sent as them, and the routes from their device names to the tasks
//! serving them.
//!
//! The file (`subdevices.jsonl`) is append-only, one identity per line (the last line for a
//! name wins; a torn last line is ignored): remembering one costs one write however many are
//! known. It is fsynced with the queue, once a second ([`SubDevices::sync`]).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

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
    routes: RwLock<HashMap<String, crate::link::Inbox>>,
    /// The open log and whether it has lines not yet fsynced.
    log: std::sync::Mutex<(Option<std::fs::File>, bool)>,
}

#[derive(Serialize, Deserialize)]
struct Line {
    name: String,
    #[serde(flatten)]
    id: Identity,
}

impl SubDevices {
    /// Loads `dir/subdevices.jsonl` (absent: none yet; an older `subdevices.json` is read
    /// too). A file that cannot be read is an error: starting without it would strand queued
    /// readings.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join("subdevices.jsonl");
        let mut known = BTreeMap::new();
        let old = dir.join("subdevices.json");
        if let Ok(b) = std::fs::read(&old) {
            let m: BTreeMap<String, Identity> = serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", old.display()),
                )
            })?;
            known.extend(m);
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                for (i, l) in lines.iter().enumerate() {
                    match serde_json::from_str::<Line>(l) {
                        Ok(line) => {
                            known.insert(line.name, line.id);
                        }
                        // A torn last line (a crash mid-write): the identity is asked again.
                        Err(_) if i + 1 == lines.len() => {}
                        Err(e) => {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!("{} line {}: {e}", path.display(), i + 1),
                            ))
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Self {
            path,
            known: RwLock::new(known),
            routes: RwLock::default(),
            log: std::sync::Mutex::new((None, false)),
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

    /// Remembers an identity: one line appended to the log (in the page cache at once, so a
    /// kill of the process loses nothing; fsynced by [`SubDevices::sync`]).
    pub fn remember(&self, name: &str, id: Identity) -> std::io::Result<()> {
        {
            let known = self.known.read().unwrap_or_else(|e| e.into_inner());
            if known.get(name) == Some(&id) {
                return Ok(());
            }
        }
        let mut line = serde_json::to_vec(&Line {
            name: name.to_owned(),
            id: id.clone(),
        })
        .map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.0.is_none() {
            log.0 = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        if let Some(f) = log.0.as_mut() {
            f.write_all(&line)?;
        }
        log.1 = true;
        drop(log);
        self.known
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), id);
        Ok(())
    }

    /// Fsyncs what was remembered since the last call.
    pub fn sync(&self) -> std::io::Result<()> {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(f), true) = (log.0.as_ref(), log.1) {
            f.sync_data()?;
            log.1 = false;
        }
        Ok(())
    }

    /// Routes the cloud's calls for `name` to `tx` (while its terminal is connected).
    pub fn route(&self, name: &str, tx: crate::link::Inbox) {
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), tx);
    }

    /// Stops routing to `name`, if `tx` is still its route (a newer connection may own it).
    pub fn unroute(&self, name: &str, tx: &crate::link::Inbox) {
        let mut r = self.routes.write().unwrap_or_else(|e| e.into_inner());
        if r.get(name).is_some_and(|t| t.same_channel(tx)) {
            r.remove(name);
        }
    }

    /// Every known run-time sub-device: name and product key.
    pub fn known(&self) -> Vec<(String, String)> {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, id)| (n.clone(), id.product_key.clone()))
            .collect()
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
    pub fn route_of(&self, name: &str) -> Option<crate::link::Inbox> {
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
        assert_eq!(again.get("v1"), Some(id.clone()));
        again.sync().unwrap();
        // A torn last line is ignored; a bad line before it is an error.
        let log = dir.path().join("subdevices.jsonl");
        let mut text = std::fs::read_to_string(&log).unwrap();
        text.push_str("{\"name\": \"v2\", \"produ");
        std::fs::write(&log, &text).unwrap();
        assert_eq!(
            SubDevices::open(dir.path()).unwrap().get("v1"),
            Some(id.clone())
        );
        std::fs::write(&log, format!("{{not json\n{text}")).unwrap();
        assert!(SubDevices::open(dir.path()).is_err());
    }
}
