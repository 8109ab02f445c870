//! Presence: every online/offline change is stored with its reason and emitted as a
//! `status` message (Alibaba's name), on the router topic `/as/mqtt/status/{pk}/{dn}`, to the
//! consumer groups and rules that take it, and on an in-process broadcast channel.
//!
//! Writes are batched by one task so that a connection storm costs one transaction per batch,
//! not two statements per connect.

use crate::apps::{Apps, MessageType};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::storage::{Db, PresenceEvent};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Why a device went offline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfflineReason {
    /// The client sent DISCONNECT.
    CleanDisconnect,
    /// Nothing arrived within 1.5 times the keepalive.
    KeepaliveTimeout,
    /// The API disabled or deleted the device.
    Kicked(String),
    /// A malformed, oversize or out-of-order packet.
    ProtocolError(String),
    /// A new connection with the same identity took over.
    Replaced,
    /// The socket closed or failed without DISCONNECT.
    ConnectionLost(String),
    /// Too many refused publishes or subscribes.
    AclViolations,
    /// The server is shutting down.
    ServerShutdown,
    /// The server could not store what the device sent; it was not acknowledged.
    StorageFailed,
}

impl std::fmt::Display for OfflineReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CleanDisconnect => f.write_str("clean disconnect"),
            Self::KeepaliveTimeout => f.write_str("keepalive timeout"),
            Self::Kicked(why) => write!(f, "kicked: {why}"),
            Self::ProtocolError(why) => write!(f, "protocol error: {why}"),
            Self::Replaced => f.write_str("replaced by a new connection with the same identity"),
            Self::ConnectionLost(why) => write!(f, "connection lost: {why}"),
            Self::AclViolations => f.write_str("too many ACL violations"),
            Self::ServerShutdown => f.write_str("server shutdown"),
            Self::StorageFailed => {
                f.write_str("storage failed: the unacknowledged message will be resent")
            }
        }
    }
}

/// A change and, for durable records, who waits for its commit.
type Queued = (PresenceEvent, Option<oneshot::Sender<()>>);

/// Handle for recording presence changes.
#[derive(Debug, Clone)]
pub struct Presence {
    tx: mpsc::Sender<Queued>,
    lifecycle: broadcast::Sender<PresenceEvent>,
}

impl Presence {
    /// Starts the writer task. It ends, after storing what is queued, when `stop` turns true
    /// or every [`Presence`] handle is dropped.
    pub fn start(
        db: Db,
        router: Arc<Router>,
        metrics: Arc<Metrics>,
        apps: Arc<Apps>,
        stop: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(65_536);
        let (lifecycle, _) = broadcast::channel(1024);
        let task = tokio::spawn(writer(
            db,
            rx,
            router,
            metrics,
            apps,
            lifecycle.clone(),
            stop,
        ));
        (Self { tx, lifecycle }, task)
    }

    /// Records a change (waits only when 65,536 changes are already queued).
    pub async fn record(&self, event: PresenceEvent) {
        // The writer lives as long as any handle, so this only fails during shutdown.
        let _ = self.tx.send((event, None)).await;
    }

    /// Records a change and waits until the batch holding it is committed, so that what a
    /// device is told (CONNACK) survives a kill -9. False when it could not be stored.
    pub async fn record_durable(&self, event: PresenceEvent) -> bool {
        let (done, committed) = oneshot::channel();
        if self.tx.send((event, Some(done))).await.is_err() {
            return false;
        }
        committed.await.is_ok()
    }

    /// Subscribes to lifecycle events as they are stored.
    pub fn subscribe(&self) -> broadcast::Receiver<PresenceEvent> {
        self.lifecycle.subscribe()
    }
}

async fn writer(
    db: Db,
    mut rx: mpsc::Receiver<Queued>,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    apps: Arc<Apps>,
    lifecycle: broadcast::Sender<PresenceEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(1024);
    loop {
        let stopping = match crate::batch::next_batch(&mut rx, &mut batch, 1024, &mut stop).await {
            crate::batch::Batch::Closed => return,
            crate::batch::Batch::More => false,
            crate::batch::Batch::Last => true,
        };
        // Split without copying: the events to store, and who waits for their commit.
        let (events, waiters): (Vec<PresenceEvent>, Vec<Option<oneshot::Sender<()>>>) =
            batch.drain(..).unzip();
        let mut stored = false;
        for attempt in 0..5u32 {
            match db.record_presence(&events).await {
                Ok(()) => {
                    stored = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, events = events.len(), "storing presence failed, retrying");
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
            }
        }
        if !stored {
            tracing::error!(
                events = events.len(),
                "presence events lost after 5 attempts"
            );
            metrics
                .presence_lost
                .fetch_add(events.len() as u64, Ordering::Relaxed);
        }
        if stored {
            for w in waiters.into_iter().flatten() {
                let _ = w.send(());
            }
        }
        let mut notices = crate::apps::Notices::new(&apps, &router);
        for e in events {
            let payload = serde_json::json!({
                "status": e.status,
                "productKey": e.product_key,
                "deviceName": e.device_name,
                "time": e.at,
                "clientIp": e.client_addr,
                "reason": e.reason,
            });
            let topic = format!(
                "{}{}/{}",
                ironlink_shared::STATUS_TOPIC_PREFIX,
                e.product_key,
                e.device_name
            );
            notices.push(
                &e.product_key,
                MessageType::Status,
                topic,
                payload.to_string(),
                e.at,
            );
            let _ = lifecycle.send(e);
        }
        if !notices.commit().await {
            tracing::error!("status messages for consumer groups could not be queued");
        }
        if stopping {
            return;
        }
    }
}
