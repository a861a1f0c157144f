//! JSON envelopes: the same arrays as MessagePack, one JSON document per frame.
//!
//! ```text
//! [1, 7, "math/add", {"trace":"ab"}, 0, 0, {"a":1,"b":2}]
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::value::RawValue;

use crate::codec::{payload_or_unit, Codec};
use crate::envelope::{Envelope, EnvelopeError, EnvelopeKind, ErrorBody, Method, PartialHeader};
use crate::error::CodecError;
use crate::message::Attributes;

const CODEC: Codec = Codec::Json;

pub(super) fn encode(envelope: &Envelope, dst: &mut BytesMut) {
    let mut out = Out(dst);
    out.raw(b"[");
    out.uint(envelope.kind() as u64);
    match envelope {
        Envelope::Request {
            id,
            method,
            attributes,
            timeout_us,
            parent,
            payload,
        } => {
            out.next().uint(*id);
            out.next().json(method.as_str());
            out.next().json(attributes);
            out.next().uint(*timeout_us);
            out.next().uint(*parent);
            out.next().raw(payload_or_unit(CODEC, payload));
        }
        Envelope::Notification {
            method,
            attributes,
            payload,
        } => {
            out.next().json(method.as_str());
            out.next().json(attributes);
            out.next().raw(payload_or_unit(CODEC, payload));
        }
        Envelope::Response {
            id,
            attributes,
            payload,
        } => {
            out.next().uint(*id);
            out.next().json(attributes);
            out.next().raw(payload_or_unit(CODEC, payload));
        }
        Envelope::Error {
            id,
            attributes,
            error,
        } => {
            out.next().uint(*id);
            out.next().json(attributes);
            out.next().json(&error.code);
            out.next().json(&error.message);
            if let Some(data) = &error.data {
                out.next().raw(payload_or_unit(CODEC, data));
            }
        }
        Envelope::Fatal { code, message } => {
            out.next().json(code);
            out.next().json(message);
        }
        Envelope::Cancel { id } => {
            out.next().uint(*id);
        }
        Envelope::Goodbye { reason } => {
            out.next().json(reason);
        }
        Envelope::StreamItems {
            stream,
            position,
            payload,
        } => {
            out.next().uint(*stream);
            out.next().uint(*position);
            out.next().raw(payload_or_unit(CODEC, payload));
        }
        Envelope::StreamEnd { stream, error } => {
            out.next().uint(*stream);
            if let Some(error) = error {
                out.next().json(&error.code);
                out.next().json(&error.message);
            }
        }
        Envelope::StreamCredit { stream, credit } => {
            out.next().uint(*stream);
            out.next().uint(*credit);
        }
        Envelope::StreamCancel { stream } => {
            out.next().uint(*stream);
        }
        Envelope::NotificationCredit { credit } => {
            out.next().uint(*credit);
        }
    }
    out.raw(b"]");
}

struct Out<'a>(&'a mut BytesMut);

impl Out<'_> {
    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.put_slice(bytes);
        self
    }

    fn next(&mut self) -> &mut Self {
        self.raw(b",")
    }

    fn uint(&mut self, value: u64) {
        self.json(&value);
    }

    fn json<T: serde::Serialize + ?Sized>(&mut self, value: &T) {
        // NB. Strings, integers and string maps always serialize; writing to memory cannot fail.
        let _ = serde_json::to_writer(super::Sink(self.0), value);
    }
}

pub(super) fn decode(frame: Bytes) -> Result<Envelope, EnvelopeError> {
    let mut header = PartialHeader::default();
    match decode_inner(&frame, &mut header) {
        Ok(envelope) => Ok(envelope),
        Err(message) => Err(EnvelopeError {
            header,
            error: CodecError::new("json", message),
        }),
    }
}

fn decode_inner(frame: &Bytes, header: &mut PartialHeader) -> Result<Envelope, String> {
    let mut de = serde_json::Deserializer::from_slice(frame);
    let parsed = serde::Deserializer::deserialize_seq(&mut de, Elements).and_then(|elements| {
        de.end()?;
        Ok(elements)
    });
    let elements: Vec<&RawValue> = match parsed {
        Ok(elements) => elements,
        Err(e) => {
            *header = scan_header(frame);
            return Err(format!("not a JSON array: {e}"));
        }
    };
    let field = |index: usize| -> Result<&RawValue, String> {
        elements
            .get(index)
            .copied()
            .ok_or_else(|| format!("envelope has no element {index}"))
    };
    let uint = |index: usize| -> Result<u64, String> {
        serde_json::from_str(field(index)?.get())
            .map_err(|e| format!("element {index}: expected an unsigned integer: {e}"))
    };
    let sint = |index: usize| -> Result<i64, String> {
        serde_json::from_str(field(index)?.get())
            .map_err(|e| format!("element {index}: expected an integer: {e}"))
    };
    let string = |index: usize| -> Result<String, String> {
        serde_json::from_str(field(index)?.get())
            .map_err(|e| format!("element {index}: expected a string: {e}"))
    };
    let attributes = |index: usize| -> Result<Attributes, String> {
        serde_json::from_str(field(index)?.get())
            .map_err(|e| format!("element {index}: expected an attribute map: {e}"))
    };
    let method = |index: usize| -> Result<Method, String> {
        let raw = field(index)?.get();
        let name: String = serde_json::from_str(raw)
            .map_err(|e| format!("element {index}: expected a method name: {e}"))?;
        match raw.get(1..raw.len() - 1) {
            // No escapes: the name is the raw text between the quotes, sliced without copying.
            Some(inner) if inner == name => Ok(Method::from_frame(frame, inner)),
            _ => Ok(Method::from(name)),
        }
    };
    let payload = |index: usize| -> Result<Bytes, String> {
        let raw = field(index)?.get();
        // The raw value borrows from `frame`, so its address gives its offset.
        let start = raw.as_ptr() as usize - frame.as_ptr() as usize;
        Ok(frame.slice(start..start + raw.len()))
    };
    let expect = |kind: EnvelopeKind, n: usize| -> Result<(), String> {
        if elements.len() == n {
            Ok(())
        } else {
            Err(format!(
                "{kind:?} envelope with {} elements, expected {n}",
                elements.len()
            ))
        }
    };

    let kind = uint(0)?;
    let kind = u8::try_from(kind)
        .ok()
        .and_then(EnvelopeKind::from_u8)
        .ok_or_else(|| format!("unknown envelope kind {kind}"))?;
    header.kind = Some(kind);
    if matches!(
        kind,
        EnvelopeKind::Request | EnvelopeKind::Response | EnvelopeKind::Error | EnvelopeKind::Cancel
    ) {
        header.id = Some(uint(1)?);
    }
    Ok(match kind {
        EnvelopeKind::Request => {
            expect(kind, 7)?;
            Envelope::Request {
                id: uint(1)?,
                method: method(2)?,
                attributes: attributes(3)?,
                timeout_us: uint(4)?,
                parent: uint(5)?,
                payload: payload(6)?,
            }
        }
        EnvelopeKind::Notification => {
            expect(kind, 4)?;
            Envelope::Notification {
                method: method(1)?,
                attributes: attributes(2)?,
                payload: payload(3)?,
            }
        }
        EnvelopeKind::Response => {
            expect(kind, 4)?;
            Envelope::Response {
                id: uint(1)?,
                attributes: attributes(2)?,
                payload: payload(3)?,
            }
        }
        EnvelopeKind::Error => {
            if elements.len() != 5 && elements.len() != 6 {
                return Err(format!(
                    "Error envelope with {} elements, expected 5 or 6",
                    elements.len()
                ));
            }
            Envelope::Error {
                id: uint(1)?,
                attributes: attributes(2)?,
                error: ErrorBody {
                    code: sint(3)?,
                    message: string(4)?,
                    data: if elements.len() == 6 {
                        Some(payload(5)?)
                    } else {
                        None
                    },
                },
            }
        }
        EnvelopeKind::Fatal => {
            expect(kind, 3)?;
            Envelope::Fatal {
                code: sint(1)?,
                message: string(2)?,
            }
        }
        EnvelopeKind::Cancel => {
            expect(kind, 2)?;
            Envelope::Cancel { id: uint(1)? }
        }
        EnvelopeKind::Goodbye => {
            expect(kind, 2)?;
            Envelope::Goodbye { reason: string(1)? }
        }
        EnvelopeKind::StreamItems => {
            expect(kind, 4)?;
            Envelope::StreamItems {
                stream: uint(1)?,
                position: uint(2)?,
                payload: payload(3)?,
            }
        }
        EnvelopeKind::StreamEnd => Envelope::StreamEnd {
            stream: uint(1)?,
            error: match elements.len() {
                2 => None,
                4 => Some(ErrorBody {
                    code: sint(2)?,
                    message: string(3)?,
                    data: None,
                }),
                n => {
                    return Err(format!(
                        "StreamEnd envelope with {n} elements, expected 2 or 4"
                    ))
                }
            },
        },
        EnvelopeKind::StreamCredit => {
            expect(kind, 3)?;
            Envelope::StreamCredit {
                stream: uint(1)?,
                credit: uint(2)?,
            }
        }
        EnvelopeKind::StreamCancel => {
            expect(kind, 2)?;
            Envelope::StreamCancel { stream: uint(1)? }
        }
        EnvelopeKind::NotificationCredit => {
            expect(kind, 2)?;
            Envelope::NotificationCredit { credit: uint(1)? }
        }
    })
}

/// The most elements an envelope has (a request): a longer array is refused while it is read,
/// so a frame of many tiny elements never sizes an allocation.
const MAX_ELEMENTS: usize = 7;

/// The top-level array of an envelope, each element kept raw.
struct Elements;

impl<'de> serde::de::Visitor<'de> for Elements {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an envelope array")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut elements = Vec::with_capacity(MAX_ELEMENTS);
        while let Some(element) = seq.next_element()? {
            if elements.len() == MAX_ELEMENTS {
                return Err(serde::de::Error::custom(format_args!(
                    "more than {MAX_ELEMENTS} elements"
                )));
            }
            elements.push(element);
        }
        Ok(elements)
    }
}

/// Reads `[kind, id` from the start of a frame that is not valid JSON as a whole (cut off, or
/// broken further on), so a broken request can still be answered.
fn scan_header(frame: &[u8]) -> PartialHeader {
    fn number(rest: &mut &[u8]) -> Option<u64> {
        let text = rest.trim_ascii_start();
        let digits = text.iter().take_while(|b| b.is_ascii_digit()).count();
        let value = std::str::from_utf8(&text[..digits]).ok()?.parse().ok()?;
        *rest = text[digits..].trim_ascii_start();
        Some(value)
    }
    let mut header = PartialHeader::default();
    let Some(mut rest) = frame.trim_ascii_start().strip_prefix(b"[") else {
        return header;
    };
    let kind = number(&mut rest)
        .and_then(|k| u8::try_from(k).ok())
        .and_then(EnvelopeKind::from_u8);
    header.kind = kind;
    if matches!(
        kind,
        Some(
            EnvelopeKind::Request
                | EnvelopeKind::Response
                | EnvelopeKind::Error
                | EnvelopeKind::Cancel
        )
    ) {
        if let Some(mut rest) = rest.strip_prefix(b",") {
            // A number cut off by the end of the frame is not an id.
            let id = number(&mut rest);
            if !rest.is_empty() {
                header.id = id;
            }
        }
    }
    header
}
