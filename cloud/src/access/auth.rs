//! Alink authentication of an MQTT CONNECT.

use crate::storage::{Db, StorageError};
use ironlink_shared::credentials::{
    check_timestamp, parse_username, ClientId, CredentialError, TimestampError,
};
use ironlink_shared::sign::{sign_connect, sign_register};
use std::time::Duration;

/// What a successful CONNECT is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authenticated {
    /// A device session.
    Device {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// True when the device has never been online: this connect activates it.
        first_connect: bool,
    },
    /// A dynamic registration: answer with the device secret, then close.
    Register {
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
        /// The device's secret.
        device_secret: String,
    },
}

/// Why a CONNECT was refused. `Display` is the reason logged.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No username/password in CONNECT.
    #[error("CONNECT carries no username and password")]
    MissingLogin,
    /// Credentials could not be parsed.
    #[error("{0}")]
    Credentials(CredentialError),
    /// No such device (or product).
    #[error("unknown device `{0}`")]
    UnknownDevice(String),
    /// The device is disabled.
    #[error("device `{0}` is disabled")]
    Disabled(String),
    /// The password is not the expected signature.
    #[error("signature mismatch for device `{0}`")]
    BadSignature(String),
    /// The signed timestamp is outside the window.
    #[error("timestamp {ts} is {skew:?} away from the server clock (window {window:?})")]
    StaleTimestamp {
        /// As sent.
        ts: String,
        /// Distance from now.
        skew: Duration,
        /// Configured window.
        window: Duration,
    },
    /// The timestamp window is on and the CONNECT carries no timestamp.
    #[error(
        "no signed timestamp in the client id, and the server checks them (timestamp window {0:?})"
    )]
    MissingTimestamp(Duration),
    /// Dynamic registration of a device that has already been online: its secret is not
    /// handed out again (Alibaba's pre-registration mode).
    #[error("device `{0}` is already activated: dynamic registration hands out a secret once")]
    AlreadyActivated(String),
    /// `securemode=2` (TLS) asked for over plain TCP, or registration over TCP.
    #[error("securemode {0} requires the TLS port")]
    TlsRequired(i32),
    /// Dynamic registration is off for the product.
    #[error("product `{0}` does not allow dynamic registration")]
    RegistrationDisabled(String),
    /// Unsupported `authType`.
    #[error("authType `{0}` is not supported (use register)")]
    UnsupportedAuthType(String),
    /// Storage failed: the server, not the client, is at fault.
    #[error("registry unavailable: {0}")]
    Storage(#[from] StorageError),
}

impl AuthError {
    /// True when the refusal is the server's fault (answer "server unavailable").
    pub fn is_server_side(&self) -> bool {
        matches!(self, Self::Storage(_))
    }

    /// True when the client is not allowed at all (answer "not authorized" / banned).
    pub fn is_not_authorized(&self) -> bool {
        matches!(
            self,
            Self::Disabled(_)
                | Self::RegistrationDisabled(_)
                | Self::TlsRequired(_)
                | Self::AlreadyActivated(_)
        )
    }
}

/// Checks an MQTT CONNECT's client id, username and password.
pub async fn authenticate(
    db: &Db,
    client_id: &str,
    login: Option<(&str, &str)>,
    over_tls: bool,
    timestamp_window: Option<Duration>,
    now_ms: i64,
) -> Result<Authenticated, AuthError> {
    let (username, password) = login.ok_or(AuthError::MissingLogin)?;
    let cid = ClientId::parse(client_id).map_err(AuthError::Credentials)?;
    let dev = parse_username(username).map_err(AuthError::Credentials)?;
    let id = format!("{}/{}", dev.product_key, dev.device_name);
    if let Some(mode) = cid.securemode {
        if (mode == 2 || mode == -2) && !over_tls {
            return Err(AuthError::TlsRequired(mode));
        }
    }
    if let Some(auth_type) = cid.auth_type {
        if auth_type != "register" {
            return Err(AuthError::UnsupportedAuthType(auth_type.to_owned()));
        }
        if !over_tls {
            return Err(AuthError::TlsRequired(cid.securemode.unwrap_or(3)));
        }
        let product = db
            .get_product(dev.product_key)
            .await?
            .ok_or_else(|| AuthError::UnknownDevice(id.clone()))?;
        let random = cid.random.unwrap_or("");
        let expected = sign_register(
            cid.signmethod,
            &product.product_secret,
            dev.device_name,
            dev.product_key,
            random,
        );
        if !expected.matches(password) {
            return Err(AuthError::BadSignature(id));
        }
        if product.dynamic_register == 0 {
            return Err(AuthError::RegistrationDisabled(product.product_key));
        }
        let device = db
            .get_device(dev.product_key, dev.device_name)
            .await?
            .ok_or(AuthError::UnknownDevice(id.clone()))?;
        if device.enabled == 0 {
            return Err(AuthError::Disabled(id));
        }
        if device.first_online_at.is_some() {
            return Err(AuthError::AlreadyActivated(id));
        }
        return Ok(Authenticated::Register {
            product_key: device.product_key,
            device_name: device.device_name,
            device_secret: device.device_secret,
        });
    }
    let device = db
        .get_device(dev.product_key, dev.device_name)
        .await?
        .ok_or_else(|| AuthError::UnknownDevice(id.clone()))?;
    let expected = sign_connect(
        cid.signmethod,
        &device.device_secret,
        cid.client_id,
        dev.device_name,
        dev.product_key,
        cid.timestamp,
    );
    if !expected.matches(password) {
        return Err(AuthError::BadSignature(id));
    }
    if device.enabled == 0 {
        return Err(AuthError::Disabled(id));
    }
    if let Some(window) = timestamp_window {
        match check_timestamp(cid.timestamp, window, now_ms) {
            Ok(()) => {}
            Err(TimestampError::Missing) => return Err(AuthError::MissingTimestamp(window)),
            Err(e) => {
                let skew = match e {
                    TimestampError::Skewed { skew_ms } => Duration::from_millis(skew_ms),
                    _ => Duration::MAX,
                };
                return Err(AuthError::StaleTimestamp {
                    ts: cid.timestamp.unwrap_or_default().to_owned(),
                    skew,
                    window,
                });
            }
        }
    }
    Ok(Authenticated::Device {
        first_connect: device.first_online_at.is_none(),
        product_key: device.product_key,
        device_name: device.device_name,
    })
}
