//! The message router: topic-filter subscriptions in a trie, retained messages, and delivery
//! into each session's bounded queue.
//!
//! Access control happens before anything reaches the router (see `access`); the router
//! trusts its callers. Internal consumers (API, later the rules engine) register sessions of
//! their own. A session whose queue is full loses that message, counted in
//! [`Router::dropped`], so one slow client never stalls publishers or other clients.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    budget: Option<Arc<QueueBudget>>,
}

impl SessionEntry {
    /// Queues a delivery if the session's queue has room in count and in bytes.
    fn offer(&self, d: Delivery) -> bool {
        let size = d.message.size();
        if let Some(b) = &self.budget {
            if !b.try_add(size) {
                return false;
            }
        }
        if self.tx.try_send(d).is_ok() {
            return true;
        }
        if let Some(b) = &self.budget {
            b.release(size);
        }
        false
    }
}

/// Bytes queued for one session, bounded: the router adds what it queues, the session
/// releases what it has written (or dropped).
#[derive(Debug)]
pub struct QueueBudget {
    used: AtomicUsize,
    max: usize,
}

impl QueueBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            max,
        }
    }

    fn try_add(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                // One message always fits an empty queue, whatever its size.
                (u == 0 || u.saturating_add(n) <= self.max).then_some(u + n)
            })
            .is_ok()
    }

    /// Gives back the bytes of a delivery that left the queue.
    pub fn release(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Bytes queued now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Limits on retained messages.
#[derive(Debug, Clone, Copy)]
pub struct RetainLimits {
    /// Messages in all.
    pub total: usize,
    /// Bytes in all.
    pub total_bytes: usize,
}

impl Default for RetainLimits {
    fn default() -> Self {
        Self {
            total: usize::MAX,
            total_bytes: usize::MAX,
        }
    }
}

/// Why a retained message was not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetainRefused {
    /// The device keeps as many retained messages (or bytes) as it may.
    #[error("the device keeps {count} retained messages ({bytes} bytes), its limit is {max_count} ({max_bytes} bytes)")]
    Device {
        /// Its retained messages.
        count: usize,
        /// Their bytes.
        bytes: usize,
        /// Its limit in messages.
        max_count: usize,
        /// Its limit in bytes.
        max_bytes: usize,
    },
    /// The server keeps as many retained messages (or bytes) as it may.
    #[error("the server keeps {count} retained messages ({bytes} bytes), its limit is {max_count} ({max_bytes} bytes)")]
    Server {
        /// Retained messages.
        count: usize,
        /// Their bytes.
        bytes: usize,
        /// The limit in messages.
        max_count: usize,
        /// The limit in bytes.
        max_bytes: usize,
    },
}

#[derive(Debug)]
struct Retained {
    message: Arc<Message>,
    owner: Option<(String, String)>,
}

impl Message {
    /// Bytes it holds (topic and payload).
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }
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
    retained: HashMap<String, Retained>,
    /// Retained messages and bytes per owning device.
    retained_by: HashMap<(String, String), (usize, usize)>,
    retained_bytes: usize,
    retain_limits: RetainLimits,
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
    fn unretain(&mut self, topic: &str) {
        if let Some(old) = self.retained.remove(topic) {
            let size = old.message.size();
            self.retained_bytes = self.retained_bytes.saturating_sub(size);
            if let Some(owner) = old.owner {
                if let Some(c) = self.retained_by.get_mut(&owner) {
                    c.0 = c.0.saturating_sub(1);
                    c.1 = c.1.saturating_sub(size);
                    if c.0 == 0 {
                        self.retained_by.remove(&owner);
                    }
                }
            }
        }
    }

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

    /// A router whose retained messages are bounded.
    pub fn with_retain_limits(limits: RetainLimits) -> Self {
        let r = Self::default();
        r.write().retain_limits = limits;
        r
    }

    /// Registers a session that receives deliveries through `tx`.
    pub fn register(&self, tx: mpsc::Sender<Delivery>) -> SessionId {
        self.register_with(tx, None)
    }

    /// Registers a session whose queue is also bounded in bytes by `budget`.
    pub fn register_with(
        &self,
        tx: mpsc::Sender<Delivery>,
        budget: Option<Arc<QueueBudget>>,
    ) -> SessionId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.write().sessions.insert(
            id,
            SessionEntry {
                tx,
                filters: HashMap::new(),
                budget,
            },
        );
        id
    }

    /// True when the session holds this exact filter.
    pub fn has_filter(&self, sid: SessionId, filter: &str) -> bool {
        self.read()
            .sessions
            .get(&sid)
            .is_some_and(|e| e.filters.contains_key(filter))
    }

    /// Keeps `message` as the retained message of its topic for `owner` (an empty payload
    /// clears it), within the device's limits (`max_count`, `max_bytes`) and the server's.
    pub fn retain(
        &self,
        owner: (&str, &str),
        message: &Message,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<(), RetainRefused> {
        let mut inner = self.write();
        if message.payload.is_empty() {
            inner.unretain(&message.topic);
            return Ok(());
        }
        let key = (owner.0.to_owned(), owner.1.to_owned());
        let size = message.size();
        // What the device and the server would hold once this replaces the topic's message.
        let replaced = inner.retained.get(&message.topic).map(|r| {
            let same_owner = r.owner.as_ref() == Some(&key);
            (r.message.size(), same_owner)
        });
        let (mine_count, mine_bytes) = inner.retained_by.get(&key).copied().unwrap_or((0, 0));
        let (mut dev_count, mut dev_bytes) = (mine_count + 1, mine_bytes + size);
        let (mut all_count, mut all_bytes) =
            (inner.retained.len() + 1, inner.retained_bytes + size);
        if let Some((old, same_owner)) = replaced {
            all_count -= 1;
            all_bytes -= old;
            if same_owner {
                dev_count -= 1;
                dev_bytes -= old;
            }
        }
        if dev_count > max_count || dev_bytes > max_bytes {
            return Err(RetainRefused::Device {
                count: mine_count,
                bytes: mine_bytes,
                max_count,
                max_bytes,
            });
        }
        let l = inner.retain_limits;
        if all_count > l.total || all_bytes > l.total_bytes {
            return Err(RetainRefused::Server {
                count: inner.retained.len(),
                bytes: inner.retained_bytes,
                max_count: l.total,
                max_bytes: l.total_bytes,
            });
        }
        inner.unretain(&message.topic);
        inner.retained_bytes += size;
        let c = inner.retained_by.entry(key.clone()).or_insert((0, 0));
        c.0 += 1;
        c.1 += size;
        inner.retained.insert(
            message.topic.clone(),
            Retained {
                message: Arc::new(Message {
                    retain: true,
                    ..message.clone()
                }),
                owner: Some(key),
            },
        );
        Ok(())
    }

    /// Drops every retained message a device owns (the device, or with `dn` absent its
    /// whole product, was deleted); returns how many.
    pub fn drop_retained_of(&self, pk: &str, dn: Option<&str>) -> usize {
        let mut inner = self.write();
        let owned = |o: &Option<(String, String)>| {
            o.as_ref()
                .is_some_and(|(p, d)| p == pk && dn.is_none_or(|dn| d == dn))
        };
        if !inner.retained_by.keys().any(|k| owned(&Some(k.clone()))) {
            return 0;
        }
        let topics: Vec<String> = inner
            .retained
            .iter()
            .filter(|(_, r)| owned(&r.owner))
            .map(|(t, _)| t.clone())
            .collect();
        for t in &topics {
            inner.unretain(t);
        }
        inner.retained.shrink_to_fit();
        topics.len()
    }

    /// Retained messages and their bytes (in all, or of one device).
    pub fn retained_usage(&self, owner: Option<(&str, &str)>) -> (usize, usize) {
        let inner = self.read();
        match owner {
            None => (inner.retained.len(), inner.retained_bytes),
            Some((pk, dn)) => inner
                .retained_by
                .get(&(pk.to_owned(), dn.to_owned()))
                .copied()
                .unwrap_or((0, 0)),
        }
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
        let levels: Vec<&str> = filter.split('/').collect();
        inner.root.insert(&levels, sid, qos);
        let Some(entry) = inner.sessions.get(&sid) else {
            return 0;
        };
        let mut sent = 0;
        for msg in inner
            .retained
            .values()
            .map(|r| &r.message)
            .filter(|m| topic_matches(filter, &m.topic))
        {
            let d = Delivery {
                message: msg.clone(),
                qos: msg.qos.min(qos),
                retained: true,
            };
            if entry.offer(d) {
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
            // The platform's own retained messages (API, rules) count against the server's
            // total only.
            let mut inner = self.write();
            inner.unretain(&message.topic);
            let l = inner.retain_limits;
            let size = message.size();
            if !message.payload.is_empty()
                && inner.retained.len() < l.total
                && inner.retained_bytes.saturating_add(size) <= l.total_bytes
            {
                inner.retained_bytes += size;
                inner.retained.insert(
                    message.topic.clone(),
                    Retained {
                        message: Arc::new(message.clone()),
                        owner: None,
                    },
                );
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
            if entry.offer(d) {
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
                entry.offer(Delivery {
                    message: message.clone(),
                    qos: message.qos.min(qos),
                    retained: false,
                })
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
