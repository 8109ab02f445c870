//! OTA endpoints: packages (uploaded as the request body, streamed to disk), campaigns (with
//! per-state counts, pause/resume/cancel and their devices), a device's OTA state, and the
//! device-facing download `GET /ota/download/{token}` (outside `/api/v1`: the token in the
//! URL is the credential).

use super::{doc, ApiError, ApiJson, ApiQuery, ApiResult, ApiState};
use crate::ota::plan::JobState;
use crate::ota::store::{HistoryRow, Job, ModuleVersion, Package};
use crate::ota::{Created, NewCampaign, NewPackage, OtaError};
use crate::registry::now_ms;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/ota/packages", post(upload_package).get(list_packages))
        .route("/ota/packages/:id", get(get_package).delete(delete_package))
        .route("/ota/campaigns", post(create_campaign).get(list_campaigns))
        .route("/ota/campaigns/:id", get(get_campaign))
        .route("/ota/campaigns/:id/pause", post(pause_campaign))
        .route("/ota/campaigns/:id/resume", post(resume_campaign))
        .route("/ota/campaigns/:id/cancel", post(cancel_campaign))
        .route("/ota/campaigns/:id/devices", get(campaign_devices))
        .route("/devices/:pk/:dn/ota", get(device_ota))
}

impl From<OtaError> for ApiError {
    fn from(e: OtaError) -> Self {
        match e {
            OtaError::Invalid(m) => Self::invalid(m),
            OtaError::NotFound(m) => Self::not_found(m),
            OtaError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            OtaError::TooLarge(m) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", m)
            }
            OtaError::Storage(e) => e.into(),
            OtaError::Io(e) => {
                tracing::error!(error = %e, "OTA package storage failed");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    format!("the package directory failed: {e}; retry later"),
                )
            }
        }
    }
}

/// What describes an uploaded image (the image itself is the request body).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    /// The product whose devices take it.
    product_key: String,
    /// The version devices report once upgraded.
    #[param(pattern = r"^[A-Za-z0-9._+-]{1,64}$")]
    version: String,
    /// OTA module (default `default`).
    #[param(pattern = r"^[A-Za-z0-9._+-]{1,64}$")]
    module: Option<String>,
    /// Versions it may be installed over, comma-separated (default: any).
    #[param(pattern = r"^[A-Za-z0-9._+-]{1,64}(,[A-Za-z0-9._+-]{1,64}){0,99}$")]
    src_versions: Option<String>,
    /// File name to show (default `{module}-{version}.bin`).
    #[param(pattern = r"^[^/\\\x00-\x1f\x7f]{1,128}$")]
    file_name: Option<String>,
    /// Digest in notices' `sign`: `Md5` (default, what Alibaba's SDKs check) or `SHA256`.
    #[param(pattern = "^(Md5|SHA256)$")]
    sign_method: Option<String>,
    /// ed25519 signature made with `ironlink-cloud ota sign`, hex (the cloud signs with
    /// `ota.signing_key` when this is absent and a key is configured).
    #[param(pattern = "^[0-9a-fA-F]{128}$")]
    ed25519: Option<String>,
    /// Free text.
    #[param(max_length = 1024)]
    description: Option<String>,
}

#[utoipa::path(
    post,
    path = "/ota/packages",
    tag = "ota",
    operation_id = "upload_package",
    summary = "Upload a firmware image (the raw bytes as the body, streamed to disk)",
    params(UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The image"),
    responses(
        (status = 201, description = "Stored, with its digests and signature", body = Package),
        (status = 404, description = "No such product", body = doc::ErrorBody),
        (status = 409, description = "This version of the module exists", body = doc::ErrorBody),
        (status = 413, description = "Larger than ota.max_package_bytes", body = doc::ErrorBody)
    )
)]
async fn upload_package(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let meta = NewPackage {
        product_key: q.product_key,
        module: q.module.unwrap_or_default(),
        version: q.version,
        src_versions: q
            .src_versions
            .map(|v| {
                v.split(',')
                    .map(|x| x.trim().to_owned())
                    .filter(|x| !x.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        file_name: q.file_name.unwrap_or_default(),
        sign_method: q.sign_method.unwrap_or_default(),
        ed25519: q.ed25519,
        description: q.description.unwrap_or_default(),
    };
    let p = s.shared.ota.upload(meta, body.into_data_stream()).await?;
    tracing::info!(package = %p.id, product_key = %p.product_key, module = %p.module, version = %p.version, size = p.size, signed = p.ed25519.is_some(), "OTA package uploaded");
    Ok((StatusCode::CREATED, Json(p)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct PackageFilter {
    /// Only this product's packages.
    product_key: Option<String>,
}

#[utoipa::path(
    get,
    path = "/ota/packages",
    tag = "ota",
    operation_id = "list_packages",
    summary = "List packages, newest first",
    params(PackageFilter),
    responses((status = 200, description = "Packages", body = doc::PackageList))
)]
async fn list_packages(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<PackageFilter>,
) -> ApiResult<impl IntoResponse> {
    let packages = s.shared.db.list_packages(q.product_key.as_deref()).await?;
    Ok(Json(json!({ "packages": packages })))
}

#[utoipa::path(
    get,
    path = "/ota/packages/{id}",
    tag = "ota",
    operation_id = "get_package",
    summary = "One package",
    params(("id" = String, Path, description = "Package id")),
    responses((status = 200, description = "The package", body = Package), (status = 404, description = "No such package", body = doc::ErrorBody))
)]
async fn get_package(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let p = s
        .shared
        .db
        .get_package(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("package `{id}` does not exist")))?;
    Ok(Json(p))
}

#[utoipa::path(
    delete,
    path = "/ota/packages/{id}",
    tag = "ota",
    operation_id = "delete_package",
    summary = "Delete a package no campaign uses, with its image",
    params(("id" = String, Path, description = "Package id")),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such package", body = doc::ErrorBody), (status = 409, description = "A campaign uses it", body = doc::ErrorBody))
)]
async fn delete_package(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.shared.ota.delete_package(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/ota/campaigns",
    tag = "ota",
    operation_id = "create_campaign",
    summary = "Start a campaign: the target is resolved now; devices that start to match later join while it runs",
    request_body = NewCampaign,
    responses((status = 201, description = "Started", body = Created), (status = 404, description = "No such package", body = doc::ErrorBody))
)]
async fn create_campaign(
    State(s): State<ApiState>,
    ApiJson(body): ApiJson<NewCampaign>,
) -> ApiResult<impl IntoResponse> {
    let created = s.shared.ota.create_campaign(body).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// A campaign for the API: its definition, where it is, and its jobs counted by state.
async fn campaign_view(s: &ApiState, row: crate::ota::store::CampaignRow) -> ApiResult<Value> {
    let (counts, by_state) = s.shared.db.job_counts(&row.id).await?;
    let mut states = serde_json::Map::new();
    for st in JobState::ALL {
        states.insert(
            st.as_str().into(),
            json!(by_state.get(st.as_str()).copied().unwrap_or(0)),
        );
    }
    let failures: Vec<Value> = s
        .shared
        .db
        .failure_reasons(&row.id)
        .await?
        .into_iter()
        .map(|(reason, n)| json!({"reason": reason, "count": n}))
        .collect();
    let rate: Value = serde_json::from_str(&row.rate).unwrap_or(Value::Null);
    let total: u64 = by_state.values().sum();
    Ok(json!({
        "id": row.id,
        "name": row.name,
        "package_id": row.package_id,
        "product_key": row.product_key,
        "module": row.module,
        "tenant": row.tenant,
        "target": serde_json::from_str::<Value>(&row.target).unwrap_or(Value::Null),
        "policy": serde_json::from_str::<Value>(&row.policy).unwrap_or(Value::Null),
        "state": row.state,
        "stage": row.stage,
        "reason": row.reason,
        "pushes_per_minute_now": rate.get("rate").cloned().unwrap_or(Value::Null),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "finished_at": row.finished_at,
        "devices": total,
        "states": states,
        "canary": {"devices": counts.canary, "open": counts.canary_open, "succeeded": counts.canary_succeeded},
        "failures": failures,
    }))
}

#[utoipa::path(
    get,
    path = "/ota/campaigns",
    tag = "ota",
    operation_id = "list_campaigns",
    summary = "List campaigns, newest first, with their counts",
    responses((status = 200, description = "Campaigns", body = doc::CampaignList))
)]
async fn list_campaigns(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let rows = s.shared.db.list_campaigns(&[]).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(campaign_view(&s, r).await?);
    }
    Ok(Json(json!({ "campaigns": out })))
}

#[utoipa::path(
    get,
    path = "/ota/campaigns/{id}",
    tag = "ota",
    operation_id = "get_campaign",
    summary = "One campaign with its jobs counted by state and its failure reasons",
    params(("id" = String, Path, description = "Campaign id")),
    responses((status = 200, description = "The campaign", body = doc::Campaign), (status = 404, description = "No such campaign", body = doc::ErrorBody))
)]
async fn get_campaign(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let row = s
        .shared
        .db
        .get_campaign(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("campaign `{id}` does not exist")))?;
    Ok(Json(campaign_view(&s, row).await?))
}

async fn control(s: &ApiState, id: &str, action: &str) -> ApiResult<Json<Value>> {
    s.shared.ota.control(id, action).await?;
    let row = s
        .shared
        .db
        .get_campaign(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("campaign `{id}` does not exist")))?;
    Ok(Json(campaign_view(s, row).await?))
}

#[utoipa::path(
    post,
    path = "/ota/campaigns/{id}/pause",
    tag = "ota",
    operation_id = "pause_campaign",
    summary = "Pause: no further notices; devices already upgrading carry on",
    params(("id" = String, Path, description = "Campaign id")),
    responses((status = 200, description = "The campaign", body = doc::Campaign), (status = 404, description = "No such campaign", body = doc::ErrorBody), (status = 409, description = "Not running", body = doc::ErrorBody))
)]
async fn pause_campaign(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    control(&s, &id, "pause").await
}

#[utoipa::path(
    post,
    path = "/ota/campaigns/{id}/resume",
    tag = "ota",
    operation_id = "resume_campaign",
    summary = "Resume a paused campaign",
    params(("id" = String, Path, description = "Campaign id")),
    responses((status = 200, description = "The campaign", body = doc::Campaign), (status = 404, description = "No such campaign", body = doc::ErrorBody), (status = 409, description = "Not paused", body = doc::ErrorBody))
)]
async fn resume_campaign(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    control(&s, &id, "resume").await
}

#[utoipa::path(
    post,
    path = "/ota/campaigns/{id}/cancel",
    tag = "ota",
    operation_id = "cancel_campaign",
    summary = "Cancel: queued and running jobs end as cancelled; their download links stop",
    params(("id" = String, Path, description = "Campaign id")),
    responses((status = 200, description = "The campaign", body = doc::Campaign), (status = 404, description = "No such campaign", body = doc::ErrorBody), (status = 409, description = "Already over", body = doc::ErrorBody))
)]
async fn cancel_campaign(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    control(&s, &id, "cancel").await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct JobFilter {
    /// Only jobs in this state.
    #[param(
        pattern = "^(queued|notified|downloading|verifying|flashing|succeeded|failed|cancelled)$"
    )]
    state: Option<String>,
    /// Skip this many (default 0).
    #[param(minimum = 0)]
    offset: Option<i64>,
    /// At most this many, 1 to 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/ota/campaigns/{id}/devices",
    tag = "ota",
    operation_id = "campaign_devices",
    summary = "A campaign's devices and their jobs, by device name",
    params(("id" = String, Path, description = "Campaign id"), JobFilter),
    responses((status = 200, description = "Jobs", body = doc::JobList), (status = 404, description = "No such campaign", body = doc::ErrorBody))
)]
async fn campaign_devices(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<JobFilter>,
) -> ApiResult<impl IntoResponse> {
    if s.shared.db.get_campaign(&id).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "campaign `{id}` does not exist"
        )));
    }
    if let Some(st) = q
        .state
        .as_deref()
        .filter(|st| JobState::parse(st).is_none())
    {
        return Err(ApiError::invalid(format!(
            "state `{st}` is not one of queued, notified, downloading, verifying, flashing, succeeded, failed, cancelled"
        )));
    }
    let offset = q.offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(100);
    if offset < 0 || !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("offset must be >= 0 and limit 1 to 1000"));
    }
    let jobs: Vec<Job> = s
        .shared
        .db
        .list_jobs(&id, q.state.as_deref(), offset, limit)
        .await?;
    Ok(Json(
        json!({ "jobs": jobs, "offset": offset, "limit": limit }),
    ))
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/ota",
    tag = "ota",
    operation_id = "device_ota",
    summary = "A device's reported module versions, its jobs and its OTA history",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    responses((status = 200, description = "Versions, jobs, history", body = doc::DeviceOta), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
async fn device_ota(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    if s.shared.db.get_device(&pk, &dn).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "device `{pk}/{dn}` does not exist"
        )));
    }
    let modules: Vec<ModuleVersion> = s.shared.db.device_versions(&pk, &dn).await?;
    let jobs: Vec<Job> = s.shared.db.device_jobs(&pk, &dn).await?;
    let history: Vec<HistoryRow> = s.shared.db.device_history(&pk, &dn, 200).await?;
    Ok(Json(
        json!({ "modules": modules, "jobs": jobs, "history": history }),
    ))
}

/// `GET /ota/download/{token}`: the image, whole or the range asked for.
pub(super) async fn download(
    State(s): State<ApiState>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Response {
    use crate::ota::download::{parse_range, DownloadError};
    let d = match s.shared.ota.open_download(&token, now_ms()).await {
        Ok(d) => d,
        Err(DownloadError::Token(e)) => {
            return ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()).into_response()
        }
        Err(DownloadError::Closed(m)) => {
            return ApiError::new(StatusCode::FORBIDDEN, "forbidden", m).into_response()
        }
        Err(DownloadError::Ota(e)) => return ApiError::from(e).into_response(),
    };
    let etag = format!("\"{}\"", d.sha256);
    // If-Range with another entity: send the whole image.
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == etag);
    let range = if if_range_ok {
        headers.get(header::RANGE).and_then(|v| v.to_str().ok())
    } else {
        None
    };
    let span = match parse_range(range, d.size) {
        Ok(span) => span,
        Err(()) => {
            let mut r = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the image has {} bytes", d.size),
            )
            .into_response();
            if let Ok(v) = format!("bytes */{}", d.size).parse() {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let (start, end) = span.map_or((0, d.size.saturating_sub(1)), |sp| (sp.start, sp.end));
    let len = end + 1 - start;
    let ota = s.shared.ota.clone();
    let stream = body_stream(d.file, start, len, d.limiter, ota);
    let mut res = Response::new(Body::from_stream(stream));
    *res.status_mut() = if span.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let h = res.headers_mut();
    let mut set = |k: header::HeaderName, v: String| {
        if let Ok(v) = v.parse() {
            h.insert(k, v);
        }
    };
    set(header::CONTENT_TYPE, "application/octet-stream".into());
    set(header::CONTENT_LENGTH, len.to_string());
    set(header::ACCEPT_RANGES, "bytes".into());
    set(header::ETAG, etag);
    set(header::CACHE_CONTROL, "private, no-store".into());
    set(
        header::CONTENT_DISPOSITION,
        format!("attachment; filename=\"{}\"", d.file_name.replace('"', "")),
    );
    if span.is_some() {
        set(
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{}", d.size),
        );
    }
    res
}

/// The bytes `start..start+len` of `file`, in 64 KiB pieces, each paced by the campaign's
/// limiter.
fn body_stream(
    file: tokio::fs::File,
    start: u64,
    len: u64,
    limiter: Option<std::sync::Arc<crate::ota::download::Limiter>>,
    ota: std::sync::Arc<crate::ota::Ota>,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    futures_util::stream::unfold(
        (file, start, len, false),
        move |(mut file, at, left, seeked)| {
            let limiter = limiter.clone();
            let ota = ota.clone();
            async move {
                if left == 0 {
                    return None;
                }
                if !seeked {
                    if let Err(e) = file.seek(std::io::SeekFrom::Start(at)).await {
                        return Some((Err(e), (file, at, 0, true)));
                    }
                }
                let want = left.min(64 * 1024) as usize;
                let mut buf = vec![0u8; want];
                match file.read_exact(&mut buf).await {
                    Ok(_) => {}
                    Err(e) => return Some((Err(e), (file, at, 0, true))),
                }
                if let Some(l) = &limiter {
                    l.take(want).await;
                }
                ota.served(want);
                Some((
                    Ok(bytes::Bytes::from(buf)),
                    (file, at + want as u64, left - want as u64, true),
                ))
            }
        },
    )
}
