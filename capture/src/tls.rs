//! TLS for both PostgreSQL connections, following libpq's `sslmode`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, without verification.
    Prefer,
    /// TLS required, certificate not verified.
    Require,
    /// TLS required, certificate chain verified against the root certificates.
    VerifyCa,
    /// TLS required, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    /// True when a server without TLS must be refused.
    pub fn requires_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Prefer)
    }
}

/// A TLS set-up that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The root certificate file cannot be read or holds no certificate.
    #[error("PGSSLROOTCERT {path}: {reason}")]
    RootCert {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The rustls client configuration for `mode`, trusting `root_cert` (PEM) when given, else the
/// system's roots. `None` for `disable`.
pub fn client_config(
    mode: SslMode,
    root_cert: Option<&str>,
) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = Arc::new(root_store(root_cert)?);
            let webpki =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            if mode == SslMode::VerifyFull {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(Some(Arc::new(config)))
}

fn root_store(root_cert: Option<&str>) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let err = |reason: String| TlsError::RootCert {
                path: path.to_owned(),
                reason,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| err(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| err(e.to_string()))?;
            if certs.is_empty() {
                return Err(err("no PEM certificate in the file".into()));
            }
            for cert in certs {
                store.add(cert).map_err(|e| err(e.to_string()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A malformed system certificate is skipped, as libpq's OpenSSL does.
                let _ = store.add(cert);
            }
        }
    }
    Ok(store)
}

/// `require`/`prefer`: encryption without authentication of the server, as libpq does.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The `tls-server-end-point` channel binding data (RFC 5929) of a server certificate (DER):
/// its hash by its signature's hash algorithm, SHA-256 for MD5 and SHA-1, as PostgreSQL
/// computes it. None for a signature whose hash PostgreSQL cannot name either (RSA-PSS, EdDSA):
/// the server then offers no `SCRAM-SHA-256-PLUS`.
pub fn server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let algorithm = match cert.signature_algorithm.oid.to_string().as_str() {
        // md5WithRSA, sha1WithRSA, sha256WithRSA, dsa-with-sha1/sha256, ecdsa-with-SHA1/SHA256
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10040.4.3"
        | "2.16.840.1.101.3.4.3.2"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2" => &ring::digest::SHA256,
        // sha384WithRSA, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &ring::digest::SHA384,
        // sha512WithRSA, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &ring::digest::SHA512,
        _ => return None,
    };
    Some(ring::digest::digest(algorithm, der).as_ref().to_vec())
}

/// What a server asked for that the capture will not send over a connection that is not
/// encrypted, unless `CDC_ALLOW_UNENCRYPTED_PASSWORD` says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the server asks for a {0} password over a connection that is not encrypted, where anyone on the path could read or replay it: use TLS (PGSSLMODE=verify-full) or SCRAM (password_encryption = scram-sha-256 and scram-sha-256 in pg_hba.conf); CDC_ALLOW_UNENCRYPTED_PASSWORD=true sends it anyway")]
pub struct UnencryptedPassword(pub &'static str);

/// The password kind of an authentication request (its code) that must not go unencrypted.
pub fn unsafe_password(code: u32) -> Option<UnencryptedPassword> {
    match code {
        3 => Some(UnencryptedPassword("cleartext")),
        5 => Some(UnencryptedPassword("MD5")),
        _ => None,
    }
}

/// A plaintext PostgreSQL connection's server side, watched until authentication ends: a
/// request for a cleartext or MD5 password fails the read (so the client never answers it).
/// With `ssl_request`, the client asked for TLS first: a yes ends the watch (what follows is
/// encrypted), a no leaves the connection plaintext.
pub struct PasswordGuard<S> {
    inner: S,
    state: GuardState,
    header: Vec<u8>,
    skip: usize,
}

enum GuardState {
    SslAnswer,
    Messages,
    Done,
}

impl<S> PasswordGuard<S> {
    /// Watches `inner`; `ssl_request` when the client starts with an SSLRequest.
    pub fn new(inner: S, ssl_request: bool) -> Self {
        PasswordGuard {
            inner,
            state: if ssl_request {
                GuardState::SslAnswer
            } else {
                GuardState::Messages
            },
            header: Vec::with_capacity(9),
            skip: 0,
        }
    }

    /// A guard that lets every password through (the setting allows it).
    pub fn disarmed(mut self) -> Self {
        self.state = GuardState::Done;
        self
    }

    /// Follows the server's bytes; an error when they ask for a password it must not send.
    fn watch(&mut self, mut bytes: &[u8]) -> Result<(), UnencryptedPassword> {
        while !bytes.is_empty() {
            match self.state {
                GuardState::Done => return Ok(()),
                GuardState::SslAnswer => {
                    self.state = if bytes[0] == b'S' {
                        GuardState::Done
                    } else {
                        GuardState::Messages
                    };
                    bytes = &bytes[1..];
                }
                GuardState::Messages if self.skip > 0 => {
                    let n = self.skip.min(bytes.len());
                    self.skip -= n;
                    bytes = &bytes[n..];
                }
                GuardState::Messages => {
                    let want = if self.header.first() == Some(&b'R') {
                        9
                    } else {
                        5
                    };
                    let n = (want - self.header.len()).min(bytes.len());
                    self.header.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if self.header.len() < want {
                        continue;
                    }
                    let len = u32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]) as usize;
                    if self.header[0] == b'R' && want == 5 {
                        continue;
                    }
                    let mut read = 4;
                    if self.header[0] == b'R' {
                        let code = u32::from_be_bytes([
                            self.header[5],
                            self.header[6],
                            self.header[7],
                            self.header[8],
                        ]);
                        if let Some(refused) = unsafe_password(code) {
                            return Err(refused);
                        }
                        if code == 0 {
                            self.state = GuardState::Done;
                        }
                        read = 8;
                    }
                    self.skip = len.saturating_sub(read);
                    self.header.clear();
                }
            }
        }
        Ok(())
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for PasswordGuard<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled {
            if let Err(refused) = this.watch(&buf.filled()[before..]) {
                buf.set_filled(before);
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    refused,
                )));
            }
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for PasswordGuard<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// tokio-postgres's TLS over rustls, with the `tls-server-end-point` channel binding, so SCRAM
/// is `SCRAM-SHA-256-PLUS` when the server offers it.
#[derive(Clone)]
pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    host: String,
}

impl RustlsConnect {
    /// A connector for the server `host` (its name, or address).
    pub fn new(config: Arc<rustls::ClientConfig>, host: &str) -> Self {
        RustlsConnect {
            config,
            host: host.to_owned(),
        }
    }
}

/// A TLS stream for tokio-postgres.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<RustlsStream<S>>> + Send>,
    >;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = ServerName::try_from(self.host)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await?;
            Ok(RustlsStream(tls))
        })
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio_postgres::tls::TlsStream
    for RustlsStream<S>
{
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        let (_, session) = self.0.get_ref();
        match session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| server_end_point(cert))
        {
            Some(end_point) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(end_point),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead
    for RustlsStream<S>
{
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for RustlsStream<S>
{
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&(8 + extra.len() as u32).to_be_bytes());
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(extra);
        m
    }

    /// Feeds `bytes` to a guard `step` bytes at a time (as reads split them).
    fn feed(
        guard: &mut PasswordGuard<()>,
        bytes: &[u8],
        step: usize,
    ) -> Result<(), UnencryptedPassword> {
        bytes.chunks(step).try_for_each(|c| guard.watch(c))
    }

    #[test]
    fn the_guard_refuses_cleartext_and_md5_requests_however_the_bytes_are_split() {
        for step in [1, 2, 3, 5, 64] {
            // A notice first, then a cleartext request.
            let mut bytes = vec![b'N', 0, 0, 0, 6, b'x', 0];
            bytes.extend(auth(3, &[]));
            let mut guard = PasswordGuard::new((), false);
            assert_eq!(
                feed(&mut guard, &bytes, step),
                Err(UnencryptedPassword("cleartext"))
            );
            // Plaintext after the server declined TLS, MD5 with its salt.
            let mut bytes = vec![b'N'];
            bytes.extend(auth(5, &[1, 2, 3, 4]));
            let mut guard = PasswordGuard::new((), true);
            assert_eq!(
                feed(&mut guard, &bytes, step),
                Err(UnencryptedPassword("MD5"))
            );
        }
    }

    #[test]
    fn the_guard_lets_scram_tls_and_everything_after_authentication_through() {
        for step in [1, 4, 64] {
            // SASL (code 10, its mechanism list), continue, final, ok; then bytes that would
            // read as a cleartext request are row data.
            let mut bytes = auth(10, b"SCRAM-SHA-256\0\0");
            bytes.extend(auth(11, b"r=abc"));
            bytes.extend(auth(12, b"v=xyz"));
            bytes.extend(auth(0, &[]));
            bytes.extend(auth(3, &[]));
            let mut guard = PasswordGuard::new((), false);
            assert_eq!(feed(&mut guard, &bytes, step), Ok(()));
            // The server said yes to TLS: what follows is encrypted, not watched.
            let mut bytes = vec![b'S'];
            bytes.extend(auth(3, &[]));
            let mut guard = PasswordGuard::new((), true);
            assert_eq!(feed(&mut guard, &bytes, step), Ok(()));
            // Allowed by the setting.
            let mut guard = PasswordGuard::new((), false).disarmed();
            assert_eq!(feed(&mut guard, &auth(3, &[]), step), Ok(()));
        }
    }
}
