//! Analytics endpoints: change points of a signal given inline or of a property's stored
//! history (sliding window of two sub-windows, as `ruptures.Window`); PV arrays' IV curves
//! simulated and diagnosed.

use super::{require_device, ApiError, ApiJson, ApiQuery, ApiResult, ApiState};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use ironlink_analytics::changepoint::{self, CostKind, Window};
use ironlink_analytics::{anomaly, pv};
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
        .route("/analytics/anomaly/detect", post(anomaly_detect))
        .route("/analytics/pv/simulate", post(pv_simulate))
        .route("/analytics/pv/diagnose", post(pv_diagnose))
}

/// An array of the reference module (96 cells, 220 W: pvlib's CS5P-220M example), checked.
fn pv_array(irradiance: f64, temperature: f64, modules: u32, strings: u32) -> ApiResult<pv::Array> {
    if !(50.0..=1500.0).contains(&irradiance)
        || !(-40.0..=100.0).contains(&temperature)
        || !(1..=100).contains(&modules)
        || !(1..=20).contains(&strings)
    {
        return Err(ApiError::invalid(
            "irradiance 50..1500 W/m², temperature -40..100 °C, modules 1..100, strings 1..20",
        ));
    }
    Ok(pv::Array {
        module: pv::Module::default(),
        modules: modules as usize,
        strings: strings as usize,
    })
}

/// A healthy array of the reference module under given conditions.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SimulateBody {
    /// Plane-of-array irradiance, W/m².
    #[schema(minimum = 50.0, maximum = 1500.0)]
    irradiance: f64,
    /// Cell temperature, °C.
    #[schema(minimum = -40.0, maximum = 100.0)]
    temperature: f64,
    /// Modules in series in each string.
    #[serde(deserialize_with = "super::int::req")]
    #[schema(minimum = 1, maximum = 100)]
    modules: u32,
    /// Strings in parallel.
    #[serde(deserialize_with = "super::int::req")]
    #[schema(minimum = 1, maximum = 20)]
    strings: u32,
    /// Points of the curve, evenly spaced in voltage from 0 to Voc (default 100).
    #[serde(default, deserialize_with = "super::int::opt")]
    #[schema(minimum = 10, maximum = 10000)]
    points: Option<u32>,
}

#[utoipa::path(
    post,
    path = "/analytics/pv/simulate",
    tag = "analytics",
    operation_id = "pv_simulate",
    summary = "The expected IV curve of a healthy PV array",
    description = "Single-diode model (De Soto, as pvlib's calcparams_desoto + singlediode) of the reference module, scaled to the array: what a healthy array should measure at this irradiance and temperature.",
    request_body = SimulateBody,
    responses((status = 200, description = "The curve and its key points", body = super::doc::Object))
)]
async fn pv_simulate(
    State(_): State<ApiState>,
    ApiJson(body): ApiJson<SimulateBody>,
) -> ApiResult<Json<Value>> {
    let a = pv_array(
        body.irradiance,
        body.temperature,
        body.modules,
        body.strings,
    )?;
    let points = body.points.unwrap_or(100).clamp(10, 10_000) as usize;
    let c = pv::Condition::healthy(&a, body.irradiance, body.temperature);
    let curve = a.simulate(&c, points);
    let (isc, voc, vmp, imp) = a.module.at(body.irradiance, body.temperature).key_points();
    let (s, p) = (a.modules as f64, a.strings as f64);
    Ok(Json(json!({
        "voltage": curve.v,
        "current": curve.i,
        "isc": isc * p,
        "voc": voc * s,
        "vmp": vmp * s,
        "imp": imp * p,
        "pmp": vmp * imp * s * p,
    })))
}

/// A measured curve of an array of the reference module.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DiagnoseBody {
    /// Plane-of-array irradiance during the sweep, W/m².
    #[schema(minimum = 50.0, maximum = 1500.0)]
    irradiance: f64,
    /// Cell temperature during the sweep, °C.
    #[schema(minimum = -40.0, maximum = 100.0)]
    temperature: f64,
    /// Modules in series in each string.
    #[serde(deserialize_with = "super::int::req")]
    #[schema(minimum = 1, maximum = 100)]
    modules: u32,
    /// Strings in parallel.
    #[serde(deserialize_with = "super::int::req")]
    #[schema(minimum = 1, maximum = 20)]
    strings: u32,
    /// The measured curve, points in any order (at least 10).
    #[schema(min_items = 10, max_items = 100000)]
    points: Vec<IvPoint>,
}

/// One point of an IV curve.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct IvPoint {
    /// Voltage, V.
    v: f64,
    /// Current, A.
    i: f64,
}

/// The shared diagnosis model (trained once, on a blocking thread, on first use).
async fn diagnoser() -> ApiResult<&'static pv::Diagnoser> {
    tokio::task::spawn_blocking(pv::shared)
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(internal)
}

fn internal(message: String) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        message,
    )
}

#[utoipa::path(
    post,
    path = "/analytics/pv/diagnose",
    tag = "analytics",
    operation_id = "pv_diagnose",
    summary = "Which fault a measured PV IV curve shows",
    description = "The curve is corrected to STC by IEC 60891 (procedure 2), resampled by nearest neighbour onto a uniform voltage grid and classified by a random forest trained on simulated arrays of the reference module: `normal`, `partial_shading`, `series_resistance_ageing`, `shunt_resistance_ageing`, `open_string` or `short_circuited_module`, with `confidence` (the share of the trees' votes) and every class's share.",
    request_body = DiagnoseBody,
    responses((status = 200, description = "The fault and the votes", body = super::doc::Object))
)]
async fn pv_diagnose(
    State(_): State<ApiState>,
    ApiJson(body): ApiJson<DiagnoseBody>,
) -> ApiResult<Json<Value>> {
    let a = pv_array(
        body.irradiance,
        body.temperature,
        body.modules,
        body.strings,
    )?;
    let model = diagnoser().await?;
    let curve = pv::Curve {
        v: body.points.iter().map(|p| p.v).collect(),
        i: body.points.iter().map(|p| p.i).collect(),
        irradiance: body.irradiance,
        temperature: body.temperature,
    };
    let d = model
        .diagnose(a.modules, a.strings, &curve)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let votes: serde_json::Map<String, Value> = d
        .votes
        .iter()
        .map(|(f, share)| (f.name().to_string(), json!(share)))
        .collect();
    Ok(Json(json!({
        "fault": d.fault.name(),
        "confidence": d.confidence,
        "votes": votes,
    })))
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
    async fn run(&self, values: Vec<f64>) -> ApiResult<changepoint::Found> {
        let kind = self.kind()?;
        let window = self.window()?;
        let penalty = self.penalty;
        let wanted = self.breakpoints;
        tokio::task::spawn_blocking(move || {
            changepoint::find(&values, kind, window, penalty, wanted.map(|k| k as usize))
                .map_err(|e| ApiError::invalid(e.to_string()))
        })
        .await
        .map_err(|e| internal(format!("change-point detection failed: {e}")))?
    }
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
#[serde(deny_unknown_fields)]
pub(super) struct InlineBody {
    /// The signal, one number a point, in order; `null` marks a missing point (left out;
    /// indices in the answer still count it).
    #[schema(max_items = 1000000)]
    values: Vec<Option<f64>>,
    /// `l2` (mean shift, default), `normal` (mean and variance shift) or `clinear`.
    #[schema(pattern = "^(l2|normal|clinear)$")]
    cost: Option<String>,
    /// Points in the whole window (default 100; rounded down to even).
    #[serde(default, deserialize_with = "super::int::opt")]
    #[schema(minimum = 6, maximum = 100000)]
    width: Option<u32>,
    /// Score every `jump`-th point (default 5).
    #[serde(default, deserialize_with = "super::int::opt")]
    #[schema(minimum = 1, maximum = 10000)]
    jump: Option<u32>,
    /// Fewest points between two changes (default 2).
    #[serde(default, deserialize_with = "super::int::opt")]
    #[schema(minimum = 1, maximum = 10000)]
    min_size: Option<u32>,
    /// Take changes while each lowers the total cost by more than this (default: BIC-like).
    #[schema(minimum = 0.0)]
    penalty: Option<f64>,
    /// Instead of a penalty: at most this many changes, best first.
    #[serde(default, deserialize_with = "super::int::opt")]
    #[schema(minimum = 0, maximum = 10000)]
    breakpoints: Option<u32>,
}

impl InlineBody {
    fn detector(&self) -> Detector {
        Detector {
            cost: self.cost.clone(),
            width: self.width,
            jump: self.jump,
            min_size: self.min_size,
            penalty: self.penalty,
            breakpoints: self.breakpoints,
        }
    }
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
    let found = body.detector().run(values.clone()).await?;
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AnomalyBody {
    /// The series, each in time order; `null` marks a missing point (skipped: it neither
    /// scores nor enters the lags; indices still count it).
    #[schema(min_items = 1, max_items = 10000)]
    series: Vec<Vec<Option<f64>>>,
    /// Train on the first this many points of each series (default: all of them).
    #[serde(default, deserialize_with = "super::int::opt")]
    #[schema(minimum = 1)]
    train_points: Option<u64>,
    /// `1%` (low: fewest alarms), `3%` (default) or `5%` (high): about this share of
    /// ordinary points falls outside the interval.
    #[schema(pattern = "^(1|3|5)%$")]
    sensitivity: Option<String>,
    /// Lags the forecast looks at (default 16).
    #[serde(default, deserialize_with = "super::int::opt")]
    #[schema(minimum = 1, maximum = 256)]
    lags: Option<u32>,
}

#[utoipa::path(
    post,
    path = "/analytics/anomaly/detect",
    tag = "analytics",
    operation_id = "anomaly_detect",
    summary = "Point anomalies of many series with one pooled model",
    description = "Each series is normalised by its own robust scale (and differenced when it trends or wanders); ONE ridge autoregression on the last `lags` values is trained over every series' first `train_points`; every point is then scored online against the forecast's interval at the sensitivity level. A spike's forecast stands in for it in the lags, so the quick recovery after it is not flagged; after 5 anomalies in a row the series is taken to have moved to a new level (reported in `level_shifts`) and re-anchored. Too little data (fewer than 20 × (lags + 1) training windows over all series) is refused with the reason.",
    request_body = AnomalyBody,
    responses((status = 200, description = "Anomalous indices per series, and the model", body = super::doc::Object))
)]
async fn anomaly_detect(
    State(_): State<ApiState>,
    ApiJson(body): ApiJson<AnomalyBody>,
) -> ApiResult<Json<Value>> {
    let level = match body.sensitivity.as_deref().unwrap_or("3%") {
        "1%" => 0,
        "3%" => 1,
        "5%" => 2,
        other => {
            return Err(ApiError::invalid(format!(
                "sensitivity `{other}` must be 1%, 3% or 5%"
            )))
        }
    };
    let lags = body.lags.unwrap_or(16) as usize;
    let train_points = body.train_points.map_or(usize::MAX, |n| n as usize);
    tokio::task::spawn_blocking(move || {
        let clean: Vec<Vec<f64>> = body
            .series
            .iter()
            .map(|s| {
                s.iter()
                    .take(train_points)
                    .filter_map(|v| v.filter(|v| v.is_finite()))
                    .collect()
            })
            .collect();
        let mut train: Vec<(anomaly::Normal, &[f64])> = clean
            .iter()
            .map(|s| (anomaly::Normal::of(s), s.as_slice()))
            .collect();
        let model = anomaly::Model::train(
            &mut train,
            anomaly::Train {
                lags,
                ..anomaly::Train::default()
            },
        )
        .map_err(|e| ApiError::invalid(e.to_string()))?;
        let normals: Vec<anomaly::Normal> = train.iter().map(|(n, _)| *n).collect();
        let mut anomalies = Vec::new();
        let mut shifts = Vec::new();
        for (series, normal) in body.series.iter().zip(&normals) {
            let mut scorer = anomaly::Scorer::new(*normal, level);
            let (mut a, mut s) = (Vec::new(), Vec::new());
            for (i, v) in series.iter().enumerate() {
                let Some(score) = v.and_then(|v| scorer.push(&model, v)) else {
                    continue;
                };
                if score.anomaly {
                    a.push(i);
                }
                if score.level_shift {
                    s.push(i);
                }
            }
            anomalies.push(a);
            shifts.push(s);
        }
        Ok(Json(json!({
            "anomalies": anomalies,
            "level_shifts": shifts,
            "differenced": normals.iter().map(|n| n.differenced).collect::<Vec<_>>(),
            "model": model,
        })))
    })
    .await
    .map_err(|e| internal(format!("anomaly detection failed: {e}")))?
}
