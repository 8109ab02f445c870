//! Live device sessions by identity, so that the API can kick a device and a new connection
//! can replace an old one with the same identity.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Why a session is being closed from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kick {
    /// A new connection with the same identity arrived.
    Replaced,
    /// An operator action (disable, delete).
    Admin(String),
    /// The server is stopping.
    Shutdown,
}

#[derive(Debug)]
struct Live {
    serial: u64,
    kick: Option<oneshot::Sender<Kick>>,
    done: watch::Receiver<()>,
}

/// A registered session's side of the registry.
#[derive(Debug)]
pub struct Registration {
    /// Distinguishes this session from later ones with the same identity.
    pub serial: u64,
    /// Fires when the session must close.
    pub kicked: oneshot::Receiver<Kick>,
    /// Dropped when the session has finished its clean-up.
    pub done: watch::Sender<()>,
}

/// The registry.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<(String, String), Live>>,
    next: std::sync::atomic::AtomicU64,
}

type Key = (String, String);

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Live>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session for `pk/dn`, first closing any session already there and waiting
    /// (up to 5 s) until it has recorded its offline change, so that presence stays ordered.
    pub async fn register(&self, pk: &str, dn: &str) -> Registration {
        let serial = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (kick_tx, kicked) = oneshot::channel();
        let (done, done_rx) = watch::channel(());
        let old = self.lock().insert(
            (pk.to_owned(), dn.to_owned()),
            Live {
                serial,
                kick: Some(kick_tx),
                done: done_rx,
            },
        );
        if let Some(mut old) = old {
            if let Some(k) = old.kick.take() {
                let _ = k.send(Kick::Replaced);
            }
            // `changed` fails once the old session drops its `done` sender.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while old.done.changed().await.is_ok() {}
            })
            .await;
        }
        Registration {
            serial,
            kicked,
            done,
        }
    }

    /// Removes `pk/dn` if it is still the session with `serial`.
    pub fn remove(&self, pk: &str, dn: &str, serial: u64) {
        let mut map = self.lock();
        let key = (pk.to_owned(), dn.to_owned());
        if map.get(&key).is_some_and(|l| l.serial == serial) {
            map.remove(&key);
        }
    }

    /// Kicks one device; true when it was online.
    pub fn kick(&self, pk: &str, dn: &str, why: Kick) -> bool {
        let mut map = self.lock();
        match map.get_mut(&(pk.to_owned(), dn.to_owned())) {
            Some(live) => live
                .kick
                .take()
                .map(|k| k.send(why).is_ok())
                .unwrap_or(false),
            None => false,
        }
    }

    /// Kicks every device of a product; returns how many.
    pub fn kick_product(&self, pk: &str, why: &Kick) -> usize {
        let mut map = self.lock();
        map.iter_mut()
            .filter(|((p, _), _)| p == pk)
            .filter_map(|(_, live)| live.kick.take())
            .filter(|k| !k.is_closed())
            .map(|k| k.send(why.clone()).is_ok())
            .filter(|ok| *ok)
            .count()
    }

    /// Kicks every session (shutdown) and returns their completion handles.
    pub fn kick_all(&self) -> Vec<watch::Receiver<()>> {
        let mut map = self.lock();
        map.values_mut()
            .map(|live| {
                if let Some(k) = live.kick.take() {
                    let _ = k.send(Kick::Shutdown);
                }
                live.done.clone()
            })
            .collect()
    }

    /// True when `pk/dn` has a live session.
    pub fn is_online(&self, pk: &str, dn: &str) -> bool {
        self.lock().contains_key(&(pk.to_owned(), dn.to_owned()))
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
