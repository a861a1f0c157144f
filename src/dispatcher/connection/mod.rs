//! The connection: one future per channel that runs the handshake, then the driver, which
//! reads frames, writes frames, answers the peer through the handler and correlates the peer's
//! answers to our calls.
//!
//! Everything happens in one task, so an answer to the peer is encoded straight into the write
//! buffer (no task and no queue per response), and all frames produced in one turn go out in
//! one write and one flush. The driver's parts are types of their own: admission of the peer's
//! new work ([`admission`]), the handler slots ([`handlers`]), our calls and the peer's window
//! ([`outgoing`]), the peer's streams we consume ([`consumers`]) and the write side
//! ([`write`]).

mod admission;
mod consumers;
mod driver;
mod handlers;
mod inbound;
mod outgoing;
mod write;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tower_service::Service;

pub(crate) use handlers::RequestOver;

use super::builder::Observer;
use crate::auth::Authenticator;
use crate::codec::Codec;
use crate::context::{ContextFactory, Extensions};
use crate::error::{HandshakeError, IntoHandlerError, Termination};
use crate::handler::{ErrorHandler, Incoming, Reply};
use crate::limits::Limits;
use crate::peer::PeerInfo;
use crate::transport::frame::{FrameReader, FrameWriter};
use crate::transport::handshake::{handshake, without_handshake, Hello, Judge, PROTOCOL_VERSION};
use crate::transport::Channel;
use driver::Driver;
pub(crate) use driver::Parts;
use write::WriteSide;

pub(crate) struct Config {
    pub(crate) codec: Codec,
    pub(crate) limits: Limits,
    pub(crate) handshake_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) max_concurrent_handlers: usize,
    /// Write-buffer size beyond which the driver starts no new work of its own.
    pub(crate) write_buffer_limit: usize,
    /// How long the write buffer may stay over its hard cap before the peer is cut off.
    pub(crate) write_stall_timeout: Duration,
    pub(crate) authenticator: Option<Arc<dyn Authenticator>>,
    /// Refuse every peer with this reason (a server at its limit).
    pub(crate) refuse_everyone: Option<String>,
    /// What every handler's context starts with: the builder's state, then the peer's info.
    pub(crate) extensions: Extensions,
    pub(crate) error_handler: Arc<dyn ErrorHandler>,
    pub(crate) context_factory: Option<Arc<dyn ContextFactory>>,
    pub(crate) observer: Option<Observer>,
    /// The PHP wire's requests that are notifications (`MeekRequest`s), by class.
    pub(crate) notification_classes: Vec<String>,
}

type Handshake = Pin<Box<dyn Future<Output = HandshakeResult> + Send>>;
type HandshakeResult = (
    FrameReader,
    FrameWriter,
    Result<(Hello, PeerInfo), HandshakeError>,
);

/// The future that drives one connection; resolves to why it ended.
///
/// [`Builder::spawn`](crate::Builder::spawn) spawns it for you; [`Builder::build`](crate::Builder::build)
/// hands it over to drive yourself (for example on a `LocalSet`, or joined with other work).
///
/// # Cancellation
/// Dropping it before it completes (aborting its task, shutting its runtime down) ends the
/// connection with [`Termination::Aborted`]: pending calls fail, `on_stop` callbacks run and
/// `closed()` returns, as for any other end.
#[must_use = "a connection does nothing unless awaited or spawned"]
pub struct Connection<S: Service<Incoming>> {
    state: State<S>,
    span: tracing::Span,
}

enum State<S: Service<Incoming>> {
    Handshaking {
        handshake: Handshake,
        parts: Box<Parts<S>>,
    },
    Running(Box<Driver<S>>),
    Done,
}

impl<S> Connection<S>
where
    S: Service<Incoming, Response = Reply>,
    S::Error: IntoHandlerError,
{
    pub(crate) fn new(
        channel: Channel,
        token: Option<String>,
        parts: Parts<S>,
        span: tracing::Span,
    ) -> Self {
        let config = &parts.config;
        let max_frame = config.limits.max_frame_length;
        let (reader, writer, peer) = channel.into_parts();
        let framing = config.codec.framing();
        let mut reader = FrameReader::new(reader, max_frame).with_framing(framing);
        let mut writer = FrameWriter::new(writer).with_framing(framing);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            codec: config.codec.name().to_owned(),
            token,
            limits: config.limits,
        };
        let authenticator = config.authenticator.clone();
        let refuse_everyone = config.refuse_everyone.clone();
        let timeout = config.handshake_timeout;
        let codec = config.codec;
        let handshake: Handshake = Box::pin(async move {
            let judge = Judge {
                authenticator: authenticator.as_deref(),
                refuse_everyone: refuse_everyone.as_deref(),
            };
            let handshake = async {
                match codec.is_php() {
                    false => {
                        handshake(&mut reader, &mut writer, &hello, judge, peer, max_frame).await
                    }
                    true => without_handshake(&mut writer, codec, hello, judge, peer).await,
                }
            };
            let result = tokio::time::timeout(timeout, handshake)
                .await
                .unwrap_or(Err(HandshakeError::Timeout(timeout)));
            (reader, writer, result)
        });
        let parts = Box::new(parts);
        Self {
            state: State::Handshaking { handshake, parts },
            span,
        }
    }

    pub(crate) fn span(&self) -> &tracing::Span {
        &self.span
    }
}

impl<S> Future for Connection<S>
where
    S: Service<Incoming, Response = Reply>,
    S::Error: IntoHandlerError,
{
    type Output = Termination;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Termination> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Handshaking { handshake, parts } => {
                    parts.lifecycle.register_handshaking(cx.waker());
                    // Stopped, or every handle gone, before the peer completed the handshake:
                    // it has the drain timeout to complete it (then queued messages still go
                    // out); `stop()` does not wait longer for a peer that may never answer.
                    let gone = parts.shared.strong_count() == 0;
                    if gone || parts.lifecycle.is_stopping() {
                        let drain = parts.config.drain_timeout;
                        let deadline = parts
                            .stop_deadline
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(drain)));
                        if deadline.as_mut().poll(cx).is_ready() {
                            let State::Handshaking { parts, .. } =
                                std::mem::replace(&mut this.state, State::Done)
                            else {
                                unreachable!("the state was just matched")
                            };
                            let reason = match gone {
                                true => Termination::Dropped,
                                false => Termination::Stopped,
                            };
                            return Poll::Ready(parts.finish(reason));
                        }
                    }
                    let (reader, writer, result) = std::task::ready!(handshake.as_mut().poll(cx));
                    let State::Handshaking { parts, .. } =
                        std::mem::replace(&mut this.state, State::Done)
                    else {
                        unreachable!("the state was just matched")
                    };
                    match result {
                        Ok((peer, info)) => {
                            tracing::debug!(peer_limits = ?peer.limits, %info, "handshake done");
                            let mut parts = parts;
                            parts.config.extensions.insert(info.clone());
                            parts.lifecycle.set_ready(peer.limits, info);
                            let write = WriteSide::new(
                                writer,
                                parts.config.codec,
                                peer.limits.max_frame_length,
                                parts.config.write_buffer_limit,
                                parts.config.write_stall_timeout,
                            );
                            let driver = Driver::new(*parts, reader, write, &peer.limits);
                            this.state = State::Running(Box::new(driver));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "handshake failed");
                            return Poll::Ready(parts.finish(Termination::Handshake(e)));
                        }
                    }
                }
                State::Running(driver) => {
                    let reason = std::task::ready!(driver.poll_run(cx));
                    this.state = State::Done;
                    return Poll::Ready(reason);
                }
                State::Done => panic!("Connection polled after completion"),
            }
        }
    }
}

/// The drop guard: however the future goes away (dropped, aborted, unwinding from a panic),
/// the connection ends once, with [`Termination::Aborted`] unless it had a reason already.
impl<S: Service<Incoming>> Drop for Connection<S> {
    fn drop(&mut self) {
        let _entered = self.span.enter();
        match std::mem::replace(&mut self.state, State::Done) {
            State::Handshaking { parts, .. } => {
                parts.finish(Termination::Aborted);
            }
            State::Running(mut driver) => {
                driver.finish(Termination::Aborted);
            }
            State::Done => {}
        }
    }
}

impl<S: Service<Incoming>> fmt::Debug for Connection<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Handshaking { .. } => "handshaking",
            State::Running(_) => "running",
            State::Done => "done",
        };
        f.debug_struct("Connection")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::envelope::{Envelope, Method};
    use crate::message::Attributes;
    use crate::transport::frame::Frame;
    use crate::{Dispatcher, Router};

    fn frame(out: &mut BytesMut, body: &[u8]) {
        out.put_u32(body.len() as u32);
        out.put_slice(body);
    }

    /// A peer scripted byte for byte: its hello and accept, then one request; it reads our
    /// handshake and the answer, then closes.
    #[tokio::test(start_paused = true)]
    async fn a_scripted_peer_gets_its_answer_and_its_end_of_file_ends_the_connection() {
        let codec = Codec::default();
        let router = Router::new().raw("echo", |incoming: Incoming| async move {
            Ok(Reply::value(incoming.payload().clone()))
        });
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (_dispatcher, connection) = Dispatcher::builder()
            .handler(router)
            .build(Channel::from_io(ours));
        let (read, mut write) = tokio::io::split(theirs);

        let mut script = BytesMut::new();
        let hello = Hello {
            version: PROTOCOL_VERSION,
            codec: codec.name().into(),
            token: None,
            limits: Limits::default(),
        };
        frame(&mut script, &hello.encode());
        frame(&mut script, &[0]);
        let mut body = BytesMut::new();
        let request = Envelope::Request {
            id: 5,
            method: Method::from_static("echo"),
            attributes: Attributes::new(),
            timeout_us: 0,
            parent: 0,
            payload: codec.encode("hi").unwrap(),
        };
        codec.encode_envelope(&request, &mut body);
        frame(&mut script, &body);

        let peer = async move {
            write.write_all(&script).await.unwrap();
            let mut reader = FrameReader::new(Box::new(read), 1 << 20);
            let mut frames = Vec::new();
            for _ in 0..3 {
                match reader.read_frame().await.unwrap() {
                    Some(Frame::Whole(body)) => frames.push(body),
                    other => panic!("expected a frame, got {other:?}"),
                }
            }
            let [theirs, verdict, answer] = <[_; 3]>::try_from(frames).unwrap();
            assert_eq!(Hello::decode(&theirs).unwrap().limits, Limits::default());
            assert_eq!(verdict[..], [0]);
            match codec.decode_envelope(answer).unwrap() {
                Envelope::Response { id: 5, payload, .. } => {
                    assert_eq!(codec.decode::<String>(&payload).unwrap(), "hi");
                }
                other => panic!("expected the answer, got {other:?}"),
            }
            write.shutdown().await.unwrap();
        };
        let (reason, ()) = futures_util::future::join(connection, peer).await;
        assert!(matches!(reason, Termination::Closed), "{reason:?}");
    }
}
