//! The peer's side: frames, envelopes, admission of new work, dispatch to the handler, and
//! the answers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tower_service::Service;

use super::admission::{Queued, Verdict};
use super::consumers::Delivery;
use super::driver::{end_of_pull, Driver, Phase, TURN};
use super::handlers::{Finished, Outcome, Run};
use crate::context::Context;
use crate::dispatcher::InboundEnvelope;
use crate::envelope::{Envelope, EnvelopeKind, ErrorBody, Method, PartialHeader};
use crate::error::{
    code, CallError, HandlerError, IntoHandlerError, ProtocolError, RemoteError, Termination,
};
use crate::handler::HandlerResult;
use crate::handler::{Failed, Incoming, Reply, ReplyBody};
use crate::message::Attributes;
use crate::shared::RawResponse;
use crate::stream::storage::{panic_message, Granted, PullRefused};
use crate::stream::PULL_METHOD;
use crate::transport::frame::Frame;

/// What the PHP library answers a pull of an iterator it does not have (with code 0).
const PHP_NOT_FOUND: &str = "Iterator not found";

impl<S> Driver<S>
where
    S: Service<Incoming, Response = Reply>,
    S::Error: IntoHandlerError,
{
    /// Reads and handles frames until the transport has no more for now. Never stops for
    /// back-pressure: `Ok(true)` when anything was read.
    pub(super) fn poll_read(&mut self, cx: &mut TaskContext<'_>) -> Result<bool, Termination> {
        let mut progress = false;
        for _ in 0..TURN {
            if let Phase::Closing {
                read_closed: true, ..
            }
            | Phase::Draining {
                peer_gone: true, ..
            } = self.phase
            {
                return Ok(progress);
            }
            if let Some(frame) = self.reader.next_frame() {
                self.on_frame(frame, cx);
                progress = true;
                continue;
            }
            match self.reader.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    self.on_eof()?;
                    return Ok(true);
                }
                Poll::Ready(Ok(_)) => progress = true,
                Poll::Ready(Err(e)) => {
                    if let Phase::Closing { read_closed, .. } = &mut self.phase {
                        // The peer reset the connection after our goodbye: we are done anyway.
                        *read_closed = true;
                        return Ok(true);
                    }
                    return Err(Termination::transport(e));
                }
                Poll::Pending => return Ok(progress),
            }
        }
        // The turn's share is read: come back for more.
        self.unfinished = true;
        Ok(true)
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

    fn on_frame(&mut self, frame: Frame, cx: &mut TaskContext<'_>) {
        let codec = self.config.codec;
        let body = match frame {
            Frame::TooLarge { len, prefix } => {
                let text = prefix
                    .iter()
                    .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
                    .then(|| String::from_utf8_lossy(&prefix).into_owned());
                let max = self.config.limits.max_frame_length;
                return self.violation(ProtocolError::FrameTooLarge { len, max, text });
            }
            Frame::Malformed(reason) => {
                return self.violation(ProtocolError::MalformedFrame { reason });
            }
            Frame::Whole(body) => body,
        };
        match codec.decode_envelope(body).map(|e| self.as_notification(e)) {
            Ok(envelope) => match self.config.limits.check_envelope(&envelope) {
                Ok(()) => self.on_envelope(envelope, cx),
                Err(error) => {
                    let header = PartialHeader {
                        kind: Some(envelope.kind()),
                        id: envelope.id(),
                        method: None,
                    };
                    tracing::warn!(%error, kind = ?header.kind, id = ?header.id, "envelope over a limit discarded");
                    let message = format!("malformed request: {error}");
                    self.reject(
                        header,
                        code::INVALID_REQUEST,
                        message,
                        CallError::Limit(error),
                    );
                }
            },
            Err(mut e) => {
                if self.is_notification(e.header.method.as_ref()) {
                    // Never answered, even when it cannot be read.
                    e.header.kind = Some(EnvelopeKind::Notification);
                }
                tracing::warn!(error = %e.error, kind = ?e.header.kind, id = ?e.header.id, "undecodable frame discarded");
                let message = format!("malformed request: {}", e.error);
                self.reject(
                    e.header,
                    code::INVALID_REQUEST,
                    message,
                    CallError::Decode(e.error),
                );
            }
        }
    }

    /// A request of a class the builder named a notification (the PHP wire has no other way
    /// to tell them).
    fn as_notification(&self, envelope: Envelope) -> Envelope {
        match envelope {
            Envelope::Request {
                method,
                attributes,
                payload,
                ..
            } if self.is_notification(Some(&method)) => Envelope::Notification {
                method,
                attributes,
                payload,
            },
            envelope => envelope,
        }
    }

    /// `true` for a method the builder named a notification, on the PHP wire.
    fn is_notification(&self, method: Option<&Method>) -> bool {
        let classes = &self.config.notification_classes;
        match method {
            Some(method) if self.config.codec.is_php() => {
                classes.iter().any(|class| class == method.as_str())
            }
            _ => false,
        }
    }

    /// A frame that cannot be handled: a request is answered with an error, an answer fails
    /// the call waiting for it; anything else was logged by the caller.
    fn reject(&mut self, header: PartialHeader, code: i64, message: String, error: CallError) {
        match (header.kind, header.id) {
            (Some(EnvelopeKind::Request), Some(id)) => self.answer_error(id, code, message),
            (Some(EnvelopeKind::Response | EnvelopeKind::Error), Some(id)) => {
                if let Some(held) = self.outgoing.complete_request(id, Err(Box::new(error))) {
                    self.release_held(held);
                }
            }
            _ => {}
        }
    }

    fn on_envelope(&mut self, envelope: Envelope, cx: &mut TaskContext<'_>) {
        tracing::trace!(kind = ?envelope.kind(), id = ?envelope.id(), "inbound");
        if let Some(observer) = &self.config.observer {
            let observer = observer.as_ref();
            if catch_unwind(AssertUnwindSafe(|| observe(observer, &envelope))).is_err() {
                tracing::error!("the on_inbound observer panicked; the envelope is handled anyway");
            }
        }
        if let Phase::Closing { read_closed, .. } = &mut self.phase {
            // Goodbye or fatal already sent: only the peer's end matters now.
            if matches!(envelope, Envelope::Goodbye { .. } | Envelope::Fatal { .. }) {
                *read_closed = true;
            }
            return;
        }
        let codec = self.config.codec;
        match envelope {
            Envelope::Request {
                id,
                method,
                attributes,
                timeout_us,
                parent,
                payload,
            } => {
                let request = Inbound {
                    method,
                    attributes,
                    payload,
                };
                self.on_request(id, timeout_us, parent, request, cx)
            }
            Envelope::Notification {
                method,
                attributes,
                payload,
            } => {
                let notification = Inbound {
                    method,
                    attributes,
                    payload,
                };
                self.on_notification(notification, cx)
            }
            Envelope::Response {
                id,
                attributes,
                payload,
            } => {
                let answer = Ok(RawResponse {
                    payload,
                    attributes,
                    codec,
                });
                match self.outgoing.complete_request(id, answer) {
                    Some(held) => self.release_held(held),
                    None => tracing::debug!(
                        id,
                        "response for no pending call (late or cancelled) dropped"
                    ),
                }
            }
            Envelope::Error { id, error, .. } => {
                let answer = Err(Box::new(CallError::Remote(remote(error, codec))));
                match self.outgoing.complete_request(id, answer) {
                    Some(held) => self.release_held(held),
                    None => {
                        tracing::debug!(id, "error for no pending call (late or cancelled) dropped")
                    }
                }
            }
            Envelope::Cancel { id } => {
                if let Some(run) = self.handlers.cancel_request(id) {
                    tracing::debug!(id, "peer cancelled a request");
                    self.admission.done(&run);
                } else if !self.admission.cancel(id) && self.admission.is_pull(id) {
                    self.streams.cancel_pull(id);
                    self.admission.pull_done(id);
                }
            }
            Envelope::Fatal { code, message } => {
                tracing::error!(code, %message, "peer sent a fatal error");
                self.lifecycle
                    .set_reason(Termination::PeerFatal { code, message });
                // Nothing more is read or written: the peer is gone after a fatal. A PHP peer
                // still reads until our stop marker (it sends one itself).
                let last = self.config.codec.is_php().then(|| Envelope::Goodbye {
                    reason: String::new(),
                });
                self.close(last, true);
            }
            Envelope::Goodbye { reason } => self.on_goodbye(reason),
            Envelope::StreamItems {
                stream,
                position,
                payload,
            } => match self.consumers.items(stream, position, payload) {
                Delivery::Done => {}
                Delivery::StreamFailed => {
                    let _ = self.write.write(&Envelope::StreamCancel { stream });
                }
                Delivery::Violation(error) => self.violation(error),
            },
            Envelope::StreamEnd { stream, error } => {
                self.consumers.end(stream, error.map(|e| remote(e, codec)));
            }
            Envelope::StreamCredit { stream, credit } => {
                if self.streams.grant(stream, credit) == Granted::PullMode {
                    let error = ErrorBody {
                        code: code::INVALID_REQUEST,
                        message: format!(
                            "stream {stream} is in pull mode (it was pulled); credit is for \
                             windowed streams: the stream is released"
                        ),
                        data: None,
                    };
                    let end = Envelope::StreamEnd {
                        stream,
                        error: Some(error),
                    };
                    let _ = self.write.write(&end);
                    self.answer_orphaned_pulls();
                }
            }
            Envelope::StreamCancel { stream } => {
                if self.streams.remove(stream) {
                    tracing::debug!(stream, "peer dropped a stream");
                }
                // NB. At once: a pull it left waiting still counts against the peer's requests.
                self.answer_orphaned_pulls();
            }
            Envelope::NotificationCredit { credit } => self.window.credit(credit),
        }
    }

    fn on_request(
        &mut self,
        id: u64,
        timeout_us: u64,
        parent: u64,
        request: Inbound,
        cx: &mut TaskContext<'_>,
    ) {
        let Inbound {
            method,
            attributes,
            payload,
        } = request;
        let nested = parent != 0 && self.outgoing.contains(parent);
        let open = match self.phase {
            Phase::Open => true,
            Phase::Draining { peer_gone, .. } => nested && !peer_gone,
            Phase::Closing { .. } => false,
        };
        if !open {
            let message = "the peer is shutting down".into();
            return self.answer_error(id, code::SHUTTING_DOWN, message);
        }
        if parent != 0 && !nested {
            let message = format!(
                "the call this request is nested in (id {parent}) is no longer pending: it was \
                 answered or cancelled"
            );
            return self.answer_error(id, code::INVALID_REQUEST, message);
        }
        if self.handlers.is_running(id) || self.admission.is_queued(id) {
            // Answering would be read as the answer to the first request with this id.
            tracing::warn!(id, %method, "request reuses the id of a pending request: dropped");
            return;
        }
        if method.as_str() == PULL_METHOD {
            return self.pull(id, &payload);
        }
        let deadline = (timeout_us > 0)
            .then(|| Instant::now().checked_add(Duration::from_micros(timeout_us)))
            .flatten();
        let run = Run::new(Some(id), method, deadline, nested, payload.len());
        match self.admission.request(&run) {
            Verdict::Admitted => {
                let queued = Queued {
                    run,
                    attributes,
                    payload,
                };
                self.start_or_defer(queued, cx);
            }
            Verdict::Refused { code, message } => self.answer_error(id, code, message),
            Verdict::CutOff(error) => self.violation(error),
        }
    }

    fn on_notification(&mut self, notification: Inbound, cx: &mut TaskContext<'_>) {
        let Inbound {
            method,
            attributes,
            payload,
        } = notification;
        if self.is_closing() {
            tracing::debug!(%method, "notification during shutdown dropped");
            return;
        }
        let run = Run::new(None, method, None, false, payload.len());
        match self.admission.notification(&run) {
            Verdict::CutOff(error) => self.violation(error),
            _ => {
                let queued = Queued {
                    run,
                    attributes,
                    payload,
                };
                self.start_or_defer(queued, cx);
            }
        }
    }

    /// Starts admitted work at once when it may (nothing waits before it, a slot is free, the
    /// handler is ready), or queues it.
    fn start_or_defer(&mut self, queued: Queued, cx: &mut TaskContext<'_>) {
        let nested = queued.run.nested;
        let room = nested || (self.slot_free() && self.write.has_room());
        if room && self.admission.may_start_now(nested) {
            match self.poll_service_ready(cx) {
                Poll::Ready(true) => {
                    if queued.run.id.is_none() {
                        self.admission.started_notification();
                    }
                    let _polling = self.lifecycle.enter_handlers();
                    return self.dispatch(queued);
                }
                // The connection ends: nothing starts any more.
                Poll::Ready(false) => return,
                Poll::Pending => {}
            }
        }
        self.admission.defer(queued);
    }

    /// A pull-mode request: answered with the stream's next item once it has one.
    fn pull(&mut self, id: u64, payload: &Bytes) {
        let Ok(stream) = self.config.codec.decode::<u64>(payload) else {
            // NB. A PHP peer names an iterator by any int: a negative one is none of ours.
            return match self.config.codec.is_php() {
                true => self.answer_error(id, 0, PHP_NOT_FOUND.into()),
                false => self.answer_error(id, code::INVALID_PARAMS, "no such stream".into()),
            };
        };
        match self.admission.pull(id) {
            Verdict::Admitted => {}
            Verdict::Refused { code, message } => return self.answer_error(id, code, message),
            Verdict::CutOff(error) => return self.violation(error),
        }
        let refusal = match self.streams.pull(stream, id) {
            Ok(()) => return,
            Err(PullRefused::Unknown) if self.config.codec.is_php() => {
                // As PHP answers: an iterator that ended goes on ending; any other id is not
                // found.
                self.admission.pull_done(id);
                if self.streams.was_issued(stream) {
                    let codec = self.config.codec;
                    let end = Envelope::Response {
                        id,
                        attributes: end_of_pull(codec),
                        payload: codec.encode(&[(); 0]).unwrap_or_default(),
                    };
                    let _ = self.write.write(&end);
                    return;
                }
                return self.answer_error(id, 0, PHP_NOT_FOUND.into());
            }
            Err(PullRefused::Unknown) => (code::INVALID_PARAMS, format!("no stream {stream}")),
            Err(PullRefused::Released) => {
                let idle = self.streams.idle_timeout();
                let message = format!("stream {stream} released: not consumed for {idle:?}");
                (code::STREAM_RELEASED, message)
            }
            Err(PullRefused::Windowed) => (
                code::INVALID_REQUEST,
                format!(
                    "stream {stream} is in windowed mode (it was granted credit); pull requests \
                     are for pull-mode streams"
                ),
            ),
            Err(PullRefused::AlreadyPending) => (
                code::INVALID_REQUEST,
                format!("a pull of stream {stream} is pending already: pull one item at a time"),
            ),
        };
        self.admission.pull_done(id);
        self.answer_error(id, refusal.0, refusal.1);
    }

    pub(super) fn on_finished(&mut self, finished: Finished) {
        let Finished { run, outcome } = finished;
        tracing::trace!(id = ?run.id, method = %run.method, outcome = outcome.describe(), "handler finished");
        self.admission.done(&run);
        let failed = Failed {
            method: run.method.as_str(),
            id: run.id,
        };
        let handler = &self.config.error_handler;
        // NB. A handler that failed once its caller's deadline passed failed for that: most
        // likely a nested call timed out. The caller gets the deadline error, as its own timer
        // would have told it.
        let late = run
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline);
        let outcome = match outcome {
            Outcome::Done(Err(error)) if late && run.id.is_some() => {
                tracing::debug!(method = %run.method, %error, "handler failed past its deadline");
                Outcome::Expired
            }
            outcome => outcome,
        };
        let reply = match outcome {
            Outcome::Done(Ok(reply)) => Ok(reply),
            Outcome::Done(Err(error)) => {
                catch_unwind(AssertUnwindSafe(|| handler.handle_error(failed, error)))
            }
            Outcome::Panicked(panic) => {
                catch_unwind(AssertUnwindSafe(|| handler.handle_panic(failed, panic)))
            }
            Outcome::Expired => Ok(Reply::error(
                code::DEADLINE_EXCEEDED,
                "the caller's deadline passed before the handler finished",
            )),
        };
        let reply = reply.unwrap_or_else(|panic| {
            tracing::error!(method = %run.method, panic = panic_message(&*panic), "the error handler panicked");
            match run.id {
                Some(_) => Reply::error(code::INTERNAL_ERROR, "the request failed"),
                None => Reply::nothing(),
            }
        });
        self.send_reply(run.id, reply);
    }

    fn send_reply(&mut self, id: Option<u64>, reply: Reply) {
        let (body, mut attributes) = reply.into_parts();
        if self.config.codec.is_php() {
            // NB. Not on this wire; and the pull answers' position attribute means something
            // to its writer.
            attributes = Attributes::new();
        }
        let id = match (body, id) {
            (ReplyBody::Fatal { code, message }, _) => return self.local_fatal(code, message),
            (_, None) => return, // notifications are never answered
            (ReplyBody::Value(payload), Some(id)) => {
                let response = Envelope::Response {
                    id,
                    attributes,
                    payload,
                };
                match self.write.write(&response) {
                    Ok(()) => return,
                    Err(error) => {
                        let message = format!("response too large: {error}");
                        return self.answer_error(id, code::FRAME_TOO_LARGE, message);
                    }
                }
            }
            (ReplyBody::Error(error), Some(id)) => {
                let envelope = Envelope::Error {
                    id,
                    attributes,
                    error: *error,
                };
                if self.write.write(&envelope).is_ok() {
                    return;
                }
                id
            }
            (ReplyBody::Nothing, Some(id)) => id,
        };
        self.answer_error(
            id,
            code::INTERNAL_ERROR,
            "the handler gave no answer to a request".into(),
        );
    }

    pub(super) fn answer_error(&mut self, id: u64, code: i64, message: String) {
        let envelope = Envelope::Error {
            id,
            attributes: Attributes::new(),
            error: ErrorBody {
                code,
                message,
                data: None,
            },
        };
        if self.write.write(&envelope).is_err() {
            tracing::error!(id, "error answer over the peer's frame limit dropped");
        }
    }

    /// Starts one admitted request or notification on the handler.
    pub(super) fn dispatch(&mut self, queued: Queued) {
        let Queued {
            run,
            attributes,
            payload,
        } = queued;
        let (slot, over) = self.handlers.reserve();
        let mut context = Context::new(
            self.shared.clone(),
            self.config.codec,
            run.id,
            run.method.clone(),
            attributes,
            run.deadline,
            Some(over),
        );
        context.extensions_mut().fill_from(&self.config.extensions);
        if let Some(factory) = &self.config.context_factory {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| factory.prepare(&mut context))) {
                self.handlers.unreserve(slot);
                let message = format!("the context factory panicked: {}", panic_message(&*panic));
                tracing::error!(method = %run.method, %message);
                let outcome = Outcome::Done(Err(HandlerError::internal(message)));
                return self.on_finished(Finished { run, outcome });
            }
        }
        let span = tracing::debug_span!("handle", method = %run.method, id = run.id);
        let service = &mut self.service;
        let call = catch_unwind(AssertUnwindSafe(|| {
            let _entered = span.enter();
            HandlerResult::new(service.call(Incoming { context, payload }))
        }));
        match call {
            Ok(fut) => {
                if let Some(finished) = self.handlers.start(slot, fut, run, span) {
                    self.on_finished(finished);
                }
            }
            Err(panic) => {
                self.handlers.unreserve(slot);
                let outcome = Outcome::Panicked(panic);
                self.on_finished(Finished { run, outcome });
            }
        }
    }
}

/// A request or notification as it came, before admission.
struct Inbound {
    method: Method,
    attributes: Attributes,
    payload: Bytes,
}

fn remote(error: ErrorBody, codec: crate::codec::Codec) -> RemoteError {
    RemoteError {
        code: error.code,
        message: error.message,
        data: error.data,
        codec,
    }
}

fn observe(observer: &(dyn Fn(&InboundEnvelope<'_>) + Send + Sync), envelope: &Envelope) {
    let (method, attributes, payload_len) = match envelope {
        Envelope::Request {
            method,
            attributes,
            payload,
            ..
        }
        | Envelope::Notification {
            method,
            attributes,
            payload,
        } => (Some(method.as_str()), Some(attributes), payload.len()),
        Envelope::Response {
            attributes,
            payload,
            ..
        } => (None, Some(attributes), payload.len()),
        Envelope::Error { attributes, .. } => (None, Some(attributes), 0),
        _ => (None, None, 0),
    };
    observer(&InboundEnvelope {
        kind: envelope.kind(),
        id: envelope.id(),
        method,
        attributes,
        payload_len,
    });
}
