//! postcard envelopes: a kind byte, the fields in postcard encoding, then the payload as the
//! rest of the frame (postcard is not self-describing, so the payload has no length of its own).
//!
//! ```text
//! request        1 | id | method | attributes | timeout_us | parent | payload...
//! notification   2 | method | attributes | payload...
//! response       3 | id | attributes | payload...
//! error          4 | id | attributes | code | message | 0            (no data)
//!                4 | id | attributes | code | message | 1 | data...  (with data)
//! fatal          5 | code | message
//! cancel         6 | id
//! goodbye        7 | reason
//! stream items   8 | stream | position | payload...   (payload: the items as one sequence)
//! stream end     9 | stream | 0                       (no error)
//!                9 | stream | 1 | code | message
//! stream credit  10 | stream | credit
//! stream cancel  11 | stream
//! notif. credit  12 | credit
//! ```
//! Integers are varints (`code` zig-zag), strings a varint length and UTF-8, attributes a varint
//! count and that many (name, value) string pairs.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, EnvelopeError, EnvelopeKind, ErrorBody, Method, PartialHeader};
use crate::error::CodecError;
use crate::message::Attributes;

pub(super) fn encode(envelope: &Envelope, dst: &mut BytesMut) {
    dst.put_u8(envelope.kind() as u8);
    match envelope {
        Envelope::Request {
            id,
            method,
            attributes,
            timeout_us,
            parent,
            payload,
        } => {
            put(dst, &(id, method.as_str(), attributes, timeout_us, parent));
            dst.put_slice(payload);
        }
        Envelope::Notification {
            method,
            attributes,
            payload,
        } => {
            put(dst, &(method.as_str(), attributes));
            dst.put_slice(payload);
        }
        Envelope::Response {
            id,
            attributes,
            payload,
        } => {
            put(dst, &(id, attributes));
            dst.put_slice(payload);
        }
        Envelope::Error {
            id,
            attributes,
            error,
        } => {
            put(dst, &(id, attributes, error.code, &error.message));
            match &error.data {
                Some(data) => {
                    dst.put_u8(1);
                    dst.put_slice(data);
                }
                None => dst.put_u8(0),
            }
        }
        Envelope::Fatal { code, message } => put(dst, &(code, message)),
        Envelope::Cancel { id } => put(dst, id),
        Envelope::Goodbye { reason } => put(dst, reason),
        Envelope::StreamItems {
            stream,
            position,
            payload,
        } => {
            put(dst, &(stream, position));
            dst.put_slice(payload);
        }
        Envelope::StreamEnd { stream, error } => {
            put(dst, &(stream, error.as_ref().map(|e| (e.code, &e.message))))
        }
        Envelope::StreamCredit { stream, credit } => put(dst, &(stream, credit)),
        Envelope::StreamCancel { stream } => put(dst, stream),
        Envelope::NotificationCredit { credit } => put(dst, credit),
    }
}

fn put<T: Serialize>(dst: &mut BytesMut, value: &T) {
    // NB. Tuples of integers, strings and string maps always serialize; memory writes cannot fail.
    let _ = ::postcard::to_io(value, super::Sink(dst));
}

pub(super) fn decode(frame: Bytes) -> Result<Envelope, EnvelopeError> {
    let mut header = PartialHeader::default();
    match decode_inner(&frame, &mut header) {
        Ok(envelope) => Ok(envelope),
        Err(message) => Err(EnvelopeError {
            header,
            error: CodecError::new("postcard", message),
        }),
    }
}

fn decode_inner(frame: &Bytes, header: &mut PartialHeader) -> Result<Envelope, String> {
    let (&kind_byte, mut rest) = frame.split_first().ok_or("empty frame")?;
    let kind = EnvelopeKind::from_u8(kind_byte)
        .ok_or_else(|| format!("unknown envelope kind {kind_byte}"))?;
    header.kind = Some(kind);
    if matches!(
        kind,
        EnvelopeKind::Request | EnvelopeKind::Response | EnvelopeKind::Error | EnvelopeKind::Cancel
    ) {
        header.id = Some(take::<u64>(rest)?.0);
    }
    let tail = |rest: &[u8]| frame.slice(frame.len() - rest.len()..);
    let envelope = match kind {
        EnvelopeKind::Request => {
            let ((id, method, attributes, timeout_us, parent), r): (
                (u64, &str, Attributes, u64, u64),
                _,
            ) = take(rest)?;
            rest = &[];
            Envelope::Request {
                id,
                method: Method::from_frame(frame, method),
                attributes,
                timeout_us,
                parent,
                payload: tail(r),
            }
        }
        EnvelopeKind::Notification => {
            let ((method, attributes), r): ((&str, Attributes), _) = take(rest)?;
            rest = &[];
            Envelope::Notification {
                method: Method::from_frame(frame, method),
                attributes,
                payload: tail(r),
            }
        }
        EnvelopeKind::Response => {
            let ((id, attributes), r): ((u64, Attributes), _) = take(rest)?;
            rest = &[];
            Envelope::Response {
                id,
                attributes,
                payload: tail(r),
            }
        }
        EnvelopeKind::Error => {
            let ((id, attributes, code, message), r): ((u64, Attributes, i64, String), _) =
                take(rest)?;
            let data = match r.split_first() {
                Some((0, [])) => None,
                Some((1, data)) => Some(tail(data)),
                _ => return Err("error envelope: bad data tag".into()),
            };
            rest = &[];
            Envelope::Error {
                id,
                attributes,
                error: ErrorBody {
                    code,
                    message,
                    data,
                },
            }
        }
        EnvelopeKind::Fatal => {
            let ((code, message), r): ((i64, String), _) = take(rest)?;
            rest = r;
            Envelope::Fatal { code, message }
        }
        EnvelopeKind::Cancel => {
            let (id, r) = take::<u64>(rest)?;
            rest = r;
            Envelope::Cancel { id }
        }
        EnvelopeKind::Goodbye => {
            let (reason, r) = take::<String>(rest)?;
            rest = r;
            Envelope::Goodbye { reason }
        }
        EnvelopeKind::StreamItems => {
            let ((stream, position), r): ((u64, u64), _) = take(rest)?;
            rest = &[];
            Envelope::StreamItems {
                stream,
                position,
                payload: tail(r),
            }
        }
        EnvelopeKind::StreamEnd => {
            let ((stream, error), r): ((u64, Option<(i64, String)>), _) = take(rest)?;
            rest = r;
            Envelope::StreamEnd {
                stream,
                error: error.map(|(code, message)| ErrorBody {
                    code,
                    message,
                    data: None,
                }),
            }
        }
        EnvelopeKind::StreamCredit => {
            let ((stream, credit), r): ((u64, u64), _) = take(rest)?;
            rest = r;
            Envelope::StreamCredit { stream, credit }
        }
        EnvelopeKind::StreamCancel => {
            let (stream, r) = take::<u64>(rest)?;
            rest = r;
            Envelope::StreamCancel { stream }
        }
        EnvelopeKind::NotificationCredit => {
            let (credit, r) = take::<u64>(rest)?;
            rest = r;
            Envelope::NotificationCredit { credit }
        }
    };
    if rest.is_empty() {
        Ok(envelope)
    } else {
        Err(format!("{} trailing bytes", rest.len()))
    }
}

fn take<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, &'a [u8]), String> {
    ::postcard::take_from_bytes(bytes).map_err(|e| e.to_string())
}
