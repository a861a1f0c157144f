//! Transports: where frames travel. A [`Channel`] is any byte stream pair; framing and the
//! handshake are the same on all of them.

mod child;
mod connect;
pub(crate) mod frame;
pub(crate) mod handshake;
#[cfg(feature = "tls")]
pub mod tls;

use std::fmt;
use std::io;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::process::Command;

pub(crate) use child::ChildExited;
pub use child::ChildProcess;
pub use connect::Connector;

use crate::peer::{PeerAddress, PeerInfo, UnixCredentials};
use frame::{BoxRead, BoxWrite};

/// Buffer size of each direction of [`Channel::pair`].
const PAIR_BUFFER: usize = 256 * 1024;

/// One end of a connection: a byte stream to read frames from and one to write them to.
///
/// Build it from whatever connects the two peers: a Unix or TCP socket
/// (`Channel::from(stream)`), any `AsyncRead + AsyncWrite` ([`Channel::from_io`]), separate
/// halves ([`Channel::new`]), an in-memory pair ([`Channel::pair`]), this process's stdio
/// ([`Channel::stdio`]) or a child process's ([`Channel::spawn_child`]).
///
/// # Examples
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// use channel_dispatcher::Channel;
/// use tokio::net::UnixStream;
///
/// let (a, b) = UnixStream::pair()?;
/// let (ours, theirs) = (Channel::from(a), Channel::from(b));
/// # drop((ours, theirs));
/// # Ok(())
/// # }
/// ```
pub struct Channel {
    pub(crate) reader: BoxRead,
    pub(crate) writer: BoxWrite,
    label: &'static str,
    peer: PeerInfo,
}

impl Channel {
    /// A channel from a read half and a write half.
    pub fn new<R, W>(reader: R, writer: W) -> Self
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        Self::labelled(Box::new(reader), Box::new(writer), "io")
    }

    /// A channel from one bidirectional stream (split internally).
    ///
    /// Prefer `Channel::from` for Unix and TCP sockets: it splits them without a lock.
    pub fn from_io<T>(io: T) -> Self
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(io);
        Self::labelled(Box::new(reader), Box::new(writer), "io")
    }

    /// Two connected in-memory channels, for peers in one process and for tests.
    ///
    /// # Examples
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use channel_dispatcher::{Channel, Dispatcher};
    ///
    /// let (a, b) = Channel::pair();
    /// let one = Dispatcher::builder().spawn(a);
    /// let two = Dispatcher::builder().spawn(b);
    /// # one.stop().await; two.closed().await;
    /// # }
    /// ```
    pub fn pair() -> (Self, Self) {
        let (a, b) = tokio::io::duplex(PAIR_BUFFER);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        (
            Self::labelled(Box::new(ar), Box::new(aw), "memory"),
            Self::labelled(Box::new(br), Box::new(bw), "memory"),
        )
    }

    /// This process's standard input and output: the child side of
    /// [`Channel::spawn_child`]. Standard error stays free for logs.
    ///
    /// Nothing else may write to standard output while the channel is in use (use `eprintln!`
    /// or `tracing` to standard error).
    ///
    /// On Unix, when both are pipes (as under [`Channel::spawn_child`]), they are read and
    /// written directly by the reactor, in non-blocking mode; otherwise (a terminal, a file)
    /// through tokio's blocking-thread stdio, which costs a thread hop per read.
    pub fn stdio() -> Self {
        #[cfg(unix)]
        if let Some((reader, writer)) = unix_stdio_pipes() {
            return Self::labelled(Box::new(reader), Box::new(writer), "stdio");
        }
        Self::labelled(
            Box::new(tokio::io::stdin()),
            Box::new(tokio::io::stdout()),
            "stdio",
        )
    }

    /// Spawns `command` with piped standard input and output, which carry the channel; the
    /// child's standard error is inherited, so its logs reach ours. The child builds its side
    /// with [`Channel::stdio`].
    ///
    /// The connection owns the child (see [`ChildProcess`]): dropping the handle does not kill
    /// it; keep it to `wait` for the exit status after `stop()`. A child that exits without a
    /// goodbye ends the connection with
    /// [`Termination::ChildExited`](crate::Termination::ChildExited), with its status.
    ///
    /// # Examples
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use channel_dispatcher::{Channel, Dispatcher};
    /// use tokio::process::Command;
    ///
    /// let (channel, mut child) = Channel::spawn_child(Command::new("my-worker").arg("--serve"))?;
    /// let worker = Dispatcher::builder().connect(channel).await?;
    /// // ... calls to the worker ...
    /// worker.stop().await;
    /// println!("the worker exited with {}", child.wait().await?);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// The `io::Error` from spawning the command.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn_child(command: &mut Command) -> io::Result<(Self, ChildProcess)> {
        let child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let (reader, writer, process) = child::watch(child)?;
        let pid = process.id();
        let channel = Self::labelled(Box::new(reader), Box::new(writer), "child")
            .with_peer(PeerInfo::new(PeerAddress::Child { pid }));
        Ok((channel, process))
    }

    fn labelled(reader: BoxRead, writer: BoxWrite, label: &'static str) -> Self {
        let address = match label {
            "memory" => PeerAddress::Memory,
            "stdio" => PeerAddress::Stdio,
            _ => PeerAddress::Unknown,
        };
        Self {
            reader,
            writer,
            label,
            peer: PeerInfo::new(address),
        }
    }

    pub(crate) fn label(&self) -> &'static str {
        self.label
    }

    /// What the transport knows about the peer: its address and, for a TLS client
    /// certificate, its identity. The handshake's [`Authenticator`](crate::Authenticator)
    /// sees it, and handlers then find it (with the identity authenticated) in
    /// [`Context::peer`](crate::Context::peer).
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// The channel with `peer` as what is known about the peer, for transports that know more
    /// than the channel can tell (a proxy's client address, a custom transport's identity).
    pub fn with_peer(mut self, peer: PeerInfo) -> Self {
        self.peer = peer;
        self
    }

    pub(crate) fn into_parts(self) -> (BoxRead, BoxWrite, PeerInfo) {
        (self.reader, self.writer, self.peer)
    }
}

/// Standard input and output as non-blocking pipes, when both are pipes.
#[cfg(unix)]
fn unix_stdio_pipes() -> Option<(
    tokio::net::unix::pipe::Receiver,
    tokio::net::unix::pipe::Sender,
)> {
    use std::os::fd::AsFd;
    let stdin = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    let stdout = std::io::stdout().as_fd().try_clone_to_owned().ok()?;
    let reader = tokio::net::unix::pipe::Receiver::from_file(std::fs::File::from(stdin)).ok()?;
    let writer = tokio::net::unix::pipe::Sender::from_file(std::fs::File::from(stdout)).ok()?;
    Some((reader, writer))
}

impl From<UnixStream> for Channel {
    fn from(stream: UnixStream) -> Self {
        let credentials = stream.peer_cred().ok().map(|cred| UnixCredentials {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        });
        let path = stream
            .peer_addr()
            .ok()
            .and_then(|address| address.as_pathname().map(Into::into));
        let (reader, writer) = stream.into_split();
        Self::labelled(Box::new(reader), Box::new(writer), "unix")
            .with_peer(PeerInfo::new(PeerAddress::Unix { path, credentials }))
    }
}

impl From<TcpStream> for Channel {
    fn from(stream: TcpStream) -> Self {
        // Small frames must not wait for Nagle's algorithm: we coalesce writes ourselves.
        let _ = stream.set_nodelay(true);
        let address = stream
            .peer_addr()
            .map_or(PeerAddress::Unknown, PeerAddress::Tcp);
        let (reader, writer) = stream.into_split();
        Self::labelled(Box::new(reader), Box::new(writer), "tcp").with_peer(PeerInfo::new(address))
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("kind", &self.label)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}
