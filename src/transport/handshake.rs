//! The handshake: both sides send a hello, check the peer's, and send a verdict.
//! It is the same for every codec (PROTOCOL.md, "Handshake").
//!
//! ```text
//! hello    "CHDP" | version: u16 BE | codec_len: u8 | codec | token_len: u16 BE | token
//!          | limits: 8 x u32 BE
//! verdict  0x00                      (accept)
//!          0x01 | reason (UTF-8)     (refuse)
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};

use super::frame::{Frame, FrameReader, FrameWriter, PREFIX};
use crate::auth::{AuthRequest, Authenticator};
use crate::error::HandshakeError;
use crate::limits::Limits;
use crate::peer::PeerInfo;

pub(crate) const MAGIC: &[u8; 4] = b"CHDP";
pub(crate) const PROTOCOL_VERSION: u16 = 2;
/// The longest token a hello carries (its length is a `u16`).
const MAX_TOKEN: usize = u16::MAX as usize;
/// The largest hello (the longest codec name and token); a larger first frame is not from a
/// peer of ours.
const MAX_HANDSHAKE_FRAME: usize = 4 + 2 + 1 + u8::MAX as usize + 2 + MAX_TOKEN + 8 * 4;
/// How long a refusing side waits for the peer's own verdict before it closes, so that the peer
/// reads the refusal before it sees the connection go (a close with unread input may reset a
/// TCP connection and destroy the refusal on its way).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// What one side announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) version: u16,
    pub(crate) codec: String,
    pub(crate) token: Option<String>,
    /// The limits this side enforces on what it receives.
    pub(crate) limits: Limits,
}

impl Hello {
    pub(crate) fn encode(&self) -> BytesMut {
        let mut out = BytesMut::new();
        out.put_slice(MAGIC);
        out.put_u16(self.version);
        out.put_u8(self.codec.len() as u8);
        out.put_slice(self.codec.as_bytes());
        let token = self.token.as_deref().unwrap_or("");
        out.put_u16(token.len() as u16);
        out.put_slice(token.as_bytes());
        for field in self.limits.announced() {
            out.put_u32(field);
        }
        out
    }

    /// The peer's hello: `NotAPeer` for anything else, `VersionMismatch` for a hello of another
    /// version (whose layout after the version may differ, so it is not read further).
    pub(crate) fn decode(mut body: &[u8]) -> Result<Self, HandshakeError> {
        if body.len() < 4 + 2 || &body[..4] != MAGIC {
            return Err(HandshakeError::NotAPeer);
        }
        body.advance(4);
        let version = body.get_u16();
        if version != PROTOCOL_VERSION {
            return Err(HandshakeError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        let codec_len = *body.first().ok_or(HandshakeError::NotAPeer)? as usize;
        let codec = take_str(&mut body, codec_len, 1)?;
        let token_len = match body {
            [high, low, ..] => u16::from_be_bytes([*high, *low]) as usize,
            _ => return Err(HandshakeError::NotAPeer),
        };
        let token = take_str(&mut body, token_len, 2)?;
        let mut fields = [0u32; 8];
        if body.len() != fields.len() * 4 {
            return Err(HandshakeError::NotAPeer);
        }
        for field in &mut fields {
            *field = body.get_u32();
        }
        Ok(Self {
            version,
            codec,
            token: (!token.is_empty()).then_some(token),
            limits: Limits::from_announced(fields),
        })
    }
}

fn take_str(body: &mut &[u8], len: usize, skip: usize) -> Result<String, HandshakeError> {
    let bytes = body.get(skip..skip + len).ok_or(HandshakeError::NotAPeer)?;
    let s = std::str::from_utf8(bytes)
        .map_err(|_| HandshakeError::NotAPeer)?
        .to_owned();
    body.advance(skip + len);
    Ok(s)
}

/// How this side judges a peer's hello.
pub(crate) struct Judge<'a> {
    pub(crate) authenticator: Option<&'a dyn Authenticator>,
    /// Refuse every peer, with this reason.
    pub(crate) refuse_everyone: Option<&'a str>,
}

/// Runs the handshake; returns the peer's hello and what is known about the peer (with the
/// identity `authenticator` gave it) once both sides accepted.
///
/// Whatever fails on the way, the peer's verdict is still read when it can be: a refused side
/// reports the peer's reason, not the broken pipe its own writes ran into.
pub(crate) async fn handshake(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    ours: &Hello,
    judge: Judge<'_>,
    peer: PeerInfo,
    max_frame: usize,
) -> Result<(Hello, PeerInfo), HandshakeError> {
    let io = |e: std::io::Error| HandshakeError::Transport(Arc::new(e));
    if let Some(len) = ours
        .token
        .as_ref()
        .map(String::len)
        .filter(|&len| len > MAX_TOKEN)
    {
        return Err(HandshakeError::TokenTooLong { len });
    }
    writer.put_frame(&ours.encode());
    let sent = writer.drain().await;

    reader.set_max_frame(MAX_HANDSHAKE_FRAME);
    let theirs = match read(reader).await {
        Ok(Some(Frame::Whole(body))) => Hello::decode(&body),
        Ok(_) => Err(HandshakeError::NotAPeer),
        Err(e @ HandshakeError::PeerSpeaksTls) => return Err(e),
        // The peer went before its hello: our own failed write, if any, says more.
        Err(e) => return Err(sent.err().map_or(e, io)),
    };
    let checked = match (theirs, judge.refuse_everyone) {
        (Ok(_), Some(reason)) => Err(HandshakeError::Unavailable {
            reason: reason.to_owned(),
        }),
        (Ok(theirs), None) => match check(ours, &theirs) {
            Ok(()) => authenticate(judge.authenticator, theirs, peer).await,
            Err(refusal) => Err(refusal),
        },
        (Err(refusal), _) => Err(refusal),
    };
    let (theirs, peer) = match checked {
        Ok(accepted) => accepted,
        Err(refusal) => {
            let mut verdict = vec![1];
            verdict.extend_from_slice(refusal.to_string().as_bytes());
            writer.put_frame(&verdict);
            // The peer may have refused us too and gone: our own reason is what matters.
            if writer.drain().await.is_ok() && !matches!(refusal, HandshakeError::NotAPeer) {
                let _ = tokio::time::timeout(REFUSAL_LINGER, read(reader)).await;
            }
            return Err(refusal);
        }
    };
    writer.put_frame(&[0]);
    let accepted = writer.drain().await;

    let peer_verdict = read(reader).await;
    reader.set_max_frame(max_frame);
    match peer_verdict {
        Ok(Some(Frame::Whole(body))) if body.first() == Some(&1) => Err(HandshakeError::Refused {
            reason: String::from_utf8_lossy(&body[1..]).into_owned(),
        }),
        Ok(_) if accepted.is_err() => Err(accepted.err().map_or(HandshakeError::NotAPeer, io)),
        Ok(Some(Frame::Whole(body))) if body[..] == [0] => Ok((theirs, peer)),
        Ok(_) => Err(HandshakeError::NotAPeer),
        Err(e) => Err(accepted.err().map_or(e, io)),
    }
}

/// For a wire without a handshake (the PHP original's): the peer is taken to keep this side's
/// limits, and judged on what its transport tells (it presents no token). A refused peer is
/// told why with a fatal error, the one message that ends it.
pub(crate) async fn without_handshake(
    writer: &mut FrameWriter,
    codec: crate::Codec,
    ours: Hello,
    judge: Judge<'_>,
    peer: PeerInfo,
) -> Result<(Hello, PeerInfo), HandshakeError> {
    let theirs = Hello {
        token: None,
        ..ours
    };
    let verdict = match judge.refuse_everyone {
        Some(reason) => Err(HandshakeError::Unavailable {
            reason: reason.to_owned(),
        }),
        None => authenticate(judge.authenticator, theirs, peer).await,
    };
    if let Err(refusal) = &verdict {
        let code = match refusal {
            HandshakeError::Unavailable { .. } => crate::error::code::OVERLOADED,
            _ => crate::error::code::INVALID_REQUEST,
        };
        let fatal = crate::envelope::Envelope::Fatal {
            code,
            message: refusal.to_string(),
        };
        let start = writer.begin();
        codec.encode_envelope(&fatal, writer.body());
        writer.finish(start);
        let _ = writer.drain().await;
    }
    verdict
}

/// The next handshake frame; `None` for one over the handshake limit, known from its prefix
/// alone (whatever sent it is not a peer, and may never send the claimed bytes).
async fn read(reader: &mut FrameReader) -> Result<Option<Frame>, HandshakeError> {
    let io = |e: std::io::Error| HandshakeError::Transport(Arc::new(e));
    loop {
        if let Some(len) = reader
            .claimed()
            .filter(|&len| len > PREFIX + MAX_HANDSHAKE_FRAME)
        {
            // A TLS record starts with its content type (20 to 23) and major version 3.
            let prefix = (len as u32).to_be_bytes();
            if (0x14..=0x17).contains(&prefix[0]) && prefix[1] == 3 {
                return Err(HandshakeError::PeerSpeaksTls);
            }
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

fn check(ours: &Hello, theirs: &Hello) -> Result<(), HandshakeError> {
    if ours.codec != theirs.codec {
        return Err(HandshakeError::CodecMismatch {
            ours: ours.codec.clone(),
            theirs: theirs.codec.clone(),
        });
    }
    Ok(())
}

/// The peer with the identity `authenticator` gives it (without one: the identity its
/// transport established), or the refusal.
async fn authenticate(
    authenticator: Option<&dyn Authenticator>,
    mut theirs: Hello,
    peer: PeerInfo,
) -> Result<(Hello, PeerInfo), HandshakeError> {
    let Some(authenticator) = authenticator else {
        return Ok((theirs, peer));
    };
    let request = AuthRequest::new(theirs.token.take(), peer.clone());
    // NB. A panicking authenticator refuses the peer; it must not take the connection's task
    // down with it.
    let verdict = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
        authenticator.authenticate(request),
    ))
    .await;
    match verdict {
        // `None` keeps what the transport established (a TLS client certificate's name).
        Ok(Ok(Some(identity))) => Ok((theirs, peer.with_identity(Some(identity)))),
        Ok(Ok(None)) => Ok((theirs, peer)),
        Ok(Err(refusal)) => Err(HandshakeError::Unauthenticated {
            reason: refusal.reason().to_owned(),
        }),
        Err(_) => {
            tracing::error!("the authenticator panicked: refusing the peer");
            Err(HandshakeError::Unauthenticated {
                reason: "the peer's authentication failed on this side".into(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(codec: &str, token: Option<&str>) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            codec: codec.into(),
            token: token.map(Into::into),
            limits: Limits::default(),
        }
    }

    #[test]
    fn hello_round_trips() {
        let mut hello = hello("msgpack", Some("s3cret"));
        hello.limits.max_frame_length = 1 << 20;
        hello.limits.max_nested_requests = 7;
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
    }

    #[test]
    fn hello_bytes_match_the_protocol_document() {
        let expected = [
            0x43, 0x48, 0x44, 0x50, 0x00, 0x02, 0x07, 0x6d, 0x73, 0x67, 0x70, 0x61, 0x63, 0x6b,
            0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x40, 0x00,
            0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00,
            0x10, 0x00, 0x04, 0x00, 0x00, 0x00,
        ];
        assert_eq!(&hello("msgpack", None).encode()[..], expected);
    }

    #[test]
    fn truncated_or_foreign_hellos_are_rejected() {
        let bytes = hello("json", Some("t")).encode();
        for cut in 0..bytes.len() {
            assert!(
                matches!(Hello::decode(&bytes[..cut]), Err(HandshakeError::NotAPeer)),
                "cut at {cut}"
            );
        }
        assert!(matches!(
            Hello::decode(b"GET / HTTP/1.1\r\n"),
            Err(HandshakeError::NotAPeer)
        ));
    }

    #[test]
    fn another_version_is_a_version_mismatch_whatever_follows() {
        let mut bytes = b"CHDP\x00\x01".to_vec();
        bytes.extend_from_slice(b"a layout of another version");
        assert!(matches!(
            Hello::decode(&bytes),
            Err(HandshakeError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: 1
            })
        ));
    }
}
