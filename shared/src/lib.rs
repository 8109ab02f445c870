#![doc = include_str!("../README.md")]
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod acl;
pub mod alink;
pub mod credentials;
pub mod sign;
pub mod spec;
pub mod time;
#[cfg(feature = "alloc")]
pub mod tsl;

/// An Alink device identity: product key plus device name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceRef<'a> {
    /// Product key.
    pub product_key: &'a str,
    /// Device name, unique inside its product.
    pub device_name: &'a str,
}

impl<'a> DeviceRef<'a> {
    /// A device identity from its product key and device name.
    pub const fn new(product_key: &'a str, device_name: &'a str) -> Self {
        Self {
            product_key,
            device_name,
        }
    }
}

/// Whether `name` is a device name Alibaba's rules allow (and Ironlink's cloud registers):
/// 4 to 32 characters of ASCII letters, digits and `-_@.:`.
pub fn valid_device_name(name: &str) -> bool {
    (4..=32).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_@.:".contains(c))
}

/// What [`valid_device_name`] asks for, for error messages.
pub const DEVICE_NAME_RULE: &str = "4 to 32 characters of letters, digits and - _ @ . :";

/// Topic on which the cloud publishes a device's online/offline lifecycle messages
/// (the layout Alibaba uses for its server-side subscription).
pub const STATUS_TOPIC_PREFIX: &str = "/as/mqtt/status/";
