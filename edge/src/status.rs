//! Local status over HTTP: `/healthz`, `/status` (JSON: uplink, queue, each sub-device) and
//! `/metrics` (Prometheus: points polled, errors by kind, queue depth, bytes and drops by
//! reason, uplink state).

use crate::queue::Queue;
use crate::uplink::State;
use axum::extract::State as AxState;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write;
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
#[derive(Debug, Default)]
pub struct Status {
    devices: Mutex<BTreeMap<String, DeviceStatus>>,
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
    Json(json!({
        "uplink": uplink_name(*c.uplink.borrow()),
        "queue": {"depth": q.depth, "bytes": q.bytes, "dropped_full": q.dropped_full, "refused_full": q.refused_full, "dropped_age": q.dropped_age, "truncated_bytes": q.truncated_bytes},
        "devices": devices,
    }))
}

async fn metrics(AxState(c): AxState<Ctx>) -> impl IntoResponse {
    let q = c.queue.lock().map(|q| q.stats()).unwrap_or_default();
    let mut out = String::new();
    let up = u8::from(*c.uplink.borrow() == State::Up);
    let _ = writeln!(
        out,
        "# TYPE ironlink_edge_uplink_up gauge\nironlink_edge_uplink_up {up}"
    );
    for (name, kind, v) in [
        ("ironlink_edge_queue_depth", "gauge", q.depth),
        ("ironlink_edge_queue_bytes", "gauge", q.bytes),
        (
            "ironlink_edge_queue_dropped_full_total",
            "counter",
            q.dropped_full,
        ),
        (
            "ironlink_edge_queue_refused_full_total",
            "counter",
            q.refused_full,
        ),
        (
            "ironlink_edge_queue_dropped_age_total",
            "counter",
            q.dropped_age,
        ),
    ] {
        let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {v}");
    }
    let devices = c.status.snapshot();
    let _ = writeln!(out, "# TYPE ironlink_edge_points_total counter");
    for (name, d) in &devices {
        let _ = writeln!(
            out,
            "ironlink_edge_points_total{{device=\"{name}\"}} {}",
            d.points
        );
    }
    let _ = writeln!(out, "# TYPE ironlink_edge_poll_errors_total counter");
    for (name, d) in &devices {
        for (kind, n) in &d.errors {
            let _ = writeln!(
                out,
                "ironlink_edge_poll_errors_total{{device=\"{name}\",kind=\"{kind}\"}} {n}"
            );
        }
    }
    let _ = writeln!(out, "# TYPE ironlink_edge_writes_total counter");
    for (name, d) in &devices {
        for (result, n) in [("ok", d.writes_ok), ("failed", d.writes_failed)] {
            let _ = writeln!(
                out,
                "ironlink_edge_writes_total{{device=\"{name}\",result=\"{result}\"}} {n}"
            );
        }
    }
    if !c.vehicles.is_empty() {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = writeln!(out, "# TYPE ironlink_edge_terminals gauge");
        for (p, v) in &c.vehicles {
            let _ = writeln!(
                out,
                "ironlink_edge_terminals{{protocol=\"{p}\"}} {}",
                v.connected.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# TYPE ironlink_edge_frames_total counter");
        for (p, v) in &c.vehicles {
            let _ = writeln!(
                out,
                "ironlink_edge_frames_total{{protocol=\"{p}\"}} {}",
                v.frames.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# TYPE ironlink_edge_refused_total counter");
        for (p, v) in &c.vehicles {
            let refused = v.refused.lock().map(|r| r.clone()).unwrap_or_default();
            for (why, n) in refused {
                let _ = writeln!(
                    out,
                    "ironlink_edge_refused_total{{protocol=\"{p}\",reason=\"{why}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "ironlink_edge_refused_total{{protocol=\"{p}\",reason=\"too many terminals\"}} {}",
                v.over_limit.load(Relaxed)
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// The status router.
pub fn router(
    status: Arc<Status>,
    queue: Arc<Mutex<Queue>>,
    uplink: watch::Receiver<State>,
    vehicles: VehicleCounters,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/status", get(status_json))
        .route("/metrics", get(metrics))
        .with_state(Ctx {
            status,
            queue,
            uplink,
            vehicles,
        })
}
