//! The handshake: both sides send a hello, check the peer's, and send a verdict.
//! It is the same for every codec (PROTOCOL.md, "Handshake").
//!
//! ```text
//! hello    "CHDP" | version: u16 BE | max_frame: u32 BE | codec_len: u8 | codec | token_len: u16 BE | token
//! verdict  0x00                      (accept)
//!          0x01 | reason (UTF-8)     (refuse)
//! ```

use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};

use super::frame::{Frame, FrameReader, FrameWriter, PREFIX};
use crate::error::HandshakeError;

pub(crate) const MAGIC: &[u8; 4] = b"CHDP";
pub(crate) const PROTOCOL_VERSION: u16 = 1;
/// Handshake frames are small; a larger first frame is not from a peer of ours.
const MAX_HANDSHAKE_FRAME: usize = 64 * 1024;

/// What one side announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) version: u16,
    pub(crate) max_frame: u32,
    pub(crate) codec: String,
    pub(crate) token: Option<String>,
}

impl Hello {
    pub(crate) fn encode(&self) -> BytesMut {
        let mut out = BytesMut::new();
        out.put_slice(MAGIC);
        out.put_u16(self.version);
        out.put_u32(self.max_frame);
        out.put_u8(self.codec.len() as u8);
        out.put_slice(self.codec.as_bytes());
        let token = self.token.as_deref().unwrap_or("");
        out.put_u16(token.len() as u16);
        out.put_slice(token.as_bytes());
        out
    }

    pub(crate) fn decode(mut body: &[u8]) -> Option<Self> {
        if body.len() < 4 + 2 + 4 + 1 || &body[..4] != MAGIC {
            return None;
        }
        body.advance(4);
        let version = body.get_u16();
        let max_frame = body.get_u32();
        let codec_len = body[0] as usize;
        let codec = take_str(&mut body, codec_len, 1)?;
        if body.len() < 2 {
            return None;
        }
        let token_len = u16::from_be_bytes([body[0], body[1]]) as usize;
        let token = take_str(&mut body, token_len, 2)?;
        body.is_empty().then_some(Self {
            version,
            max_frame,
            codec,
            token: (!token.is_empty()).then_some(token),
        })
    }
}

fn take_str(body: &mut &[u8], len: usize, skip: usize) -> Option<String> {
    let bytes = body.get(skip..skip + len)?;
    let s = std::str::from_utf8(bytes).ok()?.to_owned();
    body.advance(skip + len);
    Some(s)
}

/// Runs the handshake; returns the peer's hello once both sides accepted.
pub(crate) async fn handshake(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    ours: &Hello,
    expected_token: Option<&str>,
    max_frame: usize,
) -> Result<Hello, HandshakeError> {
    let io = |e: std::io::Error| HandshakeError::Transport(Arc::new(e));
    writer.put_frame(&ours.encode());
    writer.drain().await.map_err(io)?;

    reader.set_max_frame(MAX_HANDSHAKE_FRAME);
    let theirs = match read(reader).await? {
        Some(Frame::Whole(body)) => Hello::decode(&body),
        _ => None,
    };
    let verdict = match &theirs {
        None => Err(HandshakeError::NotAPeer),
        Some(theirs) => check(ours, theirs, expected_token),
    };
    match &verdict {
        Ok(()) => {
            writer.put_frame(&[0]);
            writer.drain().await.map_err(io)?;
        }
        Err(e) => {
            let mut refusal = vec![1];
            refusal.extend_from_slice(e.to_string().as_bytes());
            writer.put_frame(&refusal);
            // The peer may have refused us too and gone: our own reason is what matters.
            let _ = writer.drain().await;
        }
    }
    verdict?;

    let peer_verdict = read(reader).await?;
    reader.set_max_frame(max_frame);
    match peer_verdict {
        Some(Frame::Whole(body)) if body.first() == Some(&0) && body.len() == 1 => {
            theirs.ok_or(HandshakeError::NotAPeer)
        }
        Some(Frame::Whole(body)) if body.first() == Some(&1) => Err(HandshakeError::Refused {
            reason: String::from_utf8_lossy(&body[1..]).into_owned(),
        }),
        _ => Err(HandshakeError::NotAPeer),
    }
}

/// The next handshake frame; `None` for one over the handshake limit, known from its prefix
/// alone (whatever sent it is not a peer, and may never send the claimed bytes).
async fn read(reader: &mut FrameReader) -> Result<Option<Frame>, HandshakeError> {
    let io = |e: std::io::Error| HandshakeError::Transport(Arc::new(e));
    loop {
        if reader
            .claimed()
            .is_some_and(|len| len > PREFIX + MAX_HANDSHAKE_FRAME)
        {
            return Ok(None);
        }
        if let Some(frame) = reader.next_frame() {
            return Ok(Some(frame));
        }
        if std::future::poll_fn(|cx| reader.poll_fill(cx))
            .await
            .map_err(io)?
            == 0
        {
            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

fn check(ours: &Hello, theirs: &Hello, expected_token: Option<&str>) -> Result<(), HandshakeError> {
    if ours.version != theirs.version {
        return Err(HandshakeError::VersionMismatch {
            ours: ours.version,
            theirs: theirs.version,
        });
    }
    if ours.codec != theirs.codec {
        return Err(HandshakeError::CodecMismatch {
            ours: ours.codec.clone(),
            theirs: theirs.codec.clone(),
        });
    }
    if let Some(expected) = expected_token {
        if theirs.token.as_deref() != Some(expected) {
            return Err(HandshakeError::BadToken);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips() {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            max_frame: 1 << 20,
            codec: "msgpack".into(),
            token: Some("s3cret".into()),
        };
        assert_eq!(Hello::decode(&hello.encode()), Some(hello));
    }

    #[test]
    fn hello_bytes_match_the_protocol_document() {
        let hello = Hello {
            version: 1,
            max_frame: 16 * 1024 * 1024,
            codec: "msgpack".into(),
            token: None,
        };
        assert_eq!(
            &hello.encode()[..],
            b"CHDP\x00\x01\x01\x00\x00\x00\x07msgpack\x00\x00"
        );
    }

    #[test]
    fn truncated_or_foreign_hellos_are_rejected() {
        let bytes = Hello {
            version: 1,
            max_frame: 10,
            codec: "json".into(),
            token: Some("t".into()),
        }
        .encode();
        for cut in 0..bytes.len() {
            assert_eq!(Hello::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        assert_eq!(Hello::decode(b"GET / HTTP/1.1\r\n"), None);
    }
}
