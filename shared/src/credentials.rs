//! Parsing of Alink MQTT credentials.
//!
//! Client id: `{clientId}|securemode=3,signmethod=hmacsha1,timestamp=1700000000000|`. The part
//! before the first `|` is the client id that is signed; between the two `|` come comma-separated
//! `key=value` pairs (empty entries, such as the trailing comma some SDKs send, are ignored).
//! Username: `{deviceName}&{productKey}`.

use crate::sign::{sign_connect_parts, SignMethod, Signature};
use crate::DeviceRef;

/// Why a credential was refused before any signature was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialError {
    /// The client id has an opening `|` but no closing one.
    UnterminatedParams,
    /// A parameter is not `key=value`.
    MalformedParam,
    /// `signmethod` names an algorithm Alink does not define.
    UnknownSignMethod,
    /// `securemode` is not a number.
    BadSecureMode,
    /// The username is not `{deviceName}&{productKey}`.
    BadUsername,
}

impl core::fmt::Display for CredentialError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::UnterminatedParams => {
                "client id has an opening '|' but no closing '|' after its parameters"
            }
            Self::MalformedParam => "client id parameter is not key=value",
            Self::UnknownSignMethod => "signmethod must be hmacsha1, hmacsha256 or hmacmd5",
            Self::BadSecureMode => "securemode must be a number (2 for TLS, 3 for TCP)",
            Self::BadUsername => "username must be {deviceName}&{productKey}",
        })
    }
}

/// Why a signed timestamp is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampError {
    /// The window is on and the credentials carry no timestamp.
    Missing,
    /// Not a number of milliseconds.
    NotANumber,
    /// Further than the window from the server clock.
    Skewed {
        /// Distance from the server clock, ms.
        skew_ms: u64,
    },
}

impl core::fmt::Display for TimestampError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Missing => f.write_str("no signed timestamp, and the server checks them"),
            Self::NotANumber => f.write_str("the signed timestamp is not a number of milliseconds"),
            Self::Skewed { skew_ms } => write!(
                f,
                "the signed timestamp is {skew_ms} ms away from the server clock"
            ),
        }
    }
}

/// Checks a signed `timestamp` (ms since the Unix epoch) against `window` around `now_ms`
/// (Alibaba's 15-minute rule, when a server turns it on): a replayed signature is only good
/// for that long, and one without a timestamp not at all.
pub fn check_timestamp(
    ts: Option<&str>,
    window: core::time::Duration,
    now_ms: i64,
) -> Result<(), TimestampError> {
    let ts = ts.ok_or(TimestampError::Missing)?;
    let sent: i64 = ts.trim().parse().map_err(|_| TimestampError::NotANumber)?;
    let skew_ms = now_ms.abs_diff(sent);
    if u128::from(skew_ms) > window.as_millis() {
        return Err(TimestampError::Skewed { skew_ms });
    }
    Ok(())
}

/// A parsed Alink MQTT client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientId<'a> {
    /// The client id proper: the part before the parameters, which is what gets signed.
    pub client_id: &'a str,
    /// `securemode`: 2 (or -2) for TLS, 3 for plain TCP; `None` when absent.
    pub securemode: Option<i32>,
    /// `signmethod`; Alink's default when absent is hmacmd5.
    pub signmethod: SignMethod,
    /// `timestamp` in milliseconds as sent (it is signed as text).
    pub timestamp: Option<&'a str>,
    /// `authType`: `register` for dynamic registration.
    pub auth_type: Option<&'a str>,
    /// `random`, used by dynamic registration.
    pub random: Option<&'a str>,
    params: &'a str,
}

impl<'a> ClientId<'a> {
    /// Parses an MQTT client id.
    pub fn parse(raw: &'a str) -> Result<Self, CredentialError> {
        let (client_id, params) = match raw.split_once('|') {
            None => (raw, ""),
            Some((cid, rest)) => match rest.split_once('|') {
                Some((params, _tail)) => (cid, params),
                None => return Err(CredentialError::UnterminatedParams),
            },
        };
        let mut out = ClientId {
            client_id,
            securemode: None,
            signmethod: SignMethod::HmacMd5,
            timestamp: None,
            auth_type: None,
            random: None,
            params,
        };
        for pair in params.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or(CredentialError::MalformedParam)?;
            match k {
                "securemode" => {
                    out.securemode = Some(v.parse().map_err(|_| CredentialError::BadSecureMode)?)
                }
                "signmethod" => {
                    out.signmethod =
                        SignMethod::parse(v).ok_or(CredentialError::UnknownSignMethod)?
                }
                "timestamp" => out.timestamp = Some(v),
                "authType" => out.auth_type = Some(v),
                "random" => out.random = Some(v),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Any parameter by name (for example `_v`, `ext`, `instanceId`).
    pub fn param(&self, name: &str) -> Option<&'a str> {
        self.params
            .split(',')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// Parses an Alink username `{deviceName}&{productKey}`.
pub fn parse_username(username: &str) -> Result<DeviceRef<'_>, CredentialError> {
    match username.rsplit_once('&') {
        Some((dn, pk)) if !dn.is_empty() && !pk.is_empty() => Ok(DeviceRef::new(pk, dn)),
        _ => Err(CredentialError::BadUsername),
    }
}

/// Writes the MQTT credentials of a one-device-one-secret Alink device and returns the
/// password (the signature): client id `{pk}.{dn}|securemode={mode},signmethod={m}[,timestamp={ms}]|`
/// into `client_id`, username `{dn}&{pk}` into `username`. No heap: any `fmt::Write` works.
#[allow(clippy::too_many_arguments)]
pub fn write_device_credentials(
    product_key: &str,
    device_name: &str,
    device_secret: &str,
    method: SignMethod,
    securemode: i32,
    timestamp_ms: Option<u64>,
    client_id: &mut impl core::fmt::Write,
    username: &mut impl core::fmt::Write,
) -> Result<Signature, core::fmt::Error> {
    // u64 has at most 20 decimal digits.
    let mut digits = [0u8; 20];
    let ts = timestamp_ms.map(|mut t| {
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (t % 10) as u8;
            t /= 10;
            if t == 0 {
                break;
            }
        }
        i
    });
    let ts_bytes = ts.map(|i| &digits[i..]);
    let sig = sign_connect_parts(
        method,
        device_secret,
        &[product_key.as_bytes(), b".", device_name.as_bytes()],
        device_name,
        product_key,
        ts_bytes,
    );
    write!(
        client_id,
        "{product_key}.{device_name}|securemode={securemode},signmethod={}",
        method.as_str()
    )?;
    if let Some(t) = timestamp_ms {
        write!(client_id, ",timestamp={t}")?;
    }
    client_id.write_char('|')?;
    write!(username, "{device_name}&{product_key}")?;
    Ok(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sdk_client_ids() {
        let c = ClientId::parse(
            "a1b2.dev1|timestamp=2524608000000,_ss=1,_v=sdk-c-4.1.0,securemode=2,signmethod=hmacsha256,ext=3,|",
        )
        .unwrap();
        assert_eq!(c.client_id, "a1b2.dev1");
        assert_eq!(c.securemode, Some(2));
        assert_eq!(c.signmethod, SignMethod::HmacSha256);
        assert_eq!(c.timestamp, Some("2524608000000"));
        assert_eq!(c.param("_v"), Some("sdk-c-4.1.0"));

        let c =
            ClientId::parse("dev|securemode=-2,authType=register,random=123,signmethod=hmacsha1|")
                .unwrap();
        assert_eq!(c.securemode, Some(-2));
        assert_eq!(c.auth_type, Some("register"));
        assert_eq!(c.random, Some("123"));
    }

    #[test]
    fn plain_client_id_defaults_to_hmacmd5() {
        let c = ClientId::parse("plain").unwrap();
        assert_eq!(c.client_id, "plain");
        assert_eq!(c.signmethod, SignMethod::HmacMd5);
        assert_eq!(c.securemode, None);
    }

    #[test]
    fn refuses_malformed_client_ids() {
        let cases = [
            ("x|securemode=3", CredentialError::UnterminatedParams),
            ("x|securemode|", CredentialError::MalformedParam),
            ("x|signmethod=sha1|", CredentialError::UnknownSignMethod),
            ("x|securemode=tls|", CredentialError::BadSecureMode),
        ];
        for (raw, err) in cases {
            assert_eq!(ClientId::parse(raw), Err(err), "{raw}");
        }
    }

    #[test]
    fn written_credentials_verify() {
        let (mut cid, mut user) = (std::string::String::new(), std::string::String::new());
        let sig = write_device_credentials(
            "pk",
            "dn",
            "s3",
            SignMethod::HmacSha1,
            3,
            Some(1_700_000_000_123),
            &mut cid,
            &mut user,
        )
        .unwrap();
        assert_eq!(
            cid,
            "pk.dn|securemode=3,signmethod=hmacsha1,timestamp=1700000000123|"
        );
        assert_eq!(user, "dn&pk");
        let parsed = ClientId::parse(&cid).unwrap();
        let expected = crate::sign::sign_connect(
            SignMethod::HmacSha1,
            "s3",
            parsed.client_id,
            "dn",
            "pk",
            parsed.timestamp,
        );
        assert_eq!(sig.as_str(), expected.as_str());
        let (mut cid0, mut user0) = (std::string::String::new(), std::string::String::new());
        write_device_credentials(
            "pk",
            "dn",
            "s3",
            SignMethod::HmacMd5,
            2,
            Some(0),
            &mut cid0,
            &mut user0,
        )
        .unwrap();
        assert!(cid0.ends_with("timestamp=0|"));
    }

    #[test]
    fn usernames() {
        assert_eq!(parse_username("dn&pk"), Ok(DeviceRef::new("pk", "dn")));
        assert_eq!(parse_username("dn"), Err(CredentialError::BadUsername));
        assert_eq!(parse_username("&pk"), Err(CredentialError::BadUsername));
        assert_eq!(parse_username("dn&"), Err(CredentialError::BadUsername));
    }

    #[test]
    fn timestamps_are_checked_against_the_window() {
        let now = 1_800_000_000_000;
        let window = core::time::Duration::from_secs(15 * 60);
        assert_eq!(
            check_timestamp(None, window, now),
            Err(TimestampError::Missing)
        );
        assert_eq!(
            check_timestamp(Some("x"), window, now),
            Err(TimestampError::NotANumber)
        );
        assert!(check_timestamp(Some("1800000000000"), window, now).is_ok());
        assert!(check_timestamp(Some("1799999100000"), window, now).is_ok());
        assert_eq!(
            check_timestamp(Some("1000000000000"), window, now),
            Err(TimestampError::Skewed {
                skew_ms: 800_000_000_000
            })
        );
    }
}
