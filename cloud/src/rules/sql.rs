//! The rule SQL: `SELECT <items> FROM "<topic filter>" [WHERE <cond>] [GROUP BY <window>[, <key>...]]
//! [HAVING <cond>]`, the dialect of Alibaba's rule engine plus eKuiper-style time windows.
//!
//! Parsing and type checking happen once, when a rule is created; every error names the line
//! and column it was found at. Evaluation lives in [`super::eval`].

use std::fmt;

/// Where in the SQL text something is (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// Line.
    pub line: u32,
    /// Column, in characters.
    pub col: u32,
}

/// A SQL error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    /// Where.
    pub pos: Pos,
    /// What.
    pub message: String,
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.pos.line, self.pos.col, self.message
        )
    }
}

impl std::error::Error for SqlError {}

fn err<T>(pos: Pos, message: impl Into<String>) -> Result<T, SqlError> {
    Err(SqlError {
        pos,
        message: message.into(),
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    /// A double-quoted string: a topic after FROM, a string elsewhere.
    Quoted(String),
    Int(i64),
    Float(f64),
    Sym(&'static str),
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Str(s) => write!(f, "'{s}'"),
            Tok::Quoted(s) => write!(f, "\"{s}\""),
            Tok::Int(n) => write!(f, "{n}"),
            Tok::Float(n) => write!(f, "{n}"),
            Tok::Sym(s) => write!(f, "`{s}`"),
            Tok::End => write!(f, "the end of the statement"),
        }
    }
}

const SYMBOLS: [&str; 17] = [
    "<>", "!=", "<=", ">=", "==", "||", "=", "<", ">", "+", "-", "*", "/", "%", "(", ")", ",",
];

fn lex(src: &str) -> Result<Vec<(Tok, Pos)>, SqlError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line, mut col) = (0usize, 1u32, 1u32);
    let advance = |i: &mut usize, line: &mut u32, col: &mut u32, c: char| {
        *i += 1;
        if c == '\n' {
            *line += 1;
            *col = 1;
        } else {
            *col += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let pos = Pos { line, col };
        if c.is_whitespace() {
            advance(&mut i, &mut line, &mut col, c);
            continue;
        }
        if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                {
                    let ch = chars[i];
                    advance(&mut i, &mut line, &mut col, ch);
                }
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == '$' {
            let mut s = String::new();
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                s.push(chars[i]);
                {
                    let ch = chars[i];
                    advance(&mut i, &mut line, &mut col, ch);
                }
            }
            out.push((Tok::Ident(s), pos));
            continue;
        }
        if c == '`' {
            let mut s = String::new();
            advance(&mut i, &mut line, &mut col, c);
            loop {
                match chars.get(i) {
                    None => return err(pos, "a `quoted name` is not closed"),
                    Some('`') => {
                        advance(&mut i, &mut line, &mut col, '`');
                        break;
                    }
                    Some(&ch) => {
                        s.push(ch);
                        advance(&mut i, &mut line, &mut col, ch);
                    }
                }
            }
            out.push((Tok::Ident(s), pos));
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let mut s = String::new();
            let mut float = false;
            while i < chars.len()
                && (chars[i].is_ascii_digit()
                    || (chars[i] == '.'
                        && !float
                        && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
                    || ((chars[i] == 'e' || chars[i] == 'E')
                        && chars
                            .get(i + 1)
                            .is_some_and(|d| d.is_ascii_digit() || *d == '-' || *d == '+')))
            {
                if chars[i] == '.' {
                    float = true;
                }
                if chars[i] == 'e' || chars[i] == 'E' {
                    float = true;
                    s.push(chars[i]);
                    {
                        let ch = chars[i];
                        advance(&mut i, &mut line, &mut col, ch);
                    }
                }
                s.push(chars[i]);
                {
                    let ch = chars[i];
                    advance(&mut i, &mut line, &mut col, ch);
                }
            }
            let tok = if float {
                match s.parse::<f64>() {
                    Ok(f) => Tok::Float(f),
                    Err(_) => return err(pos, format!("`{s}` is not a number")),
                }
            } else {
                match s.parse::<i64>() {
                    Ok(n) => Tok::Int(n),
                    Err(_) => match s.parse::<f64>() {
                        Ok(f) => Tok::Float(f),
                        Err(_) => return err(pos, format!("`{s}` is not a number")),
                    },
                }
            };
            out.push((tok, pos));
            continue;
        }
        if c == '\'' || c == '"' {
            let mut s = String::new();
            advance(&mut i, &mut line, &mut col, c);
            loop {
                match chars.get(i) {
                    None => return err(pos, "a string is not closed"),
                    Some(&q) if q == c => {
                        advance(&mut i, &mut line, &mut col, q);
                        if chars.get(i) == Some(&c) {
                            s.push(c);
                            advance(&mut i, &mut line, &mut col, c);
                        } else {
                            break;
                        }
                    }
                    Some(&ch) => {
                        s.push(ch);
                        advance(&mut i, &mut line, &mut col, ch);
                    }
                }
            }
            out.push((
                if c == '"' {
                    Tok::Quoted(s)
                } else {
                    Tok::Str(s)
                },
                pos,
            ));
            continue;
        }
        if c == '.' || c == '[' || c == ']' {
            out.push((
                Tok::Sym(match c {
                    '.' => ".",
                    '[' => "[",
                    _ => "]",
                }),
                pos,
            ));
            advance(&mut i, &mut line, &mut col, c);
            continue;
        }
        let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
        match SYMBOLS.iter().find(|s| rest.starts_with(**s)) {
            Some(s) => {
                for _ in 0..s.len() {
                    {
                        let ch = chars[i];
                        advance(&mut i, &mut line, &mut col, ch);
                    }
                }
                out.push((Tok::Sym(s), pos));
            }
            None => return err(pos, format!("unexpected character `{c}`")),
        }
    }
    out.push((Tok::End, Pos { line, col }));
    Ok(out)
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `%`
    Mod,
    /// `||` (string concatenation)
    Concat,
    /// `=`
    Eq,
    /// `!=`, `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `AND`
    And,
    /// `OR`
    Or,
}

/// A segment of a JSON path.
#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    /// `.name`
    Key(String),
    /// `[n]`
    Index(usize),
}

/// Aggregate functions of windowed rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AggKind {
    /// `count(*)` or `count(x)` (non-null x)
    Count,
    /// `sum(x)`
    Sum,
    /// `avg(x)`
    Avg,
    /// `min(x)`
    Min,
    /// `max(x)`
    Max,
    /// `first(x)`: the earliest non-null value
    First,
    /// `last(x)`: the latest non-null value
    Last,
    /// `stddev(x)`: population standard deviation
    Stddev,
}

impl AggKind {
    fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "count" => Self::Count,
            "sum" => Self::Sum,
            "avg" => Self::Avg,
            "min" => Self::Min,
            "max" => Self::Max,
            "first" => Self::First,
            "last" => Self::Last,
            "stddev" => Self::Stddev,
            _ => return None,
        })
    }
}

/// An expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A literal (number, string, true/false, null).
    Lit(serde_json::Value),
    /// A path into the message payload.
    Path(Vec<Seg>, Pos),
    /// A function call (name lower-cased).
    Call(String, Vec<Expr>, Pos),
    /// An aggregate's result, by its index in [`Query::aggregates`].
    Agg(usize),
    /// A binary operation.
    Bin(BinOp, Box<Expr>, Box<Expr>, Pos),
    /// `NOT e`
    Not(Box<Expr>),
    /// `-e`
    Neg(Box<Expr>, Pos),
    /// `e IS [NOT] NULL`
    IsNull(Box<Expr>, bool),
    /// `e [NOT] IN (a, b, ...)`
    In(Box<Expr>, Vec<Expr>, bool),
    /// `e [NOT] LIKE 'pattern'`
    Like(Box<Expr>, String, bool),
    /// `CASE [operand] WHEN .. THEN .. [ELSE ..] END`
    Case {
        /// The operand of a simple CASE.
        operand: Option<Box<Expr>>,
        /// WHEN / THEN pairs.
        arms: Vec<(Expr, Expr)>,
        /// ELSE.
        otherwise: Option<Box<Expr>>,
    },
}

/// One SELECT item.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// `*`: every field of the payload.
    All,
    /// An expression and the name it is output under (None: left out of the output, used
    /// for `thingPropertyFlatMap`, which merges its fields into the row).
    Expr(Expr, String),
}

/// Time-window kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WindowKind {
    /// Fixed, non-overlapping windows of `size`.
    Tumbling,
    /// Windows of `size` starting every `hop`.
    Hopping,
    /// The `size` before each message, emitted for every message.
    Sliding,
}

/// A time window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Kind.
    pub kind: WindowKind,
    /// Length in ms.
    pub size_ms: i64,
    /// Hop in ms (hopping only; equals size for tumbling).
    pub hop_ms: i64,
}

/// A parsed, checked rule query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// SELECT items.
    pub items: Vec<Item>,
    /// The topic filter after FROM (MQTT wildcards `+`, `#`).
    pub topic: String,
    /// WHERE.
    pub condition: Option<Expr>,
    /// The window of GROUP BY.
    pub window: Option<Window>,
    /// The other GROUP BY keys.
    pub group_keys: Vec<Expr>,
    /// HAVING.
    pub having: Option<Expr>,
    /// Aggregates referenced by [`Expr::Agg`]: kind and argument (None for `count(*)`).
    pub aggregates: Vec<(AggKind, Option<Expr>)>,
    /// True when the rule calls `attribute()` (the device's tags are looked up for it).
    pub reads_tags: bool,
    /// True when the rule calls `pv_diagnose()` (its model is trained when the rule is made).
    pub diagnoses_pv: bool,
}

/// Static types, for checking at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Num,
    Str,
    Bool,
    Null,
    Any,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Num => "a number",
            Ty::Str => "a string",
            Ty::Bool => "a boolean",
            Ty::Null => "null",
            Ty::Any => "a value",
        }
    }
}

/// Functions: name, least and most arguments, argument types (None: any), result type.
struct Sig {
    name: &'static str,
    min: usize,
    max: usize,
    args: &'static [Option<Ty>],
    ret: Ty,
}

const N: Option<Ty> = Some(Ty::Num);
const S: Option<Ty> = Some(Ty::Str);
const A: Option<Ty> = None;

const FUNCTIONS: &[Sig] = &[
    sig("abs", 1, 1, &[N], Ty::Num),
    sig("acos", 1, 1, &[N], Ty::Num),
    sig("asin", 1, 1, &[N], Ty::Num),
    sig("atan", 1, 1, &[N], Ty::Num),
    sig("ceil", 1, 1, &[N], Ty::Num),
    sig("cos", 1, 1, &[N], Ty::Num),
    sig("cosh", 1, 1, &[N], Ty::Num),
    sig("exp", 1, 1, &[N], Ty::Num),
    sig("floor", 1, 1, &[N], Ty::Num),
    sig("ln", 1, 1, &[N], Ty::Num),
    sig("log", 1, 2, &[N, N], Ty::Num),
    sig("mod", 2, 2, &[N, N], Ty::Num),
    sig("power", 2, 2, &[N, N], Ty::Num),
    sig("rand", 0, 0, &[], Ty::Num),
    sig("round", 1, 2, &[N, N], Ty::Num),
    sig("sin", 1, 1, &[N], Ty::Num),
    sig("sinh", 1, 1, &[N], Ty::Num),
    sig("sqrt", 1, 1, &[N], Ty::Num),
    sig("tan", 1, 1, &[N], Ty::Num),
    sig("tanh", 1, 1, &[N], Ty::Num),
    sig("concat", 1, 16, &[A; 16], Ty::Str),
    sig("lower", 1, 1, &[S], Ty::Str),
    sig("upper", 1, 1, &[S], Ty::Str),
    sig("trim", 1, 1, &[S], Ty::Str),
    sig("length", 1, 1, &[A], Ty::Num),
    sig("replace", 3, 3, &[S, S, S], Ty::Str),
    sig("substring", 2, 3, &[S, N, N], Ty::Str),
    sig("startswith", 2, 2, &[S, S], Ty::Bool),
    sig("endswith", 2, 2, &[S, S], Ty::Bool),
    sig("tostring", 1, 1, &[A], Ty::Str),
    sig("tonumber", 1, 1, &[A], Ty::Any),
    sig("nanvl", 2, 2, &[A, A], Ty::Any),
    sig("crypto", 2, 2, &[A, S], Ty::Str),
    sig("attribute", 1, 1, &[S], Ty::Any),
    sig("devicename", 0, 0, &[], Ty::Str),
    sig("productkey", 0, 0, &[], Ty::Str),
    sig("topic", 0, 1, &[N], Ty::Str),
    sig("messageid", 0, 0, &[], Ty::Str),
    sig("timestamp", 0, 1, &[S], Ty::Any),
    sig("timestamp_utc", 0, 1, &[S], Ty::Any),
    sig("newuuid", 0, 0, &[], Ty::Str),
    sig("window_start", 0, 0, &[], Ty::Num),
    sig("window_end", 0, 0, &[], Ty::Num),
    sig("payload", 0, 1, &[S], Ty::Str),
    sig("to_base64", 1, 1, &[A], Ty::Str),
    sig("from_base64", 1, 1, &[S], Ty::Str),
    sig("to_hex", 1, 1, &[A], Ty::Str),
    sig("thingpropertyflatmap", 0, 64, &[S; 64], Ty::Any),
    sig("json_get", 2, 2, &[A, S], Ty::Any),
    sig("changepoints", 1, 4, &[A, S, N, N], Ty::Any),
    sig("pv_diagnose", 6, 6, &[A, A, N, N, N, N], Ty::Any),
    sig("anomaly", 1, 1, &[S], Ty::Any),
];

const fn sig(
    name: &'static str,
    min: usize,
    max: usize,
    args: &'static [Option<Ty>],
    ret: Ty,
) -> Sig {
    Sig {
        name,
        min,
        max,
        args,
        ret,
    }
}

/// The names of every scalar function (for documentation and errors).
pub fn function_names() -> Vec<&'static str> {
    FUNCTIONS.iter().map(|s| s.name).collect()
}

struct Parser {
    toks: Vec<(Tok, Pos)>,
    at: usize,
    /// Aggregates found so far (when GROUP BY allows them, checked later).
    aggregates: Vec<(AggKind, Option<Expr>, Pos)>,
    /// Nesting depth of the expression being parsed (bounded: parsing and evaluation recurse).
    depth: usize,
    /// True once `attribute()` is called: the rule reads the device's tags.
    reads_tags: bool,
    /// True once `pv_diagnose()` is called.
    diagnoses_pv: bool,
}

/// Deepest expression nesting accepted.
const MAX_DEPTH: usize = 64;

fn is_kw(t: &Tok, kw: &str) -> bool {
    matches!(t, Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
}

const RESERVED: [&str; 20] = [
    "select", "from", "where", "group", "by", "having", "as", "and", "or", "not", "case", "when",
    "then", "else", "end", "is", "in", "like", "null", "between",
];

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.at].0
    }

    fn pos(&self) -> Pos {
        self.toks[self.at].1
    }

    fn bump(&mut self) -> (Tok, Pos) {
        let t = self.toks[self.at].clone();
        if self.at + 1 < self.toks.len() {
            self.at += 1;
        }
        t
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if is_kw(self.peek(), kw) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn eat_sym(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Tok::Sym(x) if *x == s) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn expect_kw(&mut self, kw: &str) -> Result<(), SqlError> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            err(
                self.pos(),
                format!("expected {}, found {}", kw.to_uppercase(), self.peek()),
            )
        }
    }

    fn expect_sym(&mut self, s: &str) -> Result<(), SqlError> {
        if self.eat_sym(s) {
            Ok(())
        } else {
            err(self.pos(), format!("expected `{s}`, found {}", self.peek()))
        }
    }

    fn expr(&mut self) -> Result<Expr, SqlError> {
        self.nested(Self::or)
    }

    /// Runs `f` one level deeper, refusing expressions nested deeper than [`MAX_DEPTH`].
    fn nested(&mut self, f: fn(&mut Self) -> Result<Expr, SqlError>) -> Result<Expr, SqlError> {
        if self.depth >= MAX_DEPTH {
            return err(
                self.pos(),
                format!("the expression is nested deeper than {MAX_DEPTH} levels"),
            );
        }
        self.depth += 1;
        let r = f(self);
        self.depth -= 1;
        r
    }

    fn or(&mut self) -> Result<Expr, SqlError> {
        let mut l = self.and()?;
        while is_kw(self.peek(), "or") {
            let pos = self.bump().1;
            let r = self.and()?;
            l = Expr::Bin(BinOp::Or, Box::new(l), Box::new(r), pos);
        }
        Ok(l)
    }

    fn and(&mut self) -> Result<Expr, SqlError> {
        let mut l = self.not()?;
        while is_kw(self.peek(), "and") {
            let pos = self.bump().1;
            let r = self.not()?;
            l = Expr::Bin(BinOp::And, Box::new(l), Box::new(r), pos);
        }
        Ok(l)
    }

    fn not(&mut self) -> Result<Expr, SqlError> {
        if self.eat_kw("not") {
            return Ok(Expr::Not(Box::new(self.nested(Self::not)?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, SqlError> {
        let l = self.additive()?;
        let pos = self.pos();
        let op = match self.peek() {
            Tok::Sym("=") | Tok::Sym("==") => Some(BinOp::Eq),
            Tok::Sym("!=") | Tok::Sym("<>") => Some(BinOp::Ne),
            Tok::Sym("<") => Some(BinOp::Lt),
            Tok::Sym("<=") => Some(BinOp::Le),
            Tok::Sym(">") => Some(BinOp::Gt),
            Tok::Sym(">=") => Some(BinOp::Ge),
            _ => None,
        };
        if let Some(op) = op {
            self.bump();
            let r = self.additive()?;
            return Ok(Expr::Bin(op, Box::new(l), Box::new(r), pos));
        }
        if self.eat_kw("is") {
            let negated = self.eat_kw("not");
            self.expect_kw("null")?;
            return Ok(Expr::IsNull(Box::new(l), negated));
        }
        let negated = if is_kw(self.peek(), "not")
            && (is_kw(&self.toks[self.at + 1].0, "in")
                || is_kw(&self.toks[self.at + 1].0, "like")
                || is_kw(&self.toks[self.at + 1].0, "between"))
        {
            self.bump();
            true
        } else {
            false
        };
        if self.eat_kw("in") {
            self.expect_sym("(")?;
            let mut list = vec![self.expr()?];
            while self.eat_sym(",") {
                list.push(self.expr()?);
            }
            self.expect_sym(")")?;
            return Ok(Expr::In(Box::new(l), list, negated));
        }
        if self.eat_kw("like") {
            let (t, p) = self.bump();
            let Tok::Str(pattern) = t else {
                return err(p, "LIKE takes a 'quoted pattern'");
            };
            return Ok(Expr::Like(Box::new(l), pattern, negated));
        }
        if self.eat_kw("between") {
            let lo = self.additive()?;
            self.expect_kw("and")?;
            let hi = self.additive()?;
            let both = Expr::Bin(
                BinOp::And,
                Box::new(Expr::Bin(BinOp::Ge, Box::new(l.clone()), Box::new(lo), pos)),
                Box::new(Expr::Bin(BinOp::Le, Box::new(l), Box::new(hi), pos)),
                pos,
            );
            return Ok(if negated {
                Expr::Not(Box::new(both))
            } else {
                both
            });
        }
        if negated {
            return err(pos, "expected IN, LIKE or BETWEEN after NOT");
        }
        Ok(l)
    }

    fn additive(&mut self) -> Result<Expr, SqlError> {
        let mut l = self.multiplicative()?;
        loop {
            let pos = self.pos();
            let op = match self.peek() {
                Tok::Sym("+") => BinOp::Add,
                Tok::Sym("-") => BinOp::Sub,
                Tok::Sym("||") => BinOp::Concat,
                _ => return Ok(l),
            };
            self.bump();
            let r = self.multiplicative()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r), pos);
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, SqlError> {
        let mut l = self.unary()?;
        loop {
            let pos = self.pos();
            let op = match self.peek() {
                Tok::Sym("*") => BinOp::Mul,
                Tok::Sym("/") => BinOp::Div,
                Tok::Sym("%") => BinOp::Mod,
                _ => return Ok(l),
            };
            self.bump();
            let r = self.unary()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r), pos);
        }
    }

    fn unary(&mut self) -> Result<Expr, SqlError> {
        let pos = self.pos();
        if self.eat_sym("-") {
            let e = self.nested(Self::unary)?;
            return Ok(match e {
                Expr::Lit(serde_json::Value::Number(n)) => Expr::Lit(match n.as_i64() {
                    Some(i) => serde_json::Value::from(-i),
                    None => serde_json::Value::from(-n.as_f64().unwrap_or(0.0)),
                }),
                e => Expr::Neg(Box::new(e), pos),
            });
        }
        if self.eat_sym("+") {
            return self.nested(Self::unary);
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, SqlError> {
        let (t, pos) = self.bump();
        match t {
            Tok::Int(n) => Ok(Expr::Lit(n.into())),
            Tok::Float(f) => Ok(Expr::Lit(f.into())),
            Tok::Str(s) | Tok::Quoted(s) => Ok(Expr::Lit(s.into())),
            Tok::Sym("(") => {
                let e = self.expr()?;
                self.expect_sym(")")?;
                Ok(e)
            }
            Tok::Ident(id) if id.eq_ignore_ascii_case("null") => {
                Ok(Expr::Lit(serde_json::Value::Null))
            }
            Tok::Ident(id) if id.eq_ignore_ascii_case("true") => Ok(Expr::Lit(true.into())),
            Tok::Ident(id) if id.eq_ignore_ascii_case("false") => Ok(Expr::Lit(false.into())),
            Tok::Ident(id) if id.eq_ignore_ascii_case("case") => self.case(),
            Tok::Ident(id) => {
                if self.eat_sym("(") {
                    return self.call(id, pos);
                }
                if RESERVED.iter().any(|k| id.eq_ignore_ascii_case(k)) {
                    return err(
                        pos,
                        format!(
                            "expected an expression, found the keyword {}",
                            id.to_uppercase()
                        ),
                    );
                }
                let mut segs = vec![Seg::Key(id)];
                loop {
                    if self.eat_sym(".") {
                        let (t, p) = self.bump();
                        match t {
                            Tok::Ident(s) => segs.push(Seg::Key(s)),
                            Tok::Int(n) => segs.push(Seg::Key(n.to_string())),
                            other => {
                                return err(
                                    p,
                                    format!("expected a field name after `.`, found {other}"),
                                )
                            }
                        }
                    } else if self.eat_sym("[") {
                        let (t, p) = self.bump();
                        match t {
                            Tok::Int(n) if n >= 0 => segs.push(Seg::Index(n as usize)),
                            Tok::Str(s) | Tok::Quoted(s) => segs.push(Seg::Key(s)),
                            other => {
                                return err(
                                    p,
                                    format!("expected an index or a 'key' in [], found {other}"),
                                )
                            }
                        }
                        self.expect_sym("]")?;
                    } else {
                        break;
                    }
                }
                Ok(Expr::Path(segs, pos))
            }
            other => err(pos, format!("expected an expression, found {other}")),
        }
    }

    fn call(&mut self, name: String, pos: Pos) -> Result<Expr, SqlError> {
        let lower = name.to_ascii_lowercase();
        if let Some(kind) = AggKind::from_name(&lower) {
            let arg = if kind == AggKind::Count && self.eat_sym("*") {
                None
            } else {
                let inner_start = self.aggregates.len();
                let e = self.expr()?;
                if self.aggregates.len() > inner_start {
                    return err(pos, format!("{lower}() cannot contain another aggregate"));
                }
                Some(e)
            };
            self.expect_sym(")")?;
            self.aggregates.push((kind, arg, pos));
            return Ok(Expr::Agg(self.aggregates.len() - 1));
        }
        let mut args = Vec::new();
        if !self.eat_sym(")") {
            loop {
                args.push(self.expr()?);
                if self.eat_sym(")") {
                    break;
                }
                self.expect_sym(",")?;
            }
        }
        self.reads_tags |= lower == "attribute";
        self.diagnoses_pv |= lower == "pv_diagnose";
        Ok(Expr::Call(lower, args, pos))
    }

    fn case(&mut self) -> Result<Expr, SqlError> {
        let operand = if is_kw(self.peek(), "when") {
            None
        } else {
            Some(Box::new(self.expr()?))
        };
        let mut arms = Vec::new();
        while self.eat_kw("when") {
            let w = self.expr()?;
            self.expect_kw("then")?;
            arms.push((w, self.expr()?));
        }
        if arms.is_empty() {
            return err(self.pos(), "CASE needs at least one WHEN ... THEN ...");
        }
        let otherwise = if self.eat_kw("else") {
            Some(Box::new(self.expr()?))
        } else {
            None
        };
        self.expect_kw("end")?;
        Ok(Expr::Case {
            operand,
            arms,
            otherwise,
        })
    }

    fn duration_unit(&mut self) -> Result<i64, SqlError> {
        let (t, p) = self.bump();
        let unit = match &t {
            Tok::Ident(s) | Tok::Str(s) => s.to_ascii_lowercase(),
            other => {
                return err(
                    p,
                    format!("expected a time unit (ms, ss, mi, hh, dd), found {other}"),
                )
            }
        };
        Ok(match unit.as_str() {
            "ms" => 1,
            "ss" | "s" => 1_000,
            "mi" | "m" => 60_000,
            "hh" | "h" => 3_600_000,
            "dd" | "d" => 86_400_000,
            other => {
                return err(
                    p,
                    format!("`{other}` is not a time unit: use ms, ss, mi, hh or dd"),
                )
            }
        })
    }

    fn length(&mut self, unit: i64, what: &str) -> Result<i64, SqlError> {
        let (t, p) = self.bump();
        match t {
            Tok::Int(n) if n > 0 => n
                .checked_mul(unit)
                .filter(|ms| *ms <= 7 * 86_400_000)
                .map_or_else(|| err(p, format!("the {what} is longer than 7 days")), Ok),
            other => err(
                p,
                format!("the {what} must be a positive whole number, found {other}"),
            ),
        }
    }

    fn window(&mut self, name: &str, pos: Pos) -> Result<Window, SqlError> {
        let kind = match name {
            "tumblingwindow" => WindowKind::Tumbling,
            "hoppingwindow" => WindowKind::Hopping,
            "slidingwindow" => WindowKind::Sliding,
            _ => return err(pos, format!("`{name}` is not a window")),
        };
        self.expect_sym("(")?;
        let unit = self.duration_unit()?;
        self.expect_sym(",")?;
        let size_ms = self.length(unit, "window size")?;
        let mut hop_ms = size_ms;
        if kind == WindowKind::Hopping {
            self.expect_sym(",")?;
            let p = self.pos();
            hop_ms = self.length(unit, "hop")?;
            if hop_ms > size_ms {
                return err(p, "the hop must not be longer than the window");
            }
            if size_ms % hop_ms != 0 {
                return err(p, "the window size must be a whole number of hops");
            }
            if size_ms / hop_ms > 1_000 {
                return err(p, "a window may span at most 1,000 hops");
            }
        }
        self.expect_sym(")")?;
        Ok(Window {
            kind,
            size_ms,
            hop_ms,
        })
    }
}

/// Parses and checks a rule's SQL.
pub fn parse(src: &str) -> Result<Query, SqlError> {
    let toks = lex(src)?;
    let mut p = Parser {
        toks,
        at: 0,
        aggregates: Vec::new(),
        depth: 0,
        reads_tags: false,
        diagnoses_pv: false,
    };
    p.expect_kw("select")?;
    let mut items = Vec::new();
    loop {
        let pos = p.pos();
        if p.eat_sym("*") {
            items.push((Item::All, pos));
        } else {
            let e = p.expr()?;
            let name = if p.eat_kw("as") {
                let (t, np) = p.bump();
                match t {
                    Tok::Ident(s) | Tok::Str(s) | Tok::Quoted(s) => s,
                    other => return err(np, format!("expected a name after AS, found {other}")),
                }
            } else if let Tok::Ident(s) = p.peek().clone() {
                if RESERVED.iter().any(|k| s.eq_ignore_ascii_case(k)) {
                    default_name(&e)
                } else {
                    p.bump();
                    s
                }
            } else {
                default_name(&e)
            };
            items.push((Item::Expr(e, name), pos));
        }
        if !p.eat_sym(",") {
            break;
        }
    }
    p.expect_kw("from")?;
    let (t, tpos) = p.bump();
    let topic = match t {
        Tok::Quoted(s) | Tok::Str(s) => s,
        other => {
            return err(
                tpos,
                format!("expected a \"topic\" after FROM, found {other}"),
            )
        }
    };
    check_topic_filter(&topic).map_err(|m| SqlError {
        pos: tpos,
        message: m,
    })?;
    let before_where = p.aggregates.len();
    let condition = if p.eat_kw("where") {
        Some(p.expr()?)
    } else {
        None
    };
    let where_aggs = p.aggregates.len() - before_where;
    let mut window = None;
    let mut group_keys = Vec::new();
    let mut group_pos = p.pos();
    if p.eat_kw("group") {
        p.expect_kw("by")?;
        loop {
            let pos = p.pos();
            if let Tok::Ident(name) = p.peek().clone() {
                let lower = name.to_ascii_lowercase();
                if lower.ends_with("window") && matches!(p.toks[p.at + 1].0, Tok::Sym("(")) {
                    p.bump();
                    if window.is_some() {
                        return err(pos, "GROUP BY takes one window");
                    }
                    window = Some(p.window(&lower, pos)?);
                    if !p.eat_sym(",") {
                        break;
                    }
                    continue;
                }
            }
            let before = p.aggregates.len();
            let e = p.expr()?;
            if p.aggregates.len() > before {
                return err(pos, "GROUP BY cannot group by an aggregate");
            }
            group_keys.push(e);
            if !p.eat_sym(",") {
                break;
            }
        }
        if window.is_none() {
            return err(group_pos, "GROUP BY needs a window: TUMBLINGWINDOW(unit, size), HOPPINGWINDOW(unit, size, hop) or SLIDINGWINDOW(unit, size)");
        }
        group_pos = p.pos();
    }
    let having = if p.eat_kw("having") {
        if window.is_none() {
            return err(group_pos, "HAVING needs GROUP BY with a window");
        }
        Some(p.expr()?)
    } else {
        None
    };
    if !matches!(p.peek(), Tok::End) {
        return err(
            p.pos(),
            format!("unexpected {} after the statement", p.peek()),
        );
    }
    // Aggregates belong in SELECT and HAVING of windowed rules, never in WHERE.
    if where_aggs > 0 {
        let pos = p.aggregates[before_where].2;
        return err(pos, "aggregates are not allowed in WHERE (use HAVING)");
    }
    if window.is_none() {
        if let Some((k, _, pos)) = p.aggregates.first() {
            let name = format!("{k:?}").to_lowercase();
            return err(
                *pos,
                format!("{name}() is an aggregate: it needs GROUP BY with a window"),
            );
        }
    }
    let aggregates: Vec<(AggKind, Option<Expr>)> =
        p.aggregates.into_iter().map(|(k, e, _)| (k, e)).collect();
    let q = Query {
        items: items.iter().map(|(i, _)| i.clone()).collect(),
        topic,
        condition,
        window,
        group_keys,
        having,
        aggregates,
        reads_tags: p.reads_tags,
        diagnoses_pv: p.diagnoses_pv,
    };
    check(&q, &items)?;
    Ok(q)
}

fn default_name(e: &Expr) -> String {
    match e {
        Expr::Path(segs, _) => match segs.iter().rev().find_map(|s| match s {
            Seg::Key(k) if k != "value" => Some(k.clone()),
            _ => None,
        }) {
            // `items.temp.value` is output as `temp`.
            Some(k) => k,
            None => "value".into(),
        },
        Expr::Call(name, _, _) => name.clone(),
        _ => "expr".into(),
    }
}

/// Checks an MQTT topic filter.
pub fn check_topic_filter(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("the topic after FROM is empty".into());
    }
    let levels: Vec<&str> = t.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err(format!(
                "`#` must be a whole level at the end of the topic: `{t}`"
            ));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("`+` must be a whole level of the topic: `{t}`"));
        }
    }
    Ok(())
}

/// True when an MQTT topic filter matches a topic.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when some topic could match both filters.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn check(q: &Query, items: &[(Item, Pos)]) -> Result<(), SqlError> {
    let windowed = q.window.is_some();
    for (item, pos) in items {
        if let Item::Expr(e, _) = item {
            let t = ty(e, q)?;
            let _ = (t, pos, windowed);
        }
    }
    if let Some(c) = &q.condition {
        let t = ty(c, q)?;
        if matches!(t, Ty::Num | Ty::Str) {
            return err(
                expr_pos(c).unwrap_or_default(),
                format!("WHERE needs a condition, not {}", t.name()),
            );
        }
    }
    if let Some(h) = &q.having {
        let t = ty(h, q)?;
        if matches!(t, Ty::Num | Ty::Str) {
            return err(
                expr_pos(h).unwrap_or_default(),
                format!("HAVING needs a condition, not {}", t.name()),
            );
        }
    }
    for k in &q.group_keys {
        ty(k, q)?;
    }
    for (kind, arg) in &q.aggregates {
        if let Some(a) = arg {
            let t = ty(a, q)?;
            if matches!(kind, AggKind::Sum | AggKind::Avg | AggKind::Stddev)
                && matches!(t, Ty::Str | Ty::Bool)
            {
                return err(
                    expr_pos(a).unwrap_or_default(),
                    format!("{kind:?}() takes a number, not {}", t.name()).to_lowercase(),
                );
            }
        }
    }
    Ok(())
}

fn expr_pos(e: &Expr) -> Option<Pos> {
    match e {
        Expr::Path(_, p) | Expr::Call(_, _, p) | Expr::Bin(_, _, _, p) | Expr::Neg(_, p) => {
            Some(*p)
        }
        Expr::Not(e) | Expr::IsNull(e, _) | Expr::In(e, _, _) | Expr::Like(e, _, _) => expr_pos(e),
        _ => None,
    }
}

fn ty(e: &Expr, q: &Query) -> Result<Ty, SqlError> {
    Ok(match e {
        Expr::Lit(v) => match v {
            serde_json::Value::Null => Ty::Null,
            serde_json::Value::Bool(_) => Ty::Bool,
            serde_json::Value::Number(_) => Ty::Num,
            serde_json::Value::String(_) => Ty::Str,
            _ => Ty::Any,
        },
        Expr::Path(..) => Ty::Any,
        Expr::Agg(i) => match q.aggregates.get(*i).map(|a| a.0) {
            Some(AggKind::Count | AggKind::Sum | AggKind::Avg | AggKind::Stddev) => Ty::Num,
            _ => Ty::Any,
        },
        Expr::Call(name, args, pos) => {
            let Some(sig) = FUNCTIONS.iter().find(|s| s.name == name) else {
                return err(*pos, format!("unknown function `{name}()`"));
            };
            if args.len() < sig.min || args.len() > sig.max {
                let want = if sig.min == sig.max {
                    format!("{}", sig.min)
                } else {
                    format!("{} to {}", sig.min, sig.max)
                };
                return err(
                    *pos,
                    format!("{name}() takes {want} argument(s), {} given", args.len()),
                );
            }
            for (i, a) in args.iter().enumerate() {
                let t = ty(a, q)?;
                if let Some(Some(want)) = sig.args.get(i) {
                    if t != *want && t != Ty::Any && t != Ty::Null {
                        return err(
                            expr_pos(a).unwrap_or(*pos),
                            format!(
                                "argument {} of {name}() must be {}, not {}",
                                i + 1,
                                want.name(),
                                t.name()
                            ),
                        );
                    }
                }
            }
            if name == "crypto" {
                if let Some(Expr::Lit(serde_json::Value::String(alg))) = args.get(1) {
                    if !super::eval::CRYPTO_ALGORITHMS.contains(&alg.to_ascii_uppercase().as_str())
                    {
                        return err(
                            *pos,
                            format!(
                                "crypto() does not know `{alg}`: use {}",
                                super::eval::CRYPTO_ALGORITHMS.join(", ")
                            ),
                        );
                    }
                }
            }
            sig.ret
        }
        Expr::Bin(op, l, r, pos) => {
            let (lt, rt) = (ty(l, q)?, ty(r, q)?);
            match op {
                BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Mod => {
                    for t in [lt, rt] {
                        if matches!(t, Ty::Str | Ty::Bool) {
                            return err(*pos, format!("arithmetic needs numbers, not {} (use || or concat() to join strings)", t.name()));
                        }
                    }
                    Ty::Num
                }
                BinOp::Concat => Ty::Str,
                BinOp::And | BinOp::Or => {
                    for t in [lt, rt] {
                        if matches!(t, Ty::Num | Ty::Str) {
                            return err(*pos, format!("AND/OR need conditions, not {}", t.name()));
                        }
                    }
                    Ty::Bool
                }
                _ => {
                    if matches!(
                        (lt, rt),
                        (Ty::Num, Ty::Str)
                            | (Ty::Str, Ty::Num)
                            | (Ty::Bool, Ty::Num)
                            | (Ty::Num, Ty::Bool)
                            | (Ty::Bool, Ty::Str)
                            | (Ty::Str, Ty::Bool)
                    ) {
                        return err(
                            *pos,
                            format!("cannot compare {} with {}", lt.name(), rt.name()),
                        );
                    }
                    Ty::Bool
                }
            }
        }
        Expr::Not(e) => {
            let t = ty(e, q)?;
            if matches!(t, Ty::Num | Ty::Str) {
                return err(
                    expr_pos(e).unwrap_or_default(),
                    format!("NOT needs a condition, not {}", t.name()),
                );
            }
            Ty::Bool
        }
        Expr::Neg(e, pos) => {
            let t = ty(e, q)?;
            if matches!(t, Ty::Str | Ty::Bool) {
                return err(*pos, format!("cannot negate {}", t.name()));
            }
            Ty::Num
        }
        Expr::IsNull(e, _) => {
            ty(e, q)?;
            Ty::Bool
        }
        Expr::In(e, list, _) => {
            ty(e, q)?;
            for x in list {
                ty(x, q)?;
            }
            Ty::Bool
        }
        Expr::Like(e, _, _) => {
            let t = ty(e, q)?;
            if matches!(t, Ty::Num | Ty::Bool) {
                return err(
                    expr_pos(e).unwrap_or_default(),
                    format!("LIKE needs a string, not {}", t.name()),
                );
            }
            Ty::Bool
        }
        Expr::Case {
            operand,
            arms,
            otherwise,
        } => {
            if let Some(o) = operand {
                ty(o, q)?;
            }
            let mut out = None;
            for (w, t) in arms {
                ty(w, q)?;
                let tt = ty(t, q)?;
                out = match out {
                    None => Some(tt),
                    Some(prev) if prev == tt => Some(prev),
                    Some(_) => Some(Ty::Any),
                };
            }
            if let Some(o) = otherwise {
                ty(o, q)?;
            }
            out.unwrap_or(Ty::Any)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(src: &str) -> SqlError {
        match parse(src) {
            Err(e) => e,
            Ok(q) => panic!("{src} parsed: {q:?}"),
        }
    }

    #[test]
    fn parses_alibaba_examples() {
        let q = parse(
            "SELECT temperature as t, deviceName() as deviceName, location FROM \"/a1hRrzD/+/user/update\" WHERE temperature > 38",
        )
        .unwrap();
        assert_eq!(q.topic, "/a1hRrzD/+/user/update");
        assert_eq!(q.items.len(), 3);
        assert!(matches!(&q.items[2], Item::Expr(_, n) if n == "location"));
        let q = parse("SELECT items.temp.value AS temp, * FROM \"/pk/+/thing/event/property/post\" WHERE items.temp.value BETWEEN 1 AND 5 AND deviceName() LIKE 'dev%'").unwrap();
        assert_eq!(q.items[1], Item::All);
        let q = parse("select items.temp.value from '/pk/#'").unwrap();
        assert!(matches!(&q.items[0], Item::Expr(_, n) if n == "temp"));
    }

    #[test]
    fn parses_windows() {
        let q = parse("SELECT deviceName() AS d, avg(items.t.value) AS a, count(*) AS n FROM \"/p/+/thing/event/property/post\" GROUP BY TUMBLINGWINDOW(mi, 1), deviceName() HAVING count(*) > 2").unwrap();
        assert_eq!(
            q.window,
            Some(Window {
                kind: WindowKind::Tumbling,
                size_ms: 60_000,
                hop_ms: 60_000
            })
        );
        assert_eq!(q.aggregates.len(), 3);
        assert_eq!(q.group_keys.len(), 1);
        let q = parse("SELECT max(x) FROM \"t\" GROUP BY HOPPINGWINDOW(ss, 60, 10)").unwrap();
        assert_eq!(q.window.unwrap().hop_ms, 10_000);
        let q = parse("SELECT stddev(x) FROM \"t\" GROUP BY SLIDINGWINDOW(ss, 30)").unwrap();
        assert_eq!(q.window.unwrap().kind, WindowKind::Sliding);
    }

    #[test]
    fn errors_point_at_line_and_column() {
        let x = e("SELECT a\nFROM \"t\"\nWHERE 1 > 'x'");
        assert_eq!((x.pos.line, x.pos.col), (3, 9), "{x}");
        assert!(x.message.contains("cannot compare"), "{x}");
        let x = e("SELECT nosuch(a) FROM \"t\"");
        assert_eq!((x.pos.line, x.pos.col), (1, 8));
        assert!(x.message.contains("unknown function `nosuch()`"));
        let x = e("SELECT abs(a, b) FROM \"t\"");
        assert!(
            x.message.contains("abs() takes 1 argument(s), 2 given"),
            "{x}"
        );
        let x = e("SELECT a FROM \"t\" WHERE avg(a) > 1");
        assert!(x.message.contains("not allowed in WHERE"), "{x}");
        let x = e("SELECT avg(a) FROM \"t\"");
        assert!(x.message.contains("needs GROUP BY"), "{x}");
        let x = e("SELECT a FROM \"t/#/x\"");
        assert!(x.message.contains('#'), "{x}");
        let x = e("SELECT a FROM \"t\" GROUP BY a");
        assert!(x.message.contains("needs a window"), "{x}");
        let x = e("SELECT a FROM \"t\" WHERE a +");
        assert_eq!((x.pos.line, x.pos.col), (1, 28), "{x}");
        let x = e("SELECT 'a' + 1 FROM \"t\"");
        assert!(x.message.contains("arithmetic needs numbers"), "{x}");
        let x = e("SELECT upper(1) FROM \"t\"");
        assert!(
            x.message.contains("argument 1 of upper() must be a string"),
            "{x}"
        );
        let x = e("SELECT a FROM \"t\" GROUP BY HOPPINGWINDOW(ss, 10, 3)");
        assert!(x.message.contains("whole number of hops"), "{x}");
        let x = e("SELECT crypto(a, 'MD4') FROM \"t\"");
        assert!(x.message.contains("MD4"), "{x}");
        let x = e("SELECT a FROM \"t\" WHERE 'x");
        assert!(x.message.contains("not closed"), "{x}");
        let x = e("SELECT a FROM \"t\" extra");
        assert!(x.message.contains("after the statement"), "{x}");
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        for deep in [
            format!(
                "SELECT {}1{} FROM \"t\"",
                "(".repeat(50_000),
                ")".repeat(50_000)
            ),
            format!("SELECT {}1 FROM \"t\"", "- ".repeat(50_000)),
            format!("SELECT 1 FROM \"t\" WHERE {}a", "NOT ".repeat(50_000)),
            format!(
                "SELECT {}1{} FROM \"t\"",
                "abs(".repeat(50_000),
                ")".repeat(50_000)
            ),
        ] {
            let e = parse(&deep).unwrap_err();
            assert!(e.message.contains("nested deeper than 64"), "{e}");
        }
        parse(&format!(
            "SELECT {}1{} FROM \"t\"",
            "(".repeat(20),
            ")".repeat(20)
        ))
        .unwrap();
    }

    #[test]
    fn mutated_statements_never_panic() {
        let seeds = [
            "SELECT items.temp.value AS t, deviceName() FROM \"/p/+/thing/event/property/post\" WHERE items.temp.value > 30 AND x IN (1, 'a') OR NOT y LIKE 'a%'",
            "SELECT avg(a.b[0]) AS x, CASE WHEN a THEN 1 ELSE 2 END FROM \"t/#\" GROUP BY HOPPINGWINDOW(ss, 60, 10), deviceName() HAVING count(*) > 1",
            "SELECT -1.5e3 + `odd name` * (2 - 3) / 4 % 5 || 'x' FROM 't' WHERE a BETWEEN 1 AND 2 AND b IS NOT NULL",
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet: Vec<char> =
            "SELECTFROMWHEREGROUPBY()[]'\",.*+-/%<>=!`#_ 0123456789abcAND OR NOT"
                .chars()
                .collect();
        for _ in 0..20_000 {
            let seed = seeds[(next() % 3) as usize];
            let mut chars: Vec<char> = seed.chars().collect();
            for _ in 0..=(next() % 4) {
                let at = (next() as usize) % (chars.len() + 1);
                match next() % 3 {
                    0 if at < chars.len() => {
                        chars.remove(at);
                    }
                    1 => chars.insert(at, alphabet[(next() as usize) % alphabet.len()]),
                    _ => chars.truncate(at),
                }
            }
            let text: String = chars.into_iter().collect();
            let _ = parse(&text);
        }
    }

    #[test]
    fn topic_filters() {
        assert!(topic_matches(
            "/p/+/thing/event/+/post",
            "/p/d/thing/event/alarm/post"
        ));
        assert!(topic_matches("/p/#", "/p/d/user/x"));
        assert!(!topic_matches("/p/+", "/p/d/x"));
        assert!(filters_overlap("/+/+/thing/event/property/post", "/p/#"));
        assert!(!filters_overlap(
            "/p/+/user/#",
            "/p/d/thing/event/property/post"
        ));
    }
}
