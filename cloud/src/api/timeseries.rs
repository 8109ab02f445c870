//! Time-series endpoints: a property's history in pages, its value at a time, aggregates per
//! interval, queries over many series at once, storage policies and retention, and sealing on
//! demand. Times are epoch milliseconds.

use super::{require_device, require_product, ApiError, ApiJson, ApiQuery, ApiResult, ApiState};
use crate::registry::now_ms;
use crate::tsdb::policy::{Mode, Policy};
use crate::tsdb::query::{Bucket, Cursor, Damaged};
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/devices/:pk/:dn/properties/:id/history", get(history))
        .route("/devices/:pk/:dn/properties/:id/aggregate", get(aggregate))
        .route("/devices/:pk/:dn/properties/:id/value", get(value_at))
        .route("/timeseries/query", post(query))
        .route("/timeseries/seal", post(seal))
        .route("/timeseries/archive", get(list_archive).post(archive))
        .route("/products/:pk/storage-policies", get(list_policies))
        .route(
            "/products/:pk/storage-policies/:id",
            put(put_policy).delete(delete_policy),
        )
}

/// Milliseconds from `1500`, `"1500"` or a human duration (`"1m"`, `"30s"`, `"90d"`).
fn millis(what: &str, text: &str) -> ApiResult<i64> {
    crate::tsdb::millis(text).ok_or_else(|| {
        ApiError::invalid(format!(
            "{what} `{text}` is neither milliseconds nor a duration like 1m, 30s, 7d"
        ))
    })
}

fn ascending(order: Option<&str>) -> ApiResult<bool> {
    match order {
        None | Some("desc") => Ok(false),
        Some("asc") => Ok(true),
        Some(o) => Err(ApiError::invalid(format!(
            "order `{o}` must be asc or desc"
        ))),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    /// From this time, ms since the Unix epoch (inclusive).
    from: Option<i64>,
    /// Up to this time, ms (inclusive); before `from` it selects nothing.
    to: Option<i64>,
    /// Most points, 1 to 10,000 (default 100).
    limit: Option<i64>,
    /// `desc` (default) or `asc`.
    #[param(pattern = "^(asc|desc)$")]
    order: Option<String>,
    /// Where to go on: the `next` of the previous page (same order and range).
    #[param(pattern = "^-?[0-9]{1,18}:[0-9]{1,9}$")]
    cursor: Option<String>,
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/properties/{id}/history",
    tag = "thing model",
    operation_id = "history",
    summary = "Stored values of one property, in pages",
    description = "Points from recent rows and compressed chunks alike. When `next` is present, pass it as `cursor` for the next page. Chunks that cannot be decoded are listed in `damaged` and skipped.",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name"), ("id" = String, Path, description = "Identifier"), HistoryQuery),
    responses((status = 200, description = "Points", body = super::doc::Object), (status = 404, description = "No such device", body = super::doc::ErrorBody))
)]
async fn history(
    State(s): State<ApiState>,
    Path((pk, dn, id)): Path<(String, String, String)>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    let ascending = ascending(q.order.as_deref())?;
    let cursor = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(Cursor::parse(c).ok_or_else(|| {
            ApiError::invalid(format!(
                "cursor `{c}` is not a `next` this API gave (ts:skip)"
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000) as usize;
    let page = s
        .shared
        .tsdb
        .range(
            &pk,
            &dn,
            &id,
            q.from.unwrap_or(i64::MIN),
            q.to.unwrap_or(i64::MAX),
            limit,
            ascending,
            cursor,
        )
        .await?;
    let points: Vec<Value> = page
        .points
        .into_iter()
        .map(|(ts, v)| json!({"time": ts, "value": v}))
        .collect();
    let mut body = json!({"identifier": id, "points": points});
    if let Some(n) = page.next {
        body["next"] = json!(n.to_string());
    }
    if !page.damaged.is_empty() {
        body["damaged"] = json!(page.damaged);
    }
    Ok(Json(body))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AggregateQuery {
    /// From this time, ms (inclusive; default: a day before `to`).
    from: Option<i64>,
    /// Up to this time, ms (inclusive; default: now).
    to: Option<i64>,
    /// Bucket width: ms or a duration (`1m`, `15m`, `1h`, `1d`). Buckets start at multiples of
    /// it since the epoch; at most 100,000 buckets per query.
    #[param(pattern = "^[1-9][0-9]{0,8} ?(ms|s|m|h|d)?$")]
    interval: String,
}

/// `from`, `to` and the interval of an aggregate, checked (the bucket count is checked over
/// each series' points by the store).
fn aggregate_bounds(
    from: Option<i64>,
    to: Option<i64>,
    interval: &str,
) -> ApiResult<(i64, i64, i64)> {
    let interval = millis("interval", interval)?;
    if interval < 1 {
        return Err(ApiError::invalid(format!(
            "interval {interval} ms must be at least 1 ms"
        )));
    }
    let to = to.unwrap_or_else(now_ms);
    let from = from.unwrap_or_else(|| to.saturating_sub(86_400_000));
    Ok((from, to, interval))
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/properties/{id}/aggregate",
    tag = "thing model",
    operation_id = "aggregate",
    summary = "Downsampled aggregates of one property",
    description = "Per interval: count, and over numeric (and boolean, true = 1) values avg, min, max, sum, first, last. Empty intervals are left out.",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name"), ("id" = String, Path, description = "Identifier"), AggregateQuery),
    responses((status = 200, description = "Buckets", body = super::doc::Object), (status = 400, description = "Interval too small for the range", body = super::doc::ErrorBody), (status = 404, description = "No such device", body = super::doc::ErrorBody))
)]
async fn aggregate(
    State(s): State<ApiState>,
    Path((pk, dn, id)): Path<(String, String, String)>,
    ApiQuery(q): ApiQuery<AggregateQuery>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    let (from, to, interval) = aggregate_bounds(q.from, q.to, &q.interval)?;
    let (buckets, damaged) = s
        .shared
        .tsdb
        .aggregate(&pk, &dn, &id, from, to, interval)
        .await?;
    Ok(Json(series_answer(
        &pk,
        &dn,
        &id,
        Some(interval),
        buckets,
        None,
        damaged,
    )))
}

fn series_answer(
    pk: &str,
    dn: &str,
    id: &str,
    interval: Option<i64>,
    buckets: Vec<Bucket>,
    points: Option<Vec<(i64, Value)>>,
    damaged: Vec<Damaged>,
) -> Value {
    let mut v = json!({"product_key": pk, "device_name": dn, "identifier": id});
    if let Some(i) = interval {
        v["interval_ms"] = json!(i);
        v["buckets"] = json!(buckets);
    }
    if let Some(p) = points {
        v["points"] = p
            .into_iter()
            .map(|(ts, v)| json!({"time": ts, "value": v}))
            .collect();
    }
    if !damaged.is_empty() {
        v["damaged"] = json!(damaged);
    }
    v
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AtQuery {
    /// The time, ms (default: now).
    at: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/properties/{id}/value",
    tag = "thing model",
    operation_id = "value_at",
    summary = "The stored value of one property at a time",
    description = "The newest stored point at or before `at`.",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name"), ("id" = String, Path, description = "Identifier"), AtQuery),
    responses((status = 200, description = "The point", body = super::doc::Object), (status = 404, description = "No such device, or no point at or before that time", body = super::doc::ErrorBody))
)]
async fn value_at(
    State(s): State<ApiState>,
    Path((pk, dn, id)): Path<(String, String, String)>,
    ApiQuery(q): ApiQuery<AtQuery>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    let at = q.at.unwrap_or_else(now_ms);
    let (point, damaged) = s.shared.tsdb.value_at(&pk, &dn, &id, at).await?;
    let Some((ts, value)) = point else {
        return Err(ApiError::not_found(format!(
            "device `{pk}/{dn}` has no stored `{id}` at or before {at}"
        )));
    };
    let mut body = json!({"identifier": id, "time": ts, "value": value});
    if !damaged.is_empty() {
        body["damaged"] = json!(damaged);
    }
    Ok(Json(body))
}

/// One series of a query.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SeriesRef {
    product_key: String,
    device_name: String,
    identifier: String,
}

/// Every combination of these devices and properties of one product.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Fleet {
    product_key: String,
    device_names: Vec<String>,
    identifiers: Vec<String>,
}

/// Several series at once: listed one by one (`series`), and/or as a `fleet`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct MultiQuery {
    #[serde(default)]
    series: Vec<SeriesRef>,
    fleet: Option<Fleet>,
    /// ms (inclusive; default: a day before `to`).
    #[serde(default, deserialize_with = "super::int::opt")]
    from: Option<i64>,
    /// ms (inclusive; default: now).
    #[serde(default, deserialize_with = "super::int::opt")]
    to: Option<i64>,
    /// Bucket width (`1m`, or ms): aggregates per series. Absent: raw points.
    #[schema(pattern = "^[1-9][0-9]{0,8} ?(ms|s|m|h|d)?$")]
    interval: Option<String>,
    /// Raw points per series at most, 1 to 10,000 (default 100, newest first unless `asc`;
    /// lowered so that one answer holds at most a million points).
    #[serde(default, deserialize_with = "super::int::opt")]
    limit: Option<i64>,
    /// `desc` (default) or `asc`, for raw points.
    #[schema(pattern = "^(asc|desc)$")]
    order: Option<String>,
}

/// Series one query may name at most.
const MAX_QUERY_SERIES: usize = 10_000;

#[utoipa::path(
    post,
    path = "/timeseries/query",
    tag = "thing model",
    operation_id = "timeseries_query",
    summary = "Raw points or aggregates of many properties and devices at once",
    request_body = MultiQuery,
    responses((status = 200, description = "One entry per series, in the order asked", body = super::doc::Object), (status = 400, description = "No series, too many, or a bad interval", body = super::doc::ErrorBody))
)]
async fn query(
    State(s): State<ApiState>,
    ApiJson(q): ApiJson<MultiQuery>,
) -> ApiResult<impl IntoResponse> {
    let mut series: Vec<(String, String, String)> = q
        .series
        .into_iter()
        .map(|r| (r.product_key, r.device_name, r.identifier))
        .collect();
    if let Some(f) = &q.fleet {
        for dn in &f.device_names {
            for id in &f.identifiers {
                series.push((f.product_key.clone(), dn.clone(), id.clone()));
            }
        }
    }
    if series.len() > MAX_QUERY_SERIES {
        return Err(ApiError::invalid(format!(
            "{} series in one query: at most {MAX_QUERY_SERIES}",
            series.len()
        )));
    }
    let mut out = Vec::with_capacity(series.len());
    match q.interval.as_deref() {
        Some(interval) => {
            let (from, to, interval) = aggregate_bounds(q.from, q.to, interval)?;
            let answers = s
                .shared
                .tsdb
                .aggregate_many(&series, from, to, interval)
                .await?;
            for ((pk, dn, id), (b, damaged)) in series.iter().zip(answers) {
                out.push(series_answer(pk, dn, id, Some(interval), b, None, damaged));
            }
        }
        None => {
            let ascending = ascending(q.order.as_deref())?;
            // At most a million points in one answer: each series gets its share, and its
            // `next` to go on with `history`.
            let share = (1_000_000 / series.len().max(1)).max(1);
            let limit = (q.limit.unwrap_or(100).clamp(1, 10_000) as usize).min(share);
            let to = q.to.unwrap_or(i64::MAX);
            let from = q.from.unwrap_or(i64::MIN);
            for (pk, dn, id) in &series {
                let page = s
                    .shared
                    .tsdb
                    .range(pk, dn, id, from, to, limit, ascending, None)
                    .await?;
                let mut v = series_answer(
                    pk,
                    dn,
                    id,
                    None,
                    Vec::new(),
                    Some(page.points),
                    page.damaged,
                );
                if let Some(n) = page.next {
                    v["next"] = json!(n.to_string());
                }
                out.push(v);
            }
        }
    }
    Ok(Json(json!({ "series": out })))
}

#[utoipa::path(
    post,
    path = "/timeseries/seal",
    tag = "thing model",
    operation_id = "timeseries_seal",
    summary = "Seal every unsealed point into compressed chunks now",
    description = "The sealer does this by itself (`[timeseries] seal_every`, `landing_points`; rows written before landing segments by `chunk_points` and `seal_after`); this is for a backup or a measurement. Small chunks are merged later, when due.",
    responses((status = 200, description = "What was sealed", body = super::doc::Object))
)]
async fn seal(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let done = s.shared.tsdb.seal(true).await?;
    Ok(Json(
        json!({"series": done.series, "chunks": done.chunks, "points": done.points}),
    ))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ArchiveBody {
    /// Archive chunks whose newest point is older than this: a duration (`"30d"`, `"12h"`)
    /// or milliseconds as text (`"0"`: every sealed chunk).
    #[schema(pattern = "^(0|[1-9][0-9]{0,8} ?(ms|s|m|h|d)?)$")]
    older_than: String,
}

#[utoipa::path(
    post,
    path = "/timeseries/archive",
    tag = "thing model",
    operation_id = "timeseries_archive",
    summary = "Move old chunks into Parquet archive files now",
    description = "The archiver does this by itself every `[timeseries] archive_every` when `archive_after` is set (`GET /timeseries/archive` shows it). Files go under the archive directory (`product=KEY/day=YYYY-MM-DD/part-*.parquet`); queries read them as before.",
    request_body = ArchiveBody,
    responses((status = 200, description = "What was archived: files, chunks, points", body = super::doc::Object), (status = 400, description = "A bad age", body = super::doc::ErrorBody))
)]
async fn archive(
    State(s): State<ApiState>,
    ApiJson(body): ApiJson<ArchiveBody>,
) -> ApiResult<impl IntoResponse> {
    let older = millis("older_than", &body.older_than)?;
    let done = s.shared.tsdb.archive(now_ms(), older).await?;
    Ok(Json(json!(done)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ArchiveQuery {
    /// Only this product's files.
    product_key: Option<String>,
    /// Most files, 1 to 10,000 (default 100), newest first.
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/timeseries/archive",
    tag = "thing model",
    operation_id = "list_archive_files",
    summary = "Parquet archive files, newest first",
    params(ArchiveQuery),
    responses((status = 200, description = "`dir`: the archive directory; `files`: one entry each", body = super::doc::Object))
)]
async fn list_archive(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<ArchiveQuery>,
) -> ApiResult<impl IntoResponse> {
    let tsdb = &s.shared.tsdb;
    let files = tsdb
        .archive_files(
            q.product_key.as_deref(),
            q.limit.unwrap_or(100).clamp(1, 10_000),
        )
        .await?;
    Ok(Json(json!({
        "dir": tsdb.archive_dir().map(|d| d.display().to_string()),
        "archive_after_ms": tsdb.config().archive_after.map(|d| d.as_millis() as u64),
        "files": files,
    })))
}

#[utoipa::path(
    get,
    path = "/products/{pk}/storage-policies",
    tag = "thing model",
    operation_id = "list_storage_policies",
    summary = "Storage policies and retention of a product",
    params(("pk" = String, Path, description = "Product key")),
    responses((status = 200, description = "Policies; `default_ttl_ms` is the server's retention (0: forever)", body = super::doc::Object), (status = 404, description = "No such product", body = super::doc::ErrorBody))
)]
async fn list_policies(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
) -> ApiResult<impl IntoResponse> {
    require_product(&s, &pk).await?;
    let tsdb = &s.shared.tsdb;
    Ok(Json(json!({
        "product_key": pk,
        "policies": tsdb.policies.list(Some(&pk)),
        "default_ttl_ms": tsdb.policies.default_ttl(),
    })))
}

/// A policy to set: `{"mode": "all"}`, `{"mode": "on_change", "deadband": 0.5}`,
/// `{"mode": "interval", "interval_ms": 60000}` or `{"mode": "none"}`, each with an optional
/// `ttl`: a duration (`"30d"`, `"12h"`) or milliseconds as text; `"0"` keeps forever; absent
/// inherits (the product's `*` policy, then the server's `[timeseries] ttl`).
// Not deny_unknown_fields: the generated schema cannot say that a field of another mode is
// refused (utoipa writes no additionalProperties for enum variants), so such fields are ignored.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(tag = "mode", rename_all = "snake_case")]
enum PolicyBody {
    /// Every point.
    All {
        #[schema(pattern = "^(0|[1-9][0-9]{0,8} ?(ms|s|m|h|d)?)$")]
        ttl: Option<String>,
    },
    /// A point that differs from the last stored by more than `deadband`.
    OnChange {
        #[serde(default)]
        #[schema(minimum = 0)]
        deadband: f64,
        #[schema(pattern = "^(0|[1-9][0-9]{0,8} ?(ms|s|m|h|d)?)$")]
        ttl: Option<String>,
    },
    /// At most one point per `interval_ms`.
    Interval {
        #[serde(deserialize_with = "super::int::req")]
        #[schema(minimum = 1)]
        interval_ms: i64,
        #[schema(pattern = "^(0|[1-9][0-9]{0,8} ?(ms|s|m|h|d)?)$")]
        ttl: Option<String>,
    },
    /// No history (the latest value is still kept).
    None {
        #[schema(pattern = "^(0|[1-9][0-9]{0,8} ?(ms|s|m|h|d)?)$")]
        ttl: Option<String>,
    },
}

#[utoipa::path(
    put,
    path = "/products/{pk}/storage-policies/{id}",
    tag = "thing model",
    operation_id = "put_storage_policy",
    summary = "Set the storage policy and retention of a property (`*`: the product's default)",
    description = "Takes effect at once for new points; retention is applied by the next reaper pass (`[timeseries] reap_every`), and queries hide older points at once.",
    params(("pk" = String, Path, description = "Product key"), ("id" = String, Path, description = "Property identifier, or `*`")),
    request_body = PolicyBody,
    responses((status = 200, description = "The policy", body = Policy), (status = 400, description = "Bad numbers", body = super::doc::ErrorBody), (status = 404, description = "No such product, or no such property in it", body = super::doc::ErrorBody))
)]
async fn put_policy(
    State(s): State<ApiState>,
    Path((pk, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<PolicyBody>,
) -> ApiResult<impl IntoResponse> {
    require_product(&s, &pk).await?;
    let (mode, ttl) = match body {
        PolicyBody::All { ttl } => (Mode::All, ttl),
        PolicyBody::OnChange { deadband, ttl } => (Mode::OnChange { deadband }, ttl),
        PolicyBody::Interval { interval_ms, ttl } => (Mode::Interval { interval_ms }, ttl),
        PolicyBody::None { ttl } => (Mode::None, ttl),
    };
    mode.validate()
        .map_err(|m| ApiError::invalid(format!("storage policy of `{pk}/{id}`: {m}")))?;
    if id != "*" {
        known_property(&s, &pk, &id).await?;
    }
    let ttl_ms = match ttl.as_deref() {
        None => None,
        Some(t) => Some(millis("ttl", t)?).filter(|t| *t >= 0),
    };
    let p = Policy {
        product_key: pk,
        identifier: id,
        mode,
        ttl_ms,
        updated_at: now_ms(),
    };
    s.shared.tsdb.put_policy(p.clone()).await?;
    Ok(Json(p))
}

/// A property the product's thing model defines, or (without a model) one its devices reported.
async fn known_property(s: &ApiState, pk: &str, id: &str) -> ApiResult<()> {
    match s.shared.thing.model(pk).await? {
        Some(model) if model.property(id).is_some() => Ok(()),
        Some(model) => {
            let known: Vec<&str> = model
                .properties
                .iter()
                .map(|p| p.param.identifier.as_str())
                .collect();
            Err(ApiError::not_found(format!(
                "product `{pk}` has no property `{id}` in its thing model (it has: {}); use `*` for every property",
                known.join(", ")
            )))
        }
        None if s.shared.tsdb.product_has_series(pk, id).await? => Ok(()),
        None => Err(ApiError::not_found(format!(
            "product `{pk}` has no thing model and none of its devices reported `{id}`: import a thing model first, or use `*`"
        ))),
    }
}

#[utoipa::path(
    delete,
    path = "/products/{pk}/storage-policies/{id}",
    tag = "thing model",
    operation_id = "delete_storage_policy",
    summary = "Remove a storage policy (the property falls back to its product's, then to storing all)",
    params(("pk" = String, Path, description = "Product key"), ("id" = String, Path, description = "Property identifier, or `*`")),
    responses((status = 204, description = "Removed"), (status = 404, description = "No such policy", body = super::doc::ErrorBody))
)]
async fn delete_policy(
    State(s): State<ApiState>,
    Path((pk, id)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    if s.shared.tsdb.delete_policy(&pk, &id).await? {
        Ok(axum::http::StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "product `{pk}` has no storage policy for `{id}`"
        )))
    }
}
