//! Device access: MQTT listeners over TCP and TLS, a connect rate limiter, Alink
//! authentication, and the per-device ACL in front of the router.

pub mod auth;
pub mod limits;
pub mod session;
pub mod sessions;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::router::Router;
use crate::storage::Db;
use sessions::Sessions;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// What every connection shares.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub config: Arc<Config>,
    /// Registry storage.
    pub db: Db,
    /// Message router.
    pub router: Arc<Router>,
    /// Live sessions by identity.
    pub sessions: Arc<Sessions>,
    /// Presence recorder.
    pub presence: Presence,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Thing model, services, shadows and gateways.
    pub thing: Arc<crate::thing::Thing>,
    /// Application access.
    pub apps: Arc<crate::apps::Apps>,
    /// Rules engine and data-parsing scripts.
    pub rules: Arc<crate::rules::Engine>,
    /// Over-the-air updates.
    pub ota: Arc<crate::ota::Ota>,
    /// Time-series storage: policies, sealing, queries.
    pub tsdb: Arc<crate::tsdb::Tsdb>,
    /// Analytics jobs.
    pub jobs: Arc<crate::jobs::Jobs>,
    /// Anomaly monitors.
    pub monitors: Arc<crate::jobs::monitor::Monitors>,
    /// Bound device ports, set once the listeners are up.
    pub listeners: std::sync::OnceLock<Listeners>,
}

/// The ports devices connect to, as bound (a configured port 0 becomes the real one).
#[derive(Debug, Clone, Copy, Default)]
pub struct Listeners {
    /// Plain MQTT (securemode=3).
    pub mqtt: Option<u16>,
    /// MQTT over TLS (securemode=2).
    pub mqtts: Option<u16>,
}

/// Gives freed heap memory back to the operating system (glibc keeps freed pages of its
/// arenas otherwise, so RSS would stay at a flood's peak after the flood is gone). At most
/// once a second, off the async threads.
pub fn release_memory() {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = crate::registry::now_ms() as u64;
    let last = LAST.load(Ordering::Relaxed);
    if now.saturating_sub(last) < 1000
        || LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    tokio::task::spawn_blocking(ironlink_telemetry::os::release_memory);
}

/// Token bucket for new connections.
#[derive(Debug)]
pub struct ConnectLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl ConnectLimiter {
    /// `rate` connections per second with a burst of `burst`.
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate.max(1)),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes a token at time `now`; false when the bucket is empty.
    pub fn try_acquire(&self, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Accepts connections until `shutdown` turns true. With `tls`, each connection is a TLS
/// session (Alink securemode 2); the handshake counts against the connect timeout.
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limiter: Arc<ConnectLimiter>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        Metrics::inc(&shared.metrics.accepted);
        let over_cap = usize::try_from(shared.metrics.connections.load(Ordering::Relaxed))
            .unwrap_or(0)
            >= shared.config.mqtt.max_connections;
        if over_cap || !limiter.try_acquire(Instant::now()) {
            Metrics::inc(&shared.metrics.rate_limited);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let deadline = Instant::now() + shared.config.mqtt.connect_timeout;
        // Separate tasks per transport: one async block serving both would size every plain
        // TCP connection's task for the larger TLS stream.
        match &tls {
            None => {
                tokio::spawn(session::serve(
                    shared.clone(),
                    stream,
                    peer,
                    false,
                    deadline,
                ));
            }
            Some(acceptor) => {
                tokio::spawn(tls_then_serve(
                    shared.clone(),
                    acceptor.clone(),
                    stream,
                    peer,
                    deadline,
                ));
            }
        }
    }
}

async fn tls_then_serve(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    deadline: Instant,
) {
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(s)) => session::serve(shared, s, peer, true, deadline).await,
        Ok(Err(e)) => {
            Metrics::inc(&shared.metrics.protocol_errors);
            tracing::info!(%peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            Metrics::inc(&shared.metrics.connect_timeouts);
            tracing::info!(%peer, "TLS handshake timed out");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn limiter_refills_at_rate_and_caps_at_burst() {
        let l = ConnectLimiter::new(10, 5);
        let t0 = Instant::now();
        assert_eq!((0..20).filter(|_| l.try_acquire(t0)).count(), 5);
        assert!(l.try_acquire(t0 + Duration::from_millis(100)));
        assert!(!l.try_acquire(t0 + Duration::from_millis(100)));
        assert_eq!(
            (0..20)
                .filter(|_| l.try_acquire(t0 + Duration::from_secs(60)))
                .count(),
            5
        );
    }
}
