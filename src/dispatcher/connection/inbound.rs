//! The peer's side: frames, envelopes, dispatch to the handler, and answers.

use super::*;

impl<S> Driver<S>
where
    S: Service<Incoming, Response = Reply>,
    S::Error: IntoHandlerError,
{
    pub(super) fn on_frame(&mut self, frame: Frame) {
        let codec = self.config.codec;
        match frame {
            Frame::TooLarge { len, head } => {
                let header = match codec.decode_envelope(head) {
                    Ok(envelope) => PartialHeader {
                        kind: Some(envelope.kind()),
                        id: envelope.id(),
                    },
                    Err(e) => e.header,
                };
                let error = LimitExceeded {
                    limit: Limit::FrameLength,
                    value: len,
                    max: self.config.limits.max_frame_length,
                };
                tracing::warn!(%error, kind = ?header.kind, id = ?header.id, "oversized frame discarded");
                let message = format!("request too large: {error}");
                self.reject(
                    header,
                    code::FRAME_TOO_LARGE,
                    message,
                    CallError::Limit(error),
                );
            }
            Frame::Whole(body) => match codec.decode_envelope(body) {
                Ok(envelope) => match self.config.limits.check_envelope(&envelope) {
                    Ok(()) => self.on_envelope(envelope),
                    Err(error) => {
                        let header = PartialHeader {
                            kind: Some(envelope.kind()),
                            id: envelope.id(),
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
                Err(e) => {
                    tracing::warn!(error = %e.error, kind = ?e.header.kind, id = ?e.header.id, "undecodable frame discarded");
                    let message = format!("malformed request: {}", e.error);
                    self.reject(
                        e.header,
                        code::INVALID_REQUEST,
                        message,
                        CallError::Decode(e.error),
                    );
                }
            },
        }
    }

    /// A frame that cannot be handled: a request is answered with an error, an answer fails
    /// the call waiting for it; anything else was logged by the caller.
    pub(super) fn reject(
        &mut self,
        header: PartialHeader,
        code: i64,
        message: String,
        error: CallError,
    ) {
        match (header.kind, header.id) {
            (Some(EnvelopeKind::Request), Some(id)) => self.answer_error(id, code, message),
            (Some(EnvelopeKind::Response | EnvelopeKind::Error), Some(id)) => {
                self.outgoing.complete_request(id, Err(error));
            }
            _ => {}
        }
    }

    pub(super) fn on_envelope(&mut self, envelope: Envelope) {
        tracing::trace!(kind = ?envelope.kind(), id = ?envelope.id(), "inbound");
        if let Some(observer) = &self.config.observer {
            observe(observer.as_ref(), &envelope);
        }
        if let Phase::Closing { read_closed, .. } = &mut self.phase {
            // Goodbye or fatal already sent: only the peer's end matters now.
            if matches!(envelope, Envelope::Goodbye | Envelope::Fatal { .. }) {
                *read_closed = true;
            }
            return;
        }
        match envelope {
            Envelope::Request {
                id,
                method,
                attributes,
                timeout_us,
                payload,
            } => {
                if !matches!(self.phase, Phase::Open) {
                    return self.answer_error(
                        id,
                        code::SHUTTING_DOWN,
                        "the peer is shutting down".into(),
                    );
                }
                if method.as_str() == PULL_METHOD {
                    return self.pull(id, &payload);
                }
                if self.incoming.is_running(id) {
                    // Answering would be read as the answer to the first request with this id.
                    tracing::warn!(id, %method, "request reuses the id of a running request: dropped");
                    return;
                }
                let deadline =
                    (timeout_us > 0).then(|| Instant::now() + Duration::from_micros(timeout_us));
                self.dispatch(Some(id), method, attributes, deadline, payload);
            }
            Envelope::Notification {
                method,
                attributes,
                payload,
            } => {
                if !matches!(self.phase, Phase::Open) {
                    tracing::debug!(%method, "notification during shutdown dropped");
                    return;
                }
                self.dispatch(None, method, attributes, None, payload);
            }
            Envelope::Response {
                id,
                attributes,
                payload,
            } => {
                let codec = self.config.codec;
                let answer = Ok(RawResponse {
                    payload,
                    attributes,
                    codec,
                });
                if !self.outgoing.complete_request(id, answer) {
                    tracing::debug!(
                        id,
                        "response for no pending call (late or cancelled) dropped"
                    );
                }
            }
            Envelope::Error { id, error, .. } => {
                let answer = Err(CallError::Remote(RemoteError {
                    code: error.code,
                    message: error.message,
                    data: error.data,
                    codec: self.config.codec,
                }));
                if !self.outgoing.complete_request(id, answer) {
                    tracing::debug!(id, "error for no pending call (late or cancelled) dropped");
                }
            }
            Envelope::Cancel { id } => {
                if self.incoming.cancel_request(id) {
                    tracing::debug!(id, "peer cancelled a request");
                }
            }
            Envelope::Fatal { code, message } => {
                tracing::error!(code, %message, "peer sent a fatal error");
                self.lifecycle
                    .set_reason(Termination::PeerFatal { code, message });
                // Nothing more is read or written: the peer is gone after a fatal.
                self.close_now();
            }
            Envelope::Goodbye => self.on_goodbye(),
            Envelope::StreamItems {
                stream,
                position,
                payload,
            } => {
                let delivered = self.streams_in.get(&stream).map(|events| {
                    events
                        .send(StreamEvent::Items { position, payload })
                        .is_ok()
                });
                if delivered == Some(false) {
                    self.streams_in.remove(&stream);
                }
            }
            Envelope::StreamEnd { stream, error } => {
                if let Some(events) = self.streams_in.remove(&stream) {
                    let error = error.map(|e| RemoteError {
                        code: e.code,
                        message: e.message,
                        data: e.data,
                        codec: self.config.codec,
                    });
                    let _ = events.send(StreamEvent::End(error));
                }
            }
            Envelope::StreamCredit { stream, credit } => {
                self.lifecycle
                    .streams
                    .grant(stream, credit, &self.stream_out_tx);
            }
            Envelope::StreamCancel { stream } => {
                if self.lifecycle.streams.remove(stream) {
                    tracing::debug!(stream, "peer dropped a stream");
                }
            }
        }
    }

    /// Ends without a last envelope (after the peer's fatal).
    pub(super) fn close_now(&mut self) {
        self.fail_outgoing(false);
        self.incoming.abort_all();
        self.phase = Phase::Closing {
            linger: Box::pin(tokio::time::sleep(Duration::ZERO)),
            shut: false,
            read_closed: true,
        };
    }

    pub(super) fn dispatch(
        &mut self,
        id: Option<u64>,
        method: Method,
        attributes: Attributes,
        deadline: Option<Instant>,
        payload: Bytes,
    ) {
        let (slot, over) = self.incoming.reserve();
        let mut context = Context::new(
            self.shared.clone(),
            self.config.codec,
            id,
            method.clone(),
            attributes,
            deadline,
            Some(over),
        );
        if let Some(factory) = &self.config.context_factory {
            factory.prepare(&mut context);
        }
        let span = tracing::debug_span!("handle", %method, id);
        let service = &mut self.service;
        let call = catch_unwind(AssertUnwindSafe(|| {
            let _entered = span.enter();
            HandlerResult::new(service.call(Incoming { context, payload }))
        }));
        match call {
            Ok(fut) => {
                let started = self.incoming.start(slot, fut, id, method, deadline, span);
                if let Some(finished) = started {
                    self.on_finished(finished);
                }
            }
            Err(panic) => {
                self.incoming.unreserve(slot);
                let failed = Failed {
                    method: method.as_str(),
                    id,
                };
                let reply = self.config.error_handler.handle_panic(failed, panic);
                self.send_reply(id, reply);
            }
        }
    }

    pub(super) fn on_finished(&mut self, finished: Finished) {
        let Finished {
            id,
            method,
            outcome,
        } = finished;
        tracing::trace!(?id, %method, outcome = outcome.describe(), "handler finished");
        let failed = Failed {
            method: method.as_str(),
            id,
        };
        let reply = match outcome {
            Outcome::Done(Ok(reply)) => reply,
            Outcome::Done(Err(error)) => self.config.error_handler.handle_error(failed, error),
            Outcome::Panicked(panic) => self.config.error_handler.handle_panic(failed, panic),
            Outcome::Expired => Reply::error(
                code::DEADLINE_EXCEEDED,
                "the caller's deadline passed before the handler finished",
            ),
        };
        self.send_reply(id, reply);
    }

    pub(super) fn send_reply(&mut self, id: Option<u64>, reply: Reply) {
        let (body, attributes) = reply.into_parts();
        let id = match (body, id) {
            (ReplyBody::Fatal { code, message }, _) => return self.local_fatal(code, message),
            (_, None) => return, // notifications are never answered
            (ReplyBody::Value(payload), Some(id)) => {
                let response = Envelope::Response {
                    id,
                    attributes,
                    payload,
                };
                match self.write(&response) {
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
                    error,
                };
                if self.write(&envelope).is_ok() {
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
        if self.write(&envelope).is_err() {
            tracing::error!(id, "error answer over the peer's frame limit dropped");
        }
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
