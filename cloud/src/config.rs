//! Configuration: serde + TOML, every section defaulted to production values.
//! `cloud/ironlink-cloud.example.toml` documents every key.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole cloud configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the SQLite database, generated certificates and the admin token live.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://...`; default: `sqlite://{data_dir}/ironlink.db`.
    pub database_url: Option<String>,
    /// Bearer token for the HTTP API; generated into `{data_dir}/admin-token` when absent.
    pub admin_token: Option<String>,
    /// Log filter (`info`, `ironlink_cloud::access=debug,info`, ...); `IRONLINK_LOG` and
    /// `RUST_LOG` win over it. Changed at run time by SIGHUP.
    pub log: Option<String>,
    /// Device access over MQTT.
    pub mqtt: MqttConfig,
    /// HTTP API.
    pub http: HttpConfig,
    /// TLS certificate for MQTT over TLS.
    pub tls: TlsConfig,
    /// Thing model, services and gateways.
    pub thing: ThingConfig,
    /// Application access (consumer groups, AMQP).
    pub apps: AppsConfig,
    /// Rules engine and data-parsing scripts.
    pub rules: RulesConfig,
    /// Per-device limits (rates, sizes, subscriptions, retained messages, storage quota) and
    /// per-connection byte bounds.
    pub limits: LimitsConfig,
    /// Over-the-air updates: download URLs, signing, package size, notice budget.
    pub ota: crate::ota::OtaConfig,
    /// Time-series storage: chunking and retention.
    pub timeseries: crate::tsdb::TimeseriesConfig,
    /// Analytics jobs: worker limits and concurrency.
    pub analytics: crate::jobs::AnalyticsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("ironlink-data"),
            database_url: None,
            admin_token: None,
            log: None,
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            tls: TlsConfig::default(),
            thing: ThingConfig::default(),
            apps: AppsConfig::default(),
            rules: RulesConfig::default(),
            limits: LimitsConfig::default(),
            ota: crate::ota::OtaConfig::default(),
            timeseries: crate::tsdb::TimeseriesConfig::default(),
            analytics: crate::jobs::AnalyticsConfig::default(),
        }
    }
}

/// MQTT device access.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Plain TCP listener (Alink `securemode=3`); absent to disable.
    pub listen: Option<SocketAddr>,
    /// TLS listener (Alink `securemode=2`); absent to disable.
    pub tls_listen: Option<SocketAddr>,
    /// Largest MQTT packet accepted, in bytes; larger ones close the connection.
    pub max_packet_size: usize,
    /// How long a new connection may take to send CONNECT (TLS handshake included).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// New connections accepted per second (token bucket); the excess is closed at once.
    pub connects_per_second: u32,
    /// Burst allowance of the connect rate limiter.
    pub connect_burst: u32,
    /// Connections held at most; the excess is refused with "server unavailable".
    pub max_connections: usize,
    /// Refused PUBLISH/SUBSCRIBE attempts a connection may make before it is closed.
    pub max_acl_violations: u32,
    /// Accepted distance between a signed `timestamp` and the server clock; absent to skip
    /// the check (Alibaba's C SDK signs a fixed timestamp, so the check is opt-in).
    #[serde(with = "humantime_serde")]
    pub timestamp_window: Option<Duration>,
    /// Keepalive used when a client asks for 0 (none), and the upper bound of any keepalive.
    #[serde(with = "humantime_serde")]
    pub max_keepalive: Duration,
    /// Messages queued per session before further deliveries to it are dropped and counted.
    pub session_queue: usize,
    /// Unacknowledged QoS 1 messages in flight per session.
    pub max_inflight: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 1883))),
            tls_listen: Some(SocketAddr::from(([0, 0, 0, 0], 8883))),
            max_packet_size: 256 * 1024,
            connect_timeout: Duration::from_secs(10),
            connects_per_second: 20_000,
            connect_burst: 20_000,
            max_connections: 1_000_000,
            max_acl_violations: 10,
            timestamp_window: None,
            max_keepalive: Duration::from_secs(1200),
            session_queue: 1024,
            max_inflight: 64,
        }
    }
}

/// Thing model, services and gateways.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThingConfig {
    /// Sub-devices one gateway connection may have logged in at once.
    pub max_sub_devices: usize,
    /// Sub-devices in one `batch_login` / `batch_logout` / `topo/add` request.
    pub max_batch: usize,
    /// How long a property set/get or sync service call waits for the device when the
    /// request names no `timeout_ms`.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// When an async service call without `timeout_ms` is marked timed out.
    #[serde(with = "humantime_serde")]
    pub async_call_timeout: Duration,
    /// Upper bound of any `timeout_ms`.
    #[serde(with = "humantime_serde")]
    pub max_call_timeout: Duration,
    /// How far ahead of the server clock a property or event time may be; a later time is
    /// refused for that property (it would stay the "latest" value until that moment).
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
}

impl Default for ThingConfig {
    fn default() -> Self {
        Self {
            max_sub_devices: 10_000,
            max_batch: 200,
            call_timeout: Duration::from_secs(5),
            async_call_timeout: Duration::from_secs(60),
            max_call_timeout: Duration::from_secs(600),
            max_future_skew: Duration::from_secs(600),
        }
    }
}

/// Application access.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppsConfig {
    /// AMQP 1.0 over TLS listener for applications (Alibaba-compatible server-side
    /// subscription); absent to disable.
    pub amqps_listen: Option<SocketAddr>,
    /// Time an AMQP client has, from connecting, to open its receiver link (Alibaba: 15 s).
    #[serde(with = "humantime_serde")]
    pub amqp_link_timeout: Duration,
    /// Messages older than this leave a group's queue (dropped, counted).
    #[serde(with = "humantime_serde")]
    pub queue_max_age: Duration,
    /// Most messages kept per group; the oldest are dropped (counted).
    pub queue_max_messages: i64,
    /// Fresh messages a client may hold unsettled before the rest go to the backlog.
    pub realtime_window: usize,
    /// Messages an application's MQTT session may have waiting for it before further ones are
    /// dropped (counted in `ironlink_router_dropped_total`): applications receive the fan-in
    /// of whole products, so their queue is far deeper than a device's (`mqtt.session_queue`).
    pub mqtt_session_queue: usize,
    /// Accepted distance between an application's signed `timestamp` (aksign, AMQP and MQTT)
    /// and the server clock; absent to skip the check. Server-side SDKs sign the current
    /// time, so it is on by default (15 minutes, as Alibaba).
    #[serde(with = "humantime_serde")]
    pub timestamp_window: Option<Duration>,
}

impl Default for AppsConfig {
    fn default() -> Self {
        Self {
            amqps_listen: Some(SocketAddr::from(([0, 0, 0, 0], 5671))),
            amqp_link_timeout: Duration::from_secs(15),
            queue_max_age: Duration::from_secs(24 * 3600),
            queue_max_messages: 1_000_000,
            realtime_window: 256,
            mqtt_session_queue: 65_536,
            timestamp_window: Some(Duration::from_secs(15 * 60)),
        }
    }
}

/// Rules engine and data-parsing scripts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesConfig {
    /// Device messages waiting for evaluation at most; when full, messages are dropped for the
    /// rules (counted in `ironlink_rules_input_dropped_total`), never for storage.
    pub queue: usize,
    /// Groups a windowed rule keeps at most (further groups' messages are dropped, counted).
    pub max_groups: usize,
    /// Values a sliding window keeps per group at most.
    pub max_window_values: usize,
    /// Rules at most.
    pub max_rules: usize,
    /// Time limit of one data-parsing script call.
    #[serde(with = "humantime_serde")]
    pub script_time_limit: Duration,
    /// Memory limit of a product's script runtime, MiB.
    pub script_memory_mib: usize,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            queue: 65_536,
            max_groups: 100_000,
            max_window_values: 10_000,
            max_rules: 10_000,
            script_time_limit: Duration::from_millis(50),
            script_memory_mib: 16,
        }
    }
}

/// HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listener of the HTTP API.
    pub listen: SocketAddr,
    /// Connections held at most; further ones are closed at once (counted). Also capped at
    /// an eighth of the open-files limit, so the API never starves device connections.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and the longest a kept-alive
    /// connection may stay idle between requests.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest wait for the next part of a request body.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Largest request body, bytes (413 beyond).
    pub max_body_bytes: usize,
    /// When true, `/metrics` also asks for the API token (Prometheus' `authorization`).
    pub metrics_need_token: bool,
    /// How long audit log entries are kept (0: forever); older ones are deleted in the
    /// background.
    #[serde(with = "humantime_serde")]
    pub audit_retention: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 1024,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_body_bytes: 2 * 1024 * 1024,
            metrics_need_token: false,
            audit_retention: Duration::from_secs(90 * 86_400),
        }
    }
}

/// Per-device limits and per-connection byte bounds. Rates and sizes apply to each device,
/// a gateway's sub-devices each with their own; `products` overrides them per product.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// The per-device values (`[limits.device]`).
    pub device: DeviceLimits,
    /// Uplink bytes one connection may have in processing before its socket stops being
    /// read (TCP back-pressure).
    pub inflight_bytes: usize,
    /// Downlink bytes queued for one device connection; further deliveries are dropped
    /// (counted). Applications' MQTT sessions get sixteen times as much.
    pub queued_bytes: usize,
    /// Retained messages kept in all, and their bytes.
    pub retained_total: usize,
    /// Bytes of all retained messages.
    pub retained_bytes_total: usize,
    /// Overrides per product key (any subset of the per-device keys).
    pub products: std::collections::BTreeMap<String, ProductLimits>,
}

/// Limits that apply to each device.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceLimits {
    /// Messages a device may publish per second (token bucket; 0: no limit). Over it, the
    /// connection is no longer read until the bucket refills: the device is slowed, its data
    /// is kept.
    pub messages_per_second: u32,
    /// Burst above that rate.
    pub message_burst: u32,
    /// Largest payload on Alink system topics (`/sys/`, `/ext/`, `/ota/`, `/shadow/`), except raw data.
    pub max_alink_payload: usize,
    /// Largest payload of a custom topic (`/{pk}/{dn}/user/...`) or of raw data (`up_raw`).
    pub max_custom_payload: usize,
    /// Topic filters one connection may hold (its own SUBSCRIBEs).
    pub max_subscriptions: usize,
    /// Retained messages a device may keep.
    pub retained_messages: usize,
    /// Bytes of a device's retained messages.
    pub retained_bytes: usize,
    /// Bytes a device may store per UTC day in data the thing model does not check
    /// (properties and events of a product without a model, raw uplinks as received); 0: no limit.
    pub unvalidated_bytes_per_day: u64,
}

impl Default for DeviceLimits {
    fn default() -> Self {
        Self {
            messages_per_second: 30,
            message_burst: 300,
            max_alink_payload: 128 * 1024,
            max_custom_payload: 256 * 1024,
            max_subscriptions: 100,
            retained_messages: 100,
            retained_bytes: 1024 * 1024,
            unvalidated_bytes_per_day: 256 * 1024 * 1024,
        }
    }
}

/// A product's overrides of [`DeviceLimits`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProductLimits {
    /// See [`DeviceLimits::messages_per_second`].
    pub messages_per_second: Option<u32>,
    /// See [`DeviceLimits::message_burst`].
    pub message_burst: Option<u32>,
    /// See [`DeviceLimits::max_alink_payload`].
    pub max_alink_payload: Option<usize>,
    /// See [`DeviceLimits::max_custom_payload`].
    pub max_custom_payload: Option<usize>,
    /// See [`DeviceLimits::max_subscriptions`].
    pub max_subscriptions: Option<usize>,
    /// See [`DeviceLimits::retained_messages`].
    pub retained_messages: Option<usize>,
    /// See [`DeviceLimits::retained_bytes`].
    pub retained_bytes: Option<usize>,
    /// See [`DeviceLimits::unvalidated_bytes_per_day`].
    pub unvalidated_bytes_per_day: Option<u64>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            device: DeviceLimits::default(),
            inflight_bytes: 4 * 1024 * 1024,
            queued_bytes: 4 * 1024 * 1024,
            retained_total: 100_000,
            retained_bytes_total: 256 * 1024 * 1024,
            products: Default::default(),
        }
    }
}

impl LimitsConfig {
    /// The limits of a device of product `pk`.
    pub fn for_product(&self, pk: &str) -> DeviceLimits {
        let mut d = self.device;
        if let Some(p) = self.products.get(pk) {
            macro_rules! take {
                ($($f:ident),*) => { $( if let Some(v) = p.$f { d.$f = v; } )* };
            }
            take!(
                messages_per_second,
                message_burst,
                max_alink_payload,
                max_custom_payload,
                max_subscriptions,
                retained_messages,
                retained_bytes,
                unvalidated_bytes_per_day
            );
        }
        d
    }
}

/// Server certificate for MQTT over TLS.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; when absent with `key_file`, a development CA and certificate
    /// are generated under `{data_dir}/tls/`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key.
    pub key_file: Option<PathBuf>,
}

/// A configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is invalid; the message names line, column and key.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
}

impl Config {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The database URL, defaulting to SQLite in the data directory.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(u) => u.clone(),
            None => format!("sqlite://{}", self.data_dir.join("ironlink.db").display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_and_matches_defaults() {
        let text = include_str!("../ironlink-cloud.example.toml");
        let c: Config = toml::from_str(text).unwrap();
        let d = Config::default();
        assert_eq!(c.mqtt.max_packet_size, d.mqtt.max_packet_size);
        assert_eq!(c.mqtt.connect_timeout, d.mqtt.connect_timeout);
        assert_eq!(c.http.listen, d.http.listen);
        assert_eq!(c.http.max_connections, d.http.max_connections);
        assert_eq!(c.http.header_timeout, d.http.header_timeout);
        assert_eq!(c.http.audit_retention, d.http.audit_retention);
        assert_eq!(c.thing.max_future_skew, d.thing.max_future_skew);
        assert_eq!(c.limits.device, d.limits.device);
        assert_eq!(c.limits.inflight_bytes, d.limits.inflight_bytes);
        assert_eq!(c.limits.retained_bytes_total, d.limits.retained_bytes_total);
        assert_eq!(c.ota.max_package_bytes, d.ota.max_package_bytes);
        assert_eq!(c.ota.max_notices_per_second, d.ota.max_notices_per_second);
        assert_eq!(c.ota.tick, d.ota.tick);
    }

    #[test]
    fn unknown_key_names_line() {
        let err =
            toml::from_str::<Config>("[mqtt]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("bogus") && msg.contains("line 3"), "{msg}");
    }
}
