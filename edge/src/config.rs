//! The gateway's configuration file (`edge.toml`): its own identity, the uplink, the queue,
//! and the sub-devices with their point tables. Every error names the file, the line and the
//! field, e.g. `edge.toml:27: devices[0].points[1].address: ...`.

use ironlink_protocols::modbus::{parse_address, DataType, RegisterKind, WordOrder};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// A configuration error, located.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// What is wrong, starting with the field path.
    pub message: String,
}

/// The gateway's Alink identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// Product key (a gateway product).
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// Device secret.
    pub device_secret: String,
}

/// Where the cloud is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uplink {
    /// Host name or address.
    pub host: String,
    /// MQTT port (1883 plain, 8883 TLS).
    #[serde(default = "default_port")]
    pub port: u16,
    /// MQTT over TLS.
    #[serde(default)]
    pub tls: bool,
    /// CA certificate to trust (PEM), for a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_port() -> u16 {
    1883
}

/// What the queue does when full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Drop the oldest readings.
    DropOldest,
    /// Refuse new readings.
    RefuseNewest,
}

/// The store-and-forward queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Directory of the segment files.
    pub dir: PathBuf,
    /// Bytes kept at most.
    pub max_bytes: u64,
    /// Readings older than this are dropped.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Policy when full.
    pub when_full: WhenFull,
    /// Backlog messages per second sent beside live data after a reconnect.
    pub drain_rate: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("ironlink-edge-data/queue"),
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(7 * 24 * 3600),
            when_full: WhenFull::DropOldest,
            drain_rate: 500,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPoint {
    identifier: String,
    kind: Spanned<String>,
    address: Spanned<String>,
    #[serde(rename = "type")]
    data_type: Spanned<String>,
    #[serde(default)]
    order: Option<Spanned<String>>,
    #[serde(default = "one")]
    scale: f64,
    #[serde(default)]
    offset: f64,
    #[serde(default)]
    deadband: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: Spanned<String>,
    product_key: String,
    device_secret: String,
    transport: Spanned<String>,
    #[serde(default)]
    address: Option<Spanned<String>>,
    #[serde(default)]
    serial: Option<String>,
    #[serde(default = "default_baud")]
    baud: u32,
    #[serde(default)]
    parity: Option<Spanned<String>>,
    #[serde(default = "default_data_bits")]
    data_bits: u8,
    #[serde(default = "default_stop_bits")]
    stop_bits: u8,
    #[serde(default = "default_fault_event")]
    fault_event: String,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default = "default_unit")]
    unit_id: u8,
    #[serde(with = "humantime_serde", default = "default_poll")]
    poll_interval: Duration,
    #[serde(with = "humantime_serde", default = "default_timeout")]
    timeout: Duration,
    #[serde(default = "default_retries")]
    retries: u32,
    #[serde(default)]
    points: Vec<RawPoint>,
    /// Allows a poll interval below [`MIN_POLL_INTERVAL`] (down to 1 ms), for a device that
    /// really needs it.
    #[serde(default)]
    allow_fast_poll: bool,
}

/// The shortest poll interval taken without `allow_fast_poll = true`.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_fault_event() -> String {
    "ModbusFault".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    identifier: Spanned<String>,
    #[serde(default)]
    set: toml::Table,
}
fn default_unit() -> u8 {
    1
}
fn default_poll() -> Duration {
    Duration::from_secs(1)
}
fn default_timeout() -> Duration {
    Duration::from_millis(1000)
}
fn default_retries() -> u32 {
    2
}

/// A server for vehicle terminals (`[jt808]` or `[gb32960]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VehicleServer {
    /// TCP listener.
    pub listen: std::net::SocketAddr,
    /// The terminals' product in the cloud: a sub-device product with dynamic registration on
    /// (the thing model from `docs/tsl-templates/`). Terminals become its devices, named by phone
    /// number (JT/T 808) or VIN (GB/T 32960).
    pub product_key: String,
    /// A terminal silent this long is disconnected.
    #[serde(with = "humantime_serde", default = "default_idle")]
    pub idle_timeout: Duration,
    /// How long a call from the cloud waits for the terminal's answer.
    #[serde(with = "humantime_serde", default = "default_answer")]
    pub answer_timeout: Duration,
    /// Most terminals connected at once.
    #[serde(default = "default_max_terminals")]
    pub max_terminals: usize,
}

fn default_idle() -> Duration {
    Duration::from_secs(300)
}
fn default_answer() -> Duration {
    Duration::from_secs(10)
}
fn default_max_terminals() -> usize {
    20_000
}

/// The CoAP server for NB-IoT devices (`[coap]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoapServer {
    /// UDP listener (usually port 5683).
    pub listen: std::net::SocketAddr,
    /// The devices' product in the cloud (sub-device, dynamic registration on); `/auth`
    /// requests for other products are refused.
    pub product_key: String,
    /// `host:port` the devices reach this server at, for the `coap://` URLs of firmware
    /// images (default: the listen address, which must then not be 0.0.0.0 or [::]).
    #[serde(default)]
    pub advertise: Option<String>,
}

/// The LoRaWAN network server for packet forwarders on site (`[lorawan]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraServer {
    /// UDP listener for Semtech packet forwarders (usually port 1700).
    pub listen: std::net::SocketAddr,
    /// The nodes' product in the cloud (sub-device, dynamic registration on); nodes are named
    /// by DevEUI (lowercase hex).
    pub product_key: String,
    /// RX1 delay after the uplink.
    #[serde(with = "humantime_serde", default = "default_rx1")]
    pub rx1_delay: Duration,
    /// How long a `Downlink` call waits for its node's next uplink.
    #[serde(with = "humantime_serde", default = "default_class_a")]
    pub answer_timeout: Duration,
    /// The nodes (ABP).
    #[serde(default)]
    pub devices: Vec<LoraDevice>,
}

fn default_rx1() -> Duration {
    Duration::from_secs(1)
}
fn default_class_a() -> Duration {
    Duration::from_secs(600)
}

/// A LoRa node: OTAA (`app_key`) or ABP (DevAddr and session keys), keys and EUIs MSB first
/// as network servers print them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraDevice {
    /// DevEUI (16 hex digits).
    pub dev_eui: String,
    /// DevAddr (8 hex digits).
    #[serde(default)]
    pub dev_addr: Option<String>,
    /// NwkSKey (32 hex digits).
    #[serde(default)]
    pub nwk_skey: Option<String>,
    /// AppSKey (32 hex digits).
    #[serde(default)]
    pub app_skey: Option<String>,
    /// `cayenne` (default), `layout` (see `layout`) or `raw` (the payload as hex in property
    /// `payload`).
    #[serde(default)]
    pub decoder: Option<String>,
    /// OTAA: AppKey (32 hex digits); the node joins with its DevEUI.
    #[serde(default)]
    pub app_key: Option<String>,
    /// OTAA: JoinEUI / AppEUI (not checked; kept for reference).
    #[serde(default)]
    pub app_eui: Option<String>,
    /// `decoder = "layout"`: the payload's fields; the same layout encodes property sets into
    /// downlinks.
    #[serde(default)]
    pub layout: Vec<crate::layout::Field>,
    /// FPort of downlinks encoding property sets (default 1).
    #[serde(default)]
    pub downlink_fport: Option<u8>,
}

/// The local status endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// HTTP listener for `/healthz`, `/status` and `/metrics`; absent to disable.
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway: Gateway,
    uplink: Uplink,
    #[serde(default)]
    status: StatusConfig,
    #[serde(default)]
    queue: QueueConfig,
    #[serde(default)]
    devices: Vec<RawDevice>,
    #[serde(default)]
    jt808: Option<VehicleServer>,
    #[serde(default)]
    gb32960: Option<VehicleServer>,
    #[serde(default)]
    lorawan: Option<LoraServer>,
    #[serde(default)]
    coap: Option<CoapServer>,
    #[serde(default)]
    ota: crate::ota::OtaConfig,
}

/// How a sub-device is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Modbus TCP at this address.
    Tcp(String),
    /// Modbus RTU on a serial port.
    Rtu(SerialLine),
}

/// A serial line for Modbus RTU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialLine {
    /// Device path, e.g. `/dev/ttyUSB0`.
    pub path: String,
    /// Baud rate.
    pub baud: u32,
    /// `N`, `E` or `O`.
    pub parity: char,
    /// 7 or 8.
    pub data_bits: u8,
    /// 1 or 2.
    pub stop_bits: u8,
}

/// A cloud service that writes points: the call's own parameters that name points, plus
/// constant values.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// Thing-model service identifier.
    pub identifier: String,
    /// Points written with these values on every call.
    pub set: Vec<(String, serde_json::Value)>,
}

/// One point, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Thing-model property identifier.
    pub identifier: String,
    /// Table.
    pub kind: RegisterKind,
    /// 0-based address.
    pub address: u16,
    /// Data type.
    pub data_type: DataType,
    /// Word order.
    pub order: WordOrder,
    /// Engineering value = raw * scale + offset.
    pub scale: f64,
    /// See `scale`.
    pub offset: f64,
    /// Report only changes larger than this (0: every poll).
    pub deadband: f64,
}

/// One sub-device, resolved.
#[derive(Debug, Clone)]
pub struct Device {
    /// Device name in the cloud.
    pub name: String,
    /// Its product key.
    pub product_key: String,
    /// Its secret (for topo/add and login signatures).
    pub device_secret: String,
    /// How to reach it.
    pub transport: Transport,
    /// Modbus unit id.
    pub unit_id: u8,
    /// Time between polls.
    pub poll_interval: Duration,
    /// Per request.
    pub timeout: Duration,
    /// Retries per request.
    pub retries: u32,
    /// Points.
    pub points: Vec<Point>,
    /// Services the cloud may call.
    pub services: Vec<Service>,
    /// Event posted when polling starts failing, fails differently, or recovers; empty: none.
    pub fault_event: String,
}

/// The whole configuration, resolved and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Identity.
    pub gateway: Gateway,
    /// Cloud.
    pub uplink: Uplink,
    /// Queue.
    pub queue: QueueConfig,
    /// Local status endpoint.
    pub status: StatusConfig,
    /// Sub-devices.
    pub devices: Vec<Device>,
    /// JT/T 808 terminal server.
    pub jt808: Option<VehicleServer>,
    /// GB/T 32960 vehicle server.
    pub gb32960: Option<VehicleServer>,
    /// LoRaWAN network server.
    pub lorawan: Option<LoraServer>,
    /// CoAP server.
    pub coap: Option<CoapServer>,
    /// Self-upgrade.
    pub ota: crate::ota::OtaConfig,
}

/// Where `key = ...` stands in the table around `anchor` (a span inside that table).
fn key_in_table(text: &str, anchor: usize, key: &str) -> Option<usize> {
    let anchor = anchor.min(text.len());
    let start = text.get(..anchor)?.rfind("\n[").map_or(0, |i| i + 1);
    let end = text
        .get(anchor..)?
        .find("\n[")
        .map_or(text.len(), |i| anchor + i);
    let mut at = start;
    for line in text.get(start..end)?.split_inclusive('\n') {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                return Some(at + (line.len() - t.len()));
            }
        }
        at += line.len();
    }
    None
}

/// The dotted path of the key whose value starts at `offset`, with array-of-tables
/// indices (`devices[0].points[2].address`): serde's type errors name only the type.
fn key_path(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let before = text.get(..offset)?;
    let mut table: Vec<String> = Vec::new();
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for line in before.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_owned();
            *counts.entry(name.clone()).or_insert(0) += 1;
            counts.retain(|k, _| !k.starts_with(&format!("{name}.")));
            table = vec![name];
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = vec![name.trim().to_owned()];
        }
    }
    let mut path = String::new();
    if let Some(name) = table.first() {
        let mut prefix = String::new();
        for seg in name.split('.') {
            if !prefix.is_empty() {
                prefix.push('.');
                path.push('.');
            }
            prefix.push_str(seg);
            path.push_str(seg);
            if let Some(n) = counts.get(&prefix) {
                path.push_str(&format!("[{}]", n.saturating_sub(1)));
            }
        }
    }
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..offset)?;
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))?;
    if key.is_empty() {
        return None;
    }
    Some(if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map_or(0, |t| t.bytes().filter(|b| *b == b'\n').count() + 1)
}

impl Config {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses and checks `text` (named `file` in errors).
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let err = |offset: Option<usize>, message: String| ConfigError {
            file: file.to_owned(),
            line: offset.map_or(0, |o| line_of(text, o)),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_owned();
            let at = e.span().map(|s| s.start);
            // Type errors point at the value and name only the type: name the key too.
            let message = match at.and_then(|o| key_path(text, o)) {
                Some(path) if !message.contains(&path) => format!("{path}: {message}"),
                _ => message,
            };
            err(at, message)
        })?;
        if let (false, Some(_)) = (raw.uplink.tls, &raw.uplink.ca_file) {
            let at = text.find("ca_file");
            return Err(err(at, "uplink.ca_file: set only with tls = true".into()));
        }
        // What `run` or the cloud would refuse later is refused here, at its line.
        let table_key = |table: &str, key: &str| {
            text.find(table)
                .and_then(|a| key_in_table(text, a, key).or(Some(a)))
        };
        let g = &raw.gateway;
        for (key, value) in [
            ("product_key", &g.product_key),
            ("device_name", &g.device_name),
            ("device_secret", &g.device_secret),
        ] {
            if value.trim().is_empty() {
                return Err(err(
                    table_key("[gateway]", key),
                    format!("gateway.{key}: must not be empty"),
                ));
            }
        }
        if !ironlink_shared::valid_device_name(&g.device_name) {
            return Err(err(
                table_key("[gateway]", "device_name"),
                format!(
                    "gateway.device_name: `{}` is not a device name the cloud takes ({})",
                    g.device_name.escape_debug(),
                    ironlink_shared::DEVICE_NAME_RULE
                ),
            ));
        }
        if raw.uplink.host.trim().is_empty() || raw.uplink.port == 0 {
            return Err(err(
                table_key("[uplink]", "host"),
                "uplink: host must not be empty and port not 0".into(),
            ));
        }
        if let Some(ca) = &raw.uplink.ca_file {
            if let Err(e) = std::fs::metadata(ca) {
                return Err(err(
                    table_key("[uplink]", "ca_file"),
                    format!("uplink.ca_file: cannot read {}: {e}", ca.display()),
                ));
            }
        }
        let q = &raw.queue;
        for (key, zero) in [
            ("max_bytes", q.max_bytes == 0),
            ("max_age", q.max_age.is_zero()),
        ] {
            if zero {
                return Err(err(
                    table_key("[queue]", key),
                    format!("queue.{key}: must be above 0"),
                ));
            }
        }
        let mut devices = Vec::with_capacity(raw.devices.len());
        let mut names = std::collections::HashSet::new();
        for (di, d) in raw.devices.into_iter().enumerate() {
            let here = |field: &str| format!("devices[{di}].{field}");
            if !names.insert(d.name.get_ref().clone()) {
                return Err(err(
                    Some(d.name.span().start),
                    format!("{}: `{}` appears twice", here("name"), d.name.get_ref()),
                ));
            }
            let anchor = d.name.span().start;
            let at = |key: &str| Some(key_in_table(text, anchor, key).unwrap_or(anchor));
            if !ironlink_shared::valid_device_name(d.name.get_ref()) {
                return Err(err(
                    Some(anchor),
                    format!(
                        "{}: `{}` is not a device name the cloud takes ({})",
                        here("name"),
                        d.name.get_ref().escape_debug(),
                        ironlink_shared::DEVICE_NAME_RULE
                    ),
                ));
            }
            for (key, value) in [
                ("product_key", &d.product_key),
                ("device_secret", &d.device_secret),
            ] {
                if value.trim().is_empty() {
                    return Err(err(at(key), format!("{}: must not be empty", here(key))));
                }
            }
            let floor = if d.allow_fast_poll {
                Duration::from_millis(1)
            } else {
                MIN_POLL_INTERVAL
            };
            if d.poll_interval < floor {
                let hint = if d.allow_fast_poll {
                    ""
                } else {
                    " (a device that needs faster polls says allow_fast_poll = true, down to 1ms)"
                };
                return Err(err(
                    at("poll_interval"),
                    format!(
                        "{}: {:?} is below {floor:?}{hint}",
                        here("poll_interval"),
                        d.poll_interval
                    ),
                ));
            }
            if d.timeout.is_zero() {
                return Err(err(
                    at("timeout"),
                    format!("{}: must be above 0", here("timeout")),
                ));
            }
            let mut identifiers = std::collections::HashSet::new();
            for (pi, p) in d.points.iter().enumerate() {
                if p.identifier.trim().is_empty() || !identifiers.insert(p.identifier.as_str()) {
                    let anchor = p.address.span().start;
                    return Err(err(
                        Some(key_in_table(text, anchor, "identifier").unwrap_or(anchor)),
                        format!(
                            "devices[{di}].points[{pi}].identifier: `{}` is empty or appears twice in this device",
                            p.identifier
                        ),
                    ));
                }
            }
            let transport = match d.transport.get_ref().as_str() {
                "tcp" => match &d.address {
                    Some(a)
                        if a.get_ref().parse::<std::net::SocketAddr>().is_ok()
                            || a.get_ref().contains(':') =>
                    {
                        Transport::Tcp(a.get_ref().clone())
                    }
                    Some(a) => {
                        return Err(err(
                            Some(a.span().start),
                            format!("{}: `{}` is not host:port", here("address"), a.get_ref()),
                        ))
                    }
                    None => {
                        return Err(err(
                            Some(d.transport.span().start),
                            format!("{}: tcp needs `address = \"host:port\"`", here("transport")),
                        ))
                    }
                },
                "rtu" => {
                    match &d.serial {
                        Some(p) => {
                            let parity = match d
                                .parity
                                .as_ref()
                                .map(|p| (p.get_ref().to_ascii_uppercase(), p.span().start))
                            {
                                None => 'N',
                                Some((v, _)) if v == "N" || v == "NONE" => 'N',
                                Some((v, _)) if v == "E" || v == "EVEN" => 'E',
                                Some((v, _)) if v == "O" || v == "ODD" => 'O',
                                Some((v, at)) => {
                                    return Err(err(
                                        Some(at),
                                        format!(
                                            "{}: `{v}` is not none, even or odd",
                                            here("parity")
                                        ),
                                    ))
                                }
                            };
                            if !(d.data_bits == 7 || d.data_bits == 8)
                                || !(d.stop_bits == 1 || d.stop_bits == 2)
                                || d.baud == 0
                            {
                                return Err(err(Some(d.transport.span().start), format!("{}: data_bits must be 7 or 8, stop_bits 1 or 2, baud above 0", here("transport"))));
                            }
                            Transport::Rtu(SerialLine {
                                path: p.clone(),
                                baud: d.baud,
                                parity,
                                data_bits: d.data_bits,
                                stop_bits: d.stop_bits,
                            })
                        }
                        None => {
                            return Err(err(
                                Some(d.transport.span().start),
                                format!(
                                    "{}: rtu needs `serial = \"/dev/ttyUSB0\"`",
                                    here("transport")
                                ),
                            ))
                        }
                    }
                }
                other => {
                    return Err(err(
                        Some(d.transport.span().start),
                        format!("{}: `{other}` is not tcp or rtu", here("transport")),
                    ))
                }
            };
            let mut points = Vec::with_capacity(d.points.len());
            for (pi, p) in d.points.into_iter().enumerate() {
                let here = |field: &str| format!("devices[{di}].points[{pi}].{field}");
                let kind = match p.kind.get_ref().as_str() {
                    "coil" => RegisterKind::Coil,
                    "discrete" | "discrete-input" => RegisterKind::DiscreteInput,
                    "input" | "input-register" => RegisterKind::InputRegister,
                    "holding" | "holding-register" => RegisterKind::HoldingRegister,
                    other => {
                        return Err(err(
                            Some(p.kind.span().start),
                            format!(
                                "{}: `{other}` is not coil, discrete, input or holding",
                                here("kind")
                            ),
                        ))
                    }
                };
                let (table, address) =
                    parse_address(Some(kind), p.address.get_ref()).map_err(|e| {
                        err(
                            Some(p.address.span().start),
                            format!("{}: {e}", here("address")),
                        )
                    })?;
                if table != kind {
                    return Err(err(
                        Some(p.address.span().start),
                        format!(
                            "{}: `{}` is in the {table:?} table, not {kind:?}",
                            here("address"),
                            p.address.get_ref()
                        ),
                    ));
                }
                let t = p.data_type.get_ref().to_ascii_lowercase();
                let data_type = match t.as_str() {
                    "bool" => DataType::Bool,
                    "u16" => DataType::U16,
                    "i16" => DataType::I16,
                    "u32" => DataType::U32,
                    "i32" => DataType::I32,
                    "f32" | "float" => DataType::F32,
                    "u64" => DataType::U64,
                    "i64" => DataType::I64,
                    "f64" | "double" => DataType::F64,
                    s => match s.strip_prefix("string").and_then(|n| n.trim_start_matches(['(', '[']).trim_end_matches([')', ']']).parse::<u16>().ok()) {
                        Some(n) if n > 0 && n <= 125 => DataType::String(n),
                        _ => return Err(err(Some(p.data_type.span().start), format!("{}: `{}` is not bool, u16, i16, u32, i32, f32, u64, i64, f64 or string(N registers)", here("type"), p.data_type.get_ref()))),
                    },
                };
                if kind.is_bit() && data_type != DataType::Bool {
                    return Err(err(
                        Some(p.data_type.span().start),
                        format!("{}: coils and discrete inputs hold only bool", here("type")),
                    ));
                }
                let order = match p
                    .order
                    .as_ref()
                    .map(|o| (o.get_ref().to_ascii_uppercase(), o.span().start))
                {
                    None => WordOrder::Abcd,
                    Some((o, at)) => match o.as_str() {
                        "ABCD" => WordOrder::Abcd,
                        "CDAB" => WordOrder::Cdab,
                        "BADC" => WordOrder::Badc,
                        "DCBA" => WordOrder::Dcba,
                        _ => {
                            return Err(err(
                                Some(at),
                                format!("{}: `{o}` is not ABCD, CDAB, BADC or DCBA", here("order")),
                            ))
                        }
                    },
                };
                if u32::from(address) + u32::from(data_type.registers()) > 65536 {
                    return Err(err(
                        Some(p.address.span().start),
                        format!("{}: the point runs past address 65535", here("address")),
                    ));
                }
                let anchor = p.address.span().start;
                let bad = if p.scale == 0.0 || !p.scale.is_finite() {
                    Some(("scale", "must be finite and non-zero"))
                } else if !p.offset.is_finite() {
                    Some(("offset", "must be finite"))
                } else if p.deadband < 0.0 || !p.deadband.is_finite() {
                    Some(("deadband", "must be finite and >= 0"))
                } else {
                    None
                };
                if let Some((key, what)) = bad {
                    return Err(err(
                        Some(key_in_table(text, anchor, key).unwrap_or(anchor)),
                        format!("{}: {what}", here(key)),
                    ));
                }
                points.push(Point {
                    identifier: p.identifier,
                    kind,
                    address,
                    data_type,
                    order,
                    scale: p.scale,
                    offset: p.offset,
                    deadband: p.deadband,
                });
            }
            let mut services = Vec::with_capacity(d.services.len());
            for (si, sv) in d.services.into_iter().enumerate() {
                let mut set = Vec::with_capacity(sv.set.len());
                for (k, v) in sv.set {
                    let Some(p) = points.iter().find(|p| p.identifier == k) else {
                        return Err(err(
                            Some(sv.identifier.span().start),
                            format!("devices[{di}].services[{si}].set: `{k}` is not a point of this device"),
                        ));
                    };
                    if !p.kind.writable() {
                        return Err(err(
                            Some(sv.identifier.span().start),
                            format!(
                                "devices[{di}].services[{si}].set: `{k}` is read-only ({:?})",
                                p.kind
                            ),
                        ));
                    }
                    let v = serde_json::to_value(v).map_err(|e| {
                        err(
                            Some(sv.identifier.span().start),
                            format!("devices[{di}].services[{si}].set: {e}"),
                        )
                    })?;
                    set.push((k, v));
                }
                services.push(Service {
                    identifier: sv.identifier.into_inner(),
                    set,
                });
            }
            devices.push(Device {
                name: d.name.into_inner(),
                product_key: d.product_key,
                device_secret: d.device_secret,
                transport,
                unit_id: d.unit_id,
                poll_interval: d.poll_interval,
                timeout: d.timeout,
                retries: d.retries,
                points,
                services,
                fault_event: d.fault_event,
            });
        }
        if let Some(l) = &raw.lorawan {
            for (i, d) in l.devices.iter().enumerate() {
                if let Err(e) = crate::lorawan_server::resolve(d) {
                    let at = text.find(&d.dev_eui);
                    return Err(err(at, format!("lorawan.devices[{i}]: {e}")));
                }
            }
        }
        if let (Some(a), Some(b)) = (&raw.jt808, &raw.gb32960) {
            if a.listen == b.listen && a.listen.port() != 0 {
                let at = text.find("[gb32960]");
                return Err(err(
                    at,
                    format!("gb32960.listen: {} is jt808's too", b.listen),
                ));
            }
        }
        if let Err(e) = raw.ota.key() {
            return Err(err(text.find("public_key"), e));
        }
        Ok(Self {
            gateway: raw.gateway,
            uplink: raw.uplink,
            queue: raw.queue,
            status: raw.status,
            devices,
            jt808: raw.jt808,
            gb32960: raw.gb32960,
            lorawan: raw.lorawan,
            coap: raw.coap,
            ota: raw.ota,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[gateway]
product_key = "a1gw"
device_name = "gw-01"
device_secret = "s"

[uplink]
host = "127.0.0.1"

[[devices]]
name = "meter-01"
product_key = "a1sub"
device_secret = "x"
transport = "tcp"
address = "127.0.0.1:5020"
poll_interval = "100ms"

[[devices.points]]
identifier = "voltage"
kind = "holding"
address = "40001"
type = "f32"
order = "CDAB"
scale = 0.1
"#;

    #[test]
    fn the_example_shape_parses() {
        let c = Config::parse("edge.toml", GOOD).unwrap();
        assert_eq!(c.uplink.port, 1883);
        let d = &c.devices[0];
        assert_eq!(d.transport, Transport::Tcp("127.0.0.1:5020".into()));
        assert_eq!(d.poll_interval, Duration::from_millis(100));
        assert_eq!(
            (d.points[0].address, d.points[0].order),
            (0, WordOrder::Cdab)
        );
        assert_eq!(c.queue.when_full, WhenFull::DropOldest);
    }

    #[test]
    fn rtu_lines_and_services_parse() {
        let text = GOOD.replace(
            "transport = \"tcp\"",
            "transport = \"rtu\"\nserial = \"/dev/ttyS0\"\nbaud = 19200\nparity = \"E\"\nstop_bits = 2",
        ) + "[[devices.services]]\nidentifier = \"Go\"\nset = { voltage = 2.5 }\n";
        let c = Config::parse("edge.toml", &text).unwrap();
        let d = &c.devices[0];
        assert_eq!(
            d.transport,
            Transport::Rtu(SerialLine {
                path: "/dev/ttyS0".into(),
                baud: 19200,
                parity: 'E',
                data_bits: 8,
                stop_bits: 2
            })
        );
        assert_eq!(
            d.services[0].set,
            [("voltage".into(), serde_json::json!(2.5))]
        );
        assert_eq!(d.fault_event, "ModbusFault");
    }

    /// What `run` or the cloud would refuse is refused by `check`, naming line and field.
    #[test]
    fn configs_the_edge_or_cloud_cannot_use_are_refused() {
        let cases: Vec<(String, usize, &str)> = vec![
            (GOOD.replace("device_secret = \"s\"", "device_secret = \"\""), 5, "gateway.device_secret: must not be empty"),
            (GOOD.replace("product_key = \"a1gw\"", "product_key = \" \""), 3, "gateway.product_key"),
            (GOOD.replace("device_name = \"gw-01\"", "device_name = \"gw\""), 4, "gateway.device_name: `gw` is not a device name"),
            (GOOD.replace("name = \"meter-01\"", "name = \"meter 01\""), 11, "devices[0].name"),
            (GOOD.replace("device_secret = \"x\"", "device_secret = \"\""), 13, "devices[0].device_secret"),
            (GOOD.replace("product_key = \"a1sub\"", "product_key = \"\""), 12, "devices[0].product_key"),
            (GOOD.replace("\"100ms\"", "\"0s\""), 16, "devices[0].poll_interval"),
            (GOOD.replace("\"100ms\"", "\"20ms\""), 16, "allow_fast_poll"),
            (GOOD.replace("\"100ms\"", "\"500us\"\nallow_fast_poll = true"), 16, "500µs is below 1ms"),
            (format!("{GOOD}\n[[devices.points]]\nidentifier = \"voltage\"\nkind = \"holding\"\naddress = \"40010\"\ntype = \"u16\"\n"), 27, "identifier: `voltage` is empty or appears twice"),
            (GOOD.replace("[uplink]\n", "[queue]\nmax_bytes = 0\n\n[uplink]\n"), 8, "queue.max_bytes: must be above 0"),
            (GOOD.replace("host = \"127.0.0.1\"", "host = \"127.0.0.1\"\ntls = true\nca_file = \"/nonexistent/ca.pem\""), 10, "uplink.ca_file: cannot read /nonexistent/ca.pem"),
        ];
        for (text, line, what) in cases {
            let e = Config::parse("edge.toml", &text).unwrap_err();
            assert!(e.message.contains(what), "{what}: {e:?}");
            assert_eq!(
                (e.file.as_str(), e.line),
                ("edge.toml", line),
                "{what}: {e:?}"
            );
        }
        let fast = GOOD.replace("\"100ms\"", "\"20ms\"\nallow_fast_poll = true");
        let c = Config::parse("edge.toml", &fast).unwrap();
        assert_eq!(c.devices[0].poll_interval, Duration::from_millis(20));
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("edge.example.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.devices[0].points.len(), 3);
        assert_eq!(c.devices[0].points[1].address, 10);
        assert_eq!(c.queue.max_age, Duration::from_secs(7 * 24 * 3600));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let cases = [
            (
                GOOD.replace("\"40001\"", "\"40000\""),
                21,
                "devices[0].points[0].address",
            ),
            (
                GOOD.replace("\"f32\"", "\"f31\""),
                22,
                "devices[0].points[0].type",
            ),
            (
                GOOD.replace("\"CDAB\"", "\"CBAD\""),
                23,
                "devices[0].points[0].order",
            ),
            (
                GOOD.replace("transport = \"tcp\"", "transport = \"udp\""),
                14,
                "devices[0].transport",
            ),
            (
                GOOD.replace("kind = \"holding\"", "kind = \"coil\""),
                22,
                "devices[0].points[0]",
            ),
            (
                GOOD.replace("poll_interval", "poll_intervall"),
                16,
                "poll_intervall",
            ),
            (
                GOOD.replace(
                    "transport = \"tcp\"",
                    "transport = \"rtu\"\nserial = \"/dev/ttyS0\"\nparity = \"mark\"",
                ),
                16,
                "devices[0].parity",
            ),
            (
                format!("{GOOD}[[devices.services]]\nidentifier = \"Go\"\nset = {{ nope = 1 }}\n"),
                26,
                "devices[0].services[0].set: `nope` is not a point",
            ),
        ];
        let scale_zero = GOOD.replace("scale = 0.1", "scale = 0");
        let typed_address = GOOD.replace("\"40001\"", "40001");
        let cases = cases.into_iter().chain([
            // The scale line, not the address line.
            (scale_zero, 24, "devices[0].points[0].scale"),
            // A type error names its key, not only the type.
            (typed_address, 21, "devices[0].points[0].address"),
            (
                GOOD.replace("poll_interval = \"100ms\"", "poll_interval = 5"),
                16,
                "devices[0].poll_interval",
            ),
        ]);
        for (text, line, field) in cases {
            let e = Config::parse("edge.toml", &text).unwrap_err();
            let shown = e.to_string();
            assert!(shown.starts_with(&format!("edge.toml:{line}:")), "{shown}");
            assert!(shown.contains(field), "{shown}");
        }
        let missing = GOOD.replace("device_secret = \"s\"\n", "");
        let e = Config::parse("edge.toml", &missing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("device_secret"), "{e}");
    }
}
