//! The rules engine: SQL over device messages, time windows and actions (white paper 3.2), and
//! per-product data-parsing scripts (3.6).
//!
//! Device messages reach the engine in the same form consumer groups get them (Alibaba's
//! server-side subscription format, on Alibaba's rule topics such as
//! `/{pk}/{dn}/thing/event/property/post`), through a bounded queue: when it is full a message
//! is dropped for the rules (counted, with the reason) and ingestion goes on. One task
//! evaluates every rule on a message, parsing its JSON once; outputs go to each action's own
//! bounded queue (see [`actions`]). Window state is saved at a clean shutdown and restored at
//! the next start; after a crash it is declared lost on the rule, never silently.

pub mod actions;
pub mod eval;
pub mod script;
pub mod sql;
pub mod store;
pub mod window;

use crate::apps::{MessageType, Outgoing};
use crate::registry::now_ms;
use crate::storage::{Db, StorageError};
use actions::{ActionSpec, Deps, Job, JobCtx, Runner};
use eval::Msg;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sql::Query;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use store::RuleRow;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use window::{LastMsg, Windows};

/// How long after its end a window stays open for messages stamped within it that were still
/// waiting for evaluation.
pub const ALLOWED_LATENESS_MS: i64 = 1_000;

/// Engine limits (config `[rules]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages waiting for evaluation at most.
    pub queue: usize,
    /// Groups a windowed rule keeps at most.
    pub max_groups: usize,
    /// Values a sliding window keeps per group at most.
    pub max_window_values: usize,
    /// Rules at most.
    pub max_rules: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue: 65_536,
            max_groups: 100_000,
            max_window_values: 10_000,
            max_rules: 10_000,
        }
    }
}

/// A rule as the API takes it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The SQL.
    pub sql: String,
    /// Actions.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub actions: Vec<Value>,
    /// Enabled at once (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// At least once: the rule's messages are committed to a durable queue before the device
    /// is acknowledged, and leave it only when every action has delivered the outputs (or
    /// dead-lettered them). Not for windowed rules.
    #[serde(default)]
    pub durable: bool,
}

fn yes() -> bool {
    true
}

/// Why a rule was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The SQL does not parse or check.
    #[error("sql: {0}")]
    Sql(#[from] sql::SqlError),
    /// An action is wrong.
    #[error("action {0}: {1}")]
    Action(usize, String),
    /// Something else in the definition.
    #[error("{0}")]
    Invalid(String),
    /// No such rule.
    #[error("no rule `{0}`")]
    NotFound(String),
    /// Storage.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Counters of one rule.
#[derive(Debug, Default)]
pub struct RuleCounters {
    /// Messages on a topic the rule reads.
    pub matched: AtomicU64,
    /// Messages (or window rows) that passed WHERE/HAVING and were output.
    pub passed: AtomicU64,
    /// Messages WHERE (or rows HAVING) did not let through.
    pub filtered: AtomicU64,
    /// Messages whose evaluation failed.
    pub failed: AtomicU64,
    /// Messages dropped, by reason.
    pub dropped: Mutex<BTreeMap<&'static str, u64>>,
    /// Evaluation time, ns.
    pub eval_ns: AtomicU64,
    /// Last error and when.
    pub last_error: Mutex<Option<(String, i64)>>,
    /// Set when window state was lost at a restart.
    pub window_state: Mutex<Option<String>>,
}

impl RuleCounters {
    fn dropped(&self, reason: &'static str) {
        *self
            .dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    fn error(&self, e: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some((e, now_ms()));
    }
}

/// A rule ready to run.
#[derive(Debug)]
pub struct Live {
    /// Definition.
    pub row: RuleRow,
    /// Parsed SQL.
    pub query: Query,
    /// Running actions.
    pub actions: Vec<Runner>,
    windows: Option<Mutex<Windows>>,
    /// Counters.
    pub counters: Arc<RuleCounters>,
    /// Message kinds the FROM topic can select.
    kinds: u32,
    /// The FROM filter's text before its first wildcard: a topic not starting with it
    /// cannot match (checked first, it is a memory compare).
    prefix: String,
    /// Durable: evaluated by its own task from its durable queue, not by [`evaluate`].
    durable: bool,
    /// Dropped with the rule: ends its durable task.
    _durable_stop: Option<watch::Sender<()>>,
}

/// Topic shapes of each message kind, to tell which kinds a FROM filter selects.
fn kind_pattern(kind: MessageType) -> &'static str {
    match kind {
        MessageType::Property => "/+/+/thing/event/property/post",
        MessageType::Event => "/+/+/thing/event/+/post",
        MessageType::Raw => "/+/+/thing/model/up_raw",
        MessageType::Custom => "/+/+/user/#",
        MessageType::Status => "/as/mqtt/status/+/+",
        MessageType::Lifecycle => "/+/+/thing/lifecycle",
        MessageType::Topology => "/+/+/thing/topo/lifecycle",
        MessageType::ServiceReply => "/+/+/thing/downlink/reply/message",
        MessageType::Ota => "/+/+/ota/#",
    }
}

fn kind_bit(kind: MessageType) -> u32 {
    1 << (kind as u32)
}

/// Compiles a definition: SQL, actions. Nothing starts.
pub fn compile(spec: &RuleSpec) -> Result<(Query, Vec<ActionSpec>), RuleError> {
    crate::registry::check_label("name", &spec.name, 128).map_err(RuleError::Invalid)?;
    if spec.sql.len() > 64 * 1024 {
        return Err(RuleError::Invalid("the SQL is longer than 64 KiB".into()));
    }
    let query = sql::parse(&spec.sql)?;
    if query.diagnoses_pv {
        // Trained off the evaluation path, so the first message does not wait (long) for it.
        ironlink_analytics::pv::warm();
    }
    if spec.durable && query.window.is_some() {
        return Err(RuleError::Invalid(
            "durable applies to rules without windows (a window's state is saved at a clean shutdown, and declared lost otherwise)".into(),
        ));
    }
    if spec.actions.len() > 16 {
        return Err(RuleError::Invalid("a rule has at most 16 actions".into()));
    }
    let mut actions = Vec::new();
    for (i, a) in spec.actions.iter().enumerate() {
        let a: ActionSpec =
            serde_json::from_value(a.clone()).map_err(|e| RuleError::Action(i, e.to_string()))?;
        a.check().map_err(|e| RuleError::Action(i, e))?;
        actions.push(a);
    }
    Ok((query, actions))
}

/// One message for the rules.
#[derive(Debug)]
struct Input {
    topic: String,
    product_key: String,
    device_name: String,
    payload: Vec<u8>,
    at: i64,
}

impl Input {
    fn incoming<'a>(
        &'a self,
        message_id: &'a str,
        tags: Option<&'a crate::storage::TagMap>,
        thing: Option<&'a crate::thing::Thing>,
    ) -> Incoming<'a> {
        Incoming {
            topic: &self.topic,
            raw: &self.payload,
            product_key: &self.product_key,
            device_name: &self.device_name,
            message_id,
            at: self.at,
            tags,
            thing,
        }
    }
}

/// The engine.
#[derive(Debug)]
pub struct Engine {
    db: Db,
    deps: Deps,
    limits: Limits,
    rules: RwLock<Arc<Vec<Arc<Live>>>>,
    /// Per product: which kinds are known (low 16 bits) and which of those rules want
    /// (high 16 bits); filled on first use, cleared when the rules change.
    wants: RwLock<HashMap<String, u32>>,
    tx: mpsc::Sender<Input>,
    next_id: AtomicU64,
    /// Messages dropped because the engine's queue was full.
    pub input_dropped: AtomicU64,
    /// Messages taken.
    pub inputs: AtomicU64,
    any_rules: AtomicBool,
    /// Data-parsing scripts.
    pub scripts: Arc<script::Scripts>,
    /// Held while the rule set changes (two API calls must not each install the set they
    /// read before the other's change).
    edit: tokio::sync::Mutex<()>,
    /// Where the evaluation time of each message goes, once the server wires it.
    pub eval_latency: std::sync::OnceLock<ironlink_telemetry::Latency>,
}

impl Engine {
    /// [`evaluate`], timed into [`Engine::eval_latency`].
    fn evaluate_timed(&self, rules: &[Arc<Live>], i: &Incoming<'_>) {
        let started = Instant::now();
        evaluate(rules, i);
        if let Some(h) = self.eval_latency.get() {
            h.record(started.elapsed().as_secs_f64());
        }
    }

    /// Loads the rules and starts evaluating; the task ends when `stop` turns true, after
    /// saving window state.
    pub async fn start(
        deps: Deps,
        limits: Limits,
        scripts: Arc<script::Scripts>,
        stop: watch::Receiver<bool>,
    ) -> Result<(Arc<Self>, JoinHandle<()>), StorageError> {
        let (tx, rx) = mpsc::channel(limits.queue.max(1));
        for (pk, src, _) in deps.db.list_scripts().await? {
            if let Err(e) = scripts.set(&pk, &src).await {
                tracing::error!(product_key = %pk, error = %e, "stored data-parsing script does not load");
            }
        }
        let engine = Arc::new(Self {
            db: deps.db.clone(),
            deps,
            limits,
            rules: RwLock::new(Arc::new(Vec::new())),
            wants: RwLock::new(HashMap::new()),
            tx,
            next_id: AtomicU64::new(1),
            input_dropped: AtomicU64::new(0),
            inputs: AtomicU64::new(0),
            any_rules: AtomicBool::new(false),
            scripts,
            edit: tokio::sync::Mutex::new(()),
            eval_latency: std::sync::OnceLock::new(),
        });
        let saved: HashMap<String, (String, i64)> = engine
            .db
            .take_rule_states()
            .await?
            .into_iter()
            .map(|(id, s, at)| (id, (s, at)))
            .collect();
        let mut live = Vec::new();
        for row in engine.db.list_rules().await? {
            match engine.live(row.clone()) {
                Ok(l) => {
                    if let Some(w) = &l.windows {
                        let note = match saved.get(&row.rule_id) {
                            Some((s, at)) => match serde_json::from_str::<Windows>(s) {
                                Ok(state) if fits(&state, &l.query) => {
                                    *w.lock().unwrap_or_else(|e| e.into_inner()) = state;
                                    format!("window state restored (saved at a clean shutdown, {at} ms)")
                                }
                                _ => format!("window state saved at {at} ms did not fit the rule and was dropped"),
                            },
                            None => "window state was lost: the previous run ended without saving it (killed or crashed); windows open then were not emitted".to_owned(),
                        };
                        if !note.starts_with("window state restored") {
                            tracing::warn!(rule = %row.name, %note, "rule window state");
                        }
                        *l.counters
                            .window_state
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = Some(note);
                    }
                    live.push(l);
                }
                Err(e) => {
                    tracing::error!(rule = %row.name, error = %e, "stored rule does not compile; it is not running")
                }
            }
        }
        engine.install(live);
        let task = tokio::spawn(run(engine.clone(), rx, stop));
        Ok((engine, task))
    }

    /// Builds a rule and, for a durable enabled one, starts the task that evaluates it from
    /// its durable queue.
    fn live(&self, row: RuleRow) -> Result<Arc<Live>, RuleError> {
        let (live, stop) = self.build(row)?;
        let live = Arc::new(live);
        if let (Some(stop), Some(thing)) = (stop, self.deps.thing.upgrade()) {
            tokio::spawn(durable(
                Arc::downgrade(&live),
                self.db.clone(),
                Arc::downgrade(&thing),
                thing.apps.clone(),
                durable_group(&live.row.rule_id),
                stop,
            ));
        }
        Ok(live)
    }

    fn build(&self, row: RuleRow) -> Result<(Live, Option<watch::Receiver<()>>), RuleError> {
        let spec = RuleSpec {
            name: row.name.clone(),
            description: row.description.clone(),
            sql: row.sql_text.clone(),
            actions: serde_json::from_str(&row.actions)
                .map_err(|e| RuleError::Invalid(format!("stored actions: {e}")))?,
            enabled: row.enabled != 0,
            durable: row.durable != 0,
        };
        let (query, actions) = compile(&spec)?;
        let runners = if row.enabled != 0 {
            actions
                .into_iter()
                .enumerate()
                .map(|(i, a)| Runner::start(a, i, self.deps.clone()))
                .collect()
        } else {
            Vec::new()
        };
        let windows = query.window.map(|w| {
            Mutex::new(Windows::new(
                w,
                query.aggregates.iter().map(|a| a.0).collect(),
                self.limits.max_groups,
                self.limits.max_window_values,
            ))
        });
        let kinds = MessageType::ALL
            .iter()
            .filter(|(k, _)| sql::filters_overlap(&query.topic, kind_pattern(*k)))
            .fold(0, |m, (k, _)| m | kind_bit(*k));
        let prefix = match query.topic.find(['+', '#']) {
            Some(i) => query.topic[..i].to_owned(),
            None => query.topic.clone(),
        };
        let durable = row.durable != 0;
        let (stop_tx, stop_rx) = if durable && row.enabled != 0 {
            let (tx, rx) = watch::channel(());
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        Ok((
            Live {
                prefix,
                row,
                query,
                actions: runners,
                windows,
                counters: Arc::new(RuleCounters::default()),
                kinds,
                durable,
                _durable_stop: stop_tx,
            },
            stop_rx,
        ))
    }

    fn install(&self, rules: Vec<Arc<Live>>) {
        self.any_rules
            .store(rules.iter().any(|r| r.row.enabled != 0), Ordering::Relaxed);
        // Durable rules' messages go to their own queues (consumer groups of the platform).
        if let Some(thing) = self.deps.thing.upgrade() {
            let mut internal = Vec::new();
            for r in rules.iter().filter(|r| r.durable && r.row.enabled != 0) {
                for (k, _) in MessageType::ALL
                    .iter()
                    .filter(|(k, _)| r.kinds & kind_bit(*k) != 0)
                {
                    internal.push((durable_group(&r.row.rule_id), r.query.topic.clone(), *k));
                }
            }
            thing.apps.set_internal(internal);
        }
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
        self.wants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The running rules.
    pub fn rules(&self) -> Arc<Vec<Arc<Live>>> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// True when an enabled rule reads `kind` messages of product `pk`.
    pub fn wants(&self, pk: &str, kind: MessageType) -> bool {
        if !self.any_rules.load(Ordering::Relaxed) {
            return false;
        }
        let bit = kind_bit(kind);
        if let Some(m) = self
            .wants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pk)
            .filter(|m| *m & bit != 0)
        {
            return m & (bit << 16) != 0;
        }
        let pattern = match kind {
            MessageType::Status => format!("/as/mqtt/status/{pk}/+"),
            _ => kind_pattern(kind).replacen("/+/", &format!("/{pk}/"), 1),
        };
        // Computed under the cache's lock: `install` replaces the rules, then clears the cache
        // under the same lock, so an answer from rules being replaced cannot outlive them.
        let mut cache = self.wants.write().unwrap_or_else(|e| e.into_inner());
        let w = self.rules().iter().any(|r| {
            r.row.enabled != 0
                && r.kinds & bit != 0
                && sql::filters_overlap(&r.query.topic, &pattern)
        });
        if cache.len() > 100_000 {
            cache.clear();
        }
        let m = cache.entry(pk.to_owned()).or_default();
        *m |= bit | if w { bit << 16 } else { 0 };
        w
    }

    /// Hands a device message to the rules; never waits. False when it was dropped because
    /// the engine's queue is full (counted).
    pub fn offer(&self, m: &Outgoing) -> bool {
        if !self.wants(&m.product_key, m.kind) {
            return true;
        }
        let device_name = device_of(m);
        let input = Input {
            topic: m.topic.clone(),
            product_key: m.product_key.clone(),
            device_name,
            payload: m.payload.clone(),
            at: m.generated_at,
        };
        match self.tx.try_send(input) {
            Ok(()) => true,
            Err(_) => {
                self.input_dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Creates a rule.
    pub async fn create(&self, spec: RuleSpec) -> Result<Arc<Live>, RuleError> {
        let _edit = self.edit.lock().await;
        compile(&spec)?;
        if self.rules().len() >= self.limits.max_rules {
            return Err(RuleError::Invalid(format!(
                "at most {} rules (rules.max_rules)",
                self.limits.max_rules
            )));
        }
        let now = now_ms();
        let row = RuleRow {
            rule_id: crate::registry::new_secret()[..16].to_lowercase(),
            name: spec.name.clone(),
            description: spec.description.clone(),
            sql_text: spec.sql.clone(),
            actions: Value::Array(spec.actions.clone()).to_string(),
            enabled: i64::from(spec.enabled),
            created_at: now,
            updated_at: now,
            durable: i64::from(spec.durable),
        };
        self.db.insert_rule(&row).await?;
        let live = self.live(row)?;
        let mut all: Vec<Arc<Live>> = self.rules().iter().cloned().collect();
        all.push(live.clone());
        self.install(all);
        Ok(live)
    }

    /// Replaces a rule's definition (its windows and counters start again).
    pub async fn update(&self, id: &str, mut spec: RuleSpec) -> Result<Arc<Live>, RuleError> {
        let _edit = self.edit.lock().await;
        let old = self
            .get(id)
            .ok_or_else(|| RuleError::NotFound(id.to_owned()))?;
        // Secrets sent back as the API showed them ("***") keep their stored values.
        let before: Vec<Value> = serde_json::from_str(&old.row.actions).unwrap_or_default();
        for (new, old) in spec.actions.iter_mut().zip(&before) {
            actions::unredact(new, old);
        }
        compile(&spec)?;
        let row = RuleRow {
            rule_id: id.to_owned(),
            name: spec.name.clone(),
            description: spec.description.clone(),
            sql_text: spec.sql.clone(),
            actions: Value::Array(spec.actions.clone()).to_string(),
            enabled: i64::from(spec.enabled),
            created_at: old.row.created_at,
            updated_at: now_ms(),
            durable: i64::from(spec.durable),
        };
        if !self.db.update_rule(&row).await? {
            return Err(RuleError::NotFound(id.to_owned()));
        }
        self.replace(id, row)
    }

    fn replace(&self, id: &str, row: RuleRow) -> Result<Arc<Live>, RuleError> {
        let live = self.live(row)?;
        let all: Vec<Arc<Live>> = self
            .rules()
            .iter()
            .map(|r| {
                if r.row.rule_id == id {
                    live.clone()
                } else {
                    r.clone()
                }
            })
            .collect();
        self.install(all);
        Ok(live)
    }

    /// Enables or disables a rule.
    pub async fn set_enabled(&self, id: &str, on: bool) -> Result<Arc<Live>, RuleError> {
        let _edit = self.edit.lock().await;
        let old = self
            .get(id)
            .ok_or_else(|| RuleError::NotFound(id.to_owned()))?;
        if (old.row.enabled != 0) == on {
            return Ok(old);
        }
        let mut row = old.row.clone();
        row.enabled = i64::from(on);
        row.updated_at = now_ms();
        if !self.db.update_rule(&row).await? {
            return Err(RuleError::NotFound(id.to_owned()));
        }
        self.replace(id, row)
    }

    /// Deletes a rule.
    pub async fn delete(&self, id: &str) -> Result<(), RuleError> {
        let _edit = self.edit.lock().await;
        if !self.db.delete_rule(id).await? {
            return Err(RuleError::NotFound(id.to_owned()));
        }
        let all = self
            .rules()
            .iter()
            .filter(|r| r.row.rule_id != id)
            .cloned()
            .collect();
        self.install(all);
        // What its durable queue still held goes with it.
        self.db.delete_group(&durable_group(id)).await?;
        Ok(())
    }

    /// A rule by id or name.
    pub fn get(&self, id: &str) -> Option<Arc<Live>> {
        self.rules()
            .iter()
            .find(|r| r.row.rule_id == id || r.row.name == id)
            .cloned()
    }

    /// Saves window state (at shutdown).
    pub async fn save(&self) {
        let mut states = Vec::new();
        for r in self.rules().iter() {
            if let Some(w) = &r.windows {
                let w = w.lock().unwrap_or_else(|e| e.into_inner());
                if let Ok(s) = serde_json::to_string(&*w) {
                    states.push((r.row.rule_id.clone(), s));
                }
            }
        }
        if states.is_empty() {
            return;
        }
        match self.db.save_rule_states(&states, now_ms()).await {
            Ok(()) => tracing::info!(rules = states.len(), "rule window state saved"),
            Err(e) => {
                tracing::error!(error = %e, "rule window state could not be saved: it is lost")
            }
        }
    }

    /// The rule's state for the API.
    pub fn describe(&self, r: &Live) -> Value {
        let c = &r.counters;
        let dropped = c.dropped.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let actions: Vec<Value> = if r.row.enabled != 0 {
            r.actions
                .iter()
                .map(|a| {
                    let ac = &a.counters;
                    let done = ac.done.load(Ordering::Relaxed);
                    json!({
                        "spec": actions::redact(&serde_json::to_value(&a.spec).unwrap_or_default()),
                        "queued": a.queued(),
                        "done": done,
                        "failed_attempts": ac.failed.load(Ordering::Relaxed),
                        "dead_lettered": ac.dead_lettered.load(Ordering::Relaxed),
                        "dropped": {
                            "queue full": ac.dropped_queue_full.load(Ordering::Relaxed),
                            "dead-letter store failed": ac.dropped_store_failed.load(Ordering::Relaxed),
                        },
                        "latency_ms_avg": if done > 0 { ac.latency_us_sum.load(Ordering::Relaxed) as f64 / done as f64 / 1000.0 } else { 0.0 },
                        "latency_ms_max": ac.latency_us_max.load(Ordering::Relaxed) as f64 / 1000.0,
                        "last_error": ac.last_error.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(e, at)| json!({"error": e, "at": at})),
                    })
                })
                .collect()
        } else {
            serde_json::from_str::<Vec<Value>>(&r.row.actions)
                .unwrap_or_default()
                .into_iter()
                .map(|spec| json!({"spec": actions::redact(&spec)}))
                .collect()
        };
        let matched = c.matched.load(Ordering::Relaxed);
        json!({
            "rule_id": r.row.rule_id,
            "name": r.row.name,
            "description": r.row.description,
            "sql": r.row.sql_text,
            "enabled": r.row.enabled != 0,
            "durable": r.durable,
            "created_at": r.row.created_at,
            "updated_at": r.row.updated_at,
            "stats": {
                "matched": matched,
                "passed": c.passed.load(Ordering::Relaxed),
                "filtered": c.filtered.load(Ordering::Relaxed),
                "failed": c.failed.load(Ordering::Relaxed),
                "dropped": dropped,
                "eval_us_avg": if matched > 0 { c.eval_ns.load(Ordering::Relaxed) as f64 / matched as f64 / 1000.0 } else { 0.0 },
                "last_error": c.last_error.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(e, at)| json!({"error": e, "at": at})),
                "window_state": c.window_state.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                "window_groups": r.windows.as_ref().map(|w| w.lock().unwrap_or_else(|e| e.into_inner()).groups()),
            },
            "actions": actions,
        })
    }

    /// Copies the engine's and each rule's counters into the registry.
    pub fn export_metrics(&self, r: &ironlink_telemetry::Registry) {
        r.set_counter(
            "ironlink_rules_input_dropped_total",
            "Device messages the rules engine dropped, by reason",
            &[("reason", "queue_full")],
            self.input_dropped.load(Ordering::Relaxed),
        );
        r.set_counter(
            "ironlink_rules_inputs_total",
            "Device messages the rules engine took",
            &[],
            self.inputs.load(Ordering::Relaxed),
        );
        const MESSAGES: &str = "Messages a rule saw, by outcome";
        const ACTIONS: &str = "Outputs of a rule's action, by outcome";
        for rule in self.rules().iter() {
            let c = &rule.counters;
            let name = rule.row.name.as_str();
            for (what, v) in [
                ("matched", c.matched.load(Ordering::Relaxed)),
                ("passed", c.passed.load(Ordering::Relaxed)),
                ("filtered", c.filtered.load(Ordering::Relaxed)),
                ("failed", c.failed.load(Ordering::Relaxed)),
            ] {
                r.set_counter(
                    "ironlink_rule_messages_total",
                    MESSAGES,
                    &[("rule", name), ("outcome", what)],
                    v,
                );
            }
            for (reason, v) in c.dropped.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                r.set_counter(
                    "ironlink_rule_messages_total",
                    MESSAGES,
                    &[
                        ("rule", name),
                        ("outcome", "dropped"),
                        ("reason", &ironlink_telemetry::label_value(reason)),
                    ],
                    *v,
                );
            }
            for (i, a) in rule.actions.iter().enumerate() {
                let c = &a.counters;
                let index = i.to_string();
                for (what, v) in [
                    ("done", c.done.load(Ordering::Relaxed)),
                    ("failed_attempt", c.failed.load(Ordering::Relaxed)),
                    ("dead_lettered", c.dead_lettered.load(Ordering::Relaxed)),
                    (
                        "dropped_queue_full",
                        c.dropped_queue_full.load(Ordering::Relaxed),
                    ),
                    (
                        "dropped_store_failed",
                        c.dropped_store_failed.load(Ordering::Relaxed),
                    ),
                ] {
                    r.set_counter(
                        "ironlink_rule_action_total",
                        ACTIONS,
                        &[
                            ("rule", name),
                            ("action", &index),
                            ("kind", a.spec.name()),
                            ("outcome", what),
                        ],
                        v,
                    );
                }
                r.set_gauge(
                    "ironlink_rule_action_queued",
                    "Outputs waiting for a rule's action",
                    &[("rule", name), ("action", &index)],
                    a.queued() as f64,
                );
            }
        }
        self.scripts.export_metrics(r);
    }

    fn message_id(&self) -> String {
        self.next_id.fetch_add(1, Ordering::Relaxed).to_string()
    }
}

fn fits(state: &Windows, q: &Query) -> bool {
    let aggs: Vec<sql::AggKind> = q.aggregates.iter().map(|a| a.0).collect();
    q.window.is_some_and(|w| state.fits(w, &aggs))
}

fn device_of(m: &Outgoing) -> String {
    let levels: Vec<&str> = m.topic.split('/').collect();
    let i = if m.kind == MessageType::Status { 5 } else { 2 };
    levels.get(i).map_or_else(String::new, |s| (*s).to_owned())
}

/// One message as the engine evaluates it.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// Rule topic.
    pub topic: &'a str,
    /// Payload as sent (parsed as JSON once, when a rule matches).
    pub raw: &'a [u8],
    /// Product key.
    pub product_key: &'a str,
    /// Device name.
    pub device_name: &'a str,
    /// Message id.
    pub message_id: &'a str,
    /// When it was stored, ms since the Unix epoch.
    pub at: i64,
    /// The device's tags, for rules that call `attribute()`.
    pub tags: Option<&'a crate::storage::TagMap>,
    /// The thing layer, for `anomaly()`.
    pub thing: Option<&'a crate::thing::Thing>,
}

/// Evaluates one message against every rule; outputs go to the actions.
pub fn evaluate(rules: &[Arc<Live>], i: &Incoming<'_>) {
    let mut parsed: Option<Value> = None;
    for r in rules {
        if r.row.enabled == 0
            || r.durable
            || !i.topic.starts_with(&r.prefix)
            || !sql::topic_matches(&r.query.topic, i.topic)
        {
            continue;
        }
        let payload =
            parsed.get_or_insert_with(|| serde_json::from_slice(i.raw).unwrap_or(Value::Null));
        let m = Msg {
            topic: i.topic,
            raw: i.raw,
            payload,
            product_key: i.product_key,
            device_name: i.device_name,
            message_id: i.message_id,
            now_ms: i.at,
            window: None,
            tags: i.tags,
            thing: i.thing,
        };
        for (row, pk, dn) in evaluate_one(r, &m, i.at) {
            dispatch(r, row, &pk, &dn, i.at);
        }
    }
}

/// One rule on one message: its outputs (errors are counted on the rule).
fn evaluate_one(r: &Live, m: &Msg<'_>, at: i64) -> Vec<Output> {
    let started = Instant::now();
    let c = &r.counters;
    c.matched.fetch_add(1, Ordering::Relaxed);
    let outcome = step(r, m, at);
    c.eval_ns
        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    match outcome {
        Ok(rows) => rows,
        Err(e) => {
            c.error(e);
            Vec::new()
        }
    }
}

/// The consumer group holding a durable rule's messages.
fn durable_group(rule_id: &str) -> String {
    format!("$rule:{rule_id}")
}

/// Product key and device name of a rule topic.
fn topic_device(topic: &str) -> (String, String) {
    let levels: Vec<&str> = topic.split('/').collect();
    let at = if topic.starts_with(crate::rules::STATUS_PREFIX) {
        4
    } else {
        1
    };
    let get = |i: usize| levels.get(i).map_or_else(String::new, |s| (*s).to_owned());
    (get(at), get(at + 1))
}

const STATUS_PREFIX: &str = ironlink_shared::STATUS_TOPIC_PREFIX;

/// A device's tags for `attribute()`; a storage error is logged and reads as no tags.
async fn tags_of(db: &Db, pk: &str, dn: &str) -> Option<Arc<crate::storage::TagMap>> {
    match db.device_tags(pk, dn).await {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(product_key = %pk, device_name = %dn, error = %e, "rules: device tags could not be read: attribute() is null for this message");
            None
        }
    }
}

/// The device's tags when a rule that calls `attribute()` takes this topic.
async fn tags_for(
    engine: &Engine,
    rules: &[Arc<Live>],
    input: &Input,
) -> Option<Arc<crate::storage::TagMap>> {
    let wanted = rules.iter().any(|r| {
        r.query.reads_tags
            && r.row.enabled != 0
            && !r.durable
            && input.topic.starts_with(&r.prefix)
            && sql::topic_matches(&r.query.topic, &input.topic)
    });
    if wanted {
        tags_of(&engine.db, &input.product_key, &input.device_name).await
    } else {
        None
    }
}

/// A durable rule's task: takes its messages from its queue in order, evaluates the rule, has
/// every action deliver every output (retries, then dead letters), and only then removes the
/// message from the queue. After a crash the messages not removed come again (at least once).
async fn durable(
    live: std::sync::Weak<Live>,
    db: Db,
    thing: std::sync::Weak<crate::thing::Thing>,
    apps: Arc<crate::apps::Apps>,
    group: String,
    mut stop: watch::Receiver<()>,
) {
    let mut consumer = apps.attach(&group);
    loop {
        let m = tokio::select! {
            m = consumer.next() => m,
            _ = stop.changed() => None,
        };
        let Some(m) = m else { break };
        let Some(r) = live.upgrade() else { break };
        let (pk, dn) = topic_device(&m.topic);
        let payload: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
        let tags = if r.query.reads_tags {
            tags_of(&db, &pk, &dn).await
        } else {
            None
        };
        let thing = thing.upgrade();
        let msg = Msg {
            topic: &m.topic,
            raw: &m.payload,
            payload: &payload,
            product_key: &pk,
            device_name: &dn,
            message_id: &m.message_id,
            now_ms: m.generated_at,
            window: None,
            tags: tags.as_deref(),
            thing: thing.as_deref(),
        };
        for (row, pk, dn) in evaluate_one(&r, &msg, m.generated_at) {
            for a in &r.actions {
                a.run_now(Job {
                    row: row.clone(),
                    ctx: JobCtx {
                        rule_id: r.row.rule_id.clone(),
                        product_key: pk.clone(),
                        device_name: dn.clone(),
                        at: m.generated_at,
                    },
                    queued: Instant::now(),
                })
                .await;
            }
        }
        drop(r);
        if let Err(e) = consumer.settle(m.id, true).await {
            tracing::error!(%group, error = %e, "durable rule: a done message could not be removed from its queue (it will come again)");
        }
    }
}

type Output = (Map<String, Value>, String, String);

fn step(r: &Live, m: &Msg<'_>, at: i64) -> Result<Vec<Output>, String> {
    let c = &r.counters;
    if let Some(cond) = &r.query.condition {
        if !eval::holds(cond, m, &[])? {
            c.filtered.fetch_add(1, Ordering::Relaxed);
            return Ok(Vec::new());
        }
    }
    let Some(w) = &r.windows else {
        c.passed.fetch_add(1, Ordering::Relaxed);
        let row = eval::project(&r.query, m, &[])?;
        return Ok(vec![(
            row,
            m.product_key.to_owned(),
            m.device_name.to_owned(),
        )]);
    };
    let mut key = Vec::with_capacity(r.query.group_keys.len());
    for k in &r.query.group_keys {
        key.push(eval::eval(k, m, &[])?);
    }
    let mut args = Vec::with_capacity(r.query.aggregates.len());
    for (_, a) in &r.query.aggregates {
        args.push(match a {
            Some(e) => Some(eval::eval(e, m, &[])?),
            None => None,
        });
    }
    let last = LastMsg {
        topic: m.topic.to_owned(),
        raw: m.raw.to_vec(),
        payload: m.payload.clone(),
        product_key: m.product_key.to_owned(),
        device_name: m.device_name.to_owned(),
        message_id: m.message_id.to_owned(),
        tags: m.tags.filter(|_| r.query.reads_tags).cloned(),
    };
    let pushed = w.lock().unwrap_or_else(|e| e.into_inner()).push(
        at,
        Value::Array(key).to_string(),
        args,
        last,
    );
    match pushed {
        Ok(Some(emit)) => Ok(emitted(r, vec![emit], at)),
        Ok(None) => Ok(Vec::new()),
        Err(why) => {
            c.dropped(why.reason());
            Ok(Vec::new())
        }
    }
}

/// Rows of windows that closed: HAVING, then SELECT over the group's latest message.
fn emitted(r: &Live, emits: Vec<window::Emit>, now: i64) -> Vec<Output> {
    let c = &r.counters;
    let mut out = Vec::new();
    for e in emits {
        let l = &e.last;
        let m = Msg {
            topic: &l.topic,
            raw: &l.raw,
            payload: &l.payload,
            product_key: &l.product_key,
            device_name: &l.device_name,
            message_id: &l.message_id,
            now_ms: now,
            window: Some(e.window),
            tags: l.tags.as_ref(),
            // Scores are looked up as messages arrive; at a window's end `anomaly()` is null.
            thing: None,
        };
        if let Some(h) = &r.query.having {
            match eval::holds(h, &m, &e.aggs) {
                Ok(true) => {}
                Ok(false) => {
                    c.filtered.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(x) => {
                    c.error(x);
                    continue;
                }
            }
        }
        match eval::project(&r.query, &m, &e.aggs) {
            Ok(row) => {
                c.passed.fetch_add(1, Ordering::Relaxed);
                out.push((row, l.product_key.clone(), l.device_name.clone()));
            }
            Err(x) => c.error(x),
        }
    }
    out
}

fn dispatch(r: &Live, row: Map<String, Value>, pk: &str, dn: &str, at: i64) {
    let n = r.actions.len();
    let mut row = Some(row);
    for (i, a) in r.actions.iter().enumerate() {
        let row = if i + 1 == n {
            row.take().unwrap_or_default()
        } else {
            row.clone().unwrap_or_default()
        };
        a.offer(Job {
            row,
            ctx: JobCtx {
                rule_id: r.row.rule_id.clone(),
                product_key: pk.to_owned(),
                device_name: dn.to_owned(),
                at,
            },
            queued: Instant::now(),
        });
    }
}

async fn run(engine: Arc<Engine>, mut rx: mpsc::Receiver<Input>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            input = rx.recv() => {
                let Some(input) = input else { break };
                engine.inputs.fetch_add(1, Ordering::Relaxed);
                let rules = engine.rules();
                let thing = engine.deps.thing.upgrade();
                // Rules calling attribute() need the device's tags (looked up only then).
                let any_tags = rules.iter().any(|r| r.query.reads_tags);
                let tags = if any_tags { tags_for(&engine, &rules, &input).await } else { None };
                let id = engine.message_id();
                engine.evaluate_timed(&rules, &input.incoming(&id, tags.as_deref(), thing.as_deref()));
                // Evaluate everything already waiting before looking at the clock again.
                let mut n = 0;
                while n < 256 {
                    let Ok(input) = rx.try_recv() else { break };
                    n += 1;
                    engine.inputs.fetch_add(1, Ordering::Relaxed);
                    let tags = if any_tags { tags_for(&engine, &rules, &input).await } else { None };
                    let id = engine.message_id();
                    engine.evaluate_timed(&rules, &input.incoming(&id, tags.as_deref(), thing.as_deref()));
                }
            }
            // Messages are stamped when they are stored and may wait in the queue a little:
            // windows close ALLOWED_LATENESS_MS after their end, so such a message still
            // counts in its own window.
            _ = tick.tick() => tick_windows(&engine.rules(), now_ms() - ALLOWED_LATENESS_MS),
            r = stop.changed() => {
                // Stop asked, or the server dropped without a shutdown: either way, end.
                if r.is_err() || *stop.borrow() {
                    // What is queued is evaluated first, so its windows are saved.
                    while let Ok(input) = rx.try_recv() {
                        let rules = engine.rules();
                        let tags = tags_for(&engine, &rules, &input).await;
                        let id = engine.message_id();
                        let thing = engine.deps.thing.upgrade();
                        evaluate(&rules, &input.incoming(&id, tags.as_deref(), thing.as_deref()));
                    }
                    engine.save().await;
                    break;
                }
            }
        }
    }
}

/// Emits every window that closed by `now`.
pub fn tick_windows(rules: &[Arc<Live>], now: i64) {
    for r in rules {
        let Some(w) = &r.windows else { continue };
        if r.row.enabled == 0 {
            continue;
        }
        let emits = w.lock().unwrap_or_else(|e| e.into_inner()).tick(now);
        if emits.is_empty() {
            continue;
        }
        for (row, pk, dn) in emitted(r, emits, now) {
            dispatch(r, row, &pk, &dn, now);
        }
    }
}

/// Runs a rule's SQL on a sample message without running actions (the test endpoint).
pub fn test_sql(
    sql_text: &str,
    topic: &str,
    payload: &Value,
    pk: &str,
    dn: &str,
) -> Result<Value, RuleError> {
    let q = sql::parse(sql_text)?;
    if !sql::topic_matches(&q.topic, topic) {
        return Ok(
            json!({"matched": false, "passed": false, "reason": format!("topic `{topic}` does not match FROM \"{}\"", q.topic)}),
        );
    }
    let raw = payload.to_string();
    let m = Msg {
        topic,
        raw: raw.as_bytes(),
        payload,
        product_key: pk,
        device_name: dn,
        message_id: "test",
        now_ms: now_ms(),
        window: None,
        // No real device here: `attribute()` and `anomaly()` are null, as in Alibaba's SQL
        // debugging.
        tags: None,
        thing: None,
    };
    if let Some(c) = &q.condition {
        match eval::holds(c, &m, &[]) {
            Ok(true) => {}
            Ok(false) => {
                return Ok(
                    json!({"matched": true, "passed": false, "reason": "WHERE does not hold"}),
                )
            }
            Err(e) => return Ok(json!({"matched": true, "passed": false, "error": e})),
        }
    }
    if q.window.is_some() {
        let args: Vec<Value> = q
            .aggregates
            .iter()
            .map(|(_, a)| {
                a.as_ref()
                    .map_or(json!(1), |e| eval::eval(e, &m, &[]).unwrap_or(Value::Null))
            })
            .collect();
        return match eval::project(&q, &m, &args) {
            Ok(row) => Ok(
                json!({"matched": true, "passed": true, "output": row, "note": "windowed rule: aggregates shown over this one message"}),
            ),
            Err(e) => Ok(json!({"matched": true, "passed": false, "error": e})),
        };
    }
    match eval::project(&q, &m, &[]) {
        Ok(row) => Ok(json!({"matched": true, "passed": true, "output": row})),
        Err(e) => Ok(json!({"matched": true, "passed": false, "error": e})),
    }
}
