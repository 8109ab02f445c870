#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod analytics_bench;
pub mod apps_bench;
pub mod bench;
pub mod cloud_process;
pub mod coap_bench;
pub mod downlink;
pub mod edge_bench;
pub mod edge_process;
pub mod fanout;
pub mod gateway;
pub mod ingest;
pub mod lora_bench;
pub mod modbus_slave;
pub mod ota_bench;
pub mod quickstart;
pub mod report;
pub mod scenario;
pub mod tsdb_bench;
pub mod vehicles;
pub mod vehicles_bench;
