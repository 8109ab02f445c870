//! Parsing of Alink MQTT credentials.
//!
//! Client id: `{clientId}|securemode=3,signmethod=hmacsha1,timestamp=1700000000000|`. The part
//! before the first `|` is the client id that is signed; between the two `|` come comma-separated
//! `key=value` pairs (empty entries, such as the trailing comma some SDKs send, are ignored).
//! Username: `{deviceName}&{productKey}`.

use crate::sign::SignMethod;
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
    fn usernames() {
        assert_eq!(parse_username("dn&pk"), Ok(DeviceRef::new("pk", "dn")));
        assert_eq!(parse_username("dn"), Err(CredentialError::BadUsername));
        assert_eq!(parse_username("&pk"), Err(CredentialError::BadUsername));
        assert_eq!(parse_username("dn&"), Err(CredentialError::BadUsername));
    }
}
