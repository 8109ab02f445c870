//! Per-device limits: message rate (token bucket), payload size per topic class,
//! subscriptions per connection, retained messages and a daily storage quota for data the
//! thing model does not check. Every refusal is counted in `/metrics` and per device (see
//! `GET /devices/{pk}/{dn}/limits`); the per-device counters live in memory since start.
//!
//! The buckets themselves live in the connections (a direct device's in its connection, a
//! sub-device's in its gateway's): an idle device costs nothing here.

use crate::config::{DeviceLimits, LimitsConfig};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Why a device's message or request was refused (or, for `throttled`, slowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over its message rate: the connection stopped being read until the bucket refilled.
    Throttled,
    /// A payload over its topic class's size limit.
    PayloadTooLarge,
    /// A SUBSCRIBE over the connection's subscription limit.
    Subscriptions,
    /// A retained message over the device's or the server's retained limits.
    Retained,
    /// Unvalidated data over the device's daily storage quota.
    StorageQuota,
}

impl Refusal {
    /// Every kind, in the order of [`Refusal::index`].
    pub const ALL: [Refusal; 5] = [
        Refusal::Throttled,
        Refusal::PayloadTooLarge,
        Refusal::Subscriptions,
        Refusal::Retained,
        Refusal::StorageQuota,
    ];

    /// The `kind` label and API field.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Throttled => "throttled",
            Refusal::PayloadTooLarge => "payload_too_large",
            Refusal::Subscriptions => "subscriptions",
            Refusal::Retained => "retained",
            Refusal::StorageQuota => "storage_quota",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A device's refusals since the server started.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct DeviceRefusals {
    /// Times the device was slowed for going over its message rate.
    pub throttled: u64,
    /// Messages refused for their size.
    pub payload_too_large: u64,
    /// Subscriptions refused over the limit.
    pub subscriptions: u64,
    /// Retained messages refused.
    pub retained: u64,
    /// Messages refused by the daily storage quota.
    pub storage_quota: u64,
    /// When the last refusal happened (ms since the epoch).
    pub last_at: Option<i64>,
    /// What the last refusal was.
    pub last_reason: Option<String>,
}

impl DeviceRefusals {
    fn count(&mut self, kind: Refusal) {
        let c = match kind {
            Refusal::Throttled => &mut self.throttled,
            Refusal::PayloadTooLarge => &mut self.payload_too_large,
            Refusal::Subscriptions => &mut self.subscriptions,
            Refusal::Retained => &mut self.retained,
            Refusal::StorageQuota => &mut self.storage_quota,
        };
        *c += 1;
    }
}

type Key = (String, String);

#[derive(Debug, Default)]
struct Usage {
    /// UTC day (days since the epoch) the counts are for.
    day: i64,
    bytes: HashMap<Key, u64>,
}

/// The limits in force and what they refused.
#[derive(Debug)]
pub struct Limits {
    config: LimitsConfig,
    totals: [AtomicU64; 5],
    devices: Mutex<HashMap<Key, DeviceRefusals>>,
    usage: Mutex<Usage>,
}

const DAY_MS: i64 = 86_400_000;

impl Limits {
    /// Limits from the configuration.
    pub fn new(config: LimitsConfig) -> Self {
        Self {
            config,
            totals: Default::default(),
            devices: Mutex::default(),
            usage: Mutex::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// The limits of a device of product `pk`.
    pub fn of(&self, pk: &str) -> DeviceLimits {
        self.config.for_product(pk)
    }

    /// Counts a refusal for the device, with a reason for the log and the API.
    pub fn refuse(&self, pk: &str, dn: &str, kind: Refusal, reason: &str, now_ms: i64) {
        self.totals[kind.index()].fetch_add(1, Ordering::Relaxed);
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let d = devices.entry((pk.to_owned(), dn.to_owned())).or_default();
        d.count(kind);
        d.last_at = Some(now_ms);
        d.last_reason = Some(reason.to_owned());
        drop(devices);
        // A device over its rate is slowed many times a second: counted, logged at debug.
        if kind == Refusal::Throttled {
            tracing::debug!(
                product_key = pk,
                device_name = dn,
                reason,
                "slowed to its message rate"
            );
        } else {
            tracing::info!(
                product_key = pk,
                device_name = dn,
                kind = kind.as_str(),
                reason,
                "limit reached"
            );
        }
    }

    /// Refusals of every kind since start.
    pub fn total(&self, kind: Refusal) -> u64 {
        self.totals[kind.index()].load(Ordering::Relaxed)
    }

    /// A device's refusals since start.
    pub fn refusals(&self, pk: &str, dn: &str) -> DeviceRefusals {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pk.to_owned(), dn.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// Unvalidated bytes the device stored today (UTC).
    pub fn unvalidated_today(&self, pk: &str, dn: &str, now_ms: i64) -> u64 {
        let u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        if u.day != now_ms.div_euclid(DAY_MS) {
            return 0;
        }
        u.bytes
            .get(&(pk.to_owned(), dn.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Charges `bytes` of unvalidated data to the device's quota of the day; false (and
    /// nothing charged) when they would go over it.
    pub fn charge_unvalidated(&self, pk: &str, dn: &str, bytes: u64, now_ms: i64) -> bool {
        let quota = self.of(pk).unvalidated_bytes_per_day;
        if quota == 0 {
            return true;
        }
        let today = now_ms.div_euclid(DAY_MS);
        let mut u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        if u.day != today {
            u.day = today;
            u.bytes = HashMap::new();
        }
        let used = u.bytes.entry((pk.to_owned(), dn.to_owned())).or_insert(0);
        if used.saturating_add(bytes) > quota {
            return false;
        }
        *used += bytes;
        true
    }

    /// Forgets a deleted device.
    pub fn forget(&self, pk: &str, dn: &str) {
        let key = (pk.to_owned(), dn.to_owned());
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        self.usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bytes
            .remove(&key);
    }

    /// Copies the refusal totals into the registry.
    pub fn export_metrics(&self, r: &ironlink_telemetry::Registry) {
        for kind in Refusal::ALL {
            r.set_counter(
                "ironlink_limit_refusals_total",
                "Device messages and requests refused (or, kind=throttled, slowed) by a per-device limit",
                &[("kind", kind.as_str())],
                self.total(kind),
            );
        }
    }
}

/// A token bucket: `rate` tokens a second up to `burst`. Eight bytes, as every connection
/// holds one: the last refill is kept in milliseconds since the process started, wrapping
/// after 49 days (a device silent that long may be slowed once, never refused).
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f32,
    last_ms: u32,
}

/// Milliseconds since the first call, wrapping.
fn tick(now: Instant) -> u32 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    now.saturating_duration_since(epoch).as_millis() as u32
}

impl Bucket {
    /// A full bucket.
    pub fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: burst.max(1) as f32,
            last_ms: tick(now),
        }
    }

    /// Takes one token, or says how long until one is there. A rate of 0 never limits.
    pub fn take(&mut self, rate: u32, burst: u32, now: Instant) -> Result<(), Duration> {
        if rate == 0 {
            return Ok(());
        }
        let rate = f64::from(rate);
        let now_ms = tick(now);
        let elapsed = f64::from(now_ms.wrapping_sub(self.last_ms)) / 1000.0;
        let tokens = (f64::from(self.tokens) + elapsed * rate).min(f64::from(burst.max(1)));
        self.last_ms = now_ms;
        self.tokens = tokens as f32;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            // One millisecond more: the refill counts whole milliseconds.
            Err(
                Duration::from_secs_f64((1.0 - f64::from(self.tokens)) / rate)
                    + Duration::from_millis(1),
            )
        }
    }
}

/// The size limit of a payload on `topic`: Alink system topics (JSON the platform parses)
/// have their own, custom topics and raw data theirs.
pub fn payload_limit(l: &DeviceLimits, topic: &str) -> usize {
    let raw =
        topic.ends_with("/thing/model/up_raw") || topic.ends_with("/thing/model/down_raw_reply");
    let alink = ["/sys/", "/ext/", "/ota/", "/shadow/"]
        .iter()
        .any(|p| topic.starts_with(p));
    if alink && !raw {
        l.max_alink_payload
    } else {
        l.max_custom_payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_rate_caps_at_burst_and_says_how_long_to_wait() {
        // After the process's first tick, whatever ran before.
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut b = Bucket::full(3, t0);
        assert!((0..3).all(|_| b.take(10, 3, t0).is_ok()));
        let wait = b.take(10, 3, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(101),
            "{wait:?}"
        );
        assert!(b.take(10, 3, t0 + Duration::from_millis(100)).is_ok());
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(10, 3, later).is_ok()).count(), 3);
        assert!(
            (0..1000).all(|_| b.take(0, 3, t0).is_ok()),
            "rate 0 is no limit"
        );
    }

    #[test]
    fn topic_classes_and_product_overrides() {
        let mut c = LimitsConfig::default();
        c.products.insert(
            "pk2".into(),
            crate::config::ProductLimits {
                max_alink_payload: Some(10),
                ..Default::default()
            },
        );
        let l = Limits::new(c);
        let d = l.of("pk1");
        assert_eq!(
            payload_limit(&d, "/sys/pk1/d/thing/event/property/post"),
            d.max_alink_payload
        );
        assert_eq!(
            payload_limit(&d, "/sys/pk1/d/thing/model/up_raw"),
            d.max_custom_payload
        );
        assert_eq!(payload_limit(&d, "/pk1/d/user/x"), d.max_custom_payload);
        assert_eq!(l.of("pk2").max_alink_payload, 10);
        assert_eq!(l.of("pk2").messages_per_second, d.messages_per_second);
    }

    #[test]
    fn daily_quota_charges_until_full_and_resets_the_next_day() {
        let mut c = LimitsConfig::default();
        c.device.unvalidated_bytes_per_day = 100;
        let l = Limits::new(c);
        let day = 20_000 * DAY_MS;
        assert!(l.charge_unvalidated("p", "d", 60, day));
        assert!(!l.charge_unvalidated("p", "d", 60, day + 1));
        assert!(l.charge_unvalidated("p", "e", 60, day + 1), "per device");
        assert_eq!(l.unvalidated_today("p", "d", day + 2), 60);
        assert!(l.charge_unvalidated("p", "d", 60, day + DAY_MS));
        l.refuse("p", "d", Refusal::StorageQuota, "over", day);
        assert_eq!(l.refusals("p", "d").storage_quota, 1);
        assert_eq!(l.total(Refusal::StorageQuota), 1);
        l.forget("p", "d");
        assert_eq!(l.refusals("p", "d").storage_quota, 0);
    }
}
