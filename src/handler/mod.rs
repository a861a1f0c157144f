//! The answering side: what a handler receives ([`Incoming`]), what it returns ([`Reply`]),
//! the [`Router`] that maps methods to typed handlers, and the pluggable [`ErrorHandler`].
//!
//! A handler is any `tower::Service<Incoming, Response = Reply, Error = HandlerError>`; the
//! [`Router`] is the usual one.

mod router;

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use serde::de::DeserializeOwned;

pub use router::Router;

use crate::codec::Codec;
use crate::context::Context;
use crate::envelope::ErrorBody;
use crate::error::{CodecError, HandlerError, IntoHandlerError};
use crate::message::Attributes;

/// An inbound request or notification, as the handler pipeline sees it.
#[derive(Debug)]
pub struct Incoming {
    pub(crate) context: Context,
    pub(crate) payload: Bytes,
}

impl Incoming {
    /// The method name.
    pub fn method(&self) -> &str {
        self.context.method()
    }

    /// The request id; `None` for a notification.
    pub fn id(&self) -> Option<u64> {
        self.context.id()
    }

    /// `true` for a notification (no answer will be sent, whatever the handler returns).
    pub fn is_notification(&self) -> bool {
        self.context.id().is_none()
    }

    /// The attributes that came with the message.
    pub fn attributes(&self) -> &Attributes {
        self.context.attributes()
    }

    /// The attributes, to change before the handler runs.
    pub fn attributes_mut(&mut self) -> &mut Attributes {
        self.context.attributes_mut()
    }

    /// The raw payload, encoded with the connection's codec.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Decodes the payload.
    ///
    /// # Errors
    /// A [`CodecError`] when the payload is not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        self.context.codec().decode(&self.payload)
    }

    /// The handler context (dispatcher handle, nested calls, extensions).
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The context, mutably (to add extensions in middleware).
    pub fn context_mut(&mut self) -> &mut Context {
        &mut self.context
    }

    /// Splits into context and raw payload.
    pub fn into_parts(self) -> (Context, Bytes) {
        (self.context, self.payload)
    }

    /// Builds an inbound message by hand: for testing handlers and middleware without a peer.
    ///
    /// The context has no dispatcher, so nested calls from it fail with
    /// [`CallError::Terminated`](crate::CallError::Terminated).
    pub fn new(method: impl Into<String>, id: Option<u64>, payload: Bytes, codec: Codec) -> Self {
        Self {
            context: Context::detached(method.into(), id, codec),
            payload,
        }
    }
}

/// What a handler answers. For a notification only a fatal reply has an effect (it ends the
/// connection); anything else is dropped, since notifications are never answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub(crate) body: ReplyBody,
    attributes: Attributes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ReplyBody {
    Value(Bytes),
    /// Boxed: errors are rare, and a reply is moved through every step of a handler's run.
    Error(Box<ErrorBody>),
    Fatal {
        code: i64,
        message: String,
    },
    Nothing,
}

impl Reply {
    /// A successful answer with an already encoded payload (see [`Context::encode`]).
    pub fn value(payload: Bytes) -> Self {
        Self::with_body(ReplyBody::Value(payload))
    }

    /// An error answer: the caller gets
    /// [`CallError::Remote`](crate::CallError::Remote); the connection stays up.
    pub fn error(code: i64, message: impl Into<String>) -> Self {
        Self::with_body(ReplyBody::Error(Box::new(ErrorBody {
            code,
            message: message.into(),
            data: None,
        })))
    }

    /// A fatal error: sent to the peer, then the connection
    /// ends on both sides with this message.
    pub fn fatal(code: i64, message: impl Into<String>) -> Self {
        Self::with_body(ReplyBody::Fatal {
            code,
            message: message.into(),
        })
    }

    /// No answer: what a notification handler returns.
    pub fn nothing() -> Self {
        Self::with_body(ReplyBody::Nothing)
    }

    pub(crate) fn from_error(error: HandlerError) -> Self {
        Self::with_body(ReplyBody::Error(Box::new(ErrorBody {
            code: error.code,
            message: error.message,
            data: error.data.map(|data| *data),
        })))
    }

    fn with_body(body: ReplyBody) -> Self {
        Self {
            body,
            attributes: Attributes::new(),
        }
    }

    /// Sets an attribute sent back with the answer.
    pub fn with_attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name, value);
        self
    }

    /// The attributes sent back with the answer.
    pub fn attributes(&self) -> &Attributes {
        &self.attributes
    }

    /// The attributes, mutably.
    pub fn attributes_mut(&mut self) -> &mut Attributes {
        &mut self.attributes
    }

    pub(crate) fn into_parts(self) -> (ReplyBody, Attributes) {
        (self.body, self.attributes)
    }

    /// The encoded payload of a successful answer.
    pub fn payload(&self) -> Option<&Bytes> {
        match &self.body {
            ReplyBody::Value(payload) => Some(payload),
            _ => None,
        }
    }

    /// The code and message of an error or fatal answer.
    pub fn error_code(&self) -> Option<(i64, &str)> {
        match &self.body {
            ReplyBody::Error(e) => Some((e.code, &e.message)),
            ReplyBody::Fatal { code, message } => Some((*code, message)),
            _ => None,
        }
    }

    /// `true` for a fatal answer.
    pub fn is_fatal(&self) -> bool {
        matches!(self.body, ReplyBody::Fatal { .. })
    }

    /// `true` for "no answer".
    pub fn is_nothing(&self) -> bool {
        matches!(self.body, ReplyBody::Nothing)
    }
}

/// Which inbound message failed, for the [`ErrorHandler`].
#[derive(Clone, Copy, Debug)]
pub struct Failed<'a> {
    /// The method name.
    pub method: &'a str,
    /// The request id; `None` for a notification.
    pub id: Option<u64>,
}

/// Decides what a handler failure becomes.
///
/// The default, [`DefaultErrorHandler`], answers a failed request with an error and logs a
/// failed notification; [`StrictErrorHandler`] ends the connection on a failed notification.
/// Implement it to map errors differently, to hide messages from the peer, or to report
/// panics. Set it with [`Builder::error_handler`](crate::Builder::error_handler).
///
/// # Examples
/// ```
/// use channel_dispatcher::{ErrorHandler, Failed, HandlerError, Reply};
///
/// /// Never tells the peer why: every failure is the same opaque error.
/// struct Opaque;
///
/// impl ErrorHandler for Opaque {
///     fn handle_error(&self, failed: Failed<'_>, error: HandlerError) -> Reply {
///         tracing::warn!(method = failed.method, %error, "handler failed");
///         Reply::error(-1, "request failed")
///     }
/// }
/// ```
pub trait ErrorHandler: Send + Sync + 'static {
    /// Turns a handler error into a reply. For a notification, return [`Reply::nothing`] to
    /// keep the connection, or a fatal [`Reply`] to end it.
    fn handle_error(&self, failed: Failed<'_>, error: HandlerError) -> Reply;

    /// Turns a handler panic into a reply. The default passes
    /// [`HandlerError`] with [`HandlerError::is_panic`] to [`handle_error`](Self::handle_error).
    fn handle_panic(&self, failed: Failed<'_>, panic: Box<dyn Any + Send>) -> Reply {
        let message = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(non-string panic payload)");
        self.handle_error(failed, HandlerError::panicked(message))
    }
}

/// The default: a failed request gets an error response; a failed notification, having no
/// one to answer, is logged (with its method and the error's chain) and the connection carries
/// on. A handler that returns a fatal [`Reply`] still ends the connection.
///
/// For the stricter rule of the PHP original, where a failed notification ends the
/// connection, use [`StrictErrorHandler`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultErrorHandler;

impl ErrorHandler for DefaultErrorHandler {
    fn handle_error(&self, failed: Failed<'_>, error: HandlerError) -> Reply {
        match failed.id {
            Some(id) => {
                tracing::debug!(method = failed.method, id, %error, "request failed");
                Reply::from_error(error)
            }
            None => {
                tracing::warn!(method = failed.method, %error, "notification handler failed");
                Reply::nothing()
            }
        }
    }
}

/// The PHP original's rule: a failed request gets an error response; a failed notification
/// ends the connection with a fatal error on both sides (its code and message are the
/// handler's). A notification for an unknown method, or one whose payload does not decode, is
/// still only logged, so a peer's typo cannot end the connection.
///
/// # Examples
/// ```
/// use channel_dispatcher::{Dispatcher, StrictErrorHandler};
///
/// let builder = Dispatcher::builder().error_handler(StrictErrorHandler);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct StrictErrorHandler;

impl ErrorHandler for StrictErrorHandler {
    fn handle_error(&self, failed: Failed<'_>, error: HandlerError) -> Reply {
        if failed.id.is_some() || error.is_unknown_method() || error.is_invalid_payload() {
            return DefaultErrorHandler.handle_error(failed, error);
        }
        tracing::error!(method = failed.method, %error, "notification handler failed: ending");
        Reply::fatal(error.code, error.message)
    }
}

impl fmt::Debug for dyn ErrorHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn ErrorHandler")
    }
}

pin_project_lite::pin_project! {
    /// A handler service's future, with its error made a [`HandlerError`].
    pub(crate) struct HandlerResult<F> {
        #[pin]
        fut: F,
    }
}

impl<F> HandlerResult<F> {
    pub(crate) fn new(fut: F) -> Self {
        Self { fut }
    }
}

impl<F, E> Future for HandlerResult<F>
where
    F: Future<Output = Result<Reply, E>>,
    E: IntoHandlerError,
{
    type Output = Result<Reply, HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        self.project()
            .fut
            .poll(cx)
            .map(|result| result.map_err(IntoHandlerError::into_handler_error))
    }
}

#[cfg(test)]
mod size {
    use super::*;

    /// What a handler's run returns is moved through each of its steps (the route, the
    /// middleware, the slot, the driver): its rare parts are boxed.
    #[test]
    fn a_handlers_answer_stays_small() {
        let size = std::mem::size_of::<Result<Reply, HandlerError>>();
        assert!(size <= 56, "Result<Reply, HandlerError> takes {size} bytes");
    }
}
