//! HTTP API: JSON under `/api/v1`, bearer token, OpenAPI document at `/api/v1/openapi.json`.

use crate::access::sessions::Kick;
use crate::access::Shared;
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
        .route("/devices/:pk/:dn", get(get_device).delete(delete_device))
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
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token: send `Authorization: Bearer <admin token>` (printed at first start, kept in {data_dir}/admin-token)",
        )
        .into_response();
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
    let products = s.shared.db.list_products().await?;
    Ok(Json(json!({ "products": products })))
}

async fn get_product(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(require_product(&s, &pk).await?))
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
    Ok(Json(p))
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
struct VersionQuery {
    version: Option<i64>,
}

async fn get_thing_model(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
    Query(q): Query<VersionQuery>,
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
    body: Option<ApiJson<CreateDevices>>,
) -> ApiResult<impl IntoResponse> {
    let body = body.map(|b| b.0).unwrap_or(CreateDevices {
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
    if batch {
        Ok((StatusCode::CREATED, Json(json!({ "devices": devices }))))
    } else {
        let d = devices
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::invalid("no device created"))?;
        Ok((StatusCode::CREATED, Json(device_json(&s, d))))
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
struct Page {
    page: Option<i64>,
    page_size: Option<i64>,
}

async fn list_devices(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
    Query(q): Query<Page>,
) -> ApiResult<impl IntoResponse> {
    require_product(&s, &pk).await?;
    let page = q.page.unwrap_or(1);
    let size = q.page_size.unwrap_or(50);
    if page < 1 || !(1..=1000).contains(&size) {
        return Err(ApiError::invalid(
            "page must be >= 1 and page_size between 1 and 1000",
        ));
    }
    let (devices, total) = s
        .shared
        .db
        .list_devices(&pk, (page - 1) * size, size)
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
    let d = require_device(s, pk, dn).await?;
    let mut v = device_json(s, d);
    if let Some(o) = v.as_object_mut() {
        o.insert("disconnected".into(), json!(kicked));
    }
    Ok(Json(v))
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
struct HistoryQuery {
    limit: Option<i64>,
}

async fn presence_history(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
    Query(q): Query<HistoryQuery>,
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
