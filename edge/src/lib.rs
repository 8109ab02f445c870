#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
pub mod poller;
pub mod queue;
pub mod run;
pub mod status;
pub mod uplink;

/// Version of the edge gateway, as reported to the cloud.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
