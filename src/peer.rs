//! What a connection knows about its peer: where it is ([`PeerAddress`]) and, once the
//! handshake authenticated it, who it is ([`Identity`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Who the peer is, as an [`Authenticator`](crate::Authenticator) (or a TLS client
/// certificate) established it: a name such as a user, a service or a certificate's subject.
///
/// # Examples
/// ```
/// use channel_dispatcher::Identity;
///
/// let worker = Identity::new("worker-7");
/// assert_eq!(worker.name(), "worker-7");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(Arc<str>);

impl Identity {
    /// An identity named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self(Arc::from(name.into()))
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Identity").field(&self.name()).finish()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the peer of a connection is, as its transport knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerAddress {
    /// A TCP (or TLS over TCP) peer.
    Tcp(SocketAddr),
    /// A peer on a Unix socket: its path, if it bound one (clients usually do not), and its
    /// credentials, where the operating system tells them.
    Unix {
        /// The peer's socket path.
        path: Option<PathBuf>,
        /// The peer process's user, group and process id.
        credentials: Option<UnixCredentials>,
    },
    /// A child process ([`Channel::spawn_child`](crate::Channel::spawn_child)).
    Child {
        /// Its process id.
        pid: Option<u32>,
    },
    /// The parent process, over this process's standard input and output.
    Stdio,
    /// The other end of an in-memory [`Channel::pair`](crate::Channel::pair).
    Memory,
    /// A transport that does not say (built with [`Channel::new`](crate::Channel::new) or
    /// [`Channel::from_io`](crate::Channel::from_io)).
    Unknown,
}

impl fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(address) => write!(f, "tcp:{address}"),
            Self::Unix {
                path: Some(path), ..
            } => write!(f, "unix:{}", path.display()),
            Self::Unix {
                credentials: Some(credentials),
                ..
            } => write!(f, "unix:uid={}", credentials.uid),
            Self::Unix { .. } => f.write_str("unix"),
            Self::Child { pid: Some(pid) } => write!(f, "child:{pid}"),
            Self::Child { pid: None } => f.write_str("child"),
            Self::Stdio => f.write_str("stdio"),
            Self::Memory => f.write_str("memory"),
            Self::Unknown => f.write_str("unknown"),
        }
    }
}

/// The credentials of a process on the other end of a Unix socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixCredentials {
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
    /// Its process id, where the operating system tells it.
    pub pid: Option<i32>,
}

/// What is known about the peer of a connection: its address and, once the handshake
/// authenticated it, its identity. Handlers read it with [`Context::peer`](crate::Context::peer).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    address: PeerAddress,
    identity: Option<Identity>,
}

impl PeerInfo {
    /// A peer at `address`, not identified yet.
    pub fn new(address: PeerAddress) -> Self {
        Self {
            address,
            identity: None,
        }
    }

    /// The peer as `identity`.
    pub fn with_identity(mut self, identity: Option<Identity>) -> Self {
        self.identity = identity;
        self
    }

    /// Where the peer is.
    pub fn address(&self) -> &PeerAddress {
        &self.address
    }

    /// Who the peer is: what the [`Authenticator`](crate::Authenticator) returned (before it
    /// ran: the subject of the peer's TLS client certificate, if any). `None` for an
    /// anonymous peer.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }
}

impl fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.identity {
            Some(identity) => write!(f, "{identity} at {}", self.address),
            None => write!(f, "{}", self.address),
        }
    }
}
