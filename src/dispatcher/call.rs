use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, Sleep};

use crate::answers::AnswerReceiver;
use crate::codec::Codec;
use crate::envelope::Method;
use crate::error::{code, CallError, CodecError, Termination};
use crate::message::Attributes;
use crate::middleware::{Endpoint, Next, OutgoingCall};
use crate::shared::{Command, Outbound, Permit, RawResponse, Reserved, Shared};

type Decode<T> = fn(Codec, RawResponse) -> Result<T, CallError>;

/// A request about to be sent: set attributes or a timeout, then `.await` it.
///
/// Nothing is sent until it is awaited (or turned into a future with `into_future`).
///
/// # Examples
/// ```
/// # use channel_dispatcher::{request, Channel, Dispatcher, Context, Router};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct Ping;
/// # request!(Ping => String, "ping");
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), channel_dispatcher::CallError> {
/// # let (a, b) = Channel::pair();
/// # let _server = Dispatcher::builder().handler(Router::new().request(|cx: Context, _: Ping| async move {
/// #     Ok(cx.attributes().get("tenant").unwrap_or_default().to_string())
/// # })).spawn(b);
/// # let dispatcher = Dispatcher::builder().spawn(a);
/// use std::time::Duration;
///
/// let answer = dispatcher
///     .request(Ping)
///     .attribute("tenant", "acme")
///     .timeout(Duration::from_secs(5))
///     .await?;
/// assert_eq!(answer, "acme");
/// # Ok(())
/// # }
/// ```
#[must_use = "a call does nothing until it is awaited"]
pub struct Call<T> {
    target: Result<Arc<Shared>, Termination>,
    /// A handle's in-flight permit, or none for a nested call from a handler.
    permit: Permit,
    /// The peer's request whose handler makes this call, if any.
    parent: Option<u64>,
    /// Goes through the caller-side middleware (false once it has).
    pipeline: bool,
    method: Method,
    payload: Result<Bytes, CodecError>,
    attributes: Attributes,
    timeout: Option<Duration>,
    /// Fixed by an outer step (the caller-side pipeline), instead of counted from the timeout.
    deadline: Option<Instant>,
    /// The queued bytes its permit holds, once taken.
    queued: u32,
    /// Its in-flight permit, taken ahead (a tower `poll_ready`): only the bytes remain.
    reserved: Option<Reserved>,
    decode: Decode<T>,
}

impl<T> Call<T> {
    pub(crate) fn new(
        target: Result<Arc<Shared>, Termination>,
        method: Method,
        payload: Result<Bytes, CodecError>,
        decode: Decode<T>,
    ) -> Self {
        let timeout = target
            .as_ref()
            .ok()
            .and_then(|shared| shared.default_timeout);
        Self {
            target,
            permit: Permit::Handle,
            parent: None,
            pipeline: true,
            method,
            payload,
            attributes: Attributes::new(),
            timeout,
            deadline: None,
            queued: 0,
            reserved: None,
            decode,
        }
    }

    /// The call with its in-flight permit taken already.
    pub(crate) fn with_reserved(mut self, reserved: Option<Reserved>) -> Self {
        self.reserved = reserved;
        self
    }

    /// Adds an attribute to the request.
    pub fn attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name, value);
        self
    }

    /// Adds attributes to the request.
    pub fn attributes(mut self, attributes: Attributes) -> Self {
        self.attributes.extend(attributes.iter());
        self
    }

    /// Fails the call with [`CallError::Timeout`] if no answer arrives within `timeout`
    /// (replacing the dispatcher's default). The time counts from when the call is awaited
    /// (or made a future) and covers everything: waiting for an in-flight permit
    /// ([`Builder::max_in_flight`](crate::Builder::max_in_flight)), the caller-side middleware,
    /// waiting for room in the peer's window, and the answer. The peer is told how long the
    /// caller still waits. A timeout too long to add to the clock (`Duration::MAX`) means no
    /// deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// A nested call from the handler of the peer's request `parent` (none for a
    /// notification's handler): it takes no in-flight permit, since the handlers that make
    /// them are bounded already, and a handler waiting for a permit held by calls that wait
    /// for that handler would deadlock. The peer admits it outside its handler limit while
    /// `parent` runs.
    pub(crate) fn nested(mut self, parent: Option<u64>) -> Self {
        self.permit = Permit::None;
        self.parent = parent;
        self
    }

    /// Keeps the shorter of the current timeout and `limit` (for deadlines inherited by
    /// nested calls).
    pub(crate) fn timeout_at_most(mut self, limit: Option<Duration>) -> Self {
        if let Some(limit) = limit {
            self.timeout = Some(self.timeout.map_or(limit, |t| t.min(limit)));
        }
        self
    }

    /// The payload's length, for the queued-bytes room it takes.
    fn len(&self) -> usize {
        self.payload.as_ref().map_or(0, Bytes::len)
    }

    /// The same call, answered raw.
    fn untyped(self) -> Call<RawResponse> {
        Call {
            target: self.target,
            permit: self.permit,
            parent: self.parent,
            pipeline: self.pipeline,
            method: self.method,
            payload: self.payload,
            attributes: self.attributes,
            timeout: self.timeout,
            deadline: self.deadline,
            queued: self.queued,
            reserved: self.reserved,
            decode: |_, raw| Ok(raw),
        }
    }

    /// Sends the call with `deadline`; its permit, if it needs one, is taken already.
    fn start(self, deadline: Option<Instant>) -> Result<Waiting, CallError> {
        let shared = self.target.map_err(CallError::Terminated)?;
        let (permit, queued) = (self.permit, self.queued);
        let fail = |error: CallError| {
            shared.lifecycle.release(permit, 1, queued as usize);
            error
        };
        // NB. A nested call may still go out while its handler drains after `stop()`: the
        // driver decides, and refuses it once that is over.
        if permit != Permit::None && shared.lifecycle.is_stopping() {
            return Err(fail(shared.terminated()));
        }
        let payload = self.payload.map_err(|e| fail(CallError::Encode(e)))?;
        shared
            .check_limits(&self.method, &self.attributes, &payload)
            .map_err(fail)?;
        let id = shared.next_id();
        let (tx, mut rx) = shared.answers.channel();
        let call = Outbound::new(
            self.method,
            self.attributes,
            payload,
            permit,
            queued,
            self.parent,
        );
        let command = Command::Call {
            id,
            call,
            deadline,
            reply: tx,
        };
        if shared.send_command(command).is_err() {
            rx.release(&shared.answers);
            return Err(fail(shared.terminated()));
        }
        Ok(Waiting {
            id,
            rx,
            shared,
            answered: false,
        })
    }
}

impl<T> IntoFuture for Call<T> {
    type Output = Result<T, CallError>;
    type IntoFuture = ResponseFuture<T>;

    fn into_future(mut self) -> ResponseFuture<T> {
        let decode = self.decode;
        let codec = self
            .target
            .as_ref()
            .map_or_else(|_| Codec::default(), |shared| shared.codec);
        // NB. The deadline is counted once, here, and covers every step after.
        let deadline = self.deadline.or_else(|| {
            self.timeout
                .and_then(|timeout| Instant::now().checked_add(timeout))
        });
        self.deadline = deadline;
        let timer = deadline.map(|deadline| {
            Box::pin(Timer {
                timeout: self.timeout.unwrap_or_default(),
                sleep: tokio::time::sleep_until(deadline),
            })
        });
        let state = match &self.target {
            Ok(shared) if self.pipeline && shared.outbound.is_some() => {
                let shared = Arc::clone(shared);
                State::Pipeline(Box::pin(through(shared, self.untyped())))
            }
            Ok(shared) => {
                let admitted = match self.reserved.is_some() {
                    true => shared.try_admit_bytes(self.len()),
                    false => shared.try_admit(self.permit, self.len()),
                };
                match admitted {
                    Some(queued) => {
                        self.queued = queued;
                        if let Some(reserved) = self.reserved.take() {
                            reserved.take_over();
                        }
                        State::start(self, deadline)
                    }
                    None => {
                        // All permits taken (or closed): wait for one, then send.
                        let shared = Arc::clone(shared);
                        let (permit, len, reserved) =
                            (self.permit, self.len(), self.reserved.is_some());
                        State::Admitting {
                            admit: Box::pin(async move {
                                match reserved {
                                    true => shared.admit_bytes(len).await,
                                    false => shared.admit(permit, len).await,
                                }
                            }),
                            call: Some(Box::new(self)),
                        }
                    }
                }
            }
            Err(_) => State::start(self, deadline),
        };
        ResponseFuture {
            state,
            timer,
            codec,
            decode,
        }
    }
}

/// Runs a call through the outbound pipeline; at its end, the call is sent.
async fn through(shared: Arc<Shared>, call: Call<RawResponse>) -> Result<RawResponse, CallError> {
    let Some(middlewares) = shared.outbound.clone() else {
        return Err(shared.terminated());
    };
    let Call {
        permit,
        parent,
        method,
        payload,
        attributes,
        timeout,
        deadline,
        reserved,
        ..
    } = call;
    let outgoing = OutgoingCall {
        method,
        attributes,
        payload: payload.map_err(CallError::Encode)?,
        deadline,
        notification: false,
        codec: shared.codec,
    };
    let endpoint: Endpoint<OutgoingCall> = Box::new(move |outgoing: OutgoingCall| {
        let call = Call {
            target: Ok(shared),
            permit,
            parent,
            pipeline: false,
            method: outgoing.method,
            payload: Ok(outgoing.payload),
            attributes: outgoing.attributes,
            timeout,
            deadline,
            queued: 0,
            reserved,
            decode: |_, raw| Ok(raw),
        };
        Box::pin(call.into_future())
    });
    Next::new(middlewares, endpoint).run(outgoing).await
}

/// Sends a notification, through the outbound pipeline if there is one; it returns once
/// the notification is queued (taking an in-flight permit of the kind, waiting for one).
pub(crate) async fn send_notification(
    shared: &Arc<Shared>,
    method: Method,
    attributes: Attributes,
    payload: Bytes,
    permit: Permit,
) -> Result<(), CallError> {
    let Some(middlewares) = shared.outbound.clone() else {
        return queue_notification(shared, method, attributes, payload, permit).await;
    };
    // Through the outbound pipeline: at its end, the notification is queued.
    let outgoing = OutgoingCall {
        method,
        attributes,
        payload,
        deadline: None,
        notification: true,
        codec: shared.codec,
    };
    let shared = Arc::clone(shared);
    let endpoint: Endpoint<OutgoingCall> = Box::new(move |outgoing: OutgoingCall| {
        Box::pin(async move {
            let answer = outgoing.answer(Bytes::new());
            let OutgoingCall {
                method,
                attributes,
                payload,
                ..
            } = outgoing;
            queue_notification(&shared, method, attributes, payload, permit).await?;
            Ok(answer)
        })
    });
    Next::new(middlewares, endpoint)
        .run(outgoing)
        .await
        .map(drop)
}

async fn queue_notification(
    shared: &Shared,
    method: Method,
    attributes: Attributes,
    payload: Bytes,
    permit: Permit,
) -> Result<(), CallError> {
    if permit == Permit::Handle && shared.lifecycle.is_stopping() {
        return Err(shared.terminated());
    }
    if shared.lifecycle.announced_peer_limits().is_none() {
        // Checked against the peer's limits, which the handshake tells: nothing answers a
        // notification the peer refuses.
        shared
            .lifecycle
            .handshake_done()
            .await
            .map_err(CallError::Terminated)?;
    }
    shared.check_limits(&method, &attributes, &payload)?;
    let queued = shared.admit(permit, payload.len()).await?;
    let notification = Outbound::new(method, attributes, payload, permit, queued, None);
    shared
        .send_command(Command::Notify(notification))
        .map_err(|()| {
            shared.lifecycle.release(permit, 1, queued as usize);
            shared.terminated()
        })
}

impl<T> fmt::Debug for Call<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("method", &self.method)
            .field("attributes", &self.attributes)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The future of a [`Call`]: resolves to the decoded answer.
///
/// # Cancellation
/// Dropping it before it completes sends a cancel to the peer (or, if the call was not
/// written yet, it never is).
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<T> {
    state: State<T>,
    /// Boxed whole (one allocation, as the `Sleep` alone took): most calls have none, and the
    /// future stays small.
    timer: Option<Pin<Box<Timer>>>,
    codec: Codec,
    decode: Decode<T>,
}

pin_project_lite::pin_project! {
    /// The call's deadline: it runs through every state.
    struct Timer {
        timeout: Duration,
        #[pin]
        sleep: Sleep,
    }
}

type Admit = Pin<Box<dyn Future<Output = Result<u32, CallError>> + Send>>;
type Pipeline = Pin<Box<dyn Future<Output = Result<RawResponse, CallError>> + Send>>;

enum State<T> {
    /// In the caller-side middleware pipeline, which sends the call at its end.
    Pipeline(Pipeline),
    /// Waiting for an in-flight permit (`Builder::max_in_flight`).
    Admitting {
        admit: Admit,
        call: Option<Box<Call<T>>>,
    },
    Waiting(Waiting),
    /// Boxed: failures are rare, and the future stays small (it is moved around a lot).
    Failed(Option<Box<CallError>>),
    Done,
}

struct Waiting {
    id: u64,
    rx: AnswerReceiver,
    shared: Arc<Shared>,
    answered: bool,
}

impl<T> State<T> {
    fn start(call: Call<T>, deadline: Option<Instant>) -> Self {
        match call.start(deadline) {
            Ok(waiting) => Self::Waiting(waiting),
            Err(e) => Self::Failed(Some(Box::new(e))),
        }
    }
}

impl<T> ResponseFuture<T> {
    /// One step of the call; `Pending` while it waits.
    fn poll_state(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, CallError>> {
        loop {
            match &mut self.state {
                State::Pipeline(pipeline) => {
                    let result = ready!(pipeline.as_mut().poll(cx));
                    return Poll::Ready(result.and_then(|raw| (self.decode)(self.codec, raw)));
                }
                State::Admitting { admit, call } => {
                    let queued = ready!(admit.as_mut().poll(cx))?;
                    let mut call = call
                        .take()
                        .ok_or(CallError::Terminated(Termination::Stopped))?;
                    call.queued = queued;
                    if let Some(reserved) = call.reserved.take() {
                        reserved.take_over();
                    }
                    let deadline = call.deadline;
                    self.state = State::start(*call, deadline);
                }
                State::Waiting(waiting) => {
                    // NB. Outside tokio's cooperative budget (a slot is not a tokio resource):
                    // when many answers land at once (one read brings hundreds), a budgeted
                    // receiver would refuse most of them and wake them again. Waiting here never
                    // loops without a round trip through the connection's task, so it cannot
                    // starve the runtime.
                    let answer = ready!(waiting.rx.poll(&waiting.shared.answers, cx));
                    // Answered (or the connection ended): nothing to cancel.
                    waiting.answered = true;
                    return Poll::Ready(match answer.map(|answer| answer.map_err(|e| *e)) {
                        Ok(Ok(raw)) => (self.decode)(self.codec, raw),
                        // NB. The peer's deadline answer may beat our own timer: it is the same
                        // deadline, so the same error.
                        Ok(Err(CallError::Remote(e))) if e.code == code::DEADLINE_EXCEEDED => {
                            match &self.timer {
                                Some(timer) => Err(CallError::Timeout(timer.timeout)),
                                None => Err(CallError::Remote(e)),
                            }
                        }
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(waiting.shared.terminated()),
                    });
                }
                State::Failed(error) => {
                    return Poll::Ready(Err(error
                        .take()
                        .map_or(CallError::Terminated(Termination::Stopped), |e| *e)))
                }
                State::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

impl<T> Future for ResponseFuture<T> {
    type Output = Result<T, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(result) = this.poll_state(cx) {
            this.state = State::Done;
            return Poll::Ready(result);
        }
        if let Some(timer) = &mut this.timer {
            let timer = timer.as_mut().project();
            if timer.sleep.poll(cx).is_ready() {
                // Dropping the state cancels whatever step the call was in.
                this.state = State::Done;
                return Poll::Ready(Err(CallError::Timeout(*timer.timeout)));
            }
        }
        Poll::Pending
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.rx.release(&self.shared.answers);
        if !self.answered {
            let _ = self.shared.send_command(Command::Cancel(self.id));
        }
    }
}

impl<T> fmt::Debug for ResponseFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Admitting { .. } => "waiting for an in-flight slot".into(),
            State::Pipeline(_) => "in the outbound middleware".into(),
            State::Waiting(w) => format!("waiting for answer {}", w.id),
            State::Failed(_) => "failed".into(),
            State::Done => "done".into(),
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

#[cfg(test)]
mod size {
    use super::*;

    /// A call's future is moved into whatever holds it (a `FuturesUnordered`, a `join_all`)
    /// and kept there until answered: its bytes are paid per pending call.
    #[test]
    fn a_calls_future_stays_small() {
        let size = std::mem::size_of::<ResponseFuture<String>>();
        assert!(size <= 56, "ResponseFuture<String> takes {size} bytes");
        // And it is still `Unpin` (its timer is boxed whole), so `Pin::new(&mut call)` works.
        fn unpin_and_send<T: Unpin + Send>() {}
        unpin_and_send::<ResponseFuture<String>>();
    }
}
