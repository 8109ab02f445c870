//! TLS for MQTT: configured PEM files, or a generated development CA and server certificate.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is missing.
        what: &'static str,
    },
    /// Certificate generation failed.
    #[error("generating the development certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate or key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Only one of cert_file / key_file was given.
    #[error("tls.cert_file and tls.key_file must be given together")]
    Incomplete,
}

/// Where the certificate came from.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    /// The server certificate chain.
    pub cert_file: PathBuf,
    /// The private key.
    pub key_file: PathBuf,
    /// The generated CA that clients should trust, when the certificate was generated.
    pub generated_ca: Option<PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Resolves the configured files, or generates (once) a development CA and a server
/// certificate for `localhost`, `127.0.0.1` and `::1` under `{data_dir}/tls/`.
pub fn resolve(
    cert: Option<&Path>,
    key: Option<&Path>,
    data_dir: &Path,
) -> Result<TlsMaterial, TlsError> {
    match (cert, key) {
        (Some(c), Some(k)) => Ok(TlsMaterial {
            cert_file: c.to_owned(),
            key_file: k.to_owned(),
            generated_ca: None,
        }),
        (None, None) => generate_dev(&data_dir.join("tls")),
        _ => Err(TlsError::Incomplete),
    }
}

fn generate_dev(dir: &Path) -> Result<TlsMaterial, TlsError> {
    let ca_file = dir.join("ca.pem");
    let cert_file = dir.join("server.pem");
    let key_file = dir.join("server.key");
    if !(ca_file.exists() && cert_file.exists() && key_file.exists()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Ironlink development CA");
        let ca_key = rcgen::KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;
        let mut params = rcgen::CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        std::fs::write(&ca_file, ca.pem()).map_err(io(&ca_file))?;
        std::fs::write(&cert_file, cert.pem()).map_err(io(&cert_file))?;
        write_private(&key_file, key.serialize_pem().as_bytes())?;
    }
    Ok(TlsMaterial {
        cert_file,
        key_file,
        generated_ca: Some(ca_file),
    })
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(data).map_err(io(path))
}

/// The server certificate, replaceable while the server runs (SIGHUP): new handshakes take
/// the new one, established connections keep theirs.
#[derive(Debug)]
pub struct ReloadableCert(std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>);

impl ReloadableCert {
    /// Reads the files again and swaps the certificate in; the old one stays on any error.
    pub fn reload(&self, m: &TlsMaterial) -> Result<(), TlsError> {
        let key = certified_key(m)?;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for ReloadableCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn certified_key(m: &TlsMaterial) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let pem = std::fs::read(&m.cert_file).map_err(io(&m.cert_file))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(io(&m.cert_file))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: m.cert_file.clone(),
            what: "no CERTIFICATE block found",
        });
    }
    let pem = std::fs::read(&m.key_file).map_err(io(&m.key_file))?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(io(&m.key_file))?
        .ok_or_else(|| TlsError::Pem {
            path: m.key_file.clone(),
            what: "no PRIVATE KEY block found",
        })?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)?;
    let ck = rustls::sign::CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|_| TlsError::Pem {
        path: m.key_file.clone(),
        what: "the private key does not belong to the certificate",
    })?;
    Ok(Arc::new(ck))
}

/// Builds a rustls server configuration (ring provider, TLS 1.2 and 1.3) whose certificate
/// can be replaced through the returned handle.
pub fn server_config(
    m: &TlsMaterial,
) -> Result<(Arc<rustls::ServerConfig>, Arc<ReloadableCert>), TlsError> {
    let cert = Arc::new(ReloadableCert(std::sync::RwLock::new(certified_key(m)?)));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(cert.clone());
    Ok((Arc::new(config), cert))
}
