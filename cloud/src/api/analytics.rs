//! Analytics endpoints: change points of a signal given inline or of a property's stored
//! history (sliding window of two sub-windows, as `ruptures.Window`).

use super::{require_device, ApiError, ApiJson, ApiQuery, ApiResult, ApiState};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use ironlink_analytics::changepoint::{self, CostKind, Stop, Window};
use serde::Deserialize;
use serde_json::{json, Value};

/// Most points one change-point request may look at (a longer history: narrow the range).
pub const MAX_POINTS: usize = 1_000_000;

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/analytics/changepoints", post(changepoints))
        .route(
            "/devices/:pk/:dn/properties/:id/changepoints",
            get(history_changepoints),
        )
}

/// How to look for changes (shared by the inline and the history form).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct Detector {
    /// `l2` (mean shift, default), `normal` (mean and variance shift) or `clinear` (change of
    /// a continuous linear trend).
    #[param(pattern = "^(l2|normal|clinear)$")]
    #[schema(pattern = "^(l2|normal|clinear)$")]
    cost: Option<String>,
    /// Points in the whole window, two sub-windows of half each (default 100; rounded down
    /// to even).
    #[param(minimum = 6, maximum = 100000)]
    #[schema(minimum = 6, maximum = 100000)]
    width: Option<u32>,
    /// Score every `jump`-th point (default 5).
    #[param(minimum = 1, maximum = 10000)]
    #[schema(minimum = 1, maximum = 10000)]
    jump: Option<u32>,
    /// Fewest points between two changes (default 2).
    #[param(minimum = 1, maximum = 10000)]
    #[schema(minimum = 1, maximum = 10000)]
    min_size: Option<u32>,
    /// Take changes while each lowers the total cost by more than this. Default: a BIC-like
    /// penalty from the signal's own noise (see docs/analytics.md).
    #[param(minimum = 0.0)]
    #[schema(minimum = 0.0)]
    penalty: Option<f64>,
    /// Instead of a penalty: at most this many changes, best first (fewer when the signal
    /// has fewer peaks or they cannot fit).
    #[param(minimum = 0, maximum = 10000)]
    #[schema(minimum = 0, maximum = 10000)]
    breakpoints: Option<u32>,
}

impl Detector {
    fn kind(&self) -> ApiResult<CostKind> {
        let name = self.cost.as_deref().unwrap_or("l2");
        CostKind::parse(name).ok_or_else(|| {
            ApiError::invalid(format!("cost `{name}` must be l2, normal or clinear"))
        })
    }

    fn window(&self) -> ApiResult<Window> {
        let d = Window::default();
        let w = Window {
            width: self.width.map_or(d.width, |v| v as usize),
            jump: self.jump.map_or(d.jump, |v| v as usize),
            min_size: self.min_size.map_or(d.min_size, |v| v as usize),
        };
        if w.width < 6 || w.jump == 0 || w.min_size == 0 {
            return Err(ApiError::invalid(
                "width must be at least 6, jump and min_size at least 1",
            ));
        }
        Ok(w)
    }

    /// Runs on `values` (finite), off the async threads for long signals.
    async fn run(&self, values: Vec<f64>) -> ApiResult<Found> {
        let kind = self.kind()?;
        let window = self.window()?;
        let penalty = self.penalty;
        let wanted = self.breakpoints;
        tokio::task::spawn_blocking(move || {
            let n = values.len();
            let empty = Found {
                starts: Vec::new(),
                penalty: None,
            };
            if n < window.min_size.max(2) {
                return Ok(empty);
            }
            let (stop, used) = match (wanted, penalty) {
                // "At most k": as many as ruptures would admit on this length.
                (Some(k), _) => {
                    let step = window.min_size.div_ceil(window.jump) * window.jump;
                    let fit = (n / window.jump).min((n - window.min_size) / step);
                    (Stop::Breakpoints((k as usize).min(fit)), None)
                }
                (None, Some(p)) => (Stop::Penalty(p), Some(p)),
                (None, None) => {
                    let p = changepoint::default_penalty(kind, &values, 1);
                    (Stop::Penalty(p), Some(p))
                }
            };
            let cost = kind
                .fit(&values, 1)
                .map_err(|e| ApiError::invalid(e.to_string()))?;
            let found = changepoint::detect(cost.as_ref(), window, stop)
                .map_err(|e| ApiError::invalid(e.to_string()))?;
            let mut starts = found.breakpoints;
            starts.pop(); // the signal's length, ruptures' closing convention
            Ok(Found {
                starts,
                penalty: used,
            })
        })
        .await
        .map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("change-point detection failed: {e}"),
            )
        })?
    }
}

struct Found {
    /// Indices (into the finite values) where a new segment starts.
    starts: Vec<usize>,
    penalty: Option<f64>,
}

/// Segments between changes, with their means: `(start, end)` index pairs over `values`.
fn segments(values: &[f64], starts: &[usize]) -> Vec<(usize, usize, f64)> {
    let mut out = Vec::with_capacity(starts.len() + 1);
    let mut from = 0;
    for &end in starts.iter().chain(std::iter::once(&values.len())) {
        if end > from {
            let mean = values[from..end].iter().sum::<f64>() / (end - from) as f64;
            out.push((from, end, mean));
        }
        from = end;
    }
    out
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(super) struct InlineBody {
    /// The signal, one number a point, in order; `null` marks a missing point (left out;
    /// indices in the answer still count it).
    #[schema(max_items = 1000000)]
    values: Vec<Option<f64>>,
    #[serde(flatten)]
    detector: Detector,
}

#[utoipa::path(
    post,
    path = "/analytics/changepoints",
    tag = "analytics",
    operation_id = "changepoints",
    summary = "Change points of a signal given inline",
    description = "Sliding window of two sub-windows: the score at each `jump`-th point is the cost of the window minus the costs of its halves; peaks are taken best first while each lowers the total cost by more than `penalty` (or up to `breakpoints`). Answers the same breakpoints as ruptures' `Window` with the same cost, width, jump, min_size and penalty. `changes` are indices into `values` where a new segment starts.",
    request_body = InlineBody,
    responses((status = 200, description = "Changes and segments", body = super::doc::Object))
)]
async fn changepoints(
    State(_): State<ApiState>,
    ApiJson(body): ApiJson<InlineBody>,
) -> ApiResult<Json<Value>> {
    // Missing points out; remember where the kept ones were.
    let (at, values): (Vec<usize>, Vec<f64>) = body
        .values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.filter(|v| v.is_finite()).map(|v| (i, v)))
        .unzip();
    let found = body.detector.run(values.clone()).await?;
    let total = body.values.len();
    let index = |k: usize| at.get(k).copied().unwrap_or(total);
    let segs: Vec<Value> = segments(&values, &found.starts)
        .into_iter()
        .map(|(a, b, mean)| json!({"start": index(a), "end": index(b), "points": b - a, "mean": mean}))
        .collect();
    Ok(Json(json!({
        "changes": found.starts.iter().map(|&k| index(k)).collect::<Vec<_>>(),
        "segments": segs,
        "points": values.len(),
        "penalty": found.penalty,
    })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct Range {
    /// From this time, ms (inclusive; default: a day before `to`).
    from: Option<i64>,
    /// Up to this time, ms (inclusive; default: now).
    to: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/properties/{id}/changepoints",
    tag = "analytics",
    operation_id = "history_changepoints",
    summary = "Change points of a property's stored history",
    description = "The same detection over the property's numeric history in `from..=to` (rows, chunks and the archive alike); booleans count as 0/1, other values are left out. At most 1,000,000 points: a longer range is refused, narrow it or downsample with the aggregate endpoint first.",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name"), ("id" = String, Path, description = "Identifier"), Range, Detector),
    responses((status = 200, description = "Changes with their times, and segments", body = super::doc::Object), (status = 404, description = "No such device", body = super::doc::ErrorBody))
)]
async fn history_changepoints(
    State(s): State<ApiState>,
    Path((pk, dn, id)): Path<(String, String, String)>,
    ApiQuery(range): ApiQuery<Range>,
    ApiQuery(detector): ApiQuery<Detector>,
) -> ApiResult<Json<Value>> {
    require_device(&s, &pk, &dn).await?;
    detector.kind()?;
    let to = range.to.unwrap_or_else(crate::registry::now_ms);
    let from = range.from.unwrap_or(to.saturating_sub(86_400_000));
    let mut times = Vec::new();
    let mut values = Vec::new();
    let mut cursor = None;
    let mut damaged = Vec::new();
    loop {
        let page = s
            .shared
            .tsdb
            .range(&pk, &dn, &id, from, to, 10_000, true, cursor)
            .await?;
        damaged.extend(page.damaged);
        for (ts, v) in page.points {
            let x = match v {
                Value::Number(n) => n.as_f64(),
                Value::Bool(b) => Some(f64::from(u8::from(b))),
                _ => None,
            };
            if let Some(x) = x.filter(|x| x.is_finite()) {
                times.push(ts);
                values.push(x);
            }
        }
        if values.len() > MAX_POINTS {
            return Err(ApiError::invalid(format!(
                "more than {MAX_POINTS} points in {from}..={to}: narrow the range"
            )));
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let found = detector.run(values.clone()).await?;
    let segs: Vec<Value> = segments(&values, &found.starts)
        .into_iter()
        .map(|(a, b, mean)| json!({"from": times[a], "to": times[b - 1], "points": b - a, "mean": mean}))
        .collect();
    let mut body = json!({
        "identifier": id,
        "changes": found.starts.iter().map(|&k| json!({"time": times[k], "value": values[k]})).collect::<Vec<_>>(),
        "segments": segs,
        "points": values.len(),
        "penalty": found.penalty,
    });
    if !damaged.is_empty() {
        body["damaged"] = json!(damaged);
    }
    Ok(Json(body))
}
