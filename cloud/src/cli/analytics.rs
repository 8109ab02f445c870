//! `ironlink-cloud analytics ...`: change points of a property's history and the diagnosis of
//! a measured PV IV curve (against a running server).

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
    }
    Ok(())
}
