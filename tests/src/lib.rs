//! End-to-end tests across processes live in `tests/`; the process and device helpers they
//! use come from `ironlink-sim`, which the simulator and benchmarks share.

pub use ironlink_sim::cloud_process::*;
