//! Errors: what a caller, a handler and a connection can see go wrong.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::codec::Codec;
use crate::transport::ChildExited;

/// Error codes carried by error envelopes; the values follow JSON-RPC 2.0 where one fits.
///
/// Handlers may use any other `i64` for their own errors.
pub mod code {
    /// Reserved (JSON-RPC's parse error) and never sent: an undecodable request is answered
    /// [`INVALID_REQUEST`] when its kind and id are readable, and dropped otherwise.
    pub const PARSE_ERROR: i64 = -32700;
    /// A request that could not be read whole, or over the receiver's limits on one envelope
    /// (attributes, method name); also a nested request whose parent is no longer pending,
    /// and the misuse of a stream's mode. (A request reusing a pending id is dropped, not
    /// answered: an answer would be taken for the first request's.)
    pub const INVALID_REQUEST: i64 = -32600;
    /// No route handles the requested method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// The payload could not be decoded as the route's message type.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The handler failed or panicked.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// A frame was larger than the receiver's maximum frame length.
    pub const FRAME_TOO_LARGE: i64 = -32001;
    /// The receiver is shutting down and takes no new requests.
    pub const SHUTTING_DOWN: i64 = -32002;
    /// The caller's deadline passed before the handler finished.
    pub const DEADLINE_EXCEEDED: i64 = -32003;
    /// A remote stream was released by its producer: not consumed for its idle time.
    pub const STREAM_RELEASED: i64 = -32004;
    /// The receiver holds too much of the sender's work (over its announced limits, a chain of
    /// nested calls too deep, or too many stored streams); retry later.
    pub const OVERLOADED: i64 = -32005;
}

/// An error from encoding or decoding a value or an envelope with a [`Codec`].
#[derive(Clone, Debug, thiserror::Error)]
#[error("{codec} codec: {message}")]
pub struct CodecError {
    codec: &'static str,
    message: String,
}

impl CodecError {
    pub(crate) fn new(codec: &'static str, message: impl fmt::Display) -> Self {
        Self {
            codec,
            message: message.to_string(),
        }
    }
}

/// An error response from the peer: it answers one call and leaves the connection up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteError {
    /// The error code (see [`code`] for the reserved ones).
    pub code: i64,
    /// A human-readable message.
    pub message: String,
    /// Optional structured data, encoded with the connection's codec; see [`RemoteError::data`].
    pub data: Option<Bytes>,
    pub(crate) codec: Codec,
}

impl RemoteError {
    /// An error answer with a code and a message, as a peer would send it: for tests of code
    /// that handles [`CallError::Remote`], and for outbound middleware.
    ///
    /// # Examples
    /// ```
    /// use channel_dispatcher::{CallError, Codec, RemoteError};
    ///
    /// let error = CallError::Remote(RemoteError::new(404, "no such user", Codec::default()));
    /// assert_eq!(error.as_remote().map(|e| e.code), Some(404));
    /// ```
    pub fn new(code: i64, message: impl Into<String>, codec: Codec) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
            codec,
        }
    }

    /// Attaches structured data, encoded with `codec` (the one given to [`new`](Self::new)).
    ///
    /// # Errors
    /// A [`CodecError`] when serde refuses the value.
    pub fn with_data<T: serde::Serialize>(mut self, data: &T) -> Result<Self, CodecError> {
        self.data = Some(self.codec.encode(data)?);
        Ok(self)
    }

    /// Decodes the optional structured data attached to the error.
    ///
    /// # Errors
    /// A [`CodecError`] when the data is not a `T`.
    pub fn data<T: DeserializeOwned>(&self) -> Result<Option<T>, CodecError> {
        self.data
            .as_ref()
            .map(|bytes| self.codec.decode(bytes))
            .transpose()
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer answered error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for RemoteError {}

/// Why a connection ended. Every pending call fails with this reason inside
/// [`CallError::Terminated`], and `on_stop` callbacks and `closed()` receive it.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Termination {
    /// This side called `stop()`.
    #[error("the connection was stopped: stop() was called on this side")]
    Stopped,
    /// Every `Dispatcher` handle was dropped.
    #[error("every Dispatcher handle was dropped, which stops the connection: keep one for as long as it should run")]
    Dropped,
    /// The peer said goodbye (it stopped gracefully).
    #[error("the peer stopped the connection{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    PeerStopped {
        /// Why, as the peer said in its goodbye ("the peer called stop()", "the peer dropped
        /// its last handle"; empty if it gave none).
        reason: String,
    },
    /// The transport reached end of file without a goodbye: the peer closed or died.
    #[error(
        "the peer closed the connection without a goodbye: it exited, crashed or lost the link"
    )]
    Closed,
    /// Reading or writing the transport failed.
    #[error("reading or writing the channel failed: {0}")]
    Transport(Arc<io::Error>),
    /// The peer broke the protocol in a way that ends the connection (for example a frame cut
    /// off by end of file).
    #[error("the peer broke the protocol: {0}")]
    Protocol(ProtocolError),
    /// The handshake failed; no envelope was exchanged.
    #[error("the handshake failed: {0}")]
    Handshake(HandshakeError),
    /// The peer sent a fatal error, which ends both sides.
    #[error("peer sent fatal error {code}: {message}")]
    PeerFatal {
        /// The fatal error's code.
        code: i64,
        /// The fatal error's message.
        message: String,
    },
    /// The child process of a [`Channel::spawn_child`](crate::Channel::spawn_child) channel
    /// exited (or was killed) without a goodbye; its standard error may say why.
    #[error(
        "the child process exited ({status}) without a goodbye: its standard error may say why"
    )]
    ChildExited {
        /// Its exit status (`signal: 9 (SIGKILL)` when killed on Unix).
        status: std::process::ExitStatus,
    },
    /// The connection's driver went away before the connection ended: the [`Connection`]
    /// future was dropped (its task aborted, its runtime shut down) or it panicked.
    ///
    /// [`Connection`]: crate::Connection
    #[error("the connection's driver was dropped before the connection ended")]
    Aborted,
    /// This side sent a fatal error (from its [`ErrorHandler`](crate::ErrorHandler)).
    #[error("sent fatal error {code} to the peer: {message}")]
    LocalFatal {
        /// The fatal error's code.
        code: i64,
        /// The fatal error's message.
        message: String,
    },
}

impl Termination {
    /// A failed read or write of the transport; a child's pipe failing because the child
    /// exited becomes [`Termination::ChildExited`].
    pub(crate) fn transport(error: io::Error) -> Self {
        let exited = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<ChildExited>());
        match exited {
            Some(ChildExited(status)) => Self::ChildExited { status: *status },
            None => Self::Transport(Arc::new(error)),
        }
    }

    /// `true` when the connection ended because one side asked it to (stop, drop, goodbye),
    /// rather than through an error.
    pub fn is_graceful(&self) -> bool {
        matches!(
            self,
            Self::Stopped | Self::Dropped | Self::PeerStopped { .. }
        )
    }
}

/// The peer broke the wire protocol, or a rule every peer must keep. See PROTOCOL.md.
///
/// Each variant ends the connection; its message names the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A frame's length prefix was over this side's maximum frame length, which the peer knows
    /// from the handshake.
    #[error(
        "the peer sent a frame of {len} bytes, over this side's maximum of {max}{}",
        text.as_ref().map_or(String::new(), |text| format!(
            "; its length prefix reads as text ({text:?}): the peer probably wrote text to the \
             channel (a print to stdout in a child process?)"
        ))
    )]
    FrameTooLarge {
        /// The length the frame claimed.
        len: usize,
        /// This side's maximum frame length.
        max: usize,
        /// The length prefix as text, when its four bytes are printable.
        text: Option<String>,
    },
    /// The peer sent more items of a remote stream than the consumer's credit allowed.
    #[error(
        "the peer sent {received} items of stream {stream} with credit for {credit}: a producer \
         must not send beyond the consumer's credit"
    )]
    CreditExceeded {
        /// The stream.
        stream: u64,
        /// The credit left when the items arrived.
        credit: u64,
        /// Items in the batch.
        received: usize,
    },
    /// The peer sent more work than this side announced it accepts ([`Limits`]), and kept on
    /// after it was refused (requests) or could not be refused (notifications).
    ///
    /// [`Limits`]: crate::Limits
    #[error(
        "the peer exceeded this side's {limit} of {max}, announced in the handshake: a peer \
         must hold back new work while that much is pending"
    )]
    AdmissionExceeded {
        /// The limit.
        limit: crate::Limit,
        /// Its value.
        max: usize,
    },
    /// The peer stopped reading: the bytes waiting to be written to it stayed over the hard
    /// cap for the stall timeout ([`Builder::write_stall_timeout`]).
    ///
    /// [`Builder::write_stall_timeout`]: crate::Builder::write_stall_timeout
    #[error(
        "the peer stopped reading: {pending} bytes waited to be written for {waited:?}; a peer \
         must keep reading what it is sent"
    )]
    NotReading {
        /// Bytes waiting to be written.
        pending: usize,
        /// How long they waited over the cap.
        waited: Duration,
    },
    /// A frame header broke the framing's rules (the PHP original's framing: a first byte
    /// other than `0x00`, or a length of 0).
    #[error("the peer sent a malformed frame: {reason}")]
    MalformedFrame {
        /// The rule it broke.
        reason: String,
    },
    /// End of file arrived in the middle of a frame.
    #[error(
        "connection closed in the middle of a frame ({received} of {expected} bytes received)"
    )]
    TruncatedFrame {
        /// Bytes of the frame (prefix included) that arrived.
        received: usize,
        /// Bytes the frame should have had (prefix included), when the prefix was complete.
        expected: usize,
    },
}

/// The handshake at connection start failed. Both sides report the mismatch; neither hangs.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer's first frame is not a channel-dispatcher hello.
    #[error("the peer is not a channel-dispatcher peer (bad hello)")]
    NotAPeer,
    /// The peers speak different protocol versions.
    #[error("protocol version mismatch: this side speaks {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// The peers use different codecs.
    #[error("codec mismatch: this side uses {ours}, the peer uses {theirs}; configure both with the same codec")]
    CodecMismatch {
        /// Our codec's name.
        ours: String,
        /// The peer's codec's name.
        theirs: String,
    },
    /// This side's [`Authenticator`](crate::Authenticator) refused the peer (a
    /// [`SharedToken`](crate::SharedToken): its token was missing or wrong); the peer was told
    /// the reason.
    #[error("authentication refused: {reason}")]
    Unauthenticated {
        /// The reason the authenticator gave.
        reason: String,
    },
    /// This side refused every peer for the time being (a [`Server`](crate::server::Server)
    /// at its connection limit); the peer was told the reason.
    #[error("{reason}")]
    Unavailable {
        /// Why, as the peer was told.
        reason: String,
    },
    /// The peer's first bytes were TLS while this side speaks plain TCP (or the other way
    /// round: a TLS server answered a plaintext hello).
    #[error("the peer speaks TLS and this side does not: use TLS on both sides (a tls: address, tls::TlsListener) or on neither")]
    PeerSpeaksTls,
    /// The peer refused this side, giving a reason.
    #[error("the peer refused the connection: {reason}")]
    Refused {
        /// The reason the peer gave.
        reason: String,
    },
    /// This side's token is longer than the handshake carries (65,535 bytes); nothing was
    /// sent. Use a shorter token.
    #[error("the token is {len} bytes long, more than the 65535 the handshake carries: use a shorter token")]
    TokenTooLong {
        /// The token's length in bytes.
        len: usize,
    },
    /// The peer did not complete the handshake in time.
    #[error("the peer did not complete the handshake within {0:?}")]
    Timeout(Duration),
    /// The transport closed or failed during the handshake.
    #[error("the channel failed during the handshake: {0}")]
    Transport(Arc<io::Error>),
}

/// The result of a call: `Result<T, CallError>`.
pub type Result<T, E = CallError> = std::result::Result<T, E>;

/// Why a call (request or notification) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The peer answered with an error response.
    #[error(transparent)]
    Remote(RemoteError),
    /// The connection ended before an answer arrived, or was already over when the call was made.
    #[error("the connection ended before an answer: {0}")]
    Terminated(Termination),
    /// No answer arrived within the call's timeout; a cancel was sent to the peer.
    #[error("no answer within {0:?}, the call's timeout: the peer was told to stop; retry, or allow more time")]
    Timeout(Duration),
    /// The message could not be encoded; nothing was sent.
    #[error("could not encode the message (nothing was sent): {0}")]
    Encode(CodecError),
    /// An outbound middleware ([`Builder::outbound`](crate::Builder::outbound)) refused the
    /// call (it returns this without calling `next`); nothing was sent.
    #[error("refused by outbound middleware ({code}): {message}")]
    Refused {
        /// The middleware's error code.
        code: i64,
        /// The middleware's message.
        message: String,
    },
    /// The answer arrived but is not the expected response type.
    #[error(
        "the answer is not the expected response type (do both sides use the same types?): {0}"
    )]
    Decode(CodecError),
    /// The message is over one of the peer's [`Limits`](crate::Limits) (or, for an answer the
    /// peer could not decode within our limits, over ours); nothing was sent.
    #[error("the message is over the peer's limits (nothing was sent): {0}")]
    Limit(crate::LimitExceeded),
}

impl From<crate::LimitExceeded> for CallError {
    fn from(error: crate::LimitExceeded) -> Self {
        Self::Limit(error)
    }
}

impl CallError {
    /// `true` when the peer refused the call before doing any of its work, because it was
    /// over one of its limits ([`code::OVERLOADED`], -32005): the same call may succeed when
    /// sent again, to this peer later or to another. No other failure is: a call that timed
    /// out or whose connection ended may have run, and is never worth re-sending blindly.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Remote(e) if e.code == code::OVERLOADED)
    }

    /// The remote error, if the peer answered with one.
    pub fn as_remote(&self) -> Option<&RemoteError> {
        match self {
            Self::Remote(e) => Some(e),
            _ => None,
        }
    }

    /// The termination reason, if the call failed because the connection ended.
    pub fn termination(&self) -> Option<&Termination> {
        match self {
            Self::Terminated(t) => Some(t),
            _ => None,
        }
    }
}

/// The error a handler returns; the [`ErrorHandler`](crate::ErrorHandler) turns it into an error
/// response (for a request) or decides what to do (for a notification).
///
/// Any `std::error::Error` converts into it with `?`, so handlers can use ordinary error types.
/// It deliberately does not implement `std::error::Error` itself (as `anyhow::Error`), which is
/// what makes that blanket conversion possible.
pub struct HandlerError {
    pub(crate) kind: HandlerErrorKind,
    pub(crate) code: i64,
    pub(crate) message: String,
    /// Boxed: rarely set, and an error is moved like an answer.
    pub(crate) data: Option<Box<Bytes>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HandlerErrorKind {
    Failed,
    UnknownMethod,
    InvalidPayload,
    Panicked,
}

impl HandlerError {
    /// An error with a code and a message, sent to the caller as they are.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            kind: HandlerErrorKind::Failed,
            code,
            message: message.into(),
            data: None,
        }
    }

    /// An internal error ([`code::INTERNAL_ERROR`]) with a message.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(code::INTERNAL_ERROR, message)
    }

    /// Attaches structured data, already encoded with the connection's codec
    /// (see [`Context::encode`](crate::Context::encode)).
    pub fn with_data(mut self, data: Bytes) -> Self {
        self.data = Some(Box::new(data));
        self
    }

    /// No route for `method`; on the PHP wire, in the PHP router's words (a PHP caller may
    /// check the code).
    pub(crate) fn unknown_method(method: &str, codec: Codec) -> Self {
        let (code, message) = match codec.is_php() {
            true => (404, format!("No handler for {method}")),
            false => (code::METHOD_NOT_FOUND, format!("unknown method `{method}`")),
        };
        Self {
            kind: HandlerErrorKind::UnknownMethod,
            code,
            message,
            data: None,
        }
    }

    pub(crate) fn invalid_payload(method: &str, error: &CodecError) -> Self {
        Self {
            kind: HandlerErrorKind::InvalidPayload,
            code: code::INVALID_PARAMS,
            message: format!("invalid payload for `{method}`: {error}"),
            data: None,
        }
    }

    pub(crate) fn panicked(message: &str) -> Self {
        Self {
            kind: HandlerErrorKind::Panicked,
            code: code::INTERNAL_ERROR,
            message: format!("handler panicked: {message}"),
            data: None,
        }
    }

    /// The error code sent to the caller.
    pub fn code(&self) -> i64 {
        self.code
    }

    /// The message sent to the caller.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// `true` when no route matched the method.
    pub fn is_unknown_method(&self) -> bool {
        self.kind == HandlerErrorKind::UnknownMethod
    }

    /// `true` when the payload could not be decoded as the route's message type.
    pub fn is_invalid_payload(&self) -> bool {
        self.kind == HandlerErrorKind::InvalidPayload
    }

    /// `true` when the handler panicked.
    pub fn is_panic(&self) -> bool {
        self.kind == HandlerErrorKind::Panicked
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::internal(chain(&error))
    }
}

/// An error's message followed by its sources': `outer: inner: root`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("code", &self.code)
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

/// The error a tower layer's boxed error (`tower::BoxError`) stands for.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors a handler service may fail with: [`HandlerError`], or the boxed errors of tower
/// middleware such as `Timeout` (`Box<dyn Error + Send + Sync>`), which become internal errors
/// with their message (a `HandlerError` that went through such a layer comes back as it was).
pub trait IntoHandlerError {
    /// The error as a [`HandlerError`].
    fn into_handler_error(self) -> HandlerError;
}

impl IntoHandlerError for HandlerError {
    fn into_handler_error(self) -> HandlerError {
        self
    }
}

impl IntoHandlerError for BoxError {
    fn into_handler_error(self) -> HandlerError {
        match self.downcast::<BoxedHandlerError>() {
            Ok(boxed) => boxed.0,
            Err(other) => HandlerError::internal(chain(&*other)),
        }
    }
}

impl IntoHandlerError for std::convert::Infallible {
    fn into_handler_error(self) -> HandlerError {
        match self {}
    }
}

/// Lets a handler's error pass through tower layers that box errors (`Timeout` needs
/// `Into<BoxError>`), and come back whole.
impl From<HandlerError> for BoxError {
    fn from(error: HandlerError) -> Self {
        Box::new(BoxedHandlerError(error))
    }
}

#[derive(Debug)]
struct BoxedHandlerError(HandlerError);

impl fmt::Display for BoxedHandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for BoxedHandlerError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Limit, LimitExceeded};

    /// An error's message and its sources', in order.
    fn report(error: &dyn std::error::Error) -> Vec<String> {
        let mut lines = vec![error.to_string()];
        let mut source = error.source();
        while let Some(cause) = source {
            lines.push(cause.to_string());
            source = cause.source();
        }
        lines
    }

    #[test]
    fn every_error_says_what_happened_on_its_first_line_and_nothing_twice() {
        let io = || Arc::new(io::Error::new(io::ErrorKind::BrokenPipe, "broken pipe"));
        let codec = || CodecError::new("msgpack", "invalid type: string, expected u32");
        let mismatch = HandshakeError::CodecMismatch {
            ours: "json".into(),
            theirs: "msgpack".into(),
        };
        let limit = LimitExceeded {
            limit: Limit::MethodLength,
            value: 300,
            max: 256,
        };
        let cases: Vec<(Box<dyn std::error::Error>, &str)> = vec![
            (Box::new(Termination::Stopped), "stop()"),
            (Box::new(Termination::Dropped), "keep one"),
            (
                Box::new(Termination::PeerStopped {
                    reason: "the peer called stop()".into(),
                }),
                "stopped the connection: the peer called stop()",
            ),
            (Box::new(Termination::Closed), "without a goodbye"),
            (Box::new(Termination::Transport(io())), "broken pipe"),
            (
                Box::new(Termination::Handshake(mismatch.clone())),
                "this side uses json, the peer uses msgpack",
            ),
            (
                Box::new(Termination::Protocol(ProtocolError::CreditExceeded {
                    stream: 1,
                    credit: 2,
                    received: 3,
                })),
                "credit",
            ),
            (Box::new(Termination::Aborted), "dropped"),
            (
                Box::new(CallError::Terminated(Termination::Handshake(mismatch))),
                "the peer uses msgpack",
            ),
            (
                Box::new(CallError::Timeout(Duration::from_secs(1))),
                "allow more time",
            ),
            (Box::new(CallError::Encode(codec())), "expected u32"),
            (Box::new(CallError::Decode(codec())), "same types"),
            (Box::new(CallError::Limit(limit)), "over the limit of 256"),
            (Box::new(HandshakeError::Transport(io())), "broken pipe"),
            (
                Box::new(HandshakeError::TokenTooLong { len: 70_000 }),
                "shorter token",
            ),
        ];
        #[cfg(unix)]
        let cases = {
            use std::os::unix::process::ExitStatusExt;
            let status = std::process::ExitStatus::from_raw(1 << 8);
            let exited = io::Error::new(io::ErrorKind::BrokenPipe, ChildExited(status));
            let mut cases = cases;
            cases.push((
                Box::new(Termination::transport(exited)),
                "the child process exited (exit status: 1) without a goodbye",
            ));
            cases
        };
        for (error, says) in cases {
            let lines = report(&*error);
            assert!(
                lines[0].contains(says),
                "{:?} does not say {says:?}",
                lines[0]
            );
            for (i, line) in lines.iter().enumerate().skip(1) {
                assert!(
                    !lines[..i]
                        .iter()
                        .any(|earlier| earlier.contains(line.as_str())),
                    "printed twice in {lines:?}"
                );
            }
        }
    }
}
