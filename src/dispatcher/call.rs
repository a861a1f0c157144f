use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::{Command, Outbound, Shared};
use crate::codec::Codec;
use crate::envelope::Method;
use crate::error::{CallError, CodecError, HandlerError, RemoteError, Termination};
use crate::handler::{Incoming, Reply, ReplyBody};
use crate::message::Attributes;
use crate::middleware::{Endpoint, Middleware, Next};

type Decode<T> = fn(Codec, RawResponse) -> Result<T, CallError>;

/// A request about to be sent: set attributes or a timeout, then `.await` it.
///
/// Nothing is sent until it is awaited (or turned into a future with `into_future`).
///
/// # Examples
/// ```
/// # use channel_dispatcher::{request, Channel, Dispatcher, Context, HandlerError, Router};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct Ping;
/// # request!(Ping => String, "ping");
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), channel_dispatcher::CallError> {
/// # let (a, b) = Channel::pair();
/// # let _server = Dispatcher::builder().handler(Router::new().request(|cx: Context, _: Ping| async move {
/// #     Ok::<_, HandlerError>(cx.attributes().get("tenant").unwrap_or_default().to_string())
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
    /// Takes an in-flight permit (calls through a handle; not nested calls from handlers).
    limited: bool,
    /// Goes through the caller-side middleware (false once it has).
    pipeline: bool,
    method: Method,
    payload: Result<Bytes, CodecError>,
    attributes: Attributes,
    timeout: Option<Duration>,
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
            limited: true,
            pipeline: true,
            method,
            payload,
            attributes: Attributes::new(),
            timeout,
            decode,
        }
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
    /// (replacing the dispatcher's default). The peer is told how long the caller waits.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// A nested call from a handler: it takes no in-flight permit, since the handlers that
    /// make them are bounded already, and a handler waiting for a permit held by calls that
    /// wait for that handler would deadlock.
    pub(crate) fn nested(mut self) -> Self {
        self.limited = false;
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

    /// Sends the call; its permit, if it needs one, is taken already.
    fn start(self) -> Result<Waiting, CallError> {
        let shared = self.target.map_err(CallError::Terminated)?;
        let limited = self.limited;
        let fail = |error: CallError| {
            shared.lifecycle.release(limited);
            error
        };
        if shared.lifecycle.stopping.load(Ordering::Acquire) {
            return Err(fail(shared.terminated()));
        }
        let payload = self.payload.map_err(|e| fail(CallError::Encode(e)))?;
        shared
            .check_limits(&self.method, &self.attributes, &payload)
            .map_err(fail)?;
        let id = shared.next_id();
        let (tx, rx) = oneshot::channel();
        let outbound = Outbound {
            limited,
            id,
            method: self.method,
            attributes: self.attributes,
            timeout_us: self.timeout.map_or(0, |t| {
                u64::try_from(t.as_micros()).unwrap_or(u64::MAX).max(1)
            }),
            payload,
        };
        if shared.commands.send(Command::Call(outbound, tx)).is_err() {
            return Err(fail(shared.terminated()));
        }
        Ok(Waiting {
            id,
            rx,
            timer: self
                .timeout
                .map(|t| (t, Box::pin(tokio::time::sleep_until(Instant::now() + t)))),
            shared,
            answered: false,
        })
    }
}

impl<T> IntoFuture for Call<T> {
    type Output = Result<T, CallError>;
    type IntoFuture = ResponseFuture<T>;

    fn into_future(self) -> ResponseFuture<T> {
        let decode = self.decode;
        let codec = self
            .target
            .as_ref()
            .map_or_else(|_| Codec::default(), |shared| shared.codec);
        if let (Ok(shared), true) = (&self.target, self.pipeline) {
            if let Some(middlewares) = shared.outbound.clone() {
                let shared = Arc::clone(shared);
                return ResponseFuture {
                    state: State::Pipeline(Box::pin(through(
                        shared,
                        middlewares,
                        self.method,
                        self.payload,
                        self.attributes,
                        self.limited,
                        self.timeout,
                    ))),
                    codec,
                    decode,
                };
            }
        }
        let shared = match &self.target {
            Ok(shared) if self.limited => Some(Arc::clone(shared)),
            _ => None,
        };
        let state = match shared {
            None => State::start(self),
            Some(shared) => {
                let admitted = shared
                    .lifecycle
                    .permits
                    .try_acquire()
                    .map(|permit| permit.forget())
                    .is_ok();
                if admitted {
                    State::start(self)
                } else {
                    // All permits taken (or closed): wait for one, then send.
                    State::Admitting {
                        admit: Box::pin(async move { shared.admit().await }),
                        call: Some(Box::new(self)),
                    }
                }
            }
        };
        ResponseFuture {
            state,
            codec,
            decode,
        }
    }
}

/// Runs a call through the caller-side pipeline; at its end, the call is sent.
async fn through(
    shared: Arc<Shared>,
    middlewares: Arc<[Arc<dyn Middleware>]>,
    method: Method,
    payload: Result<Bytes, CodecError>,
    attributes: Attributes,
    limited: bool,
    timeout: Option<Duration>,
) -> Result<RawResponse, CallError> {
    let payload = payload.map_err(CallError::Encode)?;
    let deadline = timeout.map(|t| Instant::now() + t);
    let context = crate::Context::outbound(
        Arc::downgrade(&shared),
        shared.codec,
        None,
        method,
        attributes,
        deadline,
    );
    let incoming = Incoming { context, payload };
    let codec = shared.codec;
    let endpoint: Endpoint = Box::new(move |incoming: Incoming| {
        Box::pin(async move {
            let (context, payload) = incoming.into_parts();
            let (method, attributes) = context.into_call_parts();
            let call = Call::<RawResponse> {
                target: Ok(shared),
                limited,
                pipeline: false,
                method,
                payload: Ok(payload),
                attributes,
                timeout,
                decode: |_, raw| Ok(raw),
            };
            match call.await {
                Ok(raw) => {
                    let mut reply = Reply::value(raw.payload);
                    *reply.attributes_mut() = raw.attributes;
                    Ok(reply)
                }
                Err(CallError::Remote(error)) => Ok(Reply::from_error(
                    HandlerError::new(error.code, error.message).with_data_opt(error.data),
                )),
                Err(other) => Err(HandlerError::from_call(other)),
            }
        })
    });
    let reply = Next::new(middlewares, endpoint)
        .run(incoming)
        .await
        .map_err(HandlerError::into_call_error)?;
    let (body, attributes) = reply.into_parts();
    match body {
        ReplyBody::Value(payload) => Ok(RawResponse {
            payload,
            attributes,
            codec,
        }),
        ReplyBody::Error(error) => Err(CallError::Remote(RemoteError {
            code: error.code,
            message: error.message,
            data: error.data,
            codec,
        })),
        ReplyBody::Fatal { code, message } => Err(CallError::Refused { code, message }),
        ReplyBody::Nothing => Err(CallError::Refused {
            code: crate::error::code::INTERNAL_ERROR,
            message: "an outbound middleware gave no answer".into(),
        }),
    }
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

/// The answer to a call, as it arrived: payload still encoded, attributes the peer sent back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawResponse {
    /// The encoded payload.
    pub payload: Bytes,
    /// Attributes set by the peer's handler or middleware.
    pub attributes: Attributes,
    pub(crate) codec: Codec,
}

impl RawResponse {
    /// Decodes the payload.
    ///
    /// # Errors
    /// A [`CodecError`] when the payload is not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        self.codec.decode(&self.payload)
    }
}

/// The future of a [`Call`]: resolves to the decoded answer.
///
/// # Cancellation
/// Dropping it before it completes sends a cancel to the peer.
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<T> {
    state: State<T>,
    codec: Codec,
    decode: Decode<T>,
}

type Admit = Pin<Box<dyn Future<Output = Result<(), CallError>> + Send>>;
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
    rx: oneshot::Receiver<Result<RawResponse, CallError>>,
    timer: Option<(Duration, Pin<Box<Sleep>>)>,
    shared: Arc<Shared>,
    answered: bool,
}

impl<T> State<T> {
    fn start(call: Call<T>) -> Self {
        match call.start() {
            Ok(waiting) => Self::Waiting(waiting),
            Err(e) => Self::Failed(Some(Box::new(e))),
        }
    }
}

impl<T> Future for ResponseFuture<T> {
    type Output = Result<T, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let State::Pipeline(pipeline) = &mut this.state {
            let result = ready!(pipeline.as_mut().poll(cx));
            this.state = State::Done;
            return Poll::Ready(result.and_then(|raw| (this.decode)(this.codec, raw)));
        }
        if let State::Admitting { admit, call } = &mut this.state {
            match ready!(admit.as_mut().poll(cx)) {
                Ok(()) => match call.take() {
                    Some(call) => this.state = State::start(*call),
                    None => this.state = State::Failed(None),
                },
                Err(e) => this.state = State::Failed(Some(Box::new(e))),
            }
        }
        let result = match &mut this.state {
            // Left above: admitted, or failed; or done.
            State::Admitting { .. } | State::Pipeline(_) => {
                Err(CallError::Terminated(Termination::Stopped))
            }
            State::Failed(error) => Err(error
                .take()
                .map_or(CallError::Terminated(Termination::Stopped), |e| *e)),
            State::Done => panic!("ResponseFuture polled after completion"),
            State::Waiting(waiting) => {
                let answer = match Pin::new(&mut waiting.rx).poll(cx) {
                    Poll::Ready(answer) => answer,
                    Poll::Pending => match &mut waiting.timer {
                        Some((timeout, sleep)) => {
                            ready!(sleep.as_mut().poll(cx));
                            let timeout = *timeout;
                            // Still waiting: the drop below sends the cancel.
                            this.state = State::Done;
                            return Poll::Ready(Err(CallError::Timeout(timeout)));
                        }
                        None => return Poll::Pending,
                    },
                };
                match answer {
                    Ok(Ok(raw)) => (this.decode)(this.codec, raw),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(waiting.shared.terminated()),
                }
            }
        };
        if let State::Waiting(waiting) = &mut this.state {
            // Answered (or the connection ended): nothing to cancel.
            waiting.answered = true;
        }
        this.state = State::Done;
        Poll::Ready(result)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.shared.commands.send(Command::Cancel(self.id));
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
