//! The gateway: one poller task per sub-device appending readings to the queue, a syncer
//! making the queue durable every second, and the uplink draining it.

use crate::config::{Config, Transport, WhenFull};
use crate::now_ms;
use crate::poller::{Poller, Value as Reading};
use crate::queue::{FullPolicy, Limits, Queue, QueueError};
use crate::status::Status;
use crate::uplink::{self, State};
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// A running gateway.
#[derive(Debug)]
pub struct Running {
    /// The queue (for status and tests).
    pub queue: Arc<Mutex<Queue>>,
    /// Uplink state.
    pub uplink: watch::Receiver<State>,
    /// Bound address of the status endpoint, when enabled.
    pub status_addr: Option<std::net::SocketAddr>,
    /// Per-device status.
    pub status: Arc<Status>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops every task and syncs the queue.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if let Ok(mut q) = self.queue.lock() {
            let _ = q.sync();
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The queue could not be opened.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The status listener could not be bound.
    #[error("status listener {addr}: {source}")]
    Status {
        /// Address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Opens the queue and starts the pollers, the syncer, the uplink and the status endpoint.
pub fn start(config: Config) -> Result<Running, StartError> {
    let limits = Limits {
        max_bytes: config.queue.max_bytes,
        max_age_ms: i64::try_from(config.queue.max_age.as_millis()).unwrap_or(i64::MAX),
        policy: match config.queue.when_full {
            WhenFull::DropOldest => FullPolicy::DropOldest,
            WhenFull::RefuseNewest => FullPolicy::RefuseNewest,
        },
        ..Limits::default()
    };
    let queue = Arc::new(Mutex::new(Queue::open(&config.queue.dir, limits)?));
    let config = Arc::new(config);
    let wake = Arc::new(Notify::new());
    let (stop, stop_rx) = watch::channel(false);
    let (state_tx, state) = watch::channel(State::Down);
    let mut tasks = Vec::new();
    let status = Arc::new(Status::default());
    for d in config.devices.clone() {
        tasks.push(tokio::spawn(poll_device(
            d,
            queue.clone(),
            wake.clone(),
            status.clone(),
            stop_rx.clone(),
        )));
    }
    let mut status_addr = None;
    if let Some(addr) = config.status.listen {
        let bound = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| StartError::Status { addr, source })?;
        status_addr = bound.local_addr().ok();
        let app = crate::status::router(status.clone(), queue.clone(), state.clone());
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(bound, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        }));
    }
    {
        let queue = queue.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let q = queue.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Ok(mut q) = q.lock() {
                        if let Err(e) = q.sync() {
                            tracing::error!(error = %e, "queue sync failed");
                        }
                        let _ = q.expire(now_ms());
                    }
                })
                .await;
            }
        }));
    }
    tasks.push(tokio::spawn(uplink::run(
        config.clone(),
        queue.clone(),
        wake,
        state_tx,
        stop_rx,
    )));
    Ok(Running {
        queue,
        uplink: state,
        status_addr,
        status,
        stop,
        tasks,
    })
}

fn to_json(v: &Reading) -> Value {
    match v {
        Reading::Bool(b) => json!(u8::from(*b)),
        Reading::Number(n) => json!(n),
        Reading::Text(s) => json!(s),
    }
}

async fn poll_device(
    d: crate::config::Device,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    status: Arc<Status>,
    mut stop: watch::Receiver<bool>,
) {
    let name = d.name.clone();
    let interval = d.poll_interval;
    let Transport::Tcp(addr) = d.transport.clone() else {
        tracing::error!(device = %name, "Modbus RTU is not implemented yet; device not polled");
        return;
    };
    let mut poller = match Poller::new(d) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(device = %name, error = %e, "point table refused");
            return;
        }
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        let ctx = match addr.parse() {
            Ok(sa) => tokio_modbus::client::tcp::connect(sa)
                .await
                .map_err(|e| e.to_string()),
            Err(_) => Err(format!("`{addr}` is not an address")),
        };
        let mut ctx = match ctx {
            Ok(c) => {
                backoff = Duration::from_millis(200);
                c
            }
            Err(e) => {
                tracing::warn!(device = %name, error = %e, "cannot reach the device");
                status.update(&name, |s| {
                    s.state = "unreachable".into();
                    s.last_error = Some(e.clone());
                    *s.errors.entry("transport").or_default() += 1;
                });
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = now_ms();
            let result = poller.poll(&mut ctx, now).await;
            match &result {
                Ok(r) => status.update(&name, |s| {
                    s.state = "ok".into();
                    s.last_ok_ms = Some(now);
                    s.points += r.len() as u64;
                }),
                Err(e) => status.update(&name, |s| {
                    s.state = "error".into();
                    s.last_error = Some(e.to_string());
                    let kind = match e {
                        crate::poller::PollError::Exception { .. } => "exception",
                        crate::poller::PollError::Timeout(_) => "timeout",
                        crate::poller::PollError::Transport(_) => "transport",
                        crate::poller::PollError::Short { .. } => "short",
                    };
                    *s.errors.entry(kind).or_default() += 1;
                }),
            }
            match result {
                Ok(readings) if readings.is_empty() => {}
                Ok(readings) => {
                    let params: Map<String, Value> = readings
                        .iter()
                        .map(|r| {
                            (
                                r.identifier.clone(),
                                json!({"value": to_json(&r.value), "time": r.ts}),
                            )
                        })
                        .collect();
                    let payload = json!({"dn": name, "params": params}).to_string();
                    let appended = queue.lock().map_err(|_| ()).and_then(|mut q| {
                        q.append(now, payload.as_bytes()).map_err(|e| {
                            tracing::warn!(device = %name, error = %e, "reading not queued");
                        })
                    });
                    if appended.is_ok() {
                        wake.notify_one();
                    }
                }
                Err(crate::poller::PollError::Transport(e)) => {
                    tracing::warn!(device = %name, error = %e, "connection to the device lost");
                    break;
                }
                Err(e) => tracing::warn!(device = %name, error = %e, "poll failed"),
            }
        }
    }
}
