//! Analytics jobs: SQL over property history and the fleet's dimension tables (polars' SQL
//! context, in `ironlink-analytics`), run on a cron schedule or on demand.
//!
//! Each run is a **worker process** (this binary, `analytics-worker`): it reads the database
//! itself, under an address-space limit (`memory_mb`) and a time limit the cloud enforces by
//! killing it, so a job over too much data fails with the reason and never takes the cloud
//! down. The result is a Parquet file under `{data_dir}/analytics/results`; it belongs to the
//! result once its run row says `succeeded`. A run the cloud was killed during is marked failed
//! at the next start, and files no succeeded run names are deleted then.

pub mod monitor;
pub mod worker;

use crate::registry::now_ms;
use crate::storage::{Db, StorageError};
use ironlink_analytics::archive::MAX_MS;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{watch, Notify, Semaphore};

/// `[analytics]`: limits and the worker of analytics jobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalyticsConfig {
    /// Runs at once at most; more wait for a slot.
    pub max_concurrent_runs: usize,
    /// Longest a run may take (default and ceiling of a job's `timeout_secs`).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Address space of a worker, MiB (default and ceiling of a job's `memory_mb`).
    pub memory_mb: u64,
    /// History rows a run may read (default and ceiling of a job's `max_rows`).
    pub max_rows: u64,
    /// Rows a result may have.
    pub max_result_rows: u64,
    /// The worker executable; default: this program.
    pub worker: Option<PathBuf>,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self {
            max_concurrent_runs: 1,
            timeout: Duration::from_secs(600),
            memory_mb: 4096,
            max_rows: 50_000_000,
            max_result_rows: 1_000_000,
            worker: None,
        }
    }
}

/// A job as stored and shown.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
// OTA has a `Job` too: each needs its own name in the OpenAPI document.
#[schema(as = AnalyticsJob)]
pub struct Job {
    /// Id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// The SQL query.
    pub query: String,
    /// Cron expression (UTC; 5 fields, or 6 with seconds first); absent: on demand only.
    pub schedule: Option<String>,
    /// History read: the last this many seconds before the run (absent: the query's bounds).
    pub window_secs: Option<i64>,
    /// History rows a run may read (absent: `[analytics] max_rows`).
    pub max_rows: Option<i64>,
    /// Longest a run may take, s (absent: `[analytics] timeout`).
    pub timeout_secs: Option<i64>,
    /// Worker address space, MiB (absent: `[analytics] memory_mb`).
    pub memory_mb: Option<i64>,
    /// Runs whose results are kept.
    pub keep_runs: i64,
    /// Whether the schedule runs it.
    pub enabled: bool,
    /// Created, ms.
    pub created_at: i64,
    /// Changed, ms.
    pub updated_at: i64,
    /// When the schedule runs it next, ms.
    pub next_run_at: Option<i64>,
}

/// A job's settings as a request gives them.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Unique name: 1–64 letters, digits, `_`, `-`, `.`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    pub name: String,
    /// The SQL query over `history`, `devices`, `products`, `device_tags`.
    #[schema(min_length = 1, max_length = 65536)]
    pub query: String,
    /// Cron expression, UTC.
    #[serde(default)]
    #[schema(max_length = 256)]
    pub schedule: Option<String>,
    /// History window, s.
    #[serde(default, deserialize_with = "crate::serde_int::opt")]
    #[schema(minimum = 1, maximum = 315_360_000)]
    pub window_secs: Option<i64>,
    /// History rows a run may read.
    #[serde(default, deserialize_with = "crate::serde_int::opt")]
    #[schema(minimum = 1)]
    pub max_rows: Option<i64>,
    /// Longest a run may take, s.
    #[serde(default, deserialize_with = "crate::serde_int::opt")]
    #[schema(minimum = 1)]
    pub timeout_secs: Option<i64>,
    /// Worker address space, MiB.
    #[serde(default, deserialize_with = "crate::serde_int::opt")]
    #[schema(minimum = 256)]
    pub memory_mb: Option<i64>,
    /// Runs whose results are kept (default 10).
    #[serde(default, deserialize_with = "crate::serde_int::opt")]
    #[schema(minimum = 1, maximum = 1000)]
    pub keep_runs: Option<i64>,
    /// Whether the schedule runs it (default true).
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// One run of a job.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunInfo {
    /// Id.
    pub id: i64,
    /// The job's id.
    pub job_id: i64,
    /// `schedule` or `manual`.
    pub trigger: String,
    /// `running`, `succeeded` or `failed`.
    pub status: String,
    /// What the worker is doing.
    pub progress: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Started, ms.
    pub started_at: i64,
    /// Finished, ms.
    pub finished_at: Option<i64>,
    /// History window read, ms.
    pub window_from: Option<i64>,
    /// History window read, ms.
    pub window_to: Option<i64>,
    /// History rows read.
    pub history_rows: Option<i64>,
    /// Result rows.
    pub result_rows: Option<i64>,
    /// Result file size, bytes.
    pub result_bytes: Option<i64>,
    /// Result columns: `[name, type]`.
    pub columns: Option<Vec<(String, String)>>,
}

/// What went wrong with a job request.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Bad settings.
    #[error("{0}")]
    Invalid(String),
    /// The SQL query does not plan.
    #[error("SQL error at line {line}, column {column}: {message}")]
    Sql {
        /// polars' reason.
        message: String,
        /// Line, 1-based (0: unknown).
        line: u64,
        /// Column, 1-based (0: unknown).
        column: u64,
    },
    /// No such job or run.
    #[error("{0}")]
    NotFound(String),
    /// A job of that name exists.
    #[error("{0}")]
    Conflict(String),
    /// The database failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(e.into())
    }
}

/// The next time (ms) a cron schedule fires after `after` (ms).
pub fn next_fire(schedule: &str, after: i64) -> Result<Option<i64>, String> {
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(schedule)
        .map_err(|e| format!("schedule {schedule:?}: {e}"))?;
    let Some(at) = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(after) else {
        return Ok(None);
    };
    Ok(cron
        .find_next_occurrence(&at, false)
        .ok()
        .map(|t| t.timestamp_millis()))
}

/// A job's or monitor's name: 1–64 letters, digits, `_`, `-`, `.`.
fn check_name(name: &str) -> Result<(), JobError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(JobError::Invalid(
            "name: 1–64 letters, digits, '_', '-' or '.'".into(),
        ))
    }
}

async fn check_spec(s: &JobSpec) -> Result<(), JobError> {
    check_name(&s.name)?;
    if s.query.trim().is_empty() || s.query.len() > 65536 {
        return Err(JobError::Invalid("query: 1–65536 bytes of SQL".into()));
    }
    if let Some(c) = &s.schedule {
        if c.len() > 256 {
            return Err(JobError::Invalid("schedule: at most 256 bytes".into()));
        }
        if next_fire(c, now_ms())?.is_none() {
            return Err(JobError::Invalid(format!("schedule {c:?} never fires")));
        }
    }
    let positive = |v: Option<i64>, what: &str, min: i64, max: i64| match v {
        Some(x) if !(min..=max).contains(&x) => {
            Err(JobError::Invalid(format!("{what}: {min}..={max}")))
        }
        _ => Ok(()),
    };
    positive(s.window_secs, "window_secs", 1, 315_360_000)?;
    positive(s.max_rows, "max_rows", 1, i64::MAX)?;
    positive(s.timeout_secs, "timeout_secs", 1, i64::MAX)?;
    positive(s.memory_mb, "memory_mb", 256, i64::MAX)?;
    positive(s.keep_runs, "keep_runs", 1, 1000)?;
    // Planning runs polars' own blocking code: off the async threads.
    let query = s.query.clone();
    let checked = tokio::task::spawn_blocking(move || ironlink_analytics::jobs::check(&query))
        .await
        .map_err(|e| JobError::Invalid(format!("planning the query failed: {e}")))?;
    if let Err(e) = checked {
        return Err(JobError::Sql {
            message: e.message,
            line: e.line,
            column: e.column,
        });
    }
    Ok(())
}

impl From<String> for JobError {
    fn from(e: String) -> Self {
        Self::Invalid(e)
    }
}

const JOB_COLUMNS: &str = "id, name, query, schedule, window_secs, max_rows, timeout_secs, memory_mb, keep_runs, enabled, created_at, updated_at, last_slot";
const RUN_COLUMNS: &str = "id, job_id, trigger_kind, status, progress, error, started_at, finished_at, window_from, window_to, history_rows, result_rows, result_bytes, result_columns";

fn job_row(r: &sqlx::any::AnyRow) -> Result<(Job, Option<i64>), sqlx::Error> {
    let schedule: Option<String> = r.try_get(3)?;
    let last_slot: Option<i64> = r.try_get(12)?;
    let created_at: i64 = r.try_get(10)?;
    let enabled = r.try_get::<i64, _>(9)? != 0;
    let next_run_at = match (&schedule, enabled) {
        (Some(s), true) => next_fire(s, last_slot.unwrap_or(created_at).max(now_ms()))
            .ok()
            .flatten(),
        _ => None,
    };
    Ok((
        Job {
            id: r.try_get(0)?,
            name: r.try_get(1)?,
            query: r.try_get(2)?,
            schedule,
            window_secs: r.try_get(4)?,
            max_rows: r.try_get(5)?,
            timeout_secs: r.try_get(6)?,
            memory_mb: r.try_get(7)?,
            keep_runs: r.try_get(8)?,
            enabled,
            created_at,
            updated_at: r.try_get(11)?,
            next_run_at,
        },
        last_slot,
    ))
}

fn run_row(r: &sqlx::any::AnyRow) -> Result<RunInfo, sqlx::Error> {
    let columns: Option<String> = r.try_get(13)?;
    Ok(RunInfo {
        id: r.try_get(0)?,
        job_id: r.try_get(1)?,
        trigger: r.try_get(2)?,
        status: r.try_get(3)?,
        progress: r.try_get(4)?,
        error: r.try_get(5)?,
        started_at: r.try_get(6)?,
        finished_at: r.try_get(7)?,
        window_from: r.try_get(8)?,
        window_to: r.try_get(9)?,
        history_rows: r.try_get(10)?,
        result_rows: r.try_get(11)?,
        result_bytes: r.try_get(12)?,
        columns: columns.and_then(|c| serde_json::from_str(&c).ok()),
    })
}

/// The jobs service: store, scheduler and worker runs.
#[derive(Debug)]
pub struct Jobs {
    db: Db,
    config: AnalyticsConfig,
    database_url: String,
    timeseries: crate::tsdb::TimeseriesConfig,
    results: PathBuf,
    /// Runs in progress: their cancel signal.
    running: Mutex<HashMap<i64, (i64, Arc<Notify>)>>,
    slots: Arc<Semaphore>,
    /// The worker executable (`[analytics] worker`, else this program).
    worker: Mutex<Option<PathBuf>>,
}

/// The settings a worker process gets on its standard input (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// The database to read.
    pub database_url: String,
    /// The time-series store's settings (retention, archive directory).
    pub timeseries: crate::tsdb::TimeseriesConfig,
    /// The query.
    pub query: String,
    /// History window, ms.
    pub window: (i64, i64),
    /// History rows it may read.
    pub max_rows: u64,
    /// Result rows it may write.
    pub max_result_rows: u64,
    /// Address space, MiB.
    pub memory_mb: u64,
    /// Where the result goes.
    pub out: PathBuf,
}

impl Jobs {
    /// Opens the service: marks runs a previous process left unfinished as failed and removes
    /// result files no succeeded run names.
    pub async fn open(
        db: Db,
        config: AnalyticsConfig,
        database_url: String,
        timeseries: crate::tsdb::TimeseriesConfig,
        data_dir: &Path,
    ) -> Result<Arc<Self>, StorageError> {
        let results = data_dir.join("analytics").join("results");
        let now = now_ms();
        let n = sqlx::query("UPDATE analytics_runs SET status = 'failed', error = 'interrupted: the cloud stopped during the run', finished_at = $1 WHERE status = 'running'")
            .bind(now)
            .execute(&db.pool)
            .await?
            .rows_affected();
        if n > 0 {
            tracing::warn!(
                runs = n,
                "analytics runs interrupted by the last stop marked failed"
            );
        }
        let kept: std::collections::HashSet<String> =
            sqlx::query("SELECT result_path FROM analytics_runs WHERE status = 'succeeded' AND result_path IS NOT NULL")
                .fetch_all(&db.pool)
                .await?
                .iter()
                .filter_map(|r| r.try_get::<String, _>(0).ok())
                .collect();
        sweep(&results, &kept);
        let slots = Arc::new(Semaphore::new(config.max_concurrent_runs.max(1)));
        Ok(Arc::new(Self {
            db,
            database_url,
            timeseries,
            results,
            running: Mutex::default(),
            slots,
            worker: Mutex::new(config.worker.clone()),
            config,
        }))
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<i64, (i64, Arc<Notify>)>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a job (its query is planned first: an error names line and column).
    pub async fn create(&self, s: JobSpec) -> Result<Job, JobError> {
        check_spec(&s).await?;
        let now = now_ms();
        let r = sqlx::query("INSERT INTO analytics_jobs (name, query, schedule, window_secs, max_rows, timeout_secs, memory_mb, keep_runs, enabled, created_at, updated_at, last_slot) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $10) RETURNING id")
            .bind(&s.name)
            .bind(&s.query)
            .bind(&s.schedule)
            .bind(s.window_secs)
            .bind(s.max_rows)
            .bind(s.timeout_secs)
            .bind(s.memory_mb)
            .bind(s.keep_runs.unwrap_or(10))
            .bind(i64::from(s.enabled.unwrap_or(true)))
            .bind(now)
            .fetch_one(&self.db.pool)
            .await;
        let id: i64 = match r {
            Ok(r) => r.try_get(0)?,
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                return Err(JobError::Conflict(format!(
                    "a job named {:?} exists",
                    s.name
                )))
            }
            Err(e) => return Err(e.into()),
        };
        self.get(id).await
    }

    /// Replaces a job's settings.
    pub async fn update(&self, id: i64, s: JobSpec) -> Result<Job, JobError> {
        check_spec(&s).await?;
        let r = sqlx::query("UPDATE analytics_jobs SET name = $1, query = $2, schedule = $3, window_secs = $4, max_rows = $5, timeout_secs = $6, memory_mb = $7, keep_runs = $8, enabled = $9, updated_at = $10, last_slot = $10 WHERE id = $11")
            .bind(&s.name)
            .bind(&s.query)
            .bind(&s.schedule)
            .bind(s.window_secs)
            .bind(s.max_rows)
            .bind(s.timeout_secs)
            .bind(s.memory_mb)
            .bind(s.keep_runs.unwrap_or(10))
            .bind(i64::from(s.enabled.unwrap_or(true)))
            .bind(now_ms())
            .bind(id)
            .execute(&self.db.pool)
            .await;
        match r {
            Ok(r) if r.rows_affected() == 0 => {
                return Err(JobError::NotFound(format!("no analytics job {id}")))
            }
            Ok(_) => {}
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                return Err(JobError::Conflict(format!(
                    "a job named {:?} exists",
                    s.name
                )))
            }
            Err(e) => return Err(e.into()),
        }
        self.get(id).await
    }

    /// One job.
    pub async fn get(&self, id: i64) -> Result<Job, JobError> {
        let r = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM analytics_jobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.db.pool)
        .await?
        .ok_or_else(|| JobError::NotFound(format!("no analytics job {id}")))?;
        Ok(job_row(&r)?.0)
    }

    /// Every job, by id.
    pub async fn list(&self) -> Result<Vec<Job>, JobError> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM analytics_jobs ORDER BY id"
        ))
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| job_row(r).map(|j| j.0))
            .collect::<Result<_, _>>()?)
    }

    /// Deletes a job, stops its run and removes its results.
    pub async fn delete(&self, id: i64) -> Result<(), JobError> {
        let paths = self.result_paths(id).await?;
        let n = sqlx::query("DELETE FROM analytics_jobs WHERE id = $1")
            .bind(id)
            .execute(&self.db.pool)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(JobError::NotFound(format!("no analytics job {id}")));
        }
        for (_, (job, stop)) in self.running().iter() {
            if *job == id {
                stop.notify_one();
            }
        }
        for p in paths {
            let _ = std::fs::remove_file(self.results.join(p));
        }
        let _ = std::fs::remove_dir(self.results.join(format!("job-{id}")));
        Ok(())
    }

    async fn result_paths(&self, job: i64) -> Result<Vec<String>, sqlx::Error> {
        Ok(sqlx::query(
            "SELECT result_path FROM analytics_runs WHERE job_id = $1 AND result_path IS NOT NULL",
        )
        .bind(job)
        .fetch_all(&self.db.pool)
        .await?
        .iter()
        .filter_map(|r| r.try_get::<String, _>(0).ok())
        .collect())
    }

    /// A job's runs, newest first.
    pub async fn runs(&self, job: i64, limit: i64) -> Result<Vec<RunInfo>, JobError> {
        self.get(job).await?;
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM analytics_runs WHERE job_id = $1 ORDER BY id DESC LIMIT $2"
        ))
        .bind(job)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows.iter().map(run_row).collect::<Result<_, _>>()?)
    }

    /// One run.
    pub async fn run(&self, id: i64) -> Result<RunInfo, JobError> {
        let r = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM analytics_runs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.db.pool)
        .await?
        .ok_or_else(|| JobError::NotFound(format!("no analytics run {id}")))?;
        Ok(run_row(&r)?)
    }

    /// The result file of a succeeded run.
    pub async fn result_file(&self, run: i64) -> Result<PathBuf, JobError> {
        let r = sqlx::query("SELECT status, result_path FROM analytics_runs WHERE id = $1")
            .bind(run)
            .fetch_optional(&self.db.pool)
            .await?
            .ok_or_else(|| JobError::NotFound(format!("no analytics run {run}")))?;
        let status: String = r.try_get(0)?;
        match (status.as_str(), r.try_get::<Option<String>, _>(1)?) {
            ("succeeded", Some(p)) => Ok(self.results.join(p)),
            (s, _) => Err(JobError::NotFound(format!(
                "run {run} has no result (it is {s})"
            ))),
        }
    }

    /// Stops a running run.
    pub fn cancel(&self, run: i64) -> bool {
        match self.running().get(&run) {
            Some((_, stop)) => {
                stop.notify_one();
                true
            }
            None => false,
        }
    }

    /// Starts a run of a job now.
    pub async fn start(self: &Arc<Self>, job: i64, trigger: &str) -> Result<RunInfo, JobError> {
        let j = self.get(job).await?;
        let now = now_ms();
        let window = match j.window_secs {
            Some(s) => (now.saturating_sub(s.saturating_mul(1000)), now),
            None => (-MAX_MS, now),
        };
        let row = sqlx::query("INSERT INTO analytics_runs (job_id, trigger_kind, status, progress, started_at, window_from, window_to) VALUES ($1, $2, 'running', 'waiting for a worker slot', $3, $4, $5) RETURNING id")
            .bind(job)
            .bind(trigger)
            .bind(now)
            .bind(window.0)
            .bind(window.1)
            .fetch_one(&self.db.pool)
            .await?;
        let id: i64 = row.try_get(0)?;
        let stop = Arc::new(Notify::new());
        self.running().insert(id, (job, stop.clone()));
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = me.execute(&j, id, window, stop).await;
            me.running().remove(&id);
            if let Err(e) = me.finish(&j, id, outcome).await {
                tracing::error!(run = id, error = %e, "recording an analytics run's end failed");
            }
        });
        self.run(id).await
    }

    async fn progress(&self, run: i64, text: &str) {
        let _ = sqlx::query(
            "UPDATE analytics_runs SET progress = $1 WHERE id = $2 AND status = 'running'",
        )
        .bind(text)
        .bind(run)
        .execute(&self.db.pool)
        .await;
    }

    fn worker(&self) -> PathBuf {
        self.worker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from("ironlink-cloud"))
    }

    /// Replaces the worker executable for the runs that start from now on (`None`: this
    /// program). For embedding the cloud in another program, and tests.
    pub fn set_worker(&self, path: Option<PathBuf>) {
        *self.worker.lock().unwrap_or_else(|e| e.into_inner()) = path;
    }

    /// Runs the worker; Ok(summary) or Err(reason).
    async fn execute(
        &self,
        job: &Job,
        run: i64,
        window: (i64, i64),
        stop: Arc<Notify>,
    ) -> Result<(String, ironlink_analytics::jobs::Summary), String> {
        let _slot = tokio::select! {
            s = self.slots.clone().acquire_owned() => s.map_err(|_| "the cloud is stopping".to_owned())?,
            () = stop.notified() => return Err("cancelled".into()),
        };
        let cap = |v: Option<i64>, max: u64| -> u64 {
            v.and_then(|x| u64::try_from(x).ok())
                .unwrap_or(max)
                .min(max)
        };
        let memory_mb = cap(job.memory_mb, self.config.memory_mb);
        let timeout = Duration::from_secs(cap(job.timeout_secs, self.config.timeout.as_secs()));
        let rel = format!("job-{}/run-{run}.parquet", job.id);
        let spec = WorkerSpec {
            database_url: self.database_url.clone(),
            timeseries: self.timeseries.clone(),
            query: job.query.clone(),
            window,
            max_rows: cap(job.max_rows, self.config.max_rows),
            max_result_rows: self.config.max_result_rows,
            memory_mb,
            out: self.results.join(&rel),
        };
        let line = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
        self.progress(run, "starting the worker").await;
        let mut child = tokio::process::Command::new(self.worker())
            .arg("analytics-worker")
            // The address-space limit counts what glibc reserves, not what is used: up to
            // 64 MiB per malloc arena, one per thread by default. With few arenas the
            // worker's threads (runtime, SQLite connections, polars) fit a small limit, and
            // the limit bounds the data instead of failing the database open with EAGAIN.
            .env("MALLOC_ARENA_MAX", "2")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting the worker {}: {e}", self.worker().display()))?;
        // The worker exits when its standard input closes: with this process, even on kill -9.
        let mut stdin = child.stdin.take().ok_or("worker without stdin")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(|e| format!("writing to the worker: {e}"))?;
        let stdout = child.stdout.take().ok_or("worker without stdout")?;
        let stderr = child.stderr.take().ok_or("worker without stderr")?;
        let err_tail = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut tail = String::new();
            while let Ok(Some(l)) = lines.next_line().await {
                tracing::debug!(target: "ironlink_cloud::jobs::worker", "{l}");
                tail.push_str(&l);
                tail.push('\n');
                if tail.len() > 4096 {
                    let cut = tail.len() - 4096;
                    let cut = (cut..tail.len())
                        .find(|i| tail.is_char_boundary(*i))
                        .unwrap_or(tail.len());
                    tail.drain(..cut);
                }
            }
            tail
        });
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut done: Option<ironlink_analytics::jobs::Summary> = None;
        let mut failure: Option<String> = None;
        let talk = async {
            while let Ok(Some(l)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<worker::Report>(&l) else {
                    continue;
                };
                match v {
                    worker::Report::Progress(p) => self.progress(run, &p).await,
                    worker::Report::Done(s) => done = Some(s),
                    worker::Report::Error(e) => failure = Some(e),
                }
            }
        };
        let limit = tokio::time::sleep(timeout);
        tokio::pin!(limit);
        tokio::select! {
            () = talk => {}
            () = &mut limit => {
                let _ = child.kill().await;
                return Err(format!("ran longer than its time limit of {} s (timeout_secs / [analytics] timeout)", timeout.as_secs()));
            }
            () = stop.notified() => {
                let _ = child.kill().await;
                return Err("cancelled".into());
            }
        }
        drop(stdin);
        let status = child.wait().await.map_err(|e| e.to_string())?;
        let tail = err_tail.await.unwrap_or_default();
        match (done, failure) {
            (Some(s), _) if status.success() => Ok((rel, s)),
            (_, Some(e)) => Err(e),
            _ if tail.contains("memory allocation") || tail.contains("out of memory") => Err(format!(
                "exceeded its memory limit of {memory_mb} MiB (memory_mb / [analytics] memory_mb); narrow the query or raise the limit"
            )),
            _ => Err(format!(
                "the worker stopped ({status}): {}",
                tail.lines().last().unwrap_or("no message")
            )),
        }
    }

    async fn finish(
        &self,
        job: &Job,
        run: i64,
        outcome: Result<(String, ironlink_analytics::jobs::Summary), String>,
    ) -> Result<(), JobError> {
        let now = now_ms();
        match outcome {
            Ok((rel, s)) => {
                let columns = serde_json::to_string(&s.columns).unwrap_or_default();
                let n = sqlx::query("UPDATE analytics_runs SET status = 'succeeded', progress = 'done', finished_at = $1, history_rows = $2, result_rows = $3, result_bytes = $4, result_columns = $5, result_path = $6 WHERE id = $7")
                    .bind(now)
                    .bind(i64::try_from(s.history_rows).unwrap_or(i64::MAX))
                    .bind(i64::try_from(s.rows).unwrap_or(i64::MAX))
                    .bind(i64::try_from(s.bytes).unwrap_or(i64::MAX))
                    .bind(columns)
                    .bind(&rel)
                    .bind(run)
                    .execute(&self.db.pool)
                    .await?
                    .rows_affected();
                if n == 0 {
                    // The job was deleted meanwhile.
                    let _ = std::fs::remove_file(self.results.join(&rel));
                }
                tracing::info!(job = job.id, run, rows = s.rows, history_rows = s.history_rows, filters = ?s.filters, "analytics run succeeded");
                self.prune(job).await?;
            }
            Err(reason) => {
                tracing::warn!(job = job.id, run, reason = %reason, "analytics run failed");
                sqlx::query("UPDATE analytics_runs SET status = 'failed', error = $1, finished_at = $2 WHERE id = $3")
                    .bind(&reason)
                    .bind(now)
                    .bind(run)
                    .execute(&self.db.pool)
                    .await?;
                let _ = std::fs::remove_file(
                    self.results
                        .join(format!("job-{}/run-{run}.parquet.tmp", job.id)),
                );
            }
        }
        Ok(())
    }

    /// Removes runs beyond the job's `keep_runs`, with their results.
    async fn prune(&self, job: &Job) -> Result<(), JobError> {
        let old = sqlx::query("SELECT id, result_path FROM analytics_runs WHERE job_id = $1 AND status <> 'running' ORDER BY id DESC LIMIT -1 OFFSET $2")
            .bind(job.id)
            .bind(job.keep_runs);
        let old = match self.db.engine() {
            crate::storage::Engine::Sqlite => old.fetch_all(&self.db.pool).await?,
            crate::storage::Engine::Postgres => {
                sqlx::query("SELECT id, result_path FROM analytics_runs WHERE job_id = $1 AND status <> 'running' ORDER BY id DESC OFFSET $2")
                    .bind(job.id)
                    .bind(job.keep_runs)
                    .fetch_all(&self.db.pool)
                    .await?
            }
        };
        for r in old {
            let id: i64 = r.try_get(0)?;
            sqlx::query("DELETE FROM analytics_runs WHERE id = $1")
                .bind(id)
                .execute(&self.db.pool)
                .await?;
            if let Some(p) = r.try_get::<Option<String>, _>(1)? {
                let _ = std::fs::remove_file(self.results.join(p));
            }
        }
        Ok(())
    }

    /// Starts the runs whose schedule came due; returns how many.
    pub async fn tick(self: &Arc<Self>, now: i64) -> Result<usize, JobError> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM analytics_jobs WHERE enabled = 1 AND schedule IS NOT NULL"
        ))
        .fetch_all(&self.db.pool)
        .await?;
        let mut started = 0;
        for r in rows {
            let (job, last_slot) = job_row(&r)?;
            let Some(schedule) = &job.schedule else {
                continue;
            };
            let from = last_slot.unwrap_or(job.created_at);
            let Ok(Some(due)) = next_fire(schedule, from) else {
                continue;
            };
            if due > now {
                continue;
            }
            // The slot is taken before the run starts: a restart never runs it twice (missed
            // slots while the cloud was down are not caught up, one run stands for them).
            sqlx::query("UPDATE analytics_jobs SET last_slot = $1 WHERE id = $2")
                .bind(now)
                .bind(job.id)
                .execute(&self.db.pool)
                .await?;
            if self.running().values().any(|(j, _)| *j == job.id) {
                tracing::warn!(
                    job = job.id,
                    "analytics job still running; its scheduled slot is skipped"
                );
                continue;
            }
            self.start(job.id, "schedule").await?;
            started += 1;
        }
        Ok(started)
    }

    /// Stops every running worker.
    pub fn stop_all(&self) {
        for (_, stop) in self.running().values() {
            stop.notify_one();
        }
    }
}

/// Removes files under `dir` that are not in `kept` (paths relative to `dir`).
fn sweep(dir: &Path, kept: &std::collections::HashSet<String>) {
    let Ok(jobs) = std::fs::read_dir(dir) else {
        return;
    };
    for j in jobs.flatten() {
        let Ok(files) = std::fs::read_dir(j.path()) else {
            continue;
        };
        for f in files.flatten() {
            let rel = format!(
                "{}/{}",
                j.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            );
            if !kept.contains(&rel) {
                tracing::info!(file = %f.path().display(), "removing an analytics result no run holds");
                let _ = std::fs::remove_file(f.path());
            }
        }
        let _ = std::fs::remove_dir(j.path());
    }
}

/// The scheduler: looks at the schedules every second until `stop`.
pub async fn run(jobs: Arc<Jobs>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
        if let Err(e) = jobs.tick(now_ms()).await {
            tracing::warn!(error = %e, "analytics scheduler");
        }
    }
    jobs.stop_all();
}
