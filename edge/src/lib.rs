#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod coap_server;
pub mod config;
pub mod gb32960;
pub mod jt808;
pub mod layout;
pub mod link;
pub mod lorawan_server;
pub mod lpp;
pub mod ota;
pub mod poller;
pub mod queue;
pub mod run;
pub mod status;
pub mod sub_ota;
pub mod subdevices;
pub mod supervise;
pub mod uplink;
pub mod vehicle;

/// Version of the edge gateway, as reported to the cloud.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Milliseconds since the Unix epoch (0 before it, saturating far after it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
