//! Evaluation of rule expressions over one device message.
//!
//! Missing fields are null; null propagates through arithmetic and functions, and a condition
//! that is null does not hold (as in SQL). A value of the wrong kind at run time (a string
//! where arithmetic needs a number) fails the message for that rule, with the reason.

use super::sql::{BinOp, Expr, Item, Query, Seg};
use base64::Engine as _;
use serde_json::{Map, Number, Value};
use std::borrow::Cow;

/// Algorithms `crypto()` knows.
pub const CRYPTO_ALGORITHMS: [&str; 5] = ["MD5", "SHA1", "SHA-256", "SHA-384", "SHA-512"];

/// What an expression sees of a message.
#[derive(Debug, Clone, Copy)]
pub struct Msg<'a> {
    /// The topic it came on (Alibaba's form: `/{pk}/{dn}/thing/event/property/post`, ...).
    pub topic: &'a str,
    /// The payload as received.
    pub raw: &'a [u8],
    /// The payload parsed as JSON (null when it is not JSON).
    pub payload: &'a Value,
    /// Product key.
    pub product_key: &'a str,
    /// Device name.
    pub device_name: &'a str,
    /// Message id.
    pub message_id: &'a str,
    /// Now, ms since the Unix epoch.
    pub now_ms: i64,
    /// The window a windowed rule emits for: start and end, ms.
    pub window: Option<(i64, i64)>,
    /// The device's tags, for `attribute()` (looked up only for rules that call it).
    pub tags: Option<&'a crate::storage::TagMap>,
    /// The thing layer, for `anomaly()` (the monitors' scores of posted values).
    pub thing: Option<&'a crate::thing::Thing>,
}

/// Evaluates `e`; `aggs` holds the aggregate results of a windowed rule.
pub fn eval(e: &Expr, m: &Msg<'_>, aggs: &[Value]) -> Result<Value, String> {
    ev(e, m, aggs).map(Cow::into_owned)
}

static NULL: Value = Value::Null;

/// Like [`eval`], borrowing literals and payload fields instead of copying them.
fn ev<'a>(e: &'a Expr, m: &Msg<'a>, aggs: &'a [Value]) -> Result<Cow<'a, Value>, String> {
    Ok(Cow::Owned(match e {
        Expr::Lit(v) => return Ok(Cow::Borrowed(v)),
        Expr::Path(segs, _) => return Ok(Cow::Borrowed(lookup(m.payload, segs).unwrap_or(&NULL))),
        Expr::Agg(i) => return Ok(Cow::Borrowed(aggs.get(*i).unwrap_or(&NULL))),
        Expr::Call(name, args, _) => {
            let mut vals = Vec::with_capacity(args.len());
            for a in args {
                vals.push(ev(a, m, aggs)?.into_owned());
            }
            call(name, &vals, m)?
        }
        Expr::Bin(BinOp::And, l, r, _) => {
            let l = truth(ev(l, m, aggs)?.as_ref());
            if l == Some(false) {
                return Ok(Cow::Owned(Value::Bool(false)));
            }
            match (l, truth(ev(r, m, aggs)?.as_ref())) {
                (_, Some(false)) => Value::Bool(false),
                (Some(true), Some(true)) => Value::Bool(true),
                _ => Value::Null,
            }
        }
        Expr::Bin(BinOp::Or, l, r, _) => {
            let l = truth(ev(l, m, aggs)?.as_ref());
            if l == Some(true) {
                return Ok(Cow::Owned(Value::Bool(true)));
            }
            match (l, truth(ev(r, m, aggs)?.as_ref())) {
                (_, Some(true)) => Value::Bool(true),
                (Some(false), Some(false)) => Value::Bool(false),
                _ => Value::Null,
            }
        }
        Expr::Bin(op, l, r, _) => binary(*op, ev(l, m, aggs)?.as_ref(), ev(r, m, aggs)?.as_ref())?,
        Expr::Not(e) => match truth(ev(e, m, aggs)?.as_ref()) {
            Some(b) => Value::Bool(!b),
            None => Value::Null,
        },
        Expr::Neg(e, _) => match ev(e, m, aggs)?.as_ref() {
            Value::Null => Value::Null,
            v => binary(BinOp::Sub, &Value::from(0), v)?,
        },
        Expr::IsNull(e, negated) => Value::Bool(ev(e, m, aggs)?.is_null() != *negated),
        Expr::In(e, list, negated) => {
            let v = ev(e, m, aggs)?;
            if v.is_null() {
                return Ok(Cow::Owned(Value::Null));
            }
            let mut found = false;
            for x in list {
                if compare(&v, ev(x, m, aggs)?.as_ref()) == Some(std::cmp::Ordering::Equal) {
                    found = true;
                    break;
                }
            }
            Value::Bool(found != *negated)
        }
        Expr::Like(e, pattern, negated) => match ev(e, m, aggs)?.as_ref() {
            Value::String(s) => Value::Bool(like(s, pattern) != *negated),
            Value::Null => Value::Null,
            other => Value::Bool(like(&other.to_string(), pattern) != *negated),
        },
        Expr::Case {
            operand,
            arms,
            otherwise,
        } => {
            let subject = match operand {
                Some(o) => Some(ev(o, m, aggs)?),
                None => None,
            };
            for (w, t) in arms {
                let w = ev(w, m, aggs)?;
                let hit = match &subject {
                    Some(s) => compare(s, &w) == Some(std::cmp::Ordering::Equal),
                    None => truth(&w) == Some(true),
                };
                if hit {
                    return ev(t, m, aggs);
                }
            }
            match otherwise {
                Some(o) => ev(o, m, aggs)?.into_owned(),
                None => Value::Null,
            }
        }
    }))
}

/// True when a condition holds (null and non-booleans other than numbers do not).
pub fn holds(e: &Expr, m: &Msg<'_>, aggs: &[Value]) -> Result<bool, String> {
    Ok(truth(ev(e, m, aggs)?.as_ref()) == Some(true))
}

/// The output row of a rule: SELECT items over the message. Null values are left out.
pub fn project(q: &Query, m: &Msg<'_>, aggs: &[Value]) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for item in &q.items {
        match item {
            Item::All => {
                if let Value::Object(o) = m.payload {
                    for (k, v) in o {
                        out.insert(k.clone(), v.clone());
                    }
                }
            }
            Item::Expr(e, name) => {
                let v = ev(e, m, aggs)?.into_owned();
                if matches!(e, Expr::Call(f, _, _) if f == "thingpropertyflatmap") {
                    if let Value::Object(o) = v {
                        out.extend(o);
                    }
                    continue;
                }
                if !v.is_null() {
                    out.insert(name.clone(), v);
                }
            }
        }
    }
    Ok(out)
}

/// Follows a path into a JSON value.
pub fn lookup<'v>(root: &'v Value, segs: &[Seg]) -> Option<&'v Value> {
    let mut v = root;
    for s in segs {
        v = match (s, v) {
            (Seg::Key(k), Value::Object(o)) => o.get(k)?,
            (Seg::Index(i), Value::Array(a)) => a.get(*i)?,
            (Seg::Key(k), Value::Array(a)) => a.get(k.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

fn truth(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => Some(n.as_f64().is_some_and(|f| f != 0.0)),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// A number from a value: numbers, and strings that read as numbers.
pub fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

/// A JSON number; whole values within i64 stay integers, non-finite ones become null.
pub fn number(f: f64) -> Value {
    if !f.is_finite() {
        return Value::Null;
    }
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        return Value::from(f as i64);
    }
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn binary(op: BinOp, l: &Value, r: &Value) -> Result<Value, String> {
    use std::cmp::Ordering::*;
    if op == BinOp::Concat {
        if l.is_null() || r.is_null() {
            return Ok(Value::Null);
        }
        return Ok(Value::String(format!("{}{}", text(l), text(r))));
    }
    if l.is_null() || r.is_null() {
        return Ok(Value::Null);
    }
    let cmp = |want: &dyn Fn(std::cmp::Ordering) -> bool| -> Value {
        match compare(l, r) {
            Some(o) => Value::Bool(want(o)),
            None => Value::Null,
        }
    };
    Ok(match op {
        BinOp::Eq => match compare(l, r) {
            Some(o) => Value::Bool(o == Equal),
            None => Value::Bool(l == r),
        },
        BinOp::Ne => match compare(l, r) {
            Some(o) => Value::Bool(o != Equal),
            None => Value::Bool(l != r),
        },
        BinOp::Lt => cmp(&|o| o == Less),
        BinOp::Le => cmp(&|o| o != Greater),
        BinOp::Gt => cmp(&|o| o == Greater),
        BinOp::Ge => cmp(&|o| o != Less),
        _ => {
            let (Some(a), Some(b)) = (num(l), num(r)) else {
                let bad = if num(l).is_none() { l } else { r };
                return Err(format!("arithmetic on {} ({bad})", kind(bad)));
            };
            if let (Some(x), Some(y)) = (l.as_i64(), r.as_i64()) {
                let exact = match op {
                    BinOp::Add => x.checked_add(y),
                    BinOp::Sub => x.checked_sub(y),
                    BinOp::Mul => x.checked_mul(y),
                    BinOp::Mod if y != 0 => x.checked_rem(y),
                    BinOp::Div if y != 0 && x % y == 0 => x.checked_div(y),
                    _ => None,
                };
                if let Some(v) = exact {
                    return Ok(Value::from(v));
                }
            }
            match op {
                BinOp::Add => number(a + b),
                BinOp::Sub => number(a - b),
                BinOp::Mul => number(a * b),
                BinOp::Div if b == 0.0 => Value::Null,
                BinOp::Div => number(a / b),
                BinOp::Mod if b == 0.0 => Value::Null,
                _ => number(a % b),
            }
        }
    })
}

/// Orders two values: numbers (and numeric strings against numbers) by value, strings by
/// text, booleans; None when they cannot be compared.
pub fn compare(l: &Value, r: &Value) -> Option<std::cmp::Ordering> {
    match (l, r) {
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        (Value::Number(_), _) | (_, Value::Number(_)) => num(l)?.partial_cmp(&num(r)?),
        _ => None,
    }
}

/// SQL LIKE: `%` any run, `_` one character. Linear backtracking on the last `%` (no
/// exponential blow-up on patterns like `%a%a%a%b`).
fn like(s: &str, pattern: &str) -> bool {
    let s: Vec<char> = s.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    let (mut i, mut j) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if j < p.len() && (p[j] == '_' || (p[j] != '%' && p[j] == s[i])) {
            i += 1;
            j += 1;
        } else if j < p.len() && p[j] == '%' {
            star = Some((j, i));
            j += 1;
        } else if let Some((sj, si)) = star {
            j = sj + 1;
            i = si + 1;
            star = Some((sj, si + 1));
        } else {
            return false;
        }
    }
    p[j..].iter().all(|c| *c == '%')
}

/// A value as text: strings as they are, everything else as JSON.
pub fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn math(args: &[Value], f: impl Fn(f64) -> f64) -> Result<Value, String> {
    match args.first() {
        None | Some(Value::Null) => Ok(Value::Null),
        Some(v) => match num(v) {
            Some(x) => Ok(number(f(x))),
            None => Err(format!("expected a number, got {} ({v})", kind(v))),
        },
    }
}

fn string_arg<'v>(args: &'v [Value], i: usize) -> Option<std::borrow::Cow<'v, str>> {
    match args.get(i) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(std::borrow::Cow::Borrowed(s)),
        Some(v) => Some(std::borrow::Cow::Owned(v.to_string())),
    }
}

fn call(name: &str, args: &[Value], m: &Msg<'_>) -> Result<Value, String> {
    let arg_num = |i: usize| args.get(i).and_then(num);
    Ok(match name {
        "abs" => math(args, f64::abs)?,
        "acos" => math(args, f64::acos)?,
        "asin" => math(args, f64::asin)?,
        "atan" => math(args, f64::atan)?,
        "ceil" => math(args, f64::ceil)?,
        "cos" => math(args, f64::cos)?,
        "cosh" => math(args, f64::cosh)?,
        "exp" => math(args, f64::exp)?,
        "floor" => math(args, f64::floor)?,
        "ln" => math(args, f64::ln)?,
        "sin" => math(args, f64::sin)?,
        "sinh" => math(args, f64::sinh)?,
        "sqrt" => math(args, f64::sqrt)?,
        "tan" => math(args, f64::tan)?,
        "tanh" => math(args, f64::tanh)?,
        // Alibaba: log(n) is the natural logarithm, log(n, m) the logarithm of n to base m.
        "log" => match (arg_num(0), args.get(1)) {
            (None, _) => Value::Null,
            (Some(n), None) => number(n.ln()),
            (Some(n), Some(_)) => match arg_num(1) {
                Some(base) => number(n.ln() / base.ln()),
                None => Value::Null,
            },
        },
        "mod" => match (arg_num(0), arg_num(1)) {
            (Some(a), Some(b)) => binary(BinOp::Mod, &number(a), &number(b))?,
            _ => Value::Null,
        },
        "power" => match (arg_num(0), arg_num(1)) {
            (Some(a), Some(b)) => number(a.powf(b)),
            _ => Value::Null,
        },
        "rand" => number(rand::random::<f64>()),
        "round" => match arg_num(0) {
            None => Value::Null,
            Some(x) => {
                let digits = arg_num(1).unwrap_or(0.0).clamp(0.0, 15.0) as i32;
                let k = 10f64.powi(digits);
                number((x * k).round() / k)
            }
        },
        "concat" => {
            let mut s = String::new();
            for a in args {
                if !a.is_null() {
                    s.push_str(&text(a));
                }
            }
            Value::String(s)
        }
        "lower" => string_arg(args, 0).map_or(Value::Null, |s| s.to_lowercase().into()),
        "upper" => string_arg(args, 0).map_or(Value::Null, |s| s.to_uppercase().into()),
        "trim" => string_arg(args, 0).map_or(Value::Null, |s| s.trim().into()),
        "length" => match args.first() {
            Some(Value::String(s)) => Value::from(s.chars().count()),
            Some(Value::Array(a)) => Value::from(a.len()),
            Some(Value::Object(o)) => Value::from(o.len()),
            _ => Value::Null,
        },
        "replace" => match (
            string_arg(args, 0),
            string_arg(args, 1),
            string_arg(args, 2),
        ) {
            (Some(s), Some(from), Some(to)) if !from.is_empty() => s.replace(&*from, &to).into(),
            (Some(s), _, _) => s.into_owned().into(),
            _ => Value::Null,
        },
        // substring(s, start[, end]): 0-based, end exclusive, clamped (Alibaba's form).
        "substring" => match (string_arg(args, 0), arg_num(1)) {
            (Some(s), Some(start)) => {
                let chars: Vec<char> = s.chars().collect();
                let start = (start.max(0.0) as usize).min(chars.len());
                let end = arg_num(2)
                    .map_or(chars.len(), |e| e.max(0.0) as usize)
                    .min(chars.len());
                if end <= start {
                    Value::String(String::new())
                } else {
                    Value::String(chars[start..end].iter().collect())
                }
            }
            _ => Value::Null,
        },
        "startswith" => match (string_arg(args, 0), string_arg(args, 1)) {
            (Some(s), Some(p)) => Value::Bool(s.starts_with(&*p)),
            _ => Value::Null,
        },
        "endswith" => match (string_arg(args, 0), string_arg(args, 1)) {
            (Some(s), Some(p)) => Value::Bool(s.ends_with(&*p)),
            _ => Value::Null,
        },
        "tostring" => match args.first() {
            None | Some(Value::Null) => Value::Null,
            Some(v) => Value::String(text(v)),
        },
        "tonumber" => match args.first() {
            Some(v @ Value::Number(_)) => v.clone(),
            Some(v) => num(v).map_or(Value::Null, number),
            None => Value::Null,
        },
        "nanvl" => match args.first() {
            None | Some(Value::Null) => args.get(1).cloned().unwrap_or(Value::Null),
            Some(v) => v.clone(),
        },
        "crypto" => match (args.first(), string_arg(args, 1)) {
            (None | Some(Value::Null), _) | (_, None) => Value::Null,
            (Some(v), Some(alg)) => Value::String(crypto(&text(v), &alg)?),
        },
        "attribute" => match (string_arg(args, 0), m.tags) {
            (Some(key), Some(tags)) => tags.get(&*key).cloned().unwrap_or(Value::Null),
            _ => Value::Null,
        },
        "devicename" => Value::String(m.device_name.to_owned()),
        "productkey" => Value::String(m.product_key.to_owned()),
        "messageid" => Value::String(m.message_id.to_owned()),
        "topic" => match arg_num(0) {
            None if args.is_empty() => Value::String(m.topic.to_owned()),
            None => Value::Null,
            Some(n) => {
                let level = n as usize;
                m.topic
                    .trim_start_matches('/')
                    .split('/')
                    .nth(level.wrapping_sub(1))
                    .map_or(Value::Null, |s| Value::String(s.to_owned()))
            }
        },
        "timestamp" | "timestamp_utc" => match string_arg(args, 0) {
            None => Value::from(m.now_ms),
            Some(fmt) => {
                let offset = if name == "timestamp" {
                    8 * 3_600_000
                } else {
                    0
                };
                Value::String(format_time(m.now_ms + offset, &fmt))
            }
        },
        "newuuid" => Value::String(uuid_v4()),
        "window_start" => m.window.map_or(Value::Null, |w| Value::from(w.0)),
        "window_end" => m.window.map_or(Value::Null, |w| Value::from(w.1)),
        "payload" => {
            let enc = string_arg(args, 0).map(|s| s.to_ascii_lowercase());
            match enc.as_deref() {
                Some("base64") => {
                    Value::String(base64::engine::general_purpose::STANDARD.encode(m.raw))
                }
                Some("hex") => Value::String(hex::encode(m.raw)),
                _ => Value::String(String::from_utf8_lossy(m.raw).into_owned()),
            }
        }
        "to_base64" => match args.first() {
            None | Some(Value::Null) => Value::Null,
            Some(v) => Value::String(base64::engine::general_purpose::STANDARD.encode(text(v))),
        },
        "from_base64" => match string_arg(args, 0) {
            None => Value::Null,
            Some(s) => match base64::engine::general_purpose::STANDARD.decode(s.trim()) {
                Ok(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
                Err(e) => return Err(format!("from_base64(): {e}")),
            },
        },
        "to_hex" => match args.first() {
            None | Some(Value::Null) => Value::Null,
            Some(v) => Value::String(hex::encode(text(v))),
        },
        "json_get" => match (args.first(), string_arg(args, 1)) {
            (Some(v), Some(path)) => {
                let segs: Vec<Seg> = path
                    .split('.')
                    .map(|p| match p.parse::<usize>() {
                        Ok(i) => Seg::Index(i),
                        Err(_) => Seg::Key(p.to_owned()),
                    })
                    .collect();
                // A JSON string is read as JSON first.
                let parsed;
                let root = match v {
                    Value::String(s) => {
                        parsed = serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
                        &parsed
                    }
                    other => other,
                };
                lookup(root, &segs).cloned().unwrap_or(Value::Null)
            }
            _ => Value::Null,
        },
        "thingpropertyflatmap" => flat_map(m.payload, args),
        "changepoints" => changepoints(args)?,
        "pv_diagnose" => pv_diagnose(args)?,
        // The score the anomaly monitors gave the property's value in this post (by its time).
        "anomaly" => match (string_arg(args, 0), m.thing) {
            (Some(id), Some(thing)) => m
                .payload
                .get("items")
                .and_then(|items| items.get(&*id))
                .and_then(|item| item.get("time"))
                .and_then(Value::as_i64)
                .and_then(|t| thing.anomaly_score(m.product_key, m.device_name, &id, t))
                .unwrap_or(Value::Null),
            _ => Value::Null,
        },
        other => return Err(format!("unknown function `{other}()`")),
    })
}

/// Longest signal `changepoints()` takes from one message.
const MAX_SIGNAL: usize = 100_000;

/// Numbers of an array argument (a JSON text of one is read too); `None` for null, missing or
/// non-numeric entries.
fn numbers(v: &Value, name: &str, what: &str) -> Result<Option<Vec<Option<f64>>>, String> {
    let parsed;
    let v = match v {
        Value::Null => return Ok(None),
        Value::String(s) => {
            parsed = serde_json::from_str::<Value>(s)
                .map_err(|_| format!("{name}(): {what} is a text that is not a JSON array"))?;
            &parsed
        }
        other => other,
    };
    let Value::Array(a) = v else {
        return Err(format!("{name}(): {what} must be an array of numbers"));
    };
    if a.len() > MAX_SIGNAL {
        return Err(format!(
            "{name}(): {what} has {} values, at most {MAX_SIGNAL}",
            a.len()
        ));
    }
    Ok(Some(
        a.iter().map(|x| num(x).filter(|f| f.is_finite())).collect(),
    ))
}

/// `changepoints(values[, cost[, width[, penalty]]])`: indices into `values` where a new
/// segment starts (ruptures' `Window`, jump 5; cost `l2` default; width default half the
/// signal, 4..=100; penalty default the BIC-like one). Null and non-numeric entries are missing
/// points: indices still count them.
fn changepoints(args: &[Value]) -> Result<Value, String> {
    use ironlink_analytics::changepoint::{self, CostKind, Window};
    let Some(all) = numbers(
        args.first().unwrap_or(&Value::Null),
        "changepoints",
        "values",
    )?
    else {
        return Ok(Value::Null);
    };
    let kind = match string_arg(args, 1) {
        None => CostKind::L2,
        Some(name) => CostKind::parse(&name).ok_or_else(|| {
            format!("changepoints(): cost `{name}` must be l2, normal or clinear")
        })?,
    };
    let (at, values): (Vec<usize>, Vec<f64>) = all
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| (i, v)))
        .unzip();
    let window = match args.get(2).and_then(num) {
        Some(w) if (6.0..=100_000.0).contains(&w) => Window {
            width: w as usize,
            ..Window::default()
        },
        Some(w) => return Err(format!("changepoints(): width {w} must be 6..=100000")),
        None => Window::for_points(values.len()),
    };
    let penalty = match args.get(3).and_then(num) {
        Some(p) if p.is_finite() && p >= 0.0 => Some(p),
        Some(p) => return Err(format!("changepoints(): penalty {p} must be ≥ 0")),
        None => None,
    };
    let found = changepoint::find(&values, kind, window, penalty, None)
        .map_err(|e| format!("changepoints(): {e}"))?;
    Ok(Value::Array(
        found
            .starts
            .iter()
            .filter_map(|k| at.get(*k))
            .map(|i| Value::from(*i))
            .collect(),
    ))
}

/// `pv_diagnose(voltages, currents, irradiance, temperature, modules, strings)`: the fault an
/// IV curve of an array of the reference module shows, `{"fault", "confidence"}`.
fn pv_diagnose(args: &[Value]) -> Result<Value, String> {
    use ironlink_analytics::pv;
    let arg = |i: usize| args.get(i).unwrap_or(&Value::Null);
    let (Some(v), Some(i)) = (
        numbers(arg(0), "pv_diagnose", "voltages")?,
        numbers(arg(1), "pv_diagnose", "currents")?,
    ) else {
        return Ok(Value::Null);
    };
    let (Some(g), Some(t), Some(modules), Some(strings)) =
        (num(arg(2)), num(arg(3)), num(arg(4)), num(arg(5)))
    else {
        return Ok(Value::Null);
    };
    let points = |xs: Vec<Option<f64>>| -> Result<Vec<f64>, String> {
        xs.into_iter()
            .map(|x| {
                x.ok_or_else(|| "pv_diagnose(): a voltage or current is not a number".to_owned())
            })
            .collect()
    };
    if !(modules >= 1.0 && strings >= 1.0 && modules.is_finite() && strings.is_finite()) {
        return Err(format!(
            "pv_diagnose(): {modules} modules × {strings} strings: at least one of each"
        ));
    }
    let curve = pv::Curve {
        v: points(v)?,
        i: points(i)?,
        irradiance: g,
        temperature: t,
    };
    // A curve that cannot be diagnosed is refused before the model is needed.
    pv::check(&curve).map_err(|e| format!("pv_diagnose(): {e}"))?;
    let model = pv::shared().map_err(|e| format!("pv_diagnose(): {e}"))?;
    let d = model
        .diagnose(modules as usize, strings as usize, &curve)
        .map_err(|e| format!("pv_diagnose(): {e}"))?;
    Ok(serde_json::json!({"fault": d.fault.name(), "confidence": d.confidence}))
}

/// `thingPropertyFlatMap(...)`: the named properties (all when none) out of `items`, without
/// the `value` level; struct values flattened with `_`.
fn flat_map(payload: &Value, names: &[Value]) -> Value {
    fn flatten(prefix: &str, v: &Value, out: &mut Map<String, Value>) {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    flatten(&format!("{prefix}_{k}"), x, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.clone());
            }
        }
    }
    let mut out = Map::new();
    let Some(Value::Object(items)) = payload.get("items") else {
        return Value::Object(out);
    };
    for (k, item) in items {
        if !names.is_empty() && !names.iter().any(|n| n.as_str() == Some(k)) {
            continue;
        }
        let v = item.get("value").unwrap_or(item);
        flatten(k, v, &mut out);
    }
    Value::Object(out)
}

fn crypto(s: &str, alg: &str) -> Result<String, String> {
    use sha2::Digest;
    Ok(match alg.to_ascii_uppercase().as_str() {
        "MD5" => hex::encode(md5::Md5::digest(s.as_bytes())),
        "SHA1" | "SHA-1" => hex::encode(sha1::Sha1::digest(s.as_bytes())),
        "SHA-256" | "SHA256" => hex::encode(sha2::Sha256::digest(s.as_bytes())),
        "SHA-384" | "SHA384" => hex::encode(sha2::Sha384::digest(s.as_bytes())),
        "SHA-512" | "SHA512" => hex::encode(sha2::Sha512::digest(s.as_bytes())),
        other => {
            return Err(format!(
                "crypto(): `{other}` is not one of {}",
                CRYPTO_ALGORITHMS.join(", ")
            ))
        }
    })
}

fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Civil date of a day count since 1970-01-01.
fn civil(days: i64) -> (i64, u32, u32) {
    let (y, m, d) = ironlink_shared::time::civil_from_days(days);
    (y, u32::from(m), u32::from(d))
}

/// Formats ms since the epoch with a Java-style pattern (`yyyy-MM-dd HH:mm:ss.SSS`);
/// other letters are copied.
pub fn format_time(ms: i64, pattern: &str) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, mo, d) = civil(days);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1_000 % 60,
        rem % 1_000,
    );
    let mut out = String::new();
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let mut n = 1;
        while i + n < chars.len() && chars[i + n] == c {
            n += 1;
        }
        let field = match c {
            'y' if n == 2 => Some(format!("{:02}", y % 100)),
            'y' => Some(format!("{y:04}")),
            'M' => Some(format!("{mo:0n$}")),
            'd' => Some(format!("{d:0n$}")),
            'H' => Some(format!("{h:0n$}")),
            'm' => Some(format!("{mi:0n$}")),
            's' => Some(format!("{s:0n$}")),
            'S' => Some(format!("{milli:03}")),
            _ => None,
        };
        match field {
            Some(f) => out.push_str(&f),
            None => out.extend(std::iter::repeat_n(c, n)),
        }
        i += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::sql::parse;
    use super::*;
    use serde_json::json;

    fn run(sql: &str, payload: Value) -> Option<Map<String, Value>> {
        let q = parse(sql).unwrap();
        let raw = payload.to_string();
        let tags: crate::storage::TagMap = [("room".to_owned(), json!("B2"))].into_iter().collect();
        let m = Msg {
            topic: "/pk1/dev1/thing/event/property/post",
            raw: raw.as_bytes(),
            payload: &payload,
            product_key: "pk1",
            device_name: "dev1",
            message_id: "42",
            now_ms: 1_700_000_000_123,
            window: None,
            tags: Some(&tags),
            thing: None,
        };
        if let Some(c) = &q.condition {
            if !holds(c, &m, &[]).unwrap() {
                return None;
            }
        }
        Some(project(&q, &m, &[]).unwrap())
    }

    fn post(temp: Value) -> Value {
        json!({"iotId": "pk1.dev1", "productKey": "pk1", "deviceName": "dev1",
               "items": {"temp": {"value": temp, "time": 1}, "pos": {"value": {"lat": 1.5, "lon": 2}}}})
    }

    #[test]
    fn table() {
        let cases: Vec<(&str, Value, Option<Value>)> = vec![
            ("SELECT items.temp.value AS t FROM \"#\" WHERE items.temp.value > 30", post(json!(31)), Some(json!({"t": 31}))),
            ("SELECT items.temp.value AS t FROM \"#\" WHERE items.temp.value > 30", post(json!(29)), None),
            // A missing field is null: the condition does not hold, and it is left out.
            ("SELECT items.nope.value AS n FROM \"#\" WHERE items.nope.value > 1", post(json!(1)), None),
            ("SELECT items.nope.value AS n, 1 AS one FROM \"#\"", post(json!(1)), Some(json!({"one": 1}))),
            // The device's tags; a tag it does not have is null.
            ("SELECT attribute('room') AS r, attribute('none') AS n FROM \"#\" WHERE attribute('room') = 'B2'", post(json!(1)), Some(json!({"r": "B2"}))),
            ("SELECT 1 AS one FROM \"#\" WHERE attribute('room') = 'C3'", post(json!(1)), None),
            ("SELECT items.temp.value * 2 + 1 AS x, items.temp.value / 4 AS q, 7 % 3 AS r FROM \"#\"", post(json!(10)), Some(json!({"x": 21, "q": 2.5, "r": 1}))),
            ("SELECT deviceName() AS d, productKey() AS p, topic(2) AS t2, topic() AS t, messageId() AS id FROM \"#\"", post(json!(1)),
                Some(json!({"d": "dev1", "p": "pk1", "t2": "dev1", "t": "/pk1/dev1/thing/event/property/post", "id": "42"}))),
            ("SELECT CASE WHEN items.temp.value > 50 THEN 'hot' WHEN items.temp.value > 20 THEN 'warm' ELSE 'cold' END AS c FROM \"#\"", post(json!(25)), Some(json!({"c": "warm"}))),
            ("SELECT CASE deviceName() WHEN 'dev1' THEN 1 ELSE 2 END AS c FROM \"#\"", post(json!(25)), Some(json!({"c": 1}))),
            ("SELECT upper(deviceName()) AS u, concat(deviceName(), '-', 7) AS c, substring('abcdef', 1, 3) AS s, replace('a-b', '-', '+') AS r, length('héllo') AS l FROM \"#\"", post(json!(1)),
                Some(json!({"u": "DEV1", "c": "dev1-7", "s": "bc", "r": "a+b", "l": 5}))),
            ("SELECT abs(-2) AS a, round(2.567, 2) AS r, power(2, 10) AS p, mod(7, 4) AS m, floor(2.7) AS f, ceil(2.1) AS c, log(100, 10) AS l FROM \"#\"", post(json!(1)),
                Some(json!({"a": 2, "r": 2.57, "p": 1024, "m": 3, "f": 2, "c": 3, "l": 2}))),
            ("SELECT nanvl(items.nope.value, 0) AS n, tonumber('12.5') AS x, tostring(5) AS s FROM \"#\"", post(json!(1)), Some(json!({"n": 0, "x": 12.5, "s": "5"}))),
            ("SELECT thingPropertyFlatMap() FROM \"#\"", post(json!(3)), Some(json!({"temp": 3, "pos_lat": 1.5, "pos_lon": 2}))),
            ("SELECT thingPropertyFlatMap('pos') FROM \"#\"", post(json!(3)), Some(json!({"pos_lat": 1.5, "pos_lon": 2}))),
            ("SELECT crypto('abc', 'MD5') AS h FROM \"#\"", post(json!(1)), Some(json!({"h": "900150983cd24fb0d6963f7d28e17f72"}))),
            ("SELECT crypto('abc', 'SHA-256') AS h FROM \"#\"", post(json!(1)), Some(json!({"h": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}))),
            ("SELECT to_base64('hi') AS b, from_base64('aGk=') AS d, to_hex('hi') AS h FROM \"#\"", post(json!(1)), Some(json!({"b": "aGk=", "d": "hi", "h": "6869"}))),
            ("SELECT timestamp() AS t, timestamp('yyyy-MM-dd HH:mm:ss') AS bj, timestamp_utc('yyyy-MM-dd HH:mm:ss.SSS') AS u FROM \"#\"", post(json!(1)),
                Some(json!({"t": 1_700_000_000_123i64, "bj": "2023-11-15 06:13:20", "u": "2023-11-14 22:13:20.123"}))),
            ("SELECT 1 AS x FROM \"#\" WHERE deviceName() LIKE 'dev_' AND items.temp.value IN (1, 2, 3) AND items.x.value IS NULL", post(json!(2)), Some(json!({"x": 1}))),
            ("SELECT 1 AS x FROM \"#\" WHERE deviceName() NOT LIKE 'd%'", post(json!(2)), None),
            ("SELECT 1 AS x FROM \"#\" WHERE items.temp.value NOT BETWEEN 1 AND 3", post(json!(2)), None),
            ("SELECT 1 AS x FROM \"#\" WHERE NOT (items.nope.value > 1)", post(json!(2)), None),
            ("SELECT 1 AS x FROM \"#\" WHERE items.nope.value > 1 OR items.temp.value = 2", post(json!(2)), Some(json!({"x": 1}))),
            // Numbers sent as strings compare as numbers.
            ("SELECT 1 AS x FROM \"#\" WHERE items.temp.value >= 2", post(json!("2.0")), Some(json!({"x": 1}))),
            ("SELECT items.pos.value.lat AS lat, items['pos'].value['lon'] AS lon FROM \"#\"", post(json!(1)), Some(json!({"lat": 1.5, "lon": 2}))),
            ("SELECT *, 5 AS five FROM \"#\"", json!({"a": 1}), Some(json!({"a": 1, "five": 5}))),
            ("SELECT json_get('{\"a\":[1,{\"b\":9}]}', 'a.1.b') AS b FROM \"#\"", json!({}), Some(json!({"b": 9}))),
            ("SELECT 10 / 0 AS z, -items.temp.value AS n FROM \"#\"", post(json!(3)), Some(json!({"n": -3}))),
        ];
        for (sql, payload, want) in cases {
            let got = run(sql, payload).map(Value::Object);
            assert_eq!(got, want, "{sql}");
        }
    }

    #[test]
    fn a_string_in_arithmetic_fails_the_message_with_the_reason() {
        let q = parse("SELECT items.temp.value + 1 AS x FROM \"#\"").unwrap();
        let p = post(json!("warm"));
        let m = Msg {
            topic: "t",
            raw: b"",
            payload: &p,
            product_key: "p",
            device_name: "d",
            message_id: "1",
            now_ms: 0,
            window: None,
            tags: None,
            thing: None,
        };
        let e = project(&q, &m, &[]).unwrap_err();
        assert!(e.contains("arithmetic on a string"), "{e}");
    }

    #[test]
    fn like_matches_and_stays_linear() {
        for (s, p, want) in [
            ("dev1", "dev_", true),
            ("dev12", "dev_", false),
            ("abc", "%", true),
            ("", "%", true),
            ("", "_", false),
            ("a-b-c", "a%c", true),
            ("a-b-c", "%b%", true),
            ("a-b-c", "%d%", false),
            ("abcabc", "%abc", true),
            ("mississippi", "m%iss%pi", true),
        ] {
            assert_eq!(like(s, p), want, "{s} LIKE {p}");
        }
        let long = "a".repeat(10_000);
        assert!(!like(&long, &format!("{}b", "%a".repeat(30))));
    }

    #[test]
    fn uuid_and_rand_have_their_shape() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        let r = rand::random::<f64>();
        assert!((0.0..1.0).contains(&r));
    }
}
