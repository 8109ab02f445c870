//! Ironlink cloud core: Alink device access (MQTT 3.1.1/5 over TCP and TLS, authentication,
//! per-device ACL), message router, registry, presence, HTTP API and admin CLI.
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod access;
pub mod api;
pub mod apps;
pub mod batch;
pub mod cli;
pub mod config;
pub mod datadir;
pub mod jobs;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod ota;
pub mod presence;
pub mod registry;
pub mod router;
pub mod rules;
pub mod serde_int;
pub mod server;
pub mod storage;
pub mod thing;
pub mod tls;
pub mod tsdb;
pub mod users;
