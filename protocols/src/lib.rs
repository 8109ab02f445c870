#![doc = include_str!("../README.md")]
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "alloc")]
pub mod coap;
#[cfg(feature = "alloc")]
pub mod gb32960;
#[cfg(feature = "alloc")]
pub mod jt808;
#[cfg(feature = "std")]
pub mod lorawan;
pub mod modbus;
pub mod mqtt;
#[cfg(feature = "std")]
pub mod semtech;
