//! Photovoltaic IV-curve fault diagnosis (the white paper's 光伏阵列异常检测): a single-diode
//! simulation of arrays of strings with the five faults, correction of a measured curve to STC
//! by IEC 60891 (procedure 2, the white paper's equations), nearest-neighbour resampling to a
//! uniform voltage grid, and a random forest (linfa) that names the fault with a confidence
//! (the share of its trees' votes).
//!
//! The diode model is De Soto's (`pvlib.pvsystem.calcparams_desoto`), solved explicitly with
//! Lambert's W in log space like `pvlib`'s `lambertw` method, so the curves agree with pvlib's
//! `i_from_v` / `v_from_i` / `singlediode` to rounding.

use linfa::prelude::*;
use linfa_ensemble::{EnsembleLearner, EnsembleLearnerParams};
use linfa_trees::DecisionTree;
use ndarray::{Array1, Array2};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::fmt;

/// Boltzmann's constant in eV/K (as pvlib).
const K_EV: f64 = 8.617_333_262e-5;
const T_REF: f64 = 25.0 + 273.15;
const G_REF: f64 = 1000.0;
/// Forward drop of a module's bypass diode (V).
const BYPASS_DROP: f64 = 0.5;

/// A module's reference parameters for the De Soto model (pvlib's names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Module {
    /// Light current at STC (A).
    pub i_l_ref: f64,
    /// Diode saturation current at STC (A).
    pub i_o_ref: f64,
    /// Series resistance (Ω).
    pub r_s: f64,
    /// Shunt resistance at STC (Ω).
    pub r_sh_ref: f64,
    /// Modified ideality factor n·Ns·Vth at STC (V).
    pub a_ref: f64,
    /// Short-circuit current temperature coefficient (A/K).
    pub alpha_sc: f64,
    /// Band gap at STC (eV).
    pub eg_ref: f64,
    /// Band gap temperature dependence (1/K).
    pub d_eg_dt: f64,
}

impl Default for Module {
    /// A 96-cell monocrystalline module (the Canadian Solar CS5P-220M of pvlib's examples):
    /// Isc 5.1 A, Voc 59 V, 220 W.
    fn default() -> Self {
        Module {
            i_l_ref: 5.114,
            i_o_ref: 8.196e-10,
            r_s: 1.065,
            r_sh_ref: 381.68,
            a_ref: 2.6373,
            alpha_sc: 0.004539,
            eg_ref: 1.121,
            d_eg_dt: -0.0002677,
        }
    }
}

/// The five single-diode parameters at one operating condition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diode {
    /// Light current (A).
    pub i_l: f64,
    /// Saturation current (A).
    pub i_o: f64,
    /// Series resistance (Ω).
    pub r_s: f64,
    /// Shunt resistance (Ω).
    pub r_sh: f64,
    /// n·Ns·Vth (V).
    pub a: f64,
}

impl Module {
    /// The diode parameters at irradiance `g` (W/m², > 0) and cell temperature `t` (°C), as
    /// `pvlib.pvsystem.calcparams_desoto`.
    pub fn at(&self, g: f64, t: f64) -> Diode {
        let tk = t + 273.15;
        let eg = self.eg_ref * (1.0 + self.d_eg_dt * (tk - T_REF));
        Diode {
            i_l: g / G_REF * (self.i_l_ref + self.alpha_sc * (tk - T_REF)),
            i_o: self.i_o_ref
                * (tk / T_REF).powi(3)
                * (self.eg_ref / (K_EV * T_REF) - eg / (K_EV * tk)).exp(),
            r_s: self.r_s,
            r_sh: self.r_sh_ref * G_REF / g,
            a: self.a_ref * tk / T_REF,
        }
    }
}

/// `W(e^x)`, the principal branch of Lambert's W at `e^x`, for any real `x` (no overflow).
fn lambert_w_exp(x: f64) -> f64 {
    if x > 1.0 {
        // w + ln w = x by Newton from w = x - ln x.
        let mut w = x - x.ln();
        for _ in 0..50 {
            let f = w + w.ln() - x;
            let step = f / (1.0 + 1.0 / w);
            w -= step;
            if step.abs() <= 1e-15 * w.abs() {
                break;
            }
        }
        w
    } else {
        // w·e^w = z by Halley from w = ln(1 + z).
        let z = x.exp();
        let mut w = z.ln_1p();
        for _ in 0..50 {
            let e = w.exp();
            let f = w * e - z;
            let step = f / (e * (w + 1.0) - (w + 2.0) * f / (2.0 * w + 2.0));
            w -= step;
            if step.abs() <= 1e-15 * w.abs().max(1e-300) {
                break;
            }
        }
        w
    }
}

impl Diode {
    /// Current at voltage `v` (pvlib `i_from_v`, lambertw).
    pub fn i_from_v(&self, v: f64) -> f64 {
        let g_sh = 1.0 / self.r_sh;
        if self.r_s == 0.0 {
            return self.i_l - self.i_o * (v / self.a).exp_m1() - g_sh * v;
        }
        let k = self.r_s * g_sh + 1.0;
        let log_arg = self.r_s.ln() + self.i_o.ln() - self.a.ln() - k.ln()
            + (self.r_s * (self.i_l + self.i_o) + v) / (self.a * k);
        (self.i_l + self.i_o - v * g_sh) / k - self.a / self.r_s * lambert_w_exp(log_arg)
    }

    /// Voltage at current `i` (pvlib `v_from_i`, lambertw).
    pub fn v_from_i(&self, i: f64) -> f64 {
        let g_sh = 1.0 / self.r_sh;
        let log_arg =
            self.i_o.ln() - g_sh.ln() - self.a.ln() + (self.i_l + self.i_o - i) / (g_sh * self.a);
        (self.i_l + self.i_o - i) / g_sh - i * self.r_s - self.a * lambert_w_exp(log_arg)
    }

    /// Short-circuit current, open-circuit voltage and the maximum power point `(v, i)`.
    pub fn key_points(&self) -> (f64, f64, f64, f64) {
        let isc = self.i_from_v(0.0);
        let voc = self.v_from_i(0.0);
        // Golden-section search of P(V) on [0, Voc] (unimodal for one diode).
        let p = |v: f64| v * self.i_from_v(v);
        let (mut lo, mut hi) = (0.0, voc);
        let r = (5f64.sqrt() - 1.0) / 2.0;
        for _ in 0..100 {
            let a = hi - r * (hi - lo);
            let b = lo + r * (hi - lo);
            if p(a) < p(b) {
                lo = a;
            } else {
                hi = b;
            }
        }
        let vmp = (lo + hi) / 2.0;
        (isc, voc, vmp, self.i_from_v(vmp))
    }
}

/// The faults, and the healthy state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    Normal,
    /// Some modules see less light (their bypass diodes conduct: steps in the curve).
    PartialShading,
    /// Series resistance grown (corroded contacts, cables): the slope near Voc falls.
    SeriesResistance,
    /// Shunt resistance fallen (cell cracks, leakage): the slope near Isc steepens.
    ShuntResistance,
    /// One string of the array disconnected: the array's current falls by one string's.
    OpenString,
    /// Modules short-circuited in a string: the array's open-circuit voltage falls.
    ShortModule,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::Normal,
        Fault::PartialShading,
        Fault::SeriesResistance,
        Fault::ShuntResistance,
        Fault::OpenString,
        Fault::ShortModule,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Normal => "normal",
            Fault::PartialShading => "partial_shading",
            Fault::SeriesResistance => "series_resistance_ageing",
            Fault::ShuntResistance => "shunt_resistance_ageing",
            Fault::OpenString => "open_string",
            Fault::ShortModule => "short_circuited_module",
        }
    }

    fn index(self) -> usize {
        Fault::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An array: `strings` strings in parallel of `modules` modules in series, each module with a
/// bypass diode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Array {
    pub module: Module,
    pub modules: usize,
    pub strings: usize,
}

/// How each module of the array is, for one simulation.
#[derive(Debug, Clone)]
pub struct Condition {
    /// Plane-of-array irradiance (W/m²) and cell temperature (°C).
    pub irradiance: f64,
    pub temperature: f64,
    /// Per string, per module: the share of the irradiance it gets (1 = unshaded).
    pub light: Vec<Vec<f64>>,
    /// Per string, per module: shorted.
    pub shorted: Vec<Vec<bool>>,
    /// Per string: disconnected.
    pub open: Vec<bool>,
    /// Multipliers of every module's series and shunt resistance.
    pub r_s_factor: f64,
    pub r_sh_factor: f64,
}

impl Condition {
    /// Every module equally lit, none shorted, no string open.
    pub fn is_uniform(&self) -> bool {
        let first = self
            .light
            .first()
            .and_then(|s| s.first())
            .copied()
            .unwrap_or(1.0);
        !self.open.iter().any(|o| *o)
            && self.shorted.iter().flatten().all(|s| !s)
            && self.light.iter().flatten().all(|l| *l == first)
    }

    /// A healthy array at `irradiance`, `temperature`.
    pub fn healthy(a: &Array, irradiance: f64, temperature: f64) -> Condition {
        Condition {
            irradiance,
            temperature,
            light: vec![vec![1.0; a.modules]; a.strings],
            shorted: vec![vec![false; a.modules]; a.strings],
            open: vec![false; a.strings],
            r_s_factor: 1.0,
            r_sh_factor: 1.0,
        }
    }
}

/// A measured curve: points `(v, i)` in any order, with the conditions they were taken at.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub v: Vec<f64>,
    pub i: Vec<f64>,
    pub irradiance: f64,
    pub temperature: f64,
}

impl Array {
    /// The array's IV curve at `points` voltages from 0 to its open-circuit voltage.
    pub fn simulate(&self, c: &Condition, points: usize) -> Curve {
        if c.is_uniform() {
            return self.simulate_uniform(c, points);
        }
        // Each string: V(I) on a fine current grid, then I(V) by interpolation.
        let i_max = self.module.at(c.irradiance, c.temperature).i_l * 1.1 + 0.01;
        const STEPS: usize = 400;
        let currents: Vec<f64> = (0..=STEPS)
            .map(|k| i_max * k as f64 / STEPS as f64)
            .collect();
        let mut tables = Vec::new();
        for s in 0..self.strings {
            if c.open[s] {
                continue;
            }
            let mut volts = vec![0.0; currents.len()];
            for m in 0..self.modules {
                if c.shorted[s][m] {
                    continue;
                }
                let mut d = self
                    .module
                    .at((c.irradiance * c.light[s][m]).max(1.0), c.temperature);
                d.r_s *= c.r_s_factor;
                d.r_sh *= c.r_sh_factor;
                for (v, &i) in volts.iter_mut().zip(&currents) {
                    *v += d.v_from_i(i).max(-BYPASS_DROP);
                }
            }
            tables.push(volts);
        }
        let voc = tables.iter().map(|t| t[0]).fold(0.0f64, f64::max).max(0.0);
        let mut v = Vec::with_capacity(points);
        let mut i = Vec::with_capacity(points);
        for k in 0..points {
            let vk = voc * k as f64 / (points - 1).max(1) as f64;
            let total: f64 = tables.iter().map(|t| current_at(t, &currents, vk)).sum();
            v.push(vk);
            // A string diode blocks back-feed into a weaker string.
            i.push(total.max(0.0));
        }
        Curve {
            v,
            i,
            irradiance: c.irradiance,
            temperature: c.temperature,
        }
    }

    /// Every module alike and no string open: the module's exact curve, scaled (what pvlib's
    /// `singlediode` answers, without a string table's interpolation).
    fn simulate_uniform(&self, c: &Condition, points: usize) -> Curve {
        let mut d = self.module.at(c.irradiance * c.light[0][0], c.temperature);
        d.r_s *= c.r_s_factor;
        d.r_sh *= c.r_sh_factor;
        let (s, p) = (self.modules as f64, self.strings as f64);
        let voc = d.v_from_i(0.0).max(0.0);
        let mut v = Vec::with_capacity(points);
        let mut i = Vec::with_capacity(points);
        for k in 0..points {
            let vm = voc * k as f64 / (points - 1).max(1) as f64;
            v.push(vm * s);
            i.push(d.i_from_v(vm).max(0.0) * p);
        }
        Curve {
            v,
            i,
            irradiance: c.irradiance,
            temperature: c.temperature,
        }
    }

    /// STC short-circuit current and open-circuit voltage of the healthy array.
    pub fn nominal(&self) -> (f64, f64) {
        let (isc, voc, _, _) = self.module.at(G_REF, 25.0).key_points();
        (isc * self.strings as f64, voc * self.modules as f64)
    }
}

/// The current of a string at voltage `v` from its table of voltages (falling) over currents
/// (rising); beyond the table, the nearest end.
fn current_at(volts: &[f64], currents: &[f64], v: f64) -> f64 {
    if v >= volts[0] {
        // Above the string's open-circuit voltage: it would draw current; a blocking diode
        // stops that, so 0 (clamped by the caller's max(0) for the total).
        return 0.0;
    }
    let last = volts.len() - 1;
    if v <= volts[last] {
        return currents[last];
    }
    // volts is non-increasing: find k with volts[k] >= v > volts[k + 1].
    let k = volts
        .partition_point(|&x| x >= v)
        .saturating_sub(1)
        .min(last - 1);
    let (v0, v1) = (volts[k], volts[k + 1]);
    if v0 == v1 {
        return currents[k];
    }
    currents[k] + (currents[k + 1] - currents[k]) * (v0 - v) / (v0 - v1)
}

/// The coefficients of IEC 60891 procedure 2 for an array.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Iec60891 {
    /// Relative temperature coefficient of Isc (1/K).
    pub alpha_rel: f64,
    /// Relative temperature coefficient of Voc (1/K).
    pub beta_rel: f64,
    /// Irradiance correction factor of Voc.
    pub a: f64,
    /// Internal series resistance (Ω).
    pub r_s: f64,
    /// Temperature coefficient of the series resistance (Ω/K).
    pub kappa: f64,
}

impl Iec60891 {
    /// The coefficients of an array, derived from its module model the way the standard
    /// determines them from measurements (Isc and Voc at two temperatures, Voc at two
    /// irradiances).
    pub fn of(array: &Array) -> Iec60891 {
        let m = &array.module;
        let (isc25, voc25, _, _) = m.at(G_REF, 25.0).key_points();
        let (isc50, voc50, _, _) = m.at(G_REF, 50.0).key_points();
        let (_, voc200, _, _) = m.at(200.0, 25.0).key_points();
        Iec60891 {
            alpha_rel: (isc50 / isc25 - 1.0) / 25.0,
            beta_rel: (voc50 / voc25 - 1.0) / 25.0,
            a: (voc25 / voc200 - 1.0) / (G_REF / 200.0f64).ln(),
            r_s: m.r_s * array.modules as f64 / array.strings as f64,
            kappa: 0.0,
        }
    }

    /// The curve at `g2`, `t2` (the white paper's equations):
    /// `I2 = I1 (1 + α (T2 - T1)) G2/G1`,
    /// `V2 = V1 + Voc1 [β (T2 - T1) + a ln(G2/G1)] - Rs (I2 - I1) - κ I2 (T2 - T1)`.
    pub fn correct(&self, c: &Curve, g2: f64, t2: f64) -> Curve {
        let dt = t2 - c.temperature;
        let ratio = g2 / c.irradiance;
        let voc1 = open_circuit_voltage(&c.v, &c.i);
        let (mut v, mut i) = (Vec::with_capacity(c.v.len()), Vec::with_capacity(c.v.len()));
        for (&v1, &i1) in c.v.iter().zip(&c.i) {
            let i2 = i1 * (1.0 + self.alpha_rel * dt) * ratio;
            let v2 = v1 + voc1 * (self.beta_rel * dt + self.a * ratio.ln())
                - self.r_s * (i2 - i1)
                - self.kappa * i2 * dt;
            v.push(v2);
            i.push(i2);
        }
        Curve {
            v,
            i,
            irradiance: g2,
            temperature: t2,
        }
    }
}

/// The voltage where the measured current crosses zero (interpolated), else the highest.
fn open_circuit_voltage(v: &[f64], i: &[f64]) -> f64 {
    let mut pts: Vec<(f64, f64)> = v.iter().copied().zip(i.iter().copied()).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in pts.windows(2) {
        let ((v0, i0), (v1, i1)) = (w[0], w[1]);
        if i0 > 0.0 && i1 <= 0.0 {
            return v0 + (v1 - v0) * i0 / (i0 - i1);
        }
    }
    pts.last().map_or(0.0, |p| p.0)
}

/// Points of the uniform voltage grid the classifier sees.
pub const GRID: usize = 60;

/// Why a curve cannot be diagnosed.
#[derive(Debug, Clone, PartialEq)]
pub enum CurveError {
    TooFewPoints(usize),
    Lengths(usize, usize),
    NotFinite,
    Conditions(String),
}

impl fmt::Display for CurveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CurveError::TooFewPoints(n) => write!(f, "{n} points: a curve needs at least 10"),
            CurveError::Lengths(v, i) => {
                write!(
                    f,
                    "{v} voltages but {i} currents: give one current a voltage"
                )
            }
            CurveError::NotFinite => f.write_str("a voltage or current is not a finite number"),
            CurveError::Conditions(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CurveError {}

/// Checks a measured curve.
pub fn check(c: &Curve) -> Result<(), CurveError> {
    if c.v.len() != c.i.len() {
        return Err(CurveError::Lengths(c.v.len(), c.i.len()));
    }
    if c.v.len() < 10 {
        return Err(CurveError::TooFewPoints(c.v.len()));
    }
    if c.v.iter().chain(&c.i).any(|x| !x.is_finite()) {
        return Err(CurveError::NotFinite);
    }
    if !(c.irradiance.is_finite() && (50.0..=1500.0).contains(&c.irradiance)) {
        return Err(CurveError::Conditions(format!(
            "irradiance {} W/m² is outside 50..1500: too dark to diagnose",
            c.irradiance
        )));
    }
    if !(c.temperature.is_finite() && (-40.0..=100.0).contains(&c.temperature)) {
        return Err(CurveError::Conditions(format!(
            "cell temperature {} °C is outside -40..100",
            c.temperature
        )));
    }
    Ok(())
}

/// The classifier's features of a measured curve of `array`: corrected to STC, resampled by
/// nearest neighbour onto `GRID` voltages from 0 to 1.05 × the nominal Voc (currents over the
/// nominal Isc), and shape figures (Isc, Voc, Pmp, fill factor, MPP position, slopes at both
/// ends, number of power peaks), all relative to the nominal array.
pub fn features(array: &Array, iec: &Iec60891, c: &Curve) -> Vec<f64> {
    let stc = iec.correct(c, G_REF, 25.0);
    let (isc_n, voc_n) = array.nominal();
    let mut pts: Vec<(f64, f64)> = stc
        .v
        .iter()
        .map(|v| v / voc_n)
        .zip(stc.i.iter().map(|i| i / isc_n))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let voc = open_circuit_voltage(
        &pts.iter().map(|p| p.0).collect::<Vec<_>>(),
        &pts.iter().map(|p| p.1).collect::<Vec<_>>(),
    );
    let grid: Vec<f64> = (0..GRID)
        .map(|k| {
            let v = 1.05 * k as f64 / (GRID - 1) as f64;
            if v > voc {
                return 0.0;
            }
            let at = pts.partition_point(|p| p.0 < v);
            let near = match (at.checked_sub(1), pts.get(at)) {
                (Some(b), Some(a)) if (pts[b].0 - v).abs() <= (a.0 - v).abs() => pts[b],
                (Some(b), None) => pts[b],
                (_, Some(a)) => *a,
                (None, None) => (0.0, 0.0),
            };
            near.1.max(0.0)
        })
        .collect();
    let isc = grid[0];
    let (mut pmp, mut vmp, mut imp) = (0.0, 0.0, 0.0);
    for &(v, i) in &pts {
        if v * i > pmp {
            (pmp, vmp, imp) = (v * i, v, i);
        }
    }
    let ff = if isc > 0.0 && voc > 0.0 {
        pmp / (isc * voc)
    } else {
        0.0
    };
    // Slopes (in nominal units) over the first and last tenth of the curve.
    let slope = |a: f64, b: f64| -> f64 {
        let sel: Vec<&(f64, f64)> = pts.iter().filter(|p| p.0 >= a && p.0 <= b).collect();
        if sel.len() < 2 {
            return 0.0;
        }
        let n = sel.len() as f64;
        let mx = sel.iter().map(|p| p.0).sum::<f64>() / n;
        let my = sel.iter().map(|p| p.1).sum::<f64>() / n;
        let sxy: f64 = sel.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let sxx: f64 = sel.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
        if sxx > 0.0 {
            sxy / sxx
        } else {
            0.0
        }
    };
    let near_isc = slope(0.0, 0.25 * voc);
    let near_voc = slope(0.9 * voc, voc);
    // Power peaks on the grid (shading makes several).
    let power: Vec<f64> = grid
        .iter()
        .enumerate()
        .map(|(k, i)| i * 1.05 * k as f64 / (GRID - 1) as f64)
        .collect();
    let peaks = (1..GRID - 1)
        .filter(|&k| power[k] > power[k - 1] * 1.01 && power[k] >= power[k + 1] * 1.01)
        .count() as f64;
    // The largest drop between neighbouring grid currents below the MPP (a shading step).
    let step = grid
        .windows(2)
        .take_while(|w| w[1] > 0.5 * isc)
        .map(|w| w[0] - w[1])
        .fold(0.0, f64::max);
    // Convexity: a healthy curve bends one way only (second differences ≤ 0); after a
    // bypassed module's step the current flattens again (a positive second difference),
    // which a shorted module's smooth, shorter curve does not show.
    let convexity = grid
        .windows(3)
        .filter(|w| w[2] > 0.05 * isc)
        .map(|w| w[0] - 2.0 * w[1] + w[2])
        .fold(0.0, f64::max);
    let bends = grid
        .windows(3)
        .filter(|w| w[2] > 0.05 * isc && w[0] - 2.0 * w[1] + w[2] > 0.02 * isc)
        .count() as f64;
    let mut f = grid;
    f.extend([
        isc, voc, pmp, ff, vmp, imp, near_isc, near_voc, peaks, step, convexity, bends,
    ]);
    f
}

/// A measurement of `array` under `fault`: a random irradiance, temperature and severity, an
/// IV tracer's uneven voltage steps and noise, and sensor errors on G and T.
pub fn measure(array: &Array, fault: Fault, rng: &mut SmallRng) -> Curve {
    let g = rng.gen_range(300.0..1100.0);
    let t = rng.gen_range(5.0..65.0);
    let mut c = Condition::healthy(array, g, t);
    let s = rng.gen_range(0..array.strings);
    match fault {
        Fault::Normal => {}
        Fault::PartialShading => {
            // An obstacle's shadow: the same modules of at least half the strings get
            // 30-80 % of the light (a shadow on one string alone, deep enough, cannot be told
            // from shorted modules by the curve: both bypass the same modules).
            let shaded = rng.gen_range(1..=(array.modules / 2).max(1));
            let light = rng.gen_range(0.3..0.8);
            let first = rng.gen_range(0..=array.strings / 2);
            for string in first..array.strings {
                for m in 0..shaded {
                    c.light[string][m] = light;
                }
            }
        }
        Fault::SeriesResistance => c.r_s_factor = rng.gen_range(3.0..8.0),
        Fault::ShuntResistance => c.r_sh_factor = rng.gen_range(0.01..0.06),
        Fault::OpenString => c.open[s] = true,
        Fault::ShortModule => {
            let n = rng.gen_range(1..=(array.modules / 4).max(1));
            for m in 0..n {
                c.shorted[s][m] = true;
            }
        }
    }
    let points = rng.gen_range(60..200);
    let clean = array.simulate(&c, points * 4);
    // An IV tracer: uneven voltage steps (denser near Voc), noise on both channels.
    let mut v = Vec::with_capacity(points);
    let mut i = Vec::with_capacity(points);
    for k in 0..points {
        let u = (k as f64 + rng.gen_range(-0.3..0.3)) / (points - 1) as f64;
        let at = ((u.clamp(0.0, 1.0).powf(0.8)) * (clean.v.len() - 1) as f64).round() as usize;
        v.push(clean.v[at] * (1.0 + rng.gen_range(-0.003..0.003)));
        i.push(clean.i[at] * (1.0 + rng.gen_range(-0.005..0.005)) + rng.gen_range(-0.005..0.005));
    }
    Curve {
        v,
        i,
        irradiance: g * (1.0 + rng.gen_range(-0.02..0.02)),
        temperature: t + rng.gen_range(-1.0..1.0),
    }
}

/// Layouts the general model is trained on: modules per string and strings.
pub const LAYOUTS: (
    std::ops::RangeInclusive<usize>,
    std::ops::RangeInclusive<usize>,
) = (6..=30, 2..=6);

/// Labelled examples: `per_class` simulated measurements of every fault, each of an array of
/// `module`s in a layout drawn from [`LAYOUTS`] (or always `layout`).
pub fn dataset(
    module: &Module,
    layout: Option<(usize, usize)>,
    per_class: usize,
    seed: u64,
) -> (Array2<f64>, Array1<usize>) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..per_class {
        for fault in Fault::ALL {
            let (modules, strings) = layout.unwrap_or_else(|| {
                (
                    rng.gen_range(LAYOUTS.0.clone()),
                    rng.gen_range(LAYOUTS.1.clone()),
                )
            });
            let array = Array {
                module: *module,
                modules,
                strings,
            };
            let c = measure(&array, fault, &mut rng);
            rows.extend(features(&array, &Iec60891::of(&array), &c));
            labels.push(fault.index());
        }
    }
    let n = labels.len();
    let width = rows.len() / n.max(1);
    (
        Array2::from_shape_vec((n, width), rows).unwrap_or_else(|_| Array2::zeros((0, width))),
        Array1::from_vec(labels),
    )
}

/// Simulated curves per class the service's model is trained on.
pub const TRAIN_PER_CLASS: usize = 400;
/// Trees in the service's forest.
pub const TREES: usize = 80;

/// The process's diagnosis model of the reference module ([`TRAIN_PER_CLASS`] curves a class,
/// [`TREES`] trees, seed 1), trained on first use (≈3.5 s optimised, longer unoptimised) and
/// shared by every caller after: the API, job SQL and rule SQL. Callers that must not wait on
/// the first training call [`warm`] early.
pub fn shared() -> Result<&'static Diagnoser, String> {
    static MODEL: std::sync::OnceLock<Result<Diagnoser, String>> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| Diagnoser::train(Module::default(), TRAIN_PER_CLASS, TREES, 1))
        .as_ref()
        .map_err(|e| format!("training the PV model failed: {e}"))
}

/// Starts training the [`shared`] model on a thread of its own (once; later calls do nothing).
pub fn warm() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("pv-model".into())
            .spawn(|| {
                let _ = shared();
            });
    });
}

/// A trained diagnosis model for arrays of one module type, any layout.
#[allow(missing_debug_implementations)] // the forest has no Debug
pub struct Diagnoser {
    module: Module,
    forest: EnsembleLearner<DecisionTree<f64, usize>>,
}

/// A diagnosis.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnosis {
    pub fault: Fault,
    /// Share of the trees that voted for `fault`.
    pub confidence: f64,
    /// Every class's share of the votes.
    pub votes: Vec<(Fault, f64)>,
}

impl Diagnoser {
    /// Trains a forest of `trees` trees on `per_class` simulated curves of each class.
    pub fn train(
        module: Module,
        per_class: usize,
        trees: usize,
        seed: u64,
    ) -> Result<Diagnoser, String> {
        let (x, y) = dataset(&module, None, per_class, seed);
        let data = Dataset::new(x, y);
        let forest = EnsembleLearnerParams::new_fixed_rng(
            DecisionTree::params().max_depth(Some(14)),
            SmallRng::seed_from_u64(seed ^ 0x5eed),
        )
        .ensemble_size(trees)
        .bootstrap_proportion(0.7)
        .feature_proportion(0.5)
        .fit(&data)
        .map_err(|e| e.to_string())?;
        Ok(Diagnoser { module, forest })
    }

    pub fn module(&self) -> &Module {
        &self.module
    }

    /// The classes of many feature rows with their vote shares.
    pub fn classify(&self, x: &Array2<f64>) -> Vec<Diagnosis> {
        let mut votes = vec![[0usize; 6]; x.nrows()];
        for (tree, feats) in self.forest.models.iter().zip(&self.forest.model_features) {
            let sub = x.select(ndarray::Axis(1), feats);
            let pred: Array1<usize> = tree.predict(&sub);
            for (row, p) in votes.iter_mut().zip(pred.iter()) {
                row[(*p).min(5)] += 1;
            }
        }
        let total = self.forest.models.len().max(1) as f64;
        votes
            .into_iter()
            .map(|row| {
                let best = (0..6)
                    .max_by_key(|&k| (row[k], usize::MAX - k))
                    .unwrap_or(0);
                Diagnosis {
                    fault: Fault::ALL[best],
                    confidence: row[best] as f64 / total,
                    votes: Fault::ALL
                        .iter()
                        .zip(row)
                        .map(|(f, n)| (*f, n as f64 / total))
                        .collect(),
                }
            })
            .collect()
    }

    /// Diagnoses one measured curve of an array of `modules` × `strings` of this module.
    pub fn diagnose(
        &self,
        modules: usize,
        strings: usize,
        c: &Curve,
    ) -> Result<Diagnosis, CurveError> {
        check(c)?;
        if !(1..=100).contains(&modules) || !(1..=20).contains(&strings) {
            return Err(CurveError::Conditions(format!(
                "{modules} modules × {strings} strings: an array has 1..100 modules in each of 1..20 strings"
            )));
        }
        let array = Array {
            module: self.module,
            modules,
            strings,
        };
        let f = features(&array, &Iec60891::of(&array), c);
        let x = Array2::from_shape_vec((1, f.len()), f).map_err(|_| CurveError::NotFinite)?;
        self.classify(&x)
            .into_iter()
            .next()
            .ok_or(CurveError::NotFinite)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lambert_w_in_log_space() {
        for x in [-30.0, -1.0, 0.0, 0.5, 1.0, 2.0, 10.0, 100.0, 1000.0] {
            let w = lambert_w_exp(x);
            // w·e^w = e^x  <=>  ln w + w = x
            assert!((w.ln() + w - x).abs() < 1e-9, "{x}: {w}");
        }
    }

    #[test]
    fn module_curve_is_consistent_both_ways() {
        let d = Module::default().at(800.0, 40.0);
        let (isc, voc, vmp, imp) = d.key_points();
        assert!(isc > 4.0 && isc < 4.2, "{isc}");
        assert!(voc > 50.0 && voc < 60.0, "{voc}");
        assert!(vmp > 0.7 * voc && imp > 0.85 * isc);
        for v in [0.0, 10.0, 30.0, vmp, voc * 0.99] {
            let i = d.i_from_v(v);
            assert!((d.v_from_i(i) - v).abs() < 1e-6, "{v}");
        }
    }

    #[test]
    fn faults_shape_the_array_curve() {
        let a = Array {
            module: Module::default(),
            modules: 10,
            strings: 3,
        };
        let healthy = Condition::healthy(&a, 1000.0, 25.0);
        let h = a.simulate(&healthy, 200);
        let (isc_n, voc_n) = a.nominal();
        assert!((h.i[0] - isc_n).abs() < 0.01 * isc_n);
        assert!((h.v[199] - voc_n).abs() < 0.01 * voc_n);
        let mut open = healthy.clone();
        open.open[1] = true;
        let o = a.simulate(&open, 200);
        assert!((o.i[0] / h.i[0] - 2.0 / 3.0).abs() < 0.01);
        let mut short = healthy.clone();
        short.shorted[0][0] = true;
        short.shorted[1][0] = true;
        short.shorted[2][0] = true;
        let s = a.simulate(&short, 200);
        assert!((s.v[199] / h.v[199] - 0.9).abs() < 0.01);
        // IEC 60891: a healthy curve at 600 W/m², 50 °C corrected to STC lands near the STC
        // curve.
        let iec = Iec60891::of(&a);
        let hot = a.simulate(&Condition::healthy(&a, 600.0, 50.0), 200);
        let back = iec.correct(&hot, 1000.0, 25.0);
        assert!((back.i[0] - isc_n).abs() < 0.02 * isc_n, "{}", back.i[0]);
        let voc_back = open_circuit_voltage(&back.v, &back.i);
        assert!(
            (voc_back - voc_n).abs() < 0.02 * voc_n,
            "{voc_back} vs {voc_n}"
        );
    }

    #[test]
    fn the_forest_names_held_out_faults() {
        let a = Array {
            module: Module::default(),
            modules: 10,
            strings: 3,
        };
        let t = std::time::Instant::now();
        let d = Diagnoser::train(a.module, 150, 40, 1).unwrap();
        eprintln!("trained in {:?}", t.elapsed());
        // Held out: other seeds, one layout seen among many and any layout.
        let (x, y) = dataset(&a.module, Some((10, 3)), 30, 99);
        let (x2, y2) = dataset(&a.module, None, 30, 98);
        let x = ndarray::concatenate![ndarray::Axis(0), x, x2];
        let y = ndarray::concatenate![ndarray::Axis(0), y, y2];
        let got = d.classify(&x);
        let mut confusion = [[0usize; 6]; 6];
        for (g, want) in got.iter().zip(y.iter()) {
            confusion[*want][g.fault.index()] += 1;
        }
        let right: usize = (0..6).map(|k| confusion[k][k]).sum();
        let accuracy = right as f64 / y.len() as f64;
        eprintln!("accuracy {accuracy:.3}; confusion {confusion:?}");
        assert!(accuracy >= 0.9, "{accuracy}: {confusion:?}");
    }

    #[test]
    fn bad_curves_are_refused() {
        let mut c = Curve {
            v: vec![1.0; 5],
            i: vec![1.0; 5],
            irradiance: 800.0,
            temperature: 25.0,
        };
        assert_eq!(check(&c), Err(CurveError::TooFewPoints(5)));
        c.v = vec![1.0; 20];
        assert_eq!(check(&c), Err(CurveError::Lengths(20, 5)));
        c.i = vec![f64::NAN; 20];
        assert_eq!(check(&c), Err(CurveError::NotFinite));
        c.i = vec![1.0; 20];
        c.irradiance = 10.0;
        assert!(matches!(check(&c), Err(CurveError::Conditions(_))));
    }
}
