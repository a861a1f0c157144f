//! The PHP library's framing: a `0x00` byte, the payload's length as a little-endian `u32`,
//! then the payload (`pack("CL")`). PHP has no maximum length; ours is checked before anything
//! is allocated for the payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The header before each payload: the `0x00` prefix and the length.
pub const HEADER: usize = 5;

/// Why bytes are not PHP frames.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The first byte of a frame is not `0x00`.
    #[error("a PHP frame starts with 0x00, not {found:#04x}: the peer is out of step or does not speak the PHP library's framing")]
    BadPrefix {
        /// The byte found.
        found: u8,
    },
    /// A frame of length 0, which the PHP library never sends.
    #[error("a PHP frame of length 0: the PHP library never sends one")]
    Empty,
    /// A length over the maximum.
    #[error("a PHP frame of {len} bytes is over the maximum of {max}")]
    TooLarge {
        /// The length the header claims.
        len: usize,
        /// The maximum.
        max: usize,
    },
}

/// Cuts a byte stream into PHP frames, and writes them.
///
/// # Examples
/// ```
/// use bytes::BytesMut;
/// use channel_dispatcher::php::framing::Frames;
///
/// let frames = Frames::new(1 << 20);
/// let mut out = BytesMut::new();
/// Frames::encode(b"N;", &mut out);
/// assert_eq!(&out[..], b"\x00\x02\x00\x00\x00N;");
///
/// let mut input = out.split_to(3); // a read that brought part of the frame
/// assert_eq!(frames.decode(&mut input), Ok(None));
/// input.extend_from_slice(&out);
/// assert_eq!(frames.decode(&mut input).unwrap().unwrap(), &b"N;"[..]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frames {
    max_len: usize,
}

impl Frames {
    /// Frames of at most `max_len` payload bytes.
    pub fn new(max_len: usize) -> Self {
        Self { max_len }
    }

    /// The next whole payload at the front of `buf` (taken out of it), `None` when more bytes
    /// are needed.
    ///
    /// # Errors
    /// A [`FrameError`] as soon as a header is wrong (the stream cannot be framed after it).
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match buf.first() {
            None => return Ok(None),
            Some(&found) if found != 0 => return Err(FrameError::BadPrefix { found }),
            Some(_) if buf.len() < HEADER => return Ok(None),
            Some(_) => {}
        }
        let len = body_len(buf)?;
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        if buf.len() < HEADER + len {
            buf.reserve(HEADER + len - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER);
        Ok(Some(buf.split_to(len).freeze()))
    }

    /// Appends `payload` as one frame.
    ///
    /// # Panics
    /// If `payload` is longer than `u32::MAX` bytes.
    pub fn encode(payload: &[u8], out: &mut BytesMut) {
        let len = u32::try_from(payload.len()).expect("a PHP frame holds at most 4 GiB");
        out.reserve(HEADER + payload.len());
        out.put_u8(0);
        out.put_u32_le(len);
        out.put_slice(payload);
    }
}

/// The body length in the whole header at the front of `header`; the one check of a PHP
/// frame's header, here and in the connection's reader.
pub(crate) fn body_len(header: &[u8]) -> Result<usize, FrameError> {
    if header[0] != 0 {
        return Err(FrameError::BadPrefix { found: header[0] });
    }
    match u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize {
        0 => Err(FrameError::Empty),
        len => Ok(len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        Frames::encode(payload, &mut out);
        out.to_vec()
    }

    #[test]
    fn the_stop_marker_is_framed_as_php_frames_it() {
        assert_eq!(frame(b"N;"), [0x00, 0x02, 0x00, 0x00, 0x00, b'N', b';']);
    }

    #[test]
    fn bad_headers_are_typed_errors_and_large_ones_allocate_nothing() {
        let frames = Frames::new(1024);
        let mut bad = BytesMut::from(&b"\x01\x02\x00\x00\x00N;"[..]);
        assert_eq!(
            frames.decode(&mut bad),
            Err(FrameError::BadPrefix { found: 1 })
        );
        let mut empty = BytesMut::from(&b"\x00\x00\x00\x00\x00"[..]);
        assert_eq!(frames.decode(&mut empty), Err(FrameError::Empty));
        let mut huge = BytesMut::from(&b"\x00\xff\xff\xff\xff"[..]);
        let capacity = huge.capacity();
        assert_eq!(
            frames.decode(&mut huge),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 1024
            })
        );
        assert_eq!(huge.capacity(), capacity);
        // A bad prefix is seen at once, without waiting for a whole header.
        let mut early = BytesMut::from(&b"O"[..]);
        assert_eq!(
            frames.decode(&mut early),
            Err(FrameError::BadPrefix { found: b'O' })
        );
    }

    proptest! {
        #[test]
        fn frames_survive_any_split_and_any_coalescing(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..64), 1..8),
            cuts in proptest::collection::vec(1usize..16, 1..64),
        ) {
            let stream: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
            let frames = Frames::new(64);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let (mut at, mut cut) = (0, cuts.iter().cycle());
            while at < stream.len() {
                let end = (at + cut.next().unwrap()).min(stream.len());
                buf.extend_from_slice(&stream[at..end]);
                at = end;
                while let Some(payload) = frames.decode(&mut buf).unwrap() {
                    got.push(payload.to_vec());
                }
            }
            prop_assert_eq!(got, payloads);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn any_bytes_end_in_frames_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let frames = Frames::new(64);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = frames.decode(&mut buf) {}
        }
    }
}
