//! Async, bidirectional message dispatching over one channel.
//!
//! Two peers (processes, threads or machines) share one connection. Either side, at any time:
//!
//! - sends a [`Request`] and awaits the correlated response ([`Dispatcher::request`]);
//! - sends a [`Notification`]: fire and forget, never answered ([`Dispatcher::notify`]);
//! - opens a remote stream of items with flow control ([`Dispatcher::stream`], [`stream`]);
//! - answers the peer through a handler, usually a [`Router`] of async typed handlers that get
//!   a [`Context`] for nested calls back to the peer, wrapped in [`middleware`] or tower layers;
//! - cancels calls by dropping them, sets deadlines that travel with the request, and is
//!   bounded everywhere ([`Builder::max_in_flight`], [`Limits`]);
//! - stops gracefully ([`Dispatcher::stop`]): pending calls fail with a typed
//!   [`CallError::Terminated`], `on_stop` callbacks run exactly once.
//!
//! The pieces, from the bottom up: a [`Channel`] carries length-prefixed frames over any byte
//! stream (Unix or TCP socket, stdio, a child process, an in-memory pair); a [`Codec`]
//! (MessagePack by default, JSON, postcard) turns envelopes into frames; the connection task
//! correlates answers and runs handlers; [`Dispatcher`] is the cloneable handle. The wire
//! format is specified in `PROTOCOL.md`.
//!
//! # Quick start
//! ```
//! use channel_dispatcher::{request, Channel, Context, Dispatcher, Router};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Add { a: i64, b: i64 }
//! request!(Add => i64, "add");
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), channel_dispatcher::CallError> {
//! let (left, right) = Channel::pair();
//! let router = Router::new().request(|_cx: Context, add: Add| async move {
//!     Ok(add.a + add.b)
//! });
//! let server = Dispatcher::builder().handler(router).spawn(right);
//! let client = Dispatcher::builder().spawn(left);
//!
//! assert_eq!(client.request(Add { a: 2, b: 3 }).await?, 5);
//! client.stop().await;
//! # server.closed().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//! - `msgpack` (default): the MessagePack codec.
//! - `json`: the JSON codec.
//! - `postcard`: the postcard codec.
//! - `php`: the PHP original's own wire (`Codec::Php` and the `php` module).
//! - `tls`: TLS over TCP (`tls` module), with rustls.
//! - `pool`: worker pools on tower's balancer (`pool` module).
//!
//! # Coming from flyokai/amp-channel-dispatcher
//!
//! This crate re-creates the PHP library
//! [flyokai/amp-channel-dispatcher](https://github.com/flyokai/amp-channel-dispatcher) on tokio
//! and serde. Its concepts map as follows:
//!
//! | PHP | here |
//! | --- | --- |
//! | `Dispatcher` (`run`, `sendRequest`, `stop`, `onStop`) | [`Dispatcher`] ([`Builder::spawn`], [`Dispatcher::request`], [`Dispatcher::stop`], [`Dispatcher::on_stop`]) |
//! | `Request` / `MeekRequest` | [`Request`] / [`Notification`] ([`request!`], [`notification!`]) |
//! | `SuccessResponse`, `AcceptedResponse` | [`Success`], [`Accepted`] |
//! | `ErrorResponse`, `FatalErrorResponse` | [`Reply::error`], [`Reply::fatal`]; the caller sees [`CallError::Remote`] |
//! | `RequestHandler`, `Middleware`, `stackMiddleware` | [`Router`], [`middleware::Middleware`] and [`middleware::from_fn`] (tower layers), [`middleware::stack_middleware`] |
//! | `ErrorHandler`, `DefaultErrorHandler` | [`ErrorHandler`]; the PHP default is [`StrictErrorHandler`] (ours, [`DefaultErrorHandler`], logs a failed notification instead of ending the connection) |
//! | `Context`, `ContextFactory`, `WeakReference` | [`Context`] (holds the dispatcher weakly), [`ContextFactory`] |
//! | `RemoteIterator`, `IteratorStorage`, `getPosition` | [`RemoteStream`] (windowed by default; [`RemoteStream::pull_mode`] is the PHP behaviour), [`Streams`], [`RemoteStream::position`] |
//! | read-loop callback | [`Builder::on_inbound`] |
//! | `serialize()` over an amphp `Channel` | a [`Codec`] over a [`Channel`]; `Codec::Php` (feature `php`) is the PHP wire itself, to talk to the PHP library |
//!
//! # Minimum supported Rust version
//! Rust 1.80; raising it is a minor-version change.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings), allow(dead_code, unused_variables))))]

mod answers;
mod auth;
mod backoff;
pub mod codec;
mod commands;
mod context;
mod dispatcher;
mod envelope;
pub mod error;
mod handler;
mod hash;
mod limits;
mod message;
pub mod middleware;
mod peer;
pub mod reconnect;
pub mod server;
mod shared;
pub mod stream;
mod transport;
mod wake;

pub use auth::{AuthFuture, AuthRequest, AuthResult, Authenticator, Refusal, SharedToken};
pub use bytes;
pub use codec::Codec;
pub use context::{Context, ContextFactory, Extensions};
pub use dispatcher::{
    Builder, Call, CallService, Connection, Dispatcher, InboundEnvelope, RawCall, RawResponse,
    ResponseFuture,
};
pub use envelope::EnvelopeKind;
pub use error::{
    CallError, CodecError, HandlerError, HandshakeError, IntoHandlerError, ProtocolError,
    RemoteError, Result, Termination,
};
pub use handler::{
    DefaultErrorHandler, ErrorHandler, Failed, Incoming, Reply, Router, StrictErrorHandler,
};
pub use limits::{Limit, LimitExceeded, Limits};
pub use message::{Accepted, Attributes, Notification, Request, StreamRequest, Success};
pub use peer::{Identity, PeerAddress, PeerInfo, UnixCredentials};
pub use stream::{RemoteStream, Streams};
pub use tower_service::Service;

/// Entry points for the fuzz targets (`fuzz/`); not part of the API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use transport::tls;
#[cfg(feature = "php")]
#[cfg_attr(docsrs, doc(cfg(feature = "php")))]
pub mod php;
#[cfg(feature = "pool")]
#[cfg_attr(docsrs, doc(cfg(feature = "pool")))]
pub mod pool;
pub use transport::{Channel, ChildProcess, Connector};
