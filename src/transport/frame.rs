//! Length-prefixed framing over byte streams: a 4-byte big-endian body length, then the body.
//!
//! ```text
//! +----------------+---------------------------+
//! | length: u32 BE | body: `length` bytes      |
//! +----------------+---------------------------+
//! ```
//! The length is checked against the maximum before anything is allocated for the body; a
//! prefix over the maximum is reported at once, and ends the connection (the peer knows the
//! maximum from the handshake).
//!
//! The PHP original's wire ([`Framing::Php`]) frames the same way with another header: a
//! `0x00` byte and the length as a little-endian `u32`; a bad first byte or a length of 0 is
//! a malformed frame.

use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::future::Future;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

pub(crate) const PREFIX: usize = 4;
const READ_CHUNK: usize = 16 * 1024;

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// How frames are cut: the header before each body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Our own: the body length as a big-endian `u32`.
    #[default]
    Native,
    /// The PHP original's: `0x00`, then the body length as a little-endian `u32`.
    #[cfg(feature = "php")]
    Php,
}

impl Framing {
    fn header_len(self) -> usize {
        match self {
            Self::Native => PREFIX,
            #[cfg(feature = "php")]
            Self::Php => crate::php::framing::HEADER,
        }
    }

    /// The body length the header at the front of `buf` claims (`buf` holds a whole header),
    /// and the length's four bytes.
    fn body_len(self, buf: &[u8]) -> Result<(usize, [u8; PREFIX]), String> {
        match self {
            Self::Native => {
                let prefix = [buf[0], buf[1], buf[2], buf[3]];
                Ok((u32::from_be_bytes(prefix) as usize, prefix))
            }
            #[cfg(feature = "php")]
            Self::Php => crate::php::framing::body_len(buf)
                .map(|len| (len, [buf[1], buf[2], buf[3], buf[4]]))
                .map_err(|e| {
                    let header = &buf[..crate::php::framing::HEADER];
                    let text = header
                        .iter()
                        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
                    match text {
                        true => format!(
                            "{e}; it reads as text ({:?}): the peer probably wrote text to the \
                             channel (a print or echo to stdout in a worker?)",
                            String::from_utf8_lossy(header)
                        ),
                        false => e.to_string(),
                    }
                }),
        }
    }

    fn put_header(self, len: u32, dst: &mut [u8]) {
        match self {
            Self::Native => dst.copy_from_slice(&len.to_be_bytes()),
            #[cfg(feature = "php")]
            Self::Php => {
                dst[0] = 0;
                dst[1..].copy_from_slice(&len.to_le_bytes());
            }
        }
    }
}

/// A frame taken from the stream.
#[derive(Debug)]
pub(crate) enum Frame {
    /// A whole frame body.
    Whole(Bytes),
    /// A length prefix over the maximum: the claimed length and the prefix's bytes. Nothing
    /// more is read from the stream after it.
    TooLarge { len: usize, prefix: [u8; PREFIX] },
    /// A header that breaks the framing's rules (why). Nothing more is read after it.
    Malformed(String),
}

/// The read half: buffers bytes and cuts them into frames.
pub(crate) struct FrameReader {
    io: BoxRead,
    buf: BytesMut,
    max_frame: usize,
    framing: Framing,
    /// A prefix over the maximum was seen: the stream is out of step, nothing more is framed.
    broken: bool,
}

impl FrameReader {
    pub(crate) fn new(io: BoxRead, max_frame: usize) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_frame,
            framing: Framing::Native,
            broken: false,
        }
    }

    pub(crate) fn with_framing(mut self, framing: Framing) -> Self {
        self.framing = framing;
        self
    }

    pub(crate) fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// The next complete frame in the buffer, if any.
    pub(crate) fn next_frame(&mut self) -> Option<Frame> {
        let header = self.framing.header_len();
        if self.broken || self.buf.len() < header {
            return None;
        }
        let (len, prefix) = match self.framing.body_len(&self.buf) {
            Ok(parsed) => parsed,
            Err(reason) => {
                self.broken = true;
                self.buf.clear();
                return Some(Frame::Malformed(reason));
            }
        };
        if len > self.max_frame {
            self.broken = true;
            self.buf.clear();
            return Some(Frame::TooLarge { len, prefix });
        }
        if self.buf.len() < header + len {
            // Reserve once for the whole frame (it is within the maximum) so a large frame
            // does not regrow the buffer chunk by chunk.
            self.buf.reserve(header + len - self.buf.len());
            return None;
        }
        // NB. One cut of the buffer, the header then skipped in the frozen `Bytes` (a pointer
        // bump): `BytesMut::advance` costs about as much as the cut itself.
        let mut body = self.buf.split_to(header + len).freeze();
        body.advance(header);
        if len > READ_CHUNK {
            // NB. What follows a large frame would share its allocation: every small frame
            // cut from it (a queued request, an attribute) would keep the whole of it alive.
            let mut rest = BytesMut::with_capacity(READ_CHUNK.max(self.buf.len()));
            rest.extend_from_slice(&self.buf);
            self.buf = rest;
        }
        Some(Frame::Whole(body))
    }

    /// Appends bytes to the buffer, as a read would (for the fuzz targets).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Reads more bytes into the buffer. `Ready(Ok(0))` is end of file.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.broken {
            // Out of step after an oversized prefix: whatever comes is dropped.
            self.buf.clear();
        }
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        let fut = pin!(self.io.read_buf(&mut self.buf));
        fut.poll(cx)
    }

    /// Reads the next frame, waiting for bytes as needed; `None` at a clean end of file.
    #[cfg(test)]
    pub(crate) async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.next_frame() {
                return Ok(Some(frame));
            }
            if std::future::poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                return if !self.in_frame() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    /// `true` when end of file now would cut a frame short.
    pub(crate) fn in_frame(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Bytes of the partial frame received so far, prefix included.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The length the partial frame in the buffer claims, prefix included, if known.
    pub(crate) fn claimed(&self) -> Option<usize> {
        let header = self.framing.header_len();
        (self.buf.len() >= header)
            .then(|| self.framing.body_len(&self.buf).ok())
            .flatten()
            .map(|(len, _)| header + len)
    }
}

/// The write half: frames are appended to one buffer and written together, with one flush
/// when the buffer empties (write coalescing).
pub(crate) struct FrameWriter {
    io: BoxWrite,
    buf: BytesMut,
    /// Bytes were written since the last flush; writers that buffer (stdout, TLS) need one even
    /// when our buffer is empty.
    unflushed: bool,
    framing: Framing,
}

impl FrameWriter {
    pub(crate) fn new(io: BoxWrite) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            unflushed: false,
            framing: Framing::Native,
        }
    }

    pub(crate) fn with_framing(mut self, framing: Framing) -> Self {
        self.framing = framing;
        self
    }

    /// Starts a frame: reserves its prefix and returns where it starts.
    pub(crate) fn begin(&mut self) -> usize {
        let start = self.buf.len();
        self.buf.put_bytes(0, self.framing.header_len());
        start
    }

    /// The buffer to append the body of the frame begun at `start` to.
    pub(crate) fn body(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Ends the frame begun at `start`: writes its prefix, returns the body length.
    pub(crate) fn finish(&mut self, start: usize) -> usize {
        let header = self.framing.header_len();
        let len = self.buf.len() - start - header;
        // NB. A body over `u32::MAX` never gets here: it is over every peer's maximum, and the
        // caller abandons it.
        let claimed = u32::try_from(len).unwrap_or(u32::MAX);
        self.framing
            .put_header(claimed, &mut self.buf[start..start + header]);
        len
    }

    /// Drops the frame begun at `start` (it was too large to send).
    pub(crate) fn abandon(&mut self, start: usize) {
        self.buf.truncate(start);
    }

    /// Appends a whole frame.
    pub(crate) fn put_frame(&mut self, body: &[u8]) {
        let start = self.begin();
        self.buf.put_slice(body);
        self.finish(start);
    }

    /// Bytes waiting to be written.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Writes the buffer out and flushes. `Ready(Ok)` once everything is written and flushed.
    pub(crate) fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.buf.advance(n);
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.unflushed {
            std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Shuts the write direction down (after draining).
    pub(crate) fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    /// Writes and flushes everything buffered.
    pub(crate) async fn drain(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_drain(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reader_over(bytes: Vec<u8>, max_frame: usize) -> FrameReader {
        FrameReader::new(Box::new(std::io::Cursor::new(bytes)), max_frame)
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn frames_are_cut_at_their_prefix() {
        let mut bytes = frame(b"hello");
        bytes.extend(frame(b""));
        bytes.extend(frame(b"world"));
        let mut reader = reader_over(bytes, 1024);
        let mut got = Vec::new();
        while let Some(Frame::Whole(body)) = reader.read_frame().await.unwrap() {
            got.push(body);
        }
        assert_eq!(got, vec![&b"hello"[..], b"", b"world"]);
    }

    #[tokio::test]
    async fn oversized_prefix_is_reported_at_once_without_allocating_its_length() {
        let mut bytes = b"Hello world\n".to_vec();
        bytes.extend(std::iter::repeat_n(7u8, 100_000));
        let mut reader = reader_over(bytes, 1024);
        match reader.read_frame().await.unwrap() {
            Some(Frame::TooLarge { len, prefix }) => {
                assert_eq!(len, u32::from_be_bytes(*b"Hell") as usize);
                assert_eq!(&prefix, b"Hell");
            }
            other => panic!("expected an oversized frame, got {other:?}"),
        }
        assert!(reader.buf.capacity() < 1 << 20);
        assert!(reader.next_frame().is_none(), "nothing is framed after it");
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error() {
        let mut bytes = frame(b"complete");
        bytes.extend_from_slice(&10u32.to_be_bytes());
        bytes.extend_from_slice(b"part");
        let mut reader = reader_over(bytes, 1024);
        assert!(reader.read_frame().await.unwrap().is_some());
        let err = reader.read_frame().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(reader.claimed(), Some(14));
    }

    fn framings() -> Vec<Framing> {
        vec![
            Framing::Native,
            #[cfg(feature = "php")]
            Framing::Php,
        ]
    }

    #[cfg(feature = "php")]
    #[tokio::test]
    async fn php_frames_have_their_own_header_and_rules() {
        let php = |bytes: &[u8]| {
            FrameReader::new(Box::new(std::io::Cursor::new(bytes.to_vec())), 1024)
                .with_framing(Framing::Php)
        };
        let mut reader = php(b"\x00\x02\x00\x00\x00N;\x00\x01\x00\x00\x00x");
        for body in [&b"N;"[..], b"x"] {
            match reader.read_frame().await.unwrap() {
                Some(Frame::Whole(got)) => assert_eq!(got, body),
                other => panic!("{other:?}"),
            }
        }
        for (bytes, rule) in [
            (&b"\x01\x02\x00\x00\x00N;"[..], "0x00"),
            (b"\x00\x00\x00\x00\x00", "length 0"),
        ] {
            match php(bytes).read_frame().await.unwrap() {
                Some(Frame::Malformed(reason)) => assert!(reason.contains(rule), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
        let mut writer = FrameWriter::new(Box::new(tokio::io::sink())).with_framing(Framing::Php);
        writer.put_frame(b"N;");
        assert_eq!(&writer.buf[..], b"\x00\x02\x00\x00\x00N;");
    }

    proptest! {
        /// Any byte stream ends in a sequence of frames followed by a clean end, or an error:
        /// never a panic, never a frame over the maximum; in every framing.
        #[test]
        fn any_bytes_end_in_frames_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            for framing in framings() {
                rt.block_on(async {
                    let mut reader = reader_over(bytes.clone(), 512).with_framing(framing);
                    loop {
                        match reader.read_frame().await {
                            Ok(Some(Frame::Whole(body))) => prop_assert!(body.len() <= 512),
                            Ok(Some(Frame::TooLarge { len, .. })) => { prop_assert!(len > 512); break }
                            Ok(Some(Frame::Malformed(reason))) => { prop_assert!(!reason.is_empty()); break }
                            Ok(None) => break,
                            Err(e) => { prop_assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof); break }
                        }
                    }
                    Ok(())
                })?;
            }
        }
    }
}
