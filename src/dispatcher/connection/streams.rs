//! Our streams: their batches, idle release, pull-mode answers, and the end of every stream.

use super::*;

impl<S> Driver<S>
where
    S: Service<Incoming, Response = Reply>,
    S::Error: IntoHandlerError,
{
    /// Writes a batch or an end of one of our streams (or a pull's answer).
    pub(super) fn write_stream_envelope(&mut self, envelope: Envelope) {
        if matches!(self.phase, Phase::Closing { .. }) {
            return;
        }
        let stream = match &envelope {
            Envelope::StreamItems { stream, .. } => Some(*stream),
            _ => None,
        };
        if let Err(error) = self.write(&envelope) {
            tracing::warn!(%error, "stream batch over the peer's frame limit");
            if let Some(stream) = stream {
                self.lifecycle.streams.remove(stream);
                let end = Envelope::StreamEnd {
                    stream,
                    error: Some(ErrorBody {
                        code: code::FRAME_TOO_LARGE,
                        message: format!(
                            "a batch of items is too large: {error}; use a smaller window"
                        ),
                        data: None,
                    }),
                };
                let _ = self.write(&end);
            }
        }
    }

    /// Releases our streams nobody consumed for the idle time, telling their consumers.
    pub(super) fn poll_sweep(&mut self, cx: &mut TaskContext<'_>) {
        loop {
            let streams = &self.lifecycle.streams;
            if streams.is_empty() {
                self.sweep = None;
                return;
            }
            let period = streams.idle_timeout() / 2;
            let sweep = self
                .sweep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(period)));
            if sweep.as_mut().poll(cx).is_pending() {
                return;
            }
            self.sweep = None;
            let idle = streams.idle_timeout();
            for stream in streams.sweep() {
                tracing::debug!(stream, "stream released after its idle time");
                let end = Envelope::StreamEnd {
                    stream,
                    error: Some(ErrorBody {
                        code: code::STREAM_RELEASED,
                        message: format!("stream released: not consumed for {idle:?}"),
                        data: None,
                    }),
                };
                let _ = self.write(&end);
            }
        }
    }

    /// Ends every stream: ours are dropped, the peer's end for our consumers with `reason`.
    pub(super) fn end_streams(&mut self) {
        self.lifecycle.streams.clear();
        let reason = self.lifecycle.reason_or(Termination::Stopped);
        for (_, events) in self.streams_in.drain() {
            let _ = events.send(StreamEvent::Terminated(reason.clone()));
        }
    }

    /// Answers a pull-mode request: the stream's next item, in a task of its own (pull mode
    /// is the slow, seed-compatible path).
    pub(super) fn pull(&mut self, id: u64, payload: &Bytes) {
        let streams = self.lifecycle.streams.clone();
        let codec = self.config.codec;
        let source = codec
            .decode::<u64>(payload)
            .ok()
            .and_then(|stream| Some((stream, streams.source(stream)?)));
        let Some((stream, source)) = source else {
            return self.answer_error(id, code::INVALID_PARAMS, "no such stream".into());
        };
        // Pulls run in tasks of their own: bound them like handlers, or a peer could start
        // any number of them.
        if self.pulls.load(std::sync::atomic::Ordering::Relaxed)
            >= self.config.max_concurrent_handlers
        {
            let message = "too many pulls in flight".into();
            return self.answer_error(id, code::OVERLOADED, message);
        }
        let pulls = Arc::clone(&self.pulls);
        pulls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = self.stream_out_tx.clone();
        tokio::spawn(async move {
            let _running = PullGuard(pulls);
            let mut source = source.lock().await;
            let batch = std::future::poll_fn(|cx| source.poll_batch(cx, 1)).await;
            drop(source);
            let answer = match batch {
                Batch::Items {
                    position, payload, ..
                } => Envelope::Response {
                    id,
                    attributes: [(POSITION_ATTRIBUTE, position.to_string())]
                        .into_iter()
                        .collect(),
                    payload,
                },
                Batch::End => {
                    streams.remove(stream);
                    Envelope::Response {
                        id,
                        attributes: Attributes::new(),
                        payload: codec.encode(&[(); 0]).unwrap_or_default(),
                    }
                }
                Batch::Failed(error) => {
                    streams.remove(stream);
                    Envelope::Error {
                        id,
                        attributes: Attributes::new(),
                        error: ErrorBody {
                            code: error.code,
                            message: error.message,
                            data: None,
                        },
                    }
                }
            };
            let _ = out.send(answer);
        });
    }
}

/// Counts a running pull until dropped.
struct PullGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for PullGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
