//! TLS over TCP, on rustls with the `ring` crypto provider (the `tls` feature): configurations
//! from PEM, a [`TlsListener`] for a [`Server`](crate::server::Server), and `tls:` addresses
//! for [`Connector`](crate::Connector). A client certificate's subject (its common name)
//! becomes the peer's [`Identity`].
//!
//! `ring` builds with a C compiler alone; `aws-lc-rs`, rustls's default, also needs cmake.
//!
//! # Examples
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use channel_dispatcher::server::Server;
//! use channel_dispatcher::tls::{self, ClientAuth, TlsListener};
//! use channel_dispatcher::{Connector, Dispatcher, PeerInfo};
//!
//! // The server: its certificate chain and key, and (for mutual TLS) the roots it trusts
//! // for client certificates.
//! let clients_ca = std::fs::read("clients-ca.pem")?;
//! let config = tls::server_config(
//!     &std::fs::read("server.pem")?,
//!     &std::fs::read("server.key")?,
//!     ClientAuth::Required(&clients_ca),
//! )?;
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:7443").await?;
//! let server = Server::builder().serve(TlsListener::new(listener, config), |peer: &PeerInfo| {
//!     Dispatcher::builder() // peer.identity() is the client certificate's name
//! });
//!
//! // A client: the roots it trusts for the server, and its own certificate.
//! let config = tls::client_config(
//!     &std::fs::read("ca.pem")?,
//!     Some((&std::fs::read("client.pem")?, &std::fs::read("client.key")?)),
//! )?;
//! let channel = Connector::new().tls(config).connect("tls:service.example:7443").await?;
//! let client = Dispatcher::builder().connect(channel).await?;
//! # drop((server, client));
//! # Ok(())
//! # }
//! ```

use std::io;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub use tokio_rustls::rustls;

use super::connect::{tcp, Connector};
use super::Channel;
use crate::peer::{Identity, PeerAddress, PeerInfo};

/// How long a client has to complete its TLS handshake with a [`TlsListener`], by default.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many TLS handshakes a [`TlsListener`] runs at once, by default.
const MAX_HANDSHAKES: usize = 256;

/// A TLS configuration that could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The PEM holds no certificate, or a malformed one.
    #[error("no usable certificate in the PEM given for {what}: {reason}")]
    Certificates {
        /// Which PEM: "the certificate chain", "the roots".
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The PEM holds no private key, or a malformed one.
    #[error("no usable private key in the PEM given: {0}")]
    Key(String),
    /// rustls refused the configuration (for example a key that does not match the
    /// certificate).
    #[error("rustls refused the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificates {
            what,
            reason: e.to_string(),
        })?;
    match certificates.is_empty() {
        true => Err(TlsError::Certificates {
            what,
            reason: "no CERTIFICATE block".into(),
        }),
        false => Ok(certificates),
    }
}

fn roots(pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(pem, "the roots")? {
        roots.add(certificate)?;
    }
    Ok(roots)
}

fn key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Key(e.to_string()))
}

/// Whether a TLS server asks its clients for certificates (mutual TLS), and which roots they
/// must chain to. A client certificate's common name becomes the peer's [`Identity`].
#[derive(Clone, Copy, Debug)]
pub enum ClientAuth<'a> {
    /// No client certificates: every client is anonymous to TLS.
    None,
    /// Every client must present a certificate that chains to these roots (PEM).
    Required(&'a [u8]),
    /// A client may present a certificate, which must then chain to these roots (PEM); a
    /// client without one is accepted anonymously.
    Optional(&'a [u8]),
}

/// A server configuration: the server's certificate chain and private key (PEM), and whether
/// and how clients authenticate with certificates.
///
/// # Errors
/// A [`TlsError`] naming the PEM that is not usable.
pub fn server_config(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
    client_auth: ClientAuth<'_>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let verifier = |pem: &[u8]| {
        Ok::<_, TlsError>(WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(pem)?),
            provider(),
        ))
    };
    let built = |e: rustls::server::VerifierBuilderError| {
        TlsError::Rustls(rustls::Error::General(e.to_string()))
    };
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Required(pem) => {
            builder.with_client_cert_verifier(verifier(pem)?.build().map_err(built)?)
        }
        ClientAuth::Optional(pem) => builder.with_client_cert_verifier(
            verifier(pem)?
                .allow_unauthenticated()
                .build()
                .map_err(built)?,
        ),
    };
    let config = builder.with_single_cert(
        certificates(cert_chain_pem, "the certificate chain")?,
        key(key_pem)?,
    )?;
    Ok(Arc::new(config))
}

/// A client configuration: the roots it trusts for the server's certificate (PEM), and
/// optionally its own certificate chain and key for mutual TLS.
///
/// # Errors
/// A [`TlsError`] naming the PEM that is not usable.
pub fn client_config(
    roots_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(roots_pem)?);
    let config = match identity {
        Some((chain, key_pem)) => builder
            .with_client_auth_cert(certificates(chain, "the certificate chain")?, key(key_pem)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

impl Connector {
    /// The TLS configuration for `tls:` addresses (see [`client_config`]).
    pub fn tls(mut self, config: Arc<ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}

/// Connects `tls:<host>:<port>`, verifying the server's certificate for `<host>`.
pub(super) async fn connect(connector: &Connector, host_port: &str) -> io::Result<Channel> {
    let Some(config) = connector.tls.clone() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a tls: address needs a TLS configuration: Connector::new().tls(tls::client_config(..)?)",
        ));
    };
    let Some((host, _port)) = host_port.rsplit_once(':') else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`tls:{host_port}` has no port: use tls:<host>:<port>"),
        ));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{host}` is not a server name: {e}"),
        )
    })?;
    let stream = tcp(host_port).await?;
    let address = stream
        .peer_addr()
        .map_or(PeerAddress::Unknown, PeerAddress::Tcp);
    let _ = stream.set_nodelay(true);
    let tls = TlsConnector::from(config).connect(name, stream).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("the TLS handshake with {host_port} failed: {e} (does the server speak TLS, with a certificate for `{host}` from the roots given?)"),
        )
    })?;
    let identity = tls.get_ref().1.peer_certificates().and_then(common_name);
    Ok(channel(tls, PeerInfo::new(address).with_identity(identity)))
}

fn channel<T>(stream: T, peer: PeerInfo) -> Channel
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    Channel::labelled(Box::new(reader), Box::new(writer), "tls").with_peer(peer)
}

/// A TCP listener that serves TLS, as an [`Accept`](crate::server::Accept) for a
/// [`Server`](crate::server::Server). Each TLS handshake runs as a task of its own, so a slow
/// client holds up no other and the cryptography spreads over the runtime's threads; at most
/// [`max_handshakes`](Self::max_handshakes) run at once (beyond it, new connections wait in the
/// listen backlog), each within [`handshake_timeout`](Self::handshake_timeout). A client whose
/// handshake fails (a plaintext client, an untrusted certificate) is logged and dropped.
pub struct TlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<Channel>>,
    max_handshakes: usize,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("listener", &self.listener)
            .field("handshakes", &self.handshakes.len())
            .field("max_handshakes", &self.max_handshakes)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Serves TLS with `config` (see [`server_config`]) on `listener`.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> Self {
        Self {
            listener,
            acceptor: TlsAcceptor::from(config),
            handshakes: JoinSet::new(),
            max_handshakes: MAX_HANDSHAKES,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }

    /// How many TLS handshakes may run at once (at least 1). Default: 256.
    pub fn max_handshakes(mut self, handshakes: usize) -> Self {
        self.max_handshakes = handshakes.max(1);
        self
    }

    /// How long a client has to complete its TLS handshake. Default: 10 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    fn start_handshake(&mut self, stream: TcpStream) {
        let (acceptor, timeout) = (self.acceptor.clone(), self.handshake_timeout);
        self.handshakes.spawn(async move {
            let address = stream
                .peer_addr()
                .map_or(PeerAddress::Unknown, PeerAddress::Tcp);
            let _ = stream.set_nodelay(true);
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let identity = tls.get_ref().1.peer_certificates().and_then(common_name);
                    Some(channel(tls, PeerInfo::new(address).with_identity(identity)))
                }
                Ok(Err(error)) => {
                    let plaintext = error
                        .get_ref()
                        .and_then(|e| e.downcast_ref::<rustls::Error>())
                        .is_some_and(|e| {
                            matches!(
                                e,
                                rustls::Error::InvalidMessage(
                                    rustls::InvalidMessage::InvalidContentType
                                )
                            )
                        });
                    match plaintext {
                        true => tracing::warn!(peer = %address, "a client that does not speak TLS connected (a plaintext peer?): dropped"),
                        false => tracing::warn!(peer = %address, %error, "TLS handshake failed (an untrusted client certificate?)"),
                    }
                    None
                }
                Err(_) => {
                    tracing::warn!(peer = %address, ?timeout, "TLS handshake timed out");
                    None
                }
            }
        });
    }

    fn poll_next(&mut self, cx: &mut TaskContext<'_>) -> Poll<io::Result<Channel>> {
        loop {
            // Handshakes first: they free descriptors and places even while accepting fails.
            match self.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(channel)))) => return Poll::Ready(Ok(channel)),
                Poll::Ready(Some(Ok(None))) => continue,
                Poll::Ready(Some(Err(error))) => {
                    tracing::error!(%error, "a TLS handshake task failed");
                    continue;
                }
                Poll::Ready(None) | Poll::Pending => {}
            }
            if self.handshakes.len() >= self.max_handshakes {
                // A handshake that ends wakes us.
                return Poll::Pending;
            }
            match self.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, _))) => self.start_handshake(stream),
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl crate::server::Accept for TlsListener {
    async fn next_channel(&mut self) -> Option<io::Result<Channel>> {
        Some(std::future::poll_fn(|cx| self.poll_next(cx)).await)
    }
}

/// The common name of the first certificate's subject, if any: a small DER walk over a
/// certificate rustls has verified already.
fn common_name(certificates: &[CertificateDer<'_>]) -> Option<Identity> {
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3
    let (_, certificate, _) = tlv(certificates.first()?.as_ref())?;
    let (_, mut tbs, _) = tlv(certificate)?;
    // [0] version (optional), serial, signature algorithm, issuer, validity, subject.
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2;
    }
    for _ in 0..4 {
        tbs = tlv(tbs)?.2;
    }
    let (_, mut subject, _) = tlv(tbs)?;
    while !subject.is_empty() {
        let (_, mut set, rest) = tlv(subject)?;
        subject = rest;
        while !set.is_empty() {
            let (_, attribute, rest) = tlv(set)?;
            set = rest;
            let (tag, oid, value) = tlv(attribute)?;
            if tag == 0x06 && oid == COMMON_NAME {
                let (_, name, _) = tlv(value)?;
                return std::str::from_utf8(name).ok().map(Identity::new);
            }
        }
    }
    None
}

/// One DER tag-length-value: its tag, its content and what follows.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = match first {
        0..=0x7f => first as usize,
        0x81..=0x84 => {
            let count = (first & 0x7f) as usize;
            let (bytes, after) = (rest.get(..count)?, rest.get(count..)?);
            rest = after;
            bytes.iter().fold(0usize, |len, &b| (len << 8) | b as usize)
        }
        _ => return None,
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_name_is_read_from_a_certificate_and_garbage_is_no_name() {
        let mut params = rcgen::CertificateParams::new(vec!["client.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example Org");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "worker-7");
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        let der = certificate.der().clone();
        assert_eq!(
            common_name(std::slice::from_ref(&der)),
            Some(Identity::new("worker-7"))
        );
        for cut in 0..der.len() {
            let _ = common_name(&[CertificateDer::from(der[..cut].to_vec())]);
        }
        assert_eq!(common_name(&[]), None);
        assert_eq!(
            common_name(&[CertificateDer::from(vec![
                0x30, 0x84, 0xff, 0xff, 0xff, 0xff
            ])]),
            None
        );
    }
}
