//! Rules engine endpoints: rules (create, update, enable, disable, delete, test), their dead
//! letters, rule tables, and per-product data-parsing scripts (set, show, delete, test).

use super::{doc, unknown_product, ApiError, ApiJson, ApiQuery, ApiResult, ApiState};
use crate::registry::now_ms;
use crate::rules::script::{Answer, Call, ScriptError};
use crate::rules::{RuleError, RuleSpec};
use crate::storage::StorageError;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/rules", post(create).get(list))
        .route("/rules/test", post(test))
        .route("/rules/:id", get(show).put(update).delete(remove))
        .route("/rules/:id/enable", post(enable))
        .route("/rules/:id/disable", post(disable))
        .route(
            "/rules/:id/dead-letters",
            get(dead_letters).delete(clear_dead_letters),
        )
        .route("/rule-tables/:table", get(table_rows))
        .route(
            "/products/:pk/script",
            get(get_script).put(put_script).delete(delete_script),
        )
        .route("/products/:pk/script/test", post(test_script))
}

impl From<RuleError> for ApiError {
    fn from(e: RuleError) -> Self {
        match e {
            // With its line and column, so an editor can point at it.
            RuleError::Sql(e) => ApiError {
                at: Some((u64::from(e.pos.line), u64::from(e.pos.col))),
                ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_sql", format!("sql: {e}"))
            },
            RuleError::Action(..) | RuleError::Invalid(_) => ApiError::invalid(e.to_string()),
            RuleError::NotFound(_) => ApiError::not_found(e.to_string()),
            RuleError::Storage(StorageError::Conflict(m)) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", m)
            }
            RuleError::Storage(e) => e.into(),
        }
    }
}

impl From<ScriptError> for ApiError {
    fn from(e: ScriptError) -> Self {
        let code = match e {
            ScriptError::NoScript(_) => return ApiError::not_found(e.to_string()),
            ScriptError::Invalid(_) => "invalid_script",
            ScriptError::Timeout(_) => "script_timeout",
            ScriptError::Memory(_) => "script_memory",
            ScriptError::Thrown(_) | ScriptError::BadResult(_) => "script_error",
            ScriptError::Gone => "script_unavailable",
        };
        let message = e.to_string();
        ApiError {
            at: script_position(&message),
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
        }
    }
}

/// The line and column QuickJS names in an error's stack (`eval_script:LINE:COLUMN`), so an
/// editor can point at it.
fn script_position(message: &str) -> Option<(u64, u64)> {
    let rest = &message[message.find("eval_script:")? + "eval_script:".len()..];
    let mut parts = rest.splitn(3, ':');
    let line = parts.next()?.parse().ok()?;
    let column: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((line, column.parse().ok()?))
}

fn engine(s: &ApiState) -> &crate::rules::Engine {
    &s.shared.rules
}

fn find(s: &ApiState, id: &str) -> ApiResult<std::sync::Arc<crate::rules::Live>> {
    engine(s)
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no rule `{id}` (by id or name)")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn script_positions_from_quickjs_stacks() {
        use super::script_position as at;
        assert_eq!(
            at("script: does not compile: invalid property name (at eval_script:2:10)"),
            Some((2, 10))
        );
        assert_eq!(
            at("cannot read property 'y' of null (at f (eval_script:12:3))"),
            Some((12, 3))
        );
        assert_eq!(at("no position"), None);
        assert_eq!(at("eval_script:x:1"), None);
    }
}

#[utoipa::path(
    post,
    path = "/rules",
    tag = "rules",
    operation_id = "create",
    summary = "Create a rule (Alibaba rule SQL and actions)",
    request_body = RuleSpec,
    responses((status = 201, description = "Created", body = doc::Object), (status = 409, description = "A rule has this name", body = doc::ErrorBody))
)]
async fn create(
    State(s): State<ApiState>,
    ApiJson(spec): ApiJson<RuleSpec>,
) -> ApiResult<impl IntoResponse> {
    let live = engine(&s).create(spec).await?;
    Ok((StatusCode::CREATED, Json(engine(&s).describe(&live))))
}

#[utoipa::path(
    get,
    path = "/rules",
    tag = "rules",
    operation_id = "list",
    summary = "List rules with their counters",
    responses((status = 200, description = "Rules", body = Vec<doc::Object>))
)]
async fn list(State(s): State<ApiState>) -> Json<Value> {
    let e = engine(&s);
    Json(Value::Array(
        e.rules().iter().map(|r| e.describe(r)).collect(),
    ))
}

#[utoipa::path(
    get,
    path = "/rules/{id}",
    tag = "rules",
    operation_id = "show",
    summary = "One rule (by id or name)",
    params(("id" = String, Path, description = "Identifier")),
    responses((status = 200, description = "The rule", body = doc::Object), (status = 404, description = "No such rule", body = doc::ErrorBody))
)]
async fn show(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let r = find(&s, &id)?;
    Ok(Json(engine(&s).describe(&r)))
}

#[utoipa::path(
    put,
    path = "/rules/{id}",
    tag = "rules",
    operation_id = "update",
    summary = "Replace a rule",
    params(("id" = String, Path, description = "Identifier")),
    request_body = RuleSpec,
    responses((status = 200, description = "The rule", body = doc::Object), (status = 404, description = "No such rule", body = doc::ErrorBody), (status = 409, description = "A rule has this name", body = doc::ErrorBody))
)]
async fn update(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(spec): ApiJson<RuleSpec>,
) -> ApiResult<Json<Value>> {
    let id = find(&s, &id)?.row.rule_id.clone();
    let live = engine(&s).update(&id, spec).await?;
    Ok(Json(engine(&s).describe(&live)))
}

#[utoipa::path(
    delete,
    path = "/rules/{id}",
    tag = "rules",
    operation_id = "remove",
    summary = "Delete a rule",
    params(("id" = String, Path, description = "Identifier")),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such rule", body = doc::ErrorBody))
)]
async fn remove(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = find(&s, &id)?.row.rule_id.clone();
    engine(&s).delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/rules/{id}/enable",
    tag = "rules",
    operation_id = "enable",
    summary = "Enable a rule",
    params(("id" = String, Path, description = "Identifier")),
    responses((status = 200, description = "The rule", body = doc::Object), (status = 404, description = "No such rule", body = doc::ErrorBody))
)]
async fn enable(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let id = find(&s, &id)?.row.rule_id.clone();
    let live = engine(&s).set_enabled(&id, true).await?;
    Ok(Json(engine(&s).describe(&live)))
}

#[utoipa::path(
    post,
    path = "/rules/{id}/disable",
    tag = "rules",
    operation_id = "disable",
    summary = "Disable a rule",
    params(("id" = String, Path, description = "Identifier")),
    responses((status = 200, description = "The rule", body = doc::Object), (status = 404, description = "No such rule", body = doc::ErrorBody))
)]
async fn disable(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let id = find(&s, &id)?.row.rule_id.clone();
    let live = engine(&s).set_enabled(&id, false).await?;
    Ok(Json(engine(&s).describe(&live)))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TestBody {
    /// Rule SQL.
    sql: String,
    /// The topic the sample came on; default: the FROM topic with `+` as `pk`/`dn`.
    topic: Option<String>,
    /// The sample message.
    #[schema(value_type = Object)]
    payload: Value,
    product_key: Option<String>,
    device_name: Option<String>,
}

#[utoipa::path(
    post,
    path = "/rules/test",
    tag = "rules",
    operation_id = "test",
    summary = "Evaluate SQL on a sample message without installing it",
    request_body = TestBody,
    responses((status = 200, description = "The output, or null when the WHERE refused it", body = doc::Object))
)]
async fn test(State(_s): State<ApiState>, ApiJson(b): ApiJson<TestBody>) -> ApiResult<Json<Value>> {
    let q = crate::rules::sql::parse(&b.sql).map_err(RuleError::from)?;
    // Wildcards become `pk` / `dn` where Alink topics keep them, `x` elsewhere.
    let topic = b.topic.unwrap_or_else(|| {
        q.topic
            .split('/')
            .enumerate()
            .map(|(i, l)| match (l, i) {
                ("+", 1) => "pk".to_owned(),
                ("+", 2) => "dn".to_owned(),
                ("+" | "#", _) => "x".to_owned(),
                (other, _) => other.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("/")
    });
    let levels: Vec<&str> = topic.split('/').collect();
    let pk = b
        .product_key
        .unwrap_or_else(|| levels.get(1).copied().unwrap_or_default().to_owned());
    let dn = b
        .device_name
        .unwrap_or_else(|| levels.get(2).copied().unwrap_or_default().to_owned());
    // Off the async threads: analytics functions may compute (or first train) a model.
    let answer = tokio::task::spawn_blocking(move || {
        crate::rules::test_sql(&b.sql, &topic, &b.payload, &pk, &dn)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the rule test failed: {e}"),
        )
    })??;
    Ok(Json(answer))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct Limit {
    /// Most rows, 1 to 10,000 (default 100).
    limit: Option<i64>,
    after: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/rules/{id}/dead-letters",
    tag = "rules",
    operation_id = "dead_letters",
    summary = "Outputs a rule's actions could not deliver",
    params(("id" = String, Path, description = "Identifier"), Limit),
    responses((status = 200, description = "Dead letters", body = Vec<doc::Object>), (status = 404, description = "No such rule", body = doc::ErrorBody))
)]
async fn dead_letters(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    ApiQuery(l): ApiQuery<Limit>,
) -> ApiResult<Json<Value>> {
    let id = find(&s, &id)?.row.rule_id.clone();
    let rows = s
        .shared
        .db
        .list_dead_letters(Some(&id), l.limit.unwrap_or(100).clamp(1, 10_000))
        .await?;
    Ok(Json(json!(rows)))
}

#[utoipa::path(
    delete,
    path = "/rules/{id}/dead-letters",
    tag = "rules",
    operation_id = "clear_dead_letters",
    summary = "Remove a rule's dead letters",
    params(("id" = String, Path, description = "Identifier")),
    responses((status = 200, description = "Deleted count", body = doc::Object), (status = 404, description = "No such rule", body = doc::ErrorBody))
)]
async fn clear_dead_letters(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = find(&s, &id)?.row.rule_id.clone();
    let n = s.shared.db.delete_dead_letters(&id, None).await?;
    Ok(Json(json!({"deleted": n})))
}

#[utoipa::path(
    get,
    path = "/rule-tables/{table}",
    tag = "rules",
    operation_id = "table_rows",
    summary = "Rows written by table actions",
    params(("table" = String, Path, description = "Rule table name"), Limit),
    responses((status = 200, description = "Rows", body = Vec<doc::Object>))
)]
async fn table_rows(
    State(s): State<ApiState>,
    Path(table): Path<String>,
    ApiQuery(l): ApiQuery<Limit>,
) -> ApiResult<Json<Value>> {
    let rows = s
        .shared
        .db
        .list_rule_rows(
            &table,
            l.after.unwrap_or(0),
            l.limit.unwrap_or(100).clamp(1, 10_000),
        )
        .await?;
    Ok(Json(Value::Array(
        rows.into_iter()
            .map(|(id, rule, row, at)| {
                json!({"id": id, "rule_id": rule, "at": at,
                       "row": serde_json::from_str::<Value>(&row).unwrap_or(Value::Null)})
            })
            .collect(),
    )))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ScriptBody {
    /// JavaScript on Alibaba's script contract.
    script: String,
}

#[utoipa::path(
    get,
    path = "/products/{pk}/script",
    tag = "scripts",
    operation_id = "get_script",
    summary = "A product's data-parsing script and its counters",
    params(("pk" = String, Path, description = "Product key")),
    responses((status = 200, description = "The script", body = doc::Object), (status = 404, description = "No script", body = doc::ErrorBody))
)]
async fn get_script(State(s): State<ApiState>, Path(pk): Path<String>) -> ApiResult<Json<Value>> {
    let all = s.shared.db.list_scripts().await?;
    let Some((_, script, at)) = all.into_iter().find(|(p, _, _)| *p == pk) else {
        return Err(ApiError::not_found(format!(
            "product `{pk}` has no data-parsing script: PUT one to /api/v1/products/{pk}/script"
        )));
    };
    let c = s.shared.rules.scripts.counters(&pk);
    let n = |f: fn(&crate::rules::script::ScriptCounters) -> u64| c.as_ref().map_or(0, |c| f(c));
    use std::sync::atomic::Ordering::Relaxed;
    Ok(Json(json!({
        "product_key": pk, "script": script, "updated_at": at,
        "stats": {
            "ok": n(|c| c.ok.load(Relaxed)),
            "errors": n(|c| c.errors.load(Relaxed)),
            "timeouts": n(|c| c.timeouts.load(Relaxed)),
            "memory": n(|c| c.memory.load(Relaxed)),
            "time_ms_total": n(|c| c.time_us.load(Relaxed)) as f64 / 1000.0,
        },
        "limits": {
            "time_ms": s.shared.rules.scripts.limits().time.as_millis() as u64,
            "memory_mib": s.shared.rules.scripts.limits().memory / (1024 * 1024),
        },
    })))
}

#[utoipa::path(
    put,
    path = "/products/{pk}/script",
    tag = "scripts",
    operation_id = "put_script",
    summary = "Install a data-parsing script (compiled and checked first)",
    params(("pk" = String, Path, description = "Product key")),
    request_body = ScriptBody,
    responses((status = 200, description = "Installed", body = doc::Object), (status = 404, description = "No such product", body = doc::ErrorBody))
)]
async fn put_script(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
    ApiJson(b): ApiJson<ScriptBody>,
) -> ApiResult<Json<Value>> {
    if s.shared.db.get_product(&pk).await?.is_none() {
        return Err(unknown_product(&pk));
    }
    if b.script.len() > 256 * 1024 {
        return Err(ApiError::invalid("a script is at most 256 KiB"));
    }
    // Compiled (and checked) before it is stored.
    s.shared.rules.scripts.set(&pk, &b.script).await?;
    s.shared.db.put_script(&pk, &b.script, now_ms()).await?;
    Ok(Json(json!({"product_key": pk, "updated_at": now_ms()})))
}

#[utoipa::path(
    delete,
    path = "/products/{pk}/script",
    tag = "scripts",
    operation_id = "delete_script",
    summary = "Remove a product's script",
    params(("pk" = String, Path, description = "Product key")),
    responses((status = 204, description = "Removed"), (status = 404, description = "No script", body = doc::ErrorBody))
)]
async fn delete_script(State(s): State<ApiState>, Path(pk): Path<String>) -> ApiResult<StatusCode> {
    if !s.shared.db.delete_script(&pk).await? {
        return Err(ApiError::not_found(format!(
            "product `{pk}` has no data-parsing script"
        )));
    }
    s.shared.rules.scripts.remove(&pk);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ScriptTest {
    /// A script to try; the product's installed one when absent.
    script: Option<String>,
    /// `up` (rawDataToProtocol), `down` (protocolToRawData) or `custom` (transformPayload).
    #[schema(pattern = "^(up|down|custom)$")]
    direction: String,
    /// Raw bytes as hex, for `up` and `custom`.
    payload_hex: Option<String>,
    /// Alink JSON, for `down`.
    #[schema(value_type = Option<Object>)]
    json: Option<Value>,
    /// Custom topic, for `custom`.
    topic: Option<String>,
}

#[utoipa::path(
    post,
    path = "/products/{pk}/script/test",
    tag = "scripts",
    operation_id = "test_script",
    summary = "Run a script on a sample",
    params(("pk" = String, Path, description = "Product key")),
    request_body = ScriptTest,
    responses((status = 200, description = "The result", body = doc::Object), (status = 404, description = "No such product or script", body = doc::ErrorBody))
)]
async fn test_script(
    State(s): State<ApiState>,
    Path(pk): Path<String>,
    ApiJson(b): ApiJson<ScriptTest>,
) -> ApiResult<Json<Value>> {
    let bytes = || -> ApiResult<Vec<u8>> {
        let h = b.payload_hex.as_deref().ok_or_else(|| {
            ApiError::invalid("payload_hex is needed for direction up and custom")
        })?;
        hex::decode(h.trim().trim_start_matches("0x"))
            .map_err(|e| ApiError::invalid(format!("payload_hex: {e}")))
    };
    let call = match b.direction.as_str() {
        "up" => Call::Decode(bytes()?),
        "custom" => Call::Transform(
            b.topic
                .clone()
                .ok_or_else(|| ApiError::invalid("topic is needed for direction custom"))?,
            bytes()?,
        ),
        "down" => Call::Encode(
            b.json
                .clone()
                .ok_or_else(|| ApiError::invalid("json is needed for direction down"))?,
        ),
        other => {
            return Err(ApiError::invalid(format!(
                "direction `{other}`: use up, down or custom"
            )))
        }
    };
    let scripts = &s.shared.rules.scripts;
    let answer = match &b.script {
        Some(src) => scripts.test(src, call).await?,
        None => scripts.call(&pk, call).await?,
    };
    Ok(Json(match answer {
        Answer::Json(v) => json!({"output": v}),
        Answer::Bytes(b) => json!({"output_hex": hex::encode(b)}),
    }))
}
