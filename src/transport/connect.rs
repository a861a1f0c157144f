//! Connecting by address: `unix:/path`, `tcp:host:port` (and, with the `tls` feature,
//! `tls:host:port`), within a timeout.

use std::fmt;
use std::io;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

use super::Channel;

/// How [`Channel::connect`] reaches an address: its timeout, and (with the `tls` feature) the
/// TLS client configuration for `tls:` addresses.
///
/// # Examples
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use channel_dispatcher::{Connector, Dispatcher};
///
/// let channel = Connector::new()
///     .timeout(Duration::from_secs(2))
///     .connect("tcp:localhost:7000")
///     .await?;
/// let client = Dispatcher::builder().connect(channel).await?;
/// # drop(client);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Connector {
    timeout: Duration,
    #[cfg(feature = "tls")]
    pub(super) tls: Option<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
}

impl Default for Connector {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Connector");
        debug.field("timeout", &self.timeout);
        #[cfg(feature = "tls")]
        debug.field("tls", &self.tls.is_some());
        debug.finish()
    }
}

impl Connector {
    /// A connector with a 10 s timeout.
    pub fn new() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// How long connecting may take (name resolution, the connection, a TLS handshake).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connects to `address`: `unix:<path>`, `tcp:<host>:<port>` (every address the host
    /// resolves to is tried in turn), or with the `tls` feature `tls:<host>:<port>` (the
    /// server's certificate is verified for `<host>`).
    ///
    /// # Errors
    /// `InvalidInput` for an address of no known scheme, `TimedOut` past the timeout, or the
    /// error of the last attempt.
    pub async fn connect(&self, address: &str) -> io::Result<Channel> {
        let connecting = self.connect_inner(address);
        match tokio::time::timeout(self.timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {address} took more than {:?}", self.timeout),
            )),
        }
    }

    async fn connect_inner(&self, address: &str) -> io::Result<Channel> {
        match address.split_once(':') {
            Some(("unix", path)) => Ok(Channel::from(UnixStream::connect(path).await?)),
            Some(("tcp", host_port)) => Ok(Channel::from(tcp(host_port).await?)),
            #[cfg(feature = "tls")]
            Some(("tls", host_port)) => super::tls::connect(self, host_port).await,
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "`{address}` is not an address to connect to: use unix:<path>, \
                     tcp:<host>:<port>{}",
                    if cfg!(feature = "tls") {
                        " or tls:<host>:<port>"
                    } else {
                        " (or tls:<host>:<port> with the `tls` feature)"
                    }
                ),
            )),
        }
    }
}

/// A TCP connection to the first address of `host_port` that answers.
pub(super) async fn tcp(host_port: &str) -> io::Result<TcpStream> {
    let mut last = None;
    for address in tokio::net::lookup_host(host_port).await? {
        match TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host_port} resolves to no address"),
        )
    }))
}

impl Channel {
    /// Connects to `address` (`unix:<path>`, `tcp:<host>:<port>`, with the `tls` feature
    /// `tls:<host>:<port>`) within 10 s; [`Connector`] sets another timeout or the TLS
    /// configuration.
    ///
    /// # Examples
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use channel_dispatcher::{Channel, Dispatcher};
    ///
    /// let channel = Channel::connect("unix:/run/my-service.sock").await?;
    /// let client = Dispatcher::builder().connect(channel).await?;
    /// # drop(client);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Connector::connect`].
    pub async fn connect(address: &str) -> io::Result<Channel> {
        Connector::new().connect(address).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_of_every_scheme_connect_and_others_are_refused_with_help() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let channel = Channel::connect(&format!("tcp:localhost:{port}"))
            .await
            .unwrap();
        assert!(channel.peer().address().to_string().starts_with("tcp:"));

        let dir = std::env::temp_dir().join(format!("chd-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let _unix = tokio::net::UnixListener::bind(&path).unwrap();
        Channel::connect(&format!("unix:{}", path.display()))
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        let error = Channel::connect("http://localhost").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("tcp:<host>:<port>"), "{error}");
    }
}
