//! Limits on what one envelope may carry, checked on both sides: before sending (a typed
//! [`CallError::Limit`](crate::CallError::Limit), nothing sent) and on receipt (the envelope is
//! malformed: a request is answered `-32600` naming the limit, a notification is logged).

use std::fmt;

use crate::envelope::Envelope;
use crate::message::Attributes;

/// Limits on one envelope. Both peers should use compatible limits: the frame length is told to
/// the peer in the handshake, the others are checked by each side on what it sends and receives.
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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_length: 16 * 1024 * 1024,
            max_attributes: 64,
            max_attribute_bytes: 16 * 1024,
            max_method_length: 256,
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
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::FrameLength => "frame length in bytes",
            Self::Attributes => "number of attributes",
            Self::AttributeBytes => "attribute bytes",
            Self::MethodLength => "method name length in bytes",
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
