#![doc = include_str!("../README.md")]
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

#[macro_use]
mod fmt;
pub mod alink;
pub mod device;
pub mod json;
pub mod mqtt;
#[cfg(feature = "ota")]
pub mod ota;
#[cfg(any(test, feature = "selftest"))]
pub mod selftest;
#[cfg(feature = "embassy")]
pub mod session;
#[cfg(feature = "tls")]
pub mod tls;

use heapless::String;
use ironlink_shared::credentials::write_device_credentials;
use ironlink_shared::sign::SignMethod;

/// How the device reaches the broker, which Alink encodes as `securemode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// TLS (`securemode=2`).
    Tls,
    /// Plain TCP (`securemode=3`).
    Tcp,
}

/// Errors building credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A caller-provided buffer (the const generic `N`) is too small.
    BufferTooSmall,
}

/// MQTT CONNECT credentials of an Alink device, each at most `N` bytes.
#[derive(Debug, Clone)]
pub struct Credentials<const N: usize> {
    /// MQTT client id with Alink parameters.
    pub client_id: String<N>,
    /// `{deviceName}&{productKey}`.
    pub username: String<N>,
    /// Hex HMAC signature.
    pub password: String<N>,
}

impl<const N: usize> Credentials<N> {
    /// Builds credentials for a one-device-one-secret device. `timestamp_ms` is signed when given.
    pub fn new(
        product_key: &str,
        device_name: &str,
        device_secret: &str,
        method: SignMethod,
        transport: Transport,
        timestamp_ms: Option<u64>,
    ) -> Result<Self, Error> {
        let mode = match transport {
            Transport::Tls => 2,
            Transport::Tcp => 3,
        };
        let mut client_id: String<N> = String::new();
        let mut username: String<N> = String::new();
        let sig = write_device_credentials(
            product_key,
            device_name,
            device_secret,
            method,
            mode,
            timestamp_ms,
            &mut client_id,
            &mut username,
        )
        .map_err(|_| Error::BufferTooSmall)?;
        let mut password: String<N> = String::new();
        password
            .push_str(sig.as_str())
            .map_err(|_| Error::BufferTooSmall)?;
        Ok(Self {
            client_id,
            username,
            password,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironlink_shared::credentials::{parse_username, ClientId};
    use ironlink_shared::sign::sign_connect;

    #[test]
    fn credentials_verify_with_the_cloud_parser() {
        let c = Credentials::<128>::new(
            "pk",
            "dn",
            "secret",
            SignMethod::HmacSha256,
            Transport::Tcp,
            Some(1_700_000_000_000),
        )
        .unwrap();
        let parsed = ClientId::parse(&c.client_id).unwrap();
        assert_eq!(parsed.securemode, Some(3));
        let dev = parse_username(&c.username).unwrap();
        let expected = sign_connect(
            parsed.signmethod,
            "secret",
            parsed.client_id,
            dev.device_name,
            dev.product_key,
            parsed.timestamp,
        );
        assert!(expected.matches(&c.password));
    }

    #[test]
    fn small_buffer_is_an_error() {
        let r = Credentials::<8>::new(
            "pk",
            "device",
            "s",
            SignMethod::HmacSha1,
            Transport::Tls,
            None,
        );
        assert_eq!(r.err(), Some(Error::BufferTooSmall));
    }
}
