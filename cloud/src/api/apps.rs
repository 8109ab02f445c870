//! Application access endpoints: access keys, consumer groups (with their counters) and
//! subscriptions.

use super::{doc, unknown_product, ApiError, ApiJson, ApiResult, ApiState, OptionalJson};
use crate::apps::store::{AccessKey, ConsumerGroup};
use crate::apps::MessageType;
use crate::registry::{new_secret, now_ms};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use rand::distributions::{Alphanumeric, DistString};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/access-keys", post(create_key).get(list_keys))
        .route("/access-keys/:id", delete(delete_key))
        .route("/consumer-groups", post(create_group).get(list_groups))
        .route("/consumer-groups/:id", get(get_group).delete(delete_group))
        .route("/subscriptions", post(subscribe).get(list_subscriptions))
        .route("/subscriptions/:pk/:group", delete(unsubscribe))
}

async fn reload(s: &ApiState) -> ApiResult<()> {
    s.shared.apps.reload().await?;
    Ok(())
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewKey {
    /// At most 256 characters, no control characters.
    #[serde(default)]
    #[schema(max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$")]
    description: String,
}

#[utoipa::path(
    post,
    path = "/access-keys",
    tag = "applications",
    operation_id = "create_key",
    summary = "Create an access key (its secret is shown once)",
    request_body = NewKey,
    responses((status = 201, description = "Created", body = doc::Object))
)]
async fn create_key(
    State(s): State<ApiState>,
    OptionalJson(body): OptionalJson<NewKey>,
) -> ApiResult<impl IntoResponse> {
    let description = body.map(|b| b.description).unwrap_or_default();
    if description.chars().count() > 256 || description.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "description must be at most 256 characters, without control characters",
        ));
    }
    let key = AccessKey {
        access_key_id: format!(
            "LTAI{}",
            Alphanumeric.sample_string(&mut rand::thread_rng(), 20)
        ),
        access_key_secret: new_secret(),
        description,
        created_at: now_ms(),
    };
    s.shared.db.insert_access_key(&key).await?;
    reload(&s).await?;
    Ok((StatusCode::CREATED, Json(json!(key))))
}

#[utoipa::path(
    get,
    path = "/access-keys",
    tag = "applications",
    operation_id = "list_keys",
    summary = "List access keys (without secrets)",
    responses((status = 200, description = "Keys", body = doc::Object))
)]
async fn list_keys(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    // Secrets are shown once, at creation.
    let keys: Vec<Value> = s
        .shared
        .db
        .list_access_keys()
        .await?
        .into_iter()
        .map(|k| json!({"access_key_id": k.access_key_id, "description": k.description, "created_at": k.created_at}))
        .collect();
    Ok(Json(json!({ "access_keys": keys })))
}

#[utoipa::path(
    delete,
    path = "/access-keys/{id}",
    tag = "applications",
    operation_id = "delete_key",
    summary = "Delete an access key",
    params(("id" = String, Path, description = "Identifier")),
    responses((status = 200, description = "Deleted", body = doc::Deleted), (status = 404, description = "No such key", body = doc::ErrorBody))
)]
async fn delete_key(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    if !s.shared.db.delete_access_key(&id).await? {
        return Err(ApiError::not_found(format!(
            "access key `{id}` does not exist"
        )));
    }
    reload(&s).await?;
    Ok(Json(json!({ "deleted": id })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewGroup {
    /// 1 to 64 characters, not only white space.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    name: String,
}

fn group_json(s: &ApiState, g: &ConsumerGroup) -> Value {
    let c = s.shared.apps.counters(&g.group_id);
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    json!({
        "group_id": g.group_id,
        "name": g.name,
        "created_at": g.created_at,
        "clients": s.shared.apps.clients(&g.group_id),
        "pushed": n(&c.pushed),
        "replayed": n(&c.replayed),
        "acknowledged": n(&c.acknowledged),
        "redelivered": n(&c.redelivered),
        "backlog": n(&c.backlog),
        "backlog_age_ms": n(&c.backlog_age_ms),
        "dropped": {"age": n(&c.dropped_age), "size": n(&c.dropped_size)},
    })
}

#[utoipa::path(
    post,
    path = "/consumer-groups",
    tag = "applications",
    operation_id = "create_group",
    summary = "Create a consumer group",
    request_body = NewGroup,
    responses((status = 201, description = "Created", body = doc::Object), (status = 409, description = "A group has this name", body = doc::ErrorBody))
)]
async fn create_group(
    State(s): State<ApiState>,
    ApiJson(body): ApiJson<NewGroup>,
) -> ApiResult<impl IntoResponse> {
    let name = body.name.trim();
    crate::registry::check_label("name", name, 64).map_err(ApiError::invalid)?;
    let g = ConsumerGroup {
        group_id: Alphanumeric.sample_string(&mut rand::thread_rng(), 24),
        name: name.to_owned(),
        created_at: now_ms(),
    };
    s.shared.db.insert_group(&g).await?;
    reload(&s).await?;
    Ok((StatusCode::CREATED, Json(group_json(&s, &g))))
}

#[utoipa::path(
    get,
    path = "/consumer-groups",
    tag = "applications",
    operation_id = "list_groups",
    summary = "List consumer groups with their counters",
    responses((status = 200, description = "Groups", body = doc::Object))
)]
async fn list_groups(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let groups: Vec<Value> = s
        .shared
        .db
        .list_groups()
        .await?
        .iter()
        .map(|g| group_json(&s, g))
        .collect();
    Ok(Json(json!({ "consumer_groups": groups })))
}

#[utoipa::path(
    get,
    path = "/consumer-groups/{id}",
    tag = "applications",
    operation_id = "get_group",
    summary = "One consumer group's counters",
    params(("id" = String, Path, description = "Identifier")),
    responses((status = 200, description = "The group", body = doc::Object), (status = 404, description = "No such group", body = doc::ErrorBody))
)]
async fn get_group(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    match s.shared.db.get_group(&id).await? {
        Some(g) => Ok(Json(group_json(&s, &g))),
        None => Err(ApiError::not_found(format!(
            "consumer group `{id}` does not exist"
        ))),
    }
}

#[utoipa::path(
    delete,
    path = "/consumer-groups/{id}",
    tag = "applications",
    operation_id = "delete_group",
    summary = "Delete a consumer group with its queue",
    params(("id" = String, Path, description = "Identifier")),
    responses((status = 200, description = "Deleted", body = doc::Deleted), (status = 404, description = "No such group", body = doc::ErrorBody))
)]
async fn delete_group(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    if !s.shared.db.delete_group(&id).await? {
        return Err(ApiError::not_found(format!(
            "consumer group `{id}` does not exist"
        )));
    }
    reload(&s).await?;
    Ok(Json(json!({ "deleted": id })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewSubscription {
    product_key: String,
    /// Consumer group ids.
    #[schema(min_items = 1)]
    group_ids: Vec<String>,
    /// property, event, raw, custom, status, lifecycle, topology, service_reply, upstream.
    #[schema(min_items = 1)]
    message_types: Vec<String>,
}

#[utoipa::path(
    post,
    path = "/subscriptions",
    tag = "applications",
    operation_id = "subscribe",
    summary = "Bind consumer groups to a product's message types (property, event, raw, custom, status, lifecycle, topology, service_reply; upstream = the first four)",
    request_body = NewSubscription,
    responses((status = 201, description = "Bound", body = doc::Object), (status = 404, description = "No such product or group", body = doc::ErrorBody))
)]
async fn subscribe(
    State(s): State<ApiState>,
    ApiJson(body): ApiJson<NewSubscription>,
) -> ApiResult<impl IntoResponse> {
    if s.shared.db.get_product(&body.product_key).await?.is_none() {
        return Err(unknown_product(&body.product_key));
    }
    if body.group_ids.is_empty() {
        return Err(ApiError::invalid(
            "group_ids must name at least one consumer group",
        ));
    }
    for g in &body.group_ids {
        if s.shared.db.get_group(g).await?.is_none() {
            return Err(ApiError::not_found(format!(
                "consumer group `{g}` does not exist: create it with POST /api/v1/consumer-groups"
            )));
        }
    }
    let mask = MessageType::parse_list(&body.message_types).map_err(ApiError::invalid)?;
    let types = MessageType::names(mask);
    s.shared
        .db
        .put_subscriptions(&body.product_key, &body.group_ids, &types, now_ms())
        .await?;
    reload(&s).await?;
    let mut warnings = Vec::new();
    if body.message_types.iter().any(|t| t == "lifecycle") {
        tracing::warn!(product_key = %body.product_key, "{}", MessageType::LIFECYCLE_ALIAS_WARNING);
        warnings.push(MessageType::LIFECYCLE_ALIAS_WARNING);
    }
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"product_key": body.product_key, "group_ids": body.group_ids, "message_types": types.split(',').collect::<Vec<_>>(), "warnings": warnings}),
        ),
    ))
}

#[utoipa::path(
    get,
    path = "/subscriptions",
    tag = "applications",
    operation_id = "list_subscriptions",
    summary = "List subscriptions",
    responses((status = 200, description = "Subscriptions", body = doc::Object))
)]
async fn list_subscriptions(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let subs = s.shared.db.list_subscriptions().await?;
    Ok(Json(json!({ "subscriptions": subs })))
}

#[utoipa::path(
    delete,
    path = "/subscriptions/{pk}/{group}",
    tag = "applications",
    operation_id = "unsubscribe",
    summary = "Remove a group's subscription to a product",
    params(("pk" = String, Path, description = "Product key"), ("group" = String, Path, description = "Consumer group id")),
    responses((status = 200, description = "Deleted", body = doc::Deleted), (status = 404, description = "No such subscription", body = doc::ErrorBody))
)]
async fn unsubscribe(
    State(s): State<ApiState>,
    Path((pk, group)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    if !s.shared.db.delete_subscription(&pk, &group).await? {
        return Err(ApiError::not_found(format!(
            "group `{group}` has no subscription to product `{pk}`"
        )));
    }
    reload(&s).await?;
    Ok(Json(json!({ "deleted": format!("{pk}/{group}") })))
}
