//! Analytics jobs: SQL (polars' SQL context) over the fleet's property history and its dimension
//! tables, written as a Parquet result table.
//!
//! Tables a job sees:
//! - `history`: one row per stored point: `product_key`, `device_name`, `identifier`,
//!   `ts` (timestamp, ms, UTC), `value` (double: numbers, and booleans as 0/1; null otherwise) and
//!   `text` (text, enum names, dates, and structs/arrays as JSON; null for numbers);
//! - `products`: `product_key`, `name`, `node_type`, `data_format`, `description`;
//! - `devices`: `product_key`, `device_name`, `status`, `enabled`, `created_at`,
//!   `last_online_at` (timestamps, ms, UTC; null when never), `tags` (JSON object);
//! - `device_tags`: `product_key`, `device_name`, `tag_key`, `tag_value`, one row per tag.
//!
//! `history` is read through a [`HistorySource`] with **pushdown**: the job's time window and the
//! conditions of the query's `WHERE`/`JOIN` that polars pushes to the scan (`ts` compared with a
//! constant; `product_key`, `device_name`, `identifier` equal to a constant or `IN` a list) narrow
//! what the source reads; the whole predicate is then applied to what it read.

use polars::prelude::*;
use polars::sql::SQLContext;
use std::any::Any;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The history table's name.
pub const HISTORY: &str = "history";

/// A SQL text the SQL context refused, with where (1-based; 0 when polars did not say).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SqlError {
    /// polars' reason.
    pub message: String,
    /// Line of the offending token.
    pub line: u64,
    /// Column of the offending token.
    pub column: u64,
}

/// Why a job run failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The SQL text is not a query the context can plan.
    #[error("SQL error at line {}, column {}: {}", .0.line, .0.column, .0.message)]
    Sql(SqlError),
    /// The history source failed or a limit was reached.
    #[error("{0}")]
    Source(String),
    /// polars failed while running the query.
    #[error("{0}")]
    Polars(#[from] PolarsError),
    /// The result could not be written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the history source is asked for: points in `[from, to]` (ms), of these products,
/// devices and properties (`None`: all).
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// Earliest time, ms.
    pub from: i64,
    /// Latest time, ms.
    pub to: i64,
    /// Product keys.
    pub products: Option<BTreeSet<String>>,
    /// Device names.
    pub devices: Option<BTreeSet<String>>,
    /// Property identifiers.
    pub identifiers: Option<BTreeSet<String>>,
}

impl Filter {
    /// Every point in `[from, to]`.
    pub fn window(from: i64, to: i64) -> Self {
        Self {
            from,
            to,
            products: None,
            devices: None,
            identifiers: None,
        }
    }

    /// Whether a name passes one of the sets.
    pub fn admits(set: &Option<BTreeSet<String>>, name: &str) -> bool {
        set.as_ref().is_none_or(|s| s.contains(name))
    }
}

/// The columns of one series' points, built by a [`HistorySource`].
#[derive(Debug, Default)]
pub struct HistoryRows {
    /// The series rows belong to (a series pushed in one run is kept once).
    keys: Vec<(String, String, String)>,
    /// Per row: its series in `keys`.
    series: Vec<IdxSize>,
    ts: Vec<i64>,
    value: Vec<Option<f64>>,
    text: Vec<Option<String>>,
}

impl HistoryRows {
    /// Rows so far.
    pub fn len(&self) -> usize {
        self.ts.len()
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    /// Adds one point of a series: a number (`value`) or a text (`text`).
    pub fn push(
        &mut self,
        series: (&str, &str, &str),
        ts: i64,
        value: Option<f64>,
        text: Option<String>,
    ) {
        let same = self
            .keys
            .last()
            .is_some_and(|k| k.0 == series.0 && k.1 == series.1 && k.2 == series.2);
        if !same {
            self.keys.push((
                series.0.to_owned(),
                series.1.to_owned(),
                series.2.to_owned(),
            ));
        }
        self.series.push((self.keys.len() - 1) as IdxSize);
        self.ts.push(ts);
        self.value.push(value);
        self.text.push(text);
    }

    fn frame(self) -> PolarsResult<DataFrame> {
        // The key columns are gathered from one value per series, not built per row.
        let idx = IdxCa::from_vec("".into(), self.series);
        let keys = &self.keys;
        let key = |name: &str, part: fn(&(String, String, String)) -> &str| {
            StringChunked::from_iter_values(name.into(), keys.iter().map(part))
                .take(&idx)
                .map(|c| c.into_column())
        };
        let ts = Int64Chunked::from_vec("ts".into(), self.ts)
            .into_datetime(TimeUnit::Milliseconds, Some(polars::prelude::TimeZone::UTC));
        DataFrame::new_infer_height(vec![
            key("product_key", |k| &k.0)?,
            key("device_name", |k| &k.1)?,
            key("identifier", |k| &k.2)?,
            ts.into_column(),
            Column::new("value".into(), self.value),
            Column::new("text".into(), self.text),
        ])
    }
}

/// Where a job's `history` rows come from (the cloud's time-series store).
pub trait HistorySource: Send + Sync {
    /// The points `filter` admits; an error (with the reason) when more than `max_rows` would
    /// be read.
    fn load(&self, filter: &Filter, max_rows: usize) -> Result<HistoryRows, String>;
}

/// Rows of the fleet's dimension tables.
#[derive(Debug, Default, Clone)]
pub struct Dimensions {
    /// `(product_key, name, node_type, data_format, description)`.
    pub products: Vec<[String; 5]>,
    /// Devices.
    pub devices: Vec<DeviceRow>,
}

/// One device of the `devices` table.
#[derive(Debug, Default, Clone)]
pub struct DeviceRow {
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// `online`, `offline`, `unactive`.
    pub status: String,
    /// Whether it may connect.
    pub enabled: bool,
    /// Registered at, ms.
    pub created_at: i64,
    /// Last connected at, ms.
    pub last_online_at: Option<i64>,
    /// Tags: key → value.
    pub tags: Vec<(String, String)>,
}

fn utc_ms(name: &str, v: Vec<Option<i64>>) -> Column {
    Int64Chunked::from_iter_options(name.into(), v.into_iter())
        .into_datetime(TimeUnit::Milliseconds, Some(polars::prelude::TimeZone::UTC))
        .into_column()
}

impl Dimensions {
    fn frames(&self) -> PolarsResult<[(&'static str, DataFrame); 3]> {
        let col = |i: usize| -> Vec<&str> { self.products.iter().map(|p| p[i].as_str()).collect() };
        let products = DataFrame::new_infer_height(vec![
            Column::new("product_key".into(), col(0)),
            Column::new("name".into(), col(1)),
            Column::new("node_type".into(), col(2)),
            Column::new("data_format".into(), col(3)),
            Column::new("description".into(), col(4)),
        ])?;
        let d = &self.devices;
        let tags_json: Vec<String> = d
            .iter()
            .map(|x| {
                let m: serde_json::Map<String, serde_json::Value> = x
                    .tags
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect();
                serde_json::Value::Object(m).to_string()
            })
            .collect();
        let devices = DataFrame::new_infer_height(vec![
            Column::new(
                "product_key".into(),
                d.iter().map(|x| x.product_key.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "device_name".into(),
                d.iter().map(|x| x.device_name.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "status".into(),
                d.iter().map(|x| x.status.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "enabled".into(),
                d.iter().map(|x| x.enabled).collect::<Vec<_>>(),
            ),
            utc_ms("created_at", d.iter().map(|x| Some(x.created_at)).collect()),
            utc_ms(
                "last_online_at",
                d.iter().map(|x| x.last_online_at).collect(),
            ),
            Column::new("tags".into(), tags_json),
        ])?;
        let tags: Vec<(&DeviceRow, &(String, String))> = d
            .iter()
            .flat_map(|x| x.tags.iter().map(move |t| (x, t)))
            .collect();
        let device_tags = DataFrame::new_infer_height(vec![
            Column::new(
                "product_key".into(),
                tags.iter()
                    .map(|(x, _)| x.product_key.as_str())
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "device_name".into(),
                tags.iter()
                    .map(|(x, _)| x.device_name.as_str())
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "tag_key".into(),
                tags.iter().map(|(_, t)| t.0.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "tag_value".into(),
                tags.iter().map(|(_, t)| t.1.as_str()).collect::<Vec<_>>(),
            ),
        ])?;
        Ok([
            ("products", products),
            ("devices", devices),
            ("device_tags", device_tags),
        ])
    }
}

/// The `history` table's columns.
pub fn history_schema() -> Schema {
    Schema::from_iter([
        Field::new("product_key".into(), DataType::String),
        Field::new("device_name".into(), DataType::String),
        Field::new("identifier".into(), DataType::String),
        Field::new(
            "ts".into(),
            DataType::Datetime(TimeUnit::Milliseconds, Some(polars::prelude::TimeZone::UTC)),
        ),
        Field::new("value".into(), DataType::Float64),
        Field::new("text".into(), DataType::String),
    ])
}

/// What the `history` scans of one run read.
#[derive(Debug, Default)]
pub struct ScanStats {
    /// Rows read from the source.
    pub rows: AtomicU64,
    /// Scans (one per reference to `history` in the plan).
    pub scans: AtomicU64,
    /// The filters the source was asked for, last first.
    pub filters: Mutex<Vec<Filter>>,
}

/// The `history` table. A probe (planning only) lets polars push predicates into it, so the
/// optimised plan shows what each reference to the table filters on; the scan that runs takes
/// the union of those as its filter and leaves the full predicates to polars, which applies
/// them to what it read.
struct HistoryScan {
    source: Arc<dyn HistorySource>,
    filter: Filter,
    max_rows: usize,
    stats: Arc<ScanStats>,
    probe: bool,
}

/// A column name and literal of `col <op> lit` (or `lit <op> col`, the operator turned round).
fn comparison(
    left: &Expr,
    op: Operator,
    right: &Expr,
) -> Option<(String, Operator, AnyValue<'static>)> {
    let turned = |op: Operator| match op {
        Operator::Gt => Operator::Lt,
        Operator::Lt => Operator::Gt,
        Operator::GtEq => Operator::LtEq,
        Operator::LtEq => Operator::GtEq,
        o => o,
    };
    match (strip(left), strip(right)) {
        (Expr::Column(c), Expr::Literal(l)) => Some((c.to_string(), op, literal(l)?)),
        (Expr::Literal(l), Expr::Column(c)) => Some((c.to_string(), turned(op), literal(l)?)),
        (Expr::Column(c), r) => Some((c.to_string(), op, AnyValue::Int64(parsed_time(r)?))),
        (l, Expr::Column(c)) => Some((c.to_string(), turned(op), AnyValue::Int64(parsed_time(l)?))),
        _ => None,
    }
}

/// An expression without the casts polars put round a column or a literal to match types.
fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Cast { expr, .. } | Expr::Alias(expr, _) => strip(expr),
        e => e,
    }
}

/// A text literal turned into a time by the SQL layer (`ts >= '2026-12-01 10:00'`), in ms.
fn parsed_time(e: &Expr) -> Option<i64> {
    let Expr::Function { input, function } = strip(e) else {
        return None;
    };
    if !format!("{function}").starts_with("str.strptime") {
        return None;
    }
    let Some(Expr::Literal(l)) = input.first().map(strip) else {
        return None;
    };
    let v = literal(l)?;
    parse_time(v.get_str()?)
}

/// `YYYY-MM-DD`, with ` HH:MM[:SS[.fff]]` or `THH:MM...`, optionally `Z`: ms, UTC.
pub fn parse_time(text: &str) -> Option<i64> {
    let t = text.trim().trim_end_matches('Z');
    let (date, time) = match t.find([' ', 'T']) {
        Some(i) => (&t[..i], &t[i + 1..]),
        None => (t, ""),
    };
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: u8 = d.next()?.parse().ok()?;
    let day: u8 = d.next()?.parse().ok()?;
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let mut ms = ironlink_shared::time::days_from_civil(y, m, day) * 86_400_000;
    if !time.is_empty() {
        let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
        let mut parts = hms.split(':');
        let h: i64 = parts.next()?.parse().ok()?;
        let mi: i64 = parts.next()?.parse().ok()?;
        let sec: i64 = parts.next().map_or(Some(0), |x| x.parse().ok())?;
        if parts.next().is_some() || h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        let milli: i64 = if frac.is_empty() {
            0
        } else {
            let digits: String = frac.chars().chain("000".chars()).take(3).collect();
            digits.parse().ok()?
        };
        ms += ((h * 60 + mi) * 60 + sec) * 1000 + milli;
    }
    Some(ms)
}

fn literal(l: &LiteralValue) -> Option<AnyValue<'static>> {
    match l {
        LiteralValue::Scalar(s) => Some(s.value().clone().into_static()),
        LiteralValue::Series(_) | LiteralValue::Range(_) => None,
        l => l
            .clone()
            .materialize()
            .to_any_value()
            .map(|v| v.into_static()),
    }
}

/// Milliseconds of a time literal (a datetime in any unit, or a whole number taken as ms).
fn millis(v: &AnyValue<'_>) -> Option<i64> {
    match v {
        AnyValue::Datetime(x, unit, _) | AnyValue::DatetimeOwned(x, unit, _) => Some(match unit {
            TimeUnit::Nanoseconds => x.div_euclid(1_000_000),
            TimeUnit::Microseconds => x.div_euclid(1_000),
            TimeUnit::Milliseconds => *x,
        }),
        AnyValue::Date(d) => Some(i64::from(*d) * 86_400_000),
        v if v.is_integer() => v.extract::<i64>(),
        _ => None,
    }
}

/// The texts of a series of strings, or of its one list of strings (what `IN (...)` becomes).
fn texts(s: &Series) -> Option<BTreeSet<String>> {
    if let Ok(l) = s.list() {
        if l.len() != 1 {
            return None;
        }
        return texts(&l.get_as_series(0)?);
    }
    let s = s.str().ok()?;
    (0..s.len()).map(|i| s.get(i).map(str::to_owned)).collect()
}

/// The set a name column is narrowed to by `==` with a string or `IN` a list of strings.
fn names(v: &AnyValue<'_>) -> Option<BTreeSet<String>> {
    match v {
        AnyValue::String(s) => Some(BTreeSet::from([(*s).to_owned()])),
        AnyValue::StringOwned(s) => Some(BTreeSet::from([s.to_string()])),
        AnyValue::List(s) => texts(s),
        _ => None,
    }
}

fn narrow_set(slot: &mut Option<BTreeSet<String>>, set: BTreeSet<String>) {
    *slot = Some(match slot.take() {
        Some(old) => old.intersection(&set).cloned().collect(),
        None => set,
    });
}

/// Narrows `f` by the parts of a predicate (a conjunction) it understands; the rest is left to
/// the filter applied after the read.
pub fn narrow(f: &mut Filter, e: &Expr) {
    match e {
        Expr::BinaryExpr {
            left,
            op: Operator::And | Operator::LogicalAnd,
            right,
        } => {
            narrow(f, left);
            narrow(f, right);
        }
        Expr::BinaryExpr { left, op, right } => {
            let Some((col, op, v)) = comparison(left, *op, right) else {
                return;
            };
            match col.as_str() {
                "ts" => {
                    let Some(ms) = millis(&v) else { return };
                    match op {
                        Operator::Gt => f.from = f.from.max(ms.saturating_add(1)),
                        Operator::GtEq => f.from = f.from.max(ms),
                        Operator::Lt => f.to = f.to.min(ms.saturating_sub(1)),
                        Operator::LtEq => f.to = f.to.min(ms),
                        Operator::Eq | Operator::EqValidity => {
                            f.from = f.from.max(ms);
                            f.to = f.to.min(ms);
                        }
                        _ => {}
                    }
                }
                name @ ("product_key" | "device_name" | "identifier")
                    if matches!(op, Operator::Eq | Operator::EqValidity) =>
                {
                    let Some(set) = names(&v) else { return };
                    let slot = match name {
                        "product_key" => &mut f.products,
                        "device_name" => &mut f.devices,
                        _ => &mut f.identifiers,
                    };
                    narrow_set(slot, set);
                }
                _ => {}
            }
        }
        Expr::Function { input, function } if format!("{function}").starts_with("is_in") => {
            let (Some(Expr::Column(c)), Some(Expr::Literal(l))) =
                (input.first().map(strip), input.get(1).map(strip))
            else {
                return;
            };
            let set = match l {
                LiteralValue::Series(s) => texts(s),
                l => literal(l).and_then(|v| names(&v)),
            };
            let Some(set) = set else { return };
            let slot = match c.as_str() {
                "product_key" => &mut f.products,
                "device_name" => &mut f.devices,
                "identifier" => &mut f.identifiers,
                _ => return,
            };
            narrow_set(slot, set);
        }
        _ => {}
    }
}

impl AnonymousScan for HistoryScan {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self, _infer_schema_length: Option<usize>) -> PolarsResult<SchemaRef> {
        Ok(Arc::new(history_schema()))
    }

    fn allows_predicate_pushdown(&self) -> bool {
        self.probe
    }

    fn scan(&self, args: AnonymousScanArgs) -> PolarsResult<DataFrame> {
        if self.probe {
            polars_bail!(ComputeError: "the planning probe of history was executed");
        }
        let filter = &self.filter;
        self.stats.scans.fetch_add(1, Ordering::Relaxed);
        let read = if filter.from > filter.to
            || [&filter.products, &filter.devices, &filter.identifiers]
                .iter()
                .any(|s| s.as_ref().is_some_and(BTreeSet::is_empty))
        {
            HistoryRows::default()
        } else {
            let used = self.stats.rows.load(Ordering::Relaxed);
            let left = self
                .max_rows
                .saturating_sub(usize::try_from(used).unwrap_or(usize::MAX));
            self.source
                .load(filter, left)
                .map_err(|e| polars_err!(ComputeError: "{e}"))?
        };
        self.stats
            .rows
            .fetch_add(read.len() as u64, Ordering::Relaxed);
        if let Ok(mut f) = self.stats.filters.lock() {
            f.insert(0, filter.clone());
        }
        let mut df = read.frame()?;
        if let Some(cols) = args.with_columns {
            df = df.select(cols.iter().cloned())?;
        }
        if let Some(n) = args.n_rows {
            df = df.head(Some(n));
        }
        Ok(df)
    }
}

/// The predicates the optimiser pushed into each `history` probe of a plan (`None`: a
/// reference to the table without any).
fn pushed(lf: LazyFrame) -> PolarsResult<Vec<Option<Expr>>> {
    use polars_plan::dsl::FileScanIR;
    use polars_plan::plans::IR;
    let plan = lf.to_alp_optimized()?;
    let mut out = Vec::new();
    let mut todo = vec![plan.lp_top];
    let mut seen = std::collections::HashSet::new();
    while let Some(node) = todo.pop() {
        if !seen.insert(node.0) {
            continue;
        }
        let ir = plan.lp_arena.get(node);
        if let IR::Scan {
            predicate,
            scan_type,
            ..
        } = ir
        {
            if let FileScanIR::Anonymous { function, .. } = scan_type.as_ref() {
                if function.as_any().is::<HistoryScan>() {
                    out.push(predicate.as_ref().map(|p| p.to_expr(&plan.expr_arena)));
                }
            }
        }
        todo.extend(ir.inputs());
    }
    Ok(out)
}

/// The smallest filter that covers every reference's own.
fn union(window: (i64, i64), each: &[Option<Expr>]) -> Filter {
    let mut all: Option<Filter> = None;
    for p in each {
        let mut f = Filter::window(window.0, window.1);
        if let Some(p) = p {
            narrow(&mut f, p);
        }
        all = Some(match all {
            None => f,
            Some(a) => {
                let join = |x: Option<BTreeSet<String>>, y: Option<BTreeSet<String>>| match (x, y) {
                    (Some(x), Some(y)) => Some(x.union(&y).cloned().collect()),
                    _ => None,
                };
                Filter {
                    from: a.from.min(f.from),
                    to: a.to.max(f.to),
                    products: join(a.products, f.products),
                    devices: join(a.devices, f.devices),
                    identifiers: join(a.identifiers, f.identifiers),
                }
            }
        });
    }
    all.unwrap_or_else(|| Filter::window(window.0, window.1))
}

/// Line and column of an error polars reported, from sqlparser's "Line: L, Column: C", else
/// from the first place the column or table it names (in quotes) appears in `sql`.
fn locate(message: &str, sql: &str) -> (u64, u64) {
    let after = |key: &str| -> Option<u64> {
        let i = message.find(key)? + key.len();
        let digits: String = message[i..]
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    if let (Some(l), Some(c)) = (after("Line:"), after("Column:")) {
        return (l, c);
    }
    for q in ['"', '\'', '`'] {
        let mut parts = message.split(q);
        let _ = parts.next();
        if let Some(name) = parts.next().filter(|n| !n.is_empty() && n.len() < 128) {
            let lower = sql.to_ascii_lowercase();
            if let Some(at) = lower.find(&name.to_ascii_lowercase()) {
                let before = &sql[..at];
                let line = before.matches('\n').count() as u64 + 1;
                let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u64 + 1;
                return (line, col);
            }
        }
    }
    (0, 0)
}

fn sql_error(e: &PolarsError, sql: &str) -> SqlError {
    let message = e.to_string();
    let (line, column) = locate(&message, sql);
    SqlError {
        message,
        line,
        column,
    }
}

/// `changepoints(ts, value)`, an aggregate: the times (RFC 3339, comma-separated, oldest first)
/// where the group's signal, ordered by `ts`, changes its mean: ruptures' `Window` with the l2
/// cost, width 100 (less for short groups), jump 5, and the BIC-like default penalty of the
/// change-point API. Null times or values, NaN and infinities are skipped; fewer than 8 points
/// give an empty text.
fn changepoints_of(s: &[Column]) -> PolarsResult<Column> {
    use crate::changepoint::{self, CostKind, Window};
    polars_ensure!(s.len() == 2, InvalidOperation: "changepoints(ts, value) takes two arguments");
    let points = time_ordered(&s[0], &s[1])?;
    let values: Vec<f64> = points.iter().map(|p| p.1).collect();
    let n = values.len();
    let mut text = String::new();
    if n >= 8 {
        let found = changepoint::find(&values, CostKind::L2, Window::for_points(n), None, None)
            .map_err(|e| polars_err!(ComputeError: "changepoints: {e}"))?;
        let times: Vec<String> = found
            .starts
            .iter()
            .filter_map(|b| points.get(*b))
            .map(|p| rfc3339(p.0))
            .collect();
        text = times.join(",");
    }
    Ok(Column::new(s[0].name().clone(), [text]))
}

/// A group's `(ts ms, value)` points ordered by time; null times or values, NaN and infinities
/// left out.
fn time_ordered(ts: &Column, values: &Column) -> PolarsResult<Vec<(i64, f64)>> {
    let ts = ts.cast(&DataType::Int64)?;
    let vs = values.cast(&DataType::Float64)?;
    let mut points: Vec<(i64, f64)> = ts
        .i64()?
        .iter()
        .zip(vs.f64()?.iter())
        .filter_map(|(t, v)| Some((t?, v?)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    points.sort_by_key(|p| p.0);
    Ok(points)
}

/// The first non-null value of a column as a double (a constant argument arrives as a column).
fn first_number(c: &Column) -> PolarsResult<Option<f64>> {
    let c = c.cast(&DataType::Float64)?;
    let first = c.f64()?.iter().flatten().next();
    Ok(first)
}

/// Lag count of a single-series anomaly model over `n` points: as many as the training rule
/// (20 windows per weight) allows, at most the service's 16; 0 when `n` is too short.
fn anomaly_lags(n: usize) -> usize {
    (n / 21).saturating_sub(1).min(16)
}

/// `anomalies(ts, value[, sensitivity])`, an aggregate: the times (RFC 3339, comma-separated,
/// oldest first) of the group's point anomalies. The group's series, ordered by `ts`, trains the
/// pooled model of the monitors on itself (robust normalisation, differencing when it trends,
/// a ridge autoregression on up to 16 lags) and is then scored online at `sensitivity` (0.01,
/// 0.03 or 0.05; default 0.03), spikes' recoveries not flagged. Skipped points as for
/// `changepoints`; fewer than 42 points give an empty text.
fn anomalies_of(s: &[Column]) -> PolarsResult<Column> {
    use crate::anomaly::{Model, Normal, Scorer, Train};
    polars_ensure!(
        s.len() == 2 || s.len() == 3,
        InvalidOperation: "anomalies(ts, value[, sensitivity]) takes two or three arguments"
    );
    let level = match s.get(2) {
        None => 1,
        Some(c) => match first_number(c)? {
            None => 1,
            Some(share) => Model::level(share).ok_or_else(
                || polars_err!(ComputeError: "anomalies: sensitivity {share} must be 0.01, 0.03 or 0.05"),
            )?,
        },
    };
    let points = time_ordered(&s[0], &s[1])?;
    let values: Vec<f64> = points.iter().map(|p| p.1).collect();
    let lags = anomaly_lags(values.len());
    let mut times = Vec::new();
    if lags > 0 {
        let mut series = [(Normal::of(&values), values.as_slice())];
        let train = Train {
            lags,
            ..Train::default()
        };
        // A series the model cannot be trained on (too short once differenced, constant)
        // has no anomalies to report.
        if let Ok(model) = Model::train(&mut series, train) {
            let mut scorer = Scorer::new(series[0].0, level);
            for (t, v) in &points {
                if scorer.push(&model, *v).is_some_and(|score| score.anomaly) {
                    times.push(rfc3339(*t));
                }
            }
        }
    }
    Ok(Column::new(s[0].name().clone(), [times.join(",")]))
}

/// `pv_diagnose(v, i, irradiance, temperature, modules, strings)` (the fault's name) and
/// `pv_confidence(...)` (the share of the forest's votes for it), aggregates: the group's rows
/// are the points of one measured IV curve of an array of the reference module; the conditions
/// and layout are taken from the group's first non-null value (constants do). Null when the
/// group is not a usable curve (fewer than 10 points, conditions out of range: the API's
/// `/analytics/pv/diagnose` tells why). The model is trained once per worker on first use.
fn pv_diagnosis(name: &str, s: &[Column]) -> PolarsResult<Option<crate::pv::Diagnosis>> {
    polars_ensure!(
        s.len() == 6,
        InvalidOperation: "{name}(v, i, irradiance, temperature, modules, strings) takes six arguments"
    );
    let v = s[0].cast(&DataType::Float64)?;
    let i = s[1].cast(&DataType::Float64)?;
    let (vs, is): (Vec<f64>, Vec<f64>) = v
        .f64()?
        .iter()
        .zip(i.f64()?.iter())
        .filter_map(|(v, i)| Some((v?, i?)))
        .unzip();
    let (Some(g), Some(t), Some(m), Some(n)) = (
        first_number(&s[2])?,
        first_number(&s[3])?,
        first_number(&s[4])?,
        first_number(&s[5])?,
    ) else {
        return Ok(None);
    };
    if !(m.is_finite() && n.is_finite() && m >= 1.0 && n >= 1.0) {
        return Ok(None);
    }
    let curve = crate::pv::Curve {
        v: vs,
        i: is,
        irradiance: g,
        temperature: t,
    };
    if crate::pv::check(&curve).is_err() {
        return Ok(None);
    }
    let model = crate::pv::shared().map_err(|e| polars_err!(ComputeError: "{name}: {e}"))?;
    Ok(model.diagnose(m as usize, n as usize, &curve).ok())
}

/// The analytics functions of job SQL, all aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Function {
    Changepoints,
    Anomalies,
    PvDiagnose,
    PvConfidence,
}

impl Function {
    const ALL: [Function; 4] = [
        Function::Changepoints,
        Function::Anomalies,
        Function::PvDiagnose,
        Function::PvConfidence,
    ];

    fn name(self) -> &'static str {
        match self {
            Function::Changepoints => "changepoints",
            Function::Anomalies => "anomalies",
            Function::PvDiagnose => "pv_diagnose",
            Function::PvConfidence => "pv_confidence",
        }
    }

    fn parse(name: &str) -> Option<Function> {
        Function::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(name))
    }
}

impl polars_plan::dsl::ColumnsUdf for Function {
    fn call_udf(&self, s: &mut [Column]) -> PolarsResult<Column> {
        match self {
            Function::Changepoints => changepoints_of(s),
            Function::Anomalies => anomalies_of(s),
            Function::PvDiagnose => {
                let d = pv_diagnosis(self.name(), s)?;
                Ok(Column::new(
                    s[0].name().clone(),
                    [d.map(|d| d.fault.name())],
                ))
            }
            Function::PvConfidence => {
                let d = pv_diagnosis(self.name(), s)?;
                Ok(Column::new(s[0].name().clone(), [d.map(|d| d.confidence)]))
            }
        }
    }
}

impl polars_plan::dsl::AnonymousColumnsUdf for Function {
    fn as_column_udf(self: Arc<Self>) -> Arc<dyn polars_plan::dsl::ColumnsUdf> {
        self
    }

    fn deep_clone(self: Arc<Self>) -> Arc<dyn polars_plan::dsl::AnonymousColumnsUdf> {
        self
    }

    fn get_field(&self, _input_schema: &Schema, fields: &[Field]) -> PolarsResult<Field> {
        let name = fields
            .first()
            .map_or_else(|| self.name().into(), |f| f.name().clone());
        let dtype = match self {
            Function::PvConfidence => DataType::Float64,
            _ => DataType::String,
        };
        Ok(Field::new(name, dtype))
    }
}

/// The analytics functions a job's SQL may call.
struct Functions;

impl polars::sql::FunctionRegistry for Functions {
    fn register(
        &mut self,
        name: &str,
        _fun: polars_plan::dsl::UserDefinedFunction,
    ) -> PolarsResult<()> {
        polars_bail!(InvalidOperation: "functions cannot be registered here ({name})")
    }

    fn get_udf(&self, name: &str) -> PolarsResult<Option<polars_plan::dsl::UserDefinedFunction>> {
        Ok(Function::parse(name).map(|f| {
            let mut udf = polars_plan::dsl::UserDefinedFunction::new(f.name().into(), f);
            udf.options = polars_plan::prelude::FunctionOptions::aggregation();
            udf
        }))
    }

    fn contains(&self, name: &str) -> bool {
        Function::parse(name).is_some()
    }
}

/// The SQL context of a run: the dimension frames and the `history` scan.
fn context(dims: &Dimensions, history: LazyFrame) -> PolarsResult<SQLContext> {
    let ctx = SQLContext::new().with_function_registry(Arc::new(Functions));
    for (name, df) in dims.frames()? {
        ctx.register(name, df.lazy());
    }
    ctx.register(HISTORY, history);
    Ok(ctx)
}

/// Rows a query reads from nothing (checking only).
struct Empty;

impl HistorySource for Empty {
    fn load(&self, _: &Filter, _: usize) -> Result<HistoryRows, String> {
        Ok(HistoryRows::default())
    }
}

fn history_frame(scan: HistoryScan) -> PolarsResult<LazyFrame> {
    LazyFrame::anonymous_scan(
        Arc::new(scan),
        ScanArgsAnonymous {
            schema: Some(Arc::new(history_schema())),
            name: "history",
            ..Default::default()
        },
    )
}

fn probe(window: (i64, i64)) -> PolarsResult<LazyFrame> {
    history_frame(HistoryScan {
        source: Arc::new(Empty),
        filter: Filter::window(window.0, window.1),
        max_rows: 0,
        stats: Arc::default(),
        probe: true,
    })
}

/// Checks that `sql` is one query the SQL context can plan over the job tables, and returns the
/// names and types of its result columns.
pub fn check(sql: &str) -> Result<Vec<(String, String)>, SqlError> {
    let history = probe((0, 0)).map_err(|e| sql_error(&e, sql))?;
    let mut ctx = context(&Dimensions::default(), history).map_err(|e| sql_error(&e, sql))?;
    let mut lf = ctx.execute(sql).map_err(|e| sql_error(&e, sql))?;
    let schema = lf.collect_schema().map_err(|e| sql_error(&e, sql))?;
    Ok(schema
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect())
}

/// One run's inputs.
#[derive(Debug)]
pub struct Run<'a> {
    /// The query.
    pub sql: &'a str,
    /// The window of history the run may read, ms.
    pub window: (i64, i64),
    /// Most history rows the run may read.
    pub max_rows: usize,
    /// Most result rows kept.
    pub max_result_rows: usize,
}

/// What a run produced.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Result rows.
    pub rows: u64,
    /// Result columns with their types.
    pub columns: Vec<(String, String)>,
    /// History rows read.
    pub history_rows: u64,
    /// What the history scans asked the source for.
    pub filters: Vec<String>,
    /// Size of the result file, bytes.
    pub bytes: u64,
}

fn describe(f: &Filter) -> String {
    let set = |s: &Option<BTreeSet<String>>| match s {
        None => "all".to_owned(),
        Some(s) => format!("{:?}", s.iter().collect::<Vec<_>>()),
    };
    format!(
        "ts {}..{} ms, products {}, devices {}, properties {}",
        f.from,
        f.to,
        set(&f.products),
        set(&f.devices),
        set(&f.identifiers)
    )
}

/// Runs a job: plans `run.sql`, reads what it needs of `source`, and writes the result to
/// `out` (Parquet, zstd; written beside it and renamed into place once synced to disk).
pub fn execute(
    run: &Run<'_>,
    dims: &Dimensions,
    source: Arc<dyn HistorySource>,
    out: &Path,
    progress: &dyn Fn(&str),
) -> Result<Summary, JobError> {
    let planned = context(dims, probe(run.window)?)?
        .execute(run.sql)
        .map_err(|e| JobError::Sql(sql_error(&e, run.sql)))?;
    let filter = union(run.window, &pushed(planned)?);
    progress(&format!("planned; reading history ({})", describe(&filter)));
    let stats = Arc::new(ScanStats::default());
    let history = history_frame(HistoryScan {
        source,
        filter,
        max_rows: run.max_rows,
        stats: stats.clone(),
        probe: false,
    })?;
    let lf = context(dims, history)?
        .execute(run.sql)
        .map_err(|e| JobError::Sql(sql_error(&e, run.sql)))?;
    let limit = u32::try_from(run.max_result_rows).unwrap_or(u32::MAX);
    let mut df = lf.limit(limit.saturating_add(1)).collect()?;
    if df.height() > run.max_result_rows {
        return Err(JobError::Source(format!(
            "the result has more than {} rows (analytics.max_result_rows); aggregate it or add a LIMIT",
            run.max_result_rows
        )));
    }
    progress(&format!(
        "computed {} rows from {} history rows; writing the result",
        df.height(),
        stats.rows.load(Ordering::Relaxed)
    ));
    let bytes = write_result(&mut df, out)?;
    let filters = stats
        .filters
        .lock()
        .map(|f| f.iter().map(describe).collect())
        .unwrap_or_default();
    Ok(Summary {
        rows: df.height() as u64,
        columns: df
            .schema()
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect(),
        history_rows: stats.rows.load(Ordering::Relaxed),
        filters,
        bytes,
    })
}

fn write_result(df: &mut DataFrame, out: &Path) -> Result<u64, JobError> {
    let tmp = out.with_extension("parquet.tmp");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::File::create(&tmp)?;
    ParquetWriter::new(&mut file)
        .with_compression(ParquetCompression::Zstd(None))
        .finish(df)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, out)?;
    if let Some(dir) = out.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(std::fs::metadata(out)?.len())
}

/// Column names, rows as JSON values, and the table's total row count.
pub type ResultPage = (Vec<String>, Vec<Vec<serde_json::Value>>, u64);

/// A page of a result table: column names, rows as JSON values, and the total row count.
pub fn read_page(path: &Path, offset: usize, limit: usize) -> Result<ResultPage, JobError> {
    let lf = scan(path)?;
    let total = lf
        .clone()
        .select([len()])
        .collect()?
        .column("len")?
        .get(0)?
        .extract::<u64>()
        .unwrap_or(0);
    let df = lf
        .slice(
            i64::try_from(offset).unwrap_or(i64::MAX),
            u32::try_from(limit).unwrap_or(u32::MAX),
        )
        .collect()?;
    let columns: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut rows = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let mut row = Vec::with_capacity(columns.len());
        for c in df.columns() {
            row.push(json_value(&c.get(i)?));
        }
        rows.push(row);
    }
    Ok((columns, rows, total))
}

fn json_value(v: &AnyValue<'_>) -> serde_json::Value {
    use serde_json::Value;
    match v {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => Value::Bool(*b),
        AnyValue::String(s) => Value::String((*s).to_owned()),
        AnyValue::StringOwned(s) => Value::String(s.to_string()),
        AnyValue::Float32(x) => {
            serde_json::Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number)
        }
        AnyValue::Float64(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        AnyValue::Datetime(..) | AnyValue::DatetimeOwned(..) => match millis(v) {
            Some(ms) => Value::String(rfc3339(ms)),
            None => Value::Null,
        },
        v if v.is_integer() => match v.extract::<i64>() {
            Some(i) => Value::from(i),
            None => v.extract::<u64>().map_or(Value::Null, Value::from),
        },
        v => Value::String(v.to_string()),
    }
}

/// Writes a result table as CSV (header line, RFC 4180 quoting, times in RFC 3339).
pub fn write_csv(path: &Path, out: &mut dyn std::io::Write) -> Result<(), JobError> {
    let mut df = scan(path)?.collect()?;
    CsvWriter::new(out).include_header(true).finish(&mut df)?;
    Ok(())
}

fn scan(path: &Path) -> Result<LazyFrame, JobError> {
    let Some(text) = path.to_str() else {
        return Err(JobError::Source(format!(
            "{} is not a UTF-8 path",
            path.display()
        )));
    };
    let args = ScanArgsParquet {
        glob: false,
        cache: false,
        hive_options: HiveOptions::new_disabled(),
        ..ScanArgsParquet::default()
    };
    Ok(LazyFrame::scan_parquet(PlRefPath::new(text), args)?)
}

/// `2026-12-04T10:00:00.000Z`.
pub fn rfc3339(ms: i64) -> String {
    let (days, rest) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = ironlink_shared::time::civil_from_days(days);
    let (h, min, s, milli) = (
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// Three devices × two properties, 100 points each, one a second from T0.
    struct Fleet;
    const T0: i64 = 1_764_000_000_000;

    impl HistorySource for Fleet {
        fn load(&self, f: &Filter, max_rows: usize) -> Result<HistoryRows, String> {
            let mut out = HistoryRows::default();
            for d in ["dev1", "dev2", "dev3"] {
                for p in ["temp", "label"] {
                    if !Filter::admits(&f.products, "pk1")
                        || !Filter::admits(&f.devices, d)
                        || !Filter::admits(&f.identifiers, p)
                    {
                        continue;
                    }
                    for k in 0..100i64 {
                        let ts = T0 + k * 1000;
                        if ts < f.from || ts > f.to {
                            continue;
                        }
                        if out.len() >= max_rows {
                            return Err(format!("more than {max_rows} rows"));
                        }
                        let level = f64::from(d.as_bytes()[3] - b'0') * 10.0;
                        if p == "temp" {
                            out.push(("pk1", d, p), ts, Some(level + (k % 2) as f64), None);
                        } else {
                            out.push(("pk1", d, p), ts, None, Some(format!("l{k}")));
                        }
                    }
                }
            }
            Ok(out)
        }
    }

    fn dims() -> Dimensions {
        Dimensions {
            products: vec![[
                "pk1".into(),
                "Meters".into(),
                "DEVICE".into(),
                "ALINK".into(),
                String::new(),
            ]],
            devices: ["dev1", "dev2", "dev3"]
                .iter()
                .map(|d| DeviceRow {
                    product_key: "pk1".into(),
                    device_name: (*d).into(),
                    status: if *d == "dev3" { "offline" } else { "online" }.into(),
                    enabled: true,
                    created_at: T0,
                    last_online_at: Some(T0),
                    tags: vec![(
                        "site".into(),
                        if *d == "dev1" { "north" } else { "south" }.into(),
                    )],
                })
                .collect(),
        }
    }

    fn run(sql: &str, max_rows: usize) -> Result<(Summary, Vec<Vec<serde_json::Value>>), JobError> {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.parquet");
        let r = Run {
            sql,
            window: (-archive_max(), archive_max()),
            max_rows,
            max_result_rows: 1000,
        };
        let s = execute(&r, &dims(), Arc::new(Fleet), &out, &|_| {})?;
        let (_, rows, total) = read_page(&out, 0, 100).unwrap();
        assert_eq!(total, s.rows);
        Ok((s, rows))
    }

    fn archive_max() -> i64 {
        crate::archive::MAX_MS
    }

    #[test]
    fn pushdown_narrows_what_the_source_reads() {
        let (s, rows) = run(
            &format!(
                "SELECT h.device_name, avg(h.value) AS mean, count(*) AS n, d.status
                 FROM history h JOIN devices d
                   ON h.product_key = d.product_key AND h.device_name = d.device_name
                 WHERE h.identifier = 'temp' AND h.device_name IN ('dev1', 'dev2')
                   AND h.ts >= {}
                 GROUP BY h.device_name, d.status ORDER BY h.device_name",
                T0 + 10_000
            ),
            10_000,
        )
        .unwrap();
        assert_eq!(s.history_rows, 180, "{s:?}");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][0], "dev1");
        assert_eq!(rows[0][1], 10.5);
        assert_eq!(rows[0][2], 90);
        assert_eq!(rows[1][3], "online");
    }

    #[test]
    fn time_literals_push_down_too() {
        // 2025-11-24T16:00:10Z is T0 + 10 s.
        let (s, rows) = run(
            "SELECT count(*) AS n FROM history WHERE identifier = 'temp' AND device_name = 'dev1' AND ts >= '2025-11-24 16:00:10' AND ts < '2025-11-24 16:00:20'",
            10_000,
        )
        .unwrap();
        assert_eq!(rows[0][0], 10, "{s:?}");
        assert_eq!(s.history_rows, 10, "{s:?}");
    }

    #[test]
    fn tags_join_and_text_values() {
        let (_, rows) = run(
            "SELECT t.tag_value AS site, count(*) AS n, max(h.text) AS last
             FROM history h JOIN device_tags t ON h.device_name = t.device_name
             WHERE h.identifier = 'label' AND t.tag_key = 'site' GROUP BY t.tag_value ORDER BY site",
            10_000,
        )
        .unwrap();
        assert_eq!(
            rows,
            vec![
                vec![
                    serde_json::json!("north"),
                    serde_json::json!(100),
                    serde_json::json!("l99")
                ],
                vec![
                    serde_json::json!("south"),
                    serde_json::json!(200),
                    serde_json::json!("l99")
                ],
            ]
        );
    }

    #[test]
    fn the_row_limit_fails_with_the_reason() {
        let e = run("SELECT count(*) FROM history", 250).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        // Narrowed by its WHERE, the same limit is enough.
        run(
            "SELECT count(*) FROM history WHERE device_name = 'dev2' AND identifier = 'temp'",
            250,
        )
        .unwrap();
    }

    #[test]
    fn sql_errors_say_where() {
        let e = check("SELECT device_name,\n  avg(value FROM history").unwrap_err();
        assert_eq!(e.line, 2, "{e:?}");
        assert!(e.column > 0, "{e:?}");
        let e = check("SELECT nope FROM history").unwrap_err();
        assert_eq!((e.line, e.column), (1, 8), "{e:?}");
        let e = check("SELECT * FROM nowhere").unwrap_err();
        assert_eq!(e.line, 1, "{e:?}");
        let cols =
            check("SELECT device_name, avg(value) AS m FROM history GROUP BY device_name").unwrap();
        assert_eq!(cols[1].0, "m");
    }

    #[test]
    fn changepoints_is_an_aggregate_of_sql() {
        struct Steps;
        impl HistorySource for Steps {
            fn load(&self, f: &Filter, _: usize) -> Result<HistoryRows, String> {
                let mut out = HistoryRows::default();
                for d in ["a", "b"] {
                    if !Filter::admits(&f.devices, d) {
                        continue;
                    }
                    for k in 0..300i64 {
                        let level = match (d, k / 100) {
                            ("a", 1) => 30.0,
                            ("a", _) => 10.0,
                            (_, _) => 5.0,
                        };
                        let noise = ((k * 7919) % 13) as f64 / 26.0;
                        out.push(("p", d, "x"), T0 + k * 1000, Some(level + noise), None);
                    }
                }
                Ok(out)
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.parquet");
        let r = Run {
            sql: "SELECT device_name, changepoints(ts, value) AS changes FROM history GROUP BY device_name ORDER BY device_name",
            window: (T0, T0 + 1_000_000),
            max_rows: 10_000,
            max_result_rows: 10,
        };
        execute(&r, &dims(), Arc::new(Steps), &out, &|_| {}).unwrap();
        let (_, rows, _) = read_page(&out, 0, 10).unwrap();
        assert_eq!(
            rows[0][1],
            format!("{},{}", rfc3339(T0 + 100_000), rfc3339(T0 + 200_000)),
            "{rows:?}"
        );
        assert_eq!(rows[1][1], "", "{rows:?}");
    }

    #[test]
    fn anomalies_is_an_aggregate_of_sql() {
        struct Wave;
        impl HistorySource for Wave {
            fn load(&self, f: &Filter, _: usize) -> Result<HistoryRows, String> {
                let mut out = HistoryRows::default();
                for d in ["a", "b"] {
                    if !Filter::admits(&f.devices, d) {
                        continue;
                    }
                    // A wave with pseudo-random noise (xorshift), the same for both devices.
                    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                    for k in 0..600i64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let noise = (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                        let mut v = 20.0 + 3.0 * (k as f64 / 30.0).sin() + 0.4 * noise;
                        if d == "a" && k == 450 {
                            v += 12.0;
                        }
                        out.push(("p", d, "x"), T0 + k * 1000, Some(v), None);
                    }
                    // Too short to train on: no anomalies, not an error.
                    out.push(("p", d, "short"), T0, Some(1.0), None);
                }
                Ok(out)
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.parquet");
        let r = Run {
            sql: "SELECT device_name, identifier, anomalies(ts, value, 0.01) AS spikes FROM history GROUP BY device_name, identifier ORDER BY device_name, identifier",
            window: (T0, T0 + 1_000_000),
            max_rows: 10_000,
            max_result_rows: 10,
        };
        execute(&r, &dims(), Arc::new(Wave), &out, &|_| {}).unwrap();
        let (_, rows, _) = read_page(&out, 0, 10).unwrap();
        assert_eq!(rows.len(), 4, "{rows:?}");
        let spike = rfc3339(T0 + 450_000);
        let (a, b) = (rows[1][2].as_str().unwrap(), rows[3][2].as_str().unwrap());
        assert!(a.split(',').any(|t| t == spike), "{rows:?}");
        assert!(!b.split(',').any(|t| t == spike), "{rows:?}");
        // At the 1 % level a clean series of 600 points raises few alarms.
        assert!(b.split(',').filter(|t| !t.is_empty()).count() <= 12, "{b}");
        assert_eq!(rows[0][2], "", "{rows:?}");
        // A level that is not one of the three is refused with the reason.
        let bad = Run {
            sql: "SELECT anomalies(ts, value, 0.2) AS a FROM history",
            ..r
        };
        let e = execute(&bad, &dims(), Arc::new(Wave), &out, &|_| {}).unwrap_err();
        assert!(e.to_string().contains("0.01, 0.03 or 0.05"), "{e}");
    }

    #[test]
    fn pv_diagnose_names_the_fault_of_a_curve_stored_as_points() {
        use crate::pv;
        /// Two arrays' tracers post one IV sweep each as `v` and `i` points at the same times.
        struct Sweeps;
        impl HistorySource for Sweeps {
            fn load(&self, _: &Filter, _: usize) -> Result<HistoryRows, String> {
                let array = pv::Array {
                    module: pv::Module::default(),
                    modules: 10,
                    strings: 2,
                };
                let mut out = HistoryRows::default();
                for d in ["healthy", "open"] {
                    let mut c = pv::Condition::healthy(&array, 800.0, 40.0);
                    c.open[0] = d == "open";
                    let curve = array.simulate(&c, 60);
                    for (k, (v, i)) in curve.v.iter().zip(&curve.i).enumerate() {
                        let ts = T0 + k as i64 * 50;
                        out.push(("p", d, "v"), ts, Some(*v), None);
                        out.push(("p", d, "i"), ts, Some(*i), None);
                    }
                }
                Ok(out)
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.parquet");
        let r = Run {
            sql: "SELECT v.device_name, pv_diagnose(v.value, c.value, 800, 40, 10, 2) AS fault, \
                  pv_confidence(v.value, c.value, 800, 40, 10, 2) AS confidence, \
                  pv_diagnose(v.value, c.value, 5, 40, 10, 2) AS dark \
                  FROM history v JOIN history c ON v.device_name = c.device_name AND v.ts = c.ts \
                  WHERE v.identifier = 'v' AND c.identifier = 'i' \
                  GROUP BY v.device_name ORDER BY v.device_name",
            window: (T0, T0 + 1_000_000),
            max_rows: 10_000,
            max_result_rows: 10,
        };
        execute(&r, &dims(), Arc::new(Sweeps), &out, &|_| {}).unwrap();
        let (_, rows, _) = read_page(&out, 0, 10).unwrap();
        assert_eq!(rows[0][1], "normal", "{rows:?}");
        assert_eq!(rows[1][1], "open_string", "{rows:?}");
        let confidence = rows[1][2].as_f64().unwrap();
        assert!(confidence > 0.5 && confidence <= 1.0, "{rows:?}");
        // Too dark to diagnose: null, and the other groups still answer.
        assert!(rows[0][3].is_null(), "{rows:?}");
    }

    #[test]
    fn time_texts() {
        assert_eq!(parse_time("2025-11-24"), Some(1_763_942_400_000));
        assert_eq!(parse_time("2025-11-24 16:00:10"), Some(T0 + 10_000));
        assert_eq!(parse_time("2025-11-24T16:00:10.5Z"), Some(T0 + 10_500));
        assert_eq!(parse_time("2025-13-01"), None);
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn csv_export() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.parquet");
        let r = Run {
            sql: "SELECT device_name, min(ts) AS first FROM history WHERE identifier = 'temp' GROUP BY device_name ORDER BY device_name",
            window: (T0, T0 + 50_000),
            max_rows: 1000,
            max_result_rows: 10,
        };
        let s = execute(&r, &dims(), Arc::new(Fleet), &out, &|_| {}).unwrap();
        assert_eq!(s.history_rows, 153, "{s:?}");
        let mut csv = Vec::new();
        write_csv(&out, &mut csv).unwrap();
        let csv = String::from_utf8(csv).unwrap();
        assert!(
            csv.starts_with("device_name,first\ndev1,2025-11-24T16:00:00"),
            "{csv}"
        );
        assert_eq!(rfc3339(T0), "2025-11-24T16:00:00.000Z");
    }
}
