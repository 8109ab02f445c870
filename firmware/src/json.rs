//! JSON read in place, without allocation: a document is checked once ([`Json::parse`],
//! nesting at most [`MAX_DEPTH`]), then walked by borrowing slices of it. Strings keep their
//! escapes until the caller unescapes them into a buffer of its own.

/// Deepest nesting of objects and arrays accepted (Alink requests need 4).
pub const MAX_DEPTH: usize = 8;

/// Why a document was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonError {
    /// Not JSON; the byte offset where reading stopped.
    Syntax(usize),
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
}

/// The kind of a JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `{...}`
    Object,
    /// `[...]`
    Array,
    /// `"..."`
    String,
    /// A number.
    Number,
    /// `true` or `false`.
    Bool,
    /// `null`.
    Null,
}

/// One checked JSON value: a slice of the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Json<'a> {
    text: &'a str,
}

/// A JSON string's content with its escapes, between the quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonStr<'a> {
    raw: &'a str,
}

impl<'a> Json<'a> {
    /// `{}`.
    pub const EMPTY_OBJECT: Json<'static> = Json { text: "{}" };

    /// Checks `text` as one JSON value (whitespace around it allowed).
    pub fn parse(text: &'a str) -> Result<Self, JsonError> {
        let b = text.as_bytes();
        let start = ws(b, 0);
        let end = check_value(b, start, 0)?;
        if ws(b, end) != b.len() {
            return Err(JsonError::Syntax(ws(b, end)));
        }
        Ok(Json {
            text: &text[start..end],
        })
    }

    /// Checks UTF-8 bytes as one JSON value.
    pub fn parse_bytes(bytes: &'a [u8]) -> Result<Self, JsonError> {
        let text = core::str::from_utf8(bytes).map_err(|e| JsonError::Syntax(e.valid_up_to()))?;
        Self::parse(text)
    }

    /// The value's text as in the document.
    pub fn raw(&self) -> &'a str {
        self.text
    }

    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self.text.as_bytes().first() {
            Some(b'{') => Kind::Object,
            Some(b'[') => Kind::Array,
            Some(b'"') => Kind::String,
            Some(b't' | b'f') => Kind::Bool,
            Some(b'n') => Kind::Null,
            _ => Kind::Number,
        }
    }

    /// An integer written without fraction or exponent that fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        if self.kind() != Kind::Number || self.text.bytes().any(|c| matches!(c, b'.' | b'e' | b'E'))
        {
            return None;
        }
        self.text.parse().ok()
    }

    /// Any number, as the nearest `f64` (finite).
    pub fn as_f64(&self) -> Option<f64> {
        if self.kind() != Kind::Number {
            return None;
        }
        self.text.parse::<f64>().ok().filter(|x| x.is_finite())
    }

    /// `true` or `false`.
    pub fn as_bool(&self) -> Option<bool> {
        match self.text {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }

    /// A string's content (escapes kept).
    pub fn as_str(&self) -> Option<JsonStr<'a>> {
        (self.kind() == Kind::String).then(|| JsonStr {
            raw: &self.text[1..self.text.len() - 1],
        })
    }

    /// The member `key` of an object (the first, if the document repeats it).
    pub fn get(&self, key: &str) -> Option<Json<'a>> {
        self.members().find(|(k, _)| k.eq_str(key)).map(|(_, v)| v)
    }

    /// An object's members in order; nothing for other kinds.
    pub fn members(&self) -> Members<'a> {
        Members {
            text: self.text,
            at: if self.kind() == Kind::Object {
                1
            } else {
                self.text.len()
            },
        }
    }

    /// An array's items in order; nothing for other kinds.
    pub fn items(&self) -> Items<'a> {
        Items {
            text: self.text,
            at: if self.kind() == Kind::Array {
                1
            } else {
                self.text.len()
            },
        }
    }
}

impl<'a> JsonStr<'a> {
    /// The content with its escapes, as in the document.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// The content when it has no escapes (then it is the string itself).
    pub fn plain(&self) -> Option<&'a str> {
        (!self.raw.contains('\\')).then_some(self.raw)
    }

    /// The content's length in bytes once unescaped; `None` for an escape that is not a
    /// character (a lone surrogate).
    pub fn unescaped_len(&self) -> Option<usize> {
        let mut n = 0;
        for c in Chars::new(self.raw) {
            n += c?.len_utf8();
        }
        Some(n)
    }

    /// Whether the unescaped content is `s`.
    pub fn eq_str(&self, s: &str) -> bool {
        if let Some(p) = self.plain() {
            return p == s;
        }
        let mut want = s.chars();
        for c in Chars::new(self.raw) {
            if c != want.next() {
                return false;
            }
        }
        want.next().is_none()
    }

    /// Unescapes into `buf`; `None` when it does not fit or holds a lone surrogate.
    pub fn unescape<'b>(&self, buf: &'b mut [u8]) -> Option<&'b str> {
        let mut at = 0;
        for c in Chars::new(self.raw) {
            let c = c?;
            let dst = buf.get_mut(at..at + c.len_utf8())?;
            c.encode_utf8(dst);
            at += c.len_utf8();
        }
        core::str::from_utf8(&buf[..at]).ok()
    }
}

/// Characters of a checked string's content, escapes decoded.
struct Chars<'a> {
    rest: core::str::Chars<'a>,
}

impl<'a> Chars<'a> {
    fn new(raw: &'a str) -> Self {
        Chars { rest: raw.chars() }
    }

    fn hex4(&mut self) -> Option<u32> {
        let mut v = 0;
        for _ in 0..4 {
            v = v * 16 + self.rest.next()?.to_digit(16)?;
        }
        Some(v)
    }
}

impl Iterator for Chars<'_> {
    type Item = Option<char>;

    fn next(&mut self) -> Option<Option<char>> {
        let c = self.rest.next()?;
        if c != '\\' {
            return Some(Some(c));
        }
        Some(match self.rest.next() {
            Some('n') => Some('\n'),
            Some('t') => Some('\t'),
            Some('r') => Some('\r'),
            Some('b') => Some('\u{8}'),
            Some('f') => Some('\u{c}'),
            Some('u') => self.hex4().and_then(|hi| {
                if (0xd800..0xdc00).contains(&hi) {
                    let mut probe = self.rest.clone();
                    if probe.next() != Some('\\') || probe.next() != Some('u') {
                        return None;
                    }
                    self.rest = probe;
                    let lo = self.hex4()?;
                    if !(0xdc00..0xe000).contains(&lo) {
                        return None;
                    }
                    char::from_u32(0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00))
                } else {
                    char::from_u32(hi)
                }
            }),
            other => other, // `"`, `\`, `/`
        })
    }
}

/// Members of an object: keys and values.
#[derive(Debug, Clone)]
pub struct Members<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Iterator for Members<'a> {
    type Item = (JsonStr<'a>, Json<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.text.as_bytes();
        let mut i = ws(b, self.at);
        if b.get(i) == Some(&b',') {
            i = ws(b, i + 1);
        }
        if b.get(i) != Some(&b'"') {
            self.at = b.len();
            return None;
        }
        let key_end = skip(b, i);
        let key = JsonStr {
            raw: &self.text[i + 1..key_end - 1],
        };
        let v = ws(b, ws(b, key_end) + 1); // past `:`
        let end = skip(b, v);
        self.at = end;
        Some((
            key,
            Json {
                text: &self.text[v..end],
            },
        ))
    }
}

/// Items of an array.
#[derive(Debug, Clone)]
pub struct Items<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Iterator for Items<'a> {
    type Item = Json<'a>;

    fn next(&mut self) -> Option<Json<'a>> {
        let b = self.text.as_bytes();
        let mut i = ws(b, self.at);
        if b.get(i) == Some(&b',') {
            i = ws(b, i + 1);
        }
        if i >= b.len() || b[i] == b']' {
            self.at = b.len();
            return None;
        }
        let end = skip(b, i);
        self.at = end;
        Some(Json {
            text: &self.text[i..end],
        })
    }
}

fn ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\r' | b'\n') {
        i += 1;
    }
    i
}

/// End of the (checked) value starting at `i`.
fn skip(b: &[u8], i: usize) -> usize {
    match b.get(i) {
        Some(b'"') => {
            let mut j = i + 1;
            while j < b.len() {
                match b[j] {
                    b'\\' => j += 2,
                    b'"' => return j + 1,
                    _ => j += 1,
                }
            }
            b.len()
        }
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip(b, j);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return j + 1;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            b.len()
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n')
            {
                j += 1;
            }
            j
        }
    }
}

fn check_value(b: &[u8], i: usize, depth: usize) -> Result<usize, JsonError> {
    let syntax = |at| Err(JsonError::Syntax(at));
    match b.get(i) {
        Some(b'{') | Some(b'[') if depth >= MAX_DEPTH => Err(JsonError::TooDeep),
        Some(b'{') => {
            let mut j = ws(b, i + 1);
            if b.get(j) == Some(&b'}') {
                return Ok(j + 1);
            }
            loop {
                if b.get(j) != Some(&b'"') {
                    return syntax(j);
                }
                j = ws(b, check_string(b, j)?);
                if b.get(j) != Some(&b':') {
                    return syntax(j);
                }
                j = ws(b, check_value(b, ws(b, j + 1), depth + 1)?);
                match b.get(j) {
                    Some(b',') => j = ws(b, j + 1),
                    Some(b'}') => return Ok(j + 1),
                    _ => return syntax(j),
                }
            }
        }
        Some(b'[') => {
            let mut j = ws(b, i + 1);
            if b.get(j) == Some(&b']') {
                return Ok(j + 1);
            }
            loop {
                j = ws(b, check_value(b, j, depth + 1)?);
                match b.get(j) {
                    Some(b',') => j = ws(b, j + 1),
                    Some(b']') => return Ok(j + 1),
                    _ => return syntax(j),
                }
            }
        }
        Some(b'"') => check_string(b, i),
        Some(b't') => literal(b, i, b"true"),
        Some(b'f') => literal(b, i, b"false"),
        Some(b'n') => literal(b, i, b"null"),
        Some(b'-' | b'0'..=b'9') => check_number(b, i),
        _ => syntax(i),
    }
}

fn literal(b: &[u8], i: usize, word: &[u8]) -> Result<usize, JsonError> {
    if b[i..].starts_with(word) {
        Ok(i + word.len())
    } else {
        Err(JsonError::Syntax(i))
    }
}

fn check_string(b: &[u8], i: usize) -> Result<usize, JsonError> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'"' => return Ok(j + 1),
            b'\\' => match b.get(j + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => j += 2,
                Some(b'u')
                    if b.len() >= j + 6 && b[j + 2..j + 6].iter().all(u8::is_ascii_hexdigit) =>
                {
                    j += 6
                }
                _ => return Err(JsonError::Syntax(j)),
            },
            c if c < 0x20 => return Err(JsonError::Syntax(j)),
            _ => j += 1,
        }
    }
    Err(JsonError::Syntax(j))
}

fn check_number(b: &[u8], i: usize) -> Result<usize, JsonError> {
    let digits = |mut j: usize| {
        let s = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        (j, j > s)
    };
    let mut j = i;
    if b[j] == b'-' {
        j += 1;
    }
    match b.get(j) {
        Some(b'0') => j += 1,
        Some(b'1'..=b'9') => j = digits(j).0,
        _ => return Err(JsonError::Syntax(j)),
    }
    if b.get(j) == Some(&b'.') {
        let (k, any) = digits(j + 1);
        if !any {
            return Err(JsonError::Syntax(k));
        }
        j = k;
    }
    if matches!(b.get(j), Some(b'e' | b'E')) {
        j += 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let (k, any) = digits(j);
        if !any {
            return Err(JsonError::Syntax(k));
        }
        j = k;
    }
    Ok(j)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_walked_in_place() {
        let doc = r#" {"id":"12","params":{"T":21.5,"On":1,"Name":"a\"b\u00e9\ud83d\ude00","L":[1,2,{"x":null}]},"n":-0.5e3} "#;
        let j = Json::parse(doc).unwrap();
        assert_eq!(j.kind(), Kind::Object);
        assert_eq!(j.get("id").unwrap().as_str().unwrap().plain(), Some("12"));
        let p = j.get("params").unwrap();
        assert_eq!(p.members().count(), 4);
        assert_eq!(p.get("T").unwrap().as_f64(), Some(21.5));
        assert_eq!(p.get("T").unwrap().as_i64(), None);
        assert_eq!(p.get("On").unwrap().as_i64(), Some(1));
        let name = p.get("Name").unwrap().as_str().unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(name.unescape(&mut buf), Some("a\"bé😀"));
        assert_eq!(name.unescaped_len(), Some(9));
        assert!(name.eq_str("a\"bé😀"));
        assert!(!name.eq_str("a\"bé"));
        assert_eq!(name.unescape(&mut buf[..4]), None);
        let l: heapless::Vec<Json<'_>, 4> = p.get("L").unwrap().items().collect();
        assert_eq!(l.len(), 3);
        assert_eq!(l[2].get("x").unwrap().kind(), Kind::Null);
        assert_eq!(j.get("n").unwrap().as_f64(), Some(-500.0));
        assert_eq!(j.get("missing"), None);
        assert_eq!(Json::parse("[]").unwrap().items().count(), 0);
        assert_eq!(Json::parse("{}").unwrap().members().count(), 0);
    }

    #[test]
    fn what_is_not_json_is_refused() {
        for bad in [
            "",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "[1,]",
            "01",
            "1.",
            "-",
            "\"\\x\"",
            "\"a\nb\"",
            "tru",
            "{} x",
            "\"\\u12\"",
            "[1 2]",
            "{\"a\":1,}",
            "1e",
            "{'a':1}",
        ] {
            assert!(Json::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Json::parse("[[[[[[[[[1]]]]]]]]]"), Err(JsonError::TooDeep));
        assert!(Json::parse("[[[[[[[[1]]]]]]]]").is_ok());
        let lone = Json::parse(r#""\ud800x""#).unwrap().as_str().unwrap();
        assert_eq!(lone.unescaped_len(), None);
    }

    /// Agrees with serde_json on what is JSON, over seeded mutations of a request.
    #[test]
    fn mutated_documents_agree_with_serde_json_and_never_panic() {
        let base = br#"{"id":"123","version":"1.0","params":{"a":[1,{"b":"c\"d"}],"t":-2.5e1,"u":"\u0041"},"method":"thing.service.property.set"}"#;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut f = base.to_vec();
            for _ in 0..2 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % f.len();
                f[i] = b"{}[]\":,\\0-.eu a1"[(seed >> 40) as usize % 16];
            }
            let ours = Json::parse_bytes(&f);
            let theirs = serde_json::from_slice::<serde_json::Value>(&f);
            assert_eq!(
                ours.is_ok(),
                theirs.is_ok(),
                "{}",
                String::from_utf8_lossy(&f)
            );
            if let (Ok(j), Ok(v)) = (ours, theirs) {
                // Walking a checked document reaches every member.
                // (serde_json keeps one of a repeated key; this reader keeps every member.)
                if let Some(o) = v.as_object() {
                    assert!(j.members().count() >= o.len());
                    for k in o.keys() {
                        assert!(j.get(k).is_some(), "{k}");
                    }
                }
                if let Some(a) = v.as_array() {
                    assert_eq!(j.items().count(), a.len());
                }
            }
        }
    }
}
