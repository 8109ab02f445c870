//! Time windows for `GROUP BY`: tumbling and hopping windows keep one accumulator per group
//! per hop ("pane") and combine the panes of a window when it closes; sliding windows keep the
//! values of the last `size` and emit on every message. Time is given by the caller (the
//! message's arrival time and a timer), so tests drive a simulated clock.
//!
//! The whole state serialises, so a clean shutdown saves it and the next start goes on.

use super::eval::{compare, number};
use super::sql::{AggKind, Window, WindowKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// The message a group's non-aggregate items are evaluated on: its latest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LastMsg {
    /// Topic.
    pub topic: String,
    /// Payload bytes.
    pub raw: Vec<u8>,
    /// Parsed payload.
    pub payload: Value,
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// Message id.
    pub message_id: String,
    /// The device's tags, kept for rules that call `attribute()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<crate::storage::TagMap>,
}

/// One aggregate's running state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Acc {
    count: u64,
    n: u64,
    sum: f64,
    sumsq: f64,
    min: Option<Value>,
    max: Option<Value>,
    first: Option<(i64, Value)>,
    last: Option<(i64, Value)>,
}

impl Acc {
    fn add(&mut self, t: i64, v: Option<&Value>) {
        let Some(v) = v else {
            // count(*): every message.
            self.count += 1;
            return;
        };
        if v.is_null() {
            return;
        }
        self.count += 1;
        let x = match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        if let Some(x) = x {
            self.n += 1;
            self.sum += x;
            self.sumsq += x * x;
        }
        if self
            .min
            .as_ref()
            .is_none_or(|m| compare(v, m) == Some(std::cmp::Ordering::Less))
        {
            self.min = Some(v.clone());
        }
        if self
            .max
            .as_ref()
            .is_none_or(|m| compare(v, m) == Some(std::cmp::Ordering::Greater))
        {
            self.max = Some(v.clone());
        }
        if self.first.as_ref().is_none_or(|(ft, _)| t < *ft) {
            self.first = Some((t, v.clone()));
        }
        if self.last.as_ref().is_none_or(|(lt, _)| t >= *lt) {
            self.last = Some((t, v.clone()));
        }
    }

    fn merge(&mut self, o: &Acc) {
        self.count += o.count;
        self.n += o.n;
        self.sum += o.sum;
        self.sumsq += o.sumsq;
        if let Some(v) = &o.min {
            if self
                .min
                .as_ref()
                .is_none_or(|m| compare(v, m) == Some(std::cmp::Ordering::Less))
            {
                self.min = Some(v.clone());
            }
        }
        if let Some(v) = &o.max {
            if self
                .max
                .as_ref()
                .is_none_or(|m| compare(v, m) == Some(std::cmp::Ordering::Greater))
            {
                self.max = Some(v.clone());
            }
        }
        if let Some((t, v)) = &o.first {
            if self.first.as_ref().is_none_or(|(ft, _)| t < ft) {
                self.first = Some((*t, v.clone()));
            }
        }
        if let Some((t, v)) = &o.last {
            if self.last.as_ref().is_none_or(|(lt, _)| t >= lt) {
                self.last = Some((*t, v.clone()));
            }
        }
    }

    fn result(&self, kind: AggKind) -> Value {
        let mean = || (self.n > 0).then(|| self.sum / self.n as f64);
        match kind {
            AggKind::Count => Value::from(self.count),
            AggKind::Sum => {
                if self.n == 0 {
                    Value::Null
                } else {
                    number(self.sum)
                }
            }
            AggKind::Avg => mean().map_or(Value::Null, number),
            AggKind::Min => self.min.clone().unwrap_or(Value::Null),
            AggKind::Max => self.max.clone().unwrap_or(Value::Null),
            AggKind::First => self.first.as_ref().map_or(Value::Null, |f| f.1.clone()),
            AggKind::Last => self.last.as_ref().map_or(Value::Null, |f| f.1.clone()),
            AggKind::Stddev => mean().map_or(Value::Null, |m| {
                number((self.sumsq / self.n as f64 - m * m).max(0.0).sqrt())
            }),
        }
    }
}

/// What a window emits for one group.
#[derive(Debug, Clone, PartialEq)]
pub struct Emit {
    /// Aggregate results, in [`super::sql::Query::aggregates`] order.
    pub aggs: Vec<Value>,
    /// The group's latest message in the window.
    pub last: LastMsg,
    /// Window start and end, ms.
    pub window: (i64, i64),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Group {
    /// Pane index (start / hop) -> accumulators (tumbling, hopping).
    panes: BTreeMap<i64, (Vec<Acc>, LastMsg)>,
    /// Values of the last `size` (sliding): time, arguments.
    values: VecDeque<(i64, Vec<Option<Value>>)>,
}

/// Why a message was not taken by a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its window was already emitted (the clock went back, or it came late).
    Late,
    /// The rule has as many groups as it may keep.
    TooManyGroups,
    /// A sliding window holds as many values as it may keep.
    TooManyValues,
}

impl Refused {
    /// The reason, as counted.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Late => "late for its window",
            Refused::TooManyGroups => "too many groups in the window",
            Refused::TooManyValues => "too many values in the sliding window",
        }
    }
}

/// The windows of one rule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Windows {
    kind: WindowKind,
    size_ms: i64,
    hop_ms: i64,
    aggs: Vec<AggKind>,
    groups: HashMap<String, Group>,
    /// Panes before this index are emitted (tumbling, hopping).
    closed_before: Option<i64>,
    /// Most groups kept.
    max_groups: usize,
    /// Most values kept per sliding group.
    max_values: usize,
}

impl Windows {
    /// Empty windows of `w` for the aggregates `aggs`.
    pub fn new(w: Window, aggs: Vec<AggKind>, max_groups: usize, max_values: usize) -> Self {
        Self {
            kind: w.kind,
            size_ms: w.size_ms,
            hop_ms: w.hop_ms,
            aggs,
            groups: HashMap::new(),
            closed_before: None,
            max_groups,
            max_values,
        }
    }

    /// True when state saved for `w` and `aggs` can be restored into this rule.
    pub fn fits(&self, w: Window, aggs: &[AggKind]) -> bool {
        self.kind == w.kind
            && self.size_ms == w.size_ms
            && self.hop_ms == w.hop_ms
            && self.aggs == aggs
    }

    /// Groups held.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// Adds a message of group `key` at time `t` with its aggregate arguments (None for
    /// `count(*)`). A sliding window emits at once; the others emit from [`Windows::tick`].
    pub fn push(
        &mut self,
        t: i64,
        key: String,
        args: Vec<Option<Value>>,
        last: LastMsg,
    ) -> Result<Option<Emit>, Refused> {
        if !self.groups.contains_key(&key) && self.groups.len() >= self.max_groups {
            return Err(Refused::TooManyGroups);
        }
        if self.kind == WindowKind::Sliding {
            let g = self.groups.entry(key).or_default();
            while g
                .values
                .front()
                .is_some_and(|(vt, _)| *vt <= t - self.size_ms)
            {
                g.values.pop_front();
            }
            if g.values.len() >= self.max_values {
                return Err(Refused::TooManyValues);
            }
            g.values.push_back((t, args));
            let mut accs = vec![Acc::default(); self.aggs.len()];
            for (vt, vals) in &g.values {
                for (a, v) in accs.iter_mut().zip(vals) {
                    a.add(*vt, v.as_ref());
                }
            }
            return Ok(Some(Emit {
                aggs: accs
                    .iter()
                    .zip(&self.aggs)
                    .map(|(a, k)| a.result(*k))
                    .collect(),
                last,
                window: (t - self.size_ms, t),
            }));
        }
        let pane = t.div_euclid(self.hop_ms);
        if self.closed_before.is_some_and(|c| pane < c) {
            return Err(Refused::Late);
        }
        let n = self.aggs.len();
        let g = self.groups.entry(key).or_default();
        let (accs, l) = g
            .panes
            .entry(pane)
            .or_insert_with(|| (vec![Acc::default(); n], last.clone()));
        for (a, v) in accs.iter_mut().zip(&args) {
            a.add(t, v.as_ref());
        }
        *l = last;
        Ok(None)
    }

    /// Emits every window that ended at or before `now`, one row per group with data in it.
    pub fn tick(&mut self, now: i64) -> Vec<Emit> {
        let mut out = Vec::new();
        if self.kind == WindowKind::Sliding {
            // Forget groups whose values all fell out of the window.
            let size = self.size_ms;
            for g in self.groups.values_mut() {
                while g.values.front().is_some_and(|(vt, _)| *vt <= now - size) {
                    g.values.pop_front();
                }
            }
            self.groups.retain(|_, g| !g.values.is_empty());
            return out;
        }
        let per_window = self.size_ms / self.hop_ms;
        // The pane at `now` is still open; windows ending at or before it are due.
        let open = now.div_euclid(self.hop_ms);
        loop {
            let earliest = self
                .groups
                .values()
                .filter_map(|g| g.panes.keys().next())
                .min()
                .copied();
            let Some(earliest) = earliest else {
                self.closed_before = Some(self.closed_before.map_or(open, |c| c.max(open)));
                break;
            };
            // The first window holding `earliest` that is not yet emitted ends after pane
            // `end`: windows are emitted by their last pane.
            let mut end = earliest;
            if let Some(c) = self.closed_before {
                end = end.max(c);
            }
            if end >= open {
                break;
            }
            let first_pane = end - per_window + 1;
            for g in self.groups.values() {
                let mut accs: Option<Vec<Acc>> = None;
                let mut last: Option<&LastMsg> = None;
                for (_, (a, l)) in g.panes.range(first_pane..=end) {
                    match &mut accs {
                        None => accs = Some(a.clone()),
                        Some(acc) => {
                            for (x, y) in acc.iter_mut().zip(a) {
                                x.merge(y);
                            }
                        }
                    }
                    last = Some(l);
                }
                if let (Some(accs), Some(last)) = (accs, last) {
                    out.push(Emit {
                        aggs: accs
                            .iter()
                            .zip(&self.aggs)
                            .map(|(a, k)| a.result(*k))
                            .collect(),
                        last: last.clone(),
                        window: (first_pane * self.hop_ms, (end + 1) * self.hop_ms),
                    });
                }
            }
            // Pane `first_pane` takes part in no later window.
            for g in self.groups.values_mut() {
                while g.panes.keys().next().is_some_and(|p| *p <= first_pane) {
                    g.panes.pop_first();
                }
            }
            self.groups.retain(|_, g| !g.panes.is_empty());
            self.closed_before = Some(end + 1);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(dn: &str) -> LastMsg {
        LastMsg {
            topic: format!("/p/{dn}/thing/event/property/post"),
            raw: Vec::new(),
            payload: Value::Null,
            product_key: "p".into(),
            device_name: dn.into(),
            message_id: "1".into(),
            tags: None,
        }
    }

    const ALL: [AggKind; 8] = [
        AggKind::Count,
        AggKind::Sum,
        AggKind::Avg,
        AggKind::Min,
        AggKind::Max,
        AggKind::First,
        AggKind::Last,
        AggKind::Stddev,
    ];

    fn push(w: &mut Windows, t: i64, key: &str, v: Value) -> Option<Emit> {
        w.push(t, key.into(), vec![Some(v); 8], msg(key)).unwrap()
    }

    #[test]
    fn tumbling_per_device_per_minute() {
        let spec = Window {
            kind: WindowKind::Tumbling,
            size_ms: 60_000,
            hop_ms: 60_000,
        };
        let mut w = Windows::new(spec, ALL.to_vec(), 100, 100);
        push(&mut w, 1_000, "a", json!(2));
        push(&mut w, 2_000, "a", json!(4));
        push(&mut w, 3_000, "b", json!(10));
        push(&mut w, 59_999, "a", json!(6));
        assert!(w.tick(59_999).is_empty(), "the window is still open");
        push(&mut w, 60_000, "a", json!(100));
        let mut out = w.tick(60_000);
        out.sort_by(|x, y| x.last.device_name.cmp(&y.last.device_name));
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0].aggs,
            vec![
                json!(3),
                json!(12),
                json!(4),
                json!(2),
                json!(6),
                json!(2),
                json!(6),
                json!(1.6329931618554525)
            ]
        );
        assert_eq!(out[0].window, (0, 60_000));
        assert_eq!(out[1].aggs[0], json!(1));
        // A message for a window already emitted is refused, not folded into the next one.
        assert_eq!(
            w.push(59_000, "a".into(), vec![None; 8], msg("a")),
            Err(Refused::Late)
        );
        // An idle hour emits nothing for empty windows, then the next window comes out.
        let out = w.tick(3_600_000);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].aggs[1], json!(100));
        assert_eq!(out[0].window, (60_000, 120_000));
        assert!(w.tick(7_200_000).is_empty());
        assert_eq!(w.groups(), 0);
    }

    #[test]
    fn hopping_windows_overlap() {
        let spec = Window {
            kind: WindowKind::Hopping,
            size_ms: 30_000,
            hop_ms: 10_000,
        };
        let mut w = Windows::new(spec, vec![AggKind::Count, AggKind::Sum], 100, 100);
        for (t, v) in [(5_000, 1), (15_000, 2), (25_000, 3), (35_000, 4)] {
            w.push(t, "k".into(), vec![None, Some(json!(v))], msg("k"))
                .unwrap();
        }
        let out = w.tick(40_000);
        let got: Vec<(i64, i64, Value, Value)> = out
            .iter()
            .map(|e| (e.window.0, e.window.1, e.aggs[0].clone(), e.aggs[1].clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (-20_000, 10_000, json!(1), json!(1)),
                (-10_000, 20_000, json!(2), json!(3)),
                (0, 30_000, json!(3), json!(6)),
                (10_000, 40_000, json!(3), json!(9)),
            ]
        );
        let out = w.tick(70_000);
        let got: Vec<(i64, Value)> = out
            .iter()
            .map(|e| (e.window.0, e.aggs[1].clone()))
            .collect();
        assert_eq!(got, vec![(20_000, json!(7)), (30_000, json!(4))]);
    }

    #[test]
    fn sliding_emits_for_every_message_over_the_last_size() {
        let spec = Window {
            kind: WindowKind::Sliding,
            size_ms: 10_000,
            hop_ms: 10_000,
        };
        let mut w = Windows::new(spec, vec![AggKind::Avg, AggKind::Max], 100, 3);
        assert_eq!(push2(&mut w, 0, 10), vec![json!(10), json!(10)]);
        assert_eq!(push2(&mut w, 5_000, 20), vec![json!(15), json!(20)]);
        assert_eq!(push2(&mut w, 12_000, 30), vec![json!(25), json!(30)]);
        assert_eq!(push2(&mut w, 13_000, 40), vec![json!(30), json!(40)]);
        // Three values held: a fourth within the window is refused.
        assert_eq!(
            w.push(14_000, "k".into(), vec![Some(json!(1)); 2], msg("k")),
            Err(Refused::TooManyValues)
        );
        w.tick(100_000);
        assert_eq!(w.groups(), 0);
    }

    fn push2(w: &mut Windows, t: i64, v: i64) -> Vec<Value> {
        w.push(t, "k".into(), vec![Some(json!(v)); 2], msg("k"))
            .unwrap()
            .unwrap()
            .aggs
    }

    #[test]
    fn group_limit_and_state_round_trip() {
        let spec = Window {
            kind: WindowKind::Tumbling,
            size_ms: 1_000,
            hop_ms: 1_000,
        };
        let mut w = Windows::new(spec, vec![AggKind::Count], 2, 10);
        w.push(1, "a".into(), vec![None], msg("a")).unwrap();
        w.push(1, "b".into(), vec![None], msg("b")).unwrap();
        assert_eq!(
            w.push(1, "c".into(), vec![None], msg("c")),
            Err(Refused::TooManyGroups)
        );
        let saved = serde_json::to_string(&w).unwrap();
        let mut back: Windows = serde_json::from_str(&saved).unwrap();
        assert!(back.fits(spec, &[AggKind::Count]));
        assert!(!back.fits(spec, &[AggKind::Sum]));
        assert_eq!(back.tick(1_000).len(), 2);
    }
}
