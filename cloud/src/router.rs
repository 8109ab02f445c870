//! The message router: topic-filter subscriptions in a trie, retained messages, and delivery
//! into each session's bounded queue.
//!
//! Access control happens before anything reaches the router (see `access`); the router
//! trusts its callers. Internal consumers (API, later the rules engine) register sessions of
//! their own. A session whose queue is full loses that message, counted in
//! [`Router::dropped`], so one slow client never stalls publishers or other clients.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;

/// A routed message.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with (0 or 1).
    pub qos: u8,
    /// Whether it was published with RETAIN.
    pub retain: bool,
}

/// One message for one session, at the QoS granted to that session.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub message: Arc<Message>,
    /// min(message QoS, subscription QoS).
    pub qos: u8,
    /// True when delivered because of a new subscription to a retained message.
    pub retained: bool,
}

/// Identifies a session registered with the router.
pub type SessionId = u64;

#[derive(Debug, Default)]
struct Node {
    children: HashMap<String, Node>,
    plus: Option<Box<Node>>,
    /// Subscriptions ending at this node.
    subs: HashMap<SessionId, u8>,
    /// Subscriptions ending in `#` below this node.
    hash: HashMap<SessionId, u8>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.subs.is_empty()
            && self.hash.is_empty()
    }

    fn insert(&mut self, levels: &[&str], sid: SessionId, qos: u8) {
        match levels.split_first() {
            None => {
                self.subs.insert(sid, qos);
            }
            Some((&"#", _)) => {
                self.hash.insert(sid, qos);
            }
            Some((&"+", rest)) => self
                .plus
                .get_or_insert_with(Default::default)
                .insert(rest, sid, qos),
            Some((level, rest)) => self
                .children
                .entry((*level).to_owned())
                .or_default()
                .insert(rest, sid, qos),
        }
    }

    /// Removes a subscription; returns true when it existed. Prunes empty nodes.
    fn remove(&mut self, levels: &[&str], sid: SessionId) -> bool {
        match levels.split_first() {
            None => self.subs.remove(&sid).is_some(),
            Some((&"#", _)) => self.hash.remove(&sid).is_some(),
            Some((&"+", rest)) => {
                let Some(child) = self.plus.as_mut() else {
                    return false;
                };
                let removed = child.remove(rest, sid);
                if child.is_empty() {
                    self.plus = None;
                }
                removed
            }
            Some((level, rest)) => {
                let Some(child) = self.children.get_mut(*level) else {
                    return false;
                };
                let removed = child.remove(rest, sid);
                if child.is_empty() {
                    self.children.remove(*level);
                }
                removed
            }
        }
    }

    fn collect(&self, levels: &[&str], first: bool, out: &mut HashMap<SessionId, u8>) {
        // MQTT 4.7.2: wildcards at the first level do not match topics starting with `$`.
        let dollar = first && levels.first().is_some_and(|l| l.starts_with('$'));
        let mut add = |m: &HashMap<SessionId, u8>| {
            for (sid, q) in m {
                let e = out.entry(*sid).or_insert(*q);
                *e = (*e).max(*q);
            }
        };
        if !dollar {
            add(&self.hash);
        }
        match levels.split_first() {
            None => add(&self.subs),
            Some((level, rest)) => {
                if let Some(child) = self.children.get(*level) {
                    child.collect(rest, false, out);
                }
                if let (Some(plus), false) = (&self.plus, dollar) {
                    plus.collect(rest, false, out);
                }
            }
        }
    }
}

#[derive(Debug)]
struct SessionEntry {
    tx: mpsc::Sender<Delivery>,
    filters: HashMap<String, u8>,
}

/// Members of one MQTT 5 shared subscription (`$share/{name}/{filter}`): each message goes
/// to one of them, round robin.
#[derive(Debug, Default)]
struct SharedGroup {
    members: Vec<(SessionId, u8)>,
    next: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    root: Node,
    sessions: HashMap<SessionId, SessionEntry>,
    retained: HashMap<String, Arc<Message>>,
    /// (share name, filter) to its members.
    shared: HashMap<(String, String), SharedGroup>,
}

/// `$share/{name}/{filter}` split into name and filter.
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (name, f) = rest.split_once('/')?;
    (!name.is_empty() && !name.contains(['+', '#']) && !f.is_empty()).then_some((name, f))
}

/// The router. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Router {
    inner: RwLock<Inner>,
    next_id: AtomicU64,
    dropped: AtomicU64,
    routed: AtomicU64,
}

fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    let mut first = true;
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !(first && topic.starts_with('$')),
            (Some("+"), Some(_)) if !(first && topic.starts_with('$')) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

impl Inner {
    fn remove_shared(&mut self, name: &str, filter: &str, sid: SessionId) {
        let key = (name.to_owned(), filter.to_owned());
        if let Some(g) = self.shared.get_mut(&key) {
            g.members.retain(|(m, _)| *m != sid);
            if g.members.is_empty() {
                self.shared.remove(&key);
            }
        }
    }
}

impl Router {
    /// A new empty router.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-update; the maps stay usable.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session that receives deliveries through `tx`.
    pub fn register(&self, tx: mpsc::Sender<Delivery>) -> SessionId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.write().sessions.insert(
            id,
            SessionEntry {
                tx,
                filters: HashMap::new(),
            },
        );
        id
    }

    /// Removes a session and all its subscriptions.
    pub fn unregister(&self, sid: SessionId) {
        let mut inner = self.write();
        if let Some(entry) = inner.sessions.remove(&sid) {
            for filter in entry.filters.keys() {
                if let Some((name, f)) = parse_shared(filter) {
                    inner.remove_shared(name, f, sid);
                    continue;
                }
                let levels: Vec<&str> = filter.split('/').collect();
                inner.root.remove(&levels, sid);
            }
        }
    }

    /// Subscribes (or re-subscribes with a new QoS) and returns the retained messages the
    /// filter matches, already queued to the session.
    pub fn subscribe(&self, sid: SessionId, filter: &str, qos: u8) -> usize {
        let mut inner = self.write();
        let Some(entry) = inner.sessions.get_mut(&sid) else {
            return 0;
        };
        entry.filters.insert(filter.to_owned(), qos);
        if let Some((name, f)) = parse_shared(filter) {
            // Shared subscriptions get no retained messages (MQTT 5, 4.8.2).
            let g = inner
                .shared
                .entry((name.to_owned(), f.to_owned()))
                .or_default();
            g.members.retain(|(m, _)| *m != sid);
            g.members.push((sid, qos));
            return 0;
        }
        let tx = entry.tx.clone();
        let levels: Vec<&str> = filter.split('/').collect();
        inner.root.insert(&levels, sid, qos);
        let mut sent = 0;
        for msg in inner
            .retained
            .values()
            .filter(|m| topic_matches(filter, &m.topic))
        {
            let d = Delivery {
                message: msg.clone(),
                qos: msg.qos.min(qos),
                retained: true,
            };
            if tx.try_send(d).is_ok() {
                sent += 1;
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        sent
    }

    /// Removes one subscription; true when it existed.
    pub fn unsubscribe(&self, sid: SessionId, filter: &str) -> bool {
        let mut inner = self.write();
        let existed = inner
            .sessions
            .get_mut(&sid)
            .is_some_and(|e| e.filters.remove(filter).is_some());
        if existed {
            if let Some((name, f)) = parse_shared(filter) {
                inner.remove_shared(name, f, sid);
            } else {
                let levels: Vec<&str> = filter.split('/').collect();
                inner.root.remove(&levels, sid);
            }
        }
        existed
    }

    /// Routes a message to every matching subscription (each session once, at the highest
    /// QoS among its matching filters). Returns how many sessions it was queued to.
    pub fn publish(&self, message: Message) -> usize {
        self.publish_from(message, None)
    }

    /// Like [`Router::publish`], but never back to the session `origin` (a device's uplinks on
    /// system topics are for the platform, not echoes for the device's own subscriptions).
    pub fn publish_from(&self, message: Message, origin: Option<SessionId>) -> usize {
        if message.retain {
            let mut inner = self.write();
            if message.payload.is_empty() {
                inner.retained.remove(&message.topic);
            } else {
                inner
                    .retained
                    .insert(message.topic.clone(), Arc::new(message.clone()));
            }
        }
        let message = Arc::new(Message {
            retain: false,
            ..message
        });
        let levels: Vec<&str> = message.topic.split('/').collect();
        let mut targets = HashMap::new();
        let inner = self.read();
        inner.root.collect(&levels, true, &mut targets);
        let mut sent = 0;
        for (sid, qos) in targets {
            if Some(sid) == origin {
                continue;
            }
            let Some(entry) = inner.sessions.get(&sid) else {
                continue;
            };
            let d = Delivery {
                message: message.clone(),
                qos: message.qos.min(qos),
                retained: false,
            };
            if entry.tx.try_send(d).is_ok() {
                sent += 1;
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        for ((_, filter), g) in &inner.shared {
            if g.members.is_empty() || !topic_matches(filter, &message.topic) {
                continue;
            }
            // One member: the next in turn whose queue has room.
            let start = g.next.fetch_add(1, Ordering::Relaxed) as usize;
            let n = g.members.len();
            let delivered = (0..n).any(|i| {
                let (sid, qos) = g.members[(start + i) % n];
                if Some(sid) == origin {
                    return false;
                }
                let Some(entry) = inner.sessions.get(&sid) else {
                    return false;
                };
                entry
                    .tx
                    .try_send(Delivery {
                        message: message.clone(),
                        qos: message.qos.min(qos),
                        retained: false,
                    })
                    .is_ok()
            });
            if delivered {
                sent += 1;
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.routed.fetch_add(1, Ordering::Relaxed);
        sent
    }

    /// Deliveries lost because a session's queue was full or closed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Messages routed since start.
    pub fn routed(&self) -> u64 {
        self.routed.load(Ordering::Relaxed)
    }

    /// Registered sessions.
    pub fn session_count(&self) -> usize {
        self.read().sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, qos: u8) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
        }
    }

    #[test]
    fn wildcards_match_per_mqtt_rules() {
        let r = Router::new();
        let (tx, mut rx) = mpsc::channel(16);
        let s = r.register(tx);
        for f in ["/sys/pk/dn/#", "/ota/device/+/pk/dn", "a/+", "#"] {
            r.subscribe(s, f, 1);
        }
        assert_eq!(r.publish(msg("/sys/pk/dn/thing/x", 1)), 1);
        assert_eq!(rx.try_recv().unwrap().qos, 1);
        assert_eq!(r.publish(msg("$SYS/x", 0)), 0, "# must not match $ topics");
        assert!(topic_matches("a/+", "a/b"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(!topic_matches("+/x", "$SYS/x"));
    }

    #[test]
    fn each_session_once_at_highest_qos() {
        let r = Router::new();
        let (tx, mut rx) = mpsc::channel(16);
        let s = r.register(tx);
        r.subscribe(s, "a/#", 0);
        r.subscribe(s, "a/b", 1);
        assert_eq!(r.publish(msg("a/b", 1)), 1);
        assert_eq!(rx.try_recv().unwrap().qos, 1);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn unsubscribe_and_unregister_prune() {
        let r = Router::new();
        let (tx, _rx) = mpsc::channel(16);
        let s = r.register(tx);
        r.subscribe(s, "a/+/c", 0);
        assert!(r.unsubscribe(s, "a/+/c"));
        assert!(!r.unsubscribe(s, "a/+/c"));
        assert_eq!(r.publish(msg("a/b/c", 0)), 0);
        r.subscribe(s, "x/#", 0);
        r.unregister(s);
        assert_eq!(r.publish(msg("x/y", 0)), 0);
        assert!(r.read().root.is_empty());
    }

    #[test]
    fn retained_messages_reach_new_subscribers_and_are_cleared_by_empty_payload() {
        let r = Router::new();
        r.publish(Message {
            retain: true,
            ..msg("r/1", 1)
        });
        let (tx, mut rx) = mpsc::channel(16);
        let s = r.register(tx);
        assert_eq!(r.subscribe(s, "r/#", 0), 1);
        let d = rx.try_recv().unwrap();
        assert!(d.retained);
        assert_eq!(d.qos, 0);
        r.publish(Message {
            retain: true,
            payload: Bytes::new(),
            ..msg("r/1", 0)
        });
        rx.try_recv().unwrap();
        assert_eq!(r.subscribe(s, "r/+", 0), 0);
    }

    #[test]
    fn shared_subscriptions_deliver_each_message_to_one_member() {
        let r = Router::new();
        let (ta, mut ra) = mpsc::channel(16);
        let (tb, mut rb) = mpsc::channel(16);
        let a = r.register(ta);
        let b = r.register(tb);
        r.subscribe(a, "$share/apps/sys/+/x", 1);
        r.subscribe(b, "$share/apps/sys/+/x", 1);
        for _ in 0..10 {
            assert_eq!(r.publish(msg("sys/d/x", 1)), 1);
        }
        let (mut na, mut nb) = (0, 0);
        while ra.try_recv().is_ok() {
            na += 1;
        }
        while rb.try_recv().is_ok() {
            nb += 1;
        }
        assert_eq!((na, nb), (5, 5), "round robin, each message once");
        assert!(r.unsubscribe(a, "$share/apps/sys/+/x"));
        r.unregister(b);
        assert_eq!(r.publish(msg("sys/d/x", 1)), 0);
        assert!(r.read().shared.is_empty());
        assert_eq!(parse_shared("$share/g/a/#"), Some(("g", "a/#")));
        assert_eq!(parse_shared("$share//a"), None);
        assert_eq!(parse_shared("$share/g"), None);
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let r = Router::new();
        let (tx, _rx) = mpsc::channel(1);
        let s = r.register(tx);
        r.subscribe(s, "t", 0);
        assert_eq!(r.publish(msg("t", 0)), 1);
        assert_eq!(r.publish(msg("t", 0)), 0);
        assert_eq!(r.dropped(), 1);
    }
}
