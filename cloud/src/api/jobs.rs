//! Analytics jobs: SQL over property history and the fleet's tables, on a schedule or on
//! demand; runs with their progress, failures and results (JSON pages, CSV, Parquet).

use super::{doc, ApiError, ApiJson, ApiQuery, ApiResult, ApiState};
use crate::jobs::monitor::{MonitorInfo, MonitorSpec};
use crate::jobs::{Job, JobError, JobSpec, RunInfo};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/analytics/jobs", post(create_job).get(list_jobs))
        .route(
            "/analytics/jobs/:id",
            get(get_job).put(update_job).delete(delete_job),
        )
        .route(
            "/analytics/jobs/:id/runs",
            post(start_job_run).get(list_job_runs),
        )
        .route("/analytics/runs/:run", get(get_job_run))
        .route("/analytics/runs/:run/cancel", post(cancel_job_run))
        .route("/analytics/runs/:run/result", get(job_result))
        .route(
            "/analytics/anomaly/monitors",
            post(create_monitor).get(list_monitors),
        )
        .route(
            "/analytics/anomaly/monitors/:id",
            get(get_monitor).delete(delete_monitor),
        )
        .route("/analytics/anomaly/monitors/:id/train", post(train_monitor))
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Invalid(m) => Self::invalid(m),
            JobError::Sql {
                message,
                line,
                column,
            } => Self::at(
                format!("SQL error at line {line}, column {column}: {message}"),
                line,
                column,
            ),
            JobError::NotFound(m) => Self::not_found(m),
            JobError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            JobError::Storage(e) => e.into(),
        }
    }
}

#[utoipa::path(
    post,
    path = "/analytics/jobs",
    tag = "analytics",
    operation_id = "create_job",
    summary = "Create an analytics job (SQL over history, products, devices, device_tags)",
    description = "The query is planned at once: a SQL error is refused with its line and column (`code` `sql_error`, `line`, `column`). Tables: `history` (product_key, device_name, identifier, ts, value, text), `products`, `devices`, `device_tags`. With `schedule` (cron, UTC) it runs on its own; it always runs on demand.",
    request_body = JobSpec,
    responses(
        (status = 201, description = "Created", body = Job),
        (status = 400, description = "Bad settings or a SQL error (with line and column)", body = doc::ErrorBody),
        (status = 409, description = "A job of that name exists", body = doc::ErrorBody)
    )
)]
async fn create_job(
    State(s): State<ApiState>,
    ApiJson(spec): ApiJson<JobSpec>,
) -> ApiResult<impl IntoResponse> {
    let job = s.shared.jobs.create(spec).await?;
    tracing::info!(job = job.id, name = %job.name, schedule = ?job.schedule, "analytics job created");
    Ok((StatusCode::CREATED, Json(job)))
}

#[utoipa::path(
    get,
    path = "/analytics/jobs",
    tag = "analytics",
    operation_id = "list_jobs",
    summary = "Analytics jobs",
    responses((status = 200, description = "Every job with its next scheduled run", body = Vec<Job>))
)]
async fn list_jobs(State(s): State<ApiState>) -> ApiResult<Json<Vec<Job>>> {
    Ok(Json(s.shared.jobs.list().await?))
}

#[utoipa::path(
    get,
    path = "/analytics/jobs/{id}",
    tag = "analytics",
    operation_id = "get_job",
    summary = "One analytics job",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = Job),
        (status = 404, description = "No such job", body = doc::ErrorBody)
    )
)]
async fn get_job(State(s): State<ApiState>, Path(id): Path<i64>) -> ApiResult<Json<Job>> {
    Ok(Json(s.shared.jobs.get(id).await?))
}

#[utoipa::path(
    put,
    path = "/analytics/jobs/{id}",
    tag = "analytics",
    operation_id = "update_job",
    summary = "Replace an analytics job's settings",
    params(("id" = i64, Path, description = "Job id")),
    request_body = JobSpec,
    responses(
        (status = 200, description = "Replaced", body = Job),
        (status = 400, description = "Bad settings or a SQL error (with line and column)", body = doc::ErrorBody),
        (status = 404, description = "No such job", body = doc::ErrorBody),
        (status = 409, description = "Another job has that name", body = doc::ErrorBody)
    )
)]
async fn update_job(
    State(s): State<ApiState>,
    Path(id): Path<i64>,
    ApiJson(spec): ApiJson<JobSpec>,
) -> ApiResult<Json<Job>> {
    Ok(Json(s.shared.jobs.update(id, spec).await?))
}

#[utoipa::path(
    delete,
    path = "/analytics/jobs/{id}",
    tag = "analytics",
    operation_id = "delete_job",
    summary = "Delete an analytics job, stopping its run and removing its results",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such job", body = doc::ErrorBody)
    )
)]
async fn delete_job(State(s): State<ApiState>, Path(id): Path<i64>) -> ApiResult<StatusCode> {
    s.shared.jobs.delete(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/analytics/jobs/{id}/runs",
    tag = "analytics",
    operation_id = "start_job_run",
    summary = "Run an analytics job now",
    description = "Starts a worker process (or waits for a free slot, `[analytics] max_concurrent_runs`); poll the run for its progress.",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 202, description = "Started", body = RunInfo),
        (status = 404, description = "No such job", body = doc::ErrorBody)
    )
)]
async fn start_job_run(
    State(s): State<ApiState>,
    Path(id): Path<i64>,
) -> ApiResult<impl IntoResponse> {
    let run = s.shared.jobs.start(id, "manual").await?;
    Ok((StatusCode::ACCEPTED, Json(run)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    /// Newest runs to show (default 20, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/analytics/jobs/{id}/runs",
    tag = "analytics",
    operation_id = "list_job_runs",
    summary = "A job's run history, newest first",
    params(("id" = i64, Path, description = "Job id"), RunsQuery),
    responses(
        (status = 200, description = "Runs", body = Vec<RunInfo>),
        (status = 404, description = "No such job", body = doc::ErrorBody)
    )
)]
async fn list_job_runs(
    State(s): State<ApiState>,
    Path(id): Path<i64>,
    ApiQuery(q): ApiQuery<RunsQuery>,
) -> ApiResult<Json<Vec<RunInfo>>> {
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    Ok(Json(s.shared.jobs.runs(id, limit).await?))
}

#[utoipa::path(
    get,
    path = "/analytics/runs/{run}",
    tag = "analytics",
    operation_id = "get_job_run",
    summary = "One run: status, progress, failure reason, result size",
    params(("run" = i64, Path, description = "Run id")),
    responses(
        (status = 200, description = "The run", body = RunInfo),
        (status = 404, description = "No such run", body = doc::ErrorBody)
    )
)]
async fn get_job_run(State(s): State<ApiState>, Path(run): Path<i64>) -> ApiResult<Json<RunInfo>> {
    Ok(Json(s.shared.jobs.run(run).await?))
}

#[utoipa::path(
    post,
    path = "/analytics/runs/{run}/cancel",
    tag = "analytics",
    operation_id = "cancel_job_run",
    summary = "Stop a running run (its worker is killed; the run fails as cancelled)",
    params(("run" = i64, Path, description = "Run id")),
    responses(
        (status = 202, description = "Stopping"),
        (status = 404, description = "No such run in progress", body = doc::ErrorBody)
    )
)]
async fn cancel_job_run(State(s): State<ApiState>, Path(run): Path<i64>) -> ApiResult<StatusCode> {
    if s.shared.jobs.cancel(run) {
        Ok(StatusCode::ACCEPTED)
    } else {
        Err(ApiError::not_found(format!(
            "no analytics run {run} in progress"
        )))
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ResultQuery {
    /// `json` (a page of rows, default), `csv` or `parquet` (the whole table).
    #[param(pattern = "^(json|csv|parquet)$")]
    format: Option<String>,
    /// First row of the page (json).
    #[param(minimum = 0)]
    offset: Option<u64>,
    /// Rows in the page (json; default 1000, at most 100000).
    #[param(minimum = 1, maximum = 100000)]
    limit: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/analytics/runs/{run}/result",
    tag = "analytics",
    operation_id = "job_result",
    summary = "A succeeded run's result table: a page as JSON, or all of it as CSV or Parquet",
    params(("run" = i64, Path, description = "Run id"), ResultQuery),
    responses(
        (status = 200, description = "`{columns, rows, total, offset}` (json), or the file", content(
            (doc::Object = "application/json"),
            (String = "text/csv"),
            (Vec<u8> = "application/vnd.apache.parquet")
        )),
        (status = 404, description = "No such run, or it has no result", body = doc::ErrorBody)
    )
)]
async fn job_result(
    State(s): State<ApiState>,
    Path(run): Path<i64>,
    ApiQuery(q): ApiQuery<ResultQuery>,
) -> ApiResult<Response> {
    let path = s.shared.jobs.result_file(run).await?;
    let format = q.format.unwrap_or_else(|| "json".into());
    let unreadable = |e: ironlink_analytics::jobs::JobError| {
        tracing::error!(run, error = %e, "an analytics result could not be read");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            format!("the result of run {run} could not be read: {e}"),
        )
    };
    match format.as_str() {
        "parquet" => {
            let bytes = tokio::fs::read(&path)
                .await
                .map_err(|e| unreadable(e.into()))?;
            Ok((
                [
                    (
                        header::CONTENT_TYPE,
                        "application/vnd.apache.parquet".to_owned(),
                    ),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"run-{run}.parquet\""),
                    ),
                ],
                bytes,
            )
                .into_response())
        }
        "csv" => {
            let bytes = tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                ironlink_analytics::jobs::write_csv(&path, &mut out).map(|()| out)
            })
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?
            .map_err(unreadable)?;
            Ok((
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"run-{run}.csv\""),
                    ),
                ],
                bytes,
            )
                .into_response())
        }
        "json" => {
            let offset = usize::try_from(q.offset.unwrap_or(0)).unwrap_or(usize::MAX);
            let limit = usize::try_from(q.limit.unwrap_or(1000).clamp(1, 100_000)).unwrap_or(1000);
            let (columns, rows, total) = tokio::task::spawn_blocking(move || {
                ironlink_analytics::jobs::read_page(&path, offset, limit)
            })
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?
            .map_err(unreadable)?;
            Ok(
                Json(json!({"columns": columns, "rows": rows, "total": total, "offset": offset}))
                    .into_response(),
            )
        }
        f => Err(ApiError::invalid(format!(
            "format {f:?}: json, csv or parquet"
        ))),
    }
}

#[utoipa::path(
    post,
    path = "/analytics/anomaly/monitors",
    tag = "analytics",
    operation_id = "create_monitor",
    summary = "Watch numeric properties of a product's devices for anomalies",
    description = "Trains one pooled model on the last `train_days` of the properties' stored history (answered once trained; `state` says whether it worked), retrains it on `retrain` (cron, UTC), and scores every value devices post from then on. An anomaly becomes the device's `anomaly` event (type `alert`; output: property, value, expected, lower, upper, sensitivity, monitor), stored and delivered to consumer groups and rules like the device's own events. Series without enough history (new devices) are scored after the next training.",
    request_body = MonitorSpec,
    responses(
        (status = 201, description = "Created (and trained, or `state` says why not)", body = MonitorInfo),
        (status = 400, description = "Bad settings, or a property that is not numeric", body = doc::ErrorBody),
        (status = 404, description = "No such product", body = doc::ErrorBody),
        (status = 409, description = "A monitor of that name exists", body = doc::ErrorBody)
    )
)]
async fn create_monitor(
    State(s): State<ApiState>,
    ApiJson(spec): ApiJson<MonitorSpec>,
) -> ApiResult<impl IntoResponse> {
    let m = s.shared.monitors.create(spec).await?;
    tracing::info!(monitor = m.id, name = %m.name, product_key = %m.product_key, state = %m.state, "anomaly monitor created");
    Ok((StatusCode::CREATED, Json(m)))
}

#[utoipa::path(
    get,
    path = "/analytics/anomaly/monitors",
    tag = "analytics",
    operation_id = "list_monitors",
    summary = "Anomaly monitors with their state and alarm counts",
    responses((status = 200, description = "Every monitor", body = Vec<MonitorInfo>))
)]
async fn list_monitors(State(s): State<ApiState>) -> Json<Vec<MonitorInfo>> {
    Json(s.shared.monitors.list())
}

#[utoipa::path(
    get,
    path = "/analytics/anomaly/monitors/{id}",
    tag = "analytics",
    operation_id = "get_monitor",
    summary = "One anomaly monitor",
    params(("id" = i64, Path, description = "Monitor id")),
    responses(
        (status = 200, description = "The monitor", body = MonitorInfo),
        (status = 404, description = "No such monitor", body = doc::ErrorBody)
    )
)]
async fn get_monitor(
    State(s): State<ApiState>,
    Path(id): Path<i64>,
) -> ApiResult<Json<MonitorInfo>> {
    Ok(Json(s.shared.monitors.get(id)?))
}

#[utoipa::path(
    delete,
    path = "/analytics/anomaly/monitors/{id}",
    tag = "analytics",
    operation_id = "delete_monitor",
    summary = "Stop watching",
    params(("id" = i64, Path, description = "Monitor id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such monitor", body = doc::ErrorBody)
    )
)]
async fn delete_monitor(State(s): State<ApiState>, Path(id): Path<i64>) -> ApiResult<StatusCode> {
    s.shared.monitors.delete(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/analytics/anomaly/monitors/{id}/train",
    tag = "analytics",
    operation_id = "train_monitor",
    summary = "Retrain a monitor on its history now",
    params(("id" = i64, Path, description = "Monitor id")),
    responses(
        (status = 200, description = "Trained (or `state` says why not)", body = MonitorInfo),
        (status = 404, description = "No such monitor", body = doc::ErrorBody)
    )
)]
async fn train_monitor(
    State(s): State<ApiState>,
    Path(id): Path<i64>,
) -> ApiResult<Json<MonitorInfo>> {
    Ok(Json(s.shared.monitors.train(id).await?))
}
