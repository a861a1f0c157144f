//! The write side: envelopes are encoded into one buffer and written together with one flush
//! (write coalescing), against the peer's maximum frame length; the buffer's size is what
//! back-pressure reads, and a peer that stops reading is noticed here.
//!
//! Two marks on the buffer:
//! - the soft limit (`Builder::write_buffer_limit`): above it the driver starts no new work of
//!   its own (new calls, handlers, stream items), but still writes answers, cancels and credit;
//! - the hard cap (4 times the soft limit plus the peer's largest frame): above it no handler
//!   is polled (so no more answers are made); staying above it for the stall timeout means the
//!   peer stopped reading, and ends the connection, as does going over twice the cap (only the
//!   peer's own flood of bad requests, answered while it reads nothing, gets there).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::codec::Codec;
use crate::envelope::Envelope;
use crate::error::ProtocolError;
use crate::limits::{LimitExceeded, Limits};
use crate::transport::frame::FrameWriter;

pub(crate) struct WriteSide {
    frames: FrameWriter,
    codec: Codec,
    peer_max_frame: usize,
    soft: usize,
    hard: usize,
    stall_timeout: Duration,
    /// Since when the buffer is over the hard cap, and the timer to the stall.
    stalled: Option<(Instant, Pin<Box<Sleep>>)>,
}

/// Why writing failed.
#[derive(Debug)]
pub(crate) enum WriteError {
    Io(io::Error),
    Stalled(ProtocolError),
}

impl WriteSide {
    pub(crate) fn new(
        frames: FrameWriter,
        codec: Codec,
        peer_max_frame: usize,
        soft: usize,
        stall_timeout: Duration,
    ) -> Self {
        Self {
            frames,
            codec,
            peer_max_frame,
            soft,
            hard: soft.saturating_mul(4).saturating_add(peer_max_frame),
            stall_timeout,
            stalled: None,
        }
    }

    /// Encodes one envelope into the buffer; an error (and nothing written) when it exceeds
    /// the peer's maximum frame length.
    pub(crate) fn write(&mut self, envelope: &Envelope) -> Result<(), LimitExceeded> {
        if !self.codec.carries(envelope) {
            return Ok(());
        }
        let start = self.frames.begin();
        self.codec.encode_envelope(envelope, self.frames.body());
        let len = self.frames.finish(start);
        Limits::check_frame(len, self.peer_max_frame).inspect_err(|_| self.frames.abandon(start))
    }

    /// `true` while the buffer is under the soft limit: new work may add to it.
    pub(crate) fn has_room(&self) -> bool {
        self.frames.pending() < self.soft
    }

    /// `true` while the buffer is over its hard cap.
    pub(crate) fn over_cap(&self) -> bool {
        self.frames.pending() > self.hard
    }

    /// Bytes waiting to be written.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.frames.pending()
    }

    /// Writes the buffer out and flushes; fails when the transport does, or when the buffer
    /// stayed over the hard cap for the stall timeout.
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteError>> {
        let result = self.frames.poll_drain(cx);
        if let Poll::Ready(Err(e)) = result {
            return Poll::Ready(Err(WriteError::Io(e)));
        }
        if self.frames.pending() <= self.hard {
            self.stalled = None;
            return result.map_err(WriteError::Io);
        }
        let timeout = self.stall_timeout;
        let (since, timer) = self.stalled.get_or_insert_with(|| {
            let now = Instant::now();
            (now, Box::pin(tokio::time::sleep(timeout)))
        });
        // NB. Over the cap nothing new is made but answers to what the peer sends (refusals,
        // errors): a peer that makes those pile up past a second cap while it reads nothing is
        // cut off at once.
        let flooding = self.frames.pending() > self.hard.saturating_mul(2);
        if flooding || timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(WriteError::Stalled(ProtocolError::NotReading {
                pending: self.frames.pending(),
                waited: since.elapsed(),
            })));
        }
        Poll::Pending
    }

    /// Writes what is buffered, then shuts the write direction down.
    pub(crate) fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.frames.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Attributes;

    fn notification(len: usize) -> Envelope {
        Envelope::Notification {
            method: crate::envelope::Method::from_static("n"),
            attributes: Attributes::new(),
            payload: Codec::default().encode(&vec![7u8; len]).unwrap(),
        }
    }

    #[test]
    fn a_frame_over_the_peers_maximum_is_refused_and_nothing_is_written() {
        let mut write = WriteSide::new(
            FrameWriter::new(Box::new(tokio::io::sink())),
            Codec::default(),
            100,
            1024,
            Duration::from_secs(1),
        );
        let error = write.write(&notification(200)).unwrap_err();
        assert_eq!(error.max, 100);
        assert_eq!(write.pending(), 0);
        write.write(&notification(10)).unwrap();
        assert!(write.pending() > 0 && write.has_room());
    }

    /// A write side over a transport that takes 64 bytes and no more, with a hard cap of
    /// 4 x 256 + 1024 bytes and a stall timeout of 30 s.
    fn stuck() -> (WriteSide, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(64);
        let frames = FrameWriter::new(Box::new(ours));
        let write = WriteSide::new(frames, Codec::default(), 1024, 256, Duration::from_secs(30));
        (write, theirs)
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_reads_is_noticed_after_the_stall_timeout() {
        let (mut write, _theirs) = stuck();
        for _ in 0..6 {
            write.write(&notification(500)).unwrap();
        }
        let started = Instant::now();
        match std::future::poll_fn(|cx| write.poll_flush(cx)).await {
            Err(WriteError::Stalled(ProtocolError::NotReading { pending, waited })) => {
                assert!(pending > 1024 + 4 * 256, "{pending}");
                assert_eq!(waited, Duration::from_secs(30));
            }
            other => panic!("expected a stall, got {other:?}"),
        }
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn past_twice_the_hard_cap_the_peer_is_cut_off_at_once() {
        let (mut write, _theirs) = stuck();
        for _ in 0..10 {
            write.write(&notification(500)).unwrap();
        }
        let started = Instant::now();
        let flushed = std::future::poll_fn(|cx| write.poll_flush(cx)).await;
        assert!(
            matches!(flushed, Err(WriteError::Stalled(_))),
            "{flushed:?}"
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_buffer_under_the_hard_cap_just_waits() {
        let (mut write, _theirs) = stuck();
        write.write(&notification(500)).unwrap();
        assert!(!write.has_room());
        let flushed = tokio::time::timeout(
            Duration::from_secs(60),
            std::future::poll_fn(|cx| write.poll_flush(cx)),
        )
        .await;
        assert!(flushed.is_err(), "no stall under the hard cap: {flushed:?}");
    }
}
