//! `bench analytics`: Ironlink's analytics against the reference implementations in the same
//! run, on the same data.
//!
//! Change points: a Python with ruptures generates each signal (mean shift with
//! `rpt.pw_constant`, variance shift, continuous trend shift), times `rpt.Window(...).fit(x)
//! .predict(pen=...)` (best of 3) and writes the signal and its breakpoints; Ironlink's window
//! detection runs on the same file (best of 5, fitting the cost included) and must give the
//! same breakpoints.
//!
//! PV diagnosis: the service's model trained as the cloud trains it, then 1,200 held-out
//! simulated measurements (another seed, random layouts, noise and sensor errors): accuracy
//! per fault and time per curve.

use anyhow::{bail, Context, Result};
use ironlink_analytics::changepoint::{self, CostKind, Stop, Window};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of `bench analytics`.
#[derive(Debug, Clone)]
pub struct AnalyticsBench {
    /// Points per change-point signal.
    pub points: usize,
    /// A Python with ruptures.
    pub python: PathBuf,
}

/// One change-point case.
#[derive(Debug, Clone, Serialize)]
pub struct ChangepointCase {
    /// `l2`, `normal` or `clinear`.
    pub cost: String,
    /// `penalty P` or `count K`.
    pub stop: String,
    /// Points in the signal.
    pub points: usize,
    /// Window width.
    pub width: usize,
    /// Score every `jump`-th point.
    pub jump: usize,
    /// ruptures' best time, fit and predict.
    pub ruptures_ms: f64,
    /// Ironlink's best time, cost fitting included.
    pub ironlink_ms: f64,
    /// ruptures / Ironlink.
    pub speedup: f64,
    /// Breakpoints found.
    pub breakpoints: usize,
    /// Whether Ironlink's breakpoints equal ruptures'.
    pub identical: bool,
}

/// PV diagnosis.
#[derive(Debug, Clone, Serialize)]
pub struct PvResult {
    /// Seconds to simulate the training set and grow the forest.
    pub train_s: f64,
    /// Held-out curves (any layout of the trained range).
    pub curves: usize,
    /// Share named right.
    pub accuracy: f64,
    /// Per class: (name, share of its curves named right).
    pub per_class: Vec<(String, f64)>,
    /// Microseconds to diagnose one curve (correction, resampling, forest), single thread.
    pub us_per_curve: f64,
    /// Rows: the true class; columns: the class named (order of `per_class`).
    pub confusion: Vec<Vec<usize>>,
}

/// Pooled anomaly detection.
#[derive(Debug, Clone, Serialize)]
pub struct AnomalyResult {
    /// Series in the pooled model.
    pub series: usize,
    /// Seconds to train the one model on `series` × 2,000 points.
    pub train_s: f64,
    /// Points scored per second on one thread.
    pub points_per_s_one_thread: f64,
    /// Points scored per second on every core (series split across threads).
    pub points_per_s_all_cores: f64,
    /// Threads used for the all-core figure.
    pub threads: usize,
}

/// Results.
#[derive(Debug, Clone, Serialize)]
pub struct AnalyticsResult {
    /// Change points, case by case.
    pub changepoints: Vec<ChangepointCase>,
    /// PV diagnosis.
    pub pv: PvResult,
    /// Pooled anomaly detection.
    pub anomaly: AnomalyResult,
}

/// 200 series (sines and random walks with noise), one model trained on their first 2,000
/// points, then 20,000 points a series scored online.
fn anomaly_bench() -> Result<AnomalyResult> {
    use ironlink_analytics::anomaly::{Model, Normal, Scorer, Train};
    use rand::Rng;
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(11);
    let n = 22_000;
    let series: Vec<Vec<f64>> = (0..200)
        .map(|k| {
            let mut v = 100.0;
            (0..n)
                .map(|t| {
                    let e: f64 = rng.gen_range(-1.0..1.0);
                    if k % 2 == 0 {
                        20.0 + 5.0 * (t as f64 / 50.0).sin() + e
                    } else {
                        v += e;
                        v
                    }
                })
                .collect()
        })
        .collect();
    let t = Instant::now();
    let mut train: Vec<(Normal, &[f64])> = series
        .iter()
        .map(|s| (Normal::of(&s[..2000]), &s[..2000]))
        .collect();
    let model = Model::train(&mut train, Train::default())?;
    let train_s = t.elapsed().as_secs_f64();
    let score = |range: std::ops::Range<usize>| -> usize {
        let mut flagged = 0;
        for k in range {
            let mut sc = Scorer::new(train[k].0, 1);
            for v in &series[k][2000..] {
                if sc.push(&model, *v).is_some_and(|s| s.anomaly) {
                    flagged += 1;
                }
            }
        }
        flagged
    };
    let points = (series.len() * (n - 2000)) as f64;
    let t = Instant::now();
    std::hint::black_box(score(0..series.len()));
    let one = points / t.elapsed().as_secs_f64();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = series.len().div_ceil(threads);
    let count = series.len();
    let t = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let score = &score;
                s.spawn(move || score(i * per..((i + 1) * per).min(count)))
            })
            .collect();
        for h in handles {
            std::hint::black_box(h.join().unwrap_or(0));
        }
    });
    let all = points / t.elapsed().as_secs_f64();
    Ok(AnomalyResult {
        series: series.len(),
        train_s,
        points_per_s_one_thread: one,
        points_per_s_all_cores: all,
        threads,
    })
}

/// Trains the service's model (same sizes and seed) and scores held-out simulated curves.
fn pv_bench() -> Result<PvResult> {
    use ironlink_analytics::pv::{self, Fault};
    let module = pv::Module::default();
    let t = Instant::now();
    let model = pv::Diagnoser::train(module, pv::TRAIN_PER_CLASS, pv::TREES, 1)
        .map_err(anyhow::Error::msg)?;
    let train_s = t.elapsed().as_secs_f64();
    // Held out: 200 curves a class from another seed, each of a random layout.
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(4242);
    let mut right = [0usize; 6];
    let mut confusion = vec![vec![0usize; 6]; 6];
    let mut total = [0usize; 6];
    let mut spent = 0.0;
    for _ in 0..200 {
        for (k, fault) in Fault::ALL.iter().enumerate() {
            let modules = rand::Rng::gen_range(&mut rng, pv::LAYOUTS.0.clone());
            let strings = rand::Rng::gen_range(&mut rng, pv::LAYOUTS.1.clone());
            let array = pv::Array {
                module,
                modules,
                strings,
            };
            let curve = pv::measure(&array, *fault, &mut rng);
            let t = Instant::now();
            let d = model.diagnose(modules, strings, &curve)?;
            spent += t.elapsed().as_secs_f64();
            total[k] += 1;
            right[k] += usize::from(d.fault == *fault);
            if let Some(named) = Fault::ALL.iter().position(|f| *f == d.fault) {
                confusion[k][named] += 1;
            }
        }
    }
    let curves: usize = total.iter().sum();
    Ok(PvResult {
        train_s,
        curves,
        accuracy: right.iter().sum::<usize>() as f64 / curves as f64,
        per_class: Fault::ALL
            .iter()
            .enumerate()
            .map(|(k, f)| (f.name().to_string(), right[k] as f64 / total[k] as f64))
            .collect(),
        us_per_curve: spent / curves as f64 * 1e6,
        confusion,
    })
}

/// What the Python side wrote for one case.
#[derive(Debug, Deserialize)]
struct Reference {
    cost: String,
    points: usize,
    width: usize,
    jump: usize,
    penalty: Option<f64>,
    count: Option<usize>,
    file: String,
    seconds: f64,
    breakpoints: Vec<usize>,
}

const RUPTURES: &str = r#"
import json, sys, time
import numpy as np
import ruptures as rpt
out_dir, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(7)
def mean_shift():
    return rpt.pw_constant(n, 1, 10, noise_std=1.0, seed=1)[0][:, 0]
def variance_shift():
    cuts = np.sort(rng.choice(np.arange(n // 10, n - n // 10), 10, replace=False))
    out = np.empty(n)
    for i, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, n])):
        out[a:b] = rng.normal(5.0, rng.uniform(0.2, 4.0), b - a)
    return out
def trend_shift():
    cuts = np.sort(rng.choice(np.arange(n // 10, n - n // 10), 10, replace=False))
    out, level = np.empty(n), 100.0
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, n]):
        out[a:b] = level + rng.uniform(-0.5, 0.5) * np.arange(1, b - a + 1)
        level = out[b - 1]
    return out + rng.normal(0, 0.5, n)
cases = []
# A penalty where ruptures' greedy rule finds the changes; a count for clinear, whose first
# breakpoint can raise the total cost (the continuity anchor), so a penalty stops at once.
for cost, make, pen, count in (("l2", mean_shift, 6 * np.log(n), None), ("normal", variance_shift, 20.0, None),
                               ("clinear", trend_shift, None, 10)):
    x = make()
    for width, jump in ((100, 5), (100, 1)):
        best, bkps = None, None
        for _ in range(3):
            t = time.perf_counter()
            algo = rpt.Window(width=width, model=cost, jump=jump).fit(x)
            bkps = algo.predict(pen=float(pen)) if count is None else algo.predict(n_bkps=count)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        path = f"{out_dir}/{cost}-{width}-{jump}.f64"
        x.astype("<f8").tofile(path)
        cases.append({"cost": cost, "points": n, "width": width, "jump": jump, "penalty": None if pen is None else float(pen), "count": count,
                      "file": path, "seconds": best, "breakpoints": [int(b) for b in bkps]})
print(json.dumps(cases))
"#;

fn read_f64(path: &Path) -> Result<Vec<f64>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect())
}

/// Runs the benchmark.
pub fn run(o: &AnalyticsBench) -> Result<AnalyticsResult> {
    let dir = tempfile::tempdir()?;
    let out = std::process::Command::new(&o.python)
        .args(["-W", "ignore", "-c", RUPTURES])
        .arg(dir.path())
        .arg(o.points.to_string())
        .output()
        .with_context(|| format!("running {}", o.python.display()))?;
    if !out.status.success() {
        bail!(
            "the ruptures side failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let refs: Vec<Reference> = serde_json::from_slice(&out.stdout)?;
    let mut changepoints = Vec::new();
    for r in refs {
        let x = read_f64(Path::new(&r.file))?;
        let kind = CostKind::parse(&r.cost).context("unknown cost")?;
        let window = Window {
            width: r.width,
            jump: r.jump,
            min_size: 2,
        };
        let stop = match (r.penalty, r.count) {
            (Some(p), _) => Stop::Penalty(p),
            (None, Some(k)) => Stop::Breakpoints(k),
            (None, None) => bail!("a case without a penalty or a count"),
        };
        let mut best = f64::INFINITY;
        let mut bkps = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let cost = kind.fit(&x, 1)?;
            bkps = changepoint::detect(cost.as_ref(), window, stop)?.breakpoints;
            best = best.min(t.elapsed().as_secs_f64());
        }
        changepoints.push(ChangepointCase {
            stop: match stop {
                Stop::Penalty(p) => format!("pen {p:.1}"),
                Stop::Breakpoints(k) => format!("count {k}"),
                Stop::Epsilon(e) => format!("epsilon {e:.1}"),
            },
            cost: r.cost,
            points: r.points,
            width: r.width,
            jump: r.jump,
            ruptures_ms: r.seconds * 1e3,
            ironlink_ms: best * 1e3,
            speedup: r.seconds / best,
            breakpoints: bkps.len() - 1,
            identical: bkps == r.breakpoints,
        });
    }
    Ok(AnalyticsResult {
        changepoints,
        pv: pv_bench()?,
        anomaly: anomaly_bench()?,
    })
}

/// The report as a table.
pub fn table(r: &AnalyticsResult) -> String {
    let mut s = String::from(
        "change points (Window)           points  width jump  ruptures ms  ironlink ms  speedup  breakpoints  identical\n",
    );
    for c in &r.changepoints {
        s.push_str(&format!(
            "  {:<30} {:>6} {:>6} {:>4} {:>12.2} {:>12.3} {:>7.0}x {:>12} {:>10}\n",
            format!("{} ({})", c.cost, c.stop),
            c.points,
            c.width,
            c.jump,
            c.ruptures_ms,
            c.ironlink_ms,
            c.speedup,
            c.breakpoints,
            c.identical
        ));
    }
    s.push_str(&format!(
        "PV diagnosis: trained in {:.2} s; {} held-out curves, accuracy {:.1} %; {:.0} µs a curve\n",
        r.pv.train_s,
        r.pv.curves,
        r.pv.accuracy * 100.0,
        r.pv.us_per_curve
    ));
    for ((name, share), row) in r.pv.per_class.iter().zip(&r.pv.confusion) {
        s.push_str(&format!(
            "  {name:<28} {:>5.1} %   named as {row:?}\n",
            share * 100.0
        ));
    }
    s.push_str(&format!(
        "anomalies: one model for {} series trained in {:.2} s; scoring {:.2} M points/s on one thread, {:.2} M/s on {} threads\n",
        r.anomaly.series,
        r.anomaly.train_s,
        r.anomaly.points_per_s_one_thread / 1e6,
        r.anomaly.points_per_s_all_cores / 1e6,
        r.anomaly.threads
    ));
    s
}
