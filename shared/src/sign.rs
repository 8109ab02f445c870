//! Alink HMAC signing.
//!
//! An Alink password is the hex HMAC, keyed with the device secret, of the connect parameters
//! sorted by name and concatenated as `name` + `value` with no separators:
//! `clientId{cid}deviceName{dn}productKey{pk}timestamp{ms}` (timestamp optional).
//! Dynamic registration signs `deviceName{dn}productKey{pk}random{random}` with the product secret.

use hmac::{Hmac, Mac};

/// An HMAC algorithm named by Alink's `signmethod` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignMethod {
    /// `hmacsha1`
    HmacSha1,
    /// `hmacsha256`
    HmacSha256,
    /// `hmacmd5`
    HmacMd5,
}

impl SignMethod {
    /// Parses Alink's `signmethod` value, case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        if s.eq_ignore_ascii_case("hmacsha1") {
            Some(Self::HmacSha1)
        } else if s.eq_ignore_ascii_case("hmacsha256") {
            Some(Self::HmacSha256)
        } else if s.eq_ignore_ascii_case("hmacmd5") {
            Some(Self::HmacMd5)
        } else {
            None
        }
    }

    /// The `signmethod` value for this algorithm.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::HmacSha1 => "hmacsha1",
            Self::HmacSha256 => "hmacsha256",
            Self::HmacMd5 => "hmacmd5",
        }
    }
}

/// A hex signature held inline (at most 64 hex digits, for SHA-256).
#[derive(Clone, Copy)]
pub struct Signature {
    buf: [u8; 64],
    len: usize,
}

impl core::fmt::Debug for Signature {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Signature {
    fn from_digest(digest: &[u8]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 64];
        let mut len = 0;
        for b in digest.iter().take(32) {
            buf[len] = HEX[usize::from(b >> 4)];
            buf[len + 1] = HEX[usize::from(b & 0x0f)];
            len += 2;
        }
        Self { buf, len }
    }

    /// Lower-case hex digits.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written into `buf`.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    /// Compares with a signature a client sent, ignoring hex case, in time independent of
    /// where the first difference is.
    pub fn matches(&self, candidate: &str) -> bool {
        let c = candidate.as_bytes();
        if c.len() != self.len {
            return false;
        }
        let mut diff = 0u8;
        for (a, b) in self.buf[..self.len].iter().zip(c) {
            diff |= a ^ b.to_ascii_lowercase();
        }
        diff == 0
    }
}

/// Equality of two byte strings in time that does not depend on where they differ (for
/// secrets: tokens, MACs, key hashes). Different lengths are unequal at once.
pub fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// HMAC of the concatenation of `parts` (for signatures over sorted parameters, such as
/// Alibaba's CoAP `/auth`).
pub fn sign_parts(method: SignMethod, key: &[u8], parts: &[&[u8]]) -> Signature {
    hmac_parts(method, key, parts)
}

fn hmac_parts(method: SignMethod, key: &[u8], parts: &[&[u8]]) -> Signature {
    macro_rules! run {
        ($d:ty) => {{
            // HMAC accepts keys of any length, so new_from_slice cannot fail.
            match Hmac::<$d>::new_from_slice(key) {
                Ok(mut mac) => {
                    for p in parts {
                        mac.update(p);
                    }
                    Signature::from_digest(&mac.finalize().into_bytes())
                }
                Err(_) => Signature {
                    buf: [0; 64],
                    len: 0,
                },
            }
        }};
    }
    match method {
        SignMethod::HmacSha1 => run!(sha1::Sha1),
        SignMethod::HmacSha256 => run!(sha2::Sha256),
        SignMethod::HmacMd5 => run!(md5::Md5),
    }
}

/// Signs MQTT connect credentials: `clientId{cid}deviceName{dn}productKey{pk}[timestamp{ts}]`.
pub fn sign_connect(
    method: SignMethod,
    device_secret: &str,
    client_id: &str,
    device_name: &str,
    product_key: &str,
    timestamp: Option<&str>,
) -> Signature {
    sign_connect_parts(
        method,
        device_secret,
        &[client_id.as_bytes()],
        device_name,
        product_key,
        timestamp.map(str::as_bytes),
    )
}

/// [`sign_connect`] with the client id given in pieces, so that callers without a heap need
/// not assemble it first.
pub(crate) fn sign_connect_parts(
    method: SignMethod,
    device_secret: &str,
    client_id: &[&[u8]],
    device_name: &str,
    product_key: &str,
    timestamp: Option<&[u8]>,
) -> Signature {
    let ts_key: &[u8] = if timestamp.is_some() {
        b"timestamp"
    } else {
        b""
    };
    let mut parts: [&[u8]; 12] = [b""; 12];
    parts[0] = b"clientId";
    let n = client_id.len().min(4);
    parts[1..1 + n].copy_from_slice(&client_id[..n]);
    parts[5] = b"deviceName";
    parts[6] = device_name.as_bytes();
    parts[7] = b"productKey";
    parts[8] = product_key.as_bytes();
    parts[9] = ts_key;
    parts[10] = timestamp.unwrap_or(b"");
    hmac_parts(method, device_secret.as_bytes(), &parts)
}

/// Signs a dynamic registration request: `deviceName{dn}productKey{pk}random{random}`,
/// keyed with the product secret.
pub fn sign_register(
    method: SignMethod,
    product_secret: &str,
    device_name: &str,
    product_key: &str,
    random: &str,
) -> Signature {
    hmac_parts(
        method,
        product_secret.as_bytes(),
        &[
            b"deviceName",
            device_name.as_bytes(),
            b"productKey",
            product_key.as_bytes(),
            b"random",
            random.as_bytes(),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values computed with Python's `hmac` module, independently of this code.
    #[test]
    fn known_vectors() {
        let connect = [
            (
                SignMethod::HmacSha1,
                "6de7269c9d31b4a9fae7d3cabe08c997b526525a",
            ),
            (
                SignMethod::HmacSha256,
                "b82ddb74cc7da716bb73b9794914a3b95b05898a601c3c5f3dd3b3cc0dad5e65",
            ),
            (SignMethod::HmacMd5, "7f94adcd03b18d63e446414d3b3cc618"),
        ];
        for (m, expected) in connect {
            let s = sign_connect(m, "secret", "c1", "dn", "pk", Some("1700000000000"));
            assert_eq!(s.as_str(), expected, "{m:?}");
        }
        let register = [
            (
                SignMethod::HmacSha1,
                "89d2f8fe3b17f6b3f55853767232dc36013eb2e3",
            ),
            (
                SignMethod::HmacSha256,
                "f0e819ac5567ef14dead935f07aa92bc166e051cd515e35258e31698cb389769",
            ),
            (SignMethod::HmacMd5, "ac1c1a0403b06b0324b98bdf24d57ba1"),
        ];
        for (m, expected) in register {
            let s = sign_register(m, "psecret", "dn", "pk", "123");
            assert_eq!(s.as_str(), expected, "{m:?}");
        }
    }

    #[test]
    fn lengths_per_method() {
        for (m, n) in [
            (SignMethod::HmacSha1, 40),
            (SignMethod::HmacSha256, 64),
            (SignMethod::HmacMd5, 32),
        ] {
            assert_eq!(sign_connect(m, "s", "c", "d", "p", None).as_str().len(), n);
        }
    }

    #[test]
    fn matches_ignores_case_and_rejects_other_lengths() {
        let s = sign_connect(SignMethod::HmacSha256, "s", "c", "d", "p", None);
        let upper: std::string::String = s.as_str().to_ascii_uppercase();
        assert!(s.matches(s.as_str()));
        assert!(s.matches(&upper));
        assert!(!s.matches(&s.as_str()[1..]));
        assert!(!s.matches(""));
    }

    #[test]
    fn constant_eq_compares_whole_strings() {
        assert!(constant_eq(b"abc", b"abc"));
        assert!(!constant_eq(b"abc", b"abd"));
        assert!(!constant_eq(b"abc", b"ab"));
        assert!(constant_eq(b"", b""));
    }

    #[test]
    fn timestamp_changes_signature() {
        let a = sign_connect(SignMethod::HmacSha1, "s", "c", "d", "p", None);
        let b = sign_connect(SignMethod::HmacSha1, "s", "c", "d", "p", Some("1"));
        assert_ne!(a.as_str(), b.as_str());
    }

    #[test]
    fn method_names_round_trip() {
        for m in [
            SignMethod::HmacSha1,
            SignMethod::HmacSha256,
            SignMethod::HmacMd5,
        ] {
            assert_eq!(SignMethod::parse(m.as_str()), Some(m));
        }
        assert_eq!(SignMethod::parse("HMACSHA1"), Some(SignMethod::HmacSha1));
        assert_eq!(SignMethod::parse("sha1"), None);
    }
}
