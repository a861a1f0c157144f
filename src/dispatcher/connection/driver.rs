//! The driver of a running connection (after the handshake): one turn of its loop, our side's
//! commands and streams, and how it stops and ends. The peer's frames are in `inbound.rs`.
//!
//! NB. The rule everything here keeps: **reading never stops** for a reason that an answer
//! could relieve. Back-pressure (a full write buffer, busy handlers, the peer's admission
//! window) only delays *new* work: our new calls wait in the outbox, the peer's in admission.
//!
//! | phase    | reads                         | writes                                 | ends when                       |
//! | -------- | ----------------------------- | -------------------------------------- | ------------------------------- |
//! | open     | everything                    | everything                             | stop, drop, goodbye, EOF, fatal |
//! | draining | answers, cancels; new work is | answers of running handlers, their     | handlers done (or the drain     |
//! |          | refused, nested calls kept    | nested calls, queued notifications     | timeout)                        |
//! | closing  | until the peer's end of file  | goodbye or fatal, then shut down       | peer's EOF, or the linger time  |

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::admission::Admission;
use super::consumers::Consumers;
use super::handlers::Handlers;
use super::outgoing::{Held, Outbox, Outgoing, PeerWindow, Released, Window};
use super::write::{WriteError, WriteSide};
use super::Config;
use crate::codec::Codec;
use crate::commands::CommandReceiver;
use crate::envelope::{Envelope, ErrorBody};
use crate::error::{code, CallError, IntoHandlerError, ProtocolError, Termination};
use crate::handler::HandlerResult;
use crate::handler::{Incoming, Reply};
use crate::limits::Limits;
use crate::message::Attributes;
use crate::shared::StreamEvent;
use crate::shared::{Command, Lifecycle, Outbound, ReplySender, Shared};
use crate::stream::storage::{Produced, MAX_BATCH, MAX_CREDIT};
use crate::stream::{Streams, POSITION_ATTRIBUTE};
use crate::transport::frame::FrameReader;

/// Turns of the loop before yielding to other tasks.
const BUDGET: usize = 32;
/// Frames read, and commands taken, in one turn.
pub(super) const TURN: usize = 256;
/// Bytes a stream batch's envelope takes besides the items (kind, ids, position, attributes),
/// kept free when batches are cut to the peer's frames.
const ENVELOPE_MARGIN: usize = 128;
/// How long a closing side waits for the peer's end of file after its own goodbye.
pub(crate) const LINGER: Duration = Duration::from_secs(2);

/// Which calls fail as the connection stops or ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failing {
    /// Our own stop: the calls of handles and the peer is told (cancels); the nested calls of
    /// handlers that drain stay.
    Stop,
    /// Every call: the peer is gone or the connection ends.
    All,
}

#[derive(Debug)]
pub(super) enum Phase {
    Open,
    /// Running handlers may finish; `peer_gone` once the peer said goodbye (nothing more to read).
    Draining {
        deadline: Pin<Box<Sleep>>,
        peer_gone: bool,
    },
    Closing {
        /// How long to wait for the peer's end of file; `None` for not at all.
        linger: Option<Pin<Box<Sleep>>>,
        shut: bool,
        read_closed: bool,
    },
}

pub(super) struct Driver<S: Service<Incoming>> {
    pub(super) reader: FrameReader,
    pub(super) write: WriteSide,
    pub(super) service: S,
    pub(super) config: Config,
    commands: CommandReceiver,
    commands_closed: bool,
    /// A step of this pass stopped at its share of the turn, with more to do.
    pub(super) unfinished: bool,
    pub(super) shared: Weak<Shared>,
    pub(super) lifecycle: Arc<Lifecycle>,
    pub(super) outgoing: Outgoing,
    pub(super) window: PeerWindow,
    /// What the peer announced it accepts.
    pub(super) peer_limits: Limits,
    outbox: Outbox,
    pub(super) admission: Admission,
    pub(super) handlers: Handlers<HandlerResult<S::Future>>,
    pub(super) consumers: Consumers,
    pub(super) streams: Streams,
    /// Our streams woken and not polled yet.
    woken: Vec<u64>,
    sweep: Option<Pin<Box<Sleep>>>,
    /// When a stop that began during the handshake must be over.
    stop_deadline: Option<Pin<Box<Sleep>>>,
    /// Permits to give back at the end of the turn.
    released: Released,
    pub(super) phase: Phase,
}

/// What the driver is built from.
pub(crate) struct Parts<S> {
    pub(crate) service: S,
    pub(crate) config: Config,
    pub(crate) commands: CommandReceiver,
    pub(crate) shared: Weak<Shared>,
    pub(crate) lifecycle: Arc<Lifecycle>,
    /// Set when the stop began during the handshake: the drain ends there.
    pub(crate) stop_deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> Parts<S> {
    /// Ends a connection that never ran (the handshake failed, or the future was dropped
    /// before it finished): queued calls fail, `on_stop` callbacks run.
    pub(super) fn finish(mut self, reason: Termination) -> Termination {
        self.lifecycle.set_reason(reason);
        let reason = self.lifecycle.reason_or(Termination::Stopped);
        fail_queued(&mut self.commands, &reason);
        self.lifecycle.finish();
        reason
    }
}

/// What our goodbye tells the peer about why we stop, from its point of view.
fn goodbye_reason(reason: &Termination) -> String {
    match reason {
        Termination::Stopped => "the peer called stop()".into(),
        Termination::Dropped => "the peer dropped its last Dispatcher handle".into(),
        Termination::PeerStopped { .. } => "the peer answered our goodbye".into(),
        other => format!("the peer stopped: {other}"),
    }
}

/// Fails every command still queued for a driver that will not take it.
fn fail_queued(commands: &mut CommandReceiver, reason: &Termination) {
    commands.close();
    while let Some(command) = commands.try_recv() {
        match command {
            Command::Call { reply, .. } => {
                reply.fail(CallError::Terminated(reason.clone()));
            }
            Command::OpenStream { events, .. } => {
                let _ = events.send(StreamEvent::Terminated(reason.clone()));
            }
            _ => {}
        }
    }
}

impl<S> Driver<S>
where
    S: Service<Incoming, Response = Reply>,
    S::Error: IntoHandlerError,
{
    pub(super) fn new(
        parts: Parts<S>,
        reader: FrameReader,
        write: WriteSide,
        peer: &Limits,
    ) -> Self {
        let codec = parts.config.codec;
        let limits = parts.config.limits;
        Self {
            reader,
            write,
            service: parts.service,
            config: parts.config,
            commands: parts.commands,
            commands_closed: false,
            unfinished: false,
            shared: parts.shared,
            streams: parts.lifecycle.streams.clone(),
            lifecycle: parts.lifecycle,
            outgoing: Outgoing::default(),
            window: PeerWindow::new(peer),
            peer_limits: *peer,
            outbox: Outbox::default(),
            admission: Admission::new(limits),
            handlers: Handlers::new(),
            consumers: Consumers::new(codec),
            woken: Vec::new(),
            sweep: None,
            stop_deadline: parts.stop_deadline,
            released: Released::default(),
            phase: Phase::Open,
        }
    }

    /// Whether admitted work may take a handler slot: one is free, or every one is held by a
    /// handler waiting for the peer (a nested call of it is pending there), which may wait for
    /// this very work. A chain through the peer then never stalls on the slots it holds; it
    /// takes one more slot, no more, while all of them wait.
    pub(super) fn slot_free(&self) -> bool {
        let ordinary = self.handlers.ordinary();
        ordinary < self.config.max_concurrent_handlers || {
            let waiting = self
                .window
                .nesting_parents()
                .filter(|&parent| self.handlers.is_running_ordinary(parent))
                .count();
            waiting >= ordinary
        }
    }

    pub(super) fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }

    pub(super) fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    // ===== our side: commands from the handles =====

    fn poll_commands(&mut self, cx: &mut TaskContext<'_>) -> bool {
        let mut progress = false;
        for _ in 0..TURN {
            if self.commands_closed {
                return progress;
            }
            match self.commands.poll_recv(cx) {
                Poll::Ready(Some(command)) => self.on_command(command),
                Poll::Ready(None) => {
                    self.commands_closed = true;
                    self.begin_stop(Termination::Dropped);
                }
                Poll::Pending => return progress,
            }
            progress = true;
        }
        // The turn's share is taken, and nothing waits for a wake: come back for more.
        self.unfinished = true;
        progress
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Call {
                id,
                mut call,
                deadline,
                reply,
            } => {
                if reply.is_closed() {
                    return self.released.message(&call); // its caller gave up already
                }
                // NB. A call is nested only while the peer's request it serves still runs: after
                // that, the peer would not find it pending and counts it as an ordinary one. Nor
                // is it when the native wire cannot say so: 0 is "none" there (a peer's request
                // 0 breaks the protocol), while the PHP wire carries no parent at all.
                let expressible = |parent: u64| parent != 0 || self.config.codec.is_php();
                let nested = call
                    .parent()
                    .is_some_and(|parent| expressible(parent) && self.handlers.is_running(parent));
                let allowed = match self.phase {
                    Phase::Open => true,
                    Phase::Draining { peer_gone, .. } => nested && !peer_gone,
                    Phase::Closing { .. } => false,
                };
                if !allowed {
                    reply.fail(self.terminated());
                    return self.released.message(&call);
                }
                if !nested {
                    call.not_nested();
                }
                // Written at once when nothing of its kind waits before it and there is room.
                let window = match call.parent() {
                    Some(parent) => Window::Nested { parent },
                    None => Window::Request(self.config.codec.payload_len(&call.payload)),
                };
                let room = self.write.has_room()
                    && match window {
                        Window::Nested { parent } => {
                            !self.outbox.nested_waiting() && self.window.may_nest(parent)
                        }
                        Window::Request(len) => {
                            !self.outbox.waiting() && self.window.fits_request(len)
                        }
                    };
                if room {
                    return self.write_call(id, call, deadline, reply, window);
                }
                let command = Command::Call {
                    id,
                    call,
                    deadline,
                    reply,
                };
                match nested {
                    true => self.outbox.push_nested(command),
                    false => self.outbox.push(command),
                }
            }
            Command::Notify(notification) => {
                if self.is_closing() {
                    tracing::debug!(method = %notification.method, "notification after close dropped");
                    return self.released.message(&notification);
                }
                let len = self.config.codec.payload_len(&notification.payload);
                if self.write.has_room()
                    && !self.outbox.waiting()
                    && self.window.fits_notification(len)
                {
                    return self.write_notification(notification);
                }
                self.outbox.push(Command::Notify(notification));
            }
            Command::Cancel(id) => {
                if let Some(held) = self.outgoing.cancel_request(id) {
                    self.release_held(held);
                    if !self.is_closing() {
                        let _ = self.write.write(&Envelope::Cancel { id });
                    }
                } else if !self.outbox.is_empty() {
                    // Not written yet, maybe: then it never is, and what it holds is free now.
                    let released = &mut self.released;
                    self.outbox.prune(|call| released.message(call));
                }
            }
            Command::Stop => self.begin_stop(Termination::Stopped),
            Command::OpenStream {
                stream,
                events,
                credit,
            } => {
                if !self.is_open() {
                    let reason = self.lifecycle.reason_or(Termination::Stopped);
                    let _ = events.send(StreamEvent::Terminated(reason));
                    return;
                }
                let credit = credit.min(MAX_CREDIT);
                let envelope = if self.consumers.open(stream, events, credit) {
                    Envelope::StreamCredit { stream, credit }
                } else {
                    Envelope::StreamCancel { stream }
                };
                let _ = self.write.write(&envelope);
            }
            Command::GrantCredit { stream, credit } => {
                if let (true, Some(credit)) = (self.is_open(), self.consumers.grant(stream, credit))
                {
                    if credit > 0 {
                        let _ = self.write.write(&Envelope::StreamCredit { stream, credit });
                    }
                }
            }
            Command::CancelStream { stream } => {
                self.consumers.cancel(stream);
                if !self.is_closing() {
                    // Also for pull-mode streams, which have no consumer entry here.
                    let _ = self.write.write(&Envelope::StreamCancel { stream });
                }
            }
        }
    }

    /// Writes the calls and notifications waiting in the outbox, in order, while the write
    /// buffer and the peer's window have room.
    fn flush_outbox(&mut self) -> bool {
        if self.outbox.is_empty() {
            return false;
        }
        let codec = self.config.codec;
        let mut progress = false;
        while self.write.has_room() {
            let released = &mut self.released;
            let abandoned = |call: &Outbound| released.message(call);
            let Some(command) = self.outbox.pop_ready(&self.window, codec, abandoned) else {
                break;
            };
            progress = true;
            match command {
                Command::Call {
                    id,
                    mut call,
                    deadline,
                    reply,
                } => {
                    if call
                        .parent()
                        .is_some_and(|parent| !self.handlers.is_running(parent))
                    {
                        // Its handler finished while it waited: the peer would not find it
                        // pending, so it waits for the window like any other call.
                        call.not_nested();
                        self.outbox.push(Command::Call {
                            id,
                            call,
                            deadline,
                            reply,
                        });
                        continue;
                    }
                    let window = match call.parent() {
                        None => Window::Request(codec.payload_len(&call.payload)),
                        Some(parent) => Window::Nested { parent },
                    };
                    self.write_call(id, call, deadline, reply, window);
                }
                Command::Notify(notification) => self.write_notification(notification),
                _ => {}
            }
        }
        progress
    }

    /// Writes a request; `window` is its length when it counts in the peer's window (not
    /// nested).
    fn write_call(
        &mut self,
        id: u64,
        call: Outbound,
        deadline: Option<Instant>,
        reply: ReplySender,
        window: Window,
    ) {
        let (permit, queued) = (call.permit, call.queued);
        self.released.written(permit, queued);
        // NB. A call made before the handshake was checked against our own limits only (a
        // notification waits for the handshake before it is checked and queued).
        let checked = self
            .peer_limits
            .check_parts(Some(call.method.as_str()), &call.attributes);
        if let Err(error) = checked {
            reply.fail(CallError::Limit(error));
            return self.released.answered(permit);
        }
        if let Err(error) = carried(self.config.codec, &call) {
            reply.fail(CallError::Encode(error));
            return self.released.answered(permit);
        }
        // The peer is told the time left now, so the time the call waited here counts.
        let timeout_us = deadline.map_or(0, |deadline| {
            let left = deadline.saturating_duration_since(Instant::now());
            u64::try_from(left.as_micros()).unwrap_or(u64::MAX).max(1)
        });
        // NB. 0 is "none" on the native wire; the PHP wire carries no parent.
        let parent = call.parent().unwrap_or(0);
        let envelope = Envelope::Request {
            id,
            method: call.method,
            attributes: call.attributes,
            timeout_us,
            parent,
            payload: call.payload,
        };
        match self.write.write(&envelope) {
            Ok(()) => {
                self.window.add(window);
                self.outgoing
                    .insert_request(id, reply, Held { permit, window });
            }
            Err(error) => {
                reply.fail(CallError::Limit(error));
                self.released.answered(permit);
            }
        }
    }

    fn write_notification(&mut self, notification: Outbound) {
        self.released.message(&notification);
        if let Err(error) = carried(self.config.codec, &notification) {
            let method = &notification.method;
            return tracing::warn!(%method, %error, "notification the wire cannot carry dropped");
        }
        let len = self.config.codec.payload_len(&notification.payload);
        let method = notification.method.clone();
        let envelope = Envelope::Notification {
            method: notification.method,
            attributes: notification.attributes,
            payload: notification.payload,
        };
        match self.write.write(&envelope) {
            Ok(()) => {
                self.window.add_notification(len);
                if self.config.codec.is_php() {
                    // NB. No credit comes back on the PHP wire: the socket's back-pressure is
                    // the only bound there.
                    self.window.credit(1);
                }
            }
            Err(error) => {
                tracing::warn!(%method, %error, "notification over the peer's frame limit dropped")
            }
        }
    }

    fn send_notification_credit(&mut self) {
        let credit = self.admission.take_credit();
        if credit > 0 && !self.is_closing() {
            let _ = self.write.write(&Envelope::NotificationCredit { credit });
        }
    }

    // ===== our streams =====

    /// Polls our woken streams while the write buffer has room; writes what they produce.
    fn poll_streams(&mut self, cx: &mut TaskContext<'_>) -> bool {
        if self.is_closing() {
            return false;
        }
        let mut progress = self.answer_orphaned_pulls();
        // NB. The queue is looked at again whenever the taken ids run out with room left, but
        // once a pass: a key queued behind others wakes nobody, so a pass that ended with room
        // and an untaken queue would leave those streams until some other wake. A stream that
        // queues itself again after this look finds the queue empty and wakes the task.
        let mut taken = false;
        while self.write.has_room() {
            if self.woken.is_empty() {
                if taken {
                    break;
                }
                self.streams.take_woken(cx.waker(), &mut self.woken);
                taken = true;
            }
            let Some(id) = self.woken.pop() else {
                break;
            };
            let produced = {
                let _polling = self.lifecycle.enter_handlers();
                let max_bytes = self
                    .peer_limits
                    .max_frame_length
                    .saturating_sub(ENVELOPE_MARGIN);
                self.streams.poll_stream(id, MAX_BATCH, max_bytes)
            };
            if let Some(produced) = produced {
                self.send_produced(produced);
                progress = true;
            }
        }
        progress
    }

    /// Answers the pull requests whose streams were removed while they waited (by a handler,
    /// or by the peer's own cancel or credit): nothing else would.
    pub(super) fn answer_orphaned_pulls(&mut self) -> bool {
        let orphaned = self.streams.take_orphaned_pulls();
        for &(stream, request) in &orphaned {
            self.admission.pull_done(request);
            let message = format!("stream {stream} was released while this pull waited");
            self.answer_error(request, code::INVALID_PARAMS, message);
        }
        !orphaned.is_empty()
    }

    fn send_produced(&mut self, produced: Produced) {
        let codec = self.config.codec;
        let envelope = match produced {
            Produced::Items {
                stream,
                position,
                payload,
                pull: None,
            } => Envelope::StreamItems {
                stream,
                position,
                payload,
            },
            Produced::Items {
                position,
                payload,
                pull: Some(id),
                ..
            } => {
                self.admission.pull_done(id);
                let attributes: Attributes = [(POSITION_ATTRIBUTE, position.to_string())]
                    .into_iter()
                    .collect();
                Envelope::Response {
                    id,
                    attributes,
                    payload,
                }
            }
            Produced::End {
                stream,
                error,
                pull: None,
            } => Envelope::StreamEnd {
                stream,
                error: error.map(|e| ErrorBody {
                    code: e.code(),
                    message: e.message().to_owned(),
                    data: None,
                }),
            },
            Produced::End {
                error,
                pull: Some(id),
                ..
            } => {
                self.admission.pull_done(id);
                match error {
                    None => Envelope::Response {
                        id,
                        attributes: end_of_pull(codec),
                        payload: codec.encode(&[(); 0]).unwrap_or_default(),
                    },
                    Some(e) => Envelope::Error {
                        id,
                        attributes: Attributes::new(),
                        error: ErrorBody {
                            code: e.code(),
                            message: e.message().to_owned(),
                            data: None,
                        },
                    },
                }
            }
        };
        if let Err(error) = self.write.write(&envelope) {
            tracing::warn!(%error, "stream batch over the peer's frame limit");
            let (stream, pull) = match envelope {
                Envelope::StreamItems { stream, .. } => (Some(stream), None),
                Envelope::Response { id, .. } => (None, Some(id)),
                _ => (None, None),
            };
            let message = format!("a batch of items is too large: {error}; use a smaller window");
            if let Some(stream) = stream {
                self.streams.remove(stream);
                let error = ErrorBody {
                    code: code::FRAME_TOO_LARGE,
                    message,
                    data: None,
                };
                let _ = self.write.write(&Envelope::StreamEnd {
                    stream,
                    error: Some(error),
                });
            } else if let Some(id) = pull {
                self.answer_error(id, code::FRAME_TOO_LARGE, message);
            }
        }
    }

    /// Releases our streams nobody consumed for the idle time, telling their consumers.
    fn poll_sweep(&mut self, cx: &mut TaskContext<'_>) {
        loop {
            if self.streams.is_empty() {
                self.sweep = None;
                return;
            }
            let period = self.streams.idle_timeout() / 2;
            let sweep = self
                .sweep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(period)));
            if sweep.as_mut().poll(cx).is_pending() {
                return;
            }
            self.sweep = None;
            let idle = self.streams.idle_timeout();
            for stream in self.streams.sweep() {
                tracing::debug!(stream, "stream released after its idle time");
                let error = ErrorBody {
                    code: code::STREAM_RELEASED,
                    message: format!("stream released: not consumed for {idle:?}"),
                    data: None,
                };
                let end = Envelope::StreamEnd {
                    stream,
                    error: Some(error),
                };
                let _ = self.write.write(&end);
            }
        }
    }

    // ===== stopping and ending =====

    /// Advances draining and closing; `Some` once the connection is over.
    fn poll_phase(&mut self, cx: &mut TaskContext<'_>) -> Option<Termination> {
        if let Phase::Draining { .. } = self.phase {
            self.poll_draining(cx);
        }
        match &mut self.phase {
            Phase::Open | Phase::Draining { .. } => None,
            Phase::Closing {
                linger,
                shut,
                read_closed,
            } => {
                if !*shut && self.write.poll_shutdown(cx).is_ready() {
                    *shut = true;
                }
                // NB. The linger bounds the close whatever the peer does (it may never read our
                // goodbye, nor close its side).
                let lingered = linger
                    .as_mut()
                    .map_or(true, |linger| linger.as_mut().poll(cx).is_ready());
                if (*shut && *read_closed) || lingered {
                    return Some(self.lifecycle.reason_or(Termination::Stopped));
                }
                None
            }
        }
    }

    /// Closes once the handlers are done (and the notifications queued before the stop are
    /// written), or at the drain timeout.
    fn poll_draining(&mut self, cx: &mut TaskContext<'_>) {
        let Phase::Draining {
            deadline,
            peer_gone,
        } = &mut self.phase
        else {
            return;
        };
        let expired = deadline.as_mut().poll(cx).is_ready();
        let drained = self.handlers.is_empty()
            && self.admission.is_idle()
            && (self.outbox.is_empty() || *peer_gone);
        if drained || expired {
            if !drained {
                tracing::warn!(
                    handlers = self.handlers.len(),
                    "drain timeout: dropping handlers still running"
                );
            }
            let peer_gone = *peer_gone;
            let reason = goodbye_reason(&self.lifecycle.reason_or(Termination::Stopped));
            self.close(Some(Envelope::Goodbye { reason }), peer_gone);
        }
    }

    /// Stops taking work: new calls fail, queued requests are refused, running handlers may
    /// finish (draining).
    pub(super) fn begin_stop(&mut self, reason: Termination) {
        if !self.is_open() {
            return;
        }
        tracing::debug!(%reason, "stopping");
        self.lifecycle.set_reason(reason);
        self.fail_outgoing(Failing::Stop);
        for id in self.admission.take_queued_requests() {
            self.answer_error(id, code::SHUTTING_DOWN, "the peer is shutting down".into());
        }
        let deadline = self
            .stop_deadline
            .take()
            .unwrap_or_else(|| Box::pin(tokio::time::sleep(self.config.drain_timeout)));
        self.phase = Phase::Draining {
            deadline,
            peer_gone: false,
        };
    }

    /// The peer said goodbye: it has failed the calls it made, so our answers to them are
    /// useless and those handlers stop; its notifications still get handled (drained).
    pub(super) fn on_goodbye(&mut self, reason: String) {
        self.lifecycle
            .set_reason(Termination::PeerStopped { reason });
        self.fail_outgoing(Failing::All);
        for run in self.handlers.cancel_requests() {
            self.admission.done(&run);
        }
        self.admission.take_queued_requests();
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

    /// Sends the last envelope (goodbye or fatal) and waits for the peer's end of file; with
    /// none (the peer sent a fatal and is gone), ends at once.
    pub(super) fn close(&mut self, last: Option<Envelope>, read_closed: bool) {
        if self.is_closing() {
            return;
        }
        tracing::trace!(running = self.handlers.len(), ?last, "closing");
        self.fail_outgoing(Failing::All);
        self.handlers.abort_all();
        self.admission.clear();
        // No stream is polled once closing: ids left here would only keep the loop unsettled.
        self.woken.clear();
        for command in self.outbox.drain() {
            if let Command::Notify(notification) = command {
                tracing::debug!(method = %notification.method, "notification not written before close");
            }
        }
        let linger = last.map(|last| {
            let _ = self.write.write(&last);
            Box::pin(tokio::time::sleep(LINGER))
        });
        self.phase = Phase::Closing {
            linger,
            shut: false,
            read_closed,
        };
    }

    /// Ends the connection with a fatal error sent to the peer.
    pub(super) fn local_fatal(&mut self, code: i64, message: String) {
        tracing::error!(code, %message, "sending fatal error to the peer");
        self.lifecycle.set_reason(Termination::LocalFatal {
            code,
            message: message.clone(),
        });
        self.close(Some(Envelope::Fatal { code, message }), false);
    }

    /// The peer broke a rule: it is told why (a fatal), and the connection ends with the rule.
    pub(super) fn violation(&mut self, error: ProtocolError) {
        tracing::warn!(%error, "the peer broke the protocol: cutting it off");
        let code = match error {
            ProtocolError::FrameTooLarge { .. } => code::FRAME_TOO_LARGE,
            ProtocolError::AdmissionExceeded { .. } => code::OVERLOADED,
            _ => code::INVALID_REQUEST,
        };
        let message = error.to_string();
        let read_closed = matches!(error, ProtocolError::FrameTooLarge { .. });
        self.lifecycle.set_reason(Termination::Protocol(error));
        self.close(Some(Envelope::Fatal { code, message }), read_closed);
    }

    pub(super) fn poll_run(&mut self, cx: &mut TaskContext<'_>) -> Poll<Termination> {
        for _ in 0..BUDGET {
            let phase = self.phase_state();
            self.unfinished = false;
            let mut progress = self.poll_commands(cx);
            progress |= self.flush_outbox();
            progress |= self.poll_handlers(cx);
            match self.poll_read(cx) {
                Ok(read) => progress |= read,
                Err(reason) => return Poll::Ready(self.finish(reason)),
            }
            progress |= self.start_admitted(cx);
            progress |= self.poll_streams(cx);
            self.poll_sweep(cx);
            self.send_notification_credit();
            if let Some(reason) = self.poll_phase(cx) {
                return Poll::Ready(self.finish(reason));
            }
            let (had_room, was_over_cap) = (self.write.has_room(), self.write.over_cap());
            match self.write.poll_flush(cx) {
                Poll::Ready(Err(WriteError::Io(e))) => {
                    return Poll::Ready(self.finish(Termination::transport(e)));
                }
                Poll::Ready(Err(WriteError::Stalled(e))) => {
                    tracing::warn!(error = %e, "the peer does not read: cutting it off");
                    return Poll::Ready(self.finish(Termination::Protocol(e)));
                }
                _ => {}
            }
            // NB. Room made by this flush is for the work that waited for it (new calls,
            // handlers, stream items): nothing else would wake the task for it.
            let room_made =
                (!had_room && self.write.has_room()) || (was_over_cap && !self.write.over_cap());
            // NB. Another pass only for work that waits for something this pass changed (room,
            // the peer's window, a free slot, the phase) or that a step left for the next turn.
            // Every other source returned `Pending` with the task's waker registered, so a
            // pass that would find nothing is not run (it cost a third of a lone call's CPU).
            if !room_made && !(progress && (self.is_unsettled() || self.phase_state() != phase)) {
                self.end_turn();
                return Poll::Pending;
            }
        }
        // Used the budget with work left: let other tasks run, then come back.
        self.end_turn();
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    // ===== the handlers =====

    /// Polls the woken handlers and writes their answers. Over the write buffer's hard cap it
    /// polls none: their answers would only pile up for a peer that does not read (it is cut
    /// off after the stall timeout); a reading peer drains the buffer and wakes them again.
    fn poll_handlers(&mut self, cx: &mut TaskContext<'_>) -> bool {
        let _polling = self.lifecycle.enter_handlers();
        let mut progress = false;
        while !self.write.over_cap() {
            let Poll::Ready(Some(finished)) = self.handlers.poll_finished(cx) else {
                break;
            };
            self.on_finished(finished);
            progress = true;
        }
        progress
    }

    /// Starts the admitted work that has room: nested requests at once, the rest while a
    /// handler slot is free and the write buffer has room.
    fn start_admitted(&mut self, cx: &mut TaskContext<'_>) -> bool {
        let _polling = self.lifecycle.enter_handlers();
        let mut progress = false;
        while !self.admission.is_idle() && !self.is_closing() {
            match self.poll_service_ready(cx) {
                Poll::Ready(true) => {}
                Poll::Ready(false) => return true,
                Poll::Pending => break,
            }
            let room = self.slot_free() && self.write.has_room();
            let Some(queued) = self.admission.next(room) else {
                break;
            };
            self.dispatch(queued);
            progress = true;
        }
        progress
    }

    /// Whether the handler service can take a message; `Ready(false)` when it failed (the
    /// connection ends with a fatal error).
    pub(super) fn poll_service_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<bool> {
        let service = &mut self.service;
        let failure = match catch_unwind(AssertUnwindSafe(|| service.poll_ready(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(()))) => return Poll::Ready(true),
            Ok(Poll::Ready(Err(e))) => format!("handler failed: {}", e.into_handler_error()),
            Err(_) => "the handler service panicked in poll_ready".to_owned(),
        };
        tracing::error!(%failure, "the handler service cannot take messages");
        self.local_fatal(code::INTERNAL_ERROR, failure);
        Poll::Ready(false)
    }
}

/// What the drop guard needs: no bounds on the service beyond the struct's own.
impl<S: Service<Incoming>> Driver<S> {
    /// Work that no waker announces: it waits for room, window or a slot that this turn may
    /// have made, or a step stopped at its share of the turn.
    fn is_unsettled(&self) -> bool {
        self.unfinished
            || !self.outbox.is_empty()
            || !self.admission.is_idle()
            || !self.woken.is_empty()
            || self.write.over_cap()
    }

    /// The phase, as far as a step's next pass depends on it.
    fn phase_state(&self) -> (u8, bool, bool) {
        match &self.phase {
            Phase::Open => (0, false, false),
            Phase::Draining { peer_gone, .. } => (1, *peer_gone, false),
            Phase::Closing {
                shut, read_closed, ..
            } => (2, *shut, *read_closed),
        }
    }

    /// Gives back in-flight permits and publishes the counters.
    fn end_turn(&mut self) {
        self.released.give_back(&self.lifecycle);
        self.lifecycle
            .set_counts(self.outgoing.len(), self.handlers.len());
    }

    /// What an answered or cancelled call held goes back: its permit, its place in the window.
    pub(super) fn release_held(&mut self, held: Held) {
        self.released.answered(held.permit);
        self.window.remove(held.window);
    }

    pub(super) fn terminated(&self) -> CallError {
        CallError::Terminated(self.lifecycle.reason_or(Termination::Stopped))
    }

    /// Fails the calls awaiting an answer or waiting to be written, and ends every stream. At
    /// our own stop (`Failing::Stop`) the peer is told to stop working on them, and the nested
    /// calls of the handlers that drain stay; otherwise every call fails.
    fn fail_outgoing(&mut self, failing: Failing) {
        let reason = self.lifecycle.reason_or(Termination::Stopped);
        self.streams.close();
        self.consumers.terminate_all(&reason);
        let stop = failing == Failing::Stop;
        for (id, held) in self
            .outgoing
            .fail(!stop, || CallError::Terminated(reason.clone()))
        {
            self.release_held(held);
            if stop {
                let _ = self.write.write(&Envelope::Cancel { id });
            }
        }
        let released = &mut self.released;
        self.outbox.fail_calls(
            !stop,
            || CallError::Terminated(reason.clone()),
            |call| released.message(call),
        );
    }

    /// Ends the connection: fails everything still waiting and runs the `on_stop` callbacks.
    /// Also what the drop guard calls: it must not panic.
    pub(super) fn finish(&mut self, reason: Termination) -> Termination {
        self.lifecycle.set_reason(reason);
        let reason = self.lifecycle.reason_or(Termination::Stopped);
        // NB. No timer: this may run outside any runtime (a drop at runtime shutdown).
        self.phase = Phase::Closing {
            linger: None,
            shut: true,
            read_closed: true,
        };
        self.fail_outgoing(Failing::All);
        self.outbox.drain().for_each(drop);
        self.handlers.abort_all();
        self.admission.clear();
        fail_queued(&mut self.commands, &reason);
        if reason.is_graceful() {
            tracing::debug!(%reason, "connection closed");
        } else {
            tracing::warn!(%reason, "connection closed");
        }
        self.end_turn();
        self.lifecycle.finish();
        reason
    }
}

/// `Err` for a call or notification the codec's wire cannot carry: on the PHP wire, one whose
/// payload is not an object (the class is the method, the properties are the payload's).
fn carried(codec: Codec, message: &Outbound) -> Result<(), crate::error::CodecError> {
    #[cfg(feature = "php")]
    if codec.is_php()
        && message.method.as_str() != crate::stream::PULL_METHOD
        && !message.payload.starts_with(b"O:")
    {
        return Err(crate::error::CodecError::new(
            "php",
            format_args!(
                "a message to a PHP peer is an object, and `{}` has another payload: send a \
                 struct (its fields are the properties of the class the method names)",
                message.method
            ),
        ));
    }
    let _ = (codec, message);
    Ok(())
}

/// The attributes of the answer that ends a pulled stream: none, but on the PHP wire, where
/// the end is a message of its own (`continue=false`).
pub(super) fn end_of_pull(codec: Codec) -> Attributes {
    #[cfg(feature = "php")]
    if codec.is_php() {
        let end = crate::codec::php::END_POSITION;
        return [(POSITION_ATTRIBUTE, end)].into_iter().collect();
    }
    let _ = codec;
    Attributes::new()
}
