//! `ironlink-cloud analytics ...`: change points of a property's history, the diagnosis of a
//! measured PV IV curve, and analytics jobs (against a running server).

use super::timeseries::query_string;
use super::{output, Client};
use anyhow::Context;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};
use std::path::PathBuf;

/// `analytics` actions.
#[derive(Debug, Subcommand)]
pub enum AnalyticsCmd {
    /// Change points of one property's stored history (sliding window, as ruptures' Window).
    Changepoints {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// Property identifier.
        identifier: String,
        /// From, ms since the Unix epoch (default: a day before `--to`).
        #[arg(long)]
        from: Option<i64>,
        /// To, ms (default: now).
        #[arg(long)]
        to: Option<i64>,
        /// `l2` (mean shift), `normal` (mean and variance) or `clinear` (trend).
        #[arg(long)]
        cost: Option<String>,
        /// Points in the window (two halves).
        #[arg(long)]
        width: Option<u32>,
        /// Score every `jump`-th point.
        #[arg(long)]
        jump: Option<u32>,
        /// Keep a change while it lowers the total cost by more than this (default: BIC-like).
        #[arg(long, conflicts_with = "breakpoints")]
        penalty: Option<f64>,
        /// At most this many changes instead of a penalty.
        #[arg(long)]
        breakpoints: Option<u32>,
    },
    /// The fault a measured PV IV curve shows (file: `voltage,current` lines; a header line
    /// and `#` comments are skipped).
    PvDiagnose {
        /// The curve, CSV.
        file: PathBuf,
        /// Plane-of-array irradiance during the sweep, W/m².
        #[arg(long)]
        irradiance: f64,
        /// Cell temperature during the sweep, °C.
        #[arg(long)]
        temperature: f64,
        /// Modules in series in each string.
        #[arg(long)]
        modules: u32,
        /// Strings in parallel.
        #[arg(long)]
        strings: u32,
    },
    /// Anomaly monitors: a pooled model over a product's numeric properties, scoring every
    /// posted value; anomalies become the devices' `anomaly` events.
    Monitor {
        /// Monitor action.
        #[command(subcommand)]
        cmd: MonitorCmd,
    },
    /// Analytics jobs: SQL over history, products, devices and device_tags.
    Job {
        /// Job action.
        #[command(subcommand)]
        cmd: JobCmd,
    },
}

/// `analytics monitor` actions.
#[derive(Debug, Subcommand)]
pub enum MonitorCmd {
    /// Every monitor with its state and alarm count.
    List,
    /// One monitor.
    Show {
        /// Monitor id.
        id: i64,
    },
    /// Watch properties of a product's devices (trained on their history at once).
    Create {
        /// Unique name.
        name: String,
        /// Product key.
        product_key: String,
        /// Numeric properties, comma-separated.
        #[arg(value_delimiter = ',')]
        identifiers: Vec<String>,
        /// Share of normal points flagged: 0.01 (default), 0.03 or 0.05.
        #[arg(long)]
        sensitivity: Option<f64>,
        /// Days of history trained on (default 7).
        #[arg(long)]
        train_days: Option<i64>,
        /// Retraining schedule, cron (UTC; default daily at 03:00).
        #[arg(long)]
        retrain: Option<String>,
    },
    /// Retrain now.
    Train {
        /// Monitor id.
        id: i64,
    },
    /// Stop watching.
    Delete {
        /// Monitor id.
        id: i64,
    },
}

async fn monitor(c: &Client, cmd: MonitorCmd) -> anyhow::Result<()> {
    const COLS: &[&str] = &[
        "id",
        "name",
        "product_key",
        "state",
        "series",
        "alarms",
        "trained_at",
    ];
    match cmd {
        MonitorCmd::List => {
            let v = c
                .call(Method::GET, "/analytics/anomaly/monitors", None)
                .await?;
            table_or_json(c, v, "monitors", COLS);
        }
        MonitorCmd::Show { id } => {
            c.record(
                Method::GET,
                &format!("/analytics/anomaly/monitors/{id}"),
                None,
            )
            .await?;
        }
        MonitorCmd::Create {
            name,
            product_key,
            identifiers,
            sensitivity,
            train_days,
            retrain,
        } => {
            let body = json!({"name": name, "product_key": product_key, "identifiers": identifiers,
                "sensitivity": sensitivity, "train_days": train_days, "retrain": retrain});
            c.record(Method::POST, "/analytics/anomaly/monitors", Some(body))
                .await?;
        }
        MonitorCmd::Train { id } => {
            c.record(
                Method::POST,
                &format!("/analytics/anomaly/monitors/{id}/train"),
                Some(json!({})),
            )
            .await?;
        }
        MonitorCmd::Delete { id } => {
            c.call(
                Method::DELETE,
                &format!("/analytics/anomaly/monitors/{id}"),
                None,
            )
            .await?;
            if !c.json {
                eprintln!("deleted monitor {id}");
            }
        }
    }
    Ok(())
}

/// A job's settings on the command line.
#[derive(Debug, clap::Args)]
pub struct JobArgs {
    /// Unique name.
    name: String,
    /// The SQL query.
    #[arg(
        long,
        conflicts_with = "sql_file",
        required_unless_present = "sql_file"
    )]
    sql: Option<String>,
    /// The SQL query, from a file.
    #[arg(long)]
    sql_file: Option<PathBuf>,
    /// Cron expression, UTC (5 fields, or 6 with seconds first): runs on its own.
    #[arg(long)]
    schedule: Option<String>,
    /// Read only the last this many seconds of history.
    #[arg(long)]
    window: Option<i64>,
    /// History rows a run may read.
    #[arg(long)]
    max_rows: Option<i64>,
    /// Longest a run may take, seconds.
    #[arg(long)]
    timeout: Option<i64>,
    /// Worker address space, MiB.
    #[arg(long)]
    memory_mb: Option<i64>,
    /// Runs whose results are kept.
    #[arg(long)]
    keep_runs: Option<i64>,
    /// Not run by the schedule.
    #[arg(long)]
    disabled: bool,
}

impl JobArgs {
    fn body(self) -> anyhow::Result<Value> {
        let query = match (self.sql, self.sql_file) {
            (Some(q), _) => q,
            (None, Some(f)) => {
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?
            }
            (None, None) => anyhow::bail!("--sql or --sql-file"),
        };
        Ok(
            json!({"name": self.name, "query": query, "schedule": self.schedule,
            "window_secs": self.window, "max_rows": self.max_rows, "timeout_secs": self.timeout,
            "memory_mb": self.memory_mb, "keep_runs": self.keep_runs, "enabled": !self.disabled}),
        )
    }
}

/// `analytics job` actions.
#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Every job with its next scheduled run.
    List,
    /// One job.
    Show {
        /// Job id.
        id: i64,
    },
    /// Create a job (its SQL is checked first: an error says line and column).
    Create(JobArgs),
    /// Replace a job's settings.
    Update {
        /// Job id.
        id: i64,
        /// The settings.
        #[command(flatten)]
        args: JobArgs,
    },
    /// Delete a job with its runs and results.
    Delete {
        /// Job id.
        id: i64,
    },
    /// Run a job now.
    Run {
        /// Job id.
        id: i64,
        /// Wait for the run to end (exit status 1 when it fails).
        #[arg(long)]
        wait: bool,
    },
    /// A job's runs, newest first.
    Runs {
        /// Job id.
        id: i64,
    },
    /// Stop a running run.
    Cancel {
        /// Run id.
        run: i64,
    },
    /// A succeeded run's result: a table (first rows), or the whole of it as CSV or Parquet.
    Result {
        /// Run id.
        run: i64,
        /// `table` (default), `csv` or `parquet`.
        #[arg(long, default_value = "table")]
        format: String,
        /// Write to this file (parquet needs one; csv goes to standard output without).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Rows shown (table).
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
}

const RUN_COLUMNS: &[&str] = &[
    "id",
    "trigger",
    "status",
    "started_at",
    "history_rows",
    "result_rows",
    "error",
];

/// A list answer: the array as it is under `--json`, else a table.
fn table_or_json(c: &Client, v: Value, key: &str, cols: &[&str]) {
    if c.json {
        output(c, &v, None);
    } else {
        output(c, &json!({ key: v }), Some((key, cols)));
    }
}

async fn job(c: &Client, cmd: JobCmd) -> anyhow::Result<()> {
    match cmd {
        JobCmd::List => {
            let v = c.call(Method::GET, "/analytics/jobs", None).await?;
            table_or_json(
                c,
                v,
                "jobs",
                &["id", "name", "schedule", "enabled", "next_run_at"],
            );
        }
        JobCmd::Show { id } => {
            c.record(Method::GET, &format!("/analytics/jobs/{id}"), None)
                .await?
        }
        JobCmd::Create(args) => {
            c.record(Method::POST, "/analytics/jobs", Some(args.body()?))
                .await?;
        }
        JobCmd::Update { id, args } => {
            c.record(
                Method::PUT,
                &format!("/analytics/jobs/{id}"),
                Some(args.body()?),
            )
            .await?;
        }
        JobCmd::Delete { id } => {
            c.call(Method::DELETE, &format!("/analytics/jobs/{id}"), None)
                .await?;
            if !c.json {
                eprintln!("deleted job {id}");
            }
        }
        JobCmd::Run { id, wait } => {
            let mut v = c
                .call(
                    Method::POST,
                    &format!("/analytics/jobs/{id}/runs"),
                    Some(json!({})),
                )
                .await?;
            if wait {
                let run = v["id"].as_i64().unwrap_or_default();
                let mut said = String::new();
                while v["status"] == "running" {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    v = c
                        .call(Method::GET, &format!("/analytics/runs/{run}"), None)
                        .await?;
                    let p = v["progress"].as_str().unwrap_or_default();
                    if !c.json && p != said {
                        eprintln!("{p}");
                        said = p.to_owned();
                    }
                }
            }
            output(c, &v, None);
            if wait && v["status"] != "succeeded" {
                anyhow::bail!(
                    "run {} failed: {}",
                    v["id"],
                    v["error"].as_str().unwrap_or("?")
                );
            }
        }
        JobCmd::Runs { id } => {
            let v = c
                .call(Method::GET, &format!("/analytics/jobs/{id}/runs"), None)
                .await?;
            table_or_json(c, v, "runs", RUN_COLUMNS);
        }
        JobCmd::Cancel { run } => {
            c.call(
                Method::POST,
                &format!("/analytics/runs/{run}/cancel"),
                Some(json!({})),
            )
            .await?;
            if !c.json {
                eprintln!("run {run} stopping");
            }
        }
        JobCmd::Result {
            run,
            format,
            output: file,
            limit,
        } => match format.as_str() {
            "table" => {
                let v = c
                    .call(
                        Method::GET,
                        &format!(
                            "/analytics/runs/{run}/result?limit={}",
                            limit.clamp(1, 100_000)
                        ),
                        None,
                    )
                    .await?;
                if c.json {
                    output(c, &v, None);
                } else {
                    let cols: Vec<String> = v["columns"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|x| x.as_str().unwrap_or("").to_owned())
                                .collect()
                        })
                        .unwrap_or_default();
                    let rows: Vec<Value> = v["rows"]
                        .as_array()
                        .map(|rows| {
                            rows.iter()
                                .map(|r| {
                                    Value::Object(
                                        cols.iter()
                                            .cloned()
                                            .zip(r.as_array().cloned().unwrap_or_default())
                                            .collect(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let names: Vec<&str> = cols.iter().map(String::as_str).collect();
                    super::print_table(&rows, &names);
                    eprintln!("{} of {} rows", rows.len(), v["total"]);
                }
            }
            "csv" | "parquet" => {
                let url = format!(
                    "{}/api/v1/analytics/runs/{run}/result?format={format}",
                    c.url
                );
                let resp = c
                    .http
                    .get(&url)
                    .bearer_auth(&c.token)
                    .send()
                    .await
                    .with_context(|| format!("cannot reach {url}"))?;
                let status = resp.status();
                let bytes = resp.bytes().await?;
                if !status.is_success() {
                    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    anyhow::bail!("{} ({})", v["message"].as_str().unwrap_or("failed"), status);
                }
                match file {
                    Some(f) => {
                        std::fs::write(&f, &bytes)
                            .with_context(|| format!("writing {}", f.display()))?;
                        if !c.json {
                            eprintln!("wrote {} bytes to {}", bytes.len(), f.display());
                        }
                    }
                    None if format == "csv" => {
                        use std::io::Write;
                        std::io::stdout().write_all(&bytes)?;
                    }
                    None => anyhow::bail!("--output FILE for parquet"),
                }
            }
            f => anyhow::bail!("--format {f}: table, csv or parquet"),
        },
    }
    Ok(())
}

/// The points of a `voltage,current` CSV.
fn read_curve(path: &PathBuf) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut points = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut cells = line.split([',', ';', '\t']).map(str::trim);
        let (v, i) = (cells.next().unwrap_or(""), cells.next().unwrap_or(""));
        match (v.parse::<f64>(), i.parse::<f64>()) {
            (Ok(v), Ok(i)) => points.push(json!({"v": v, "i": i})),
            _ if points.is_empty() && n == 0 => {} // a header
            _ => anyhow::bail!(
                "{} line {}: `{line}` is not `voltage,current`",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(points)
}

/// Runs an `analytics` action.
pub async fn run(c: &Client, cmd: AnalyticsCmd) -> anyhow::Result<()> {
    match cmd {
        AnalyticsCmd::Changepoints {
            product_key: pk,
            device_name: dn,
            identifier: id,
            from,
            to,
            cost,
            width,
            jump,
            penalty,
            breakpoints,
        } => {
            let q = query_string(&[
                ("from", from.map(|v| v.to_string())),
                ("to", to.map(|v| v.to_string())),
                ("cost", cost),
                ("width", width.map(|v| v.to_string())),
                ("jump", jump.map(|v| v.to_string())),
                ("penalty", penalty.map(|v| v.to_string())),
                ("breakpoints", breakpoints.map(|v| v.to_string())),
            ]);
            let v = c
                .call(
                    Method::GET,
                    &format!("/devices/{pk}/{dn}/properties/{id}/changepoints?{q}"),
                    None,
                )
                .await?;
            if !c.json {
                eprintln!(
                    "{} points, {} changes",
                    v["points"],
                    v["changes"].as_array().map_or(0, Vec::len)
                );
            }
            output(c, &v, Some(("segments", &["from", "to", "points", "mean"])));
        }
        AnalyticsCmd::PvDiagnose {
            file,
            irradiance,
            temperature,
            modules,
            strings,
        } => {
            let points = read_curve(&file)?;
            let body = json!({"irradiance": irradiance, "temperature": temperature,
                "modules": modules, "strings": strings, "points": points});
            let v = c
                .call(Method::POST, "/analytics/pv/diagnose", Some(body))
                .await?;
            output(c, &v, None);
        }
        AnalyticsCmd::Job { cmd } => job(c, cmd).await?,
        AnalyticsCmd::Monitor { cmd } => monitor(c, cmd).await?,
    }
    Ok(())
}
