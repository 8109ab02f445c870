//! One report format for every benchmark: per target, the rate, latency p50/p99/max, RSS and
//! CPU of the server process, connections held, what was lost and what came twice; the ratio of
//! each Ironlink target to the baseline measured in the same run; a table for people and JSON
//! for machines.

use crate::cloud_process::{cpu_ticks, rss_kib};
use anyhow::Result;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashSet;
use std::hash::Hash;
use std::time::Instant;

/// One target's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetReport {
    /// `ironlink ...` or `mosquitto ...`.
    pub target: String,
    /// What should have arrived (messages, deliveries, property sets, connects).
    pub expected: u64,
    /// What arrived, each counted once.
    pub received: u64,
    /// Received per second.
    pub per_sec: f64,
    /// Latency percentiles, ms (what is timed depends on the benchmark; see its notes).
    pub p50_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
    /// max, ms.
    pub max_ms: f64,
    /// RSS of the server process at the end of the target's run, KiB.
    pub server_rss_kib: u64,
    /// CPU of the server process over the target's run, cores (CPU seconds / wall seconds).
    pub server_cpu_cores: f64,
    /// Client connections the server held during the run.
    pub connections: u64,
    /// Expected but never arrived.
    pub lost: u64,
    /// Arrived more than once (extra copies).
    pub duplicated: u64,
}

/// Ironlink target / baseline, on the rate.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// The Ironlink target.
    pub target: String,
    /// The baseline.
    pub baseline: String,
    /// target per_sec / baseline per_sec.
    pub per_sec: f64,
}

/// A benchmark's report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The benchmark (`apps`, `fanout`, ...).
    pub bench: String,
    /// What `per_sec` counts.
    pub unit: String,
    /// The parameters it ran with.
    pub params: Value,
    /// Per target, in the order they ran.
    pub targets: Vec<TargetReport>,
    /// Every Ironlink target against the baseline (a target named `mosquitto...`), if one ran.
    pub ratios: Vec<Ratio>,
    /// Figures particular to this benchmark.
    pub details: Value,
    /// How to read it.
    pub notes: Vec<String>,
}

impl Report {
    /// A report; the ratios are computed from the targets.
    pub fn new(
        bench: &str,
        unit: &str,
        params: Value,
        targets: Vec<TargetReport>,
        details: Value,
        notes: Vec<String>,
    ) -> Self {
        let ratios = match targets.iter().find(|t| t.target.starts_with("mosquitto")) {
            Some(b) => targets
                .iter()
                .filter(|t| !t.target.starts_with("mosquitto"))
                .map(|t| Ratio {
                    target: t.target.clone(),
                    baseline: b.target.clone(),
                    per_sec: t.per_sec / b.per_sec.max(1e-9),
                })
                .collect(),
            None => Vec::new(),
        };
        Self {
            bench: bench.into(),
            unit: unit.into(),
            params,
            targets,
            ratios,
            details,
            notes,
        }
    }

    /// A Markdown table, the ratios and the notes.
    pub fn table(&self) -> String {
        let mut s = format!(
            "bench {} {}\n\n| target | received/expected | {} | p50 ms | p99 ms | max ms | server RSS MiB | server CPU cores | connections | lost | dup |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
            self.bench, self.params, self.unit
        );
        for t in &self.targets {
            s.push_str(&format!(
                "| {} | {}/{} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {} | {} | {} |\n",
                t.target,
                t.received,
                t.expected,
                t.per_sec,
                t.p50_ms,
                t.p99_ms,
                t.max_ms,
                t.server_rss_kib as f64 / 1024.0,
                t.server_cpu_cores,
                t.connections,
                t.lost,
                t.duplicated
            ));
        }
        for r in &self.ratios {
            s.push_str(&format!(
                "\nratio {} / {}: {:.2}x",
                r.target, r.baseline, r.per_sec
            ));
        }
        if !self.ratios.is_empty() {
            s.push('\n');
        }
        if !self.details.is_null() {
            s.push_str(&format!("\ndetails: {}\n", self.details));
        }
        for n in &self.notes {
            s.push_str(&format!("\nnote: {n}"));
        }
        if !self.notes.is_empty() {
            s.push('\n');
        }
        s
    }
}

/// Runs a benchmark `n` times (each run measures Ironlink, then the baseline, so the targets
/// alternate) and keeps, per target, the run with the median rate; lost and duplicated are
/// summed over every run, so that one bad run is not hidden. The notes give every run's rate.
pub async fn repeat<F, Fut>(n: usize, mut run: F) -> Result<Report>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Report>>,
{
    let mut runs = Vec::new();
    for _ in 0..n.max(1) {
        runs.push(run().await?);
    }
    Ok(merge(runs))
}

/// See [`repeat`].
pub fn merge(mut runs: Vec<Report>) -> Report {
    if runs.len() < 2 {
        return runs.pop().unwrap_or_else(|| {
            Report::new("none", "", Value::Null, Vec::new(), Value::Null, Vec::new())
        });
    }
    let first = runs.remove(0);
    let n = runs.len() + 1;
    let mut targets = Vec::new();
    let mut notes = first.notes.clone();
    for t in &first.targets {
        let mut all: Vec<&TargetReport> = std::iter::once(t)
            .chain(
                runs.iter()
                    .filter_map(|r| r.targets.iter().find(|x| x.target == t.target)),
            )
            .collect();
        notes.push(format!(
            "{}: {} per run: {}",
            t.target,
            first.unit,
            all.iter()
                .map(|x| format!("{:.0}", x.per_sec))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let lost = all.iter().map(|x| x.lost).sum();
        let duplicated = all.iter().map(|x| x.duplicated).sum();
        all.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
        let mut median = all[all.len() / 2].clone();
        median.lost = lost;
        median.duplicated = duplicated;
        targets.push(median);
    }
    notes.push(format!(
        "median of {n} runs, targets alternating; lost and dup summed over all runs"
    ));
    Report::new(
        &first.bench,
        &first.unit,
        first.params,
        targets,
        first.details,
        notes,
    )
}

/// Samples a server process: CPU from the start, RSS at the end.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pid: u32,
    cpu0: u64,
    t0: Instant,
}

impl Probe {
    /// Starts measuring process `pid`.
    pub fn start(pid: u32) -> Result<Self> {
        Ok(Self {
            pid,
            cpu0: cpu_ticks(pid)?,
            t0: Instant::now(),
        })
    }

    /// (RSS KiB now, cores used since start).
    pub fn finish(&self) -> Result<(u64, f64)> {
        let ticks = cpu_ticks(self.pid)?.saturating_sub(self.cpu0);
        // USER_HZ is 100 on every Linux platform Ironlink targets.
        let cores = ticks as f64 / 100.0 / self.t0.elapsed().as_secs_f64().max(1e-9);
        Ok((rss_kib(self.pid)?, cores))
    }
}

/// (p50, p99, max) of latencies in ms; zeros when empty.
pub fn latencies(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    (
        crate::bench::percentile(&ms, 0.5),
        crate::bench::percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(0.0),
    )
}

/// (distinct, extra copies) among what arrived. Lost is `expected - distinct` when every
/// arrival is one of the expected ids.
pub fn tally<T: Eq + Hash>(ids: impl IntoIterator<Item = T>) -> (u64, u64) {
    let mut seen = HashSet::new();
    let mut dup = 0u64;
    for id in ids {
        if !seen.insert(id) {
            dup += 1;
        }
    }
    (seen.len() as u64, dup)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tally_counts_distinct_and_extra_copies() {
        assert_eq!(tally([1, 2, 2, 3, 3, 3]), (3, 3));
        assert_eq!(tally(Vec::<u64>::new()), (0, 0));
    }

    #[test]
    fn ratios_are_against_the_mosquitto_target() {
        let t = |name: &str, per_sec| TargetReport {
            target: name.into(),
            per_sec,
            ..TargetReport::default()
        };
        let r = Report::new(
            "x",
            "msgs/s",
            json!({}),
            vec![
                t("ironlink a", 50.0),
                t("ironlink b", 300.0),
                t("mosquitto", 100.0),
            ],
            Value::Null,
            vec![],
        );
        assert_eq!(r.ratios.len(), 2);
        assert!((r.ratios[0].per_sec - 0.5).abs() < 1e-9);
        assert!((r.ratios[1].per_sec - 3.0).abs() < 1e-9);
        assert!(r.table().contains("ratio ironlink b / mosquitto: 3.00x"));
        let alone = Report::new(
            "x",
            "msgs/s",
            json!({}),
            vec![t("ironlink", 1.0)],
            Value::Null,
            vec![],
        );
        assert!(alone.ratios.is_empty());
    }

    #[test]
    fn repeated_runs_keep_the_median_and_sum_losses() {
        let run = |a: f64, b: f64, lost: u64| {
            Report::new(
                "x",
                "msgs/s",
                json!({}),
                vec![
                    TargetReport {
                        target: "ironlink".into(),
                        per_sec: a,
                        lost,
                        ..TargetReport::default()
                    },
                    TargetReport {
                        target: "mosquitto".into(),
                        per_sec: b,
                        ..TargetReport::default()
                    },
                ],
                Value::Null,
                vec![],
            )
        };
        let m = merge(vec![
            run(10.0, 100.0, 0),
            run(30.0, 50.0, 2),
            run(20.0, 200.0, 1),
        ]);
        assert_eq!(m.targets[0].per_sec, 20.0);
        assert_eq!(m.targets[0].lost, 3);
        assert_eq!(m.targets[1].per_sec, 100.0);
        assert!((m.ratios[0].per_sec - 0.2).abs() < 1e-9);
        assert!(m
            .notes
            .iter()
            .any(|n| n == "ironlink: msgs/s per run: 10, 30, 20"));
        assert_eq!(merge(vec![run(1.0, 2.0, 0)]).targets[0].per_sec, 1.0);
    }

    #[test]
    fn latencies_of_nothing_are_zero() {
        assert_eq!(latencies(vec![]), (0.0, 0.0, 0.0));
        assert_eq!(latencies(vec![3.0, 1.0, 2.0]), (2.0, 3.0, 3.0));
    }
}
