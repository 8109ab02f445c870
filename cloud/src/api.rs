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
    /// The admin token.
    pub token: Arc<str>,
    /// Named users, API keys and the audit log.
    pub users: Arc<crate::users::Users>,
}

/// An error answer: `{"code", "message"}` with an HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Where in a text the request sent the error is (`line`, `column`, 1-based).
    at: Option<(u64, u64)>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            at: None,
        }
    }

    /// A text the request sent (a SQL query) refused at a line and column.
    fn at(message: impl Into<String>, line: u64, column: u64) -> Self {
        Self {
            at: Some((line, column)),
            ..Self::new(StatusCode::BAD_REQUEST, "sql_error", message)
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
        let body = match self.at {
            Some((line, column)) => {
                json!({"code": self.code, "message": self.message, "line": line, "column": column})
            }
            None => json!({"code": self.code, "message": self.message}),
        };
        (self.status, Json(body)).into_response()
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
        match e {
            StorageError::Conflict(m) => return Self::new(StatusCode::CONFLICT, "conflict", m),
            StorageError::TooLarge(m) => return Self::invalid(m),
            _ => {}
        }
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
async fn access_log(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = std::time::Instant::now();
    let res = next.run(req).await;
    let seconds = started.elapsed().as_secs_f64();
    s.shared.metrics.latency.api.record(seconds);
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

/// Whole numbers in request bodies: JSON Schema's `integer` includes `1.0`, serde's integers
/// do not, so a client that writes `1.0` would be refused for a value it may send.
pub(crate) use crate::serde_int as int;

mod analytics;
mod apps;
pub mod console;
pub mod doc;
mod jobs;
mod ota;
mod rules;
pub mod serve;
mod thing;
mod timeseries;
mod users;

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
        .route("/devices/:pk/:dn/limits", get(device_limits))
        .route("/devices/:pk/:dn/tags", axum::routing::put(put_tags))
        .merge(thing::routes())
        .merge(apps::routes())
        .merge(rules::routes())
        .merge(ota::routes())
        .merge(timeseries::routes())
        .merge(analytics::routes())
        .merge(jobs::routes())
        .merge(users::routes())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            users::authorize,
        ))
        .merge(users::public_routes())
        .route("/openapi.json", get(openapi));
    Router::new()
        .nest("/api/v1", api)
        .route("/ota/download/:token", get(ota::download))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .merge(console::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint: see /api/v1/openapi.json") })
        .layer(axum::extract::DefaultBodyLimit::max(
            state.shared.config.http.max_body_bytes,
        ))
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state)
}

async fn openapi() -> impl IntoResponse {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOC.get_or_init(doc::json).as_str(),
    )
}

async fn metrics(State(s): State<ApiState>, req: Request) -> Response {
    if s.shared.config.http.metrics_need_token {
        match users::principal(&s, req.headers()).await {
            Ok(Some(_)) => {}
            Ok(None) => return users::unauthorized(),
            Err(e) => return e.into_response(),
        }
    }
    let sh = &s.shared;
    sh.thing.limits.export_metrics(&sh.metrics.registry);
    sh.metrics.export(sh.router.routed(), sh.router.dropped());
    sh.apps.export_metrics(&sh.metrics.registry);
    sh.rules.export_metrics(&sh.metrics.registry);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        sh.metrics.registry.render(),
    )
        .into_response()
}

#[utoipa::path(
    post,
    path = "/products",
    tag = "products",
    operation_id = "create_product",
    summary = "Create a product (its secret is shown here and through its credentials only)",
    request_body = NewProduct,
    responses((status = 201, description = "Created", body = doc::ProductCreated))
)]
async fn create_product(
    State(s): State<ApiState>,
    ApiJson(body): ApiJson<NewProduct>,
) -> ApiResult<impl IntoResponse> {
    let p = registry::create_product(&s.shared.db, body).await?;
    Ok((StatusCode::CREATED, Json(p)))
}

#[utoipa::path(
    get,
    path = "/products",
    tag = "products",
    operation_id = "list_products",
    summary = "List products (without secrets)",
    responses((status = 200, description = "Products", body = doc::ProductList))
)]
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

#[utoipa::path(
    get,
    path = "/products/{pk}",
    tag = "products",
    operation_id = "get_product",
    summary = "Show a product (without its secret)",
    params(("pk" = String, Path, description = "Product key")),
    responses((status = 200, description = "The product", body = doc::ProductView), (status = 404, description = "No such product", body = doc::ErrorBody))
)]
async fn get_product(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(product_json(require_product(&s, &pk).await?)))
}

/// The product secret (dynamic registration), on an explicit call that is logged for audit.
#[utoipa::path(
    get,
    path = "/products/{pk}/credentials",
    tag = "products",
    operation_id = "product_credentials",
    summary = "The product secret for dynamic registration (audited in the log)",
    params(("pk" = String, Path, description = "Product key")),
    responses((status = 200, description = "Secret", body = doc::ProductCredentials), (status = 404, description = "No such product", body = doc::ErrorBody))
)]
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
#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/credentials",
    tag = "devices",
    operation_id = "device_credentials",
    summary = "A device's secret and the ports to connect to (audited in the log)",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    responses((status = 200, description = "Secret and ports", body = doc::DeviceCredentials), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ProductUpdate {
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    name: Option<String>,
    description: Option<String>,
    dynamic_register: Option<bool>,
}

#[utoipa::path(
    patch,
    path = "/products/{pk}",
    tag = "products",
    operation_id = "update_product",
    summary = "Change a product's name, description or dynamic registration",
    params(("pk" = String, Path, description = "Product key")),
    request_body = ProductUpdate,
    responses((status = 200, description = "The product", body = doc::ProductView), (status = 404, description = "No such product", body = doc::ErrorBody))
)]
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
        registry::check_label("product name", name, 64).map_err(ApiError::invalid)?;
        let description = body.description.unwrap_or(current.description);
        s.shared
            .db
            .update_product_text(&pk, name, &description)
            .await?;
    }
    let p = require_product(&s, &pk).await?;
    Ok(Json(product_json(p)))
}

#[utoipa::path(
    put,
    path = "/devices/{pk}/{dn}/tags",
    tag = "devices",
    operation_id = "put_tags",
    summary = "Replace a device's tags",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    request_body = doc::Tags,
    responses((status = 200, description = "The device", body = doc::DeviceView), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
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

#[utoipa::path(
    put,
    path = "/products/{pk}/thing-model",
    tag = "thing model",
    operation_id = "put_thing_model",
    summary = "Import a thing model (Alibaba TSL JSON) as a new version",
    params(("pk" = String, Path, description = "Product key")),
    request_body = doc::ThingModelDoc,
    responses((status = 200, description = "Stored", body = doc::ThingModelStored), (status = 404, description = "No such product", body = doc::ErrorBody))
)]
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct VersionQuery {
    /// A version number; default the newest.
    #[param(minimum = 1)]
    version: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/products/{pk}/thing-model",
    tag = "thing model",
    operation_id = "get_thing_model",
    summary = "The current (or a given) thing model version",
    params(("pk" = String, Path, description = "Product key"), VersionQuery),
    responses((status = 200, description = "The model", body = doc::ThingModelVersion), (status = 404, description = "No such product or version", body = doc::ErrorBody))
)]
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

#[utoipa::path(
    delete,
    path = "/products/{pk}",
    tag = "products",
    operation_id = "delete_product",
    summary = "Delete a product with its devices (they are disconnected)",
    params(("pk" = String, Path, description = "Product key")),
    responses((status = 200, description = "Deleted", body = doc::Deleted), (status = 404, description = "No such product", body = doc::ErrorBody))
)]
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
    if s.shared.router.drop_retained_of(&pk, None) > 0 {
        crate::access::release_memory();
    }
    Ok(Json(json!({"deleted": pk, "disconnected": kicked})))
}

/// One device (`device_name`, or nothing for one with a generated name) or a batch
/// (`device_names` and/or `count`, 1,000 devices at most in all, names unique; a
/// `device_name` that `device_names` also holds is the same device).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateDevices {
    #[schema(value_type = Option<doc::DeviceName>)]
    device_name: Option<String>,
    #[serde(default)]
    #[schema(schema_with = doc::device_names)]
    device_names: Vec<String>,
    #[serde(default, deserialize_with = "int::opt")]
    #[schema(minimum = 0, maximum = 500)]
    count: Option<usize>,
}

#[utoipa::path(
    post,
    path = "/products/{pk}/devices",
    tag = "devices",
    operation_id = "create_devices",
    summary = "Create one device (device_name, or none for a generated name) or a batch (device_names and/or count, 1,000 at most)",
    params(("pk" = String, Path, description = "Product key")),
    request_body = CreateDevices,
    responses((status = 201, description = "Created: one device, or `devices` for a batch", body = doc::DeviceCreatedOrBatch), (status = 404, description = "No such product", body = doc::ErrorBody), (status = 409, description = "A name is taken", body = doc::ErrorBody))
)]
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
    // `device_name` alone (or nothing) is one device; with `device_names` or a count it is
    // one more name of the batch, unless `device_names` already names it (one device then,
    // not a duplicate: the two fields say the same thing).
    let count = body.count.unwrap_or(0);
    let batch = !body.device_names.is_empty() || count > 0;
    let names: Vec<String> = body
        .device_name
        .filter(|n| !body.device_names.contains(n))
        .into_iter()
        .chain(body.device_names)
        .collect();
    let generate = if batch {
        count
    } else {
        usize::from(names.is_empty())
    };
    let devices = registry::create_devices(&s.shared.db, &pk, names, generate).await?;
    let changes = devices.iter().map(Change::created).collect();
    announce(&s, changes).await;
    if batch {
        let devices: Vec<Value> = devices.into_iter().map(|d| created_json(&s, d)).collect();
        Ok((StatusCode::CREATED, Json(json!({ "devices": devices }))))
    } else {
        let d = devices
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::invalid("no device created"))?;
        Ok((StatusCode::CREATED, Json(created_json(&s, d))))
    }
}

/// A new device as the API shows it, with its secret (shown at creation, then only through
/// the audited credentials call).
fn created_json(s: &ApiState, d: Device) -> Value {
    let secret = d.device_secret.clone();
    let mut v = device_json(s, d);
    if let Some(o) = v.as_object_mut() {
        o.insert("device_secret".into(), json!(secret));
    }
    v
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DeviceFilter {
    /// Page number, from 1.
    #[param(minimum = 1)]
    page: Option<i64>,
    /// Devices per page, 1 to 1,000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    page_size: Option<i64>,
    /// `online`, `offline` or `unactive` (as stored; follows the sessions within a moment).
    #[param(pattern = "^(online|offline|unactive)$")]
    status: Option<String>,
    /// `KEY:VALUE`: devices whose tag KEY is VALUE.
    #[param(pattern = "^[^:]+:")]
    tag: Option<String>,
    /// Devices whose name contains this text.
    #[param(max_length = 64)]
    name: Option<String>,
}

#[utoipa::path(
    get,
    path = "/products/{pk}/devices",
    tag = "devices",
    operation_id = "list_devices",
    summary = "List a product's devices, filtered by status, tag and name",
    params(("pk" = String, Path, description = "Product key"), DeviceFilter),
    responses((status = 200, description = "A page of devices", body = doc::DeviceList), (status = 404, description = "No such product", body = doc::ErrorBody))
)]
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
        name: q.name.as_deref(),
    };
    let (devices, total) = s
        .shared
        .db
        // A page past any possible device is simply empty (saturating: never an overflow).
        .list_devices(&pk, &filter, (page - 1).saturating_mul(size), size)
        .await?;
    let devices: Vec<Value> = devices.into_iter().map(|d| device_json(&s, d)).collect();
    Ok(Json(
        json!({"devices": devices, "page": page, "page_size": size, "total": total}),
    ))
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}",
    tag = "devices",
    operation_id = "get_device",
    summary = "Show a device (without its secret)",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    responses((status = 200, description = "The device", body = doc::DeviceView), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
async fn get_device(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let d = require_device(&s, &pk, &dn).await?;
    Ok(Json(device_json(&s, d)))
}

#[utoipa::path(
    delete,
    path = "/devices/{pk}/{dn}",
    tag = "devices",
    operation_id = "delete_device",
    summary = "Delete a device (it is disconnected)",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    responses((status = 200, description = "Deleted", body = doc::Deleted), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
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
    s.shared.thing.limits.forget(&pk, &dn);
    if s.shared.router.drop_retained_of(&pk, Some(&dn)) > 0 {
        crate::access::release_memory();
    }
    announce(&s, vec![Change::new(&pk, &dn, Action::Delete)]).await;
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
    announce(s, vec![Change::new(pk, dn, action)]).await;
    let d = require_device(s, pk, dn).await?;
    let mut v = device_json(s, d);
    if let Some(o) = v.as_object_mut() {
        o.insert("disconnected".into(), json!(kicked));
    }
    Ok(Json(v))
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

#[utoipa::path(
    post,
    path = "/devices/{pk}/{dn}/disable",
    tag = "devices",
    operation_id = "disable_device",
    summary = "Disable a device (it is disconnected at once)",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    responses((status = 200, description = "The device", body = doc::DeviceView), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
async fn disable_device(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    set_enabled(&s, &pk, &dn, false).await
}

#[utoipa::path(
    post,
    path = "/devices/{pk}/{dn}/enable",
    tag = "devices",
    operation_id = "enable_device",
    summary = "Enable a device",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    responses((status = 200, description = "The device", body = doc::DeviceView), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
async fn enable_device(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    set_enabled(&s, &pk, &dn, true).await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    /// One of the device's topics: /sys/{pk}/{dn}/..., /{pk}/{dn}/user/..., ...
    topic: String,
    /// A string is sent as is; any other JSON value is sent serialized.
    #[schema(value_type = Option<Object>)]
    payload: Option<Value>,
    /// Binary payloads, base64 (standard alphabet).
    payload_base64: Option<String>,
    #[serde(default, deserialize_with = "int::req")]
    #[schema(minimum = 0, maximum = 1)]
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

#[utoipa::path(
    post,
    path = "/devices/{pk}/{dn}/messages",
    tag = "devices",
    operation_id = "publish_to_device",
    summary = "Publish a message on one of an online device's topics",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    request_body = PublishBody,
    responses((status = 200, description = "Published", body = doc::Published), (status = 404, description = "No such device", body = doc::ErrorBody), (status = 409, description = "The device is offline", body = doc::ErrorBody))
)]
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    /// Published as /broadcast/{pk}/{topic}; no + or #.
    #[schema(min_length = 1, pattern = "^[^+#]*[^/+#][^+#]*$")]
    topic: String,
    #[schema(value_type = Option<Object>)]
    payload: Option<Value>,
    /// Bytes, base64 (standard alphabet); not with `payload`.
    #[schema(pattern = r"^[A-Za-z0-9+/\s]*=*$")]
    payload_base64: Option<String>,
    /// 0 (default) or 1; each device receives at most its subscription's QoS.
    #[serde(default, deserialize_with = "int::req")]
    #[schema(minimum = 0, maximum = 1)]
    qos: u8,
}

#[utoipa::path(
    post,
    path = "/products/{pk}/broadcast",
    tag = "devices",
    operation_id = "broadcast",
    summary = "Broadcast to a product's devices on /broadcast/{pk}/{topic}",
    params(("pk" = String, Path, description = "Product key")),
    request_body = BroadcastBody,
    responses((status = 200, description = "Published", body = doc::Published), (status = 404, description = "No such product", body = doc::ErrorBody))
)]
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    /// Most events (1 to 1,000, default 100).
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/presence",
    tag = "devices",
    operation_id = "presence_history",
    summary = "Online/offline history with reasons",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name"), HistoryQuery),
    responses((status = 200, description = "Events, newest first", body = doc::PresenceList), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
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

/// A device's limits and what they refused.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct DeviceLimitsView {
    /// The limits in force for this device (its product's overrides applied).
    limits: crate::config::DeviceLimits,
    /// Refusals since the server started.
    refused: crate::access::limits::DeviceRefusals,
    /// Unvalidated bytes stored today (UTC), against `limits.unvalidated_bytes_per_day`.
    unvalidated_bytes_today: u64,
    /// Retained messages the device keeps, and their bytes.
    retained_messages: usize,
    /// Bytes of its retained messages.
    retained_bytes: usize,
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/limits",
    tag = "devices",
    operation_id = "device_limits",
    summary = "The device's limits (rate, sizes, subscriptions, retained, storage quota) and what they refused since start",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    responses((status = 200, description = "Limits and refusals", body = DeviceLimitsView), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
async fn device_limits(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<Json<DeviceLimitsView>> {
    require_device(&s, &pk, &dn).await?;
    let limits = &s.shared.thing.limits;
    let (retained_messages, retained_bytes) = s.shared.router.retained_usage(Some((&pk, &dn)));
    Ok(Json(DeviceLimitsView {
        limits: limits.of(&pk),
        refused: limits.refusals(&pk, &dn),
        unvalidated_bytes_today: limits.unvalidated_today(&pk, &dn, crate::registry::now_ms()),
        retained_messages,
        retained_bytes,
    }))
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
