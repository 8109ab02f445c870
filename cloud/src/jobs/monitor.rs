//! Anomaly monitors: one pooled model per monitor (some numeric properties of a product's
//! devices), trained on the last `train_days` of stored history when the cloud starts, on a cron
//! schedule and on request; every new value a device posts is scored online, and an anomaly
//! becomes the device's `anomaly` event (type `alert`): stored, and delivered to applications'
//! consumer groups and rules like the device's own events.

use crate::registry::now_ms;
use crate::storage::{Db, StorageError};
use crate::tsdb::{codec, Tsdb};
use ironlink_analytics::anomaly::{self, Model, Normal, Scorer, Train};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// Points of one series a training reads at most (its most recent).
const TRAIN_POINTS: usize = 20_000;
/// Series one monitor trains on at most.
const MAX_SERIES: usize = 100_000;

/// A monitor's settings as a request gives them.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MonitorSpec {
    /// Unique name: 1–64 letters, digits, `_`, `-`, `.`.
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    pub name: String,
    /// The product whose devices are watched.
    pub product_key: String,
    /// Numeric properties watched (1–100).
    #[schema(min_items = 1, max_items = 100)]
    pub identifiers: Vec<String>,
    /// Share of normal points flagged: 0.01 (low sensitivity, default), 0.03 or 0.05.
    #[serde(default)]
    pub sensitivity: Option<f64>,
    /// History trained on: the last this many days (default 7).
    #[serde(default, deserialize_with = "crate::serde_int::opt")]
    #[schema(minimum = 1, maximum = 365)]
    pub train_days: Option<i64>,
    /// Cron expression (UTC) of retraining (default `0 0 3 * * *`, daily at 03:00).
    #[serde(default)]
    #[schema(max_length = 256)]
    pub retrain: Option<String>,
}

/// A monitor as shown.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MonitorInfo {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Product key.
    pub product_key: String,
    /// Properties watched.
    pub identifiers: Vec<String>,
    /// Share of normal points flagged.
    pub sensitivity: f64,
    /// Days of history trained on.
    pub train_days: i64,
    /// Retraining schedule.
    pub retrain: String,
    /// `untrained`, `training`, `ready`, or `failed: reason`.
    pub state: String,
    /// Last training, ms.
    pub trained_at: Option<i64>,
    /// Series the model scores.
    pub series: usize,
    /// Lag windows the model was trained on.
    pub training_rows: usize,
    /// Alarms raised since the cloud started.
    pub alarms: u64,
}

/// One anomaly found in a posted value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alarm {
    /// The monitor's name.
    pub monitor: String,
    /// Device.
    pub device_name: String,
    /// Property.
    pub property: String,
    /// The value's time, ms.
    pub time: i64,
    /// The value.
    pub value: f64,
    /// The forecast and its interval.
    pub expected: f64,
    /// Lower bound.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
    /// Share of normal points flagged at this sensitivity.
    pub sensitivity: f64,
}

struct Trained {
    model: Model,
    /// Per (device, property).
    scorers: HashMap<(String, String), Series>,
    at: i64,
}

/// Scores kept per series for rules' `anomaly()`: a rule sees the message a little after its
/// values were scored (durable rules possibly later: older points read as not scored).
const RECENT_SCORES: usize = 16;

/// A scored series.
struct Series {
    scorer: Scorer,
    /// Time of the last value it took.
    last: i64,
    /// The latest scores: time, value, score.
    recent: std::collections::VecDeque<(i64, f64, anomaly::Score)>,
}

struct Live {
    id: i64,
    name: String,
    product_key: String,
    identifiers: Vec<String>,
    level: usize,
    train_days: i64,
    retrain: String,
    state: Mutex<String>,
    trained: Mutex<Option<Trained>>,
    alarms: AtomicU64,
    last_slot: Mutex<i64>,
}

impl Live {
    fn info(&self) -> MonitorInfo {
        let t = self.trained.lock().unwrap_or_else(|e| e.into_inner());
        MonitorInfo {
            id: self.id,
            name: self.name.clone(),
            product_key: self.product_key.clone(),
            identifiers: self.identifiers.clone(),
            sensitivity: anomaly::LEVELS[self.level],
            train_days: self.train_days,
            retrain: self.retrain.clone(),
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            trained_at: t.as_ref().map(|t| t.at),
            series: t.as_ref().map_or(0, |t| t.scorers.len()),
            training_rows: t.as_ref().map_or(0, |t| t.model.rows),
            alarms: self.alarms.load(Ordering::Relaxed),
        }
    }

    fn set_state(&self, s: impl Into<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s.into();
    }
}

/// The monitors of every product.
pub struct Monitors {
    db: Db,
    tsdb: Arc<Tsdb>,
    by_product: RwLock<HashMap<String, Vec<Arc<Live>>>>,
}

impl std::fmt::Debug for Monitors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitors").finish_non_exhaustive()
    }
}

fn level_of(s: Option<f64>) -> Result<usize, String> {
    let s = s.unwrap_or(anomaly::LEVELS[0]);
    Model::level(s).ok_or_else(|| format!("sensitivity {s}: 0.01, 0.03 or 0.05"))
}

const DEFAULT_RETRAIN: &str = "0 0 3 * * *";

impl Monitors {
    /// Loads the monitors (untrained: [`run`] trains them).
    pub async fn open(db: Db, tsdb: Arc<Tsdb>) -> Result<Arc<Self>, StorageError> {
        let m = Arc::new(Self {
            db,
            tsdb,
            by_product: RwLock::default(),
        });
        let rows = sqlx::query("SELECT id, name, product_key, identifiers, sensitivity, train_days, retrain FROM anomaly_monitors ORDER BY id")
            .fetch_all(&m.db.pool)
            .await?;
        for r in rows {
            let ids: String = r.try_get(3)?;
            let live = Live {
                id: r.try_get(0)?,
                name: r.try_get(1)?,
                product_key: r.try_get(2)?,
                identifiers: serde_json::from_str(&ids).unwrap_or_default(),
                level: level_of(Some(r.try_get(4)?)).unwrap_or(0),
                train_days: r.try_get(5)?,
                retrain: r.try_get(6)?,
                state: Mutex::new("untrained".into()),
                trained: Mutex::new(None),
                alarms: AtomicU64::new(0),
                last_slot: Mutex::new(now_ms()),
            };
            m.insert(Arc::new(live));
        }
        Ok(m)
    }

    fn insert(&self, live: Arc<Live>) {
        self.by_product
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(live.product_key.clone())
            .or_default()
            .push(live);
    }

    fn all(&self) -> Vec<Arc<Live>> {
        let mut v: Vec<Arc<Live>> = self
            .by_product
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .cloned()
            .collect();
        v.sort_by_key(|l| l.id);
        v
    }

    fn find(&self, id: i64) -> Option<Arc<Live>> {
        self.all().into_iter().find(|l| l.id == id)
    }

    /// Whether any monitor watches this product (cheap: asked for every property post).
    pub fn watches(&self, pk: &str) -> bool {
        self.by_product
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(pk)
    }

    /// Scores values a device posted (`(property, time, value)`); the anomalies among them.
    /// A value older than the last one its series took is not scored (out of order).
    pub fn observe(&self, pk: &str, dn: &str, values: &[(String, i64, f64)]) -> Vec<Alarm> {
        let lives = match self
            .by_product
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pk)
        {
            Some(l) => l.clone(),
            None => return Vec::new(),
        };
        let mut out = Vec::new();
        for live in lives {
            let mut t = live.trained.lock().unwrap_or_else(|e| e.into_inner());
            let Some(t) = t.as_mut() else { continue };
            for (id, ts, v) in values {
                let Some(series) = t.scorers.get_mut(&(dn.to_owned(), id.clone())) else {
                    continue;
                };
                if *ts < series.last {
                    continue;
                }
                series.last = *ts;
                if let Some(s) = series.scorer.push(&t.model, *v) {
                    if series.recent.len() == RECENT_SCORES {
                        series.recent.pop_front();
                    }
                    series.recent.push_back((*ts, *v, s));
                    if s.anomaly {
                        live.alarms.fetch_add(1, Ordering::Relaxed);
                        out.push(Alarm {
                            monitor: live.name.clone(),
                            device_name: dn.to_owned(),
                            property: id.clone(),
                            time: *ts,
                            value: *v,
                            expected: s.expected,
                            lower: s.lower,
                            upper: s.upper,
                            sensitivity: anomaly::LEVELS[live.level],
                        });
                    }
                }
            }
        }
        out
    }

    /// The score a monitor gave the value of `property` a device posted at `time` (ms), for
    /// rules' `anomaly()`: `anomaly` (bool), `value`, `expected`, `lower`, `upper`,
    /// `sensitivity`, `monitor`. None when no trained monitor scored that point (not watched,
    /// still filling its lags, or older than the series' last [`RECENT_SCORES`] scores).
    pub fn score_of(
        &self,
        pk: &str,
        dn: &str,
        property: &str,
        time: i64,
    ) -> Option<serde_json::Value> {
        let lives = self
            .by_product
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pk)?
            .clone();
        let key = (dn.to_owned(), property.to_owned());
        lives.iter().find_map(|live| {
            let t = live.trained.lock().unwrap_or_else(|e| e.into_inner());
            let series = t.as_ref()?.scorers.get(&key)?;
            let (_, value, s) = series.recent.iter().rev().find(|r| r.0 == time)?;
            Some(serde_json::json!({
                "anomaly": s.anomaly, "value": value, "expected": s.expected,
                "lower": s.lower, "upper": s.upper,
                "sensitivity": anomaly::LEVELS[live.level], "monitor": live.name,
            }))
        })
    }

    /// Creates a monitor and trains it.
    pub async fn create(&self, s: MonitorSpec) -> Result<MonitorInfo, super::JobError> {
        use super::JobError;
        super::check_name(&s.name)?;
        let level = level_of(s.sensitivity)?;
        let train_days = s.train_days.unwrap_or(7);
        if !(1..=365).contains(&train_days) {
            return Err(JobError::Invalid("train_days: 1..=365".into()));
        }
        let retrain = s.retrain.unwrap_or_else(|| DEFAULT_RETRAIN.into());
        super::next_fire(&retrain, now_ms())?;
        if self.db.get_product(&s.product_key).await?.is_none() {
            return Err(JobError::NotFound(format!("no product {}", s.product_key)));
        }
        let tsl = match self.db.get_thing_model(&s.product_key, None).await? {
            Some((_, text, _)) => ironlink_shared::tsl::parse(&text).ok(),
            None => None,
        };
        if s.identifiers.is_empty() || s.identifiers.len() > 100 {
            return Err(JobError::Invalid("identifiers: 1 to 100 properties".into()));
        }
        if let Some(tsl) = &tsl {
            for id in &s.identifiers {
                match tsl.property(id) {
                    Some(p)
                        if matches!(
                            p.param.data_type,
                            ironlink_shared::tsl::DataType::Int { .. }
                                | ironlink_shared::tsl::DataType::Float(_)
                                | ironlink_shared::tsl::DataType::Double(_)
                        ) => {}
                    Some(_) => {
                        return Err(JobError::Invalid(format!(
                            "`{id}` is not a numeric property of {}",
                            s.product_key
                        )))
                    }
                    None => {
                        return Err(JobError::Invalid(format!(
                            "`{id}` is not a property of {}'s thing model",
                            s.product_key
                        )))
                    }
                }
            }
        }
        let ids = serde_json::to_string(&s.identifiers).unwrap_or_default();
        let r = sqlx::query("INSERT INTO anomaly_monitors (name, product_key, identifiers, sensitivity, train_days, retrain, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id")
            .bind(&s.name)
            .bind(&s.product_key)
            .bind(&ids)
            .bind(anomaly::LEVELS[level])
            .bind(train_days)
            .bind(&retrain)
            .bind(now_ms())
            .fetch_one(&self.db.pool)
            .await;
        let id: i64 = match r {
            Ok(r) => r.try_get(0)?,
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                return Err(JobError::Conflict(format!(
                    "a monitor named {:?} exists",
                    s.name
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let live = Arc::new(Live {
            id,
            name: s.name,
            product_key: s.product_key,
            identifiers: s.identifiers,
            level,
            train_days,
            retrain,
            state: Mutex::new("untrained".into()),
            trained: Mutex::new(None),
            alarms: AtomicU64::new(0),
            last_slot: Mutex::new(now_ms()),
        });
        self.insert(live.clone());
        self.train_live(&live).await;
        Ok(live.info())
    }

    /// Every monitor.
    pub fn list(&self) -> Vec<MonitorInfo> {
        self.all().iter().map(|l| l.info()).collect()
    }

    /// One monitor.
    pub fn get(&self, id: i64) -> Result<MonitorInfo, super::JobError> {
        self.find(id)
            .map(|l| l.info())
            .ok_or_else(|| super::JobError::NotFound(format!("no anomaly monitor {id}")))
    }

    /// Deletes a monitor.
    pub async fn delete(&self, id: i64) -> Result<(), super::JobError> {
        let n = sqlx::query("DELETE FROM anomaly_monitors WHERE id = $1")
            .bind(id)
            .execute(&self.db.pool)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(super::JobError::NotFound(format!(
                "no anomaly monitor {id}"
            )));
        }
        let mut map = self.by_product.write().unwrap_or_else(|e| e.into_inner());
        for v in map.values_mut() {
            v.retain(|l| l.id != id);
        }
        map.retain(|_, v| !v.is_empty());
        Ok(())
    }

    /// Trains a monitor now.
    pub async fn train(&self, id: i64) -> Result<MonitorInfo, super::JobError> {
        let live = self
            .find(id)
            .ok_or_else(|| super::JobError::NotFound(format!("no anomaly monitor {id}")))?;
        self.train_live(&live).await;
        Ok(live.info())
    }

    /// Reads the history and trains; the state says how it went (scoring goes on with the
    /// previous model while this runs, and when it fails).
    async fn train_live(&self, live: &Live) {
        live.set_state("training");
        match self.fit(live).await {
            Ok(t) => {
                let n = t.scorers.len();
                *live.trained.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
                live.set_state("ready");
                tracing::info!(monitor = %live.name, series = n, "anomaly monitor trained");
            }
            Err(e) => {
                tracing::warn!(monitor = %live.name, error = %e, "anomaly monitor not trained");
                live.set_state(format!("failed: {e}"));
            }
        }
    }

    async fn fit(&self, live: &Live) -> Result<Trained, String> {
        let now = now_ms();
        let from = now.saturating_sub(live.train_days.saturating_mul(86_400_000));
        let series = self
            .tsdb
            .all_series()
            .await
            .map_err(|e| format!("listing series: {e}"))?;
        let mut data: Vec<((String, String), Vec<f64>, i64)> = Vec::new();
        for (pk, dn, id) in series {
            if pk != live.product_key || !live.identifiers.contains(&id) {
                continue;
            }
            if data.len() >= MAX_SERIES {
                break;
            }
            let page = self
                .tsdb
                .range(&pk, &dn, &id, from, now, TRAIN_POINTS, false, None)
                .await
                .map_err(|e| format!("reading {dn}/{id}: {e}"))?;
            let last = page.points.first().map_or(from, |p| p.0);
            let mut values: Vec<f64> = page
                .points
                .iter()
                .rev()
                .filter_map(|(_, v)| codec::numeric(v))
                .filter(|v| v.is_finite())
                .collect();
            values.shrink_to_fit();
            if values.len() > 2 * (Train::default().lags + 2) {
                data.push(((dn, id), values, last));
            }
        }
        if data.is_empty() {
            return Err(format!(
                "no series of {} with enough history in the last {} days",
                live.product_key, live.train_days
            ));
        }
        let level = live.level;
        tokio::task::spawn_blocking(move || {
            let mut train: Vec<(Normal, &[f64])> = data
                .iter()
                .map(|(_, v, _)| (Normal::of(v), v.as_slice()))
                .collect();
            let model = Model::train(&mut train, Train::default()).map_err(|e| e.to_string())?;
            let mut scorers = HashMap::with_capacity(data.len());
            for ((key, values, last), (normal, _)) in data.iter().zip(train.iter()) {
                let mut s = Scorer::new(*normal, level);
                // Warm the lags with the series' latest values, so the next post is scored.
                let warm = model.lags + 2;
                for v in &values[values.len().saturating_sub(warm)..] {
                    s.push(&model, *v);
                }
                scorers.insert(
                    key.clone(),
                    Series {
                        scorer: s,
                        last: *last,
                        recent: std::collections::VecDeque::new(),
                    },
                );
            }
            Ok(Trained {
                model,
                scorers,
                at: now_ms(),
            })
        })
        .await
        .map_err(|e| format!("training panicked: {e}"))?
    }
}

/// Trains every monitor at start, then retrains each on its schedule, until `stop`.
pub async fn run(m: Arc<Monitors>, mut stop: watch::Receiver<bool>) {
    for live in m.all() {
        if *stop.borrow() {
            return;
        }
        m.train_live(&live).await;
    }
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let now = now_ms();
        for live in m.all() {
            let due = {
                let mut last = live.last_slot.lock().unwrap_or_else(|e| e.into_inner());
                match super::next_fire(&live.retrain, *last) {
                    Ok(Some(t)) if t <= now => {
                        *last = now;
                        true
                    }
                    _ => false,
                }
            };
            if due {
                m.train_live(&live).await;
            }
        }
    }
}
