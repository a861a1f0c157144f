//! The connection task: one future per connection that reads frames, writes frames, answers
//! the peer through the handler and correlates the peer's answers to our calls.
//!
//! Everything happens in one task, so an answer to the peer is encoded straight into the write
//! buffer (no task and no queue per response), and all frames produced in one turn go out in
//! one write and one flush.
//!
//! | phase    | reads                       | writes                        | ends when                         |
//! | -------- | --------------------------- | ----------------------------- | --------------------------------- |
//! | open     | everything                  | calls, answers                | stop, drop, goodbye, EOF, fatal   |
//! | draining | answers refused, cancels    | answers of running handlers   | handlers done or drain timeout    |
//! | closing  | until the peer's EOF        | goodbye or fatal, then shut   | peer EOF / goodbye, or linger     |

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::builder::{InboundEnvelope, Observer};
use super::in_flight::{Finished, HandlerResult, Incoming as Running, Outcome, Outgoing};
use super::{Command, Lifecycle, RawResponse, Shared};
use crate::codec::Codec;
use crate::context::{Context, ContextFactory};
use crate::envelope::{Envelope, EnvelopeKind, ErrorBody, Method, PartialHeader};
use crate::error::{
    code, CallError, HandshakeError, IntoHandlerError, ProtocolError, RemoteError, Termination,
};
use crate::handler::{ErrorHandler, Failed, Incoming, Reply, ReplyBody};
use crate::hash::SeededState;
use crate::limits::{Limit, LimitExceeded, Limits};
use crate::message::Attributes;
use crate::stream::storage::Batch;
use crate::stream::{StreamEvent, POSITION_ATTRIBUTE, PULL_METHOD};
use crate::transport::frame::{Frame, FrameReader, FrameWriter};
use crate::transport::handshake::{handshake, Hello, PROTOCOL_VERSION};
use crate::transport::Channel;
use std::collections::HashMap;

/// Turns of the loop before yielding to other tasks.
mod inbound;
mod outbound;
mod streams;

const BUDGET: usize = 32;
/// How long a closing side waits for the peer's end of file after its own goodbye.
const LINGER: Duration = Duration::from_secs(2);

pub(crate) struct Config {
    pub(crate) codec: Codec,
    pub(crate) limits: Limits,
    pub(crate) handshake_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) max_concurrent_handlers: usize,
    /// Write-buffer size beyond which the connection stops taking new work until it drains.
    pub(crate) write_high_water: usize,
    pub(crate) expected_token: Option<String>,
    pub(crate) error_handler: Arc<dyn ErrorHandler>,
    pub(crate) context_factory: Option<Arc<dyn ContextFactory>>,
    pub(crate) observer: Option<Observer>,
}

type Handshake = Pin<Box<dyn Future<Output = HandshakeResult> + Send>>;
type HandshakeResult = (FrameReader, FrameWriter, Result<Hello, HandshakeError>);

/// The future that drives one connection; resolves to why it ended.
///
/// [`Builder::spawn`](crate::Builder::spawn) spawns it for you; [`Builder::build`](crate::Builder::build)
/// hands it over to drive yourself (for example on a `LocalSet`, or joined with other work).
#[must_use = "a connection does nothing unless awaited or spawned"]
pub struct Connection<S: Service<Incoming>> {
    driver: Driver<S>,
    handshake: Option<Handshake>,
    done: bool,
    span: tracing::Span,
}

#[derive(Debug)]
enum Phase {
    Open,
    /// Running handlers may finish; `peer_gone` once the peer said goodbye (nothing more to read).
    Draining {
        deadline: Pin<Box<Sleep>>,
        peer_gone: bool,
    },
    Closing {
        linger: Pin<Box<Sleep>>,
        shut: bool,
        read_closed: bool,
    },
}

struct Driver<S: Service<Incoming>> {
    reader: FrameReader,
    writer: FrameWriter,
    service: S,
    config: Config,
    commands: mpsc::UnboundedReceiver<Command>,
    commands_closed: bool,
    shared: Weak<Shared>,
    lifecycle: Arc<Lifecycle>,
    outgoing: Outgoing,
    /// The peer's streams we consume, by the peer's stream id.
    streams_in: HashMap<u64, mpsc::UnboundedSender<StreamEvent>, SeededState>,
    /// Envelopes of our streams, from pumps and pulls, to write.
    stream_out: mpsc::UnboundedReceiver<Envelope>,
    stream_out_tx: mpsc::UnboundedSender<Envelope>,
    sweep: Option<Pin<Box<Sleep>>>,
    /// Pull-mode requests being answered.
    pulls: Arc<std::sync::atomic::AtomicUsize>,
    /// In-flight permits of written notifications and refused calls, to give back.
    released: usize,
    incoming: Running<HandlerResult<S::Future>>,
    peer_max_frame: usize,
    phase: Phase,
}

impl<S> Connection<S>
where
    S: Service<Incoming, Response = Reply>,
    S::Error: IntoHandlerError,
{
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        channel: Channel,
        service: S,
        config: Config,
        token: Option<String>,
        shared: Weak<Shared>,
        commands: mpsc::UnboundedReceiver<Command>,
        lifecycle: Arc<Lifecycle>,
        span: tracing::Span,
    ) -> Self {
        let max_frame = config.limits.max_frame_length;
        let mut reader = FrameReader::new(channel.reader, max_frame);
        let mut writer = FrameWriter::new(channel.writer);
        let (stream_out_tx, stream_out) = mpsc::unbounded_channel();
        let hello = Hello {
            version: PROTOCOL_VERSION,
            max_frame: max_frame as u32,
            codec: config.codec.name().to_owned(),
            token,
        };
        let expected = config.expected_token.clone();
        let timeout = config.handshake_timeout;
        let handshake: Handshake = Box::pin(async move {
            let result = tokio::time::timeout(
                timeout,
                handshake(
                    &mut reader,
                    &mut writer,
                    &hello,
                    expected.as_deref(),
                    max_frame,
                ),
            )
            .await
            .unwrap_or(Err(HandshakeError::Timeout(timeout)));
            (reader, writer, result)
        });
        Self {
            driver: Driver {
                // Placeholders until the handshake hands the real halves back.
                reader: FrameReader::new(Box::new(tokio::io::empty()), 0),
                writer: FrameWriter::new(Box::new(tokio::io::sink())),
                service,
                config,
                commands,
                commands_closed: false,
                shared,
                lifecycle,
                outgoing: Outgoing::default(),
                streams_in: HashMap::default(),
                stream_out,
                stream_out_tx,
                sweep: None,
                pulls: Arc::default(),
                released: 0,
                incoming: Running::new(),
                peer_max_frame: 0,
                phase: Phase::Open,
            },
            handshake: Some(handshake),
            done: false,
            span,
        }
    }

    pub(crate) fn span(&self) -> &tracing::Span {
        &self.span
    }
}

impl<S> Future for Connection<S>
where
    S: Service<Incoming, Response = Reply> + Unpin,
    S::Error: IntoHandlerError,
{
    type Output = Termination;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Termination> {
        let this = self.get_mut();
        assert!(!this.done, "Connection polled after completion");
        if let Some(handshake) = &mut this.handshake {
            let (reader, writer, result) = std::task::ready!(handshake.as_mut().poll(cx));
            this.handshake = None;
            let driver = &mut this.driver;
            driver.reader = reader;
            driver.writer = writer;
            match result {
                Ok(peer) => {
                    driver.peer_max_frame = peer.max_frame as usize;
                    driver.lifecycle.set_ready(driver.peer_max_frame);
                    tracing::debug!(peer_max_frame = peer.max_frame, "handshake done");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "handshake failed");
                    this.done = true;
                    return Poll::Ready(driver.finish(Termination::Handshake(e)));
                }
            }
        }
        let result = this.driver.poll_run(cx);
        this.done = result.is_ready();
        result
    }
}

impl<S: Service<Incoming>> fmt::Debug for Connection<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("handshaking", &self.handshake.is_some())
            .field("phase", &self.driver.phase)
            .field("calls_pending", &self.driver.outgoing.len())
            .field("handlers_running", &self.driver.incoming.len())
            .finish_non_exhaustive()
    }
}

// ===== impl Driver =====

impl<S> Driver<S>
where
    S: Service<Incoming, Response = Reply>,
    S::Error: IntoHandlerError,
{
    fn poll_run(&mut self, cx: &mut TaskContext<'_>) -> Poll<Termination> {
        for _ in 0..BUDGET {
            let mut progress = false;

            // Our calls and notifications.
            while !self.commands_closed && self.writer.pending() < self.config.write_high_water {
                match self.commands.poll_recv(cx) {
                    Poll::Ready(Some(command)) => self.on_command(command),
                    Poll::Ready(None) => {
                        self.commands_closed = true;
                        self.begin_stop(Termination::Dropped);
                    }
                    Poll::Pending => break,
                }
                progress = true;
            }

            // Batches of our streams, from their pumps and pulls.
            while self.writer.pending() < self.config.write_high_water {
                match self.stream_out.poll_recv(cx) {
                    Poll::Ready(Some(envelope)) => self.write_stream_envelope(envelope),
                    _ => break,
                }
                progress = true;
            }
            self.poll_sweep(cx);

            // Handlers that finished.
            while let Poll::Ready(Some(finished)) = self.incoming.poll_finished(cx) {
                self.on_finished(finished);
                progress = true;
            }

            // The peer's frames.
            match self.poll_read(cx) {
                Poll::Ready(Ok(read)) => progress |= read,
                Poll::Ready(Err(reason)) => return Poll::Ready(self.finish(reason)),
                Poll::Pending => {}
            }

            if let Some(reason) = self.poll_phase(cx) {
                return Poll::Ready(self.finish(reason));
            }

            if let Poll::Ready(Err(e)) = self.writer.poll_drain(cx) {
                if !matches!(self.phase, Phase::Closing { .. }) {
                    return Poll::Ready(self.finish(Termination::Transport(Arc::new(e))));
                }
                return Poll::Ready(self.finish(Termination::Closed));
            }

            if !progress {
                self.end_turn();
                return Poll::Pending;
            }
        }
        // Used the budget with work left: let other tasks run, then come back.
        self.end_turn();
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Gives back in-flight permits and publishes the counters.
    fn end_turn(&mut self) {
        let released = self.released + self.outgoing.take_released();
        if released > 0 {
            self.lifecycle.release_many(released);
            self.released = 0;
        }
        self.lifecycle
            .set_counts(self.outgoing.len(), self.incoming.len());
    }

    /// Reads and handles frames until the socket has no more or backpressure says stop.
    /// `Ok(true)` when anything was read.
    fn poll_read(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<bool, Termination>> {
        let mut progress = false;
        loop {
            if let Phase::Closing {
                read_closed: true, ..
            }
            | Phase::Draining {
                peer_gone: true, ..
            } = self.phase
            {
                return Poll::Ready(Ok(progress));
            }
            if self.writer.pending() >= self.config.write_high_water
                || self.incoming.len() >= self.config.max_concurrent_handlers
            {
                return Poll::Ready(Ok(progress));
            }
            if matches!(self.phase, Phase::Open) {
                match self.service.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => {
                        let e = e.into_handler_error();
                        tracing::error!(error = %e, "handler failed");
                        self.local_fatal(code::INTERNAL_ERROR, format!("handler failed: {e}"));
                        return Poll::Ready(Ok(true));
                    }
                    Poll::Pending => return Poll::Ready(Ok(progress)),
                }
            }
            if let Some(frame) = self.reader.next_frame() {
                self.on_frame(frame);
                progress = true;
                continue;
            }
            match self.reader.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    self.on_eof()?;
                    return Poll::Ready(Ok(true));
                }
                Poll::Ready(Ok(_)) => progress = true,
                Poll::Ready(Err(e)) => {
                    if let Phase::Closing { read_closed, .. } = &mut self.phase {
                        // The peer reset the connection after our goodbye: we are done anyway.
                        *read_closed = true;
                        return Poll::Ready(Ok(true));
                    }
                    return Poll::Ready(Err(Termination::Transport(Arc::new(e))));
                }
                Poll::Pending if progress => return Poll::Ready(Ok(true)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn on_eof(&mut self) -> Result<(), Termination> {
        if let Phase::Closing { read_closed, .. } = &mut self.phase {
            *read_closed = true;
            return Ok(());
        }
        if self.reader.in_frame() {
            return Err(Termination::Protocol(ProtocolError::TruncatedFrame {
                received: self.reader.buffered(),
                expected: self.reader.claimed().unwrap_or(0),
            }));
        }
        Err(Termination::Closed)
    }

    /// Advances draining and closing; `Some` once the connection is over.
    fn poll_phase(&mut self, cx: &mut TaskContext<'_>) -> Option<Termination> {
        match &mut self.phase {
            Phase::Open => None,
            Phase::Draining {
                deadline,
                peer_gone,
            } => {
                let expired = deadline.as_mut().poll(cx).is_ready();
                if self.incoming.is_empty() || expired {
                    if !self.incoming.is_empty() {
                        tracing::warn!(
                            handlers = self.incoming.len(),
                            "drain timeout: dropping handlers still running"
                        );
                    }
                    let peer_gone = *peer_gone;
                    self.close(Envelope::Goodbye, peer_gone);
                }
                None
            }
            Phase::Closing {
                linger,
                shut,
                read_closed,
            } => {
                if !*shut {
                    match self.writer.poll_shutdown(cx) {
                        Poll::Ready(_) => *shut = true,
                        Poll::Pending => return None,
                    }
                }
                if *read_closed || linger.as_mut().poll(cx).is_ready() {
                    return Some(self.lifecycle.reason_or(Termination::Stopped));
                }
                None
            }
        }
    }

    // ===== our side =====

    /// Encodes one envelope into the write buffer; an error (and nothing written) when it
    /// exceeds the peer's maximum frame length.
    fn write(&mut self, envelope: &Envelope) -> Result<(), LimitExceeded> {
        let start = self.writer.begin();
        self.config
            .codec
            .encode_envelope(envelope, self.writer.body());
        let len = self.writer.finish(start);
        Limits::check_frame(len, self.peer_max_frame).inspect_err(|_| self.writer.abandon(start))
    }

    fn terminated(&self) -> CallError {
        CallError::Terminated(self.lifecycle.reason_or(Termination::Stopped))
    }

    /// Stops taking work: new calls fail, running handlers may finish (draining).
    fn begin_stop(&mut self, reason: Termination) {
        if !matches!(self.phase, Phase::Open) {
            return;
        }
        tracing::debug!(%reason, "stopping");
        self.lifecycle.set_reason(reason);
        self.fail_outgoing(true);
        self.phase = Phase::Draining {
            deadline: Box::pin(tokio::time::sleep(self.config.drain_timeout)),
            peer_gone: false,
        };
    }

    /// The peer said goodbye: it has failed the calls it made, so our answers to them are
    /// useless and those handlers stop; its notifications still get handled (drained).
    fn on_goodbye(&mut self) {
        self.lifecycle.set_reason(Termination::PeerStopped);
        self.fail_outgoing(false);
        self.incoming.cancel_requests();
        match &mut self.phase {
            Phase::Open => {
                self.phase = Phase::Draining {
                    deadline: Box::pin(tokio::time::sleep(self.config.drain_timeout)),
                    peer_gone: true,
                }
            }
            Phase::Draining { peer_gone, .. } => *peer_gone = true,
            Phase::Closing { read_closed, .. } => *read_closed = true,
        }
    }

    /// Sends the last envelope (goodbye or fatal) and waits for the peer's end of file.
    fn close(&mut self, last: Envelope, read_closed: bool) {
        tracing::trace!(running = self.incoming.len(), ?last, "closing");
        if matches!(self.phase, Phase::Closing { .. }) {
            return;
        }
        self.fail_outgoing(false);
        self.incoming.abort_all();
        let _ = self.write(&last);
        self.phase = Phase::Closing {
            linger: Box::pin(tokio::time::sleep(LINGER)),
            shut: false,
            read_closed,
        };
    }

    fn local_fatal(&mut self, code: i64, message: String) {
        tracing::error!(code, %message, "sending fatal error to the peer");
        self.lifecycle.set_reason(Termination::LocalFatal {
            code,
            message: message.clone(),
        });
        self.close(Envelope::Fatal { code, message }, false);
    }

    /// Fails every call awaiting an answer; with `cancel`, tells the peer to stop working on them.
    fn fail_outgoing(&mut self, cancel: bool) {
        self.end_streams();
        let reason = self.lifecycle.reason_or(Termination::Stopped);
        let ids = self
            .outgoing
            .fail_all(|| CallError::Terminated(reason.clone()));
        if cancel {
            for id in ids {
                let _ = self.write(&Envelope::Cancel { id });
            }
        }
    }

    /// Ends the connection: fails everything still waiting and runs the `on_stop` callbacks.
    fn finish(&mut self, reason: Termination) -> Termination {
        self.lifecycle.set_reason(reason);
        let reason = self.lifecycle.reason_or(Termination::Stopped);
        self.outgoing
            .fail_all(|| CallError::Terminated(reason.clone()));
        self.end_streams();
        self.incoming.abort_all();
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Call(_, reply) = command {
                let _ = reply.send(Err(CallError::Terminated(reason.clone())));
            }
        }
        if reason.is_graceful() {
            tracing::debug!(%reason, "connection closed");
        } else {
            tracing::warn!(%reason, error = ?std::error::Error::source(&reason), "connection closed");
        }
        self.lifecycle.finish();
        reason
    }

    // ===== the peer's side =====
}
