//! Who may call the API: the admin token or an API key (a console login is a key), the role
//! each path needs, the audit log of changes, users and keys; and what the console reads
//! beside the rest of the API: the fleet overview and a device's live messages (SSE).

use super::{ApiError, ApiJson, ApiQuery, ApiResult, ApiState};
use crate::users::{Principal, Role, UserError, ROOT};
use axum::extract::{Path, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::Row;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/me", get(me))
        .route("/logout", post(logout))
        .route("/users", get(list_users).post(create_user))
        .route("/users/:name", delete(delete_user).patch(update_user))
        .route("/api-keys", get(list_keys).post(create_key))
        .route("/api-keys/:id", delete(revoke_key))
        .route("/audit", get(audit))
        .route("/overview", get(overview))
        .route("/devices/:pk/:dn/live", get(live))
}

/// Routes that need no credential.
pub(super) fn public_routes() -> Router<ApiState> {
    Router::new().route("/login", post(login))
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> Self {
        match e {
            UserError::Invalid(m) => Self::invalid(m),
            UserError::NotFound(m) => Self::not_found(m),
            UserError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            UserError::Unauthorized(m) => Self::new(StatusCode::UNAUTHORIZED, "unauthorized", m),
            UserError::Forbidden(m) => Self::new(StatusCode::FORBIDDEN, "forbidden", m),
            UserError::Unavailable(m) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
            }
            UserError::TooMany(m) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", m)
            }
            UserError::Storage(e) => e.into(),
        }
    }
}

/// The principal of a request's bearer credential, if it has a valid one.
pub(super) async fn principal(
    state: &ApiState,
    headers: &axum::http::HeaderMap,
) -> Result<Option<Principal>, ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !given.is_empty()
        && ironlink_shared::sign::constant_eq(given.as_bytes(), state.token.as_bytes())
    {
        return Ok(Some(Principal::root()));
    }
    if given.starts_with("ilk_") {
        return Ok(state.users.resolve(given).await?);
    }
    Ok(None)
}

/// POSTs that change nothing: a viewer may send them, and they are not audited.
fn read_only_post(path: &str) -> bool {
    const EXACT: &[&str] = &[
        "/timeseries/query",
        "/rules/test",
        "/analytics/changepoints",
        "/analytics/anomaly/detect",
        "/analytics/pv/simulate",
        "/analytics/pv/diagnose",
    ];
    EXACT.contains(&path) || (path.starts_with("/products/") && path.ends_with("/script/test"))
}

/// The least role a request needs (path under /api/v1). Handlers of `/api-keys` and `/me`
/// check ownership themselves.
pub(super) fn needed(method: &Method, path: &str) -> Role {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if matches!(first, "users" | "audit" | "access-keys") {
        return Role::Admin;
    }
    if path.ends_with("/credentials") {
        // Secrets: operators provision devices, viewers only look.
        return Role::Operator;
    }
    if matches!(first, "me" | "logout" | "api-keys")
        || method == Method::GET
        || method == Method::HEAD
        || (method == Method::POST && read_only_post(path))
    {
        return Role::Viewer;
    }
    Role::Operator
}

/// Whether a request changes something (and so goes into the audit log).
fn changes(method: &Method, path: &str) -> bool {
    !(method == Method::GET
        || method == Method::HEAD
        || method == Method::OPTIONS
        || (method == Method::POST && read_only_post(path)))
}

pub(super) fn unauthorized() -> Response {
    let mut r = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong bearer token: send `Authorization: Bearer <admin token or API key>` (the admin token is printed at first start and kept in {data_dir}/admin-token; users get keys from POST /api/v1/login or /api/v1/api-keys)",
    )
    .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"ironlink\""),
    );
    r
}

/// Resolves the credential, checks the role the path needs, runs the request, and records
/// every change (refused ones too) in the audit log before the answer leaves.
pub(super) async fn authorize(
    State(state): State<ApiState>,
    mut req: Request,
    next: Next,
) -> Response {
    let who = match principal(&state, req.headers()).await {
        Ok(Some(p)) => p,
        Ok(None) => return unauthorized(),
        Err(e) => return e.into_response(),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let need = needed(&method, &path);
    let res = if who.role < need {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "`{}` has the role {}; {method} {path} needs {}",
                who.name,
                who.role.as_str(),
                need.as_str()
            ),
        )
        .into_response()
    } else {
        req.extensions_mut().insert(who.clone());
        next.run(req).await
    };
    if changes(&method, &path) {
        state
            .users
            .audit(&who, method.as_str(), &path, res.status().as_u16())
            .await;
    }
    res
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct LoginBody {
    /// User name.
    name: String,
    /// Password.
    password: String,
}

#[utoipa::path(
    post,
    path = "/login",
    tag = "users",
    operation_id = "login",
    summary = "Log in as a named user: returns a console session key (valid 12 h), to send as `Authorization: Bearer <token>`",
    security(()),
    request_body = LoginBody,
    responses(
        (status = 200, description = "Logged in", body = super::doc::KeyCreated),
        (status = 401, description = "Wrong name or password", body = super::doc::ErrorBody),
        (status = 429, description = "Five wrong passwords within a minute", body = super::doc::ErrorBody)
    )
)]
async fn login(
    State(s): State<ApiState>,
    ApiJson(b): ApiJson<LoginBody>,
) -> ApiResult<impl IntoResponse> {
    let (token, key) = s.users.login(&b.name, &b.password).await?;
    let who = Principal {
        name: key.user.clone(),
        role: key.role,
        key_id: key.id.clone(),
    };
    s.users.audit(&who, "POST", "/login", 200).await;
    Ok(Json(json!({"token": token, "key": key})))
}

#[utoipa::path(
    get,
    path = "/me",
    tag = "users",
    operation_id = "me",
    summary = "Who this credential is: user name, role and key id (empty for the admin token)",
    responses((status = 200, description = "The caller", body = super::doc::Object))
)]
async fn me(Extension(who): Extension<Principal>) -> impl IntoResponse {
    Json(json!({"name": who.name, "role": who.role, "key_id": who.key_id}))
}

#[utoipa::path(
    post,
    path = "/logout",
    tag = "users",
    operation_id = "logout",
    summary = "Revoke the key this request came with (the admin token cannot be revoked here)",
    responses((status = 204, description = "Revoked"), (status = 400, description = "The admin token", body = super::doc::ErrorBody))
)]
async fn logout(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
) -> ApiResult<impl IntoResponse> {
    if who.key_id.is_empty() {
        return Err(ApiError::invalid(
            "the admin token is not a session: change it in {data_dir}/admin-token",
        ));
    }
    s.users.revoke(&who.key_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/users",
    tag = "users",
    operation_id = "list_users",
    summary = "List users (admin)",
    responses((status = 200, description = "Users", body = super::doc::Object))
)]
async fn list_users(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(json!({"users": s.users.list().await?})))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewUser {
    /// 1 to 64 of A-Z a-z 0-9 _ . @ - (not `admin`).
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.@-]{1,64}$")]
    name: String,
    /// `viewer`, `operator` or `admin`.
    #[schema(pattern = "^(viewer|operator|admin)$")]
    role: String,
    /// At least 8 characters.
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
}

#[utoipa::path(
    post,
    path = "/users",
    tag = "users",
    operation_id = "create_user",
    summary = "Create a user (admin)",
    request_body = NewUser,
    responses(
        (status = 201, description = "Created", body = crate::users::User),
        (status = 409, description = "The name is taken", body = super::doc::ErrorBody)
    )
)]
async fn create_user(
    State(s): State<ApiState>,
    ApiJson(b): ApiJson<NewUser>,
) -> ApiResult<impl IntoResponse> {
    let role = Role::parse(&b.role)?;
    let u = s.users.create(&b.name, role, &b.password).await?;
    Ok((StatusCode::CREATED, Json(u)))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UserChange {
    /// New role: `viewer`, `operator` or `admin`.
    #[schema(pattern = "^(viewer|operator|admin)$")]
    role: Option<String>,
    /// New password (ends the user's console sessions).
    #[schema(min_length = 8, max_length = 1024)]
    password: Option<String>,
}

#[utoipa::path(
    patch,
    path = "/users/{name}",
    tag = "users",
    operation_id = "update_user",
    summary = "Change a user's role or password (admin); a lower role lowers their keys at once",
    params(("name" = String, Path, description = "User name")),
    request_body = UserChange,
    responses((status = 204, description = "Changed"), (status = 404, description = "No such user", body = super::doc::ErrorBody))
)]
async fn update_user(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<UserChange>,
) -> ApiResult<impl IntoResponse> {
    let role = b.role.as_deref().map(Role::parse).transpose()?;
    s.users.update(&name, role, b.password.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    delete,
    path = "/users/{name}",
    tag = "users",
    operation_id = "delete_user",
    summary = "Delete a user and their keys (admin)",
    params(("name" = String, Path, description = "User name")),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such user", body = super::doc::ErrorBody))
)]
async fn delete_user(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    if s.users.delete(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no user `{name}`")))
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct KeysQuery {
    /// Keys of this user (admin only; an admin without it sees everyone's).
    user: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api-keys",
    tag = "users",
    operation_id = "list_api_keys",
    summary = "List API keys (never their secrets): the caller's own; an admin's: everyone's or one user's",
    params(KeysQuery),
    responses((status = 200, description = "Keys", body = super::doc::Object))
)]
async fn list_keys(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<KeysQuery>,
) -> ApiResult<impl IntoResponse> {
    let user = if who.role == Role::Admin {
        q.user
    } else if q.user.as_deref().is_some_and(|u| u != who.name) {
        return Err(forbidden("only an admin lists other users' keys"));
    } else {
        Some(who.name.clone())
    };
    Ok(Json(json!({"keys": s.users.keys(user.as_deref()).await?})))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewApiKey {
    /// What the key is for.
    #[schema(max_length = 200)]
    label: String,
    /// The key's role, at most its user's (default: the user's).
    #[schema(pattern = "^(viewer|operator|admin)$")]
    role: Option<String>,
    /// The key stops working this many seconds after it is made (default: never).
    #[schema(minimum = 1, maximum = 315_360_000)]
    #[serde(default, deserialize_with = "super::int::opt")]
    expires_in_seconds: Option<u64>,
    /// The user it belongs to (admin only; default: the caller).
    user: Option<String>,
}

#[utoipa::path(
    post,
    path = "/api-keys",
    tag = "users",
    operation_id = "create_api_key",
    summary = "Make an API key (its token is shown only in this answer)",
    request_body = NewApiKey,
    responses(
        (status = 201, description = "Made", body = super::doc::KeyCreated),
        (status = 404, description = "No such user", body = super::doc::ErrorBody),
        (status = 400, description = "A role above the user's, or the admin token without `user`", body = super::doc::ErrorBody)
    )
)]
async fn create_key(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    ApiJson(b): ApiJson<NewApiKey>,
) -> ApiResult<impl IntoResponse> {
    let user = match b.user {
        Some(u) if u != who.name && who.role != Role::Admin => {
            return Err(forbidden("only an admin makes keys for other users"))
        }
        Some(u) => u,
        None if who.name == ROOT && who.key_id.is_empty() => return Err(ApiError::invalid(
            "the admin token is not a user: name the key's `user` (create users with POST /users)",
        )),
        None => who.name.clone(),
    };
    let role = b.role.as_deref().map(Role::parse).transpose()?;
    let ttl = b.expires_in_seconds.map(Duration::from_secs);
    let (token, key) = s
        .users
        // A key never carries more than the credential that made it (`who.role`).
        .create_key(&user, role, who.role, &b.label, ttl, false)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": token, "key": key})),
    ))
}

#[utoipa::path(
    delete,
    path = "/api-keys/{id}",
    tag = "users",
    operation_id = "revoke_api_key",
    summary = "Revoke an API key (one's own; an admin: anyone's); it stops working at once",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 204, description = "Revoked"), (status = 404, description = "No such live key", body = super::doc::ErrorBody))
)]
async fn revoke_key(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let owner = s.users.key_owner(&id).await?;
    let Some(owner) = owner else {
        return Err(ApiError::not_found(format!("no key `{id}`")));
    };
    if owner != who.name && who.role != Role::Admin {
        return Err(forbidden("only an admin revokes other users' keys"));
    }
    if s.users.revoke(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "key `{id}` was revoked before"
        )))
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    /// Most entries, 1 to 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Entries before this id (the `next` of the previous page).
    before: Option<i64>,
    /// Only this user's.
    actor: Option<String>,
}

#[utoipa::path(
    get,
    path = "/audit",
    tag = "users",
    operation_id = "audit_log",
    summary = "The audit log, newest first (admin): who changed what, refused attempts included",
    params(AuditQuery),
    responses((status = 200, description = "Entries, and `next` for the page after", body = super::doc::Object))
)]
async fn audit(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<impl IntoResponse> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit: 1 to 1,000"));
    }
    let entries = s
        .users
        .audit_log(limit, q.before, q.actor.as_deref())
        .await?;
    let next = (entries.len() == limit as usize).then(|| entries.last().map(|e| e.id));
    Ok(Json(json!({"entries": entries, "next": next.flatten()})))
}

fn forbidden(message: &str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// How many offline events the overview's reasons are counted over.
const REASONS_OVER: i64 = 10_000;
/// How many located devices the overview returns at most.
const LOCATED_MAX: i64 = 1_000;

#[utoipa::path(
    get,
    path = "/overview",
    tag = "users",
    operation_id = "overview",
    summary = "Fleet overview: devices by product and status, reasons of the latest 10,000 disconnections, message counters (rates: difference two reads), and up to 1,000 devices with a location property",
    responses((status = 200, description = "Overview", body = super::doc::Object))
)]
async fn overview(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let pool = &s.shared.db.pool;
    let by_status = sqlx::query(
        "SELECT product_key, status, COUNT(*) FROM devices GROUP BY product_key, status ORDER BY product_key, status",
    )
    .fetch_all(pool)
    .await
    .map_err(crate::storage::StorageError::from)?;
    let mut products: serde_json::Map<String, Value> = serde_json::Map::new();
    let mut totals: serde_json::Map<String, Value> = serde_json::Map::new();
    for r in &by_status {
        let row = || -> Result<(String, String, i64), sqlx::Error> {
            Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))
        };
        let (pk, status, n) = row().map_err(crate::storage::StorageError::from)?;
        let entry = products.entry(pk).or_insert_with(|| json!({}));
        entry[&status] = json!(n);
        let t = totals.entry(status).or_insert(json!(0));
        *t = json!(t.as_i64().unwrap_or(0) + n);
    }
    let reasons = sqlx::query(
        "SELECT reason, COUNT(*) FROM (SELECT reason FROM presence_events WHERE status = 'offline' ORDER BY id DESC LIMIT $1) t GROUP BY reason ORDER BY COUNT(*) DESC",
    )
    .bind(REASONS_OVER)
    .fetch_all(pool)
    .await
    .map_err(crate::storage::StorageError::from)?;
    let reasons = reasons
        .iter()
        .map(|r| {
            Ok(json!({"reason": r.try_get::<String, _>(0)?, "count": r.try_get::<i64, _>(1)?}))
        })
        .collect::<Result<Vec<Value>, sqlx::Error>>()
        .map_err(crate::storage::StorageError::from)?;
    let located = sqlx::query(
        "SELECT s.product_key, s.device_name, l.value FROM property_series s JOIN property_latest l ON l.series_id = s.id \
         WHERE s.identifier IN ('GeoLocation', 'geoLocation', 'Location', 'location') LIMIT $1",
    )
    .bind(LOCATED_MAX)
    .fetch_all(pool)
    .await
    .map_err(crate::storage::StorageError::from)?;
    let located: Vec<Value> = located
        .iter()
        .filter_map(|r| {
            let v: Value = serde_json::from_str(&r.try_get::<String, _>(2).ok()?).ok()?;
            let (lon, lat) = lon_lat(&v)?;
            Some(json!({
                "product_key": r.try_get::<String, _>(0).ok()?,
                "device_name": r.try_get::<String, _>(1).ok()?,
                "longitude": lon,
                "latitude": lat,
            }))
        })
        .collect();
    let m = &s.shared.metrics;
    Ok(Json(json!({
        "at": crate::registry::now_ms(),
        "devices": {"total": totals, "by_product": products},
        "offline_reasons": reasons,
        "connections": m.connections.load(Ordering::Relaxed),
        "messages_in": m.messages_in.load(Ordering::Relaxed),
        "messages_out": m.messages_out.load(Ordering::Relaxed),
        "properties_stored": m.properties_stored.load(Ordering::Relaxed),
        "located": located,
    })))
}

/// Longitude and latitude of a location value (Alink's GeoLocation struct, any case).
fn lon_lat(v: &Value) -> Option<(f64, f64)> {
    let o = v.as_object()?;
    let find = |names: &[&str]| {
        o.iter()
            .find(|(k, _)| names.iter().any(|n| k.eq_ignore_ascii_case(n)))
            .and_then(|(_, v)| v.as_f64())
    };
    let lon = find(&["Longitude", "lon", "lng"])?;
    let lat = find(&["Latitude", "lat"])?;
    ((-180.0..=180.0).contains(&lon) && (-90.0..=90.0).contains(&lat)).then_some((lon, lat))
}

/// Live streams open at once on this node.
static LIVE_STREAMS: AtomicUsize = AtomicUsize::new(0);
const LIVE_MAX: usize = 256;

/// A live stream's hold on the router and on the stream count; both released when the
/// client goes.
struct LiveHold {
    router: std::sync::Arc<crate::router::Router>,
    sid: crate::router::SessionId,
}

impl Drop for LiveHold {
    fn drop(&mut self) {
        self.router.unregister(self.sid);
        LIVE_STREAMS.fetch_sub(1, Ordering::Relaxed);
    }
}

#[utoipa::path(
    get,
    path = "/devices/{pk}/{dn}/live",
    tag = "users",
    operation_id = "device_live",
    summary = "A device's messages as they pass, as server-sent events: `message` (property and event posts, service calls and their replies: topic, payload, at) and `presence` (online/offline with the reason). At most 256 streams per node; a slow reader misses messages rather than holding them",
    params(("pk" = String, Path, description = "Product key"), ("dn" = String, Path, description = "Device name")),
    responses(
        (status = 200, description = "text/event-stream"),
        (status = 404, description = "No such device", body = super::doc::ErrorBody),
        (status = 503, description = "Too many live streams", body = super::doc::ErrorBody)
    )
)]
async fn live(
    State(s): State<ApiState>,
    Path((pk, dn)): Path<(String, String)>,
) -> ApiResult<Response> {
    if s.shared.db.get_device(&pk, &dn).await?.is_none() {
        return Err(ApiError::not_found(format!("no device {pk}/{dn}")));
    }
    if LIVE_STREAMS.fetch_add(1, Ordering::Relaxed) >= LIVE_MAX {
        LIVE_STREAMS.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!("{LIVE_MAX} live streams are open on this node: close one"),
        ));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let router = s.shared.router.clone();
    let sid = router.register(tx);
    let hold = LiveHold { router, sid };
    for filter in [
        format!("/sys/{pk}/{dn}/thing/event/+/post"),
        format!("/sys/{pk}/{dn}/thing/service/+"),
    ] {
        hold.router.subscribe(sid, &filter, 0);
    }
    let presence = s.shared.presence.subscribe();
    let state = (rx, presence, hold, pk, dn);
    let stream = futures_util::stream::unfold(
        state,
        |(mut rx, mut presence, hold, pk, dn)| async move {
            let event = loop {
                tokio::select! {
                    d = rx.recv() => {
                        let d = d?;
                        let payload = serde_json::from_slice::<Value>(&d.message.payload)
                            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&d.message.payload).into_owned()));
                        let body = json!({"topic": d.message.topic, "payload": payload, "at": crate::registry::now_ms()});
                        break Event::default().event("message").data(body.to_string());
                    }
                    p = presence.recv() => match p {
                        Ok(p) if p.product_key == pk && p.device_name == dn => {
                            let body = json!({"status": p.status, "reason": p.reason, "at": p.at});
                            break Event::default().event("presence").data(body.to_string());
                        }
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    },
                }
            };
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (rx, presence, hold, pk, dn),
            ))
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_needed_by_paths() {
        use Role::*;
        let cases = [
            (Method::GET, "/products", Viewer),
            (Method::GET, "/devices/p/d/properties", Viewer),
            (Method::POST, "/timeseries/query", Viewer),
            (Method::POST, "/products/p/script/test", Viewer),
            (Method::POST, "/products/p/devices", Operator),
            (Method::POST, "/devices/p/d/services/reboot", Operator),
            (Method::DELETE, "/rules/3", Operator),
            (Method::GET, "/products/p/credentials", Operator),
            (Method::GET, "/devices/p/d/credentials", Operator),
            (Method::GET, "/access-keys", Admin),
            (Method::POST, "/users", Admin),
            (Method::GET, "/audit", Admin),
            (Method::POST, "/api-keys", Viewer),
            (Method::POST, "/logout", Viewer),
        ];
        for (m, p, r) in cases {
            assert_eq!(needed(&m, p), r, "{m} {p}");
        }
        assert!(!changes(&Method::POST, "/timeseries/query"));
        assert!(changes(&Method::PUT, "/devices/p/d/tags"));
    }

    #[test]
    fn locations_in_any_case() {
        assert_eq!(
            lon_lat(&json!({"Longitude": 120.1, "Latitude": 30.2, "Altitude": 5})),
            Some((120.1, 30.2))
        );
        assert_eq!(lon_lat(&json!({"lng": 1.0, "lat": 2.0})), Some((1.0, 2.0)));
        assert_eq!(lon_lat(&json!({"Longitude": 200.0, "Latitude": 0.0})), None);
        assert_eq!(lon_lat(&json!(3)), None);
    }
}
