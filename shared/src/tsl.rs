//! Thing model (Alibaba's TSL JSON): parsing with path-precise errors, and validation of
//! reported values against a data type.
//!
//! Data types: int (32-bit), float, double, text, enum, bool, date, struct and array, with
//! their specs (min, max, step, unit, length, enum items, struct fields, array size and item
//! type). Nesting is at most two levels: an array may hold structs, a struct holds only
//! scalars.

use crate::spec::{self, Misfit};
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde_json::{Map, Value};

/// A TSL document or value was refused; `path` points at the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TslError {
    /// JSON path of the offending field, e.g. `properties[2].dataType.specs.max`.
    pub path: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl core::fmt::Display for TslError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn err<T>(path: &str, message: impl Into<String>) -> Result<T, TslError> {
    Err(TslError {
        path: path.into(),
        message: message.into(),
    })
}

/// Read-only, write-only or read-write property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    /// `r`: reported by the device, never set by the cloud.
    Read,
    /// `w`: set by the cloud; Alibaba's export writes it for command-like properties.
    Write,
    /// `rw`
    ReadWrite,
}

/// A typed field: a property, an event output or a service parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// Identifier, unique in its list.
    pub identifier: String,
    /// Display name.
    pub name: String,
    /// Type and specs.
    pub data_type: DataType,
}

/// A property of the thing model.
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    /// Identifier, name and type.
    pub param: Param,
    /// `r` or `rw`.
    pub access_mode: AccessMode,
    /// Part of the standard function set.
    pub required: bool,
}

/// An event of the thing model.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Identifier.
    pub identifier: String,
    /// `info`, `alert` or `error`.
    pub kind: String,
    /// Output parameters.
    pub output: Vec<Param>,
}

/// A service of the thing model.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// Identifier.
    pub identifier: String,
    /// `sync` or `async`.
    pub call_type: String,
    /// Input parameters.
    pub input: Vec<Param>,
    /// Output parameters.
    pub output: Vec<Param>,
}

/// A whole thing model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ThingModel {
    /// Properties.
    pub properties: Vec<Property>,
    /// Events (the implicit `post` event is not listed here).
    pub events: Vec<Event>,
    /// Services (the implicit `set`/`get` are not listed here).
    pub services: Vec<Service>,
}

/// A data type with its specs.
#[derive(Debug, Clone, PartialEq)]
pub enum DataType {
    /// 32-bit integer.
    Int {
        /// Inclusive bounds.
        min: i64,
        /// Inclusive bounds.
        max: i64,
        /// Values are `min + k * step`.
        step: Option<i64>,
        /// Unit symbol.
        unit: Option<String>,
    },
    /// Single precision.
    Float(Real),
    /// Double precision.
    Double(Real),
    /// UTF-8 text.
    Text {
        /// Longest accepted value, in bytes.
        length: usize,
    },
    /// Integer codes with names.
    Enum {
        /// Code to name.
        items: BTreeMap<i64, String>,
    },
    /// 0 or 1, with names.
    Bool {
        /// Names of 0 and 1.
        names: [String; 2],
    },
    /// UTC timestamp in milliseconds (a string of digits on the wire).
    Date,
    /// Named fields of scalar types.
    Struct {
        /// The fields.
        fields: Vec<Param>,
    },
    /// Up to `size` items of one type.
    Array {
        /// Most items.
        size: usize,
        /// Item type: int, float, double, text or struct.
        item: Box<DataType>,
    },
}

/// Specs of float and double.
#[derive(Debug, Clone, PartialEq)]
pub struct Real {
    /// Inclusive bounds.
    pub min: f64,
    /// Inclusive bounds.
    pub max: f64,
    /// Values are `min + k * step` (within 1e-6 of a step).
    pub step: Option<f64>,
    /// Unit symbol.
    pub unit: Option<String>,
}

/// Longest text Alibaba's thing model allows.
pub const MAX_TEXT_LENGTH: usize = 10_240;
/// Most array items Alibaba's thing model allows.
pub const MAX_ARRAY_SIZE: usize = 512;

fn obj<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, TslError> {
    v.as_object()
        .map_or_else(|| err(path, "must be a JSON object"), Ok)
}

fn text_field<'a>(o: &'a Map<String, Value>, key: &str, path: &str) -> Result<&'a str, TslError> {
    match o.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => err(&format!("{path}.{key}"), "must be a string"),
        None => err(&format!("{path}.{key}"), "is required"),
    }
}

fn identifier(o: &Map<String, Value>, path: &str) -> Result<String, TslError> {
    let id = text_field(o, "identifier", path)?;
    let ok = !id.is_empty()
        && id.len() <= 50
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return err(
            &format!("{path}.identifier"),
            format!("`{id}` must be 1 to 50 letters, digits or underscores"),
        );
    }
    Ok(id.to_string())
}

/// A number given as a JSON number or a numeric string (Alibaba writes specs as strings).
fn number(v: Option<&Value>, path: &str) -> Result<Option<f64>, TslError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map_or_else(
                || err(path, format!("`{s}` is not a number")),
                |f| Ok(Some(f)),
            ),
        Some(_) => err(path, "must be a number or a numeric string"),
    }
}

fn required_number(o: &Map<String, Value>, key: &str, path: &str) -> Result<f64, TslError> {
    let p = format!("{path}.{key}");
    number(o.get(key), &p)?.map_or_else(|| err(&p, "is required"), Ok)
}

/// A bound that Alibaba's export may leave out (array items carry no specs): absent means
/// the type's own limit, so no range check.
fn optional_number(
    o: &Map<String, Value>,
    key: &str,
    path: &str,
    absent: f64,
) -> Result<f64, TslError> {
    Ok(number(o.get(key), &format!("{path}.{key}"))?.unwrap_or(absent))
}

/// True for a whole number (`f64::fract` is not in `core`).
fn whole(f: f64) -> bool {
    f.is_finite() && f == (f as i64) as f64
}

fn int_bound(f: f64, path: &str) -> Result<i64, TslError> {
    if !whole(f) || f < f64::from(i32::MIN) || f > f64::from(i32::MAX) {
        return err(path, "must be a 32-bit integer");
    }
    Ok(f as i64)
}

fn unit(specs: &Map<String, Value>) -> Option<String> {
    specs.get("unit").and_then(Value::as_str).map(String::from)
}

fn code_names(specs: &Map<String, Value>, path: &str) -> Result<BTreeMap<i64, String>, TslError> {
    let mut items = BTreeMap::new();
    for (k, v) in specs {
        let p = format!("{path}.{k}");
        let code: i64 = k
            .parse()
            .map_or_else(|_| err(&p, "keys must be integer codes"), Ok)?;
        let name = v
            .as_str()
            .map_or_else(|| err(&p, "must be a name string"), Ok)?;
        items.insert(code, name.to_string());
    }
    Ok(items)
}

fn params(v: Option<&Value>, path: &str, allow_nested: bool) -> Result<Vec<Param>, TslError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return err(path, "must be an array"),
    };
    let mut out: Vec<Param> = Vec::with_capacity(list.len());
    for (i, p) in list.iter().enumerate() {
        let path = format!("{path}[{i}]");
        let param = param(p, &path, allow_nested)?;
        if out.iter().any(|q| q.identifier == param.identifier) {
            return err(
                &format!("{path}.identifier"),
                format!("`{}` appears twice", param.identifier),
            );
        }
        out.push(param);
    }
    Ok(out)
}

fn param(v: &Value, path: &str, allow_nested: bool) -> Result<Param, TslError> {
    let o = obj(v, path)?;
    let identifier = identifier(o, path)?;
    let name = o
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or(&identifier)
        .to_string();
    let dt_path = format!("{path}.dataType");
    let data_type = data_type(
        o.get("dataType").unwrap_or(&Value::Null),
        &dt_path,
        allow_nested,
    )?;
    Ok(Param {
        identifier,
        name,
        data_type,
    })
}

fn real(specs: &Map<String, Value>, path: &str, limit: f64) -> Result<Real, TslError> {
    let min = optional_number(specs, "min", path, -limit)?;
    let max = optional_number(specs, "max", path, limit)?;
    if min > max {
        return err(&format!("{path}.max"), format!("{max} is below min {min}"));
    }
    let step = number(specs.get("step"), &format!("{path}.step"))?;
    if let Some(s) = step {
        if s <= 0.0 {
            return err(&format!("{path}.step"), "must be above 0");
        }
    }
    Ok(Real {
        min,
        max,
        step,
        unit: unit(specs),
    })
}

fn data_type(v: &Value, path: &str, allow_nested: bool) -> Result<DataType, TslError> {
    let o = obj(v, path)?;
    let kind = text_field(o, "type", path)?;
    let specs_path = format!("{path}.specs");
    let empty = Map::new();
    let specs_obj = || -> Result<&Map<String, Value>, TslError> {
        match o.get("specs") {
            None | Some(Value::Null) => Ok(&empty),
            Some(s) => obj(s, &specs_path),
        }
    };
    Ok(match kind {
        "int" => {
            let specs = specs_obj()?;
            let min = int_bound(optional_number(specs, "min", &specs_path, f64::from(i32::MIN))?, &format!("{specs_path}.min"))?;
            let max = int_bound(optional_number(specs, "max", &specs_path, f64::from(i32::MAX))?, &format!("{specs_path}.max"))?;
            if min > max {
                return err(&format!("{specs_path}.max"), format!("{max} is below min {min}"));
            }
            let step = match number(specs.get("step"), &format!("{specs_path}.step"))? {
                None => None,
                Some(s) => {
                    let s = int_bound(s, &format!("{specs_path}.step"))?;
                    if s <= 0 {
                        return err(&format!("{specs_path}.step"), "must be above 0");
                    }
                    Some(s)
                }
            };
            DataType::Int {
                min,
                max,
                step,
                unit: unit(specs),
            }
        }
        "float" => DataType::Float(real(specs_obj()?, &specs_path, f64::from(f32::MAX))?),
        "double" => DataType::Double(real(specs_obj()?, &specs_path, f64::MAX)?),
        "text" => {
            let p = format!("{specs_path}.length");
            // Alibaba's console defaults a text's length to the most it allows.
            let n = optional_number(specs_obj()?, "length", &specs_path, MAX_TEXT_LENGTH as f64)?;
            if !whole(n) || n < 1.0 || n > MAX_TEXT_LENGTH as f64 {
                return err(&p, format!("must be a whole number from 1 to {MAX_TEXT_LENGTH}"));
            }
            DataType::Text { length: n as usize }
        }
        "enum" => {
            let items = code_names(specs_obj()?, &specs_path)?;
            if items.is_empty() {
                return err(&specs_path, "an enum needs at least one item");
            }
            DataType::Enum { items }
        }
        "bool" => {
            let items = code_names(specs_obj()?, &specs_path)?;
            let name = |c: i64| items.get(&c).cloned().unwrap_or_else(|| c.to_string());
            if items.keys().any(|k| *k != 0 && *k != 1) {
                return err(&specs_path, "bool codes are 0 and 1");
            }
            DataType::Bool {
                names: [name(0), name(1)],
            }
        }
        "date" => DataType::Date,
        "struct" => {
            if !allow_nested {
                return err(path, "a struct cannot hold a struct or an array (two levels of nesting at most)");
            }
            let fields = params(o.get("specs"), &specs_path, false)?;
            if fields.is_empty() {
                return err(&specs_path, "a struct needs at least one field");
            }
            DataType::Struct { fields }
        }
        "array" => {
            if !allow_nested {
                return err(path, "a struct cannot hold a struct or an array (two levels of nesting at most)");
            }
            let specs = specs_obj()?;
            let n = required_number(specs, "size", &specs_path)?;
            if !whole(n) || n < 1.0 || n > MAX_ARRAY_SIZE as f64 {
                return err(&format!("{specs_path}.size"), format!("must be a whole number from 1 to {MAX_ARRAY_SIZE}"));
            }
            let item_path = format!("{specs_path}.item");
            let item_value = specs.get("item").unwrap_or(&Value::Null);
            let item_kind = obj(item_value, &item_path)
                .and_then(|i| text_field(i, "type", &item_path))?;
            if !matches!(item_kind, "int" | "float" | "double" | "text" | "struct") {
                return err(&format!("{item_path}.type"), format!("`{item_kind}` cannot be an array item: use int, float, double, text or struct"));
            }
            DataType::Array {
                size: n as usize,
                item: Box::new(data_type(item_value, &item_path, true)?),
            }
        }
        other => {
            return err(
                &format!("{path}.type"),
                format!("`{other}` is not a TSL type: use int, float, double, text, enum, bool, date, struct or array"),
            )
        }
    })
}

/// Parses a TSL JSON document.
pub fn parse(json: &str) -> Result<ThingModel, TslError> {
    let v: Value = serde_json::from_str(json).map_err(|e| TslError {
        path: "$".into(),
        message: format!("not JSON: {e}"),
    })?;
    let root = obj(&v, "$")?;
    // A misspelt list (`propertys`) would otherwise leave an empty model that refuses every
    // post: only the keys of Alibaba's export (default and custom modules) are taken.
    for key in root.keys() {
        if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
            return err(
                key,
                format!(
                    "is not a key of a TSL document: use {}",
                    TOP_LEVEL_KEYS.join(", ")
                ),
            );
        }
    }
    let mut model = ThingModel::default();
    let mut seen: Vec<String> = Vec::new();
    let mut unique = |id: &str, path: &str| -> Result<(), TslError> {
        if seen.iter().any(|s| s == id) {
            return err(
                &format!("{path}.identifier"),
                format!("`{id}` is already used by another property, event or service"),
            );
        }
        seen.push(id.to_string());
        Ok(())
    };
    if let Some(list) = root.get("properties") {
        let list = list
            .as_array()
            .map_or_else(|| err("properties", "must be an array"), Ok)?;
        for (i, p) in list.iter().enumerate() {
            let path = format!("properties[{i}]");
            let param = param(p, &path, true)?;
            unique(&param.identifier, &path)?;
            let o = obj(p, &path)?;
            let access_mode = match o.get("accessMode").and_then(Value::as_str) {
                Some("r") => AccessMode::Read,
                Some("w") => AccessMode::Write,
                Some("rw") | None => AccessMode::ReadWrite,
                Some(other) => {
                    return err(
                        &format!("{path}.accessMode"),
                        format!("`{other}` must be r, w or rw"),
                    )
                }
            };
            model.properties.push(Property {
                param,
                access_mode,
                required: o.get("required").and_then(Value::as_bool).unwrap_or(false),
            });
        }
    }
    if let Some(list) = root.get("events") {
        let list = list
            .as_array()
            .map_or_else(|| err("events", "must be an array"), Ok)?;
        for (i, e) in list.iter().enumerate() {
            let path = format!("events[{i}]");
            let o = obj(e, &path)?;
            let identifier = identifier(o, &path)?;
            // The implicit property post event repeats the properties; it is not stored.
            if identifier == "post" {
                continue;
            }
            unique(&identifier, &path)?;
            let kind = o.get("type").and_then(Value::as_str).unwrap_or("info");
            if !matches!(kind, "info" | "alert" | "error") {
                return err(
                    &format!("{path}.type"),
                    format!("`{kind}` must be info, alert or error"),
                );
            }
            model.events.push(Event {
                identifier,
                kind: kind.to_string(),
                output: params(o.get("outputData"), &format!("{path}.outputData"), true)?,
            });
        }
    }
    if let Some(list) = root.get("services") {
        let list = list
            .as_array()
            .map_or_else(|| err("services", "must be an array"), Ok)?;
        for (i, s) in list.iter().enumerate() {
            let path = format!("services[{i}]");
            let o = obj(s, &path)?;
            let identifier = identifier(o, &path)?;
            // The implicit property set/get services repeat the properties.
            if identifier == "set" || identifier == "get" {
                continue;
            }
            unique(&identifier, &path)?;
            let call_type = o.get("callType").and_then(Value::as_str).unwrap_or("async");
            if !matches!(call_type, "sync" | "async") {
                return err(
                    &format!("{path}.callType"),
                    format!("`{call_type}` must be sync or async"),
                );
            }
            model.services.push(Service {
                identifier,
                call_type: call_type.to_string(),
                input: params(o.get("inputData"), &format!("{path}.inputData"), true)?,
                output: params(o.get("outputData"), &format!("{path}.outputData"), true)?,
            });
        }
    }
    if model.properties.is_empty() && model.events.is_empty() && model.services.is_empty() {
        return err(
            "$",
            "the thing model defines no property, event or service (the implicit post, set and get do not count)",
        );
    }
    Ok(model)
}

/// The top-level keys of Alibaba's TSL export, for the default and custom modules.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "schema",
    "profile",
    "link",
    "properties",
    "events",
    "services",
    "functionBlockId",
    "functionBlockName",
];

impl ThingModel {
    /// The property with this identifier.
    pub fn property(&self, id: &str) -> Option<&Property> {
        self.properties.iter().find(|p| p.param.identifier == id)
    }
}

impl ThingModel {
    /// Rust source of a `static` named `name` holding this thing model as the firmware SDK's
    /// `ironlink_firmware::device::Model` (run from a build script): the device then checks
    /// values with the same rules ([`crate::spec`]) as the cloud that imported this model.
    pub fn firmware_model(&self, name: &str) -> String {
        let mut o = String::new();
        o.push_str(
            "// Generated by ironlink_shared::tsl::ThingModel::firmware_model: do not edit.\n",
        );
        o.push_str(&format!(
            "pub static {name}: ironlink_firmware::device::Model<'static> = ironlink_firmware::device::Model {{\n    properties: &[\n"
        ));
        for p in &self.properties {
            let writable = matches!(p.access_mode, AccessMode::ReadWrite | AccessMode::Write);
            o.push_str(&format!(
                "        ironlink_firmware::device::Property {{ identifier: {:?}, spec: {}, writable: {writable} }},\n",
                p.param.identifier,
                p.param.data_type.spec_source()
            ));
        }
        o.push_str("    ],\n    services: &[\n");
        for s in &self.services {
            o.push_str(&format!(
                "        ironlink_firmware::device::Service {{ identifier: {:?}, inputs: {} }},\n",
                s.identifier,
                fields_source(&s.input)
            ));
        }
        o.push_str("    ],\n};\n");
        o
    }
}

fn fields_source(fields: &[Param]) -> String {
    let items: Vec<String> = fields
        .iter()
        .map(|f| {
            format!(
                "ironlink_shared::spec::Field {{ identifier: {:?}, spec: {} }}",
                f.identifier,
                f.data_type.spec_source()
            )
        })
        .collect();
    format!("&[{}]", items.join(", "))
}

fn real_source(r: &Real) -> String {
    format!(
        "ironlink_shared::spec::Spec::Real {{ min: {:?}, max: {:?}, step: {:?} }}",
        r.min, r.max, r.step
    )
}

impl DataType {
    /// This type as a `ironlink_shared::spec::Spec` constant expression (Rust source).
    pub fn spec_source(&self) -> String {
        match self {
            DataType::Int { min, max, step, .. } => format!(
                "ironlink_shared::spec::Spec::Int {{ min: {min}, max: {max}, step: {step:?} }}"
            ),
            DataType::Float(r) | DataType::Double(r) => real_source(r),
            DataType::Text { length } => {
                format!("ironlink_shared::spec::Spec::Text {{ length: {length} }}")
            }
            DataType::Enum { items } => {
                let codes: Vec<String> = items.keys().map(|k| k.to_string()).collect();
                format!(
                    "ironlink_shared::spec::Spec::Enum {{ codes: &[{}] }}",
                    codes.join(", ")
                )
            }
            DataType::Bool { .. } => "ironlink_shared::spec::Spec::Bool".into(),
            DataType::Date => "ironlink_shared::spec::Spec::Date".into(),
            DataType::Struct { fields } => format!(
                "ironlink_shared::spec::Spec::Struct {{ fields: {} }}",
                fields_source(fields)
            ),
            DataType::Array { size, item } => format!(
                "ironlink_shared::spec::Spec::Array {{ size: {size}, item: &{} }}",
                item.spec_source()
            ),
        }
    }
}

impl DataType {
    /// Checks a reported value. `path` names it in errors (e.g. the property identifier).
    pub fn validate(&self, v: &Value, path: &str) -> Result<(), TslError> {
        match self {
            DataType::Int { min, max, step, .. } => {
                let n = v
                    .as_i64()
                    .map_or_else(|| err(path, format!("{v} is not an integer")), Ok)?;
                match spec::check_int(n, *min, *max, *step) {
                    Ok(()) => {}
                    Err(Misfit::OutOfRange) => {
                        return err(path, format!("{n} is outside [{min}, {max}]"))
                    }
                    Err(_) => {
                        return err(
                            path,
                            format!(
                                "{n} is not min {min} plus a multiple of step {}",
                                step.unwrap_or(1)
                            ),
                        )
                    }
                }
            }
            DataType::Float(r) | DataType::Double(r) => {
                let n = v
                    .as_f64()
                    .map_or_else(|| err(path, format!("{v} is not a number")), Ok)?;
                match spec::check_real(n, r.min, r.max, r.step) {
                    Ok(()) => {}
                    Err(Misfit::OutOfRange) => {
                        return err(path, format!("{n} is outside [{}, {}]", r.min, r.max))
                    }
                    Err(_) => {
                        return err(
                            path,
                            format!(
                                "{n} is not min {} plus a multiple of step {}",
                                r.min,
                                r.step.unwrap_or(0.0)
                            ),
                        )
                    }
                }
            }
            DataType::Text { length } => {
                let s = v
                    .as_str()
                    .map_or_else(|| err(path, format!("{v} is not text")), Ok)?;
                if spec::check_text(s.len(), *length).is_err() {
                    return err(
                        path,
                        format!("text of {} bytes is longer than {length}", s.len()),
                    );
                }
            }
            DataType::Enum { items } => {
                let n = v
                    .as_i64()
                    .map_or_else(|| err(path, format!("{v} is not an enum code")), Ok)?;
                if !items.contains_key(&n) {
                    let codes: Vec<String> = items.keys().map(|k| k.to_string()).collect();
                    return err(
                        path,
                        format!("{n} is not one of the codes {}", codes.join(", ")),
                    );
                }
            }
            DataType::Bool { .. } => {
                let ok =
                    v.as_i64().is_some_and(|n| spec::check_bool_int(n).is_ok()) || v.is_boolean();
                if !ok {
                    return err(path, format!("{v} is not a bool (0 or 1)"));
                }
            }
            DataType::Date => {
                let ok = match v {
                    Value::String(s) => spec::check_date_text(s).is_ok(),
                    Value::Number(n) => n.as_u64().is_some(),
                    _ => false,
                };
                if !ok {
                    return err(path, format!("{v} is not a UTC timestamp in milliseconds"));
                }
            }
            DataType::Struct { fields } => {
                let o = v.as_object().map_or_else(
                    || err(path, format!("{v} is not a struct (JSON object)")),
                    Ok,
                )?;
                for (k, fv) in o {
                    let p = format!("{path}.{k}");
                    match fields.iter().find(|f| &f.identifier == k) {
                        Some(f) => f.data_type.validate(fv, &p)?,
                        None => return err(&p, "is not a field of this struct"),
                    }
                }
            }
            DataType::Array { size, item } => {
                let a = v
                    .as_array()
                    .map_or_else(|| err(path, format!("{v} is not an array")), Ok)?;
                if spec::check_items(a.len(), *size).is_err() {
                    return err(
                        path,
                        format!("{} items, more than the {size} allowed", a.len()),
                    );
                }
                for (i, x) in a.iter().enumerate() {
                    item.validate(x, &format!("{path}[{i}]"))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const METER: &str = r#"{
      "schema": "https://iotx-tsl.oss-ap-southeast-1.aliyuncs.com/schema.json",
      "profile": {"productKey": "a1xxxx"},
      "properties": [
        {"identifier": "temp", "name": "Temperature", "accessMode": "r", "required": false,
         "dataType": {"type": "float", "specs": {"min": "-40", "max": "120", "step": "0.1", "unit": "°C"}}},
        {"identifier": "power", "accessMode": "rw",
         "dataType": {"type": "int", "specs": {"min": "0", "max": "3000", "step": "10"}}},
        {"identifier": "mode", "dataType": {"type": "enum", "specs": {"0": "auto", "1": "manual"}}},
        {"identifier": "on", "dataType": {"type": "bool", "specs": {"0": "off", "1": "on"}}},
        {"identifier": "label", "dataType": {"type": "text", "specs": {"length": "8"}}},
        {"identifier": "since", "dataType": {"type": "date", "specs": {}}},
        {"identifier": "loc", "dataType": {"type": "struct", "specs": [
            {"identifier": "lat", "name": "Latitude", "dataType": {"type": "double", "specs": {"min": "-90", "max": "90"}}},
            {"identifier": "lon", "name": "Longitude", "dataType": {"type": "double", "specs": {"min": "-180", "max": "180"}}}]}},
        {"identifier": "samples", "dataType": {"type": "array", "specs": {"size": "3",
            "item": {"type": "struct", "specs": [{"identifier": "v", "dataType": {"type": "int", "specs": {"min": "0", "max": "9"}}}]}}}}
      ],
      "events": [
        {"identifier": "post", "type": "info", "method": "thing.event.property.post", "outputData": []},
        {"identifier": "overheat", "type": "alert", "method": "thing.event.overheat.post",
         "outputData": [{"identifier": "temp", "name": "t", "dataType": {"type": "float", "specs": {"min": "0", "max": "200"}}}]}
      ],
      "services": [
        {"identifier": "set", "callType": "async", "method": "thing.service.property.set", "inputData": []},
        {"identifier": "reboot", "callType": "sync", "method": "thing.service.reboot",
         "inputData": [{"identifier": "delay", "dataType": {"type": "int", "specs": {"min": "0", "max": "60"}}}], "outputData": []}
      ]
    }"#;

    #[test]
    fn parses_every_type() {
        let m = parse(METER).unwrap();
        assert_eq!(m.properties.len(), 8);
        assert_eq!(m.events.len(), 1, "the implicit post event is not listed");
        assert_eq!(
            m.services.len(),
            1,
            "the implicit set service is not listed"
        );
        assert_eq!(m.property("temp").unwrap().access_mode, AccessMode::Read);
        assert!(matches!(
            m.property("samples").unwrap().param.data_type,
            DataType::Array { size: 3, .. }
        ));
    }

    #[test]
    fn value_table() {
        let m = parse(METER).unwrap();
        let cases = [
            ("temp", json!(21.5), true),
            ("temp", json!(121), false),
            ("temp", json!(21.55), false),
            ("temp", json!("21.5"), false),
            ("power", json!(1500), true),
            ("power", json!(1505), false),
            ("power", json!(1.5), false),
            ("mode", json!(1), true),
            ("mode", json!(2), false),
            ("on", json!(0), true),
            ("on", json!(2), false),
            ("label", json!("12345678"), true),
            ("label", json!("123456789"), false),
            ("since", json!("1700000000000"), true),
            ("since", json!("2024-01-01"), false),
            ("loc", json!({"lat": 31.2, "lon": 121.5}), true),
            ("loc", json!({"lat": 91.0}), false),
            ("loc", json!({"alt": 1}), false),
            ("samples", json!([{"v": 1}, {"v": 9}]), true),
            (
                "samples",
                json!([{"v": 1}, {"v": 1}, {"v": 1}, {"v": 1}]),
                false,
            ),
            ("samples", json!([{"v": 10}]), false),
        ];
        for (id, v, ok) in cases {
            let r = m.property(id).unwrap().param.data_type.validate(&v, id);
            assert_eq!(r.is_ok(), ok, "{id} = {v}: {r:?}");
        }
        let e = m
            .property("samples")
            .unwrap()
            .param
            .data_type
            .validate(&json!([{"v": 1}, {"v": 10}]), "samples");
        assert_eq!(e.unwrap_err().path, "samples[1].v");
    }

    /// Alibaba's console exports array items without specs, and may leave out bounds, units
    /// and lengths; each is optional, with no check where it is absent.
    #[test]
    fn alibaba_export_forms_without_optional_specs_are_taken() {
        let m = parse(
            r#"{"schema": "https://iotx-tsl.oss-ap-southeast-1.aliyuncs.com/schema.json",
                "link": "/sys/a1xxxx/dev/thing/",
                "profile": {"productKey": "a1xxxx", "deviceName": "dev"},
                "properties": [
                  {"identifier": "ints", "name": "Ints", "accessMode": "rw", "required": false,
                   "dataType": {"type": "array", "specs": {"size": "4", "item": {"type": "int"}}}},
                  {"identifier": "reals", "dataType": {"type": "array", "specs": {"size": "2", "item": {"type": "double"}}}},
                  {"identifier": "names", "dataType": {"type": "array", "specs": {"size": "2", "item": {"type": "text"}}}},
                  {"identifier": "level", "accessMode": "w", "dataType": {"type": "int", "specs": {"unit": "", "unitName": "无"}}},
                  {"identifier": "note", "dataType": {"type": "text", "specs": {}}}
                ],
                "events": [{"identifier": "post", "type": "info", "outputData": []}],
                "services": [{"identifier": "set", "inputData": []}, {"identifier": "get", "inputData": []}]}"#,
        )
        .unwrap();
        let ints = &m.property("ints").unwrap().param.data_type;
        assert!(ints
            .validate(&json!([1, -2_000_000_000, 3]), "ints")
            .is_ok());
        assert!(ints.validate(&json!([1, 2, 3, 4, 5]), "ints").is_err());
        assert!(ints.validate(&json!([1.5]), "ints").is_err());
        let reals = &m.property("reals").unwrap().param.data_type;
        assert!(reals.validate(&json!([1e300, -0.5]), "reals").is_ok());
        let names = &m.property("names").unwrap().param.data_type;
        assert!(names.validate(&json!(["a", "b"]), "names").is_ok());
        assert_eq!(m.property("level").unwrap().access_mode, AccessMode::Write);
        let note = &m.property("note").unwrap().param.data_type;
        assert_eq!(
            note,
            &DataType::Text {
                length: MAX_TEXT_LENGTH
            }
        );
    }

    #[test]
    fn a_document_that_is_not_a_thing_model_is_refused() {
        for (json, path) in [
            (r#"{"foo": 1}"#, "foo"),
            (
                r#"{"propertys": [{"identifier": "t", "dataType": {"type": "date"}}]}"#,
                "propertys",
            ),
            (r#"{}"#, "$"),
            (
                r#"{"properties": [], "events": [{"identifier": "post"}], "services": [{"identifier": "set"}]}"#,
                "$",
            ),
        ] {
            let e = parse(json).unwrap_err();
            assert_eq!(e.path, path, "{json}: {e}");
        }
    }

    #[test]
    fn invalid_specs_name_their_path() {
        let cases = [
            (
                r#"{"properties": [{"identifier": "t", "dataType": {"type": "int", "specs": {"min": "5", "max": "1"}}}]}"#,
                "properties[0].dataType.specs.max",
            ),
            (
                r#"{"properties": [{"identifier": "t", "dataType": {"type": "float", "specs": {"min": "x", "max": "1"}}}]}"#,
                "properties[0].dataType.specs.min",
            ),
            (
                r#"{"properties": [{"identifier": "t", "dataType": {"type": "text", "specs": {"length": "20000"}}}]}"#,
                "properties[0].dataType.specs.length",
            ),
            (
                r#"{"properties": [{"identifier": "t-1", "dataType": {"type": "date"}}]}"#,
                "properties[0].identifier",
            ),
            (
                r#"{"properties": [{"identifier": "t", "dataType": {"type": "long"}}]}"#,
                "properties[0].dataType.type",
            ),
            (
                r#"{"properties": [{"identifier": "s", "dataType": {"type": "struct", "specs": [{"identifier": "in", "dataType": {"type": "struct", "specs": []}}]}}]}"#,
                "properties[0].dataType.specs[0].dataType",
            ),
            (
                r#"{"properties": [{"identifier": "a", "dataType": {"type": "array", "specs": {"size": "4", "item": {"type": "bool"}}}}]}"#,
                "properties[0].dataType.specs.item.type",
            ),
            (
                r#"{"properties": [{"identifier": "a", "dataType": {"type": "date"}}, {"identifier": "a", "dataType": {"type": "date"}}]}"#,
                "properties[1].identifier",
            ),
            (
                r#"{"services": [{"identifier": "x", "callType": "later"}]}"#,
                "services[0].callType",
            ),
            (r#"[1, 2]"#, "$"),
            (r#"{"properties": {"#, "$"),
        ];
        for (json, path) in cases {
            let e = parse(json).unwrap_err();
            assert_eq!(e.path, path, "{json}: {e}");
        }
    }
}
