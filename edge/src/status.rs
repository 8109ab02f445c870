//! Local status over HTTP: `/livez` (the process answers), `/healthz` (503 with the reasons
//! while the uplink is down or every polled device is unreachable), `/status` (JSON: uplink,
//! queue, each Modbus device, each run-time sub-device of the JT/T 808, GB/T 32960, LoRaWAN
//! and CoAP servers) and `/metrics` (Prometheus: points polled, errors by kind, device
//! states, queue depth, bytes and drops by reason, uplink state, terminals and refusals).

use crate::queue::Queue;
use crate::uplink::State;
use axum::extract::State as AxState;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// What one sub-device's poller reports.
#[derive(Debug, Clone, Default)]
pub struct DeviceStatus {
    /// `ok`, `unreachable` or `error`.
    pub state: String,
    /// Last successful poll, ms.
    pub last_ok_ms: Option<i64>,
    /// Last error text.
    pub last_error: Option<String>,
    /// Points read.
    pub points: u64,
    /// Errors by kind (`exception`, `timeout`, `transport`, `short`, `unreachable`).
    pub errors: BTreeMap<&'static str, u64>,
    /// Writes from the cloud carried out.
    pub writes_ok: u64,
    /// Writes from the cloud that failed.
    pub writes_failed: u64,
}

/// Status shared by the tasks.
#[derive(Debug)]
pub struct Status {
    devices: Mutex<BTreeMap<String, DeviceStatus>>,
    /// Where `/metrics` series live.
    pub registry: ironlink_telemetry::Registry,
    /// One Modbus poll of one device (every read of its plan), in seconds.
    pub poll_latency: ironlink_telemetry::Latency,
    /// From a reading's PUBLISH to the cloud's PUBACK, in seconds.
    pub uplink_rtt: ironlink_telemetry::Latency,
}

impl Default for Status {
    fn default() -> Self {
        let registry = ironlink_telemetry::Registry::new();
        let poll_latency = registry.histogram(
            "ironlink_edge_modbus_poll_duration_seconds",
            "One Modbus poll of one device (every read of its plan), in seconds",
            &[],
        );
        let uplink_rtt = registry.histogram(
            "ironlink_edge_uplink_ack_duration_seconds",
            "From a reading's PUBLISH to the cloud's PUBACK, in seconds",
            &[],
        );
        Self {
            devices: Mutex::default(),
            registry,
            poll_latency,
            uplink_rtt,
        }
    }
}

impl Status {
    /// Updates one device's status.
    pub fn update(&self, device: &str, f: impl FnOnce(&mut DeviceStatus)) {
        let mut d = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        f(d.entry(device.to_owned()).or_default());
    }

    fn snapshot(&self) -> BTreeMap<String, DeviceStatus> {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The vehicle servers' counters, by protocol.
pub type VehicleCounters = Vec<(&'static str, Arc<crate::vehicle::Counters>)>;

#[derive(Clone)]
struct Ctx {
    status: Arc<Status>,
    queue: Arc<Mutex<Queue>>,
    uplink: watch::Receiver<State>,
    vehicles: VehicleCounters,
    subs: Option<Arc<crate::subdevices::SubDevices>>,
}

/// Why the gateway is not healthy; empty when it is.
fn unhealthy(c: &Ctx) -> Vec<String> {
    let mut why = Vec::new();
    let up = *c.uplink.borrow();
    if up != State::Up {
        why.push(format!("uplink is {}", uplink_name(up)));
    }
    let devices = c.status.snapshot();
    let polled: Vec<&DeviceStatus> = devices.values().filter(|d| !d.state.is_empty()).collect();
    if !polled.is_empty() && polled.iter().all(|d| d.state != "ok") {
        why.push(format!(
            "all {} polled devices are unreachable or failing",
            polled.len()
        ));
    }
    why
}

async fn healthz(AxState(c): AxState<Ctx>) -> impl IntoResponse {
    let why = unhealthy(&c);
    if why.is_empty() {
        (axum::http::StatusCode::OK, Json(json!({"status": "ok"})))
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unhealthy", "reasons": why})),
        )
    }
}

fn uplink_name(s: State) -> &'static str {
    match s {
        State::Down => "down",
        State::LoggingIn => "logging-in",
        State::Up => "up",
    }
}

async fn status_json(AxState(c): AxState<Ctx>) -> impl IntoResponse {
    let q = c.queue.lock().map(|q| q.stats()).unwrap_or_default();
    let devices: BTreeMap<String, serde_json::Value> = c
        .status
        .snapshot()
        .into_iter()
        .map(|(k, d)| {
            (k, json!({"state": d.state, "last_ok_ms": d.last_ok_ms, "last_error": d.last_error, "points": d.points, "errors": d.errors, "writes_ok": d.writes_ok, "writes_failed": d.writes_failed}))
        })
        .collect();
    let (routed, known) = c.subs.as_ref().map_or_else(Default::default, |s| {
        (
            s.routed()
                .into_iter()
                .collect::<std::collections::HashSet<_>>(),
            s.known(),
        )
    });
    let sub_devices: BTreeMap<String, serde_json::Value> = known
        .into_iter()
        .map(|(name, pk)| {
            let connected = routed.contains(&name);
            (name, json!({"product_key": pk, "connected": connected}))
        })
        .collect();
    let servers: BTreeMap<&str, serde_json::Value> = c
        .vehicles
        .iter()
        .map(|(p, v)| {
            use std::sync::atomic::Ordering::Relaxed;
            let refused = v.refused.lock().map(|r| r.clone()).unwrap_or_default();
            let skipped = v.skipped.lock().map(|r| r.clone()).unwrap_or_default();
            (*p, json!({"connected": v.connected.load(Relaxed), "frames": v.frames.load(Relaxed), "refused": refused, "skipped": skipped, "over_limit": v.over_limit.load(Relaxed)}))
        })
        .collect();
    let why = unhealthy(&c);
    Json(json!({
        "healthy": why.is_empty(),
        "reasons": why,
        "uplink": uplink_name(*c.uplink.borrow()),
        "queue": {"depth": q.depth, "bytes": q.bytes, "dropped_full": q.dropped_full, "refused_full": q.refused_full, "dropped_age": q.dropped_age, "truncated_bytes": q.truncated_bytes},
        "devices": devices,
        "sub_devices": sub_devices,
        "servers": servers,
    }))
}

async fn metrics(AxState(c): AxState<Ctx>) -> impl IntoResponse {
    let q = c.queue.lock().map(|q| q.stats()).unwrap_or_default();
    let r = &c.status.registry;
    r.set_gauge(
        "ironlink_edge_uplink_up",
        "1 while the uplink to the cloud is up",
        &[],
        f64::from(u8::from(*c.uplink.borrow() == State::Up)),
    );
    r.set_gauge(
        "ironlink_edge_healthy",
        "1 when /healthz answers ok",
        &[],
        f64::from(u8::from(unhealthy(&c).is_empty())),
    );
    r.set_gauge(
        "ironlink_edge_queue_depth",
        "Records waiting in the queue",
        &[],
        q.depth as f64,
    );
    r.set_gauge(
        "ironlink_edge_queue_bytes",
        "Bytes of records waiting in the queue",
        &[],
        q.bytes as f64,
    );
    r.set_counter(
        "ironlink_edge_queue_dropped_full_total",
        "Oldest records dropped because the queue was full",
        &[],
        q.dropped_full,
    );
    r.set_counter(
        "ironlink_edge_queue_refused_full_total",
        "Readings refused because the queue was full",
        &[],
        q.refused_full,
    );
    r.set_counter(
        "ironlink_edge_queue_dropped_age_total",
        "Records dropped for their age",
        &[],
        q.dropped_age,
    );
    for (name, d) in &c.status.snapshot() {
        let device = [("device", name.as_str())];
        r.set_gauge(
            "ironlink_edge_device_up",
            "1 while the device's last poll succeeded",
            &device,
            f64::from(u8::from(d.state == "ok")),
        );
        r.set_counter(
            "ironlink_edge_points_total",
            "Points read from the device",
            &device,
            d.points,
        );
        for (kind, n) in &d.errors {
            r.set_counter(
                "ironlink_edge_poll_errors_total",
                "Failed polls of the device, by kind",
                &[("device", name.as_str()), ("kind", kind)],
                *n,
            );
        }
        for (result, n) in [("ok", d.writes_ok), ("failed", d.writes_failed)] {
            r.set_counter(
                "ironlink_edge_writes_total",
                "Writes from the cloud carried out on the device, by result",
                &[("device", name.as_str()), ("result", result)],
                n,
            );
        }
    }
    {
        use std::sync::atomic::Ordering::Relaxed;
        for (p, v) in &c.vehicles {
            let protocol = [("protocol", *p)];
            r.set_gauge(
                "ironlink_edge_terminals",
                "Terminals or nodes connected now",
                &protocol,
                v.connected.load(Relaxed) as f64,
            );
            r.set_counter(
                "ironlink_edge_frames_total",
                "Frames decoded",
                &protocol,
                v.frames.load(Relaxed),
            );
            const REFUSED: &str = "Frames, messages or connections refused, by reason";
            let refused = v.refused.lock().map(|r| r.clone()).unwrap_or_default();
            for (why, n) in refused {
                r.set_counter(
                    "ironlink_edge_refused_total",
                    REFUSED,
                    &[
                        ("protocol", p),
                        ("reason", &ironlink_telemetry::label_value(why)),
                    ],
                    n,
                );
            }
            r.set_counter(
                "ironlink_edge_refused_total",
                REFUSED,
                &[("protocol", p), ("reason", "too_many_terminals")],
                v.over_limit.load(Relaxed),
            );
            let skipped = v.skipped.lock().map(|r| r.clone()).unwrap_or_default();
            for (what, n) in skipped {
                r.set_counter(
                    "ironlink_edge_skipped_total",
                    "Parts of valid messages passed over on purpose",
                    &[
                        ("protocol", p),
                        ("what", &ironlink_telemetry::label_value(what)),
                    ],
                    n,
                );
            }
        }
    }
    r.export_process("ironlink_edge_build_info", env!("CARGO_PKG_VERSION"));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        r.render(),
    )
}

/// The status router.
pub fn router(
    status: Arc<Status>,
    queue: Arc<Mutex<Queue>>,
    uplink: watch::Receiver<State>,
    vehicles: VehicleCounters,
    subs: Option<Arc<crate::subdevices::SubDevices>>,
) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/healthz", get(healthz))
        .route("/status", get(status_json))
        .route("/metrics", get(metrics))
        .with_state(Ctx {
            status,
            queue,
            uplink,
            vehicles,
            subs,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_the_uplink_and_one_answering_device() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(Mutex::new(
            Queue::open(dir.path(), Default::default()).unwrap(),
        ));
        let (tx, rx) = watch::channel(State::Down);
        let c = Ctx {
            status: Arc::new(Status::default()),
            queue,
            uplink: rx,
            vehicles: Vec::new(),
            subs: None,
        };
        assert_eq!(unhealthy(&c), vec!["uplink is down".to_owned()]);
        tx.send(State::Up).unwrap();
        assert!(unhealthy(&c).is_empty(), "no device polled yet");
        c.status.update("m1", |d| d.state = "unreachable".into());
        c.status.update("m2", |d| d.state = "error".into());
        let why = unhealthy(&c);
        assert!(why[0].contains("all 2 polled devices"), "{why:?}");
        c.status.update("m2", |d| d.state = "ok".into());
        assert!(unhealthy(&c).is_empty());
        let text = c.status.registry.render();
        assert!(
            text.contains("ironlink_edge_modbus_poll_duration_seconds"),
            "{text}"
        );
    }
}
