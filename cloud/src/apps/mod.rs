//! Application access: device messages for business servers, by consumer group.
//!
//! Every message a subscription selects is first committed to its group's durable queue, then
//! pushed at once to a connected client of the group ("realtime"). A client has two channels:
//! fresh messages go only to the realtime one; the backlog (messages stored while the group had
//! no client or its clients were full, and messages released, rejected or left unsettled) is
//! replayed by a separate task into the other, which a client reads only when no fresh message
//! waits. So a backlog never delays fresh messages. A message leaves the queue when a client
//! accepts it; nothing accepted by the platform is lost across a restart.

pub mod amqp;
pub mod store;

use crate::metrics::Metrics;
use crate::registry::now_ms;
use crate::storage::{Db, StorageError};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use store::NewRow;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

/// What a subscription may select.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// Property posts.
    Property,
    /// Event posts.
    Event,
    /// Raw uplinks (`up_raw`).
    Raw,
    /// Custom topics (`/{pk}/{dn}/user/...`).
    Custom,
    /// Online/offline changes (`/as/mqtt/status/{pk}/{dn}`). Kept at the bit that stored
    /// bindings named `lifecycle` before that name took Alibaba's meaning.
    Status,
    /// Sub-devices added to or removed from a gateway.
    Topology,
    /// Devices' replies to calls.
    ServiceReply,
    /// Devices created, deleted, enabled or disabled (`/{pk}/{dn}/thing/lifecycle`).
    Lifecycle,
    /// OTA: upgrade state changes (`/{pk}/{dn}/ota/upgrade`) and reported module versions
    /// (`/{pk}/{dn}/ota/version/post`).
    Ota,
}

impl MessageType {
    /// Every type, with its name in the API.
    pub const ALL: [(MessageType, &'static str); 9] = [
        (Self::Property, "property"),
        (Self::Event, "event"),
        (Self::Raw, "raw"),
        (Self::Custom, "custom"),
        (Self::Status, "status"),
        (Self::Lifecycle, "lifecycle"),
        (Self::Topology, "topology"),
        (Self::ServiceReply, "service_reply"),
        (Self::Ota, "ota"),
    ];

    /// Said when a binding names `lifecycle`: until release 0.3 it also takes `status`.
    pub const LIFECYCLE_ALIAS_WARNING: &'static str = "`lifecycle` now means Alibaba's device lifecycle (created, deleted, enabled, disabled); until release 0.3 it also delivers online/offline `status` messages as it did before: name `status` for those";

    fn bit(self) -> u32 {
        1 << (self as u32)
    }

    /// The type named `s` (`upstream` is property + event + raw + custom).
    pub fn parse_list(list: &[String]) -> Result<u32, String> {
        let mut mask = 0;
        for s in list {
            if s == "upstream" {
                mask |=
                    Self::Property.bit() | Self::Event.bit() | Self::Raw.bit() | Self::Custom.bit();
                continue;
            }
            if s == "lifecycle" {
                // Deprecated alias: the old name of `status` (see LIFECYCLE_ALIAS_WARNING).
                mask |= Self::Lifecycle.bit() | Self::Status.bit();
                continue;
            }
            match Self::ALL.iter().find(|(_, n)| n == s) {
                Some((t, _)) => mask |= t.bit(),
                None => {
                    return Err(format!(
                        "message type `{s}` is unknown: use upstream, {}",
                        Self::ALL
                            .iter()
                            .map(|(_, n)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
        }
        if mask == 0 {
            return Err("message_types must name at least one type".into());
        }
        Ok(mask)
    }

    /// The names in a mask, comma-separated (as stored).
    pub fn names(mask: u32) -> String {
        Self::ALL
            .iter()
            .filter(|(t, _)| mask & t.bit() != 0)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A device message for applications.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The device's product.
    pub product_key: String,
    /// What it is.
    pub kind: MessageType,
    /// Topic shown to applications.
    pub topic: String,
    /// Body.
    pub payload: Vec<u8>,
    /// ms since the Unix epoch.
    pub generated_at: i64,
}

/// Messages the platform itself generates (online/offline status, device lifecycle): each
/// goes to the router's MQTT subscribers at once, and, when a consumer group takes its kind,
/// into one batch that [`Notices::commit`] queues for the groups (and the rules).
#[derive(Debug)]
pub struct Notices<'a> {
    apps: &'a Apps,
    router: &'a crate::router::Router,
    batch: Vec<Outgoing>,
}

impl<'a> Notices<'a> {
    /// An empty batch.
    pub fn new(apps: &'a Apps, router: &'a crate::router::Router) -> Self {
        Self {
            apps,
            router,
            batch: Vec::new(),
        }
    }

    /// Publishes one notice on `topic` and keeps it for the groups that take `kind`.
    pub fn push(&mut self, pk: &str, kind: MessageType, topic: String, body: String, at: i64) {
        if self.apps.wants(pk, kind) {
            self.batch.push(Outgoing {
                product_key: pk.to_owned(),
                kind,
                topic: topic.clone(),
                payload: body.clone().into_bytes(),
                generated_at: at,
            });
        }
        self.router.publish(crate::router::Message {
            topic,
            payload: body.into(),
            qos: 0,
            retain: false,
        });
    }

    /// Queues the kept notices for the groups; false when they could not be queued.
    pub async fn commit(self) -> bool {
        self.batch.is_empty() || self.apps.publish_many(self.batch).await
    }
}

/// A message delivered to a client of a group.
#[derive(Debug, Clone)]
pub struct AppMessage {
    /// Queue row: what [`Consumer::settle`] takes.
    pub id: i64,
    /// Topic.
    pub topic: String,
    /// Message id, the same in every group (duplicates carry the same one).
    pub message_id: String,
    /// Body.
    pub payload: Bytes,
    /// ms since the Unix epoch.
    pub generated_at: i64,
    /// True when replayed from the backlog.
    pub replayed: bool,
}

/// A Prometheus counter: name, help, and the atomic it reads.
type Series = (&'static str, &'static str, fn(&GroupCounters) -> &AtomicU64);

/// Counters of one group.
#[derive(Debug, Default)]
pub struct GroupCounters {
    /// Messages pushed in real time.
    pub pushed: AtomicU64,
    /// Messages replayed from the backlog.
    pub replayed: AtomicU64,
    /// Messages accepted by a client.
    pub acknowledged: AtomicU64,
    /// Messages released, rejected or unsettled at a disconnect, to be delivered again.
    pub redelivered: AtomicU64,
    /// Dropped because older than the queue's age bound.
    pub dropped_age: AtomicU64,
    /// Dropped because the queue was over its size bound.
    pub dropped_size: AtomicU64,
    /// Queued now, and the oldest one's age in ms (refreshed by the sweeper).
    pub backlog: AtomicU64,
    /// Age of the oldest queued message, ms.
    pub backlog_age_ms: AtomicU64,
}

#[derive(Debug)]
struct Client {
    id: u64,
    realtime: mpsc::Sender<AppMessage>,
    backlog: mpsc::Sender<AppMessage>,
}

#[derive(Debug, Default)]
struct Group {
    clients: Vec<Client>,
    /// Row id to the client holding it unsettled.
    inflight: HashMap<i64, u64>,
    /// Accepted, not yet removed from the queue by the acker: the replay skips them.
    accepted: HashSet<i64>,
    /// While the replay works through a page read from the database, ids the acker removed
    /// from the database wait here (still in `accepted`): the page may hold them.
    deleted: Vec<i64>,
    /// The replay holds a page.
    paging: bool,
    next: usize,
    wake: Arc<Notify>,
    replayer: bool,
}

struct Job {
    rows: Vec<NewRow>,
    done: oneshot::Sender<bool>,
}

/// Settings of the queue.
#[derive(Debug, Clone)]
pub struct QueueLimits {
    /// Messages older than this are dropped.
    pub max_age: Duration,
    /// Most messages kept per group.
    pub max_messages: i64,
    /// Capacity of a client's realtime channel.
    pub realtime_window: usize,
}

/// Application access, shared.
#[derive(Debug)]
pub struct Apps {
    db: Db,
    limits: QueueLimits,
    subs: RwLock<HashMap<String, Vec<(String, u32)>>>,
    keys: RwLock<HashMap<String, String>>,
    group_ids: RwLock<HashSet<String>>,
    groups: Mutex<HashMap<String, Group>>,
    counters: RwLock<HashMap<String, Arc<GroupCounters>>>,
    tx: mpsc::Sender<Job>,
    acks: mpsc::Sender<(String, i64)>,
    next_message_id: AtomicU64,
    next_client: AtomicU64,
    metrics: Arc<Metrics>,
    /// Highest queue row id the writer has finished offering in real time: the replay leaves
    /// rows above it to the writer (else a fresh message could go out twice, once from each).
    offered: AtomicI64,
    /// The rules engine, which sees every device message consumer groups could (set once at
    /// start, after the thing layer it acts through exists).
    rules: std::sync::OnceLock<Arc<crate::rules::Engine>>,
    /// Internal groups (durable rules): group, topic filter, message types. A message on a
    /// matching topic is committed to the group's queue like any group's.
    internal: RwLock<Vec<(String, String, u32)>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("rows", &self.rows.len())
            .finish()
    }
}

impl Apps {
    /// Loads subscriptions and starts the queue writer and the retention sweeper.
    pub async fn start(
        db: Db,
        limits: QueueLimits,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Result<(Arc<Self>, Vec<JoinHandle<()>>), StorageError> {
        let (tx, rx) = mpsc::channel(16_384);
        let (acks, acks_rx) = mpsc::channel(65_536);
        let apps = Arc::new(Self {
            db,
            limits,
            subs: RwLock::default(),
            keys: RwLock::default(),
            group_ids: RwLock::default(),
            groups: Mutex::default(),
            counters: RwLock::default(),
            tx,
            acks,
            // Message ids start from the clock so that they never repeat across restarts.
            next_message_id: AtomicU64::new(u64::try_from(now_ms()).unwrap_or(0) * 1000),
            next_client: AtomicU64::new(1),
            metrics,
            offered: AtomicI64::new(0),
            rules: std::sync::OnceLock::new(),
            internal: RwLock::default(),
        });
        // Rows queued before this start are the replay's from the first moment.
        apps.offered
            .store(apps.db.max_app_message_id().await?, Ordering::Relaxed);
        apps.reload().await?;
        let writer = tokio::spawn(writer(apps.clone(), rx, stop.clone()));
        let acker = tokio::spawn(acker(apps.clone(), acks_rx, stop.clone()));
        let sweeper = tokio::spawn(sweep(apps.clone(), stop));
        Ok((apps, vec![writer, acker, sweeper]))
    }

    /// The secret of an access key (cached: authentication must not wait for the database).
    pub fn secret(&self, access_key_id: &str) -> Option<String> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(access_key_id)
            .cloned()
    }

    /// True when the consumer group exists.
    pub fn group_exists(&self, group: &str) -> bool {
        self.group_ids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(group)
    }

    /// Reloads access keys, groups and subscriptions (after the API changed them).
    pub async fn reload(&self) -> Result<(), StorageError> {
        let keys = self
            .db
            .list_access_keys()
            .await?
            .into_iter()
            .map(|k| (k.access_key_id, k.access_key_secret))
            .collect();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        let groups = self
            .db
            .list_groups()
            .await?
            .into_iter()
            .map(|g| g.group_id)
            .collect();
        *self.group_ids.write().unwrap_or_else(|e| e.into_inner()) = groups;
        let mut map: HashMap<String, Vec<(String, u32)>> = HashMap::new();
        for s in self.db.list_subscriptions().await? {
            let types: Vec<String> = s.message_types.split(',').map(str::to_owned).collect();
            let mask = MessageType::parse_list(&types).unwrap_or(0);
            map.entry(s.product_key)
                .or_default()
                .push((s.group_id, mask));
        }
        *self.subs.write().unwrap_or_else(|e| e.into_inner()) = map;
        Ok(())
    }

    /// Counters of a group.
    pub fn counters(&self, group: &str) -> Arc<GroupCounters> {
        if let Some(c) = self
            .counters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
        {
            return c.clone();
        }
        self.counters
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(group.to_owned())
            .or_default()
            .clone()
    }

    /// Copies the per-group counters, labelled `group`, into the registry.
    pub fn export_metrics(&self, r: &ironlink_telemetry::Registry) {
        let counters: Vec<(String, Arc<GroupCounters>)> = self
            .counters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(g, c)| (g.clone(), c.clone()))
            .collect();
        let series: [Series; 6] = [
            (
                "ironlink_group_pushed_total",
                "Messages pushed to a group's clients in real time",
                |c| &c.pushed,
            ),
            (
                "ironlink_group_replayed_total",
                "Messages replayed from a group's backlog",
                |c| &c.replayed,
            ),
            (
                "ironlink_group_acknowledged_total",
                "Messages a group's clients acknowledged",
                |c| &c.acknowledged,
            ),
            (
                "ironlink_group_redelivered_total",
                "Messages delivered again after a client left them unsettled",
                |c| &c.redelivered,
            ),
            (
                "ironlink_group_dropped_age_total",
                "Messages dropped from a group's queue for their age",
                |c| &c.dropped_age,
            ),
            (
                "ironlink_group_dropped_size_total",
                "Messages dropped from a group's full queue",
                |c| &c.dropped_size,
            ),
        ];
        for (g, c) in &counters {
            let labels = [("group", g.as_str())];
            for (name, help, get) in series {
                r.set_counter(name, help, &labels, get(c).load(Ordering::Relaxed));
            }
            r.set_gauge(
                "ironlink_group_backlog",
                "Messages waiting in a group's queue",
                &labels,
                c.backlog.load(Ordering::Relaxed) as f64,
            );
            r.set_gauge(
                "ironlink_group_backlog_age_seconds",
                "Age of the oldest message in a group's queue, in seconds",
                &labels,
                c.backlog_age_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            );
            r.set_gauge(
                "ironlink_group_clients",
                "Clients attached to a group",
                &labels,
                self.clients(g) as f64,
            );
        }
    }

    /// Connected clients of a group.
    pub fn clients(&self, group: &str) -> usize {
        self.lock().get(group).map_or(0, |g| g.clients.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the internal groups: (group, topic filter, message types as
    /// [`MessageType`] bits).
    pub fn set_internal(&self, groups: Vec<(String, String, MessageType)>) {
        let mut merged: Vec<(String, String, u32)> = Vec::new();
        for (g, filter, kind) in groups {
            match merged.iter_mut().find(|(x, f, _)| *x == g && *f == filter) {
                Some(e) => e.2 |= kind.bit(),
                None => merged.push((g, filter, kind.bit())),
            }
        }
        *self.internal.write().unwrap_or_else(|e| e.into_inner()) = merged;
    }

    /// Connects the rules engine.
    pub fn set_rules(&self, engine: Arc<crate::rules::Engine>) {
        let _ = self.rules.set(engine);
    }

    /// True when some group, or a rule, takes `kind` messages of `pk`.
    pub fn wants(&self, pk: &str, kind: MessageType) -> bool {
        if self.rules.get().is_some_and(|r| r.wants(pk, kind)) {
            return true;
        }
        self.subs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pk)
            .is_some_and(|v| v.iter().any(|(_, m)| m & kind.bit() != 0))
    }

    /// Queues a message for every group that takes it and waits for the commit. True when
    /// stored (or no group takes it).
    pub async fn publish(&self, m: Outgoing) -> bool {
        self.publish_many(vec![m]).await
    }

    /// Like [`Apps::publish`] for several messages, committed together.
    pub async fn publish_many(&self, messages: Vec<Outgoing>) -> bool {
        if let Some(rules) = self.rules.get() {
            for m in &messages {
                rules.offer(m);
            }
        }
        let mut rows = Vec::new();
        {
            let subs = self.subs.read().unwrap_or_else(|e| e.into_inner());
            let internal = self.internal.read().unwrap_or_else(|e| e.into_inner());
            for m in messages {
                let groups: Vec<&String> = subs
                    .get(&m.product_key)
                    .into_iter()
                    .flatten()
                    .filter(|(_, mask)| mask & m.kind.bit() != 0)
                    .map(|(g, _)| g)
                    .chain(
                        internal
                            .iter()
                            .filter(|(_, filter, mask)| {
                                mask & m.kind.bit() != 0
                                    && crate::rules::sql::topic_matches(filter, &m.topic)
                            })
                            .map(|(g, _, _)| g),
                    )
                    .collect();
                if groups.is_empty() {
                    continue;
                }
                let message_id = self
                    .next_message_id
                    .fetch_add(1, Ordering::Relaxed)
                    .to_string();
                for g in groups {
                    rows.push(NewRow {
                        group_id: g.clone(),
                        topic: m.topic.clone(),
                        message_id: message_id.clone(),
                        payload: m.payload.clone(),
                        generated_at: m.generated_at,
                    });
                }
            }
        }
        if rows.is_empty() {
            return true;
        }
        let (done, committed) = oneshot::channel();
        if self.tx.send(Job { rows, done }).await.is_err() {
            return false;
        }
        committed.await.unwrap_or(false)
    }

    /// Offers a committed message to a client of its group in real time; false when no client
    /// has room (it stays queued for the backlog replay, which the writer wakes once its
    /// watermark covers the message).
    fn offer(&self, group: &str, m: AppMessage) -> bool {
        let mut groups = self.lock();
        let Some(g) = groups.get_mut(group) else {
            return false;
        };
        let n = g.clients.len();
        for i in 0..n {
            let at = (g.next + i) % n;
            let c = &g.clients[at];
            let id = m.id;
            if c.realtime.try_send(m.clone()).is_ok() {
                g.inflight.insert(id, c.id);
                g.next = (at + 1) % n;
                self.counters(group).pushed.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// Attaches a client to a group.
    pub fn attach(self: &Arc<Self>, group: &str) -> Consumer {
        let (rt_tx, realtime) = mpsc::channel(self.limits.realtime_window.max(1));
        let (bl_tx, backlog) = mpsc::channel(16);
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let spawn = {
            let mut groups = self.lock();
            let g = groups.entry(group.to_owned()).or_default();
            g.clients.push(Client {
                id,
                realtime: rt_tx,
                backlog: bl_tx,
            });
            g.wake.notify_one();
            let spawn = !g.replayer;
            g.replayer = true;
            spawn.then(|| g.wake.clone())
        };
        if let Some(wake) = spawn {
            tokio::spawn(replay(self.clone(), group.to_owned(), wake));
        }
        Consumer {
            apps: self.clone(),
            group: group.to_owned(),
            client: id,
            realtime,
            backlog,
        }
    }

    fn detach(&self, group: &str, client: u64) {
        let mut groups = self.lock();
        if let Some(g) = groups.get_mut(group) {
            g.clients.retain(|c| c.id != client);
            let before = g.inflight.len();
            g.inflight.retain(|_, c| *c != client);
            let returned = (before - g.inflight.len()) as u64;
            if returned > 0 {
                self.counters(group)
                    .redelivered
                    .fetch_add(returned, Ordering::Relaxed);
            }
            g.wake.notify_one();
        }
    }
}

/// A client's end of a group: messages, realtime first.
#[derive(Debug)]
pub struct Consumer {
    apps: Arc<Apps>,
    group: String,
    client: u64,
    realtime: mpsc::Receiver<AppMessage>,
    backlog: mpsc::Receiver<AppMessage>,
}

impl Consumer {
    /// The next message: a fresh one when there is one, else one from the backlog.
    pub async fn next(&mut self) -> Option<AppMessage> {
        tokio::select! {
            biased;
            m = self.realtime.recv() => m,
            m = self.backlog.recv() => m,
        }
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Settles a message: accepted ones leave the queue; anything else is delivered again,
    /// possibly to another client.
    pub async fn settle(&self, id: i64, accepted: bool) -> Result<(), StorageError> {
        let counters = self.apps.counters(&self.group);
        if accepted {
            // Deleted in batches by the acker; a crash before that redelivers (same message id).
            if self.apps.acks.send((self.group.clone(), id)).await.is_err() {
                self.apps.db.ack_app_messages(&[id]).await?;
            }
            let mut groups = self.apps.lock();
            if let Some(g) = groups.get_mut(&self.group) {
                g.inflight.remove(&id);
                g.accepted.insert(id);
            }
            counters.acknowledged.fetch_add(1, Ordering::Relaxed);
        } else {
            let mut groups = self.apps.lock();
            if let Some(g) = groups.get_mut(&self.group) {
                g.inflight.remove(&id);
                g.wake.notify_one();
            }
            counters.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Whatever this client held unsettled goes back to the group.
        self.apps.detach(&self.group, self.client);
    }
}

async fn writer(apps: Arc<Apps>, mut rx: mpsc::Receiver<Job>, mut stop: watch::Receiver<bool>) {
    let mut jobs = Vec::with_capacity(256);
    loop {
        let stopping = match crate::batch::next_batch(&mut rx, &mut jobs, 256, &mut stop).await {
            crate::batch::Batch::Closed => return,
            crate::batch::Batch::More => false,
            crate::batch::Batch::Last => true,
        };
        let rows: Vec<NewRow> = jobs.iter().flat_map(|j| j.rows.iter().cloned()).collect();
        let mut stored = None;
        for attempt in 0..3u32 {
            match apps.db.enqueue_app_messages(&rows).await {
                Ok(ids) => {
                    stored = Some(ids);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "queueing application messages failed, retrying");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
            }
        }
        let ok = stored.is_some();
        if let Some(ids) = stored {
            let top = ids.iter().copied().max().unwrap_or(0);
            let mut missed = HashSet::new();
            for (row, id) in rows.into_iter().zip(ids) {
                let m = AppMessage {
                    id,
                    topic: row.topic,
                    message_id: row.message_id,
                    payload: Bytes::from(row.payload),
                    generated_at: row.generated_at,
                    replayed: false,
                };
                if !apps.offer(&row.group_id, m) {
                    missed.insert(row.group_id);
                }
            }
            apps.offered.fetch_max(top, Ordering::Relaxed);
            let groups = apps.lock();
            for g in missed.iter().filter_map(|g| groups.get(g)) {
                g.wake.notify_one();
            }
        } else {
            Metrics::inc(&apps.metrics.thing_store_failures);
        }
        for j in jobs.drain(..) {
            let _ = j.done.send(ok);
        }
        if stopping {
            return;
        }
    }
}

/// Removes accepted messages from the queue in batches.
async fn acker(
    apps: Arc<Apps>,
    mut rx: mpsc::Receiver<(String, i64)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ids = Vec::with_capacity(1024);
    loop {
        let stopping = match crate::batch::next_batch(&mut rx, &mut ids, 1024, &mut stop).await {
            crate::batch::Batch::Closed => return,
            crate::batch::Batch::More => false,
            crate::batch::Batch::Last => true,
        };
        let rows: Vec<i64> = ids.iter().map(|(_, id)| *id).collect();
        if let Err(e) = apps.db.ack_app_messages(&rows).await {
            // They stay queued and are delivered again: a duplicate, never a loss.
            tracing::warn!(error = %e, count = ids.len(), "removing accepted application messages failed");
        }
        // Gone from the queue (or to be delivered again): the replay no longer skips them.
        {
            let mut groups = apps.lock();
            for (g, id) in ids.drain(..) {
                if let Some(g) = groups.get_mut(&g) {
                    if g.paging {
                        g.deleted.push(id);
                    } else {
                        g.accepted.remove(&id);
                    }
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Replays a group's backlog into its clients' backlog channels while it has clients.
async fn replay(apps: Arc<Apps>, group: String, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let mut cursor = 0i64;
        'pages: loop {
            if apps.clients(&group) == 0 {
                break;
            }
            paging(&apps, &group, true);
            let page = match apps.db.app_backlog(&group, cursor, 100).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%group, error = %e, "reading the backlog failed");
                    break;
                }
            };
            if page.is_empty() {
                break;
            }
            for row in page {
                if row.id > apps.offered.load(Ordering::Relaxed) {
                    // Being offered by the writer right now; it wakes us if it could not.
                    break 'pages;
                }
                // A client with room: wait for one, round robin.
                let Some((client, permit)) = reserve(&apps, &group).await else {
                    break 'pages;
                };
                {
                    let mut groups = apps.lock();
                    let Some(g) = groups.get_mut(&group) else {
                        break 'pages;
                    };
                    cursor = row.id;
                    if g.inflight.contains_key(&row.id) || g.accepted.contains(&row.id) {
                        continue;
                    }
                    g.inflight.insert(row.id, client);
                }
                permit.send(AppMessage {
                    id: row.id,
                    topic: row.topic,
                    message_id: row.message_id,
                    payload: Bytes::from(row.payload),
                    generated_at: row.generated_at,
                    replayed: true,
                });
                apps.counters(&group)
                    .replayed
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        paging(&apps, &group, false);
    }
}

/// The replay starts reading a page (`on`) or stops paging: either way, ids the acker removed
/// from the database meanwhile can no longer be in a page still to come, and leave `accepted`.
fn paging(apps: &Apps, group: &str, on: bool) {
    let mut groups = apps.lock();
    if let Some(g) = groups.get_mut(group) {
        for id in std::mem::take(&mut g.deleted) {
            g.accepted.remove(&id);
        }
        g.paging = on;
    }
}

/// Waits (up to 1 s per try) for room in some client's backlog channel.
async fn reserve(apps: &Apps, group: &str) -> Option<(u64, mpsc::OwnedPermit<AppMessage>)> {
    loop {
        let candidates: Vec<(u64, mpsc::Sender<AppMessage>)> = {
            let mut groups = apps.lock();
            let g = groups.get_mut(group)?;
            if g.clients.is_empty() {
                return None;
            }
            g.next = (g.next + 1) % g.clients.len();
            let n = g.clients.len();
            (0..n)
                .map(|i| &g.clients[(g.next + i) % n])
                .map(|c| (c.id, c.backlog.clone()))
                .collect()
        };
        for (id, tx) in &candidates {
            if let Ok(p) = tx.clone().try_reserve_owned() {
                return Some((*id, p));
            }
        }
        let (id, tx) = candidates.into_iter().next()?;
        if let Ok(Ok(p)) = tokio::time::timeout(Duration::from_secs(1), tx.reserve_owned()).await {
            return Some((id, p));
        }
    }
}

/// Drops what is past the queue's bounds every 10 s, counted by reason, and refreshes the
/// backlog gauges.
async fn sweep(apps: Arc<Apps>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let cutoff =
            now_ms() - i64::try_from(apps.limits.max_age.as_millis()).unwrap_or(i64::MAX / 2);
        match apps.db.expire_app_messages(cutoff).await {
            Ok(dropped) => {
                for (g, n) in dropped {
                    tracing::warn!(group = %g, dropped = n, "application messages dropped: older than the queue's age bound");
                    apps.counters(&g)
                        .dropped_age
                        .fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiring application messages failed"),
        }
        match apps.db.trim_app_messages(apps.limits.max_messages).await {
            Ok(dropped) => {
                for (g, n) in dropped {
                    tracing::warn!(group = %g, dropped = n, "application messages dropped: queue over its size bound");
                    apps.counters(&g)
                        .dropped_size
                        .fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = %e, "trimming application queues failed"),
        }
        if let Ok(stats) = apps.db.app_backlog_stats().await {
            for c in apps
                .counters
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
            {
                c.backlog.store(0, Ordering::Relaxed);
                c.backlog_age_ms.store(0, Ordering::Relaxed);
            }
            let now = now_ms();
            for (g, n, oldest) in stats {
                let c = apps.counters(&g);
                c.backlog
                    .store(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
                c.backlog_age_ms
                    .store(u64::try_from(now - oldest).unwrap_or(0), Ordering::Relaxed);
            }
        }
    }
}
