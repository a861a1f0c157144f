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
//! use channel_dispatcher::tls::{self, TlsListener};
//! use channel_dispatcher::{Connector, Dispatcher, PeerInfo};
//!
//! // The server: its certificate chain and key, and (for mutual TLS) the roots it trusts
//! // for client certificates.
//! let config = tls::server_config(
//!     &std::fs::read("server.pem")?,
//!     &std::fs::read("server.key")?,
//!     Some(&std::fs::read("clients-ca.pem")?),
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

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub use tokio_rustls::rustls;

use super::connect::{tcp, Connector};
use super::Channel;
use crate::peer::{Identity, PeerAddress, PeerInfo};

/// How long a client has to complete its TLS handshake with a [`TlsListener`].
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A server configuration: the server's certificate chain and private key (PEM), and
/// optionally the roots it trusts for client certificates. With roots, a client may present
/// a certificate (mutual TLS): it must chain to them, and its common name becomes the peer's
/// [`Identity`]; a client without one is accepted anonymously (refuse it in an
/// [`Authenticator`](crate::Authenticator) if every peer must have one).
///
/// # Errors
/// A [`TlsError`] naming the PEM that is not usable.
pub fn server_config(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
    client_roots_pem: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_roots_pem {
        Some(pem) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(pem)?), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
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
    let host = host_port
        .rsplit_once(':')
        .map_or(host_port, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
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

type Handshake = Pin<Box<dyn Future<Output = Option<Channel>> + Send>>;

/// A TCP listener that serves TLS, as an [`Accept`](crate::server::Accept) for a
/// [`Server`](crate::server::Server). TLS handshakes run concurrently (a slow client does not
/// hold up the others) and have 10 s; a client whose handshake fails (a plaintext client, an
/// untrusted certificate) is logged and dropped.
pub struct TlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: FuturesUnordered<Handshake>,
    ready: VecDeque<Channel>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("listener", &self.listener)
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Serves TLS with `config` (see [`server_config`]) on `listener`.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> Self {
        Self {
            listener,
            acceptor: TlsAcceptor::from(config),
            handshakes: FuturesUnordered::new(),
            ready: VecDeque::new(),
        }
    }

    fn handshake(&self, stream: TcpStream) -> Handshake {
        let acceptor = self.acceptor.clone();
        Box::pin(async move {
            let address = stream
                .peer_addr()
                .map_or(PeerAddress::Unknown, PeerAddress::Tcp);
            let _ = stream.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let identity = tls.get_ref().1.peer_certificates().and_then(common_name);
                    Some(channel(tls, PeerInfo::new(address).with_identity(identity)))
                }
                Ok(Err(error)) => {
                    tracing::warn!(peer = %address, %error, "TLS handshake failed (a plaintext or untrusted client?)");
                    None
                }
                Err(_) => {
                    tracing::warn!(peer = %address, "TLS handshake timed out");
                    None
                }
            }
        })
    }

    fn poll_next(&mut self, cx: &mut TaskContext<'_>) -> Poll<io::Result<Channel>> {
        loop {
            if let Some(channel) = self.ready.pop_front() {
                return Poll::Ready(Ok(channel));
            }
            match self.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, _))) => {
                    let handshake = self.handshake(stream);
                    self.handshakes.push(handshake);
                    continue;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {}
            }
            match self.handshakes.poll_next_unpin(cx) {
                Poll::Ready(Some(Some(channel))) => self.ready.push_back(channel),
                Poll::Ready(Some(None)) => continue,
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
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
