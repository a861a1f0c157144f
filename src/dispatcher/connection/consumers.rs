//! The peer's streams this side consumes: where their items go, and the rules a producer must
//! keep (PROTOCOL.md, section 9): no items beyond the credit granted, positions contiguous
//! from 0, one stream per id.

use std::collections::HashMap;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::codec::Codec;
use crate::error::{code, ProtocolError, RemoteError, Termination};
use crate::hash::SeededState;
use crate::shared::StreamEvent;
use crate::stream::storage::MAX_CREDIT;

struct Consumer {
    events: mpsc::UnboundedSender<StreamEvent>,
    /// Items the producer may still send.
    credit: u64,
    /// The position of the next item.
    next: u64,
}

/// What became of a batch of items.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Delivered, or dropped because nobody consumes that stream (any more).
    Done,
    /// The batch broke the stream's rules: its consumer got an error and the stream is
    /// closed; the producer must be told (stream cancel).
    StreamFailed,
    /// The producer ignored the credit: the connection ends.
    Violation(ProtocolError),
}

pub(crate) struct Consumers {
    codec: Codec,
    streams: HashMap<u64, Consumer, SeededState>,
}

impl Consumers {
    pub(crate) fn new(codec: Codec) -> Self {
        Self {
            codec,
            streams: HashMap::default(),
        }
    }

    fn error(&self, message: String) -> RemoteError {
        RemoteError {
            code: code::INVALID_REQUEST,
            message,
            data: None,
            codec: self.codec,
        }
    }

    /// Starts consuming `stream` with `credit`; `false` when a consumer of that id exists
    /// already (the producer gave one id to two streams): then both get an error and the
    /// stream is closed, and the producer must be told.
    pub(crate) fn open(
        &mut self,
        stream: u64,
        events: mpsc::UnboundedSender<StreamEvent>,
        credit: u64,
    ) -> bool {
        if let Some(first) = self.streams.remove(&stream) {
            let message = format!("the peer gave stream id {stream} to two streams");
            let _ = first
                .events
                .send(StreamEvent::End(Some(self.error(message.clone()))));
            let _ = events.send(StreamEvent::End(Some(self.error(message))));
            return false;
        }
        let consumer = Consumer {
            events,
            credit: credit.min(MAX_CREDIT),
            next: 0,
        };
        self.streams.insert(stream, consumer);
        true
    }

    /// The consumer of `stream` grants `credit` more; the credit to send, if it is open.
    pub(crate) fn grant(&mut self, stream: u64, credit: u64) -> Option<u64> {
        let consumer = self.streams.get_mut(&stream)?;
        let credit = credit.min(MAX_CREDIT - consumer.credit);
        consumer.credit += credit;
        Some(credit)
    }

    /// The consumer dropped `stream`; `true` if it was open.
    pub(crate) fn cancel(&mut self, stream: u64) -> bool {
        self.streams.remove(&stream).is_some()
    }

    /// A batch of `stream`, at `position`.
    pub(crate) fn items(&mut self, stream: u64, position: u64, payload: Bytes) -> Delivery {
        let Some(&Consumer { credit, next, .. }) = self.streams.get(&stream) else {
            return Delivery::Done; // it crossed our cancel on the wire
        };
        let count = match self.codec.sequence_len(&payload) {
            Ok(count) => count as u64,
            Err(e) => return self.fail(stream, format!("a batch of stream {stream}: {e}")),
        };
        if count > credit {
            self.streams.remove(&stream);
            return Delivery::Violation(ProtocolError::CreditExceeded {
                stream,
                credit,
                received: count as usize,
            });
        }
        if position != next {
            let message =
                format!("stream {stream} sent items at position {position}, expected {next}");
            return self.fail(stream, message);
        }
        let Some(next) = position.checked_add(count) else {
            return self.fail(
                stream,
                format!("stream {stream} ran past the last position"),
            );
        };
        let Some(consumer) = self.streams.get_mut(&stream) else {
            return Delivery::Done;
        };
        consumer.credit -= count;
        consumer.next = next;
        if consumer
            .events
            .send(StreamEvent::Items { position, payload })
            .is_err()
        {
            // Its consumer is gone; its drop sends the cancel.
            self.streams.remove(&stream);
        }
        Delivery::Done
    }

    fn fail(&mut self, stream: u64, message: String) -> Delivery {
        if let Some(consumer) = self.streams.remove(&stream) {
            let _ = consumer
                .events
                .send(StreamEvent::End(Some(self.error(message))));
        }
        Delivery::StreamFailed
    }

    /// The producer ended `stream`, with an error if it failed.
    pub(crate) fn end(&mut self, stream: u64, error: Option<RemoteError>) {
        if let Some(consumer) = self.streams.remove(&stream) {
            let _ = consumer.events.send(StreamEvent::End(error));
        }
    }

    /// Ends every stream: the connection is over.
    pub(crate) fn terminate_all(&mut self, reason: &Termination) {
        for (_, consumer) in self.streams.drain() {
            let _ = consumer
                .events
                .send(StreamEvent::Terminated(reason.clone()));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(items: &[u32]) -> Bytes {
        Codec::default().encode(items).unwrap()
    }

    fn open(
        consumers: &mut Consumers,
        stream: u64,
        credit: u64,
    ) -> mpsc::UnboundedReceiver<StreamEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        assert!(consumers.open(stream, tx, credit));
        rx
    }

    #[test]
    fn items_within_credit_and_in_order_are_delivered() {
        let mut consumers = Consumers::new(Codec::default());
        let mut rx = open(&mut consumers, 1, 3);
        assert_eq!(consumers.items(1, 0, batch(&[1, 2])), Delivery::Done);
        assert_eq!(consumers.items(1, 2, batch(&[3])), Delivery::Done);
        assert!(matches!(
            rx.try_recv(),
            Ok(StreamEvent::Items { position: 0, .. })
        ));
        assert!(matches!(
            rx.try_recv(),
            Ok(StreamEvent::Items { position: 2, .. })
        ));
        assert_eq!(consumers.grant(1, u64::MAX), Some(MAX_CREDIT), "capped");
        assert_eq!(consumers.grant(1, 5), Some(0));
        assert_eq!(consumers.grant(9, 5), None);
    }

    #[test]
    fn items_beyond_the_credit_are_a_violation() {
        let mut consumers = Consumers::new(Codec::default());
        let _rx = open(&mut consumers, 1, 2);
        assert_eq!(
            consumers.items(1, 0, batch(&[1, 2, 3])),
            Delivery::Violation(ProtocolError::CreditExceeded {
                stream: 1,
                credit: 2,
                received: 3
            })
        );
    }

    #[test]
    fn a_gap_or_an_overflowing_position_fails_the_stream() {
        let mut consumers = Consumers::new(Codec::default());
        let mut rx = open(&mut consumers, 1, 10);
        assert_eq!(
            consumers.items(1, u64::MAX, batch(&[1])),
            Delivery::StreamFailed
        );
        assert!(
            matches!(rx.try_recv(), Ok(StreamEvent::End(Some(e))) if e.message.contains("position"))
        );
        assert_eq!(consumers.len(), 0);
        assert_eq!(
            consumers.items(1, 0, batch(&[1])),
            Delivery::Done,
            "closed: ignored"
        );
    }

    #[test]
    fn a_reused_id_fails_both_streams() {
        let mut consumers = Consumers::new(Codec::default());
        let mut first = open(&mut consumers, 4, 10);
        let (tx, mut second) = mpsc::unbounded_channel();
        assert!(!consumers.open(4, tx, 10));
        for rx in [&mut first, &mut second] {
            assert!(
                matches!(rx.try_recv(), Ok(StreamEvent::End(Some(e))) if e.message.contains("two streams"))
            );
        }
        assert_eq!(consumers.len(), 0);
    }
}
