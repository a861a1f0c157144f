//! Limits on what the peer may send: what one envelope may carry, and how much work may wait at
//! once. Each side announces its limits in the handshake; a sender checks what it sends against
//! the peer's (a typed [`CallError::Limit`](crate::CallError::Limit), nothing sent, or a call that
//! waits for room) and a receiver checks what it receives against its own.

use std::fmt;

use crate::envelope::Envelope;
use crate::message::Attributes;

/// Limits on what the peer may send. Every field is announced to the peer in the handshake
/// (PROTOCOL.md, section 2), so a compliant peer never exceeds them: it fails a message that is
/// too large before sending it, and holds back new work while too much of it is pending.
///
/// The admission limits (`max_pending_*`, `max_nested_requests`) bound the peer's work this side
/// holds at once. A peer that exceeds them anyway is refused (a request is answered
/// [`code::OVERLOADED`](crate::error::code::OVERLOADED)) and, if it keeps on, cut off with a
/// [`ProtocolError`](crate::ProtocolError) naming the limit.
///
/// # Examples
/// ```
/// use channel_dispatcher::{Dispatcher, Limits};
///
/// let mut limits = Limits::default();
/// limits.max_attributes = 8;
/// let builder = Dispatcher::builder().limits(limits);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// The largest frame body accepted, in bytes. Default: 16 MiB.
    pub max_frame_length: usize,
    /// The most attributes on one envelope. Default: 64.
    pub max_attributes: usize,
    /// The most bytes of attribute names and values together on one envelope. Default: 16 KiB.
    pub max_attribute_bytes: usize,
    /// The longest method name, in bytes. Default: 256.
    pub max_method_length: usize,
    /// The most requests of the peer's accepted at once (at least 1), running or waiting for a handler slot
    /// ([`Builder::max_concurrent_handlers`](crate::Builder::max_concurrent_handlers)), nested
    /// requests aside. Default: 4096.
    pub max_pending_requests: usize,
    /// The most requests of the peer's that are nested in this side's own calls (made by the
    /// peer's handler of one of our requests) accepted at once. They bypass
    /// `max_pending_requests` and the handler limit, so that a chain of calls back and forth
    /// always completes however busy both sides are. Default: 1024.
    pub max_nested_requests: usize,
    /// The most notifications of the peer's waiting for a handler slot. Default: 4096.
    pub max_pending_notifications: usize,
    /// The most payload bytes of the peer's pending requests and waiting notifications together
    /// (a single message is accepted whatever its size when nothing else is pending).
    /// Default: 64 MiB.
    pub max_pending_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_length: 16 * 1024 * 1024,
            max_attributes: 64,
            max_attribute_bytes: 16 * 1024,
            max_method_length: 256,
            max_pending_requests: 4096,
            max_nested_requests: 1024,
            max_pending_notifications: 4096,
            max_pending_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Which limit was exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// [`Limits::max_frame_length`] (of the receiving side).
    FrameLength,
    /// [`Limits::max_attributes`].
    Attributes,
    /// [`Limits::max_attribute_bytes`].
    AttributeBytes,
    /// [`Limits::max_method_length`].
    MethodLength,
    /// [`Limits::max_pending_requests`].
    PendingRequests,
    /// [`Limits::max_nested_requests`].
    NestedRequests,
    /// [`Limits::max_pending_notifications`].
    PendingNotifications,
    /// [`Limits::max_pending_bytes`].
    PendingBytes,
    /// [`Builder::max_streams`](crate::Builder::max_streams).
    Streams,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::FrameLength => "frame length in bytes",
            Self::Attributes => "number of attributes",
            Self::AttributeBytes => "attribute bytes",
            Self::MethodLength => "method name length in bytes",
            Self::PendingRequests => "number of pending requests",
            Self::NestedRequests => "number of pending nested requests",
            Self::PendingNotifications => "number of waiting notifications",
            Self::PendingBytes => "pending payload bytes",
            Self::Streams => "number of stored streams",
        })
    }
}

/// A message over one of the [`Limits`]: which limit, the value, and the maximum.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{limit} is {value}, over the limit of {max}")]
pub struct LimitExceeded {
    /// The limit.
    pub limit: Limit,
    /// The message's value.
    pub value: usize,
    /// The maximum allowed.
    pub max: usize,
}

fn check(limit: Limit, value: usize, max: usize) -> Result<(), LimitExceeded> {
    if value > max {
        return Err(LimitExceeded { limit, value, max });
    }
    Ok(())
}

impl Limits {
    /// Checks the parts of a message that do not depend on the codec.
    pub(crate) fn check_parts(
        &self,
        method: Option<&str>,
        attributes: &Attributes,
    ) -> Result<(), LimitExceeded> {
        if let Some(method) = method {
            check(Limit::MethodLength, method.len(), self.max_method_length)?;
        }
        check(Limit::Attributes, attributes.len(), self.max_attributes)?;
        let bytes = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
        check(Limit::AttributeBytes, bytes, self.max_attribute_bytes)
    }

    /// Checks a received envelope.
    pub(crate) fn check_envelope(&self, envelope: &Envelope) -> Result<(), LimitExceeded> {
        match envelope {
            Envelope::Request {
                method, attributes, ..
            }
            | Envelope::Notification {
                method, attributes, ..
            } => self.check_parts(Some(method.as_str()), attributes),
            Envelope::Response { attributes, .. } | Envelope::Error { attributes, .. } => {
                self.check_parts(None, attributes)
            }
            _ => Ok(()),
        }
    }

    /// The counts of pending work at least 1 (0 would make every message wait or be refused).
    pub(crate) fn normalized(mut self) -> Self {
        self.max_pending_requests = self.max_pending_requests.max(1);
        self.max_nested_requests = self.max_nested_requests.max(1);
        self.max_pending_notifications = self.max_pending_notifications.max(1);
        self
    }

    /// Each field as a `u32` for the handshake (larger values are announced as `u32::MAX`).
    pub(crate) fn announced(&self) -> [u32; 8] {
        [
            self.max_frame_length,
            self.max_attributes,
            self.max_attribute_bytes,
            self.max_method_length,
            self.max_pending_requests,
            self.max_nested_requests,
            self.max_pending_notifications,
            self.max_pending_bytes,
        ]
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// The limits a peer announced (the inverse of [`announced`](Self::announced)).
    pub(crate) fn from_announced(fields: [u32; 8]) -> Self {
        let [frame, attributes, attribute_bytes, method, requests, nested, notifications, bytes] =
            fields.map(|n| n as usize);
        Self {
            max_frame_length: frame,
            max_attributes: attributes,
            max_attribute_bytes: attribute_bytes,
            max_method_length: method,
            max_pending_requests: requests,
            max_nested_requests: nested,
            max_pending_notifications: notifications,
            max_pending_bytes: bytes,
        }
        .normalized()
    }

    /// Checks an encoded frame against a maximum frame length.
    pub(crate) fn check_frame(len: usize, max: usize) -> Result<(), LimitExceeded> {
        check(Limit::FrameLength, len, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_breach_names_its_limit_and_value() {
        let limits = Limits {
            max_attributes: 1,
            max_attribute_bytes: 6,
            max_method_length: 3,
            ..Limits::default()
        };
        let two: Attributes = [("a", "1"), ("b", "2")].into_iter().collect();
        let long: Attributes = [("key", "value")].into_iter().collect();
        let none = Attributes::new();
        let cases = [
            (
                limits.check_parts(Some("four"), &none),
                Limit::MethodLength,
                4,
                3,
            ),
            (
                limits.check_parts(Some("ok"), &two),
                Limit::Attributes,
                2,
                1,
            ),
            (limits.check_parts(None, &long), Limit::AttributeBytes, 8, 6),
        ];
        for (result, limit, value, max) in cases {
            assert_eq!(result, Err(LimitExceeded { limit, value, max }));
        }
        assert!(limits.check_parts(Some("abc"), &none).is_ok());
        let message = Limits::check_frame(10, 5).unwrap_err().to_string();
        assert_eq!(message, "frame length in bytes is 10, over the limit of 5");
    }
}
