//! Pooled point-anomaly detection (the white paper's 点级别异常检测, in its spirit): ONE model
//! shared by many series instead of one model each.
//!
//! - Each series is normalised by its own robust centre and scale (median, MAD) and, when it is
//!   not stationary (a trend or a random walk), differenced once; the model learns one-step
//!   forecasts of the normalised series from its last `lags` values, pooled over every series
//!   (ridge regression, linfa-elasticnet).
//! - Prediction intervals come from the pooled residuals' empirical quantiles at the
//!   sensitivity levels 1 %, 3 % and 5 % (low, medium, high sensitivity: about that share of
//!   ordinary points falls outside).
//! - Online scoring keeps each series' last lags. A point outside the interval is an anomaly and
//!   its forecast, not its value, enters the lags: a spike does not drag the next forecasts, so
//!   the quick recovery after it is not flagged (the white paper's suppression of recoveries).
//!   After `shift_after` anomalies in a row the series has moved to a new level: the lags are
//!   re-anchored on the values and the alarm stops (reported once as a level shift).
//!
//! Missing points (NaN) are skipped: they neither score nor enter the lags.

use linfa::prelude::*;
use linfa_elasticnet::ElasticNet;
use ndarray::{Array1, Array2};
use std::collections::VecDeque;
use std::fmt;

/// The sensitivity levels: the share of ordinary points expected outside the interval.
pub const LEVELS: [f64; 3] = [0.01, 0.03, 0.05];

/// Why a model could not be trained.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// Fewer training rows than the model needs.
    TooLittleData { rows: usize, need: usize },
    /// Parameters out of range.
    Parameter(String),
    /// The regression failed.
    Fit(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooLittleData { rows, need } => write!(
                f,
                "{rows} training windows: at least {need} are needed (longer or more series)"
            ),
            Error::Parameter(p) => f.write_str(p),
            Error::Fit(e) => write!(f, "training failed: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// How a series is normalised.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normal {
    /// Robust centre (median of the values).
    pub center: f64,
    /// Robust scale of what the model sees, the values or their differences (1.4826 × MAD;
    /// the standard deviation when the MAD is 0; 1 when both are).
    pub scale: f64,
    /// Whether the model sees first differences.
    pub differenced: bool,
    /// Spread of this series' forecast errors (set by training; 1 before): intervals scale
    /// by it.
    pub residual: f64,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    *m
}

impl Normal {
    /// The normalisation of a series (finite values only). Differenced when the series trends
    /// (|correlation with time| > 0.5) or wanders (its lag-1 autocorrelation above 0.97 while
    /// its differences are much calmer than its levels).
    pub fn of(values: &[f64]) -> Normal {
        let x: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let n = x.len();
        let mut sorted = x.clone();
        let center = median(&mut sorted);
        let mean = x.iter().sum::<f64>() / n.max(1) as f64;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n.max(1) as f64;
        let differenced = n > 10 && {
            let tm = (n as f64 - 1.0) / 2.0;
            let (mut stx, mut stt) = (0.0, 0.0);
            for (t, v) in x.iter().enumerate() {
                stx += (t as f64 - tm) * (v - mean);
                stt += (t as f64 - tm) * (t as f64 - tm);
            }
            let trend = if var > 0.0 {
                (stx / (stt * var * n as f64).sqrt()).abs()
            } else {
                0.0
            };
            let ac1 = if var > 0.0 {
                x.windows(2)
                    .map(|w| (w[0] - mean) * (w[1] - mean))
                    .sum::<f64>()
                    / (var * (n - 1) as f64)
            } else {
                0.0
            };
            let dvar = x.windows(2).map(|w| (w[1] - w[0]).powi(2)).sum::<f64>() / (n - 1) as f64;
            trend > 0.5 || (ac1 > 0.97 && dvar < 0.05 * var)
        };
        // The scale of what the model sees: the levels, or the differences.
        let seen: Vec<f64> = if differenced {
            x.windows(2).map(|w| w[1] - w[0]).collect()
        } else {
            x.clone()
        };
        let mut sorted = seen.clone();
        let mid = median(&mut sorted);
        let mut dev: Vec<f64> = seen.iter().map(|v| (v - mid).abs()).collect();
        let mad = median(&mut dev) * 1.4826;
        let sm = seen.iter().sum::<f64>() / seen.len().max(1) as f64;
        let sv = seen.iter().map(|v| (v - sm) * (v - sm)).sum::<f64>() / seen.len().max(1) as f64;
        let scale = if mad > 0.0 {
            mad
        } else if sv > 0.0 {
            sv.sqrt()
        } else {
            1.0
        };
        Normal {
            center,
            scale,
            differenced,
            residual: 1.0,
        }
    }

    /// The model's view of a series: normalised, differenced if so (one fewer point).
    fn transform(&self, x: &[f64]) -> Vec<f64> {
        let z: Vec<f64> = x.iter().map(|v| (v - self.center) / self.scale).collect();
        if self.differenced {
            z.windows(2).map(|w| w[1] - w[0]).collect()
        } else {
            z
        }
    }
}

/// Fewest held-out windows the intervals are calibrated on out of sample (5 beyond each 0.5 %
/// tail); with fewer, every window fits and calibrates.
const MIN_HELD_OUT: usize = 1000;

/// A trained pooled model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Model {
    /// Lags the forecast looks at.
    pub lags: usize,
    /// Weights of the lags, most recent first.
    pub weights: Vec<f64>,
    pub intercept: f64,
    /// Per sensitivity level (see [`LEVELS`]): the residual quantiles `(low, high)`.
    pub intervals: Vec<(f64, f64)>,
    /// Rows the model was trained on.
    pub rows: usize,
    /// Anomalies in a row after which a series is taken to have shifted level.
    pub shift_after: usize,
}

/// Options of training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Train {
    pub lags: usize,
    /// Ridge penalty.
    pub penalty: f64,
    /// Most rows used (an even stride over all windows beyond it).
    pub max_rows: usize,
}

impl Default for Train {
    fn default() -> Self {
        Train {
            lags: 16,
            penalty: 1e-2,
            max_rows: 100_000,
        }
    }
}

/// The lag windows of a transformed series: (lags most recent first, target).
fn windows(y: &[f64], lags: usize) -> impl Iterator<Item = (&[f64], f64)> + '_ {
    (lags..y.len()).map(move |t| (&y[t - lags..t], y[t]))
}

impl Model {
    /// Trains one model on every series (each normalised by its own [`Normal`]). Series are
    /// finite values in time order (drop missing points first).
    /// Each series' [`Normal::residual`] is set to the spread of its own forecast errors, so
    /// one set of quantiles fits calm and noisy series alike.
    pub fn train(series: &mut [(Normal, &[f64])], o: Train) -> Result<Model, Error> {
        if !(1..=256).contains(&o.lags) {
            return Err(Error::Parameter(format!("lags {} must be 1..=256", o.lags)));
        }
        let ys: Vec<Vec<f64>> = series.iter().map(|(n, x)| n.transform(x)).collect();
        let total: usize = ys.iter().map(|y| y.len().saturating_sub(o.lags)).sum();
        let need = 20 * (o.lags + 1);
        if total < need {
            return Err(Error::TooLittleData { rows: total, need });
        }
        let stride = total.div_ceil(o.max_rows.max(1)).max(1);
        // The last fifth of each series calibrates the intervals out of sample (the white
        // paper's validation interval); the rest fits the weights.
        let (mut fit_x, mut fit_y, mut cal_x, mut cal_y) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut cal_s, mut fit_s) = (Vec::new(), Vec::new());
        let mut k = 0usize;
        for (s, y) in ys.iter().enumerate() {
            let cut = o.lags + (y.len().saturating_sub(o.lags)) * 4 / 5;
            for (t, (w, target)) in windows(y, o.lags).enumerate() {
                if k.is_multiple_of(stride) {
                    let (xs, ts) = if t + o.lags < cut {
                        fit_s.push(s);
                        (&mut fit_x, &mut fit_y)
                    } else {
                        cal_s.push(s);
                        (&mut cal_x, &mut cal_y)
                    };
                    xs.extend(w.iter().rev());
                    ts.push(target);
                }
                k += 1;
            }
        }
        if cal_y.len() < MIN_HELD_OUT {
            // Too few held out to place the 0.5 % tails of the 1 % level (a handful of the
            // most extreme errors would decide them): fit and calibrate on every window.
            fit_x.append(&mut cal_x);
            fit_y.append(&mut cal_y);
            fit_s.append(&mut cal_s);
            cal_x.clone_from(&fit_x);
            cal_y.clone_from(&fit_y);
            cal_s.clone_from(&fit_s);
        }
        let rows = fit_y.len();
        let x =
            Array2::from_shape_vec((rows, o.lags), fit_x).map_err(|e| Error::Fit(e.to_string()))?;
        let fitted = ElasticNet::params()
            .penalty(o.penalty)
            .l1_ratio(0.0)
            .max_iterations(500)
            .fit(&Dataset::new(x, Array1::from_vec(fit_y)))
            .map_err(|e| Error::Fit(e.to_string()))?;
        let weights = fitted.hyperplane().to_vec();
        let intercept = fitted.intercept();
        let forecast = |w: &[f64]| -> f64 {
            intercept
                + w.iter()
                    .rev()
                    .zip(&weights)
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
        };
        // Each series' own spread of forecast errors (robust), over all its windows.
        for ((n, _), y) in series.iter_mut().zip(&ys) {
            let err: Vec<f64> = windows(y, o.lags).map(|(w, t)| t - forecast(w)).collect();
            let mid = median(&mut err.clone());
            let mut abs: Vec<f64> = err.iter().map(|e| (e - mid).abs()).collect();
            let mad = median(&mut abs) * 1.4826;
            n.residual = if mad > 0.0 && mad.is_finite() {
                mad
            } else {
                1.0
            };
        }
        // Pooled quantiles of the errors in units of each series' own spread.
        let mut residuals: Vec<f64> = cal_x
            .chunks_exact(o.lags)
            .zip(&cal_y)
            .zip(&cal_s)
            .map(|((row, t), s)| {
                let w: Vec<f64> = row.iter().rev().copied().collect();
                (t - forecast(&w)) / series[*s].0.residual
            })
            .collect();
        residuals.sort_by(f64::total_cmp);
        let q = |p: f64| -> f64 {
            let at = (p * (residuals.len() - 1) as f64).round() as usize;
            residuals[at.min(residuals.len() - 1)]
        };
        let r = rows;
        Ok(Model {
            lags: o.lags,
            weights,
            intercept,
            intervals: LEVELS
                .iter()
                .map(|a| (q(a / 2.0), q(1.0 - a / 2.0)))
                .collect(),
            rows: r,
            shift_after: 5,
        })
    }

    /// Index of a sensitivity level ("1%", "3%", "5%" or the fraction).
    pub fn level(share: f64) -> Option<usize> {
        LEVELS.iter().position(|l| (l - share).abs() < 1e-9)
    }
}

/// One scored point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// The forecast and its interval, in the series' units.
    pub expected: f64,
    pub lower: f64,
    pub upper: f64,
    pub anomaly: bool,
    /// This point ended a run of anomalies by re-anchoring on a new level.
    pub level_shift: bool,
}

/// Online scoring of one series.
#[derive(Debug, Clone)]
pub struct Scorer {
    normal: Normal,
    level: usize,
    /// Transformed values, most recent last.
    lags: VecDeque<f64>,
    /// The last accepted normalised level (differenced series).
    last_z: Option<f64>,
    /// Recent values, for re-anchoring after a level shift.
    recent: VecDeque<f64>,
    /// How far each anomaly of the current run was from its forecast (normalised).
    run: Vec<f64>,
}

impl Scorer {
    pub fn new(normal: Normal, level: usize) -> Scorer {
        Scorer {
            normal,
            level,
            lags: VecDeque::new(),
            last_z: None,
            recent: VecDeque::new(),
            run: Vec::new(),
        }
    }

    /// Scores `x` (NaN: skipped, `None`), then takes it into the lags. The first `lags` (+1
    /// when differenced) points only fill the lags.
    pub fn push(&mut self, m: &Model, x: f64) -> Option<Score> {
        if !x.is_finite() {
            return None;
        }
        let n = self.normal;
        let z = (x - n.center) / n.scale;
        self.recent.push_back(x);
        if self.recent.len() > m.lags + 1 {
            self.recent.pop_front();
        }
        let y = match (n.differenced, self.last_z) {
            (true, None) => {
                self.last_z = Some(z);
                return None;
            }
            (true, Some(prev)) => z - prev,
            (false, _) => z,
        };
        if self.lags.len() < m.lags {
            self.lags.push_back(y);
            self.last_z = Some(z);
            return None;
        }
        let forecast = m.intercept
            + m.weights
                .iter()
                .zip(self.lags.iter().rev())
                .map(|(w, v)| w * v)
                .sum::<f64>();
        let (lo, hi) = m.intervals[self.level];
        // After substituted spikes a differenced series' level carries the forecast errors of
        // every step since: the interval widens as their sum's spread does.
        let widen = if n.differenced {
            (1.0 + self.run.len() as f64).sqrt()
        } else {
            1.0
        };
        let (lo, hi) = (lo * widen * n.residual, hi * widen * n.residual);
        let anomaly = y < forecast + lo || y > forecast + hi;
        let base = if n.differenced {
            self.last_z.unwrap_or(0.0)
        } else {
            0.0
        };
        let to_units = |v: f64| n.center + n.scale * (base + v);
        let mut score = Score {
            expected: to_units(forecast),
            lower: to_units(forecast + lo),
            upper: to_units(forecast + hi),
            anomaly,
            level_shift: false,
        };
        if anomaly {
            self.run.push(y - forecast);
            if self.run.len() >= m.shift_after {
                // A new level, not a spike: a stationary series moves its centre by the run's
                // median distance; either way the lags restart from the values seen.
                if !n.differenced {
                    let shift = median(&mut self.run) * n.scale;
                    self.normal.center += shift;
                }
                self.run.clear();
                // Only the values at the new level: the run (older lags are the new level's
                // centre, 0 in the model's units).
                let keep = self.recent.len().min(m.shift_after);
                let recent: Vec<f64> = self
                    .recent
                    .iter()
                    .skip(self.recent.len() - keep)
                    .copied()
                    .collect();
                let ys = self.normal.transform(&recent);
                let ys = &ys[ys.len().saturating_sub(m.lags)..];
                self.lags.clear();
                self.lags
                    .extend(std::iter::repeat_n(0.0, m.lags - ys.len()));
                self.lags.extend(ys.iter().copied());
                self.last_z = Some((x - self.normal.center) / self.normal.scale);
                score.anomaly = false;
                score.level_shift = true;
                return Some(score);
            }
            // The forecast stands in for the spike.
            self.lags.pop_front();
            self.lags.push_back(forecast);
            if n.differenced {
                self.last_z = Some(base + forecast);
            }
        } else {
            self.run.clear();
            self.lags.pop_front();
            self.lags.push_back(y);
            self.last_z = Some(z);
        }
        Some(score)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// xorshift noise in [-0.5, 0.5).
    fn noise(state: &mut u64) -> f64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }

    /// Roughly normal noise, σ ≈ 0.58 (a sum of four uniforms).
    fn gauss(state: &mut u64) -> f64 {
        (0..4).map(|_| noise(state)).sum()
    }

    fn sine(seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed | 1;
        (0..n)
            .map(|t| 20.0 + 5.0 * (t as f64 / 40.0).sin() + gauss(&mut s))
            .collect()
    }

    fn walk(seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed | 1;
        let mut v = 100.0;
        (0..n)
            .map(|_| {
                v += gauss(&mut s);
                v
            })
            .collect()
    }

    #[test]
    fn one_model_flags_spikes_in_stationary_and_wandering_series() {
        let series: Vec<Vec<f64>> = (0..6)
            .map(|i| {
                if i % 2 == 0 {
                    sine(i + 1, 3000)
                } else {
                    walk(i + 1, 3000)
                }
            })
            .collect();
        let normals: Vec<Normal> = series.iter().map(|s| Normal::of(s)).collect();
        // A random walk is differenced (a slow sine may be too: both forecast well so).
        assert!(
            normals[1].differenced && normals[3].differenced,
            "{normals:?}"
        );
        let mut train: Vec<(Normal, &[f64])> = normals
            .iter()
            .zip(&series)
            .map(|(n, s)| (*n, &s[..2000]))
            .collect();
        let m = Model::train(&mut train, Train::default()).unwrap();
        let normals: Vec<Normal> = train.iter().map(|(n, _)| *n).collect();
        let level = Model::level(0.01).unwrap();
        let (mut hits, mut false_alarms, mut spikes, mut after_spike) = (0, 0, 0, 0);
        for (n, s) in normals.iter().zip(&series) {
            let mut x = s.clone();
            let spiked: Vec<usize> = (2100..3000).step_by(97).collect();
            for &t in &spiked {
                x[t] += if t % 2 == 0 { 4.0 } else { -4.0 };
            }
            spikes += spiked.len();
            let mut sc = Scorer::new(*n, level);
            for (t, v) in x.iter().enumerate() {
                if let Some(score) = sc.push(&m, *v) {
                    if t >= 2000 && score.anomaly {
                        if spiked.contains(&t) {
                            hits += 1;
                        } else {
                            false_alarms += 1;
                            if spiked.iter().any(|&k| t > k && t <= k + 3) {
                                after_spike += 1;
                            }
                        }
                    }
                }
            }
        }
        let recall = hits as f64 / spikes as f64;
        let ordinary = series.len() * 1000 - spikes;
        let false_rate = false_alarms as f64 / ordinary as f64;
        eprintln!("recall {recall}, false alarms {false_alarms} ({false_rate:.4}), {after_spike} right after a spike");
        assert!(recall >= 0.9, "recall {recall}");
        // About the level's share of ordinary points, and no alarm on recoveries.
        assert!(false_rate <= 0.025, "false alarms {false_rate}");
        // (without the substitution a quarter of the recoveries alarmed)
        let after_rate = after_spike as f64 / (3 * spikes) as f64;
        assert!(after_rate <= 0.05, "{after_spike} alarms on recoveries");
    }

    #[test]
    fn a_level_shift_alarms_briefly_then_settles() {
        let s = sine(3, 3000);
        let mut train = [(Normal::of(&s[..2000]), &s[..2000])];
        let m = Model::train(&mut train, Train::default()).unwrap();
        let n = train[0].0;
        let mut sc = Scorer::new(n, 0);
        let mut alarms_after = 0;
        for (t, v) in s.iter().enumerate() {
            let v = if t >= 2500 { v + 30.0 } else { *v };
            if let Some(score) = sc.push(&m, v) {
                if t >= 2500 && score.anomaly {
                    alarms_after += 1;
                }
            }
        }
        assert!(alarms_after <= m.shift_after + 20, "{alarms_after}");
    }

    #[test]
    fn too_little_data_and_missing_points() {
        let s = sine(1, 50);
        let n = Normal::of(&s);
        assert!(matches!(
            Model::train(&mut [(n, &s)], Train::default()),
            Err(Error::TooLittleData { .. })
        ));
        let s = sine(1, 2000);
        let m = Model::train(&mut [(n, &s)], Train::default()).unwrap();
        let mut sc = Scorer::new(n, 2);
        assert_eq!(sc.push(&m, f64::NAN), None);
    }
}
