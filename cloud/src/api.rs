//! HTTP API: JSON under `/api/v1`, bearer token, OpenAPI document at `/api/v1/openapi.json`.

use crate::access::sessions::Kick;
use crate::access::Shared;
use crate::lifecycle::{self, Action, Change};
use crate::registry::{self, NewProduct, RegistryError};
use crate::router::Message;
use crate::storage::{Device, StorageError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use ironlink_shared::acl::{device_may, valid_topic_name, Access};
use ironlink_shared::DeviceRef;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// API state.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// Shared server state.
    pub shared: Arc<Shared>,
    /// The bearer token.
    pub token: Arc<str>,
}

/// An error answer: `{"code", "message"}` with an HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"code": self.code, "message": self.message})),
        )
            .into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(m) => Self::invalid(m),
            RegistryError::NotFound(m) => Self::not_found(m),
            RegistryError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            RegistryError::Storage(e) => e.into(),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        tracing::error!(error = %e, "storage error in API");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            format!("the registry database failed: {e}; retry later"),
        )
    }
}

/// JSON body extractor whose rejections are API errors.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

#[axum::async_trait]
impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(ApiError::new(
                rejection.status(),
                "invalid_json",
                format!("request body: {}", rejection.body_text()),
            )),
        }
    }
}

/// An optional JSON body: none (or only white space) is `None`; anything else must be JSON
/// of the right shape (an `Option<ApiJson<T>>` would take a broken body as no body).
#[derive(Debug)]
pub struct OptionalJson<T>(pub Option<T>);

#[axum::async_trait]
impl<S, T> FromRequest<S> for OptionalJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                let v = v.split(';').next().unwrap_or("").trim();
                v == "application/json" || v.ends_with("+json")
            });
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), "invalid_body", e.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        if !json_type {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with `Content-Type: application/json`",
            ));
        }
        serde_json::from_slice(&bytes)
            .map(|v| Self(Some(v)))
            .map_err(|e| {
                let status = if e.is_data() {
                    StatusCode::UNPROCESSABLE_ENTITY
                } else {
                    StatusCode::BAD_REQUEST
                };
                ApiError::new(status, "invalid_json", format!("request body: {e}"))
            })
    }
}

/// A query string; a malformed or unknown parameter is a JSON error (the query structs deny
/// unknown fields, so a misspelt filter is not silently ignored).
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

#[axum::async_trait]
impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Self(v)),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                e.body_text(),
            )),
        }
    }
}

/// One line per request at info: method, path (never the query's or headers' secrets:
/// the token travels in a header), status and duration.
async fn access_log(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = std::time::Instant::now();
    let res = next.run(req).await;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        target: "ironlink_cloud::http",
        method = %method,
        path,
        status = res.status().as_u16(),
        duration_ms = format!("{:.1}", seconds * 1000.0),
        "HTTP request"
    );
    res
}

/// Turns every error answer that is not already the JSON error object (path parameters,
/// unknown methods, framework refusals) into one, keeping its status and headers.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let (code, fallback) = match status {
        StatusCode::BAD_REQUEST => ("invalid_request", "the request is malformed"),
        StatusCode::NOT_FOUND => ("not_found", "no such endpoint: see /api/v1/openapi.json"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this path does not take this method: see /api/v1/openapi.json",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        StatusCode::UNPROCESSABLE_ENTITY => ("invalid_json", "the request body does not fit"),
        StatusCode::REQUEST_TIMEOUT => ("timeout", "the request took too long to arrive"),
        s if s.is_server_error() => ("internal", "the server failed; see its log"),
        _ => ("invalid_request", "the request was refused"),
    };
    let message = if text.is_empty() {
        fallback.to_owned()
    } else {
        text
    };
    let mut out = ApiError::new(status, code, message).into_response();
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

type ApiResult<T> = Result<T, ApiError>;

mod apps;
mod rules;
mod thing;

/// Builds the router.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/products", post(create_product).get(list_products))
        .route(
            "/products/:pk",
            get(get_product)
                .delete(delete_product)
                .patch(update_product),
        )
        .route(
            "/products/:pk/devices",
            post(create_devices).get(list_devices),
        )
        .route("/products/:pk/broadcast", post(broadcast))
        .route(
            "/products/:pk/thing-model",
            get(get_thing_model).put(put_thing_model),
        )
        .route("/products/:pk/credentials", get(product_credentials))
        .route("/devices/:pk/:dn", get(get_device).delete(delete_device))
        .route("/devices/:pk/:dn/credentials", get(device_credentials))
        .route("/devices/:pk/:dn/disable", post(disable_device))
        .route("/devices/:pk/:dn/enable", post(enable_device))
        .route("/devices/:pk/:dn/messages", post(publish_to_device))
        .route("/devices/:pk/:dn/presence", get(presence_history))
        .route("/devices/:pk/:dn/tags", axum::routing::put(put_tags))
        .merge(thing::routes())
        .merge(apps::routes())
        .merge(rules::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route("/openapi.json", get(openapi));
    Router::new()
        .nest("/api/v1", api)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { ApiError::not_found("no such endpoint: see /api/v1/openapi.json") })
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

async fn require_token(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = state.token.as_bytes();
    let ok = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !ok {
        let mut r = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token: send `Authorization: Bearer <admin token>` (printed at first start, kept in {data_dir}/admin-token)",
        )
        .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"ironlink\""),
        );
        return r;
    }
    next.run(req).await
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}

async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    let sh = &s.shared;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        sh.metrics.render(sh.router.routed(), sh.router.dropped())
            + &sh.apps.render_metrics()
            + &sh.rules.render_metrics(),
    )
}

async fn create_product(
    State(s): State<ApiState>,
    ApiJson(body): ApiJson<NewProduct>,
) -> ApiResult<impl IntoResponse> {
    let p = registry::create_product(&s.shared.db, body).await?;
    Ok((StatusCode::CREATED, Json(p)))
}

async fn list_products(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let products: Vec<Value> = s
        .shared
        .db
        .list_products()
        .await?
        .into_iter()
        .map(product_json)
        .collect();
    Ok(Json(json!({ "products": products })))
}

/// A product as lists and gets show it: without its secret (see `product_credentials`).
fn product_json(p: crate::storage::Product) -> Value {
    let mut v = serde_json::to_value(&p).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("product_secret");
    }
    v
}

async fn get_product(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(product_json(require_product(&s, &pk).await?)))
}

/// The product secret (dynamic registration), on an explicit call that is logged for audit.
async fn product_credentials(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let p = require_product(&s, &pk).await?;
    tracing::info!(target: "ironlink_cloud::audit", product_key = %pk, "product secret read through the API");
    Ok(Json(json!({
        "product_key": p.product_key,
        "product_secret": p.product_secret,
        "dynamic_register": p.dynamic_register != 0,
    })))
}

/// A device's secret and where to connect, on an explicit call that is logged for audit.
async fn device_credentials(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let d = require_device(&s, &pk, &dn).await?;
    tracing::info!(target: "ironlink_cloud::audit", product_key = %pk, device_name = %dn, "device secret read through the API");
    let ports = s.shared.listeners.get().copied().unwrap_or_default();
    Ok(Json(json!({
        "product_key": d.product_key,
        "device_name": d.device_name,
        "device_secret": d.device_secret,
        "mqtt_port": ports.mqtt,
        "mqtts_port": ports.mqtts,
    })))
}

fn unknown_product(pk: &str) -> ApiError {
    ApiError::not_found(format!(
        "product `{pk}` does not exist: list products with GET /api/v1/products"
    ))
}

fn unknown_device(pk: &str, dn: &str) -> ApiError {
    ApiError::not_found(format!(
        "device `{pk}/{dn}` does not exist: list devices with GET /api/v1/products/{pk}/devices"
    ))
}

/// The product, or the API's 404 for it.
async fn require_product(s: &ApiState, pk: &str) -> ApiResult<crate::storage::Product> {
    s.shared
        .db
        .get_product(pk)
        .await?
        .ok_or_else(|| unknown_product(pk))
}

/// The device, or the API's 404 for it.
async fn require_device(s: &ApiState, pk: &str, dn: &str) -> ApiResult<Device> {
    s.shared
        .db
        .get_device(pk, dn)
        .await?
        .ok_or_else(|| unknown_device(pk, dn))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductUpdate {
    name: Option<String>,
    description: Option<String>,
    dynamic_register: Option<bool>,
}

async fn update_product(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
    ApiJson(body): ApiJson<ProductUpdate>,
) -> ApiResult<impl IntoResponse> {
    let current = require_product(&s, &pk).await?;
    if let Some(on) = body.dynamic_register {
        s.shared.db.set_dynamic_register(&pk, on).await?;
    }
    if body.name.is_some() || body.description.is_some() {
        let name = body.name.unwrap_or(current.name);
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 {
            return Err(ApiError::invalid("product name must be 1 to 64 characters"));
        }
        let description = body.description.unwrap_or(current.description);
        s.shared
            .db
            .update_product_text(&pk, name, &description)
            .await?;
    }
    let p = require_product(&s, &pk).await?;
    Ok(Json(product_json(p)))
}

async fn put_tags(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiJson(body): ApiJson<serde_json::Map<String, Value>>,
) -> ApiResult<impl IntoResponse> {
    if body.len() > 100 {
        return Err(ApiError::invalid("at most 100 tags per device"));
    }
    if let Some((k, _)) = body
        .iter()
        .find(|(k, v)| k.is_empty() || k.len() > 64 || !v.is_string())
    {
        return Err(ApiError::invalid(format!(
            "tag `{k}`: keys must be 1 to 64 characters and values strings"
        )));
    }
    let text = Value::Object(body).to_string();
    if !s.shared.db.set_device_tags(&pk, &dn, &text).await? {
        return Err(unknown_device(&pk, &dn));
    }
    let d = require_device(&s, &pk, &dn).await?;
    Ok(Json(device_json(&s, d)))
}

async fn put_thing_model(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<impl IntoResponse> {
    require_product(&s, &pk).await?;
    let text = body.to_string();
    let model = ironlink_shared::tsl::parse(&text).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_thing_model",
            format!("thing model of product `{pk}`: {e}"),
        )
    })?;
    let version = s
        .shared
        .db
        .put_thing_model(&pk, &text, crate::registry::now_ms())
        .await?;
    s.shared.thing.forget_model(&pk);
    Ok(Json(json!({
        "product_key": pk,
        "version": version,
        "properties": model.properties.len(),
        "events": model.events.len(),
        "services": model.services.len(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionQuery {
    version: Option<i64>,
}

async fn get_thing_model(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
    ApiQuery(q): ApiQuery<VersionQuery>,
) -> ApiResult<impl IntoResponse> {
    require_product(&s, &pk).await?;
    match s.shared.db.get_thing_model(&pk, q.version).await? {
        Some((version, tsl, created_at)) => Ok(Json(json!({
            "product_key": pk,
            "version": version,
            "created_at": created_at,
            "tsl": serde_json::from_str::<Value>(&tsl).unwrap_or(Value::Null),
        }))),
        None => Err(ApiError::not_found(match q.version {
            Some(v) => format!("product `{pk}` has no thing model version {v}"),
            None => format!(
                "product `{pk}` has no thing model yet: import one with PUT /api/v1/products/{pk}/thing-model"
            ),
        })),
    }
}

async fn delete_product(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
) -> ApiResult<impl IntoResponse> {
    if !s.shared.db.delete_product(&pk).await? {
        return Err(unknown_product(&pk));
    }
    s.shared.thing.forget_model(&pk);
    s.shared.thing.forget_series();
    let kicked = s
        .shared
        .sessions
        .kick_product(&pk, &Kick::Admin("product deleted".into()));
    Ok(Json(json!({"deleted": pk, "disconnected": kicked})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDevices {
    device_name: Option<String>,
    #[serde(default)]
    device_names: Vec<String>,
    count: Option<usize>,
}

async fn create_devices(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
    OptionalJson(body): OptionalJson<CreateDevices>,
) -> ApiResult<impl IntoResponse> {
    let body = body.unwrap_or(CreateDevices {
        device_name: None,
        device_names: vec![],
        count: None,
    });
    let batch = !body.device_names.is_empty() || body.count.is_some();
    if batch && body.device_name.is_some() {
        return Err(ApiError::invalid(
            "give either device_name (one device) or device_names/count (a batch), not both",
        ));
    }
    let names: Vec<String> = body
        .device_name
        .into_iter()
        .chain(body.device_names)
        .collect();
    let generate = match (batch, body.count) {
        (true, Some(n)) => n,
        (true, None) => 0,
        (false, _) => usize::from(names.is_empty()),
    };
    let devices = registry::create_devices(&s.shared.db, &pk, names, generate).await?;
    let changes = devices
        .iter()
        .map(|d| Change {
            product_key: d.product_key.clone(),
            device_name: d.device_name.clone(),
            action: Action::Create,
            device_secret: Some(d.device_secret.clone()),
        })
        .collect();
    announce(&s, changes).await;
    if batch {
        Ok((StatusCode::CREATED, Json(json!({ "devices": devices }))))
    } else {
        let d = devices
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::invalid("no device created"))?;
        let secret = d.device_secret.clone();
        let mut v = device_json(&s, d);
        if let Some(o) = v.as_object_mut() {
            // Shown at creation, then only through the audited credentials call.
            o.insert("device_secret".into(), json!(secret));
        }
        Ok((StatusCode::CREATED, Json(v)))
    }
}

fn device_json(s: &ApiState, d: Device) -> Value {
    let online = s.shared.sessions.is_online(&d.product_key, &d.device_name);
    let mut v = serde_json::to_value(&d).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        // Live sessions are the truth; the stored status follows them asynchronously.
        let status = match (online, d.status.as_str()) {
            (true, _) => "online",
            (false, "online") => "offline",
            (false, other) => other,
        };
        obj.remove("device_secret");
        obj.insert("status".into(), json!(status));
        obj.insert("online".into(), json!(online));
        obj.insert(
            "tags".into(),
            serde_json::from_str(&d.tags).unwrap_or_else(|_| json!({})),
        );
    }
    v
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceFilter {
    page: Option<i64>,
    page_size: Option<i64>,
    /// `online`, `offline` or `unactive` (as stored; follows the sessions within a moment).
    status: Option<String>,
    /// `KEY:VALUE`: devices whose tag KEY is VALUE.
    tag: Option<String>,
}

async fn list_devices(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
    ApiQuery(q): ApiQuery<DeviceFilter>,
) -> ApiResult<impl IntoResponse> {
    require_product(&s, &pk).await?;
    let page = q.page.unwrap_or(1);
    let size = q.page_size.unwrap_or(50);
    if page < 1 || !(1..=1000).contains(&size) {
        return Err(ApiError::invalid(
            "page must be >= 1 and page_size between 1 and 1000",
        ));
    }
    if let Some(st) = q.status.as_deref() {
        if !matches!(st, "online" | "offline" | "unactive") {
            return Err(ApiError::invalid(format!(
                "status `{st}` must be online, offline or unactive"
            )));
        }
    }
    let tag = match q.tag.as_deref() {
        None => None,
        Some(t) => Some(
            t.split_once(':')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| ApiError::invalid(format!("tag `{t}` must be KEY:VALUE")))?,
        ),
    };
    let filter = crate::storage::DeviceFilter {
        status: q.status.as_deref(),
        tag,
    };
    let (devices, total) = s
        .shared
        .db
        .list_devices(&pk, &filter, (page - 1) * size, size)
        .await?;
    let devices: Vec<Value> = devices.into_iter().map(|d| device_json(&s, d)).collect();
    Ok(Json(
        json!({"devices": devices, "page": page, "page_size": size, "total": total}),
    ))
}

async fn get_device(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let d = require_device(&s, &pk, &dn).await?;
    Ok(Json(device_json(&s, d)))
}

async fn delete_device(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    if !s.shared.db.delete_device(&pk, &dn).await? {
        return Err(unknown_device(&pk, &dn));
    }
    s.shared.thing.forget_series();
    let kicked = s
        .shared
        .sessions
        .kick(&pk, &dn, Kick::Admin("device deleted".into()));
    announce(&s, vec![change(&pk, &dn, Action::Delete)]).await;
    Ok(Json(
        json!({"deleted": format!("{pk}/{dn}"), "disconnected": kicked}),
    ))
}

async fn set_enabled(s: &ApiState, pk: &str, dn: &str, enabled: bool) -> ApiResult<Json<Value>> {
    if !s.shared.db.set_device_enabled(pk, dn, enabled).await? {
        return Err(unknown_device(pk, dn));
    }
    let kicked = !enabled
        && s.shared
            .sessions
            .kick(pk, dn, Kick::Admin("device disabled".into()));
    let action = if enabled {
        Action::Enable
    } else {
        Action::Disable
    };
    announce(s, vec![change(pk, dn, action)]).await;
    let d = require_device(s, pk, dn).await?;
    let mut v = device_json(s, d);
    if let Some(o) = v.as_object_mut() {
        o.insert("disconnected".into(), json!(kicked));
    }
    Ok(Json(v))
}

fn change(pk: &str, dn: &str, action: Action) -> Change {
    Change {
        product_key: pk.to_owned(),
        device_name: dn.to_owned(),
        action,
        device_secret: None,
    }
}

/// Device lifecycle messages for applications and rules; the change itself is already made.
async fn announce(s: &ApiState, changes: Vec<Change>) {
    lifecycle::announce(
        &s.shared.apps,
        &s.shared.router,
        changes,
        registry::now_ms(),
    )
    .await;
}

async fn disable_device(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    set_enabled(&s, &pk, &dn, false).await
}

async fn enable_device(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    set_enabled(&s, &pk, &dn, true).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    topic: String,
    /// A string is sent as is; any other JSON value is sent serialized.
    payload: Option<Value>,
    /// Binary payloads, base64 (standard alphabet).
    payload_base64: Option<String>,
    #[serde(default)]
    qos: u8,
}

/// The bytes of a `payload` (text as is, other JSON serialized) or `payload_base64`.
fn payload_bytes(payload: &Option<Value>, payload_base64: &Option<String>) -> ApiResult<Bytes> {
    match (payload, payload_base64) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "give payload or payload_base64, not both",
        )),
        (Some(Value::String(s)), None) => Ok(Bytes::from(s.clone())),
        (Some(v), None) => Ok(Bytes::from(v.to_string())),
        (None, Some(b64)) => decode_base64(b64)
            .map(Bytes::from)
            .ok_or_else(|| ApiError::invalid("payload_base64 is not valid base64")),
        (None, None) => Ok(Bytes::new()),
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

async fn publish_to_device(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiJson(body): ApiJson<PublishBody>,
) -> ApiResult<impl IntoResponse> {
    if body.qos > 1 {
        return Err(ApiError::invalid("qos must be 0 or 1 (Alink has no QoS 2)"));
    }
    require_device(&s, &pk, &dn).await?;
    if !device_may(Access::Publish, DeviceRef::new(&pk, &dn), &body.topic) {
        return Err(ApiError::invalid(format!(
            "topic `{}` is not one of device `{pk}/{dn}`'s topics: use /sys/{pk}/{dn}/..., /{pk}/{dn}/user/..., /shadow/.../{pk}/{dn} or /ota/device/.../{pk}/{dn}",
            body.topic
        )));
    }
    if !s.shared.sessions.is_online(&pk, &dn) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "device_offline",
            format!("device `{pk}/{dn}` is offline: messages are delivered only to online devices"),
        ));
    }
    let payload = payload_bytes(&body.payload, &body.payload_base64)?;
    let delivered = s.shared.router.publish(Message {
        topic: body.topic.clone(),
        payload,
        qos: body.qos,
        retain: false,
    });
    Ok(Json(json!({"topic": body.topic, "delivered": delivered})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    topic: String,
    payload: Option<Value>,
    payload_base64: Option<String>,
    /// 0 (default) or 1; each device receives at most its subscription's QoS.
    #[serde(default)]
    qos: u8,
}

async fn broadcast(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
    ApiJson(body): ApiJson<BroadcastBody>,
) -> ApiResult<impl IntoResponse> {
    require_product(&s, &pk).await?;
    if body.qos > 1 {
        return Err(ApiError::invalid("qos must be 0 or 1 (Alink has no QoS 2)"));
    }
    let suffix = body.topic.trim_start_matches('/');
    let topic = format!("/broadcast/{pk}/{suffix}");
    if suffix.is_empty() || !valid_topic_name(&topic) {
        return Err(ApiError::invalid(
            "topic must be a non-empty topic name without + or #; it is published as /broadcast/{pk}/{topic}",
        ));
    }
    let payload = payload_bytes(&body.payload, &body.payload_base64)?;
    let delivered = s.shared.router.publish(Message {
        topic: topic.clone(),
        payload,
        qos: body.qos,
        retain: false,
    });
    Ok(Json(json!({"topic": topic, "delivered": delivered})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    limit: Option<i64>,
}

async fn presence_history(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let events = s.shared.db.presence_history(&pk, &dn, limit).await?;
    Ok(Json(json!({ "events": events })))
}

#[cfg(test)]
mod tests {
    use super::decode_base64;

    #[test]
    fn base64_decodes_and_refuses_garbage() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("AAEC").unwrap(), [0, 1, 2]);
        assert!(decode_base64("a*b").is_none());
    }
}
