//! `ironlink-cloud timeseries ...`: aggregates, the value at a time, storage policies and
//! retention, and sealing on demand (against a running server). `device history` pages
//! through raw points.

use super::{output, Client};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};

/// `timeseries` actions.
#[derive(Debug, Subcommand)]
pub enum TimeseriesCmd {
    /// Aggregates of one property per interval (count, avg, min, max, sum, first, last).
    Aggregate {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// Property identifier.
        identifier: String,
        /// Bucket width: `1m`, `15m`, `1h`, `1d`, or ms.
        #[arg(long, default_value = "1h")]
        interval: String,
        /// From, ms since the Unix epoch (default: a day before `--to`).
        #[arg(long)]
        from: Option<i64>,
        /// To, ms (default: now).
        #[arg(long)]
        to: Option<i64>,
    },
    /// The stored value of one property at a time (the newest point at or before it).
    Value {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// Property identifier.
        identifier: String,
        /// The time, ms (default: now).
        #[arg(long)]
        at: Option<i64>,
    },
    /// Storage policies and retention of a product's properties.
    Policy {
        /// Policy action.
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Seal every unsealed point into compressed chunks now.
    Seal,
    /// Move chunks older than an age into Parquet archive files now.
    Archive {
        /// Age (`30d`, `12h`); default: the server's `[timeseries] archive_after`.
        #[arg(long)]
        older_than: Option<String>,
    },
    /// Parquet archive files, newest first.
    Archives {
        /// Only this product's files.
        #[arg(long)]
        product: Option<String>,
        /// Most files.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// Storage policy actions.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// A product's policies.
    List {
        /// Product key.
        product_key: String,
    },
    /// Set the policy of a property (`*`: the product's default).
    Set {
        /// Product key.
        product_key: String,
        /// Property identifier, or `*`.
        identifier: String,
        /// all, on-change, interval or none.
        #[arg(long, default_value = "all")]
        mode: String,
        /// on-change: smallest change of a number that is stored.
        #[arg(long, default_value_t = 0.0)]
        deadband: f64,
        /// interval: at most one point per this (`1m`, or ms).
        #[arg(long)]
        every: Option<String>,
        /// Retention (`30d`, or ms; `0` keeps forever); absent: inherited.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Remove the policy of a property.
    Delete {
        /// Product key.
        product_key: String,
        /// Property identifier, or `*`.
        identifier: String,
    },
}

pub(super) fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", urlencode(v))))
        .collect::<Vec<_>>()
        .join("&")
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Milliseconds from `1500` or `"1m"`.
fn millis(what: &str, text: &str) -> anyhow::Result<i64> {
    crate::tsdb::millis(text)
        .ok_or_else(|| anyhow::anyhow!("{what} `{text}`: use ms or a duration like 1m, 30s, 7d"))
}

/// Runs a `timeseries` action.
pub async fn run(c: &Client, cmd: TimeseriesCmd) -> anyhow::Result<()> {
    match cmd {
        TimeseriesCmd::Aggregate {
            product_key: pk,
            device_name: dn,
            identifier: id,
            interval,
            from,
            to,
        } => {
            let q = query_string(&[
                ("interval", Some(interval)),
                ("from", from.map(|f| f.to_string())),
                ("to", to.map(|t| t.to_string())),
            ]);
            let v = c
                .call(
                    Method::GET,
                    &format!("/devices/{pk}/{dn}/properties/{id}/aggregate?{q}"),
                    None,
                )
                .await?;
            warn_damaged(&v);
            output(
                c,
                &v,
                Some((
                    "buckets",
                    &["time", "count", "avg", "min", "max", "sum", "first", "last"],
                )),
            );
        }
        TimeseriesCmd::Value {
            product_key: pk,
            device_name: dn,
            identifier: id,
            at,
        } => {
            let q = query_string(&[("at", at.map(|a| a.to_string()))]);
            let v = c
                .call(
                    Method::GET,
                    &format!("/devices/{pk}/{dn}/properties/{id}/value?{q}"),
                    None,
                )
                .await?;
            output(c, &v, None);
        }
        TimeseriesCmd::Seal => {
            let v = c.call(Method::POST, "/timeseries/seal", None).await?;
            output(c, &v, None);
        }
        TimeseriesCmd::Archive { older_than } => {
            let older_than = match older_than {
                Some(o) => o,
                None => {
                    let v = c
                        .call(Method::GET, "/timeseries/archive?limit=1", None)
                        .await?;
                    match v["archive_after_ms"].as_u64() {
                        Some(ms) => ms.to_string(),
                        None => anyhow::bail!(
                            "the server has no [timeseries] archive_after: give --older-than"
                        ),
                    }
                }
            };
            let body = json!({ "older_than": older_than });
            let v = c
                .call(Method::POST, "/timeseries/archive", Some(body))
                .await?;
            output(c, &v, None);
        }
        TimeseriesCmd::Archives { product, limit } => {
            let q = query_string(&[("product_key", product), ("limit", Some(limit.to_string()))]);
            let v = c
                .call(Method::GET, &format!("/timeseries/archive?{q}"), None)
                .await?;
            output(
                c,
                &v,
                Some(("files", &["product_key", "day", "points", "bytes", "path"])),
            );
        }
        TimeseriesCmd::Policy { cmd } => match cmd {
            PolicyCmd::List { product_key } => {
                let v = c
                    .call(
                        Method::GET,
                        &format!("/products/{product_key}/storage-policies"),
                        None,
                    )
                    .await?;
                output(
                    c,
                    &v,
                    Some((
                        "policies",
                        &["identifier", "mode", "deadband", "interval_ms", "ttl_ms"],
                    )),
                );
            }
            PolicyCmd::Set {
                product_key,
                identifier,
                mode,
                deadband,
                every,
                ttl,
            } => {
                let mut body = match mode.as_str() {
                    "all" => json!({"mode": "all"}),
                    "none" => json!({"mode": "none"}),
                    "on-change" | "on_change" => json!({"mode": "on_change", "deadband": deadband}),
                    "interval" => {
                        let every = every.ok_or_else(|| {
                            anyhow::anyhow!("--mode interval needs --every (1m, or ms)")
                        })?;
                        json!({"mode": "interval", "interval_ms": millis("--every", &every)?})
                    }
                    other => {
                        anyhow::bail!("--mode `{other}`: use all, on-change, interval or none")
                    }
                };
                if let Some(t) = ttl {
                    body["ttl"] = Value::String(t);
                }
                let v = c
                    .call(
                        Method::PUT,
                        &format!(
                            "/products/{product_key}/storage-policies/{}",
                            urlencode(&identifier)
                        ),
                        Some(body),
                    )
                    .await?;
                output(c, &v, None);
            }
            PolicyCmd::Delete {
                product_key,
                identifier,
            } => {
                c.call(
                    Method::DELETE,
                    &format!(
                        "/products/{product_key}/storage-policies/{}",
                        urlencode(&identifier)
                    ),
                    None,
                )
                .await?;
                if !c.json {
                    println!("removed");
                }
            }
        },
    }
    Ok(())
}

/// Says on stderr which chunks a query skipped.
pub fn warn_damaged(v: &Value) {
    for d in v["damaged"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        eprintln!(
            "warning: chunk {} of series {} ({}..{}) skipped: {}",
            d["chunk"], d["series"], d["start"], d["end"], d["reason"]
        );
    }
}
