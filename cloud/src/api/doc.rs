//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` attributes and the
//! request types: served at `/api/v1/openapi.json`. Response shapes that are assembled as
//! JSON in the handlers are described here; every operation also lists the errors every
//! handler can give (bad query or path, auth, storage, and for bodies 415/422).

#![allow(dead_code)] // types that exist for their schema only

use std::collections::BTreeMap;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, OpenApi as Doc, Ref};
use utoipa::{Modify, OpenApi, ToSchema};

/// Any JSON object (shapes that vary by case; see each operation's description).
#[derive(Debug, ToSchema)]
pub struct Object(BTreeMap<String, serde_json::Value>);

/// Every error answer.
#[derive(Debug, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `not_found`, `invalid_json`, `device_offline`.
    code: String,
    /// What was wrong and what to do.
    message: String,
}

/// A product, without its secret.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ProductView {
    product_key: String,
    name: String,
    /// `direct`, `gateway` or `sub-device`.
    node_type: String,
    /// `alink-json` or `raw`.
    data_format: String,
    dynamic_register: bool,
    description: String,
    /// ms since the Unix epoch.
    created_at: i64,
    tenant: String,
}

/// A new product, with its secret (shown here and through `GET .../credentials` only).
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ProductCreated {
    #[serde(flatten)]
    product: ProductView,
    product_secret: String,
}

/// Products.
#[derive(Debug, ToSchema)]
pub struct ProductList {
    products: Vec<ProductView>,
}

/// A product's secret.
#[derive(Debug, ToSchema)]
pub struct ProductCredentials {
    product_key: String,
    product_secret: String,
    dynamic_register: bool,
}

/// A device, without its secret.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct DeviceView {
    product_key: String,
    device_name: String,
    enabled: bool,
    /// `unactive`, `online` or `offline`.
    status: String,
    online: bool,
    created_at: i64,
    first_online_at: Option<i64>,
    last_online_at: Option<i64>,
    last_offline_at: Option<i64>,
    client_addr: Option<String>,
    tags: BTreeMap<String, String>,
}

/// A new device, with its secret.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct DeviceCreated {
    #[serde(flatten)]
    device: DeviceView,
    device_secret: String,
}

/// Devices created in one batch, with their secrets.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct DeviceBatch {
    devices: Vec<DeviceCreated>,
}

/// One device (`device_name` or nothing asked) or a batch (`device_names`/`count`).
#[derive(Debug, serde::Serialize, ToSchema)]
#[serde(untagged)]
pub enum DeviceCreatedOrBatch {
    /// One device.
    One(DeviceCreated),
    /// A batch.
    Batch(DeviceBatch),
}

/// A page of devices.
#[derive(Debug, ToSchema)]
pub struct DeviceList {
    devices: Vec<DeviceView>,
    page: i64,
    page_size: i64,
    total: i64,
}

/// A device's secret and where to connect.
#[derive(Debug, ToSchema)]
pub struct DeviceCredentials {
    product_key: String,
    device_name: String,
    device_secret: String,
    /// Plain MQTT port (securemode=3), when that listener is on.
    mqtt_port: Option<u16>,
    /// MQTT over TLS port (securemode=2), when that listener is on.
    mqtts_port: Option<u16>,
}

/// A device name: 4 to 32 letters, digits and `-_@.:`.
#[derive(Debug, ToSchema)]
#[schema(value_type = String, pattern = r"^[A-Za-z0-9_@.:\-]{4,32}$")]
pub struct DeviceName(String);

/// `device_names` of a batch: distinct names, 500 at most in the schema (the server takes
/// 1,000 devices per request with `count`).
pub fn device_names() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(<DeviceName as utoipa::PartialSchema>::schema())
        .max_items(Some(500))
        .unique_items(true)
        .description(Some("Names of the devices to create, each once."))
        .build()
}

/// Tags: at most 100, keys of 1 to 64 characters, string values.
#[derive(Debug)]
pub struct Tags;

impl utoipa::PartialSchema for Tags {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .max_properties(Some(100))
            .property_names(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(64)),
            ))
            .additional_properties(Some(ObjectBuilder::new().schema_type(Type::String)))
            .description(Some(
                "Tags: at most 100, keys of 1 to 64 characters, string values.",
            ))
            .into()
    }
}

impl ToSchema for Tags {}

/// An Alibaba TSL document: `properties`, `events`, `services` (and `schema`, `profile`,
/// `link`, `functionBlockId`, `functionBlockName`); other keys are refused.
#[derive(Debug, ToSchema)]
pub struct ThingModelDoc(BTreeMap<String, serde_json::Value>);

/// A stored thing model version.
#[derive(Debug, ToSchema)]
pub struct ThingModelStored {
    product_key: String,
    version: i64,
    properties: usize,
    events: usize,
    services: usize,
}

/// A thing model version.
#[derive(Debug, ToSchema)]
pub struct ThingModelVersion {
    product_key: String,
    version: i64,
    created_at: i64,
    #[schema(value_type = Object)]
    tsl: serde_json::Value,
}

/// What a delete removed.
#[derive(Debug, ToSchema)]
pub struct Deleted {
    deleted: String,
    /// For devices and products: whether sessions were closed.
    disconnected: Option<serde_json::Value>,
}

/// A published message.
#[derive(Debug, ToSchema)]
pub struct Published {
    topic: String,
    /// Sessions it was queued to.
    delivered: usize,
}

/// Online/offline changes.
#[derive(Debug, ToSchema)]
pub struct PresenceList {
    #[schema(value_type = Vec<Object>)]
    events: Vec<serde_json::Value>,
}

/// A call to a device: property set/get or a service.
#[derive(Debug, ToSchema)]
pub struct Call {
    product_key: String,
    device_name: String,
    /// Alink message id.
    id: String,
    service: String,
    /// `sync` or `async`.
    call_type: String,
    #[schema(value_type = Object)]
    params: serde_json::Value,
    /// `pending`, `succeeded`, `failed` or `timed_out`.
    status: String,
    code: Option<i64>,
    #[schema(value_type = Option<Object>)]
    reply: Option<serde_json::Value>,
    created_at: i64,
    deadline: i64,
    replied_at: Option<i64>,
}

/// Packages.
#[derive(Debug, ToSchema)]
pub struct PackageList {
    packages: Vec<crate::ota::store::Package>,
}

/// Jobs counted by state.
#[derive(Debug, ToSchema)]
pub struct JobStates {
    queued: u64,
    notified: u64,
    downloading: u64,
    verifying: u64,
    flashing: u64,
    succeeded: u64,
    failed: u64,
    cancelled: u64,
}

/// The canary stage's jobs.
#[derive(Debug, ToSchema)]
pub struct CanaryCounts {
    devices: u64,
    /// Queued or upgrading.
    open: u64,
    succeeded: u64,
}

/// Failed jobs of one reason.
#[derive(Debug, ToSchema)]
pub struct FailureCount {
    reason: String,
    count: i64,
}

/// A campaign, where it is, and its jobs counted by state.
#[derive(Debug, ToSchema)]
pub struct Campaign {
    id: String,
    name: String,
    package_id: String,
    product_key: String,
    module: String,
    tenant: String,
    target: crate::ota::Target,
    policy: crate::ota::plan::Policy,
    /// `running`, `paused`, `cancelled`, `aborted` or `finished`.
    state: String,
    /// `canary` or `main`.
    stage: String,
    /// Why it was aborted or cancelled.
    reason: String,
    /// Current pace (grows with a ramp).
    pushes_per_minute_now: Option<f64>,
    created_at: i64,
    updated_at: i64,
    finished_at: Option<i64>,
    /// Jobs in all.
    devices: u64,
    states: JobStates,
    canary: CanaryCounts,
    failures: Vec<FailureCount>,
}

/// Campaigns.
#[derive(Debug, ToSchema)]
pub struct CampaignList {
    campaigns: Vec<Campaign>,
}

/// A page of jobs.
#[derive(Debug, ToSchema)]
pub struct JobList {
    jobs: Vec<crate::ota::store::Job>,
    offset: i64,
    limit: i64,
}

/// A device's OTA state.
#[derive(Debug, ToSchema)]
pub struct DeviceOta {
    modules: Vec<crate::ota::store::ModuleVersion>,
    jobs: Vec<crate::ota::store::Job>,
    history: Vec<crate::ota::store::HistoryRow>,
}

/// A key just made: its token, shown only in this answer, and the key.
#[derive(Debug, ToSchema)]
pub struct KeyCreated {
    /// `ilk_<id>_<secret>`: send as `Authorization: Bearer <token>`.
    token: String,
    key: crate::users::ApiKey,
}

/// The API description: every operation of the HTTP API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Ironlink cloud API",
        description = "Products, devices, thing models, calls, applications, rules, scripts and OTA. Every request carries `Authorization: Bearer <admin token or API key>` (POST /login gives a named user a key); roles: viewer reads, operator also changes, admin also manages users, keys, application access keys and reads the audit log (403 otherwise); every change is in the audit log; every error is `{\"code\", \"message\"}`.",
        version = env!("CARGO_PKG_VERSION")
    ),
    servers((url = "/api/v1")),
    paths(
        super::create_product, super::list_products, super::get_product, super::update_product,
        super::delete_product, super::product_credentials, super::put_thing_model,
        super::get_thing_model, super::create_devices, super::list_devices, super::get_device,
        super::delete_device, super::device_credentials, super::disable_device,
        super::enable_device, super::put_tags, super::publish_to_device, super::broadcast,
        super::presence_history, super::device_limits,
        super::thing::latest, super::thing::set_properties, super::thing::get_properties,
        super::timeseries::history, super::timeseries::aggregate, super::timeseries::value_at,
        super::timeseries::query, super::timeseries::seal, super::timeseries::archive, super::timeseries::list_archive, super::timeseries::list_policies,
        super::timeseries::put_policy, super::timeseries::delete_policy, super::analytics::changepoints, super::analytics::history_changepoints, super::analytics::pv_simulate, super::analytics::pv_diagnose, super::analytics::anomaly_detect, super::jobs::create_job, super::jobs::list_jobs, super::jobs::get_job, super::jobs::update_job, super::jobs::delete_job, super::jobs::start_job_run, super::jobs::list_job_runs, super::jobs::get_job_run, super::jobs::cancel_job_run, super::jobs::job_result, super::jobs::create_monitor, super::jobs::list_monitors, super::jobs::get_monitor, super::jobs::delete_monitor, super::jobs::train_monitor, super::thing::events, super::thing::call_service,
        super::thing::list_calls, super::thing::get_call, super::thing::get_shadow,
        super::thing::put_shadow, super::thing::sub_devices, super::thing::remove_sub_device, super::thing::raw_messages,
        super::thing::send_raw,
        super::apps::create_key, super::apps::list_keys, super::apps::delete_key,
        super::apps::create_group, super::apps::list_groups, super::apps::get_group,
        super::apps::delete_group, super::apps::subscribe, super::apps::list_subscriptions,
        super::apps::unsubscribe,
        super::rules::create, super::rules::list, super::rules::test, super::rules::show,
        super::rules::update, super::rules::remove, super::rules::enable, super::rules::disable,
        super::rules::dead_letters, super::rules::clear_dead_letters, super::rules::table_rows,
        super::rules::get_script, super::rules::put_script, super::rules::delete_script,
        super::rules::test_script,
        super::ota::upload_package, super::ota::list_packages, super::ota::get_package,
        super::ota::delete_package, super::ota::create_campaign, super::ota::list_campaigns,
        super::ota::get_campaign, super::ota::pause_campaign, super::ota::resume_campaign,
        super::ota::cancel_campaign, super::ota::campaign_devices, super::ota::device_ota,
        super::users::login, super::users::me, super::users::logout, super::users::list_users,
        super::users::create_user, super::users::update_user, super::users::delete_user,
        super::users::list_keys, super::users::create_key, super::users::revoke_key,
        super::users::audit, super::users::overview, super::users::live,
    ),
    components(schemas(ErrorBody)),
    modifiers(&CommonAnswers),
    security(("bearer" = []))
)]
pub struct ApiDoc;

/// Adds the bearer scheme and the answers every operation can give.
#[derive(Debug)]
struct CommonAnswers;

fn error(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name("ErrorBody"))),
        )
        .build()
}

impl Modify for CommonAnswers {
    fn modify(&self, doc: &mut Doc) {
        if let Some(c) = doc.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
        for item in doc.paths.paths.values_mut() {
            let ops: [&mut Option<Operation>; 5] = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for op in ops.into_iter().flatten() {
                let has_body = op.request_body.is_some();
                let r = &mut op.responses.responses;
                let mut add = |code: &str, what: &str| {
                    r.entry(code.to_owned())
                        .or_insert_with(|| error(what).into());
                };
                add(
                    "400",
                    "Malformed request: a path, query or body value is refused, with the reason",
                );
                add("401", "Missing or wrong bearer token");
                add("403", "The credential's role may not do this");
                add("503", "The database failed; retry later");
                if has_body {
                    add("413", "The body is too large");
                    add("415", "The body is not JSON");
                    add("422", "The JSON does not have the expected shape");
                }
            }
        }
    }
}

/// The document as JSON.
pub fn json() -> String {
    ApiDoc::openapi().to_json().unwrap_or_else(|_| "{}".into())
}
