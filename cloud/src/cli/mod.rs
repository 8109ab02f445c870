//! Command line: `serve`, and admin subcommands that mirror the HTTP API against a running
//! server. Tables for people, `--json` for scripts. OTA commands live in `cli/ota.rs`.

use crate::config::Config;
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use ironlink_shared::credentials::write_device_credentials;
use ironlink_shared::sign::SignMethod;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;

mod analytics;
mod ota;
mod timeseries;
mod users;
pub use analytics::AnalyticsCmd;
pub use ota::{CampaignCmd, CreateArgs, OtaCmd, PackageCmd};
pub use timeseries::{PolicyCmd, TimeseriesCmd};

/// Ironlink cloud: device access, registry and API.
#[derive(Debug, Parser)]
#[command(name = "ironlink-cloud", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the cloud (embedded broker, SQLite under the data dir unless configured otherwise).
    Serve(ServeArgs),
    /// One run of an analytics job (started by the server; job on standard input).
    #[command(hide = true)]
    AnalyticsWorker,
    /// Manage products.
    Product {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Product action.
        #[command(subcommand)]
        cmd: ProductCmd,
    },
    /// Manage devices.
    Device {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Device action.
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Application access: access keys, consumer groups, subscriptions.
    App {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Application action.
        #[command(subcommand)]
        cmd: AppCmd,
    },
    /// Rules: SQL over device messages, windows and actions.
    Rule {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Rule action.
        #[command(subcommand)]
        cmd: RuleCmd,
    },
    /// Per-product data-parsing scripts (JavaScript, Alibaba's script contract).
    Script {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Script action.
        #[command(subcommand)]
        cmd: ScriptCmd,
    },
    /// Over-the-air updates: signing keys and signatures (`keygen`, `sign`: local), packages,
    /// campaigns and a device's OTA state (against the server).
    Ota {
        /// OTA action.
        #[command(subcommand)]
        cmd: OtaCmd,
    },
    /// Time series: aggregates, the value at a time, storage policies and retention, sealing.
    Timeseries {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Time-series action.
        #[command(subcommand)]
        cmd: TimeseriesCmd,
    },
    /// Analytics: change points of a property's history, PV IV-curve diagnosis.
    Analytics {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Analytics action.
        #[command(subcommand)]
        cmd: AnalyticsCmd,
    },
    /// Named users of the API and console, and their roles (admin).
    User {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// User action.
        #[command(subcommand)]
        cmd: users::UserCmd,
    },
    /// API keys: `ilk_...` bearer tokens with a role, an expiry, revocable.
    Key {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Key action.
        #[command(subcommand)]
        cmd: users::KeyCmd,
    },
    /// The audit log: who changed what through the API, newest first (admin).
    Audit {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Most entries (1 to 1,000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Entries before this id (paging).
        #[arg(long)]
        before: Option<i64>,
        /// Only this user's.
        #[arg(long)]
        actor: Option<String>,
    },
    /// Publish a downlink message to one of a device's topics.
    Pub {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// Topic, e.g. /sys/{pk}/{dn}/thing/service/property/set.
        topic: String,
        /// Payload text.
        payload: String,
        /// QoS 0 or 1.
        #[arg(long, default_value_t = 0)]
        qos: u8,
    },
}

impl Command {
    /// True when the admin command asked for JSON (its errors are JSON too).
    pub fn wants_json(&self) -> bool {
        match self {
            Command::Serve(_) | Command::AnalyticsWorker => false,
            Command::Ota { cmd } => cmd.wants_json(),
            Command::Product { client, .. }
            | Command::Device { client, .. }
            | Command::App { client, .. }
            | Command::Rule { client, .. }
            | Command::Script { client, .. }
            | Command::Timeseries { client, .. }
            | Command::Analytics { client, .. }
            | Command::User { client, .. }
            | Command::Key { client, .. }
            | Command::Audit { client, .. }
            | Command::Pub { client, .. } => client.json,
        }
    }
}

/// An answer of the API that is not a success, as the CLI reports it.
#[derive(Debug, thiserror::Error)]
#[error("{status} ({code}): {message}")]
pub struct ApiCallError {
    /// HTTP status.
    pub status: u16,
    /// The API's error code.
    pub code: String,
    /// The API's message, its HTTP hints turned into CLI commands.
    pub message: String,
}

/// A call whose device answered with an error, or did not answer in time.
#[derive(Debug, thiserror::Error)]
#[error("call {id} {status}{}", code.map(|c| format!(" (code {c})")).unwrap_or_default())]
pub struct CallFailed {
    /// Message id of the call.
    pub id: String,
    /// `failed` or `timed_out`.
    pub status: String,
    /// The device's Alink code, if it answered.
    pub code: Option<i64>,
}

/// The API's hints name HTTP paths; a CLI user needs the command instead.
fn cli_hints(message: &str) -> String {
    const HINTS: [(&str, &str); 6] = [
        (
            "GET /api/v1/products/{pk}/devices",
            "ironlink-cloud device list PRODUCT_KEY",
        ),
        ("GET /api/v1/products", "ironlink-cloud product list"),
        (
            "PUT /api/v1/products/{pk}/thing-model",
            "ironlink-cloud product thing-model PRODUCT_KEY --import FILE",
        ),
        (
            "POST /api/v1/consumer-groups",
            "ironlink-cloud app group create NAME",
        ),
        ("see /api/v1/openapi.json", "see ironlink-cloud --help"),
        (
            "`Authorization: Bearer <admin token>`",
            "--token or IRONLINK_TOKEN",
        ),
    ];
    let mut out = message.to_owned();
    for (http, cli) in HINTS {
        if let Some((prefix, _)) = http.split_once("{pk}") {
            // The message carries the real key in place of {pk}.
            if let Some(i) = out.find(prefix) {
                let rest = &out[i + prefix.len()..];
                let key_end = rest.find('/').unwrap_or(rest.len());
                let (key, tail) = rest.split_at(key_end);
                let suffix = http.split_once("{pk}").map_or("", |(_, s)| s);
                if let Some(after) = tail.strip_prefix(suffix) {
                    out = format!("{}{}{after}", &out[..i], cli.replace("PRODUCT_KEY", key));
                }
            }
        } else {
            out = out.replace(http, cli);
        }
    }
    out
}

/// A base URL with a scheme: `host:port` becomes `http://host:port`.
pub fn normalize_url(url: &str) -> anyhow::Result<String> {
    let url = url.trim().trim_end_matches('/');
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let parsed = reqwest::Url::parse(&full)
        .with_context(|| format!("--url `{url}` is not a URL like http://127.0.0.1:8080"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        bail!("--url `{url}` must be http://HOST:PORT or https://HOST:PORT");
    }
    Ok(full)
}

/// `serve` flags; each overrides the same key of the config file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (see ironlink-cloud.example.toml).
    #[arg(long, hide_env_values = true, env = "IRONLINK_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (SQLite database, generated certificates, admin token).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Plain MQTT listener, or `off`.
    #[arg(long)]
    pub mqtt_listen: Option<String>,
    /// MQTT over TLS listener, or `off`.
    #[arg(long)]
    pub mqtts_listen: Option<String>,
    /// AMQP over TLS listener for applications, or `off`.
    #[arg(long)]
    pub amqps_listen: Option<String>,
    /// HTTP API listener.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// sqlite://PATH or postgres://...
    #[arg(long, hide_env_values = true, env = "IRONLINK_DATABASE_URL")]
    pub database_url: Option<String>,
    /// API bearer token (generated and printed once when absent).
    #[arg(long, hide_env_values = true, env = "IRONLINK_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Log line format: text (coloured only on a terminal) or json (one object per line).
    #[arg(
        long,
        hide_env_values = true,
        env = "IRONLINK_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: crate::logging::Format,
}

fn listen_flag(v: &str, flag: &str) -> anyhow::Result<Option<SocketAddr>> {
    if v == "off" {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .with_context(|| format!("{flag} `{v}` is not an address like 0.0.0.0:1883 (or `off`)"))
}

impl ServeArgs {
    /// The configuration: the file (if any), then the flags over it.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        if let Some(v) = &self.mqtt_listen {
            c.mqtt.listen = listen_flag(v, "--mqtt-listen")?;
        }
        if let Some(v) = &self.mqtts_listen {
            c.mqtt.tls_listen = listen_flag(v, "--mqtts-listen")?;
        }
        if let Some(v) = &self.amqps_listen {
            c.apps.amqps_listen = listen_flag(v, "--amqps-listen")?;
        }
        if let Some(a) = self.http_listen {
            c.http.listen = a;
        }
        if let Some(u) = &self.database_url {
            c.database_url = Some(u.clone());
        }
        if let Some(t) = &self.admin_token {
            c.admin_token = Some(t.clone());
        }
        Ok(c)
    }
}

/// How admin subcommands reach the server.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the HTTP API.
    #[arg(
        long,
        hide_env_values = true,
        env = "IRONLINK_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// API token; default: $IRONLINK_TOKEN, else ./ironlink-data/admin-token.
    #[arg(long, hide_env_values = true, env = "IRONLINK_TOKEN", global = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Product actions.
#[derive(Debug, Subcommand)]
pub enum ProductCmd {
    /// Create a product.
    Create {
        /// Product name.
        name: String,
        /// direct | gateway | sub-device
        #[arg(long, default_value = "direct")]
        node_type: String,
        /// alink-json | raw
        #[arg(long, default_value = "alink-json")]
        data_format: String,
        /// Allow devices to register with the product secret.
        #[arg(long)]
        dynamic_register: bool,
        /// Print only the new product key (for `PK=$(...)` in scripts).
        #[arg(long, short)]
        quiet: bool,
    },
    /// List products.
    List,
    /// Show one product (without its secret: see `credentials`).
    Show {
        /// Product key.
        product_key: String,
    },
    /// Print the product secret (dynamic registration); the read is logged by the server.
    Credentials {
        /// Product key.
        product_key: String,
    },
    /// Change a product's name, description or dynamic registration.
    Update {
        /// Product key.
        product_key: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// Allow (true) or refuse (false) dynamic registration.
        #[arg(long)]
        dynamic_register: Option<bool>,
    },
    /// Delete a product and its devices.
    Delete {
        /// Product key.
        product_key: String,
    },
    /// Export the thing model (TSL JSON) to stdout, or import one with --import FILE.
    ThingModel {
        /// Product key.
        product_key: String,
        /// TSL JSON file to import as a new version.
        #[arg(long)]
        import: Option<PathBuf>,
        /// Version to export (default: the latest).
        #[arg(long)]
        version: Option<i64>,
    },
}

/// Device actions.
#[derive(Debug, Subcommand)]
pub enum AppCmd {
    /// Access keys.
    #[command(subcommand)]
    AccessKey(AccessKeyCmd),
    /// Consumer groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Bind consumer groups to a product's messages:
    /// TYPES of property, event, raw, custom, lifecycle, topology, service_reply, upstream.
    Subscribe {
        /// Product key.
        product_key: String,
        /// Consumer group id (several separated by commas).
        group_ids: String,
        /// Message types.
        #[arg(required = true)]
        message_types: Vec<String>,
    },
    /// List subscriptions.
    Subscriptions,
    /// Remove a subscription.
    Unsubscribe {
        /// Product key.
        product_key: String,
        /// Consumer group id.
        group_id: String,
    },
}

/// A rule's definition on the command line.
#[derive(Debug, Args)]
pub struct RuleDef {
    /// Unique name.
    pub name: String,
    /// The SQL (or --sql-file).
    #[arg(long, conflicts_with = "sql_file")]
    pub sql: Option<String>,
    /// A file with the SQL.
    #[arg(long)]
    pub sql_file: Option<PathBuf>,
    /// An action as JSON, e.g. '{"type":"webhook","url":"http://..."}' (repeatable).
    #[arg(long = "action")]
    pub actions: Vec<String>,
    /// Free text.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Create it disabled.
    #[arg(long)]
    pub disabled: bool,
    /// At least once: messages and outputs go through a durable queue.
    #[arg(long)]
    pub durable: bool,
}

impl RuleDef {
    fn body(&self) -> anyhow::Result<Value> {
        let sql = match (&self.sql, &self.sql_file) {
            (Some(s), _) => s.clone(),
            (None, Some(f)) => {
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
            }
            (None, None) => bail!("give the rule's SQL with --sql or --sql-file"),
        };
        let mut actions = Vec::new();
        for (i, a) in self.actions.iter().enumerate() {
            actions.push(
                serde_json::from_str::<Value>(a)
                    .with_context(|| format!("--action {} is not JSON", i + 1))?,
            );
        }
        Ok(
            json!({"name": self.name, "sql": sql, "actions": actions, "description": self.description, "enabled": !self.disabled, "durable": self.durable}),
        )
    }
}

/// Rule actions.
#[derive(Debug, Subcommand)]
pub enum RuleCmd {
    /// Create a rule (the SQL is checked; errors name line and column).
    Create(RuleDef),
    /// List rules with their counters.
    List,
    /// Show a rule (by id or name): SQL, counters, actions' counters and last errors.
    Show {
        /// Rule id or name.
        rule: String,
    },
    /// Replace a rule's definition.
    Update {
        /// Rule id or name.
        rule: String,
        /// The new definition.
        #[command(flatten)]
        def: RuleDef,
    },
    /// Enable a rule.
    Enable {
        /// Rule id or name.
        rule: String,
    },
    /// Disable a rule.
    Disable {
        /// Rule id or name.
        rule: String,
    },
    /// Delete a rule.
    Delete {
        /// Rule id or name.
        rule: String,
    },
    /// Run SQL on a sample payload without creating a rule.
    Test {
        /// The SQL.
        #[arg(long)]
        sql: String,
        /// Sample payload (JSON).
        #[arg(long)]
        payload: String,
        /// The topic the sample came on.
        #[arg(long)]
        topic: Option<String>,
    },
    /// Outputs an action gave up on (dead letters); --clear deletes them.
    DeadLetters {
        /// Rule id or name.
        rule: String,
        /// Delete them instead.
        #[arg(long)]
        clear: bool,
    },
    /// Rows rules appended to a rule table.
    Table {
        /// Table name.
        table: String,
        /// Rows after this id.
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
}

/// Script actions.
#[derive(Debug, Subcommand)]
pub enum ScriptCmd {
    /// Install a product's script from a file (compiled and checked first).
    Set {
        /// Product key.
        product_key: String,
        /// JavaScript file.
        file: PathBuf,
    },
    /// Show a product's script and its counters.
    Show {
        /// Product key.
        product_key: String,
    },
    /// Remove a product's script.
    Delete {
        /// Product key.
        product_key: String,
    },
    /// Run a script on a sample: `up` (rawDataToProtocol, --hex), `down` (protocolToRawData,
    /// --alink) or `custom` (transformPayload, --topic and --hex).
    Test {
        /// Product key.
        product_key: String,
        /// up, down or custom.
        direction: String,
        /// Raw bytes in hex.
        #[arg(long)]
        hex: Option<String>,
        /// Alink JSON.
        #[arg(long)]
        alink: Option<String>,
        /// Custom topic.
        #[arg(long)]
        topic: Option<String>,
        /// Try this file instead of the installed script.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

/// Access key actions.
#[derive(Debug, Subcommand)]
pub enum AccessKeyCmd {
    /// Create one (the secret is shown only now).
    Create {
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List them (without secrets).
    List,
    /// Delete one.
    Delete {
        /// Access key id.
        access_key_id: String,
    },
}

/// Consumer group actions.
#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Create one.
    Create {
        /// Unique name.
        name: String,
    },
    /// List them with their counters.
    List,
    /// One group's counters.
    Show {
        /// Group id.
        group_id: String,
    },
    /// Delete one, with its queue.
    Delete {
        /// Group id.
        group_id: String,
    },
}

/// Device actions.
#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Create devices: the names given, plus --count generated ones (one generated if neither).
    Create {
        /// Product key.
        product_key: String,
        /// Device names.
        names: Vec<String>,
        /// How many devices with generated names (sent in batches of 1,000, the API's
        /// most per request, with a progress bar on a terminal).
        #[arg(long)]
        count: Option<usize>,
    },
    /// Create devices from a CSV file with a `device_name` column (a header row; other
    /// columns become tags), in batches of 1,000.
    Import {
        /// Product key.
        product_key: String,
        /// CSV file.
        file: PathBuf,
    },
    /// List a product's devices.
    List {
        /// Product key.
        product_key: String,
        /// Page number, from 1.
        #[arg(long, default_value_t = 1)]
        page: i64,
        /// Devices per page.
        #[arg(long, default_value_t = 50)]
        page_size: i64,
    },
    /// Show a device: status, times, address.
    Show {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
    },
    /// Disable (and disconnect) a device.
    Disable {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
    },
    /// Enable a device.
    Enable {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
    },
    /// Delete (and disconnect) a device.
    Delete {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
    },
    /// Print the MQTT client id, username, password and secret of a device, with the host
    /// and port to use; the read is logged by the server.
    Credentials {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// For the TLS port (securemode=2) instead of TCP (securemode=3).
        #[arg(long)]
        tls: bool,
        /// hmacsha256 | hmacsha1 | hmacmd5
        #[arg(long, default_value = "hmacsha256")]
        signmethod: String,
        /// Print `export MQTT_HOST=... MQTT_PORT=... MQTT_CLIENT_ID=... MQTT_USERNAME=...
        /// MQTT_PASSWORD=...` for `eval "$(...)"` in a shell.
        #[arg(long)]
        export: bool,
    },
    /// Replace a device's tags: KEY=VALUE ... (none clears them).
    Tags {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// KEY=VALUE pairs.
        tags: Vec<String>,
    },
    /// Online/offline history.
    Presence {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
    },
    /// Latest value of every property.
    Properties {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
    },
    /// History of one property, newest first (`--asc`: oldest first).
    History {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// Property identifier.
        identifier: String,
        /// From, ms since the Unix epoch.
        #[arg(long)]
        from: Option<i64>,
        /// To, ms since the Unix epoch.
        #[arg(long)]
        to: Option<i64>,
        /// Most points (per page with --all).
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Oldest first.
        #[arg(long)]
        asc: bool,
        /// Every point in the range, page after page (tables print as they come).
        #[arg(long)]
        all: bool,
    },
    /// Events, newest first.
    Events {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// Only this event identifier.
        #[arg(long)]
        identifier: Option<String>,
        /// Most events.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Set properties (thing.service.property.set) and wait for the device's answer; exits
    /// non-zero when the device refuses or does not answer in time.
    Set {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// JSON object of property values, e.g. '{"mode": 1}'.
        params: String,
        /// How long to wait for the device, ms.
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
    /// Call a service of the thing model (sync services wait for the answer).
    Call {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// Service identifier.
        service: String,
        /// JSON object of input parameters.
        #[arg(default_value = "{}")]
        params: String,
        /// Timeout, ms.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// For async services: wait until the device answers or the call times out (exits
        /// non-zero unless it succeeded).
        #[arg(long)]
        wait: bool,
    },
    /// Recent calls (property set/get and services) and their status.
    Calls {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
    },
    /// Show the shadow, or set desired state with --desired JSON.
    Shadow {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// JSON object of desired attributes (null deletes one).
        #[arg(long)]
        desired: Option<String>,
    },
    /// A gateway's sub-devices.
    SubDevices {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
    },
}

fn json_arg(text: &str, what: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("{what} is not JSON: {text}"))
}

struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
    json: bool,
}

impl Client {
    fn new(a: &ClientArgs) -> anyhow::Result<Self> {
        let token = match &a.token {
            Some(t) => t.clone(),
            None => std::fs::read_to_string("ironlink-data/admin-token")
                .map(|t| t.trim().to_owned())
                .map_err(|_| {
                    anyhow::anyhow!(
                        "no API token: pass --token or set IRONLINK_TOKEN (the server prints it at first start and keeps it in {{data_dir}}/admin-token)"
                    )
                })?,
        };
        Ok(Self {
            http: reqwest::Client::new(),
            url: normalize_url(&a.url)?,
            token,
            json: a.json,
        })
    }

    /// Calls the API and prints the answer as one record.
    async fn record(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<()> {
        let v = self.call(method, path, body).await?;
        output(self, &v, None);
        Ok(())
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{path}", self.url);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| {
            format!("cannot reach {url}: is `ironlink-cloud serve` running? (--url / IRONLINK_URL)")
        })?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(ApiCallError {
                status: status.as_u16(),
                code: v["code"].as_str().unwrap_or("error").to_owned(),
                message: cli_hints(v["message"].as_str().unwrap_or("no message")),
            }
            .into());
        }
        Ok(v)
    }
}

/// Epoch milliseconds as `YYYY-MM-DD HH:MM:SS.mmm UTC` (proleptic Gregorian).
pub fn format_ms(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (year, month, day) = ironlink_shared::time::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// A table or record cell; `*_at` and `at` fields (epoch ms) print as UTC times.
fn field_cell(key: &str, v: &Value) -> String {
    let is_time = key == "at" || key == "time" || key == "deadline" || key.ends_with("_at");
    match (is_time, v.as_i64()) {
        (true, Some(ms)) => format_ms(ms),
        _ => cell(v),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_table(rows: &[Value], cols: &[&str]) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| field_cell(c, &r[*c])).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |items: Vec<String>| {
        items
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(cols.iter().map(|c| c.to_uppercase()).collect()));
    for r in cells {
        println!("{}", line(r));
    }
}

fn print_record(v: &Value) {
    if let Some(obj) = v.as_object() {
        let w = obj.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, val) in obj {
            println!("{k:<w$}  {}", field_cell(k, val));
        }
    }
}

const PRODUCT_COLS: &[&str] = &[
    "product_key",
    "name",
    "node_type",
    "data_format",
    "dynamic_register",
];
const DEVICE_COLS: &[&str] = &[
    "device_name",
    "status",
    "enabled",
    "last_online_at",
    "client_addr",
];

fn output(c: &Client, v: &Value, list_key: Option<(&str, &[&str])>) {
    if c.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    match list_key {
        Some((key, cols)) => print_table(v[key].as_array().map(Vec::as_slice).unwrap_or(&[]), cols),
        None => print_record(v),
    }
}

/// Most devices the API creates in one request.
const CREATE_BATCH: usize = 1000;

/// Creates the named devices (with their tags, when not null) and `generate` more with
/// generated names, in batches the API takes, with a progress bar on a terminal. Each batch
/// is all or none; a failing batch stops the run and says how many were created before it.
async fn create_in_batches(
    c: &Client,
    pk: &str,
    named: Vec<(String, Value)>,
    generate: usize,
) -> anyhow::Result<Vec<Value>> {
    let total = named.len() + generate;
    let bar = if c.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} devices {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let path = format!("/products/{pk}/devices");
    let mut created: Vec<Value> = Vec::with_capacity(total);
    let mut named = named.into_iter().peekable();
    let mut left = generate;
    while named.peek().is_some() || left > 0 {
        let batch: Vec<(String, Value)> = named.by_ref().take(CREATE_BATCH).collect();
        let count = (CREATE_BATCH - batch.len()).min(left);
        left -= count;
        let names: Vec<&str> = batch.iter().map(|(n, _)| n.as_str()).collect();
        let body = json!({"device_names": names, "count": (count > 0).then_some(count)});
        let v = c
            .call(reqwest::Method::POST, &path, Some(body))
            .await
            .with_context(|| format!("after {} of {total} devices were created", created.len()))?;
        for (name, tags) in batch.iter().filter(|(_, t)| !t.is_null()) {
            c.call(
                reqwest::Method::PUT,
                &format!("/devices/{pk}/{name}/tags"),
                Some(tags.clone()),
            )
            .await
            .with_context(|| format!("tags of `{name}`"))?;
        }
        let devices = v["devices"].as_array().cloned().unwrap_or_default();
        bar.inc(devices.len() as u64);
        created.extend(devices);
    }
    bar.finish_and_clear();
    Ok(created)
}

/// Rows of a device CSV: `device_name` plus tag columns (empty cells are no tag).
fn read_devices_csv(file: &std::path::Path) -> anyhow::Result<Vec<(String, Value)>> {
    let mut r = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(file)
        .with_context(|| format!("reading {}", file.display()))?;
    let headers = r
        .headers()
        .with_context(|| format!("{}: no header row", file.display()))?
        .clone();
    let name_col = headers
        .iter()
        .position(|h| h == "device_name")
        .with_context(|| {
            format!(
                "{}: the header row has no `device_name` column",
                file.display()
            )
        })?;
    let mut rows = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {}", file.display(), i + 2))?;
        let name = rec.get(name_col).unwrap_or_default().to_owned();
        if name.is_empty() {
            bail!("{}: row {}: device_name is empty", file.display(), i + 2);
        }
        let tags: serde_json::Map<String, Value> = headers
            .iter()
            .zip(rec.iter())
            .enumerate()
            .filter(|(j, (_, v))| *j != name_col && !v.is_empty())
            .map(|(_, (k, v))| (k.to_owned(), json!(v)))
            .collect();
        rows.push((
            name,
            if tags.is_empty() {
                Value::Null
            } else {
                Value::Object(tags)
            },
        ));
    }
    if rows.is_empty() {
        bail!("{}: no devices in the file", file.display());
    }
    Ok(rows)
}

/// Polls an async call until it is no longer pending (its deadline bounds the wait).
async fn wait_for_call(c: &Client, pk: &str, dn: &str, mut v: Value) -> anyhow::Result<Value> {
    let id = v["id"].as_str().unwrap_or_default().to_owned();
    let mut delay = std::time::Duration::from_millis(50);
    while v["status"] == "pending" {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(1));
        v = c
            .call(
                reqwest::Method::GET,
                &format!("/devices/{pk}/{dn}/service-calls/{id}"),
                None,
            )
            .await?;
    }
    Ok(v)
}

/// An error for a call that failed or timed out (pending and succeeded calls are fine).
fn call_outcome(v: &Value) -> anyhow::Result<()> {
    match v["status"].as_str() {
        Some(s @ ("failed" | "timed_out")) => Err(CallFailed {
            id: v["id"].as_str().unwrap_or_default().to_owned(),
            status: s.to_owned(),
            code: v["code"].as_i64(),
        }
        .into()),
        _ => Ok(()),
    }
}

/// Runs an admin subcommand.
pub async fn run_admin(command: Command) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        Command::Ota { cmd } => ota::run(cmd).await?,
        Command::Timeseries { client, cmd } => timeseries::run(&Client::new(&client)?, cmd).await?,
        Command::Analytics { client, cmd } => analytics::run(&Client::new(&client)?, cmd).await?,
        Command::User { client, cmd } => users::run_user(&Client::new(&client)?, cmd).await?,
        Command::Key { client, cmd } => users::run_key(&Client::new(&client)?, cmd).await?,
        Command::Audit {
            client,
            limit,
            before,
            actor,
        } => users::run_audit(&Client::new(&client)?, limit, before, actor).await?,
        Command::Serve(_) | Command::AnalyticsWorker => {
            bail!("serve and analytics-worker are not admin commands")
        }
        Command::Product { client, cmd } => {
            let c = Client::new(&client)?;
            match cmd {
                ProductCmd::Create {
                    name,
                    node_type,
                    data_format,
                    dynamic_register,
                    quiet,
                } => {
                    let body = json!({"name": name, "node_type": node_type, "data_format": data_format, "dynamic_register": dynamic_register});
                    let v = c.call(Method::POST, "/products", Some(body)).await?;
                    if quiet {
                        println!("{}", v["product_key"].as_str().unwrap_or_default());
                    } else {
                        output(&c, &v, None);
                    }
                }
                ProductCmd::List => {
                    let v = c.call(Method::GET, "/products", None).await?;
                    output(&c, &v, Some(("products", PRODUCT_COLS)));
                }
                ProductCmd::Show { product_key } => {
                    c.record(Method::GET, &format!("/products/{product_key}"), None)
                        .await?;
                }
                ProductCmd::Credentials { product_key } => {
                    c.record(
                        Method::GET,
                        &format!("/products/{product_key}/credentials"),
                        None,
                    )
                    .await?;
                }
                ProductCmd::Update {
                    product_key,
                    name,
                    description,
                    dynamic_register,
                } => {
                    let mut body = serde_json::Map::new();
                    if let Some(n) = name {
                        body.insert("name".into(), json!(n));
                    }
                    if let Some(d) = description {
                        body.insert("description".into(), json!(d));
                    }
                    if let Some(d) = dynamic_register {
                        body.insert("dynamic_register".into(), json!(d));
                    }
                    c.record(
                        Method::PATCH,
                        &format!("/products/{product_key}"),
                        Some(Value::Object(body)),
                    )
                    .await?;
                }
                ProductCmd::ThingModel {
                    product_key,
                    import,
                    version,
                } => match import {
                    Some(file) => {
                        let text = std::fs::read_to_string(&file)
                            .with_context(|| format!("reading {}", file.display()))?;
                        let body: Value = serde_json::from_str(&text)
                            .with_context(|| format!("{} is not JSON", file.display()))?;
                        c.record(
                            Method::PUT,
                            &format!("/products/{product_key}/thing-model"),
                            Some(body),
                        )
                        .await?;
                    }
                    None => {
                        let query = version.map(|v| format!("?version={v}")).unwrap_or_default();
                        let v = c
                            .call(
                                Method::GET,
                                &format!("/products/{product_key}/thing-model{query}"),
                                None,
                            )
                            .await?;
                        let doc = if c.json { &v } else { &v["tsl"] };
                        println!("{}", serde_json::to_string_pretty(doc).unwrap_or_default());
                    }
                },
                ProductCmd::Delete { product_key } => {
                    c.record(Method::DELETE, &format!("/products/{product_key}"), None)
                        .await?;
                }
            }
        }
        Command::Device { client, cmd } => {
            let c = Client::new(&client)?;
            match cmd {
                DeviceCmd::Create {
                    product_key,
                    names,
                    count,
                } => {
                    let path = format!("/products/{product_key}/devices");
                    if names.len() <= 1 && count.is_none() {
                        let body = json!({"device_name": names.first()});
                        c.record(Method::POST, &path, Some(body)).await?;
                    } else {
                        let rows: Vec<(String, Value)> =
                            names.into_iter().map(|n| (n, Value::Null)).collect();
                        let created =
                            create_in_batches(&c, &product_key, rows, count.unwrap_or(0)).await?;
                        output(
                            &c,
                            &json!({"devices": created}),
                            Some(("devices", &["device_name", "device_secret"])),
                        );
                    }
                }
                DeviceCmd::Import { product_key, file } => {
                    let rows = read_devices_csv(&file)?;
                    let created = create_in_batches(&c, &product_key, rows, 0).await?;
                    output(
                        &c,
                        &json!({"devices": created}),
                        Some(("devices", &["device_name", "device_secret"])),
                    );
                }
                DeviceCmd::List {
                    product_key,
                    page,
                    page_size,
                } => {
                    let v = c
                        .call(
                            Method::GET,
                            &format!(
                                "/products/{product_key}/devices?page={page}&page_size={page_size}"
                            ),
                            None,
                        )
                        .await?;
                    output(&c, &v, Some(("devices", DEVICE_COLS)));
                    if !c.json {
                        println!("page {} of {} devices", v["page"], v["total"]);
                    }
                }
                DeviceCmd::Show {
                    product_key,
                    device_name,
                } => {
                    c.record(
                        Method::GET,
                        &format!("/devices/{product_key}/{device_name}"),
                        None,
                    )
                    .await?;
                }
                DeviceCmd::Disable {
                    product_key,
                    device_name,
                } => {
                    c.record(
                        Method::POST,
                        &format!("/devices/{product_key}/{device_name}/disable"),
                        None,
                    )
                    .await?;
                }
                DeviceCmd::Enable {
                    product_key,
                    device_name,
                } => {
                    c.record(
                        Method::POST,
                        &format!("/devices/{product_key}/{device_name}/enable"),
                        None,
                    )
                    .await?;
                }
                DeviceCmd::Delete {
                    product_key,
                    device_name,
                } => {
                    c.record(
                        Method::DELETE,
                        &format!("/devices/{product_key}/{device_name}"),
                        None,
                    )
                    .await?;
                }
                DeviceCmd::Credentials {
                    product_key,
                    device_name,
                    tls,
                    signmethod,
                    export,
                } => {
                    let method = SignMethod::parse(&signmethod).with_context(|| {
                        format!("--signmethod `{signmethod}`: use hmacsha256, hmacsha1 or hmacmd5")
                    })?;
                    let d = c
                        .call(
                            Method::GET,
                            &format!("/devices/{product_key}/{device_name}/credentials"),
                            None,
                        )
                        .await?;
                    let secret = d["device_secret"]
                        .as_str()
                        .context("server returned no device_secret")?;
                    let mut v = credentials(
                        &product_key,
                        &device_name,
                        secret,
                        method,
                        tls,
                        crate::registry::now_ms(),
                    );
                    let host = reqwest::Url::parse(&c.url)
                        .ok()
                        .and_then(|u| u.host_str().map(str::to_owned))
                        .unwrap_or_else(|| "127.0.0.1".into());
                    let port = if tls {
                        &d["mqtts_port"]
                    } else {
                        &d["mqtt_port"]
                    };
                    let Some(port) = port.as_u64() else {
                        anyhow::bail!(
                            "the server has no {} listener: start it with {}",
                            if tls { "MQTT/TLS" } else { "plain MQTT" },
                            if tls {
                                "--mqtts-listen"
                            } else {
                                "--mqtt-listen"
                            }
                        );
                    };
                    if let Some(o) = v.as_object_mut() {
                        o.insert("host".into(), json!(host));
                        o.insert("port".into(), json!(port));
                        o.insert("device_secret".into(), json!(secret));
                    }
                    if export {
                        let q = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
                        println!(
                            "export MQTT_HOST={} MQTT_PORT={port} MQTT_CLIENT_ID={} MQTT_USERNAME={} MQTT_PASSWORD={}",
                            q(&host),
                            q(&cell(&v["client_id"])),
                            q(&cell(&v["username"])),
                            q(&cell(&v["password"]))
                        );
                    } else if c.json {
                        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    } else {
                        print_record(&v);
                        let tls_arg = if tls {
                            " --cafile ironlink-data/tls/ca.pem"
                        } else {
                            ""
                        };
                        println!(
                            "\ntry:\n  mosquitto_pub -h {host} -p {port}{tls_arg} -V mqttv311 -i '{}' -u '{}' -P '{}' -t '/sys/{product_key}/{device_name}/thing/event/property/post' -m '{{\"id\":\"1\",\"version\":\"1.0\",\"params\":{{\"temperature\":21.5}},\"method\":\"thing.event.property.post\"}}'",
                            cell(&v["client_id"]), cell(&v["username"]), cell(&v["password"])
                        );
                    }
                }
                DeviceCmd::Tags {
                    product_key,
                    device_name,
                    tags,
                } => {
                    let mut body = serde_json::Map::new();
                    for t in tags {
                        let (k, v) = t
                            .split_once('=')
                            .with_context(|| format!("tag `{t}` is not KEY=VALUE"))?;
                        body.insert(k.to_owned(), json!(v));
                    }
                    c.record(
                        Method::PUT,
                        &format!("/devices/{product_key}/{device_name}/tags"),
                        Some(Value::Object(body)),
                    )
                    .await?;
                }
                DeviceCmd::Properties {
                    product_key: pk,
                    device_name: dn,
                } => {
                    let v = c
                        .call(Method::GET, &format!("/devices/{pk}/{dn}/properties"), None)
                        .await?;
                    output(
                        &c,
                        &v,
                        Some(("properties", &["identifier", "value", "time"])),
                    );
                }
                DeviceCmd::History {
                    product_key: pk,
                    device_name: dn,
                    identifier,
                    from,
                    to,
                    limit,
                    asc,
                    all,
                } => {
                    let mut q = format!("limit={limit}");
                    if let Some(f) = from {
                        q.push_str(&format!("&from={f}"));
                    }
                    if let Some(t) = to {
                        q.push_str(&format!("&to={t}"));
                    }
                    if asc {
                        q.push_str("&order=asc");
                    }
                    let path = format!("/devices/{pk}/{dn}/properties/{identifier}/history?{q}");
                    let mut v = c.call(Method::GET, &path, None).await?;
                    timeseries::warn_damaged(&v);
                    if all && !c.json {
                        loop {
                            output(&c, &v, Some(("points", &["time", "value"])));
                            let Some(next) = v["next"].as_str().map(str::to_owned) else {
                                break;
                            };
                            v = c
                                .call(Method::GET, &format!("{path}&cursor={next}"), None)
                                .await?;
                            timeseries::warn_damaged(&v);
                        }
                    } else if all {
                        // One JSON document with every point.
                        let mut points = v["points"].as_array().cloned().unwrap_or_default();
                        while let Some(next) = v["next"].as_str().map(str::to_owned) {
                            v = c
                                .call(Method::GET, &format!("{path}&cursor={next}"), None)
                                .await?;
                            timeseries::warn_damaged(&v);
                            points.extend(v["points"].as_array().cloned().unwrap_or_default());
                        }
                        output(
                            &c,
                            &json!({"identifier": identifier, "points": points}),
                            None,
                        );
                    } else {
                        output(&c, &v, Some(("points", &["time", "value"])));
                    }
                }
                DeviceCmd::Events {
                    product_key: pk,
                    device_name: dn,
                    identifier,
                    limit,
                } => {
                    let mut path = format!("/devices/{pk}/{dn}/events?limit={limit}");
                    if let Some(id) = identifier {
                        path.push_str(&format!("&identifier={id}"));
                    }
                    let v = c.call(Method::GET, &path, None).await?;
                    output(
                        &c,
                        &v,
                        Some(("events", &["time", "identifier", "type", "output"])),
                    );
                }
                DeviceCmd::Set {
                    product_key: pk,
                    device_name: dn,
                    params,
                    timeout_ms,
                } => {
                    let body =
                        json!({"params": json_arg(&params, "params")?, "timeout_ms": timeout_ms});
                    let v = c
                        .call(
                            Method::POST,
                            &format!("/devices/{pk}/{dn}/properties"),
                            Some(body),
                        )
                        .await?;
                    output(&c, &v, None);
                    call_outcome(&v)?;
                }
                DeviceCmd::Call {
                    product_key: pk,
                    device_name: dn,
                    service,
                    params,
                    timeout_ms,
                    wait,
                } => {
                    let body =
                        json!({"params": json_arg(&params, "params")?, "timeout_ms": timeout_ms});
                    let mut v = c
                        .call(
                            Method::POST,
                            &format!("/devices/{pk}/{dn}/services/{service}"),
                            Some(body),
                        )
                        .await?;
                    if wait {
                        v = wait_for_call(&c, &pk, &dn, v).await?;
                    }
                    output(&c, &v, None);
                    call_outcome(&v)?;
                }
                DeviceCmd::Calls {
                    product_key: pk,
                    device_name: dn,
                } => {
                    let v = c
                        .call(
                            Method::GET,
                            &format!("/devices/{pk}/{dn}/service-calls"),
                            None,
                        )
                        .await?;
                    output(
                        &c,
                        &v,
                        Some((
                            "calls",
                            &["created_at", "id", "service", "status", "code", "reply"],
                        )),
                    );
                }
                DeviceCmd::Shadow {
                    product_key: pk,
                    device_name: dn,
                    desired,
                } => {
                    let path = format!("/devices/{pk}/{dn}/shadow");
                    let v = match desired {
                        Some(d) => {
                            let body = json!({"desired": json_arg(&d, "--desired")?});
                            c.call(Method::PUT, &path, Some(body)).await?
                        }
                        None => c.call(Method::GET, &path, None).await?,
                    };
                    output(&c, &v, None);
                }
                DeviceCmd::SubDevices {
                    product_key: pk,
                    device_name: dn,
                } => {
                    let v = c
                        .call(
                            Method::GET,
                            &format!("/devices/{pk}/{dn}/sub-devices"),
                            None,
                        )
                        .await?;
                    output(
                        &c,
                        &v,
                        Some((
                            "sub_devices",
                            &["product_key", "device_name", "online", "added_at"],
                        )),
                    );
                }
                DeviceCmd::Presence {
                    product_key,
                    device_name,
                } => {
                    let v = c
                        .call(
                            Method::GET,
                            &format!("/devices/{product_key}/{device_name}/presence"),
                            None,
                        )
                        .await?;
                    output(
                        &c,
                        &v,
                        Some(("events", &["at", "status", "reason", "client_addr"])),
                    );
                }
            }
        }
        Command::App { client, cmd } => {
            let c = Client::new(&client)?;
            let group_cols: &[&str] = &[
                "group_id",
                "name",
                "clients",
                "pushed",
                "replayed",
                "acknowledged",
                "redelivered",
                "backlog",
            ];
            match cmd {
                AppCmd::AccessKey(AccessKeyCmd::Create { description }) => {
                    let v = c
                        .call(
                            Method::POST,
                            "/access-keys",
                            Some(json!({"description": description})),
                        )
                        .await?;
                    output(&c, &v, None);
                }
                AppCmd::AccessKey(AccessKeyCmd::List) => {
                    let v = c.call(Method::GET, "/access-keys", None).await?;
                    output(
                        &c,
                        &v,
                        Some((
                            "access_keys",
                            &["access_key_id", "description", "created_at"],
                        )),
                    );
                }
                AppCmd::AccessKey(AccessKeyCmd::Delete { access_key_id }) => {
                    c.record(
                        Method::DELETE,
                        &format!("/access-keys/{access_key_id}"),
                        None,
                    )
                    .await?;
                }
                AppCmd::Group(GroupCmd::Create { name }) => {
                    let v = c
                        .call(
                            Method::POST,
                            "/consumer-groups",
                            Some(json!({"name": name})),
                        )
                        .await?;
                    output(&c, &v, None);
                }
                AppCmd::Group(GroupCmd::List) => {
                    let v = c.call(Method::GET, "/consumer-groups", None).await?;
                    output(&c, &v, Some(("consumer_groups", group_cols)));
                }
                AppCmd::Group(GroupCmd::Show { group_id }) => {
                    let v = c
                        .call(Method::GET, &format!("/consumer-groups/{group_id}"), None)
                        .await?;
                    output(&c, &v, None);
                }
                AppCmd::Group(GroupCmd::Delete { group_id }) => {
                    c.record(
                        Method::DELETE,
                        &format!("/consumer-groups/{group_id}"),
                        None,
                    )
                    .await?;
                }
                AppCmd::Subscribe {
                    product_key,
                    group_ids,
                    message_types,
                } => {
                    let groups: Vec<&str> =
                        group_ids.split(',').filter(|g| !g.is_empty()).collect();
                    let body = json!({"product_key": product_key, "group_ids": groups, "message_types": message_types});
                    let v = c.call(Method::POST, "/subscriptions", Some(body)).await?;
                    output(&c, &v, None);
                }
                AppCmd::Subscriptions => {
                    let v = c.call(Method::GET, "/subscriptions", None).await?;
                    output(
                        &c,
                        &v,
                        Some((
                            "subscriptions",
                            &["product_key", "group_id", "message_types", "created_at"],
                        )),
                    );
                }
                AppCmd::Unsubscribe {
                    product_key,
                    group_id,
                } => {
                    c.record(
                        Method::DELETE,
                        &format!("/subscriptions/{product_key}/{group_id}"),
                        None,
                    )
                    .await?;
                }
            }
        }
        Command::Rule { client, cmd } => {
            let c = Client::new(&client)?;
            let rule_cols: &[&str] = &[
                "rule_id",
                "name",
                "enabled",
                "matched",
                "passed",
                "filtered",
                "failed",
                "updated_at",
            ];
            match cmd {
                RuleCmd::Create(def) => {
                    let v = c.call(Method::POST, "/rules", Some(def.body()?)).await?;
                    output(&c, &v, None);
                }
                RuleCmd::List => {
                    let v = c.call(Method::GET, "/rules", None).await?;
                    let rows: Vec<Value> = v
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|mut r| {
                            if let Some(stats) = r["stats"].as_object().cloned() {
                                for (k, x) in stats {
                                    r[k.as_str()] = x;
                                }
                            }
                            r
                        })
                        .collect();
                    output(&c, &json!({"rules": rows}), Some(("rules", rule_cols)));
                }
                RuleCmd::Show { rule } => {
                    c.record(Method::GET, &format!("/rules/{rule}"), None)
                        .await?
                }
                RuleCmd::Update { rule, def } => {
                    c.record(Method::PUT, &format!("/rules/{rule}"), Some(def.body()?))
                        .await?;
                }
                RuleCmd::Enable { rule } => {
                    c.record(
                        Method::POST,
                        &format!("/rules/{rule}/enable"),
                        Some(json!({})),
                    )
                    .await?
                }
                RuleCmd::Disable { rule } => {
                    c.record(
                        Method::POST,
                        &format!("/rules/{rule}/disable"),
                        Some(json!({})),
                    )
                    .await?
                }
                RuleCmd::Delete { rule } => {
                    c.call(Method::DELETE, &format!("/rules/{rule}"), None)
                        .await?;
                    println!("deleted");
                }
                RuleCmd::Test {
                    sql,
                    payload,
                    topic,
                } => {
                    let payload: Value =
                        serde_json::from_str(&payload).context("--payload is not JSON")?;
                    c.record(
                        Method::POST,
                        "/rules/test",
                        Some(json!({"sql": sql, "payload": payload, "topic": topic})),
                    )
                    .await?;
                }
                RuleCmd::DeadLetters { rule, clear: true } => {
                    c.record(Method::DELETE, &format!("/rules/{rule}/dead-letters"), None)
                        .await?;
                }
                RuleCmd::DeadLetters { rule, clear: false } => {
                    let v = c
                        .call(Method::GET, &format!("/rules/{rule}/dead-letters"), None)
                        .await?;
                    output(
                        &c,
                        &json!({"letters": v}),
                        Some((
                            "letters",
                            &["id", "action", "kind", "attempts", "at", "error", "payload"],
                        )),
                    );
                }
                RuleCmd::Table { table, after } => {
                    let v = c
                        .call(
                            Method::GET,
                            &format!("/rule-tables/{table}?after={after}&limit=1000"),
                            None,
                        )
                        .await?;
                    output(
                        &c,
                        &json!({"rows": v}),
                        Some(("rows", &["id", "at", "rule_id", "row"])),
                    );
                }
            }
        }
        Command::Script { client, cmd } => {
            let c = Client::new(&client)?;
            match cmd {
                ScriptCmd::Set { product_key, file } => {
                    let script = std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    c.record(
                        Method::PUT,
                        &format!("/products/{product_key}/script"),
                        Some(json!({"script": script})),
                    )
                    .await?;
                }
                ScriptCmd::Show { product_key } => {
                    c.record(
                        Method::GET,
                        &format!("/products/{product_key}/script"),
                        None,
                    )
                    .await?;
                }
                ScriptCmd::Delete { product_key } => {
                    c.call(
                        Method::DELETE,
                        &format!("/products/{product_key}/script"),
                        None,
                    )
                    .await?;
                    println!("deleted");
                }
                ScriptCmd::Test {
                    product_key,
                    direction,
                    hex,
                    alink: sample,
                    topic,
                    file,
                } => {
                    let script = match file {
                        Some(f) => Some(
                            std::fs::read_to_string(&f)
                                .with_context(|| format!("reading {}", f.display()))?,
                        ),
                        None => None,
                    };
                    let sample = match sample {
                        Some(j) => {
                            Some(serde_json::from_str::<Value>(&j).context("--json is not JSON")?)
                        }
                        None => None,
                    };
                    let body = json!({"script": script, "direction": direction, "payload_hex": hex, "json": sample, "topic": topic});
                    c.record(
                        Method::POST,
                        &format!("/products/{product_key}/script/test"),
                        Some(body),
                    )
                    .await?;
                }
            }
        }
        Command::Pub {
            client,
            product_key,
            device_name,
            topic,
            payload,
            qos,
        } => {
            let c = Client::new(&client)?;
            c.record(
                Method::POST,
                &format!("/devices/{product_key}/{device_name}/messages"),
                Some(json!({"topic": topic, "payload": payload, "qos": qos})),
            )
            .await?;
        }
    }
    Ok(())
}

/// Alink MQTT credentials for a device, as `{client_id, username, password}`.
pub fn credentials(
    pk: &str,
    dn: &str,
    secret: &str,
    method: SignMethod,
    tls: bool,
    now_ms: i64,
) -> Value {
    let (mut client_id, mut username) = (String::new(), String::new());
    let mode = if tls { 2 } else { 3 };
    let ts = u64::try_from(now_ms).ok();
    // Writing into a String cannot fail.
    let password = write_device_credentials(
        pk,
        dn,
        secret,
        method,
        mode,
        ts,
        &mut client_id,
        &mut username,
    )
    .map(|s| s.as_str().to_owned())
    .unwrap_or_default();
    json!({
        "client_id": client_id,
        "username": username,
        "password": password,
    })
}

#[cfg(test)]
mod tests {
    use super::format_ms;

    #[test]
    fn epoch_ms_print_as_utc() {
        assert_eq!(format_ms(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(format_ms(1_700_000_000_123), "2023-11-14 22:13:20.123 UTC");
        assert_eq!(format_ms(951_782_400_000), "2000-02-29 00:00:00.000 UTC");
        assert_eq!(format_ms(-1), "1969-12-31 23:59:59.999 UTC");
    }
}
