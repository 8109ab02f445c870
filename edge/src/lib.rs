#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

/// Version of the edge gateway, as reported to the cloud.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
