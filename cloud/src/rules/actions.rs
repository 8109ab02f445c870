//! Rule actions. Each action of each rule runs behind its own bounded queue, on its own
//! tasks: a slow webhook fills its own queue (and then drops, counted, with the reason), never
//! the evaluation of other rules or device ingestion. Failed deliveries are retried with
//! exponential backoff; after the last attempt the output goes to the dead-letter store.

use super::eval::text;
use crate::registry::now_ms;
use crate::router::{Message, Router};
use crate::storage::Db;
use crate::thing::calls::Kind;
use crate::thing::Thing;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What an action does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ActionKind {
    /// Publishes the output (JSON) on a topic of the platform's broker: an application's
    /// topic or a device's downlink (`/{pk}/{dn}/user/...`).
    Republish {
        /// Topic; `${field}`, `${productKey}`, `${deviceName}` are replaced.
        topic: String,
        /// QoS 0 or 1.
        #[serde(default)]
        qos: u8,
    },
    /// POSTs the output as JSON to a URL.
    Webhook {
        /// http:// or https:// URL.
        url: String,
        /// Extra headers.
        #[serde(default)]
        headers: BTreeMap<String, String>,
        /// Per-request timeout.
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        /// Requests in flight at once.
        #[serde(default = "default_concurrency")]
        concurrency: usize,
    },
    /// Appends the output to a user table in the platform's database
    /// (`GET /api/v1/rule-tables/{table}`).
    Table {
        /// Table name.
        table: String,
    },
    /// Stores the output's fields as property values of a device (derived series), in the
    /// time-series storage.
    Timeseries {
        /// Product; the message's when absent.
        #[serde(default)]
        product_key: Option<String>,
        /// Device; the message's when absent.
        #[serde(default)]
        device_name: Option<String>,
    },
    /// Inserts the output as a row of an external PostgreSQL table: one column per field.
    Postgres {
        /// `postgres://...` URL.
        url: String,
        /// Table (`name` or `schema.name`).
        table: String,
    },
    /// Publishes the output to an external MQTT broker.
    Mqtt {
        /// Broker host.
        host: String,
        /// Broker port.
        #[serde(default = "default_mqtt_port")]
        port: u16,
        /// Topic; templated like republish.
        topic: String,
        /// QoS 0 or 1.
        #[serde(default)]
        qos: u8,
        /// Client id (generated when absent).
        #[serde(default)]
        client_id: Option<String>,
        /// User name.
        #[serde(default)]
        username: Option<String>,
        /// Password.
        #[serde(default)]
        password: Option<String>,
        /// TLS to the broker: its certificate is verified against `ca_pem`, or against the
        /// system's CAs when that is absent.
        #[serde(default)]
        tls: bool,
        /// PEM CA certificate(s) the broker's certificate must chain to.
        #[serde(default)]
        ca_pem: Option<String>,
        /// PEM client certificate chain, for brokers that require mutual TLS (with the key).
        #[serde(default)]
        client_cert_pem: Option<String>,
        /// PEM private key of the client certificate.
        #[serde(default)]
        client_key_pem: Option<String>,
        /// How long an output waits for the broker (written for QoS 0, PUBACK for QoS 1).
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
    /// Scene linkage: sets properties of, or calls a service on, a device.
    Scene {
        /// Product of the target device.
        product_key: String,
        /// Target device; `${deviceName}` targets the message's own device.
        device_name: String,
        /// Service to call; properties are set when absent.
        #[serde(default)]
        service: Option<String>,
        /// Parameters; a string that is exactly `${field}` takes the field's value.
        params: Value,
        /// How long to wait for the device's reply.
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
}

fn default_timeout_ms() -> u64 {
    5_000
}
fn default_concurrency() -> usize {
    4
}
fn default_mqtt_port() -> u16 {
    1883
}
fn default_queue() -> usize {
    1_024
}
fn default_backoff_ms() -> u64 {
    500
}

/// An action with its delivery settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActionSpec {
    /// What it does.
    #[serde(flatten)]
    pub kind: ActionKind,
    /// Outputs waiting at most; more are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Attempts after the first failure (webhook, postgres, mqtt default 3; others 0).
    #[serde(default)]
    pub retries: Option<u32>,
    /// First retry delay; doubled each time, at most 60 s.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
}

fn is_ident(s: &str) -> bool {
    s.split('.').all(|p| {
        !p.is_empty()
            && p.len() <= 63
            && p.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    }) && s.split('.').count() <= 2
}

impl ActionSpec {
    /// Checks the settings; the error says which and why.
    pub fn check(&self) -> Result<(), String> {
        if self.queue == 0 || self.queue > 1_000_000 {
            return Err("queue must be between 1 and 1,000,000".into());
        }
        if self.retries.is_some_and(|r| r > 20) {
            return Err("retries must be at most 20".into());
        }
        match &self.kind {
            ActionKind::Republish { topic, qos } | ActionKind::Mqtt { topic, qos, .. } => {
                if topic.is_empty() || topic.contains('+') || topic.contains('#') {
                    return Err(format!(
                        "`{topic}` is not a topic to publish on (no wildcards, not empty)"
                    ));
                }
                if *qos > 1 {
                    return Err("qos must be 0 or 1".into());
                }
                if let ActionKind::Mqtt {
                    host,
                    tls,
                    ca_pem,
                    client_cert_pem,
                    client_key_pem,
                    ..
                } = &self.kind
                {
                    if host.is_empty() {
                        return Err("mqtt needs a host".into());
                    }
                    let tls_settings =
                        ca_pem.is_some() || client_cert_pem.is_some() || client_key_pem.is_some();
                    if tls_settings && !tls {
                        return Err("ca_pem and client certificates need \"tls\": true".into());
                    }
                    if *tls {
                        mqtt_tls(
                            ca_pem.as_deref(),
                            client_cert_pem.as_deref(),
                            client_key_pem.as_deref(),
                        )?;
                    }
                }
            }
            ActionKind::Webhook {
                url,
                concurrency,
                timeout_ms,
                headers,
            } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(format!(
                        "webhook url `{url}` must start with http:// or https://"
                    ));
                }
                reqwest::Url::parse(url).map_err(|e| format!("webhook url `{url}`: {e}"))?;
                if *concurrency == 0 || *concurrency > 64 {
                    return Err("concurrency must be between 1 and 64".into());
                }
                if *timeout_ms == 0 || *timeout_ms > 120_000 {
                    return Err("timeout_ms must be between 1 and 120000".into());
                }
                for k in headers.keys() {
                    reqwest::header::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| format!("`{k}` is not a header name"))?;
                }
            }
            ActionKind::Table { table } => {
                if !is_ident(table) || table.contains('.') {
                    return Err(format!(
                        "table `{table}` must be a name of letters, digits and _"
                    ));
                }
            }
            ActionKind::Timeseries { .. } => {}
            ActionKind::Postgres { url, table } => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err("postgres url must start with postgres://".into());
                }
                if !is_ident(table) {
                    return Err(format!(
                        "table `{table}` must be `name` or `schema.name` (letters, digits, _)"
                    ));
                }
            }
            ActionKind::Scene {
                product_key,
                device_name,
                params,
                timeout_ms,
                service,
            } => {
                if product_key.is_empty() || device_name.is_empty() {
                    return Err("scene needs product_key and device_name".into());
                }
                if service.is_none() && params.as_object().is_none_or(|o| o.is_empty()) {
                    return Err("a property set needs params: an object of property values".into());
                }
                if *timeout_ms == 0 || *timeout_ms > 120_000 {
                    return Err("timeout_ms must be between 1 and 120000".into());
                }
            }
        }
        Ok(())
    }

    /// The kind's name.
    pub fn name(&self) -> &'static str {
        match self.kind {
            ActionKind::Republish { .. } => "republish",
            ActionKind::Webhook { .. } => "webhook",
            ActionKind::Table { .. } => "table",
            ActionKind::Timeseries { .. } => "timeseries",
            ActionKind::Postgres { .. } => "postgres",
            ActionKind::Mqtt { .. } => "mqtt",
            ActionKind::Scene { .. } => "scene",
        }
    }

    fn retries(&self) -> u32 {
        self.retries.unwrap_or(match self.kind {
            ActionKind::Webhook { .. } | ActionKind::Postgres { .. } | ActionKind::Mqtt { .. } => 3,
            _ => 0,
        })
    }
}

/// Replaces `${name}` with the output's field (or the message's productKey/deviceName).
pub fn template(s: &str, row: &Map<String, Value>, ctx: &JobCtx) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(j) = after.find('}') else {
            out.push_str(&rest[i..]);
            return out;
        };
        let name = &after[..j];
        match name {
            "productKey" => out.push_str(&ctx.product_key),
            "deviceName" => out.push_str(&ctx.device_name),
            _ => {
                if let Some(v) = row.get(name) {
                    out.push_str(&text(v));
                }
            }
        }
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    out
}

fn template_value(v: &Value, row: &Map<String, Value>, ctx: &JobCtx) -> Value {
    match v {
        Value::String(s) => {
            if let Some(name) = s.strip_prefix("${").and_then(|x| x.strip_suffix('}')) {
                if !name.contains("${") {
                    if let Some(x) = row.get(name) {
                        return x.clone();
                    }
                }
            }
            Value::String(template(s, row, ctx))
        }
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), template_value(x, row, ctx)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|x| template_value(x, row, ctx)).collect()),
        other => other.clone(),
    }
}

/// Where an output came from.
#[derive(Debug, Clone)]
pub struct JobCtx {
    /// Rule id.
    pub rule_id: String,
    /// The message's product.
    pub product_key: String,
    /// The message's device.
    pub device_name: String,
    /// The message's time, ms.
    pub at: i64,
}

/// One output for one action.
#[derive(Debug)]
pub struct Job {
    /// The output row.
    pub row: Map<String, Value>,
    /// Its origin.
    pub ctx: JobCtx,
    /// When it was queued.
    pub queued: Instant,
}

/// Counters of one action.
#[derive(Debug, Default)]
pub struct ActionCounters {
    /// Delivered.
    pub done: AtomicU64,
    /// Failed attempts (each retry counts).
    pub failed: AtomicU64,
    /// Given up and stored as dead letters.
    pub dead_lettered: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Dropped because the dead-letter store failed too.
    pub dropped_store_failed: AtomicU64,
    /// Sum of queue-to-done latencies, µs.
    pub latency_us_sum: AtomicU64,
    /// Largest queue-to-done latency, µs.
    pub latency_us_max: AtomicU64,
    /// Last error and when.
    pub last_error: Mutex<Option<(String, i64)>>,
}

/// What actions need of the platform.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Database.
    pub db: Db,
    /// Broker.
    pub router: Arc<Router>,
    /// Thing model, storage and calls (weak: the thing layer owns the engine's input).
    pub thing: Weak<Thing>,
    /// HTTP client for webhooks.
    pub http: reqwest::Client,
}

/// A running action.
#[derive(Debug)]
pub struct Runner {
    /// Its settings.
    pub spec: ActionSpec,
    tx: mpsc::Sender<Job>,
    /// Its counters.
    pub counters: Arc<ActionCounters>,
    index: usize,
    deps: Deps,
    target: Arc<Target>,
}

impl Runner {
    /// Starts the tasks of action `index` of rule `rule_id`.
    pub fn start(spec: ActionSpec, index: usize, deps: Deps) -> Self {
        let (tx, rx) = mpsc::channel(spec.queue);
        let counters = Arc::new(ActionCounters::default());
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let workers = match &spec.kind {
            ActionKind::Webhook { concurrency, .. } => *concurrency,
            _ => 1,
        };
        let target = Arc::new(Target::new(&spec.kind));
        for _ in 0..workers {
            let (rx, spec, deps, counters, target) = (
                rx.clone(),
                spec.clone(),
                deps.clone(),
                counters.clone(),
                target.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let job = { rx.lock().await.recv().await };
                    let Some(job) = job else { break };
                    deliver(&spec, index, &deps, &counters, &target, job).await;
                }
            });
        }
        Self {
            spec,
            tx,
            counters,
            index,
            deps,
            target,
        }
    }

    /// Delivers an output now, with the retries, and dead-letters it if they all fail
    /// (durable rules: the message leaves its queue only after this).
    pub async fn run_now(&self, job: Job) {
        deliver(
            &self.spec,
            self.index,
            &self.deps,
            &self.counters,
            &self.target,
            job,
        )
        .await;
    }

    /// Queues an output; false (and counted) when the queue is full.
    pub fn offer(&self, job: Job) -> bool {
        match self.tx.try_send(job) {
            Ok(()) => true,
            Err(_) => {
                self.counters
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Outputs waiting.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Connections an action keeps.
enum Target {
    None,
    Postgres(tokio::sync::OnceCell<sqlx::PgPool>),
    Mqtt(tokio::sync::OnceCell<MqttLink>),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Target")
    }
}

impl Target {
    fn new(kind: &ActionKind) -> Self {
        match kind {
            ActionKind::Postgres { .. } => Target::Postgres(tokio::sync::OnceCell::new()),
            ActionKind::Mqtt { .. } => Target::Mqtt(tokio::sync::OnceCell::new()),
            _ => Target::None,
        }
    }
}

async fn deliver(
    spec: &ActionSpec,
    index: usize,
    deps: &Deps,
    counters: &ActionCounters,
    target: &Target,
    job: Job,
) {
    let retries = spec.retries();
    let mut delay = Duration::from_millis(spec.backoff_ms.max(1));
    let mut attempt = 0u32;
    loop {
        match once(spec, deps, target, &job).await {
            Ok(()) => {
                counters.done.fetch_add(1, Ordering::Relaxed);
                let us = job.queued.elapsed().as_micros() as u64;
                counters.latency_us_sum.fetch_add(us, Ordering::Relaxed);
                counters.latency_us_max.fetch_max(us, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                *counters
                    .last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some((e.clone(), now_ms()));
                tracing::warn!(rule = %job.ctx.rule_id, action = index, kind = spec.name(), attempt, error = %e, "rule action failed");
                if attempt >= retries {
                    let letter = super::store::DeadLetter {
                        id: 0,
                        rule_id: job.ctx.rule_id.clone(),
                        action: index as i64,
                        kind: spec.name().to_owned(),
                        payload: Value::Object(job.row.clone()).to_string(),
                        error: e,
                        attempts: i64::from(attempt) + 1,
                        at: now_ms(),
                    };
                    match deps.db.insert_dead_letter(&letter).await {
                        Ok(()) => counters.dead_lettered.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            tracing::error!(rule = %job.ctx.rule_id, error = %e, "dead letter not stored: output lost");
                            counters
                                .dropped_store_failed
                                .fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    return;
                }
                attempt += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
}

async fn once(spec: &ActionSpec, deps: &Deps, target: &Target, job: &Job) -> Result<(), String> {
    let row = &job.row;
    let body = Value::Object(row.clone()).to_string();
    match &spec.kind {
        ActionKind::Republish { topic, qos } => {
            deps.router.publish(Message {
                topic: template(topic, row, &job.ctx),
                payload: body.into(),
                qos: *qos,
                retain: false,
            });
            Ok(())
        }
        ActionKind::Webhook {
            url,
            headers,
            timeout_ms,
            ..
        } => {
            let mut req = deps
                .http
                .post(url)
                .timeout(Duration::from_millis(*timeout_ms))
                .header("content-type", "application/json")
                .header("x-ironlink-rule", &job.ctx.rule_id);
            for (k, v) in headers {
                req = req.header(k, template(v, row, &job.ctx));
            }
            let resp = req.body(body).send().await.map_err(|e| {
                if e.is_timeout() {
                    format!("webhook timed out after {timeout_ms} ms")
                } else {
                    format!("webhook: {e}")
                }
            })?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("webhook answered {}", resp.status()))
            }
        }
        ActionKind::Table { table } => deps
            .db
            .insert_rule_rows(table, &job.ctx.rule_id, &[body], job.ctx.at)
            .await
            .map_err(|e| format!("table `{table}`: {e}")),
        ActionKind::Timeseries {
            product_key,
            device_name,
        } => {
            let Some(thing) = deps.thing.upgrade() else {
                return Err("the platform is shutting down".into());
            };
            let pk = product_key
                .clone()
                .unwrap_or_else(|| job.ctx.product_key.clone());
            let dn = match device_name.as_deref() {
                Some(d) => template(d, row, &job.ctx),
                None => job.ctx.device_name.clone(),
            };
            if thing.store_derived(&pk, &dn, row, job.ctx.at).await {
                Ok(())
            } else {
                Err(format!("time series of {pk}/{dn} could not be stored"))
            }
        }
        ActionKind::Postgres { url, table } => {
            let Target::Postgres(cell) = target else {
                return Err("internal: no connection".into());
            };
            let pool = cell
                .get_or_try_init(|| async {
                    sqlx::postgres::PgPoolOptions::new()
                        .max_connections(2)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect(url)
                        .await
                })
                .await
                .map_err(|e| format!("postgres: {e}"))?;
            if row.is_empty() {
                return Err("the output has no fields to insert".into());
            }
            let mut cols = Vec::new();
            for k in row.keys() {
                if !is_ident(k) || k.contains('.') {
                    return Err(format!(
                        "field `{k}` is not a column name (letters, digits, _)"
                    ));
                }
                cols.push(format!("\"{k}\""));
            }
            let table_sql = table
                .split('.')
                .map(|p| format!("\"{p}\""))
                .collect::<Vec<_>>()
                .join(".");
            let params = (1..=cols.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO {table_sql} ({}) VALUES ({params})",
                cols.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for v in row.values() {
                q = match v {
                    Value::Null => q.bind(None::<String>),
                    Value::Bool(b) => q.bind(*b),
                    Value::Number(n) => match n.as_i64() {
                        Some(i) => q.bind(i),
                        None => q.bind(n.as_f64().unwrap_or(0.0)),
                    },
                    Value::String(s) => q.bind(s.clone()),
                    other => q.bind(other.to_string()),
                };
            }
            q.execute(pool)
                .await
                .map_err(|e| format!("postgres insert into {table}: {e}"))?;
            Ok(())
        }
        ActionKind::Mqtt {
            host,
            port,
            topic,
            qos,
            client_id,
            username,
            password,
            tls,
            ca_pem,
            client_cert_pem,
            client_key_pem,
            timeout_ms,
        } => {
            let Target::Mqtt(cell) = target else {
                return Err("internal: no connection".into());
            };
            // Checked when the rule was created; built once, with the connection.
            let tls_config = if *tls {
                match cell.get() {
                    Some(_) => None,
                    None => Some(mqtt_tls(
                        ca_pem.as_deref(),
                        client_cert_pem.as_deref(),
                        client_key_pem.as_deref(),
                    )?),
                }
            } else {
                None
            };
            let link = cell
                .get_or_init(|| async {
                    let id = client_id
                        .clone()
                        .unwrap_or_else(|| format!("ironlink-rule-{}", &job.ctx.rule_id));
                    let mut o = rumqttc::MqttOptions::new(id, host.clone(), *port);
                    o.set_keep_alive(Duration::from_secs(30));
                    if let Some(u) = username {
                        o.set_credentials(u.clone(), password.clone().unwrap_or_default());
                    }
                    if let Some(c) = tls_config {
                        o.set_transport(rumqttc::Transport::Tls(
                            rumqttc::TlsConfiguration::Rustls(Arc::new(c)),
                        ));
                    }
                    let (client, events) = rumqttc::AsyncClient::new(o, 64);
                    let link = MqttLink {
                        client,
                        waiting: Arc::default(),
                    };
                    tokio::spawn(drive_mqtt(
                        events,
                        link.waiting.clone(),
                        job.ctx.rule_id.clone(),
                    ));
                    link
                })
                .await;
            let q = if *qos == 1 {
                rumqttc::QoS::AtLeastOnce
            } else {
                rumqttc::QoS::AtMostOnce
            };
            let (done, sent) = oneshot::channel();
            {
                // Under the lock: requests and their waiters stay in the same order.
                let mut w = link.waiting.lock().unwrap_or_else(|e| e.into_inner());
                link.client
                    .try_publish(template(topic, row, &job.ctx), q, false, body)
                    .map_err(|e| {
                        let why = w.last_error.clone().unwrap_or_default();
                        format!(
                            "external MQTT broker: {e} (not connected, or its queue is full) {why}"
                        )
                    })?;
                w.queued.push_back(done);
            }
            match tokio::time::timeout(Duration::from_millis(*timeout_ms), sent).await {
                Ok(Ok(())) => Ok(()),
                _ => {
                    let why = link
                        .waiting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .last_error
                        .clone()
                        .map_or_else(String::new, |e| format!(": {e}"));
                    Err(format!(
                        "external MQTT broker: not {} within {timeout_ms} ms{why}",
                        if *qos == 1 {
                            "acknowledged (PUBACK)"
                        } else {
                            "written"
                        }
                    ))
                }
            }
        }
        ActionKind::Scene {
            product_key,
            device_name,
            service,
            params,
            timeout_ms,
        } => {
            let Some(thing) = deps.thing.upgrade() else {
                return Err("the platform is shutting down".into());
            };
            let dn = template(device_name, row, &job.ctx);
            let pk = template(product_key, row, &job.ctx);
            let params = template_value(params, row, &job.ctx);
            let kind = match service.as_deref() {
                Some(s) => Kind::Service(s),
                None => Kind::PropertySet,
            };
            let call = thing
                .call(
                    &pk,
                    &dn,
                    kind,
                    params,
                    Some(Duration::from_millis(*timeout_ms)),
                )
                .await
                .map_err(|e| format!("scene on {pk}/{dn}: {e}"))?;
            match call.code {
                Some(200) => Ok(()),
                // An async service was sent; its reply comes later.
                None if call.status == "pending" => Ok(()),
                code => Err(format!(
                    "scene on {pk}/{dn}: the device answered {} ({})",
                    code.map_or("nothing".to_owned(), |c| c.to_string()),
                    call.status
                )),
            }
        }
    }
}

/// An mqtt action's connection: the client, and the outputs waiting for the broker.
struct MqttLink {
    client: rumqttc::AsyncClient,
    waiting: Arc<std::sync::Mutex<MqttWaiting>>,
}

/// Outputs handed to the client (in request order) and those sent with QoS 1 (by packet id),
/// each told when the broker has it.
#[derive(Default)]
struct MqttWaiting {
    queued: std::collections::VecDeque<oneshot::Sender<()>>,
    by_pkid: HashMap<u16, oneshot::Sender<()>>,
    last_error: Option<String>,
}

/// Drives an mqtt action's connection: reconnects after a second, tells each output when it
/// was written (QoS 0) or acknowledged (QoS 1). A QoS 1 publish sent again after a reconnect
/// keeps its packet id and its waiter.
async fn drive_mqtt(
    mut events: rumqttc::EventLoop,
    waiting: Arc<std::sync::Mutex<MqttWaiting>>,
    rule: String,
) {
    use rumqttc::{Event, Outgoing, Packet};
    loop {
        match events.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
                if pkid != 0 && w.by_pkid.contains_key(&pkid) {
                    continue; // sent again after a reconnect
                }
                if let Some(done) = w.queued.pop_front() {
                    if pkid == 0 {
                        let _ = done.send(());
                    } else {
                        w.by_pkid.insert(pkid, done);
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(done) = w.by_pkid.remove(&ack.pkid) {
                    let _ = done.send(());
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                waiting.lock().unwrap_or_else(|e| e.into_inner()).last_error = None;
            }
            Ok(_) => {}
            Err(rumqttc::ConnectionError::RequestsDone) => break,
            Err(e) => {
                tracing::warn!(%rule, error = %e, "external MQTT broker: connection failed, retrying");
                waiting.lock().unwrap_or_else(|e| e.into_inner()).last_error = Some(e.to_string());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// What the API shows in place of a secret setting.
pub const REDACTED: &str = "***";

/// Header names whose values are credentials.
fn secret_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "auth",
        "token",
        "key",
        "secret",
        "cookie",
        "signature",
        "password",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// An action's settings as the API shows them: passwords, private keys, credential headers
/// and the password inside a URL replaced by [`REDACTED`].
pub fn redact(spec: &Value) -> Value {
    let mut v = spec.clone();
    let Some(o) = v.as_object_mut() else {
        return v;
    };
    for k in ["password", "client_key_pem"] {
        if o.get(k).is_some_and(|x| !x.is_null()) {
            o.insert(k.into(), Value::String(REDACTED.into()));
        }
    }
    if let Some(Value::Object(h)) = o.get_mut("headers") {
        for (name, value) in h.iter_mut() {
            if secret_header(name) {
                *value = Value::String(REDACTED.into());
            }
        }
    }
    if let Some(Value::String(u)) = o.get_mut("url") {
        if let Ok(mut url) = reqwest::Url::parse(u) {
            if url.password().is_some() && url.set_password(Some(REDACTED)).is_ok() {
                *u = url.to_string();
            }
        }
    }
    v
}

/// An action sent back as the API showed it keeps its secrets: every setting of `new` that
/// equals the redacted form of the same setting of `old` (same action type) is taken from
/// `old`.
pub fn unredact(new: &mut Value, old: &Value) {
    if new.get("type") != old.get("type") {
        return;
    }
    let shown = redact(old);
    let (Some(n), Some(o), Some(sh)) = (new.as_object_mut(), old.as_object(), shown.as_object())
    else {
        return;
    };
    for k in ["password", "client_key_pem", "url"] {
        if n.get(k).is_some() && n.get(k) == sh.get(k) {
            if let Some(v) = o.get(k) {
                n.insert(k.into(), v.clone());
            }
        }
    }
    if let (Some(Value::Object(nh)), Some(Value::Object(oh)), Some(Value::Object(shh))) =
        (n.get_mut("headers"), o.get("headers"), sh.get("headers"))
    {
        for (name, value) in nh.iter_mut() {
            if value.as_str() == Some(REDACTED) && shh.get(name) == Some(value) {
                if let Some(v) = oh.get(name) {
                    *value = v.clone();
                }
            }
        }
    }
}

/// The system's bundle of public CAs (Debian's path), used when an mqtt action sets no
/// `ca_pem`.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The TLS client configuration of an mqtt action: the broker verified against `ca_pem` (or
/// the system's CAs), TLS 1.2 or later, a client certificate when one is given. Errors say
/// which setting is wrong.
fn mqtt_tls(
    ca_pem: Option<&str>,
    cert_pem: Option<&str>,
    key_pem: Option<&str>,
) -> Result<rustls::ClientConfig, String> {
    let (what, pem) = match ca_pem {
        Some(p) => ("ca_pem", p.as_bytes().to_vec()),
        None => (
            SYSTEM_CAS,
            std::fs::read(SYSTEM_CAS).map_err(|e| format!("no ca_pem, and {SYSTEM_CAS}: {e}"))?,
        ),
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("{what}: {e}"))?;
        roots.add(cert).map_err(|e| format!("{what}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{what}: no PEM certificate in it"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match (cert_pem, key_pem) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = rustls_pemfile::certs(&mut cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("client_cert_pem: {e}"))?;
            if chain.is_empty() {
                return Err("client_cert_pem: no PEM certificate in it".into());
            }
            let key = rustls_pemfile::private_key(&mut key.as_bytes())
                .map_err(|e| format!("client_key_pem: {e}"))?
                .ok_or("client_key_pem: no PEM private key in it")?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))
        }
        _ => Err("client_cert_pem and client_key_pem go together".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mqtt_tls_settings_are_checked_and_take_a_client_certificate() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let client = rcgen::CertificateParams::new(vec!["rule".to_owned()])
            .unwrap()
            .signed_by(&client_key, &ca, &ca_key)
            .unwrap();
        let (ca_pem, cert_pem, key_pem) = (ca.pem(), client.pem(), client_key.serialize_pem());
        assert!(mqtt_tls(Some(&ca_pem), None, None).is_ok());
        assert!(mqtt_tls(Some(&ca_pem), Some(&cert_pem), Some(&key_pem)).is_ok());
        let e = |r: Result<rustls::ClientConfig, String>| r.err().unwrap();
        assert!(e(mqtt_tls(Some("junk"), None, None)).contains("ca_pem"));
        assert!(e(mqtt_tls(Some(&ca_pem), Some(&cert_pem), None)).contains("go together"));
        assert!(
            e(mqtt_tls(Some(&ca_pem), Some("junk"), Some(&key_pem))).contains("client_cert_pem")
        );
        assert!(
            e(mqtt_tls(Some(&ca_pem), Some(&cert_pem), Some("junk"))).contains("client_key_pem")
        );
        // A key that is not the certificate's is refused with the reason.
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert!(e(mqtt_tls(Some(&ca_pem), Some(&cert_pem), Some(&other)))
            .contains("client certificate"));
    }

    #[test]
    fn templates_take_fields_and_the_device() {
        let row = json!({"t": 31.5, "id": "x"}).as_object().unwrap().clone();
        let ctx = JobCtx {
            rule_id: "r".into(),
            product_key: "pk".into(),
            device_name: "dn".into(),
            at: 0,
        };
        assert_eq!(
            template("/${productKey}/${deviceName}/user/${id}/${t}${", &row, &ctx),
            "/pk/dn/user/x/31.5${"
        );
        let v = template_value(
            &json!({"target": "${t}", "label": "t=${t}", "k": [1]}),
            &row,
            &ctx,
        );
        assert_eq!(v, json!({"target": 31.5, "label": "t=31.5", "k": [1]}));
    }

    #[test]
    fn settings_are_checked() {
        let bad = [
            json!({"type": "webhook", "url": "ftp://x"}),
            json!({"type": "republish", "topic": "/a/+/b"}),
            json!({"type": "republish", "topic": "/a", "qos": 2}),
            json!({"type": "postgres", "url": "postgres://h/db", "table": "x; drop"}),
            json!({"type": "table", "table": "a.b"}),
            json!({"type": "scene", "product_key": "p", "device_name": "d", "params": {}}),
            json!({"type": "webhook", "url": "http://x", "queue": 0}),
        ];
        for b in bad {
            let spec: ActionSpec = serde_json::from_value(b.clone()).unwrap();
            assert!(spec.check().is_err(), "{b}");
        }
        let spec: ActionSpec =
            serde_json::from_value(json!({"type": "webhook", "url": "http://127.0.0.1:1/x"}))
                .unwrap();
        spec.check().unwrap();
        assert_eq!(spec.retries(), 3);
        assert_eq!(spec.queue, 1_024);
        assert!(serde_json::from_value::<ActionSpec>(json!({"type": "carrier_pigeon"})).is_err());
    }
}
