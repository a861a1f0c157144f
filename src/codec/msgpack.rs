//! MessagePack envelopes: one array per frame, `[kind, fields..., payload]`.
//!
//! ```text
//! request        [1, id, method, attributes, timeout_us, parent, payload]
//! notification   [2, method, attributes, payload]
//! response       [3, id, attributes, payload]
//! error          [4, id, attributes, code, message]  or  [4, id, attributes, code, message, data]
//! fatal          [5, code, message]
//! cancel         [6, id]
//! goodbye        [7, reason]
//! stream items   [8, stream, position, payload]      payload: an array of items
//! stream end     [9, stream]  or  [9, stream, code, message]
//! stream credit  [10, stream, credit]
//! stream cancel  [11, stream]
//! notif. credit  [12, credit]
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use rmp::encode as enc;

use crate::codec::{payload_or_unit, Codec, Sink};
use crate::envelope::{Envelope, EnvelopeError, EnvelopeKind, ErrorBody, Method, PartialHeader};
use crate::error::CodecError;
use crate::message::Attributes;

const CODEC: Codec = Codec::MessagePack;

pub(super) fn encode(envelope: &Envelope, dst: &mut BytesMut) {
    let mut w = Sink(dst);
    // NB. Writes into a BytesMut cannot fail; the results only carry rmp's io error type.
    let kind = envelope.kind() as u64;
    match envelope {
        Envelope::Request {
            id,
            method,
            attributes,
            timeout_us,
            parent,
            payload,
        } => {
            array_len(&mut w, 7);
            uint(&mut w, kind);
            uint(&mut w, *id);
            str(&mut w, method.as_str());
            write_attributes(&mut w, attributes);
            uint(&mut w, *timeout_us);
            uint(&mut w, *parent);
            w.0.put_slice(payload_or_unit(CODEC, payload));
        }
        Envelope::Notification {
            method,
            attributes,
            payload,
        } => {
            array_len(&mut w, 4);
            uint(&mut w, kind);
            str(&mut w, method.as_str());
            write_attributes(&mut w, attributes);
            w.0.put_slice(payload_or_unit(CODEC, payload));
        }
        Envelope::Response {
            id,
            attributes,
            payload,
        } => {
            array_len(&mut w, 4);
            uint(&mut w, kind);
            uint(&mut w, *id);
            write_attributes(&mut w, attributes);
            w.0.put_slice(payload_or_unit(CODEC, payload));
        }
        Envelope::Error {
            id,
            attributes,
            error,
        } => {
            array_len(&mut w, if error.data.is_some() { 6 } else { 5 });
            uint(&mut w, kind);
            uint(&mut w, *id);
            write_attributes(&mut w, attributes);
            let _ = enc::write_sint(&mut w, error.code);
            str(&mut w, &error.message);
            if let Some(data) = &error.data {
                w.0.put_slice(payload_or_unit(CODEC, data));
            }
        }
        Envelope::Fatal { code, message } => {
            array_len(&mut w, 3);
            uint(&mut w, kind);
            let _ = enc::write_sint(&mut w, *code);
            str(&mut w, message);
        }
        Envelope::Cancel { id } => {
            array_len(&mut w, 2);
            uint(&mut w, kind);
            uint(&mut w, *id);
        }
        Envelope::Goodbye { reason } => {
            array_len(&mut w, 2);
            uint(&mut w, kind);
            str(&mut w, reason);
        }
        Envelope::StreamItems {
            stream,
            position,
            payload,
        } => {
            array_len(&mut w, 4);
            uint(&mut w, kind);
            uint(&mut w, *stream);
            uint(&mut w, *position);
            w.0.put_slice(payload_or_unit(CODEC, payload));
        }
        Envelope::StreamEnd { stream, error } => {
            array_len(&mut w, if error.is_some() { 4 } else { 2 });
            uint(&mut w, kind);
            uint(&mut w, *stream);
            if let Some(error) = error {
                let _ = enc::write_sint(&mut w, error.code);
                str(&mut w, &error.message);
            }
        }
        Envelope::StreamCredit { stream, credit } => {
            array_len(&mut w, 3);
            uint(&mut w, kind);
            uint(&mut w, *stream);
            uint(&mut w, *credit);
        }
        Envelope::StreamCancel { stream } => {
            array_len(&mut w, 2);
            uint(&mut w, kind);
            uint(&mut w, *stream);
        }
        Envelope::NotificationCredit { credit } => {
            array_len(&mut w, 2);
            uint(&mut w, kind);
            uint(&mut w, *credit);
        }
    }
}

#[inline]
fn write_attributes(w: &mut Writer<'_>, attributes: &Attributes) {
    // NB. The common case (no attributes) is one byte, a fixmap of 0, written inline.
    match attributes.is_empty() {
        true => w.0.put_u8(0x80),
        false => write_some_attributes(w, attributes),
    }
}

#[inline(never)]
fn write_some_attributes(w: &mut Writer<'_>, attributes: &Attributes) {
    debug_assert!(!attributes.is_empty());
    match attributes.len() {
        len @ 0..=15 => w.0.put_u8(0x80 | len as u8),
        len => {
            let _ = enc::write_map_len(w, len as u32);
        }
    }
    for (name, value) in attributes.iter() {
        str(w, name);
        str(w, value);
    }
}

type Writer<'a> = Sink<'a>;

// The shortest MessagePack forms, written straight into the buffer (rmp's writers go through
// `io::Write`, which costs more than the bytes): the same bytes rmp would write.

#[inline]
fn uint(w: &mut Writer<'_>, value: u64) {
    match value {
        // NB. The common case (kinds, zeros, small ids) inline; the longer forms out of line.
        0..=0x7f => w.0.put_u8(value as u8),
        _ => long_uint(w.0, value),
    }
}

#[inline(never)]
fn long_uint(buf: &mut BytesMut, value: u64) {
    match value {
        0..=0xff => {
            buf.put_u8(0xcc);
            buf.put_u8(value as u8);
        }
        0x100..=0xffff => {
            buf.put_u8(0xcd);
            buf.put_u16(value as u16);
        }
        0x1_0000..=0xffff_ffff => {
            buf.put_u8(0xce);
            buf.put_u32(value as u32);
        }
        _ => {
            buf.put_u8(0xcf);
            buf.put_u64(value);
        }
    }
}

fn array_len(w: &mut Writer<'_>, len: u32) {
    match len {
        0..=15 => w.0.put_u8(0x90 | len as u8),
        _ => {
            let _ = enc::write_array_len(w, len);
        }
    }
}

fn str(w: &mut Writer<'_>, s: &str) {
    match s.len() {
        len @ 0..=31 => {
            let buf = &mut *w.0;
            buf.put_u8(0xa0 | len as u8);
            buf.put_slice(s.as_bytes());
        }
        _ => {
            let _ = enc::write_str(w, s);
        }
    }
}

pub(super) fn decode(frame: Bytes) -> Result<Envelope, EnvelopeError> {
    let mut reader = Reader {
        frame: &frame,
        rest: &frame,
        header: PartialHeader::default(),
    };
    match reader.envelope() {
        Ok(envelope) => Ok(envelope),
        Err(message) => Err(EnvelopeError {
            header: reader.header,
            error: CodecError::new("msgpack", message),
        }),
    }
}

#[cold]
#[inline(never)]
fn string_past_frame(len: usize) -> String {
    format!("string of {len} bytes runs past the frame")
}

#[cold]
#[inline(never)]
fn missing_payload() -> String {
    "missing payload".into()
}

#[cold]
#[inline(never)]
fn wrong_length(kind: EnvelopeKind, len: u32, expected: u32) -> String {
    format!("{kind:?} envelope with {len} elements, expected {expected}")
}

/// The length of the MessagePack value that `bytes` starts with, found without decoding it;
/// `None` when the value is cut short or uses the one marker MessagePack never uses (`0xc1`).
///
/// NB. It counts the values still to skip instead of recursing, so nesting costs no stack;
/// every value takes a byte at least, so a count past the bytes left is refused at once.
#[inline]
pub(crate) fn value_len(bytes: &[u8]) -> Option<usize> {
    // NB. The common small items (a string under 256 bytes, a small integer, nil, a boolean)
    // inline.
    let len = match *bytes.first()? {
        marker @ 0xa0..=0xbf => 1 + usize::from(marker & 0x1f),
        0xd9 => 2 + usize::from(*bytes.get(1)?),
        0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => 1,
        _ => return long_value_len(bytes),
    };
    Some(len).filter(|&len| len <= bytes.len())
}

#[inline(never)]
fn long_value_len(bytes: &[u8]) -> Option<usize> {
    let mut at = 0usize;
    let mut values = 1usize;
    while values > 0 {
        values -= 1;
        let marker = *bytes.get(at)?;
        at += 1;
        // What follows the marker: a fixed size, a length of `n` bytes, or a count of values.
        let (body, more) = match marker {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (0, 0),
            0x80..=0x8f => (0, 2 * usize::from(marker & 0x0f)),
            0x90..=0x9f => (0, usize::from(marker & 0x0f)),
            0xa0..=0xbf => (usize::from(marker & 0x1f), 0),
            0xc4 | 0xd9 => (length(bytes, &mut at, 1)?, 0),
            0xc5 | 0xda => (length(bytes, &mut at, 2)?, 0),
            0xc6 | 0xdb => (length(bytes, &mut at, 4)?, 0),
            // An extension's body is its type byte and its data.
            0xc7 => (length(bytes, &mut at, 1)?.checked_add(1)?, 0),
            0xc8 => (length(bytes, &mut at, 2)?.checked_add(1)?, 0),
            0xc9 => (length(bytes, &mut at, 4)?.checked_add(1)?, 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xd4..=0xd8 => (1 + (1 << (marker - 0xd4)), 0),
            0xdc => (0, length(bytes, &mut at, 2)?),
            0xdd => (0, length(bytes, &mut at, 4)?),
            0xde => (0, length(bytes, &mut at, 2)?.checked_mul(2)?),
            0xdf => (0, length(bytes, &mut at, 4)?.checked_mul(2)?),
            0xc1 => return None,
        };
        at = at.checked_add(body).filter(|&end| end <= bytes.len())?;
        values = values
            .checked_add(more)
            .filter(|&values| values <= bytes.len() - at)?;
    }
    Some(at)
}

/// A big-endian length of `width` bytes at `at`, stepped past.
fn length(bytes: &[u8], at: &mut usize, width: usize) -> Option<usize> {
    let field = bytes.get(*at..*at + width)?;
    *at += width;
    Some(field.iter().fold(0usize, |n, &b| n << 8 | usize::from(b)))
}

struct Reader<'a> {
    frame: &'a Bytes,
    rest: &'a [u8],
    header: PartialHeader,
}

type Read<T> = Result<T, String>;

impl Reader<'_> {
    fn envelope(&mut self) -> Read<Envelope> {
        let len = match *self.rest {
            // NB. The form every envelope has (a fixarray) without rmp's generic reader.
            [marker @ 0x90..=0x9f, ..] => {
                self.rest = &self.rest[1..];
                u32::from(marker & 0x0f)
            }
            _ => rmp::decode::read_array_len(&mut self.rest).map_err(|e| e.to_string())?,
        };
        let kind = self.uint()?;
        let kind = u8::try_from(kind)
            .ok()
            .and_then(EnvelopeKind::from_u8)
            .ok_or_else(|| format!("unknown envelope kind {kind}"))?;
        self.header.kind = Some(kind);
        let expect = |n: u32| -> Read<()> {
            match len == n {
                true => Ok(()),
                false => Err(wrong_length(kind, len, n)),
            }
        };
        Ok(match kind {
            EnvelopeKind::Request => {
                let id = self.id()?;
                expect(7)?;
                let method = self.method()?;
                let attributes = self.attributes()?;
                let timeout_us = self.uint()?;
                let parent = self.uint()?;
                Envelope::Request {
                    id,
                    method,
                    attributes,
                    timeout_us,
                    parent,
                    payload: self.payload()?,
                }
            }
            EnvelopeKind::Notification => {
                expect(4)?;
                Envelope::Notification {
                    method: self.method()?,
                    attributes: self.attributes()?,
                    payload: self.payload()?,
                }
            }
            EnvelopeKind::Response => {
                let id = self.id()?;
                expect(4)?;
                Envelope::Response {
                    id,
                    attributes: self.attributes()?,
                    payload: self.payload()?,
                }
            }
            EnvelopeKind::Error => {
                let id = self.id()?;
                if len != 5 && len != 6 {
                    return Err(format!(
                        "Error envelope with {len} elements, expected 5 or 6"
                    ));
                }
                let attributes = self.attributes()?;
                let code = self.sint()?;
                let message = self.string()?;
                let data = if len == 6 {
                    Some(self.payload()?)
                } else {
                    None
                };
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
                expect(3)?;
                Envelope::Fatal {
                    code: self.sint()?,
                    message: self.string()?,
                }
            }
            EnvelopeKind::Cancel => {
                let id = self.id()?;
                expect(2)?;
                self.end()?;
                Envelope::Cancel { id }
            }
            EnvelopeKind::Goodbye => {
                expect(2)?;
                let reason = self.string()?;
                self.end()?;
                Envelope::Goodbye { reason }
            }
            EnvelopeKind::StreamItems => {
                expect(4)?;
                Envelope::StreamItems {
                    stream: self.uint()?,
                    position: self.uint()?,
                    payload: self.payload()?,
                }
            }
            EnvelopeKind::StreamEnd => {
                let stream = self.uint()?;
                let error = match len {
                    2 => None,
                    4 => Some(ErrorBody {
                        code: self.sint()?,
                        message: self.string()?,
                        data: None,
                    }),
                    _ => {
                        return Err(format!(
                            "StreamEnd envelope with {len} elements, expected 2 or 4"
                        ))
                    }
                };
                self.end()?;
                Envelope::StreamEnd { stream, error }
            }
            EnvelopeKind::StreamCredit => {
                expect(3)?;
                let (stream, credit) = (self.uint()?, self.uint()?);
                self.end()?;
                Envelope::StreamCredit { stream, credit }
            }
            EnvelopeKind::StreamCancel => {
                expect(2)?;
                let stream = self.uint()?;
                self.end()?;
                Envelope::StreamCancel { stream }
            }
            EnvelopeKind::NotificationCredit => {
                expect(2)?;
                let credit = self.uint()?;
                self.end()?;
                Envelope::NotificationCredit { credit }
            }
        })
    }

    fn id(&mut self) -> Read<u64> {
        let id = self.uint()?;
        self.header.id = Some(id);
        Ok(id)
    }

    #[inline]
    fn uint(&mut self) -> Read<u64> {
        // NB. The one-byte form (kinds, zeros, small ids) inline, the others out of line.
        match *self.rest {
            [byte @ 0..=0x7f, ref rest @ ..] => {
                self.rest = rest;
                Ok(u64::from(byte))
            }
            _ => self.long_uint(),
        }
    }

    /// The unsigned forms this side writes without rmp's generic reader; anything else goes
    /// through it.
    #[inline(never)]
    fn long_uint(&mut self) -> Read<u64> {
        let (value, len) = match *self.rest {
            [0xcc, byte, ..] => (u64::from(byte), 2),
            [0xcd, a, b, ..] => (u64::from(u16::from_be_bytes([a, b])), 3),
            [0xce, a, b, c, d, ..] => (u64::from(u32::from_be_bytes([a, b, c, d])), 5),
            [0xcf, a, b, c, d, e, f, g, h, ..] => (u64::from_be_bytes([a, b, c, d, e, f, g, h]), 9),
            _ => {
                return rmp::decode::read_int(&mut self.rest)
                    .map_err(|e| format!("expected an unsigned integer: {e}"))
            }
        };
        self.rest = &self.rest[len..];
        Ok(value)
    }

    fn sint(&mut self) -> Read<i64> {
        rmp::decode::read_int(&mut self.rest).map_err(|e| format!("expected an integer: {e}"))
    }

    /// A string's bytes, not checked yet.
    fn str_bytes(&mut self) -> Read<&[u8]> {
        let len = match *self.rest {
            // NB. Method names and attributes are nearly always short: a fixstr, or a str8.
            [marker @ 0xa0..=0xbf, ..] => {
                self.rest = &self.rest[1..];
                usize::from(marker & 0x1f)
            }
            [0xd9, len, ..] => {
                self.rest = &self.rest[2..];
                usize::from(len)
            }
            _ => self.long_str_len()?,
        };
        if len > self.rest.len() {
            return Err(string_past_frame(len));
        }
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(bytes)
    }

    fn str(&mut self) -> Read<&str> {
        let bytes = self.str_bytes()?;
        std::str::from_utf8(bytes).map_err(|e| format!("string is not UTF-8: {e}"))
    }

    fn string(&mut self) -> Read<String> {
        self.str().map(str::to_owned)
    }

    #[inline(never)]
    fn long_str_len(&mut self) -> Read<usize> {
        rmp::decode::read_str_len(&mut self.rest)
            .map(|len| len as usize)
            .map_err(|e| format!("expected a string: {e}"))
    }

    /// A method name, sliced from the frame (its UTF-8 checked once, there).
    fn method(&mut self) -> Read<Method> {
        let frame = self.frame;
        let bytes = self.str_bytes()?;
        Method::from_frame_bytes(frame.slice_ref(bytes))
            .map_err(|e| format!("string is not UTF-8: {e}"))
    }

    #[inline]
    fn attributes(&mut self) -> Read<Attributes> {
        // NB. Nearly always none: no allocation, no sort, no call.
        match *self.rest {
            [0x80, ref rest @ ..] => {
                self.rest = rest;
                Ok(Attributes::new())
            }
            _ => self.some_attributes(),
        }
    }

    #[inline(never)]
    fn some_attributes(&mut self) -> Read<Attributes> {
        let len = rmp::decode::read_map_len(&mut self.rest)
            .map_err(|e| format!("expected an attribute map: {e}"))?;
        if len as usize > crate::codec::MAX_DECODED_ATTRIBUTES {
            return Err(format!("{len} attributes, more than any peer may send"));
        }
        // Each pair takes at least two bytes: a claimed length beyond that is a lie, and must
        // not size an allocation.
        let mut pairs = Vec::with_capacity((len as usize).min(self.rest.len() / 2));
        for _ in 0..len {
            let name = self.string()?;
            let value = self.string()?;
            pairs.push((name, value));
        }
        Ok(Attributes::from_unsorted(pairs))
    }

    /// The rest of the frame: the last array element, kept as raw MessagePack.
    fn payload(&mut self) -> Read<Bytes> {
        if self.rest.is_empty() {
            return Err(missing_payload());
        }
        let start = self.frame.len() - self.rest.len();
        self.rest = &[];
        Ok(self.frame.slice(start..))
    }

    fn end(&self) -> Read<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.rest.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One value of every MessagePack form, each written by rmp.
    fn every_form() -> Vec<Vec<u8>> {
        let mut values = Vec::new();
        let mut write = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut buf = Vec::new();
            f(&mut buf);
            values.push(buf);
        };
        write(&|b| enc::write_nil(b).unwrap());
        write(&|b| enc::write_bool(b, true).unwrap());
        write(&|b| enc::write_f32(b, 1.5).unwrap());
        write(&|b| enc::write_f64(b, 1.5).unwrap());
        for n in EDGES {
            write(&|b| {
                enc::write_uint(b, n).unwrap();
            });
        }
        for n in [-1, -32, -33, -128, -129, -32_768, -32_769, i64::MIN] {
            write(&|b| {
                enc::write_sint(b, n).unwrap();
            });
        }
        for len in [0usize, 31, 32, 255, 256, 65_535, 65_536] {
            let text = "x".repeat(len);
            write(&|b| enc::write_str(b, &text).unwrap());
            write(&|b| enc::write_bin(b, text.as_bytes()).unwrap());
        }
        for len in [1u32, 2, 4, 8, 16, 0, 3, 255, 256, 65_536] {
            write(&|b| {
                enc::write_ext_meta(b, len, 5).unwrap();
                b.extend(std::iter::repeat(7).take(len as usize));
            });
        }
        for len in [0u32, 15, 16, 65_535, 65_536] {
            write(&|b| {
                enc::write_array_len(b, len).unwrap();
                b.extend(std::iter::repeat(0xc0).take(len as usize));
            });
            write(&|b| {
                enc::write_map_len(b, len).unwrap();
                b.extend(std::iter::repeat(0x01).take(2 * len as usize));
            });
        }
        // Nested: [{"a": [1, "b"]}, bin, [[[]]]].
        write(&|b| {
            enc::write_array_len(b, 3).unwrap();
            enc::write_map_len(b, 1).unwrap();
            enc::write_str(b, "a").unwrap();
            enc::write_array_len(b, 2).unwrap();
            enc::write_uint(b, 1).unwrap();
            enc::write_str(b, "b").unwrap();
            enc::write_bin(b, &[1, 2, 3]).unwrap();
            b.extend([0x91, 0x91, 0x90]);
        });
        values
    }

    #[test]
    fn a_values_length_is_found_for_every_form_and_a_cut_one_is_refused() {
        for value in every_form() {
            assert_eq!(value_len(&value), Some(value.len()), "{:x?}", &value[..1]);
            let mut followed = value.clone();
            followed.extend([0xc3, 0x00]);
            assert_eq!(
                value_len(&followed),
                Some(value.len()),
                "{:x?}",
                &value[..1]
            );
            let cuts = [0, 1, value.len() / 2, value.len() - 1];
            for cut in cuts.into_iter().filter(|&cut| cut < value.len()) {
                assert_eq!(
                    value_len(&value[..cut]),
                    None,
                    "{:x?} cut to {cut}",
                    &value[..1]
                );
            }
        }
        assert_eq!(value_len(&[0xc1]), None, "the never-used marker");
    }

    #[test]
    fn counts_and_lengths_past_the_bytes_are_refused_without_reading_on() {
        let huge = [
            vec![0xdd, 0xff, 0xff, 0xff, 0xff],       // array32 of 4 G values
            vec![0xdf, 0xff, 0xff, 0xff, 0xff],       // map32 of 4 G pairs
            vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'x'], // str32 of 4 GiB
            vec![0xc9, 0xff, 0xff, 0xff, 0xff, 1],    // ext32 of 4 GiB
        ];
        for value in huge {
            assert_eq!(value_len(&value), None, "{value:x?}");
        }
        // A deep nesting costs no stack: 100,000 arrays of one, around a nil.
        let mut deep = vec![0x91; 100_000];
        deep.push(0xc0);
        assert_eq!(value_len(&deep), Some(deep.len()));
    }

    /// Each unsigned form's edges.
    const EDGES: [u64; 10] = [
        0,
        0x7f,
        0x80,
        0xff,
        0x100,
        0xffff,
        0x1_0000,
        0xffff_ffff,
        0x1_0000_0000,
        u64::MAX,
    ];

    #[test]
    fn unsigned_forms_are_the_bytes_rmp_writes() {
        for value in EDGES {
            let mut ours = BytesMut::new();
            uint(&mut Sink(&mut ours), value);
            let mut theirs = Vec::new();
            enc::write_uint(&mut theirs, value).unwrap();
            assert_eq!(&ours[..], &theirs[..], "{value:#x}");
        }
    }

    #[test]
    fn unsigned_forms_rmp_writes_are_read() {
        for id in EDGES {
            let mut frame = vec![0x92, 6];
            enc::write_uint(&mut frame, id).unwrap();
            assert_eq!(
                decode(Bytes::from(frame)).unwrap(),
                Envelope::Cancel { id },
                "{id:#x}"
            );
        }
        // A signed form of a small positive value, as another writer may send it: rmp's reader.
        let frame = vec![0x92, 6, 0xd0, 0x05];
        assert_eq!(
            decode(Bytes::from(frame)).unwrap(),
            Envelope::Cancel { id: 5 }
        );
    }

    fn request(method: &str) -> Envelope {
        Envelope::Request {
            id: 300,
            method: Method::from(method.to_owned()),
            attributes: Attributes::new(),
            timeout_us: 0,
            parent: 0,
            payload: Bytes::from_static(&[0xc0]),
        }
    }

    #[test]
    fn method_names_of_every_string_form_come_back() {
        for len in [0, 1, 31, 32, 255, 256, 70_000] {
            let name = "m".repeat(len);
            let mut frame = BytesMut::new();
            encode(&request(&name), &mut frame);
            let back = decode(frame.freeze()).unwrap();
            assert_eq!(back, request(&name), "a name of {len} bytes");
        }
    }

    #[test]
    fn envelopes_in_rmps_longer_forms_are_read() {
        // An array16 header and a str16 name, as another MessagePack writer may send them.
        let mut frame = vec![0xdc];
        frame.extend_from_slice(&7u16.to_be_bytes());
        enc::write_uint(&mut frame, 1).unwrap();
        enc::write_uint(&mut frame, 300).unwrap();
        frame.push(0xda);
        frame.extend_from_slice(&2u16.to_be_bytes());
        frame.extend_from_slice(b"go");
        frame.extend_from_slice(&[0x80, 0x00, 0x00, 0xc0]);
        assert_eq!(decode(Bytes::from(frame)).unwrap(), request("go"));
    }

    #[test]
    fn a_string_header_cut_short_is_an_error() {
        for frame in [
            &[0x97, 0x01, 0x01, 0xd9][..],
            &[0x97, 0x01, 0x01, 0xa5, b'a'],
            &[0x97, 0x01, 0x01, 0xd9, 0x05, b'a'],
        ] {
            assert!(decode(Bytes::copy_from_slice(frame)).is_err(), "{frame:x?}");
        }
    }
}
