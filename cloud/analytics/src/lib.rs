//! Ironlink's columnar side, on polars: the Parquet archive tier of the time-series store.
//! Kept in a crate of its own so that only the cloud pays polars' build time (the edge, the
//! firmware SDK and the protocol crates never see it).

pub mod anomaly;
pub mod archive;
pub mod changepoint;
pub mod jobs;
pub mod pv;
