//! Thing data endpoints: properties (latest, history, set, get), events, service calls,
//! shadows, sub-devices and raw data. Times are epoch milliseconds.

use super::{doc, payload_bytes, require_device, ApiError, ApiJson, ApiQuery, ApiResult, ApiState};
use crate::registry::now_ms;
use crate::thing::calls::Kind;
use crate::thing::store::ServiceCall;
use crate::thing::{shadow, to_device, CallError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::time::Duration;

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route(
            "/devices/:pk/:dn/properties",
            get(latest).post(set_properties),
        )
        .route("/devices/:pk/:dn/properties/get", post(get_properties))
        .route("/devices/:pk/:dn/events", get(events))
        .route("/devices/:pk/:dn/services/:id", post(call_service))
        .route("/devices/:pk/:dn/service-calls", get(list_calls))
        .route("/devices/:pk/:dn/service-calls/:id", get(get_call))
        .route("/devices/:pk/:dn/shadow", get(get_shadow).put(put_shadow))
        .route("/devices/:pk/:dn/sub-devices", get(sub_devices))
        .route(
            "/devices/:pk/:dn/sub-devices/:sub_pk/:sub_dn",
            axum::routing::delete(remove_sub_device),
        )
        .route("/devices/:pk/:dn/raw", get(raw_messages).post(send_raw))
}

fn parse_json(text: &str) -> Value {
    crate::tsdb::codec::stored_value(text)
}

/// A call as the API shows it: params and reply as JSON.
pub(super) fn call_json(c: &ServiceCall) -> Value {
    json!({
        "product_key": c.product_key,
        "device_name": c.device_name,
        "id": c.message_id,
        "service": c.identifier,
        "call_type": c.call_type,
        "params": parse_json(&c.params),
        "status": c.status,
        "code": c.code,
        "reply": c.reply.as_deref().map(parse_json),
        "created_at": c.created_at,
        "deadline": c.deadline,
        "replied_at": c.replied_at,
    })
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Offline(..) => {
                Self::new(StatusCode::CONFLICT, "device_offline", e.to_string())
            }
            CallError::UnknownService(m) => Self::new(StatusCode::NOT_FOUND, "unknown_service", m),
            CallError::InvalidParams(m) => Self::new(StatusCode::BAD_REQUEST, "invalid_params", m),
            CallError::Storage(e) => e.into(),
        }
    }
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/properties",
    tag = "thing model",
    operation_id = "latest",
    summary = "Latest property values",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    responses((status = 200, description = "Latest values", body = doc::Object), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
async fn latest(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    let rows = s.shared.db.latest_properties(&pk, &dn).await?;
    let props: Vec<Value> = rows
        .into_iter()
        .map(|(id, ts, v)| json!({"identifier": id, "value": parse_json(&v), "time": ts}))
        .collect();
    Ok(Json(
        json!({"product_key": pk, "device_name": dn, "properties": props}),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct Range {
    /// From this time, ms since the Unix epoch (inclusive).
    from: Option<i64>,
    /// Up to this time, ms (inclusive); before `from` it selects nothing.
    to: Option<i64>,
    /// Most rows, 1 to 10,000 (default 100).
    limit: Option<i64>,
    /// `desc` (default): events come newest first.
    #[param(pattern = "^desc$")]
    order: Option<String>,
    /// Only this event identifier (events).
    identifier: Option<String>,
}

impl Range {
    /// From, to and limit; a `to` before `from` is an empty range.
    fn bounds(&self) -> ApiResult<(i64, i64, i64)> {
        let from = self.from.unwrap_or(0);
        let to = self.to.unwrap_or(i64::MAX);
        Ok((from, to, self.limit.unwrap_or(100).clamp(1, 10_000)))
    }
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/events",
    tag = "thing model",
    operation_id = "events",
    summary = "Stored events",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name"), Range),
    responses((status = 200, description = "Events", body = doc::Object), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
async fn events(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<Range>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    if let Some(o) = q.order.as_deref().filter(|o| *o != "desc") {
        return Err(ApiError::invalid(format!(
            "order `{o}`: events come newest first (desc)"
        )));
    }
    let (from, to, limit) = q.bounds()?;
    let rows = s
        .shared
        .db
        .events(&pk, &dn, q.identifier.as_deref(), from, to, limit)
        .await?;
    let events: Vec<Value> = rows
        .into_iter()
        .map(|e| json!({"identifier": e.identifier, "type": e.event_type, "message_id": e.message_id, "output": parse_json(&e.output), "time": e.ts}))
        .collect();
    Ok(Json(json!({"events": events})))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CallBody {
    /// Property values or service input, checked against the thing model.
    #[serde(default)]
    #[schema(value_type = Object)]
    params: Value,
    /// How long to wait for the device, ms (bounded by the server's max_call_timeout).
    #[serde(default, deserialize_with = "super::int::opt")]
    #[schema(minimum = 0)]
    timeout_ms: Option<u64>,
}

fn answer(call: ServiceCall) -> (StatusCode, Json<Value>) {
    let status = if call.status == "pending" {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    (status, Json(call_json(&call)))
}

#[utoipa::path(
    post,
    path = "/devices/{pk}/{dn}/properties",
    tag = "thing model",
    operation_id = "set_properties",
    summary = "Set properties and wait for the device (thing.service.property.set)",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    request_body = CallBody,
    responses((status = 200, description = "The call, answered or timed out", body = doc::Call), (status = 202, description = "The call, still pending", body = doc::Call), (status = 404, description = "No such device", body = doc::ErrorBody), (status = 409, description = "The device is offline", body = doc::ErrorBody))
)]
async fn set_properties(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiJson(body): ApiJson<CallBody>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    let call = s
        .shared
        .thing
        .call(
            &pk,
            &dn,
            Kind::PropertySet,
            body.params,
            body.timeout_ms.map(Duration::from_millis),
        )
        .await?;
    Ok(answer(call))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct GetBody {
    /// Property identifiers.
    identifiers: Vec<String>,
    #[serde(default, deserialize_with = "super::int::opt")]
    #[schema(minimum = 0)]
    timeout_ms: Option<u64>,
}

#[utoipa::path(
    post,
    path = "/devices/{pk}/{dn}/properties/get",
    tag = "thing model",
    operation_id = "get_properties",
    summary = "Ask the device for property values (thing.service.property.get)",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    request_body = GetBody,
    responses((status = 200, description = "The call, answered or timed out", body = doc::Call), (status = 202, description = "The call, still pending", body = doc::Call), (status = 404, description = "No such device", body = doc::ErrorBody), (status = 409, description = "The device is offline", body = doc::ErrorBody))
)]
async fn get_properties(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiJson(body): ApiJson<GetBody>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    let ids = Value::Array(body.identifiers.into_iter().map(Value::String).collect());
    let call = s
        .shared
        .thing
        .call(
            &pk,
            &dn,
            Kind::PropertyGet,
            ids,
            body.timeout_ms.map(Duration::from_millis),
        )
        .await?;
    Ok(answer(call))
}

#[utoipa::path(
    post,
    path = "/devices/{pk}/{dn}/services/{id}",
    tag = "thing model",
    operation_id = "call_service",
    summary = "Call a service (sync services wait for the answer)",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name"), ("id" = String, Path, description = "Identifier")),
    request_body = CallBody,
    responses((status = 200, description = "The call, answered or timed out", body = doc::Call), (status = 202, description = "The call, still pending", body = doc::Call), (status = 404, description = "No such device or service", body = doc::ErrorBody), (status = 409, description = "The device is offline", body = doc::ErrorBody))
)]
async fn call_service(
    State(s): State<ApiState>,
    Path((pk, dn, id)): Path<(String, String, String)>,
    ApiJson(body): ApiJson<CallBody>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    let params = if body.params.is_null() {
        json!({})
    } else {
        body.params
    };
    let call = s
        .shared
        .thing
        .call(
            &pk,
            &dn,
            Kind::Service(&id),
            params,
            body.timeout_ms.map(Duration::from_millis),
        )
        .await?;
    Ok(answer(call))
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/service-calls",
    tag = "thing model",
    operation_id = "list_calls",
    summary = "Recent calls and their status",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    responses((status = 200, description = "Calls", body = doc::Object), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
async fn list_calls(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<Range>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    let (_, _, limit) = q.bounds()?;
    let calls = s.shared.db.list_calls(&pk, &dn, limit).await?;
    Ok(Json(
        json!({"calls": calls.iter().map(call_json).collect::<Vec<_>>()}),
    ))
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/service-calls/{id}",
    tag = "thing model",
    operation_id = "get_call",
    summary = "One call",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name"), ("id" = String, Path, description = "Identifier")),
    responses((status = 200, description = "The call", body = doc::Call), (status = 404, description = "No such device or call", body = doc::ErrorBody))
)]
async fn get_call(
    State(s): State<ApiState>,
    Path((pk, dn, id)): Path<(String, String, String)>,
) -> ApiResult<impl IntoResponse> {
    match s.shared.db.get_call(&pk, &dn, &id).await? {
        Some(c) => Ok(Json(call_json(&c))),
        None => Err(ApiError::not_found(format!(
            "device `{pk}/{dn}` has no call with id `{id}`"
        ))),
    }
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/shadow",
    tag = "thing model",
    operation_id = "get_shadow",
    summary = "The device shadow",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    responses((status = 200, description = "The shadow", body = doc::Object), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
async fn get_shadow(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    let (sh, _) = shadow::load(&s.shared.thing, &pk, &dn).await?;
    Ok(Json(sh.document()))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ShadowBody {
    /// Desired attributes; null deletes one.
    #[schema(value_type = Object)]
    desired: Map<String, Value>,
    /// The version this change is based on (optimistic locking).
    #[serde(default, deserialize_with = "super::int::opt")]
    version: Option<i64>,
}

#[utoipa::path(
    put,
    path = "/devices/{pk}/{dn}/shadow",
    tag = "thing model",
    operation_id = "put_shadow",
    summary = "Set desired state (null deletes an attribute)",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    request_body = ShadowBody,
    responses((status = 200, description = "The shadow", body = doc::Object), (status = 404, description = "No such device", body = doc::ErrorBody), (status = 409, description = "Version conflict", body = doc::ErrorBody))
)]
async fn put_shadow(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiJson(body): ApiJson<ShadowBody>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    match shadow::set_desired(&s.shared.thing, &pk, &dn, &body.desired, body.version).await {
        Ok(sh) => Ok(Json(sh.document())),
        Err(e) if e.code == 409 => Err(ApiError::new(
            StatusCode::CONFLICT,
            "version_conflict",
            e.message,
        )),
        Err(e) if e.code == 500 => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            e.message,
        )),
        Err(e) => Err(ApiError::invalid(e.message)),
    }
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/sub-devices",
    tag = "devices",
    operation_id = "sub_devices",
    summary = "A gateway's sub-devices",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    responses((status = 200, description = "Sub-devices", body = doc::Object), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
async fn sub_devices(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    let rows = s.shared.db.topology_of(&pk, &dn).await?;
    let subs: Vec<Value> = rows
        .into_iter()
        .map(|t| {
            let online = s.shared.sessions.is_online(&t.product_key, &t.device_name);
            json!({"product_key": t.product_key, "device_name": t.device_name, "added_at": t.created_at, "online": online})
        })
        .collect();
    Ok(Json(
        json!({"gateway": format!("{pk}/{dn}"), "sub_devices": subs}),
    ))
}

#[utoipa::path(
    delete,
    path = "/devices/{pk}/{dn}/sub-devices/{sub_pk}/{sub_dn}",
    tag = "devices",
    operation_id = "remove_sub_device",
    summary = "Remove a sub-device from a gateway's topology (logs it out), so another gateway may add it",
    params(("pk" = String, Path, description = "Gateway product key"), ("dn" = String, Path, description = "Gateway device name"), ("sub_pk" = String, Path, description = "Sub-device product key"), ("sub_dn" = String, Path, description = "Sub-device name")),
    responses((status = 200, description = "Removed", body = doc::Object), (status = 404, description = "No such gateway, or not its sub-device", body = doc::ErrorBody))
)]
async fn remove_sub_device(
    State(s): State<ApiState>,
    Path((pk, dn, sub_pk, sub_dn)): Path<(String, String, String, String)>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    if !crate::thing::unbind(&s.shared.thing, (&pk, &dn), (&sub_pk, &sub_dn)).await? {
        return Err(ApiError::not_found(format!(
            "`{sub_pk}/{sub_dn}` is not a sub-device of `{pk}/{dn}`"
        )));
    }
    Ok(Json(
        json!({"gateway": format!("{pk}/{dn}"), "removed": format!("{sub_pk}/{sub_dn}")}),
    ))
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/raw",
    tag = "thing model",
    operation_id = "raw_messages",
    summary = "Recent raw messages, both ways",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name"), Range),
    responses((status = 200, description = "Messages", body = doc::Object), (status = 404, description = "No such device", body = doc::ErrorBody))
)]
async fn raw_messages(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<Range>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    let (_, _, limit) = q.bounds()?;
    let rows = s.shared.db.raw_messages(&pk, &dn, limit).await?;
    let msgs: Vec<Value> = rows
        .into_iter()
        .map(|(dir, p, ts)| json!({"direction": dir, "payload_hex": hex::encode(p), "time": ts}))
        .collect();
    Ok(Json(json!({"messages": msgs})))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RawBody {
    /// Text sent as is, other JSON serialized.
    #[schema(value_type = Option<Object>)]
    payload: Option<Value>,
    /// Bytes, base64.
    payload_base64: Option<String>,
}

#[utoipa::path(
    post,
    path = "/devices/{pk}/{dn}/raw",
    tag = "thing model",
    operation_id = "send_raw",
    summary = "Send raw bytes on down_raw",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    request_body = RawBody,
    responses((status = 200, description = "Sent", body = doc::Object), (status = 404, description = "No such device", body = doc::ErrorBody), (status = 409, description = "The device is offline", body = doc::ErrorBody))
)]
async fn send_raw(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
    ApiJson(body): ApiJson<RawBody>,
) -> ApiResult<impl IntoResponse> {
    require_device(&s, &pk, &dn).await?;
    if !s.shared.sessions.is_online(&pk, &dn) {
        return Err(CallError::Offline(pk, dn).into());
    }
    let payload = payload_bytes(&body.payload, &body.payload_base64)?;
    let topic = format!("/sys/{pk}/{dn}/thing/model/down_raw");
    let delivered = s
        .shared
        .thing
        .send(to_device(topic.clone(), payload.clone()));
    s.shared
        .db
        .store_thing_data(
            &[],
            &[],
            &[crate::thing::store::RawRow {
                product_key: pk,
                device_name: dn,
                direction: "down",
                payload: payload.to_vec(),
                ts: now_ms(),
            }],
        )
        .await?;
    Ok(Json(json!({"topic": topic, "delivered": delivered})))
}
