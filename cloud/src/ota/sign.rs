//! `ironlink-cloud ota keygen|sign`: ed25519 keys kept by the operator, and signatures of
//! firmware images computed in one streaming pass (an image is never held whole in memory).

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use md5::Md5;
use sha2::{Digest, Sha256, Sha512};
use std::io::Read;
use std::path::Path;

/// What an upgrade notice carries about an image, and the key that checks it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Signed {
    /// Image size, bytes.
    pub size: u64,
    /// SHA-256, hex (Alibaba's `sign` with `signMethod` SHA256).
    pub sha256: String,
    /// MD5, hex (Alibaba's `md5`, and `sign` with `signMethod` Md5).
    pub md5: String,
    /// ed25519 over the SHA-512 digest of the image, hex (the notice's `ed25519`).
    pub ed25519: String,
    /// The public key that verifies it, hex (built into devices).
    pub public_key: String,
}

/// Why a key or an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The key file is not 64 hex digits.
    #[error("{0}: not an ed25519 key file (64 hex digits, as `ota keygen` writes)")]
    BadKey(String),
    /// `keygen` would overwrite a key.
    #[error("{0} exists: a signing key is not overwritten (remove it first if you mean it)")]
    Exists(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SignError + '_ {
    move |source| SignError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a new signing key (its 32-byte seed as hex, readable by its owner only) and returns
/// the public key, hex. Never overwrites a file.
pub fn keygen(path: &Path) -> Result<String, SignError> {
    use std::io::Write;
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    let key = SigningKey::from_bytes(&seed);
    // create_new: a file that appears between a check and the write is never truncated.
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            SignError::Exists(path.display().to_string())
        } else {
            io(path)(e)
        }
    })?;
    f.write_all(format!("{}\n", hex::encode(seed)).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(path))?;
    Ok(hex::encode(key.verifying_key().as_bytes()))
}

/// Reads a key file written by [`keygen`].
pub fn read_key(path: &Path) -> Result<SigningKey, SignError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed)
        .map_err(|_| SignError::BadKey(path.display().to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Signs an image file, reading it once in 64 KiB pieces.
pub fn sign_file(key: &SigningKey, image: &Path) -> Result<Signed, SignError> {
    let mut f = std::fs::File::open(image).map_err(io(image))?;
    sign_reader(key, &mut f).map_err(io(image))
}

/// SHA-256, SHA-512 and MD5 of an image, computed as its pieces pass.
#[derive(Debug, Clone, Default)]
pub struct Digests {
    s256: Sha256,
    s512: Sha512,
    m5: Md5,
    size: u64,
}

/// What [`Digests`] computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digested {
    /// Bytes seen.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// MD5, hex.
    pub md5: String,
    /// SHA-512 (what the ed25519 signature covers).
    pub sha512: [u8; 64],
}

impl Digests {
    /// Takes the next piece.
    pub fn update(&mut self, piece: &[u8]) {
        self.s256.update(piece);
        self.s512.update(piece);
        self.m5.update(piece);
        self.size += piece.len() as u64;
    }

    /// The digests of everything seen.
    pub fn finish(self) -> Digested {
        Digested {
            size: self.size,
            sha256: hex::encode(self.s256.finalize()),
            md5: hex::encode(self.m5.finalize()),
            sha512: self.s512.finalize().into(),
        }
    }
}

/// Signs the bytes `r` yields.
pub fn sign_reader(key: &SigningKey, r: &mut impl Read) -> std::io::Result<Signed> {
    let mut d = Digests::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        d.update(&buf[..n]);
    }
    let d = d.finish();
    let signature = key.sign(&d.sha512);
    Ok(Signed {
        size: d.size,
        sha256: d.sha256,
        md5: d.md5,
        ed25519: hex::encode(signature.to_bytes()),
        public_key: hex::encode(key.verifying_key().as_bytes()),
    })
}

/// Checks a signature made by [`sign_reader`] against the image's SHA-512.
pub fn verify(public_key: &VerifyingKey, image_sha512: &[u8; 64], ed25519_hex: &str) -> bool {
    let mut sig = [0u8; 64];
    hex::decode_to_slice(ed25519_hex, &mut sig).is_ok()
        && public_key
            .verify_strict(image_sha512, &ed25519_dalek::Signature::from_bytes(&sig))
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_written_once_and_signatures_verify_over_sha512() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ota.key");
        let public = keygen(&path).unwrap();
        assert!(matches!(keygen(&path), Err(SignError::Exists(_))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the key is readable by its owner only");
        }
        let key = read_key(&path).unwrap();
        assert_eq!(hex::encode(key.verifying_key().as_bytes()), public);
        let image: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let s = sign_reader(&key, &mut image.as_slice()).unwrap();
        assert_eq!(s.size, 200_000);
        assert_eq!(s.sha256, hex::encode(Sha256::digest(&image)));
        let digest: [u8; 64] = Sha512::digest(&image).into();
        assert!(verify(&key.verifying_key(), &digest, &s.ed25519));
        let mut other = image.clone();
        other[7] ^= 1;
        let other: [u8; 64] = Sha512::digest(&other).into();
        assert!(!verify(&key.verifying_key(), &other, &s.ed25519));
        std::fs::write(dir.path().join("bad.key"), "zz").unwrap();
        assert!(matches!(
            read_key(&dir.path().join("bad.key")),
            Err(SignError::BadKey(_))
        ));
    }
}
