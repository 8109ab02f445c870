//! Change-point detection by a sliding window of two sub-windows (the white paper's 子序列级别
//! 异常检测), answer for answer the algorithm of `ruptures.Window`: for every `jump`-th index `k`
//! at least `width / 2` from either end, the score is the cost of the whole window minus the
//! costs of its two halves; the peaks of the score (strictly greater than every neighbour within
//! `order` places, wrapping at the ends, as `scipy.signal.argrelmax(mode="wrap")`) are taken
//! best first while a stopping rule allows: a fixed number of breakpoints, a penalty on the gain
//! in total cost, or a budget on the total cost.
//!
//! Costs come from prefix sums, so a window costs O(1) whatever its width (ruptures slices and
//! reduces each window in numpy). The built-in costs are the white paper's three: mean shift
//! (`l2`), mean and variance shift (`normal`, with ruptures' 1e-6 added to the covariance) and
//! continuous linear trend (`clinear`); anything implementing [`Cost`] can be used instead.
//!
//! Missing points: the signal is the sequence of points present; the caller drops NaN and
//! absent values (the cloud does) and maps indices back to times. Non-finite values are refused.

use std::fmt;

/// A segment cost: how badly one model explains `signal[start..end]`.
pub trait Cost {
    /// Fewest points a segment may have.
    fn min_size(&self) -> usize;
    /// Number of points in the signal.
    fn len(&self) -> usize;
    /// The cost of the points `start..end` (`end - start >= min_size()`).
    fn error(&self, start: usize, end: usize) -> f64;
    /// Whether the signal is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a detection was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A value is NaN or infinite (at this index, dimension).
    NotFinite { index: usize, dim: usize },
    /// The signal's length is not a multiple of its dimension count, or dims is 0.
    Shape { len: usize, dims: usize },
    /// A parameter is out of range.
    Parameter(String),
    /// A segment between breakpoints would be shorter than the cost allows.
    TooShort {
        start: usize,
        end: usize,
        min: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFinite { index, dim } => write!(
                f,
                "value {index} (dimension {dim}) is not a finite number; drop missing points first"
            ),
            Error::Shape { len, dims } => {
                write!(f, "{len} values do not make rows of {dims} dimensions")
            }
            Error::Parameter(p) => f.write_str(p),
            Error::TooShort { start, end, min } => write!(
                f,
                "segment {start}..{end} is shorter than the cost's minimum of {min} points; widen the window"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// The built-in costs, by their ruptures names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostKind {
    /// Mean shift: squared deviations from the segment's mean.
    L2,
    /// Mean and variance shift: `n · log det(Σ + 1e-6 I)`.
    Normal,
    /// Trend shift: squared deviations from the line joining the point before the segment
    /// to its last point.
    CLinear,
}

impl CostKind {
    pub fn parse(name: &str) -> Option<CostKind> {
        match name {
            "l2" => Some(CostKind::L2),
            "normal" => Some(CostKind::Normal),
            "clinear" => Some(CostKind::CLinear),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CostKind::L2 => "l2",
            CostKind::Normal => "normal",
            CostKind::CLinear => "clinear",
        }
    }

    /// This cost fitted to `values`, `dims` values a row.
    pub fn fit(self, values: &[f64], dims: usize) -> Result<Box<dyn Cost + Send + Sync>, Error> {
        let sums = Sums::new(values, dims, self == CostKind::Normal && dims > 1)?;
        Ok(match self {
            CostKind::L2 => Box::new(L2(sums)),
            CostKind::Normal => Box::new(Normal(sums)),
            CostKind::CLinear => Box::new(CLinear(sums)),
        })
    }
}

/// Prefix sums over a signal centred on its mean (centring keeps the differences of large
/// sums exact enough: every built-in cost is unchanged by adding a constant).
struct Sums {
    n: usize,
    dims: usize,
    /// `(n + 1) × dims`: Σ x.
    s1: Vec<f64>,
    /// `(n + 1) × dims`: Σ x².
    s2: Vec<f64>,
    /// `(n + 1) × dims`: Σ i·x.
    si: Vec<f64>,
    /// `(n + 1) × dims·dims`: Σ x_a·x_b (only for the multivariate normal cost).
    cross: Vec<f64>,
    /// The centred values, `n × dims`.
    x: Vec<f64>,
}

impl Sums {
    fn new(values: &[f64], dims: usize, cross: bool) -> Result<Sums, Error> {
        if dims == 0 || !values.len().is_multiple_of(dims) {
            return Err(Error::Shape {
                len: values.len(),
                dims,
            });
        }
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NotFinite {
                index: at / dims,
                dim: at % dims,
            });
        }
        let n = values.len() / dims;
        let mut mean = vec![0.0; dims];
        for row in values.chunks_exact(dims) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        for m in &mut mean {
            *m /= n.max(1) as f64;
        }
        let x: Vec<f64> = values
            .iter()
            .enumerate()
            .map(|(i, v)| v - mean[i % dims])
            .collect();
        let mut s1 = vec![0.0; (n + 1) * dims];
        let mut s2 = vec![0.0; (n + 1) * dims];
        let mut si = vec![0.0; (n + 1) * dims];
        let dd = if cross { dims * dims } else { 0 };
        let mut cr = vec![0.0; (n + 1) * dd];
        for i in 0..n {
            for d in 0..dims {
                let v = x[i * dims + d];
                s1[(i + 1) * dims + d] = s1[i * dims + d] + v;
                s2[(i + 1) * dims + d] = s2[i * dims + d] + v * v;
                si[(i + 1) * dims + d] = si[i * dims + d] + i as f64 * v;
            }
            if cross {
                for a in 0..dims {
                    for b in 0..dims {
                        cr[(i + 1) * dd + a * dims + b] =
                            cr[i * dd + a * dims + b] + x[i * dims + a] * x[i * dims + b];
                    }
                }
            }
        }
        Ok(Sums {
            n,
            dims,
            s1,
            s2,
            si,
            cross: cr,
            x,
        })
    }

    fn sum(v: &[f64], dims: usize, d: usize, start: usize, end: usize) -> f64 {
        v[end * dims + d] - v[start * dims + d]
    }

    /// Σ (x - mean)² over `start..end` in dimension `d`.
    fn sq_dev(&self, d: usize, start: usize, end: usize) -> f64 {
        let m = (end - start) as f64;
        let s1 = Self::sum(&self.s1, self.dims, d, start, end);
        let s2 = Self::sum(&self.s2, self.dims, d, start, end);
        (s2 - s1 * s1 / m).max(0.0)
    }
}

struct L2(Sums);

impl Cost for L2 {
    fn min_size(&self) -> usize {
        1
    }
    fn len(&self) -> usize {
        self.0.n
    }
    fn error(&self, start: usize, end: usize) -> f64 {
        (0..self.0.dims).map(|d| self.0.sq_dev(d, start, end)).sum()
    }
}

struct Normal(Sums);

impl Cost for Normal {
    fn min_size(&self) -> usize {
        2
    }
    fn len(&self) -> usize {
        self.0.n
    }
    fn error(&self, start: usize, end: usize) -> f64 {
        let s = &self.0;
        let m = (end - start) as f64;
        if s.dims == 1 {
            // ruptures: `sub.var()` (population variance) for one dimension.
            return (s.sq_dev(0, start, end) / m + 1e-6).ln() * m;
        }
        // ... and `np.cov` (sample covariance, n - 1) for several.
        let k = s.dims;
        let dd = k * k;
        let mut cov = vec![0.0; dd];
        for a in 0..k {
            for b in 0..k {
                let sab = s.cross[end * dd + a * k + b] - s.cross[start * dd + a * k + b];
                let sa = Sums::sum(&s.s1, k, a, start, end);
                let sb = Sums::sum(&s.s1, k, b, start, end);
                cov[a * k + b] = (sab - sa * sb / m) / (m - 1.0) + if a == b { 1e-6 } else { 0.0 };
            }
        }
        log_abs_det(&mut cov, k) * m
    }
}

/// `log |det A|` by Gaussian elimination with partial pivoting (A is k × k, overwritten).
fn log_abs_det(a: &mut [f64], k: usize) -> f64 {
    let mut total = 0.0;
    for c in 0..k {
        let pivot = (c..k)
            .max_by(|&i, &j| a[i * k + c].abs().total_cmp(&a[j * k + c].abs()))
            .unwrap_or(c);
        if a[pivot * k + c] == 0.0 {
            return f64::NEG_INFINITY;
        }
        if pivot != c {
            for j in 0..k {
                a.swap(c * k + j, pivot * k + j);
            }
        }
        let p = a[c * k + c];
        total += p.abs().ln();
        for r in c + 1..k {
            let f = a[r * k + c] / p;
            for j in c..k {
                a[r * k + j] -= f * a[c * k + j];
            }
        }
    }
    total
}

struct CLinear(Sums);

impl Cost for CLinear {
    fn min_size(&self) -> usize {
        3
    }
    fn len(&self) -> usize {
        self.0.n
    }
    fn error(&self, start: usize, end: usize) -> f64 {
        // ruptures anchors the line at the point before the segment (the first point for a
        // segment at the start) and ends it at the segment's last point.
        let s = &self.0;
        let a = start.max(1);
        let m = (end - a) as f64;
        let sj = m * (m + 1.0) / 2.0;
        let sjj = m * (m + 1.0) * (2.0 * m + 1.0) / 6.0;
        let mut total = 0.0;
        for d in 0..s.dims {
            let anchor = s.x[(a - 1) * s.dims + d];
            let slope = (s.x[(end - 1) * s.dims + d] - anchor) / m;
            let sx = Sums::sum(&s.s1, s.dims, d, a, end);
            let sxx = Sums::sum(&s.s2, s.dims, d, a, end);
            // Σ j·x with j = i - a + 1.
            let sjx = Sums::sum(&s.si, s.dims, d, a, end) - (a as f64 - 1.0) * sx;
            total += sxx - 2.0 * anchor * sx - 2.0 * slope * sjx
                + m * anchor * anchor
                + 2.0 * anchor * slope * sj
                + slope * slope * sjj;
        }
        total.max(0.0)
    }
}

/// A penalty for when the caller gives none, in the spirit of BIC: `2 σ² ln n` per dimension
/// for the squared-error costs (σ estimated robustly from the median absolute difference of
/// consecutive points, so the changes themselves do not inflate it) and `p ln n` for the normal
/// cost (p = parameters of a segment: means and covariances).
pub fn default_penalty(kind: CostKind, values: &[f64], dims: usize) -> f64 {
    let n = values.len() / dims.max(1);
    let ln_n = (n.max(2) as f64).ln();
    match kind {
        CostKind::Normal => (dims + dims * (dims + 1) / 2) as f64 * ln_n,
        CostKind::L2 | CostKind::CLinear => {
            let mut total = 0.0;
            for d in 0..dims {
                let mut diffs: Vec<f64> = values
                    .chunks_exact(dims)
                    .zip(values.chunks_exact(dims).skip(1))
                    .map(|(a, b)| (b[d] - a[d]).abs())
                    .collect();
                if diffs.is_empty() {
                    continue;
                }
                let mid = diffs.len() / 2;
                let (_, median, _) = diffs.select_nth_unstable_by(mid, f64::total_cmp);
                // MAD of N(0, 2σ²) differences: σ = median / (0.6745 · √2).
                let sigma = *median / (0.674_489_75 * std::f64::consts::SQRT_2);
                total += 2.0 * sigma * sigma * ln_n;
            }
            total
        }
    }
}

/// When to stop taking peaks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    /// Exactly this many breakpoints (fewer if the score has fewer peaks).
    Breakpoints(usize),
    /// Take a peak while it lowers the total cost by more than this.
    Penalty(f64),
    /// Take peaks while the total cost is above this.
    Epsilon(f64),
}

/// The window's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Points in the whole window (rounded down to even, as ruptures does).
    pub width: usize,
    /// Score every `jump`-th index.
    pub jump: usize,
    /// Fewest points between breakpoints.
    pub min_size: usize,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            width: 100,
            jump: 5,
            min_size: 2,
        }
    }
}

impl Window {
    /// The window SQL callers use when none is given for a signal of `n` points: half the
    /// signal wide, within 4..=100, the default jump and minimum size.
    pub fn for_points(n: usize) -> Window {
        Window {
            width: (n / 2).clamp(4, 100),
            ..Window::default()
        }
    }
}

/// What a detection found.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// Indices where a new segment starts, ascending, ending with the signal's length (the
    /// convention of ruptures).
    pub breakpoints: Vec<usize>,
    /// The indices that were scored and their scores.
    pub scored: Vec<(usize, f64)>,
}

/// Changes found by [`find`].
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Indices where a new segment starts, ascending (without the signal's length).
    pub starts: Vec<usize>,
    /// The penalty used (`None` when a number of breakpoints was asked for).
    pub penalty: Option<f64>,
}

/// The change points of a 1-D signal of finite values the way every caller of the product asks
/// for them (the API, job SQL and rule SQL): at most `breakpoints` changes (as many as fit), or
/// changes worth more than `penalty`, or — neither given — the [`default_penalty`]. A signal
/// too short for any cost (fewer than `min_size` or 3 points) has none.
pub fn find(
    values: &[f64],
    kind: CostKind,
    window: Window,
    penalty: Option<f64>,
    breakpoints: Option<usize>,
) -> Result<Found, Error> {
    let n = values.len();
    if n < window.min_size.max(3) {
        return Ok(Found {
            starts: Vec::new(),
            penalty: None,
        });
    }
    let (stop, used) = match (breakpoints, penalty) {
        // "At most k": as many as ruptures would admit on this length.
        (Some(k), _) => {
            let step = window.min_size.div_ceil(window.jump) * window.jump;
            let fit = (n / window.jump).min((n - window.min_size) / step);
            (Stop::Breakpoints(k.min(fit)), None)
        }
        (None, Some(p)) => (Stop::Penalty(p), Some(p)),
        (None, None) => {
            // Values near f64::MAX overflow the estimate: then nothing is a change.
            let p = default_penalty(kind, values, 1);
            let p = if p.is_finite() { p } else { f64::MAX };
            (Stop::Penalty(p), Some(p))
        }
    };
    let cost = kind.fit(values, 1)?;
    let mut starts = detect(cost.as_ref(), window, stop)?.breakpoints;
    starts.pop(); // the signal's length, ruptures' closing convention
    Ok(Found {
        starts,
        penalty: used,
    })
}

/// Detects change points of a fitted cost.
pub fn detect(cost: &dyn Cost, window: Window, stop: Stop) -> Result<Detection, Error> {
    let n = cost.len();
    let width = 2 * (window.width / 2);
    if width == 0 || window.jump == 0 || window.min_size == 0 {
        return Err(Error::Parameter(
            "width must be at least 2, jump and min_size at least 1".into(),
        ));
    }
    let half = width / 2;
    if half < cost.min_size() {
        return Err(Error::TooShort {
            start: 0,
            end: half,
            min: cost.min_size(),
        });
    }
    match stop {
        Stop::Penalty(p) | Stop::Epsilon(p) if !p.is_finite() || p < 0.0 => {
            return Err(Error::Parameter(format!(
                "penalty/epsilon must be a finite number ≥ 0, not {p}"
            )))
        }
        _ => {}
    }
    // ruptures' sanity check on the number of breakpoints.
    let wanted = match stop {
        Stop::Breakpoints(k) => k,
        _ => 0,
    };
    let jump_min = window.min_size.div_ceil(window.jump) * window.jump;
    if wanted > n / window.jump || wanted * jump_min + window.min_size > n {
        return Err(Error::Parameter(format!(
            "{wanted} breakpoints cannot fit in {n} points with min_size {} and jump {}",
            window.min_size, window.jump
        )));
    }

    let scored: Vec<(usize, f64)> = (0..n)
        .step_by(window.jump)
        .filter(|&k| k >= half && k < n - half.min(n))
        .map(|k| {
            let whole = cost.error(k - half, k + half);
            let gain = if whole == f64::NEG_INFINITY {
                0.0
            } else {
                whole - (cost.error(k - half, k) + cost.error(k, k + half))
            };
            (k, gain)
        })
        .collect();

    let order = ((width.max(2 * window.min_size)) / (2 * window.jump)).max(1);
    let mut peaks: Vec<(f64, usize)> = relative_maxima(&scored, order)
        .map(|i| (scored[i].1, scored[i].0))
        .collect();
    // Ascending by gain then index; the best is popped from the end.
    peaks.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));

    let total = |bkps: &[usize]| -> Result<f64, Error> {
        let mut sum = 0.0;
        let mut start = 0;
        for &end in bkps {
            if end - start < cost.min_size() {
                return Err(Error::TooShort {
                    start,
                    end,
                    min: cost.min_size(),
                });
            }
            sum += cost.error(start, end);
            start = end;
        }
        Ok(sum)
    };
    let mut bkps = vec![n];
    let mut error = total(&bkps)?;
    while let Some((_, bkp)) = peaks.pop() {
        let take = match stop {
            Stop::Breakpoints(k) => bkps.len() - 1 < k,
            Stop::Penalty(pen) => {
                let mut with = bkps.clone();
                with.push(bkp);
                with.sort_unstable();
                error - total(&with)? > pen
            }
            Stop::Epsilon(eps) => error > eps,
        };
        if !take {
            break;
        }
        bkps.push(bkp);
        bkps.sort_unstable();
        error = total(&bkps)?;
    }
    Ok(Detection {
        breakpoints: bkps,
        scored,
    })
}

/// Positions in `scored` strictly greater than every score within `order` places on each
/// side, the ends wrapping around (`argrelmax(score, order, mode="wrap")`).
fn relative_maxima(scored: &[(usize, f64)], order: usize) -> impl Iterator<Item = usize> + '_ {
    let len = scored.len() as isize;
    (0..scored.len()).filter(move |&i| {
        let v = scored[i].1;
        (1..=order as isize).all(|s| {
            let plus = scored[(i as isize + s).rem_euclid(len) as usize].1;
            let minus = scored[(i as isize - s).rem_euclid(len) as usize].1;
            v > plus && v > minus
        })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A deterministic piecewise-constant signal with small noise.
    fn steps(levels: &[(usize, f64)], noise: f64) -> Vec<f64> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut out = Vec::new();
        for &(len, level) in levels {
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                out.push(level + noise * u);
            }
        }
        out
    }

    fn naive_l2(x: &[f64]) -> f64 {
        let m = x.iter().sum::<f64>() / x.len() as f64;
        x.iter().map(|v| (v - m) * (v - m)).sum()
    }

    fn naive_clinear(x: &[f64], start: usize, end: usize) -> f64 {
        let a = start.max(1);
        let slope = (x[end - 1] - x[a - 1]) / (end - a) as f64;
        (a..end)
            .map(|i| {
                let fit = x[a - 1] + slope * (i - a + 1) as f64;
                (x[i] - fit) * (x[i] - fit)
            })
            .sum()
    }

    #[test]
    fn prefix_sum_costs_equal_the_direct_formulas() {
        let x = steps(&[(50, 1000.0), (70, 1004.0), (30, 998.0)], 2.0);
        let l2 = CostKind::L2.fit(&x, 1).unwrap();
        let normal = CostKind::Normal.fit(&x, 1).unwrap();
        let clinear = CostKind::CLinear.fit(&x, 1).unwrap();
        for (s, e) in [(0, 150), (0, 3), (10, 60), (49, 51), (100, 150), (1, 4)] {
            let direct = naive_l2(&x[s..e]);
            assert!((l2.error(s, e) - direct).abs() <= 1e-9 * direct.max(1.0));
            let var = direct / (e - s) as f64;
            let n = (var + 1e-6).ln() * (e - s) as f64;
            assert!((normal.error(s, e) - n).abs() <= 1e-9 * n.abs().max(1.0));
            let c = naive_clinear(&x, s, e);
            assert!(
                (clinear.error(s, e) - c).abs() <= 1e-7 * c.max(1.0),
                "{s}..{e}: {} vs {c}",
                clinear.error(s, e)
            );
        }
    }

    #[test]
    fn finds_steps_with_a_penalty_and_by_count() {
        let x = steps(&[(300, 0.0), (300, 5.0), (300, 1.0)], 1.0);
        let cost = CostKind::L2.fit(&x, 1).unwrap();
        let w = Window {
            width: 40,
            jump: 5,
            min_size: 2,
        };
        let d = detect(cost.as_ref(), w, Stop::Penalty(50.0)).unwrap();
        assert_eq!(d.breakpoints, vec![300, 600, 900]);
        let d = detect(cost.as_ref(), w, Stop::Breakpoints(1)).unwrap();
        assert_eq!(d.breakpoints, vec![300, 900]);
        // A constant signal has no peaks.
        let flat = vec![3.0; 200];
        let cost = CostKind::L2.fit(&flat, 1).unwrap();
        assert_eq!(
            detect(cost.as_ref(), w, Stop::Penalty(1.0))
                .unwrap()
                .breakpoints,
            vec![200]
        );
    }

    #[test]
    fn variance_and_trend_changes() {
        let mut x = steps(&[(400, 0.0)], 0.2);
        x.extend(steps(&[(400, 0.0)], 4.0));
        let cost = CostKind::Normal.fit(&x, 1).unwrap();
        let d = detect(cost.as_ref(), Window::default(), Stop::Breakpoints(1)).unwrap();
        assert!(d.breakpoints[0].abs_diff(400) <= 5, "{:?}", d.breakpoints);

        let trend: Vec<f64> = (0..600)
            .map(|i| {
                if i < 300 {
                    i as f64 * 0.1
                } else {
                    30.0 + (i - 300) as f64 * 0.6
                }
            })
            .zip(steps(&[(600, 0.0)], 0.5))
            .map(|(a, b)| a + b)
            .collect();
        let cost = CostKind::CLinear.fit(&trend, 1).unwrap();
        let d = detect(cost.as_ref(), Window::default(), Stop::Breakpoints(1)).unwrap();
        assert!(d.breakpoints[0].abs_diff(300) <= 5, "{:?}", d.breakpoints);
    }

    #[test]
    fn multivariate_normal_and_l2() {
        let a = steps(&[(200, 0.0), (200, 3.0)], 1.0);
        let b = steps(&[(200, 1.0), (200, 1.0)], 1.0);
        let x: Vec<f64> = a.iter().zip(&b).flat_map(|(p, q)| [*p, *q]).collect();
        for kind in [CostKind::L2, CostKind::Normal] {
            let cost = kind.fit(&x, 2).unwrap();
            let d = detect(cost.as_ref(), Window::default(), Stop::Breakpoints(1)).unwrap();
            assert!(d.breakpoints[0].abs_diff(200) <= 10, "{kind:?} {d:?}");
        }
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        assert_eq!(
            CostKind::L2.fit(&[1.0, f64::NAN, 2.0], 1).err(),
            Some(Error::NotFinite { index: 1, dim: 0 })
        );
        assert!(matches!(
            CostKind::L2.fit(&[1.0, 2.0, 3.0], 2),
            Err(Error::Shape { .. })
        ));
        let cost = CostKind::CLinear.fit(&[1.0; 50], 1).unwrap();
        let narrow = Window {
            width: 4,
            jump: 1,
            min_size: 2,
        };
        assert!(matches!(
            detect(cost.as_ref(), narrow, Stop::Penalty(1.0)),
            Err(Error::TooShort { .. })
        ));
        let cost = CostKind::L2.fit(&[1.0; 50], 1).unwrap();
        assert!(matches!(
            detect(cost.as_ref(), Window::default(), Stop::Breakpoints(40)),
            Err(Error::Parameter(_))
        ));
        assert!(matches!(
            detect(cost.as_ref(), Window::default(), Stop::Penalty(f64::NAN)),
            Err(Error::Parameter(_))
        ));
        // Shorter than the window: nothing scored, no breakpoint, no panic.
        let d = detect(cost.as_ref(), Window::default(), Stop::Penalty(1.0)).unwrap();
        assert_eq!(d.breakpoints, vec![50]);
        let empty = CostKind::L2.fit(&[], 1).unwrap();
        assert!(matches!(
            detect(empty.as_ref(), Window::default(), Stop::Penalty(1.0)),
            Err(Error::Parameter(_))
        ));
    }
}
