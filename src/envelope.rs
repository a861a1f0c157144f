//! The envelope: what one frame carries. Private; codecs turn it into bytes and back.

use std::fmt;

use bytes::Bytes;
use bytestring::ByteString;

use crate::message::Attributes;

/// The kind byte of an envelope on the wire (PROTOCOL.md, "Envelopes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EnvelopeKind {
    /// A request, answered by a response or an error.
    Request = 1,
    /// A notification, never answered.
    Notification = 2,
    /// A successful answer to a request.
    Response = 3,
    /// An error answer to a request.
    Error = 4,
    /// A fatal error: ends the connection.
    Fatal = 5,
    /// The caller gave up on a request.
    Cancel = 6,
    /// A graceful goodbye, with why: the sender stops.
    Goodbye = 7,
    /// A batch of items of a remote stream (producer to consumer).
    StreamItems = 8,
    /// The end of a remote stream, possibly with an error (producer to consumer).
    StreamEnd = 9,
    /// More credit for a remote stream (consumer to producer).
    StreamCredit = 10,
    /// The consumer dropped a remote stream (consumer to producer).
    StreamCancel = 11,
    /// The receiver started handling more of the sender's notifications, which frees room in
    /// the sender's notification window.
    NotificationCredit = 12,
}

impl EnvelopeKind {
    pub(crate) fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Request,
            2 => Self::Notification,
            3 => Self::Response,
            4 => Self::Error,
            5 => Self::Fatal,
            6 => Self::Cancel,
            7 => Self::Goodbye,
            8 => Self::StreamItems,
            9 => Self::StreamEnd,
            10 => Self::StreamCredit,
            11 => Self::StreamCancel,
            12 => Self::NotificationCredit,
            _ => return None,
        })
    }
}

/// A method name: UTF-8 checked once, then shared without copying (usually a slice of the
/// frame it arrived in, or a `&'static str` for typed messages).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct Method(ByteString);

impl Method {
    pub(crate) const fn from_static(name: &'static str) -> Self {
        Self(ByteString::from_static(name))
    }

    /// A name from bytes sliced from a frame, UTF-8 checked here.
    #[cfg(feature = "msgpack")]
    pub(crate) fn from_frame_bytes(name: Bytes) -> Result<Self, std::str::Utf8Error> {
        ByteString::try_from(name).map(Self)
    }

    /// A name that is a slice of `frame`, checked already.
    #[cfg(any(feature = "json", feature = "postcard"))]
    pub(crate) fn from_frame(frame: &Bytes, name: &str) -> Self {
        match ByteString::try_from(frame.slice_ref(name.as_bytes())) {
            Ok(name) => Self(name),
            // NB. Unreachable: `name` is a `str` already.
            Err(_) => Self(ByteString::from(name)),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for Method {
    fn from(name: String) -> Self {
        Self(ByteString::from(name))
    }
}

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of an error or fatal envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ErrorBody {
    pub(crate) code: i64,
    pub(crate) message: String,
    pub(crate) data: Option<Bytes>,
}

/// One decoded frame. `payload` is the codec-encoded user value, sliced from the frame without
/// copying; an empty payload stands for the codec's unit value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Envelope {
    Request {
        id: u64,
        method: Method,
        attributes: Attributes,
        /// Microseconds the caller still waits; 0 means no deadline.
        timeout_us: u64,
        /// The receiver's own request whose handler makes this call (a nested call); 0 for none.
        parent: u64,
        payload: Bytes,
    },
    Notification {
        method: Method,
        attributes: Attributes,
        payload: Bytes,
    },
    Response {
        id: u64,
        attributes: Attributes,
        payload: Bytes,
    },
    Error {
        id: u64,
        attributes: Attributes,
        error: ErrorBody,
    },
    Fatal {
        code: i64,
        message: String,
    },
    Cancel {
        id: u64,
    },
    /// Why the sender stops (for the peer's `Termination`), possibly empty.
    Goodbye {
        reason: String,
    },
    /// `payload` is the codec's encoding of the batch as a sequence (`Vec<T>`).
    StreamItems {
        stream: u64,
        position: u64,
        payload: Bytes,
    },
    StreamEnd {
        stream: u64,
        error: Option<ErrorBody>,
    },
    StreamCredit {
        stream: u64,
        credit: u64,
    },
    StreamCancel {
        stream: u64,
    },
    NotificationCredit {
        credit: u64,
    },
}

impl Envelope {
    pub(crate) fn kind(&self) -> EnvelopeKind {
        match self {
            Self::Request { .. } => EnvelopeKind::Request,
            Self::Notification { .. } => EnvelopeKind::Notification,
            Self::Response { .. } => EnvelopeKind::Response,
            Self::Error { .. } => EnvelopeKind::Error,
            Self::Fatal { .. } => EnvelopeKind::Fatal,
            Self::Cancel { .. } => EnvelopeKind::Cancel,
            Self::Goodbye { .. } => EnvelopeKind::Goodbye,
            Self::StreamItems { .. } => EnvelopeKind::StreamItems,
            Self::StreamEnd { .. } => EnvelopeKind::StreamEnd,
            Self::StreamCredit { .. } => EnvelopeKind::StreamCredit,
            Self::StreamCancel { .. } => EnvelopeKind::StreamCancel,
            Self::NotificationCredit { .. } => EnvelopeKind::NotificationCredit,
        }
    }

    /// The request id this envelope carries or answers.
    pub(crate) fn id(&self) -> Option<u64> {
        match self {
            Self::Request { id, .. }
            | Self::Response { id, .. }
            | Self::Error { id, .. }
            | Self::Cancel { id } => Some(*id),
            _ => None,
        }
    }
}

/// What a codec could read from a frame it failed to decode: enough to answer a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PartialHeader {
    pub(crate) kind: Option<EnvelopeKind>,
    pub(crate) id: Option<u64>,
    /// The method, where the codec reads it before the id (the PHP wire's class).
    pub(crate) method: Option<Method>,
}

/// A frame that is not a valid envelope.
#[derive(Debug)]
pub(crate) struct EnvelopeError {
    pub(crate) header: PartialHeader,
    pub(crate) error: crate::error::CodecError,
}
