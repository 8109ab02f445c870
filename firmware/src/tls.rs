//! TLS 1.3 to the broker (feature `tls`): `embedded-tls` over an embassy-net TCP socket, the
//! server's certificate chain verified against the CA the device carries and its name checked.
//! Cipher suite TLS_AES_128_GCM_SHA256 with P-256 key exchange; ECDSA P-256 certificates
//! (what Ironlink's cloud generates, and what rustls offers).
//!
//! embedded-tls needs a receive buffer that holds a whole record (16,640 bytes: servers do not
//! shorten records) and a send buffer. Certificate validity dates are not checked (a device
//! may not know the time before it connects); names and signatures are.

use core::cell::RefCell;
use embassy_net::tcp::TcpSocket;
use embedded_io_async::{ErrorType, Read, Write};
use embedded_tls::pki::CertVerifier;
use embedded_tls::{
    Aes128GcmSha256, Certificate, CryptoProvider, NoClock, TlsConfig, TlsConnection, TlsContext,
    TlsError, TlsVerifier,
};
use rand_core::CryptoRngCore;

/// Receive buffer size embedded-tls needs for a full TLS record.
pub const RECORD_BUFFER: usize = 16_640;

/// A TCP socket shared by the TLS connection (which reads and writes it) and the session
/// (which waits for it to be readable, never at the same time as a read).
pub struct Shared<'s, 'b>(&'s RefCell<TcpSocket<'b>>);

impl core::fmt::Debug for Shared<'_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Shared(TcpSocket)")
    }
}

impl ErrorType for Shared<'_, '_> {
    type Error = embassy_net::tcp::Error;
}

// The RefCell is borrowed across an await only by the one read or write in progress; the
// session is sequential, so no other borrow overlaps it.
#[allow(clippy::await_holding_refcell_ref)]
impl Read for Shared<'_, '_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        self.0.borrow_mut().read(buf).await
    }
}

#[allow(clippy::await_holding_refcell_ref)]
impl Write for Shared<'_, '_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.0.borrow_mut().write(buf).await
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        self.0.borrow_mut().flush().await
    }
}

/// Keys and certificate checks for one connection.
struct Provider<'c, R> {
    rng: R,
    verifier: CertVerifier<'c, Aes128GcmSha256, NoClock, 2048>,
}

impl<R: CryptoRngCore> CryptoProvider for Provider<'_, R> {
    type CipherSuite = Aes128GcmSha256;
    type Signature = &'static [u8];

    fn rng(&mut self) -> impl CryptoRngCore {
        &mut self.rng
    }

    fn verifier(&mut self) -> Result<&mut impl TlsVerifier<Self::CipherSuite>, TlsError> {
        Ok(&mut self.verifier)
    }
}

/// A TLS connection the session can use.
pub struct TlsStream<'s, 'b, 't> {
    tls: TlsConnection<'t, Shared<'s, 'b>, Aes128GcmSha256>,
    socket: &'s RefCell<TcpSocket<'b>>,
    /// Decrypted bytes left over from the last record.
    pending: bool,
}

impl core::fmt::Debug for TlsStream<'_, '_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TlsStream")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl<'s, 'b, 't> TlsStream<'s, 'b, 't> {
    /// Runs the handshake over a connected socket: `ca_der` is the CA certificate (DER) the
    /// server's chain must lead to, `server_name` the name its certificate must carry (also
    /// sent as SNI). `rx` must hold [`RECORD_BUFFER`] bytes.
    pub async fn connect(
        socket: &'s RefCell<TcpSocket<'b>>,
        rx: &'t mut [u8],
        tx: &'t mut [u8],
        ca_der: &[u8],
        server_name: &str,
        rng: impl CryptoRngCore,
    ) -> Result<Self, TlsError> {
        let config = TlsConfig::new().with_server_name(server_name);
        let mut tls = TlsConnection::new(Shared(socket), rx, tx);
        let provider = Provider {
            rng,
            verifier: CertVerifier::new(Certificate::X509(ca_der)),
        };
        tls.open(TlsContext::new(&config, provider)).await?;
        Ok(TlsStream {
            tls,
            socket,
            pending: false,
        })
    }
}

impl ErrorType for TlsStream<'_, '_, '_> {
    type Error = TlsError;
}

impl Read for TlsStream<'_, '_, '_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, TlsError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut record = self.tls.read_buffered().await?;
        let total = record.len();
        let n = record.pop_into(buf);
        self.pending = n < total;
        Ok(n)
    }
}

impl Write for TlsStream<'_, '_, '_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, TlsError> {
        self.tls.write(buf).await
    }

    async fn flush(&mut self) -> Result<(), TlsError> {
        self.tls.flush().await
    }
}

// A shared borrow across the wait: no read or write runs while the session waits.
#[allow(clippy::await_holding_refcell_ref)]
impl crate::session::Transport for TlsStream<'_, '_, '_> {
    async fn readable(&mut self) -> Result<(), TlsError> {
        if !self.pending {
            let socket = self.socket.borrow();
            socket.wait_read_ready().await;
        }
        Ok(())
    }
}
