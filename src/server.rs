//! Serving many peers: a [`Server`] accepts connections (Unix, TCP, or any stream of
//! [`Channel`]s), sets each one up, keeps a registry of the live ones ([`Peers`]), and shuts
//! them all down gracefully.
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use channel_dispatcher::server::Server;
//! use channel_dispatcher::{request, Context, Dispatcher, Router};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)] struct Add(i64, i64);
//! # request!(Add => i64, "add");
//!
//! let router = Router::new().request(|_cx: Context, Add(a, b)| async move { Ok(a + b) });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let address = listener.local_addr()?;
//! let server = Server::builder()
//!     .max_connections(1000)
//!     .serve(listener, move |_peer| Dispatcher::builder().handler(router.clone()));
//!
//! let stream = tokio::net::TcpStream::connect(address).await?;
//! let client = Dispatcher::builder().connect(stream.into()).await.unwrap();
//! assert_eq!(client.request(Add(2, 3)).await.unwrap(), 5);
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{join_all, select, Either};
use futures_util::Stream;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{broadcast, watch};
use tower_service::Service;

use crate::backoff::Backoff;
use crate::codec::Codec;
use crate::dispatcher::{Builder, Dispatcher};
use crate::error::{CallError, CodecError, IntoHandlerError, Termination};
use crate::handler::{Incoming, Reply};
use crate::message::{Attributes, Notification};
use crate::peer::PeerInfo;
use crate::transport::Channel;

/// The shortest and longest pause after an accept error (the back-off doubles in between).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// How many refusals (of peers beyond `max_connections`) may be under way at once; past it a
/// new connection is closed without a word, so that a flood costs nothing but the accept.
const MAX_REFUSING: usize = 256;

/// How long a refused peer has to send its hello and read the refusal.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// How many join and leave events a slow [`Peers::events`] receiver may fall behind.
const EVENTS: usize = 1024;

/// Where a [`Server`] gets its connections: a listener, or any stream of channels.
///
/// Implemented for tokio's [`TcpListener`] and [`UnixListener`]; wrap any other
/// `Stream<Item = io::Result<Channel>>` in [`FromStream`] (a TLS acceptor, a proxy, tests).
pub trait Accept: Send + 'static {
    /// The next accepted connection. An error is logged and retried after a short back-off;
    /// `None` means no more will come (the server stops accepting, and keeps serving).
    fn next_channel(&mut self) -> impl Future<Output = Option<io::Result<Channel>>> + Send + '_;
}

impl Accept for TcpListener {
    async fn next_channel(&mut self) -> Option<io::Result<Channel>> {
        Some(self.accept().await.map(|(stream, _)| Channel::from(stream)))
    }
}

impl Accept for UnixListener {
    async fn next_channel(&mut self) -> Option<io::Result<Channel>> {
        Some(self.accept().await.map(|(stream, _)| Channel::from(stream)))
    }
}

/// Any stream of accepted channels, as an [`Accept`].
#[derive(Debug)]
pub struct FromStream<S>(pub S);

impl<S> Accept for FromStream<S>
where
    S: Stream<Item = io::Result<Channel>> + Send + Unpin + 'static,
{
    async fn next_channel(&mut self) -> Option<io::Result<Channel>> {
        futures_util::StreamExt::next(&mut self.0).await
    }
}

/// A peer's number in its server's registry: never reused within the process. Handlers find
/// their own peer's with `cx.state::<PeerId>()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(u64);

impl PeerId {
    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer {}", self.0)
    }
}

/// A live peer of a [`Server`]: its id, what is known about it, and the dispatcher to call it.
#[derive(Clone, Debug)]
pub struct Peer {
    id: PeerId,
    info: PeerInfo,
    dispatcher: Dispatcher,
}

impl Peer {
    /// Its id in the registry.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// Its address and identity.
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }

    /// Calls it: requests, notifications, streams.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }
}

/// A peer joining or leaving a [`Server`] ([`Peers::events`]).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum PeerEvent {
    /// The peer completed its handshake and is in the registry.
    Joined(Peer),
    /// The peer's connection ended; it is out of the registry.
    Left {
        /// Its id.
        id: PeerId,
        /// Why its connection ended.
        reason: Termination,
    },
}

/// The registry of a [`Server`]'s live peers. Cloning it is cheap; handlers reach it with
/// `cx.state::<Peers>()`.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Registry>,
}

struct Registry {
    peers: Mutex<HashMap<PeerId, Peer>>,
    events: broadcast::Sender<PeerEvent>,
    broadcast_timeout: Duration,
}

impl Peers {
    /// How many peers are connected (handshake done, not ended).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// `true` when none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The peer with this id, if it is still connected.
    pub fn get(&self, id: PeerId) -> Option<Peer> {
        self.lock().get(&id).cloned()
    }

    /// Every connected peer, in no particular order (a snapshot).
    pub fn list(&self) -> Vec<Peer> {
        self.lock().values().cloned().collect()
    }

    /// Peers joining and leaving from now on. A receiver that falls more than 1024 events
    /// behind loses the oldest (it is told how many, as tokio's `broadcast` does). To know
    /// every peer, subscribe first, then [`list`](Self::list): a peer may then be both listed
    /// and announced, but none is missed.
    pub fn events(&self) -> broadcast::Receiver<PeerEvent> {
        self.inner.events.subscribe()
    }

    /// Sends `notification` to every connected peer; see [`broadcast_to`](Self::broadcast_to).
    pub async fn broadcast<N: Notification>(&self, notification: &N) -> Broadcast {
        self.broadcast_to(notification, |_| true).await
    }

    /// Sends `notification` to the connected peers `filter` selects, all at once: a slow or
    /// dead peer never delays the others. The payload is encoded once per codec in use and
    /// shared by every peer's queue. Each peer gets the notification or a typed failure:
    /// [`CallError::Timeout`] for one whose queue stayed full for the broadcast timeout
    /// ([`ServerBuilder::broadcast_timeout`]; it does not read), `Terminated` for one that
    /// left meanwhile.
    pub async fn broadcast_to<N: Notification>(
        &self,
        notification: &N,
        filter: impl Fn(&Peer) -> bool,
    ) -> Broadcast {
        // The filter runs outside the lock: it may use the registry itself.
        let mut peers = self.list();
        peers.retain(|p| filter(p));
        let mut encoded: Vec<(Codec, Result<Bytes, CodecError>)> = Vec::new();
        let timeout = self.inner.broadcast_timeout;
        let sends = peers.into_iter().map(|peer| {
            let codec = peer.dispatcher.codec();
            let payload = match encoded.iter().find(|(c, _)| *c == codec) {
                Some((_, payload)) => payload.clone(),
                None => {
                    let payload = codec.encode(notification);
                    encoded.push((codec, payload.clone()));
                    payload
                }
            };
            async move {
                let result = match payload {
                    Ok(payload) => {
                        let send =
                            peer.dispatcher
                                .notify_raw(N::METHOD, Attributes::new(), payload);
                        tokio::time::timeout(timeout, send)
                            .await
                            .unwrap_or(Err(CallError::Timeout(timeout)))
                    }
                    Err(error) => Err(CallError::Encode(error)),
                };
                (peer.id, result)
            }
        });
        Broadcast {
            results: join_all(sends.collect::<Vec<_>>()).await,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Peer>> {
        self.inner.peers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for Peers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peers").field("len", &self.len()).finish()
    }
}

/// What a broadcast did: one result per peer it went to.
#[derive(Debug)]
#[must_use = "a broadcast may have failed for some peers"]
pub struct Broadcast {
    results: Vec<(PeerId, Result<(), CallError>)>,
}

impl Broadcast {
    /// How many peers got the notification (it is queued to be written to them).
    pub fn delivered(&self) -> usize {
        self.results.iter().filter(|(_, r)| r.is_ok()).count()
    }

    /// The peers it failed for, and why.
    pub fn failures(&self) -> impl Iterator<Item = (PeerId, &CallError)> {
        self.results
            .iter()
            .filter_map(|(id, r)| r.as_ref().err().map(|e| (*id, e)))
    }

    /// Every peer's result.
    pub fn results(&self) -> &[(PeerId, Result<(), CallError>)] {
        &self.results
    }
}

/// Configures a [`Server`]; [`serve`](Self::serve) starts it.
#[derive(Clone, Debug)]
#[must_use = "a server builder does nothing until `serve`"]
pub struct ServerBuilder {
    max_connections: usize,
    broadcast_timeout: Duration,
}

impl ServerBuilder {
    /// The most connections served at once (handshaking or connected); a peer beyond it is
    /// refused in the handshake with a reason that says so, whatever codec it speaks (and
    /// past 256 such refusals under way, closed without one). Default: 10,000.
    ///
    /// Connections still in their handshake count: a peer that connects and never says hello
    /// holds its place until the handshake timeout of its [`Builder`] (10 s by default); lower
    /// it where many untrusted peers connect.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections;
        self
    }

    /// How long a broadcast waits for room in one peer's queue before it fails for that peer
    /// with [`CallError::Timeout`]. Default: 5 s.
    pub fn broadcast_timeout(mut self, timeout: Duration) -> Self {
        self.broadcast_timeout = timeout;
        self
    }

    /// Starts accepting connections from `acceptor` on the current tokio runtime. For each,
    /// `setup` gets what is known about the peer before its handshake (its address; for
    /// TLS, its certificate's identity) and returns the [`Builder`] of its connection
    /// (handler, limits, authenticator, ...). The server gives every connection's handlers
    /// the registry and their peer's id as state (`cx.state::<Peers>()`,
    /// `cx.state::<PeerId>()`). `setup` runs on the accepting task: keep it quick (work
    /// that waits belongs in the [`Authenticator`](crate::Authenticator) or the handlers).
    /// It runs for a peer refused at [`max_connections`](ServerBuilder::max_connections)
    /// too: the refusal is written on its builder's wire (its codec).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn serve<A, F, S>(self, acceptor: A, setup: F) -> Server
    where
        A: Accept,
        F: Fn(&PeerInfo) -> Builder<S> + Send + Sync + 'static,
        S: Service<Incoming, Response = Reply> + Send + 'static,
        S::Error: IntoHandlerError,
        S::Future: Send + 'static,
    {
        let (events, _) = broadcast::channel(EVENTS);
        let peers = Peers {
            inner: Arc::new(Registry {
                peers: Mutex::new(HashMap::new()),
                events,
                broadcast_timeout: self.broadcast_timeout,
            }),
        };
        let (shutdown, shutting_down) = watch::channel(false);
        let inner = Arc::new(ServerInner {
            peers: peers.clone(),
            shutdown,
            connections: AtomicUsize::new(0),
            ended: tokio::sync::Notify::new(),
            accepting: AtomicUsize::new(1),
        });
        let accept = accept_loop(
            acceptor,
            Arc::new(setup),
            Arc::clone(&inner),
            self.max_connections,
            shutting_down,
        );
        tokio::spawn(accept);
        Server { inner }
    }
}

/// A running server: its registry of peers, and its shutdown. Cloning it is cheap.
///
/// Dropping every clone does not stop it: call [`shutdown`](Self::shutdown).
#[derive(Clone)]
pub struct Server {
    inner: Arc<ServerInner>,
}

struct ServerInner {
    peers: Peers,
    shutdown: watch::Sender<bool>,
    /// Connections handshaking or connected.
    connections: AtomicUsize,
    /// Notified when a connection ends or the accept loop exits.
    ended: tokio::sync::Notify,
    /// 1 while the accept loop runs.
    accepting: AtomicUsize,
}

impl Server {
    /// A server with the default settings, to configure.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            max_connections: 10_000,
            broadcast_timeout: Duration::from_secs(5),
        }
    }

    /// The live peers.
    pub fn peers(&self) -> &Peers {
        &self.inner.peers
    }

    /// How many connections are open (handshaking or connected).
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting, stops every connection gracefully (running handlers finish within
    /// their drain timeout, pending calls fail with `Terminated`, each peer is told goodbye),
    /// and returns once all have ended. Calling it again waits for the same end.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let stops = self.inner.peers.list().into_iter().map(|peer| async move {
            peer.dispatcher.stop().await;
        });
        join_all(stops).await;
        loop {
            let ended = self.inner.ended.notified();
            let accepting = self.inner.accepting.load(Ordering::SeqCst) == 1;
            if !accepting && self.connections() == 0 {
                return;
            }
            ended.await;
        }
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("connections", &self.connections())
            .field("peers", &self.inner.peers.len())
            .finish()
    }
}

/// Accepts until shutdown (or the acceptor's end), setting up each connection.
async fn accept_loop<A, F, S>(
    mut acceptor: A,
    setup: Arc<F>,
    server: Arc<ServerInner>,
    max_connections: usize,
    mut shutting_down: watch::Receiver<bool>,
) where
    A: Accept,
    F: Fn(&PeerInfo) -> Builder<S> + Send + Sync + 'static,
    S: Service<Incoming, Response = Reply> + Send + 'static,
    S::Error: IntoHandlerError,
    S::Future: Send + 'static,
{
    static IDS: AtomicU64 = AtomicU64::new(1);
    // However this task ends (a panicking acceptor, an aborted runtime), shutdown hears of it.
    let _accepting = Ended {
        server: &server,
        count: &server.accepting,
    };
    let refusing = Arc::new(AtomicUsize::new(0));
    let mut backoff = Backoff::new(ACCEPT_BACKOFF.0, ACCEPT_BACKOFF.1);
    loop {
        let next = {
            let down = std::pin::pin!(shutting_down.wait_for(|down| *down));
            let accepted = std::pin::pin!(acceptor.next_channel());
            match select(down, accepted).await {
                Either::Left(_) => None,
                Either::Right((accepted, _)) => Some(accepted),
            }
        };
        let channel = match next {
            None => break,
            Some(None) => {
                tracing::info!("the acceptor has no more connections: no longer accepting");
                break;
            }
            Some(Some(Err(error))) => {
                tracing::warn!(%error, retry_in = ?backoff.pause(), "accepting a connection failed");
                let down = std::pin::pin!(shutting_down.wait_for(|down| *down));
                if let Either::Left(_) =
                    select(down, std::pin::pin!(tokio::time::sleep(backoff.pause()))).await
                {
                    break;
                }
                backoff.failed();
                continue;
            }
            Some(Some(Ok(channel))) => channel,
        };
        backoff.reset();
        let info = channel.peer().clone();
        let at_limit = server.connections.load(Ordering::SeqCst) >= max_connections;
        if at_limit && refusing.load(Ordering::SeqCst) >= MAX_REFUSING {
            tracing::debug!(peer = %info, "closing a peer: at the connection limit, and refusing many");
            continue;
        }
        // NB. A refused peer's builder too: it says which wire the refusal is written in.
        let builder = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| setup(&info)))
        {
            Ok(builder) => builder,
            Err(_) => {
                tracing::error!(peer = %info, "the server's setup panicked: dropping the connection");
                continue;
            }
        };
        if at_limit {
            tracing::warn!(peer = %info, max_connections, "refusing a peer: at the connection limit");
            let refused = builder
                .handshake_timeout(REFUSAL_TIMEOUT)
                .refuse_everyone(format!(
                    "the server is at its limit of {max_connections} connections: try again later"
                ))
                .spawn(channel);
            refusing.fetch_add(1, Ordering::SeqCst);
            let refusing = Arc::clone(&refusing);
            tokio::spawn(async move {
                refused.closed().await;
                refusing.fetch_sub(1, Ordering::SeqCst);
            });
            continue;
        }
        let id = PeerId(IDS.fetch_add(1, Ordering::Relaxed));
        let dispatcher = builder
            .with_state(server.peers.clone())
            .with_state(id)
            .spawn(channel);
        server.connections.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(track(
            Arc::clone(&server),
            id,
            dispatcher,
            shutting_down.clone(),
        ));
    }
}

/// Takes one off `count` and wakes [`Server::shutdown`] when dropped, however its task ends.
struct Ended<'a> {
    server: &'a ServerInner,
    count: &'a AtomicUsize,
}

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        self.server.ended.notify_waiters();
    }
}

/// Registers the peer once its handshake is done, and removes it once it ends.
async fn track(
    server: Arc<ServerInner>,
    id: PeerId,
    dispatcher: Dispatcher,
    mut shutting_down: watch::Receiver<bool>,
) {
    let _counted = Ended {
        server: &server,
        count: &server.connections,
    };
    let peers = &server.peers;
    let ready = {
        let down = std::pin::pin!(shutting_down.wait_for(|down| *down));
        match select(std::pin::pin!(dispatcher.ready()), down).await {
            Either::Left((ready, _)) => Some(ready),
            Either::Right(_) => None,
        }
    };
    // A shutdown stops a peer still in its handshake, which never joins.
    let ready = match ready {
        Some(ready) => ready,
        None => Err(dispatcher.stop().await),
    };
    let joined = match ready {
        Ok(()) => {
            let info = dispatcher.peer().expect("the handshake is done");
            let peer = Peer {
                id,
                info,
                dispatcher: dispatcher.clone(),
            };
            peers.lock().insert(id, peer.clone());
            tracing::debug!(%id, peer = %peer.info, "peer joined");
            let _ = peers.inner.events.send(PeerEvent::Joined(peer));
            // A shutdown that began while this peer shook hands did not see it.
            if *server.shutdown.borrow() {
                dispatcher.stop().await;
            }
            true
        }
        Err(reason) => {
            tracing::debug!(%id, %reason, "peer failed its handshake");
            false
        }
    };
    let reason = dispatcher.closed().await;
    if joined {
        peers.lock().remove(&id);
        tracing::debug!(%id, %reason, "peer left");
        let _ = peers.inner.events.send(PeerEvent::Left { id, reason });
    }
    drop(dispatcher);
}
