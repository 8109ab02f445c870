//! `ironlink-cloud analytics-worker`: one run of an analytics job, in a process of its own.
//!
//! Reads a [`WorkerSpec`] (one JSON line) on standard input, limits its own address space,
//! reads the database, runs the query and writes the result; reports on standard output, one
//! JSON line each: `{"progress": "..."}`, then `{"done": {...}}` or `{"error": "..."}`. It exits
//! as soon as its standard input closes (the cloud stopped or was killed).

use super::WorkerSpec;
use crate::storage::Db;
use crate::tsdb::{codec, Tsdb};
use ironlink_analytics::jobs::{self, DeviceRow, Dimensions, Filter, HistoryRows, HistorySource};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;
use std::io::{BufRead, Write};
use std::sync::Arc;

/// One line of a worker's report.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// What it is doing.
    Progress(String),
    /// Finished: the result's summary.
    Done(jobs::Summary),
    /// Failed: why.
    Error(String),
}

fn say(r: &Report) {
    if let Ok(line) = serde_json::to_string(r) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Limits the address space of this process to `mb` MiB: an allocation beyond it fails, and
/// the process aborts with "memory allocation ... failed" (which the cloud reports).
fn limit_memory(mb: u64) -> Result<(), String> {
    ironlink_telemetry::os::limit_address_space(mb.saturating_mul(1024 * 1024))
        .map_err(|e| format!("setting the memory limit: {e}"))
}

/// The worker's main: returns the process exit code.
pub async fn main() -> std::process::ExitCode {
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() || line.trim().is_empty() {
        say(&Report::Error("no job on standard input".into()));
        return std::process::ExitCode::FAILURE;
    }
    let spec: WorkerSpec = match serde_json::from_str(&line) {
        Ok(s) => s,
        Err(e) => {
            say(&Report::Error(format!("bad job spec: {e}")));
            return std::process::ExitCode::FAILURE;
        }
    };
    // The cloud holds our standard input: when it closes, the cloud is gone, and so are we.
    std::thread::spawn(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .lock()
            .read_line(&mut sink)
            .is_ok_and(|n| n > 0)
        {
            sink.clear();
        }
        std::process::exit(75);
    });
    match work(spec).await {
        Ok(summary) => {
            say(&Report::Done(summary));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            say(&Report::Error(e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn work(spec: WorkerSpec) -> Result<jobs::Summary, String> {
    limit_memory(spec.memory_mb)?;
    say(&Report::Progress("opening the database".into()));
    let db = Db::connect(&spec.database_url)
        .await
        .map_err(|e| format!("opening the database: {e}"))?;
    let dims = dimensions(&db)
        .await
        .map_err(|e| format!("reading products and devices: {e}"))?;
    let tsdb = Tsdb::reader(db, spec.timeseries.clone())
        .await
        .map_err(|e| format!("opening the time-series store: {e}"))?;
    let source = Arc::new(Store {
        tsdb,
        handle: tokio::runtime::Handle::current(),
    });
    say(&Report::Progress(format!(
        "read {} products and {} devices; planning",
        dims.products.len(),
        dims.devices.len()
    )));
    tokio::task::spawn_blocking(move || {
        let run = jobs::Run {
            sql: &spec.query,
            window: spec.window,
            max_rows: usize::try_from(spec.max_rows).unwrap_or(usize::MAX),
            max_result_rows: usize::try_from(spec.max_result_rows).unwrap_or(usize::MAX),
        };
        jobs::execute(&run, &dims, source, &spec.out, &|p| {
            say(&Report::Progress(p.to_owned()))
        })
        .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("the job panicked: {e}"))?
}

async fn dimensions(db: &Db) -> Result<Dimensions, sqlx::Error> {
    let products = sqlx::query(
        "SELECT product_key, name, node_type, data_format, description FROM products ORDER BY product_key",
    )
    .fetch_all(&db.pool)
    .await?
    .iter()
    .map(|r| {
        Ok([
            r.try_get(0)?,
            r.try_get(1)?,
            r.try_get(2)?,
            r.try_get(3)?,
            r.try_get(4)?,
        ])
    })
    .collect::<Result<Vec<[String; 5]>, sqlx::Error>>()?;
    let devices = sqlx::query("SELECT product_key, device_name, status, enabled, created_at, last_online_at, tags FROM devices ORDER BY product_key, device_name")
        .fetch_all(&db.pool)
        .await?
        .iter()
        .map(|r| {
            let tags: String = r.try_get(6)?;
            let tags = match serde_json::from_str::<Value>(&tags) {
                Ok(Value::Object(m)) => m
                    .into_iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Value::String(s) => s,
                            v => v.to_string(),
                        };
                        (k, v)
                    })
                    .collect(),
                _ => Vec::new(),
            };
            Ok(DeviceRow {
                product_key: r.try_get(0)?,
                device_name: r.try_get(1)?,
                status: r.try_get(2)?,
                enabled: r.try_get::<i64, _>(3)? != 0,
                created_at: r.try_get(4)?,
                last_online_at: r.try_get(5)?,
                tags,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Dimensions { products, devices })
}

/// Points per page read from the store.
const PAGE: usize = 65_536;

/// The time-series store as a job's `history`.
struct Store {
    tsdb: Arc<Tsdb>,
    handle: tokio::runtime::Handle,
}

impl HistorySource for Store {
    fn load(&self, filter: &Filter, max_rows: usize) -> Result<HistoryRows, String> {
        self.handle.block_on(self.read(filter, max_rows))
    }
}

impl Store {
    async fn read(&self, f: &Filter, max_rows: usize) -> Result<HistoryRows, String> {
        let series = self
            .tsdb
            .all_series()
            .await
            .map_err(|e| format!("listing series: {e}"))?;
        let mut out = HistoryRows::default();
        for (pk, dn, id) in series.iter().filter(|(pk, dn, id)| {
            Filter::admits(&f.products, pk)
                && Filter::admits(&f.devices, dn)
                && Filter::admits(&f.identifiers, id)
        }) {
            let mut cursor = None;
            loop {
                let page = self
                    .tsdb
                    .range(pk, dn, id, f.from, f.to, PAGE, true, cursor)
                    .await
                    .map_err(|e| format!("reading {pk}/{dn}/{id}: {e}"))?;
                for d in &page.damaged {
                    say(&Report::Progress(format!(
                        "skipped damaged data of {pk}/{dn}/{id} ({} .. {} ms): {}",
                        d.start, d.end, d.reason
                    )));
                }
                if out.len() + page.points.len() > max_rows {
                    return Err(format!(
                        "the job would read more than {max_rows} history rows (max_rows); narrow it with window_secs or a WHERE on ts, product_key, device_name or identifier"
                    ));
                }
                for (ts, v) in &page.points {
                    let text = match v {
                        Value::Number(_) | Value::Bool(_) => None,
                        Value::String(s) => Some(s.clone()),
                        v => Some(v.to_string()),
                    };
                    out.push((pk, dn, id), *ts, codec::numeric(v), text);
                }
                match page.next {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
        }
        Ok(out)
    }
}
