//! Our side's work: the ledger of calls awaiting the peer's answers, the peer's admission window
//! (how much of our work the peer holds, against the limits it announced), and the outbox where
//! new calls and notifications wait, in order, for room in that window.

use std::collections::{HashMap, VecDeque};

use crate::codec::Codec;
use crate::error::CallError;
use crate::hash::SeededState;
use crate::limits::Limits;
use crate::shared::{Command, Lifecycle, Outbound, Permit, RawAnswer, ReplySender};

/// Our calls awaiting answers.
#[derive(Default)]
pub(crate) struct Outgoing {
    pending: HashMap<u64, Pending, SeededState>,
}

struct Pending {
    reply: ReplySender,
    held: Held,
}

/// Where a call counts in the peer's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Window {
    /// Among the peer's pending requests, with its payload bytes.
    Request(usize),
    /// Among its nested requests, for the handler of the peer's request `parent`.
    Nested { parent: u64 },
}

/// What a call holds until it is answered: its permit, and its place in the peer's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) permit: Permit,
    pub(crate) window: Window,
}

impl Outgoing {
    pub(crate) fn insert_request(&mut self, id: u64, reply: ReplySender, held: Held) {
        self.pending.insert(id, Pending { reply, held });
    }

    /// Delivers an answer; `None` when nobody waits for `id` (late, cancelled or unknown).
    pub(crate) fn complete_request(&mut self, id: u64, answer: RawAnswer) -> Option<Held> {
        let pending = self.pending.remove(&id)?;
        // The caller may have dropped its future a moment ago; then nobody reads this.
        let _ = pending.reply.send(answer);
        Some(pending.held)
    }

    /// Forgets a call the caller gave up on; `None` if it was not pending.
    pub(crate) fn cancel_request(&mut self, id: u64) -> Option<Held> {
        self.pending.remove(&id).map(|pending| pending.held)
    }

    /// `true` while call `id` awaits its answer.
    pub(crate) fn contains(&self, id: u64) -> bool {
        self.pending.contains_key(&id)
    }

    /// Fails the pending calls with `error()` (the nested ones too with `nested_too`); their
    /// ids and what they held.
    pub(crate) fn fail(
        &mut self,
        nested_too: bool,
        error: impl Fn() -> CallError,
    ) -> Vec<(u64, Held)> {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| nested_too || matches!(p.held.window, Window::Request(_)))
            .map(|(&id, _)| id)
            .collect();
        ids.into_iter()
            .filter_map(|id| {
                let pending = self.pending.remove(&id)?;
                pending.reply.fail(error());
                Some((id, pending.held))
            })
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

/// How much of our work the peer holds, against the admission limits it announced: requests
/// until answered or cancelled, notifications until it credits them back (oldest first), and
/// nested requests (by the handler that makes them).
pub(crate) struct PeerWindow {
    max_requests: usize,
    max_notifications: usize,
    max_nested: usize,
    max_bytes: usize,
    requests: usize,
    request_bytes: usize,
    notifications: VecDeque<usize>,
    notification_bytes: usize,
    /// Our nested requests pending at the peer, by the peer's request whose handler made them.
    nested: HashMap<u64, usize, SeededState>,
    nested_total: usize,
}

impl PeerWindow {
    pub(crate) fn new(peer: &Limits) -> Self {
        let peer = peer.normalized();
        Self {
            max_requests: peer.max_pending_requests,
            max_notifications: peer.max_pending_notifications,
            max_nested: peer.max_nested_requests,
            max_bytes: peer.max_pending_bytes,
            requests: 0,
            request_bytes: 0,
            notifications: VecDeque::new(),
            notification_bytes: 0,
            nested: HashMap::default(),
            nested_total: 0,
        }
    }

    fn fits_bytes(&self, len: usize) -> bool {
        let held = self.request_bytes + self.notification_bytes;
        (self.requests == 0 && self.notifications.is_empty())
            || held.saturating_add(len) <= self.max_bytes
    }

    pub(crate) fn fits_request(&self, len: usize) -> bool {
        self.requests < self.max_requests && self.fits_bytes(len)
    }

    pub(crate) fn fits_notification(&self, len: usize) -> bool {
        self.notifications.len() < self.max_notifications && self.fits_bytes(len)
    }

    /// Whether a nested call for the handler of `parent` goes now. Over the peer's nested
    /// limit it waits only when that handler has a nested call pending already (it fans out:
    /// the wait ends as its own calls are answered). The first nested call of a handler always
    /// goes, and is refused if the peer has no room: waiting could wait for room its own chain
    /// of calls holds.
    pub(crate) fn may_nest(&self, parent: u64) -> bool {
        self.nested_total < self.max_nested || !self.nested.contains_key(&parent)
    }

    pub(crate) fn add(&mut self, window: Window) {
        match window {
            Window::Request(len) => {
                self.requests += 1;
                self.request_bytes += len;
            }
            Window::Nested { parent } => {
                *self.nested.entry(parent).or_default() += 1;
                self.nested_total += 1;
            }
        }
    }

    pub(crate) fn remove(&mut self, window: Window) {
        match window {
            Window::Request(len) => {
                self.requests = self.requests.saturating_sub(1);
                self.request_bytes = self.request_bytes.saturating_sub(len);
            }
            Window::Nested { parent } => {
                if let Some(count) = self.nested.get_mut(&parent) {
                    *count -= 1;
                    if *count == 0 {
                        self.nested.remove(&parent);
                    }
                    self.nested_total -= 1;
                }
            }
        }
    }

    /// The peer's requests whose handlers of ours have nested calls pending at the peer.
    pub(crate) fn nesting_parents(&self) -> impl Iterator<Item = u64> + '_ {
        self.nested.keys().copied()
    }

    pub(crate) fn add_notification(&mut self, len: usize) {
        self.notifications.push_back(len);
        self.notification_bytes += len;
    }

    /// The peer started `count` more of our notifications (a larger count than we sent is
    /// the peer's mistake, and frees no more than we sent).
    pub(crate) fn credit(&mut self, count: u64) {
        for _ in 0..count.min(self.notifications.len() as u64) {
            if let Some(len) = self.notifications.pop_front() {
                self.notification_bytes -= len;
            }
        }
    }

    /// `true` when nothing of ours is held by the peer.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.requests == 0
            && self.notifications.is_empty()
            && self.request_bytes == 0
            && self.nested_total == 0
    }
}

/// Calls and notifications waiting to be written: for room in the write buffer and in the
/// peer's window. Each kind waits in the order it was made; the two kinds wait apart (a
/// notification the peer has room for does not wait behind a call it has no room for), and
/// go in the order they were made when both have room. Nested calls wait apart too, for room
/// in the write buffer and among the peer's nested requests only: calls waiting for the
/// window may be waiting for them.
#[derive(Default)]
pub(crate) struct Outbox {
    calls: VecDeque<(u64, Command)>,
    notifications: VecDeque<(u64, Outbound)>,
    nested: VecDeque<Command>,
    /// The order in which calls and notifications were queued.
    next: u64,
}

impl Outbox {
    /// Queues a call (`Command::Call`) or a notification (`Command::Notify`).
    pub(crate) fn push(&mut self, command: Command) {
        let seq = self.next;
        self.next += 1;
        match command {
            Command::Notify(notification) => self.notifications.push_back((seq, notification)),
            call => self.calls.push_back((seq, call)),
        }
    }

    pub(crate) fn push_nested(&mut self, command: Command) {
        self.nested.push_back(command);
    }

    pub(crate) fn is_empty(&self) -> bool {
        !self.waiting() && self.nested.is_empty()
    }

    /// Calls or notifications wait for room in the peer's window or the write buffer.
    pub(crate) fn waiting(&self) -> bool {
        !self.calls.is_empty() || !self.notifications.is_empty()
    }

    /// Nested calls wait for room.
    pub(crate) fn nested_waiting(&self) -> bool {
        !self.nested.is_empty()
    }

    /// A waiting nested call that may go, or else the first call or notification the peer's
    /// window has room for (the older one if both). A call whose caller has gone meanwhile is
    /// dropped on the way and handed to `abandoned`.
    pub(crate) fn pop_ready(
        &mut self,
        window: &PeerWindow,
        codec: Codec,
        mut abandoned: impl FnMut(&Outbound),
    ) -> Option<Command> {
        // NB. Not first in, first out: a nested call waiting for its siblings must not hold up
        // another handler's, which may be what they wait for.
        let mut at = 0;
        while at < self.nested.len() {
            let (gone, waits) = match &self.nested[at] {
                Command::Call { reply, call, .. } => {
                    let nests = call.parent().map_or(true, |parent| window.may_nest(parent));
                    (reply.is_closed(), !nests)
                }
                _ => (false, false),
            };
            if gone {
                if let Some(Command::Call { call, .. }) = self.nested.remove(at) {
                    abandoned(&call);
                }
            } else if waits {
                at += 1;
            } else {
                return self.nested.remove(at);
            }
        }
        let call = loop {
            match self.calls.front() {
                Some((_, Command::Call { reply, call, .. })) if reply.is_closed() => {
                    abandoned(call);
                    self.calls.pop_front();
                }
                Some((seq, Command::Call { call, .. }))
                    if window.fits_request(codec.payload_len(&call.payload)) =>
                {
                    break Some(*seq)
                }
                _ => break None,
            }
        };
        let notification = match self.notifications.front() {
            Some((seq, notification))
                if window.fits_notification(codec.payload_len(&notification.payload)) =>
            {
                Some(*seq)
            }
            _ => None,
        };
        match (call, notification) {
            (Some(call), Some(notification)) if notification < call => self.pop_notification(),
            (Some(_), _) => self.calls.pop_front().map(|(_, call)| call),
            (None, Some(_)) => self.pop_notification(),
            (None, None) => None,
        }
    }

    fn pop_notification(&mut self) -> Option<Command> {
        let (_, notification) = self.notifications.pop_front()?;
        Some(Command::Notify(notification))
    }

    /// Drops the calls whose callers have gone (timed out, dropped), handing them to
    /// `abandoned`: they are never written.
    pub(crate) fn prune(&mut self, mut abandoned: impl FnMut(&Outbound)) {
        let mut gone = |command: &Command| match command {
            Command::Call { reply, call, .. } if reply.is_closed() => {
                abandoned(call);
                false
            }
            _ => true,
        };
        self.nested.retain(&mut gone);
        self.calls.retain(|(_, command)| gone(command));
    }

    /// Fails the waiting calls (the connection stops), the nested ones too with `nested_too`;
    /// notifications stay to be written.
    pub(crate) fn fail_calls(
        &mut self,
        nested_too: bool,
        error: impl Fn() -> CallError,
        mut released: impl FnMut(&Outbound),
    ) {
        let nested = match nested_too {
            true => std::mem::take(&mut self.nested),
            false => VecDeque::new(),
        };
        let calls = std::mem::take(&mut self.calls).into_iter().map(|(_, c)| c);
        for command in calls.chain(nested) {
            if let Command::Call { call, reply, .. } = command {
                reply.fail(error());
                released(&call);
            }
        }
    }

    /// Takes everything still waiting.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Command> + '_ {
        let notifications = self.notifications.drain(..);
        self.nested
            .drain(..)
            .chain(self.calls.drain(..).map(|(_, call)| call))
            .chain(notifications.map(|(_, notification)| Command::Notify(notification)))
    }
}

/// In-flight permits to give back at the end of the driver's turn, by class: message counts
/// and queued bytes.
#[derive(Default)]
pub(crate) struct Released {
    count: [usize; 2],
    bytes: [usize; 2],
}

impl Released {
    fn class(permit: Permit) -> Option<usize> {
        match permit {
            Permit::None => None,
            Permit::Handle => Some(0),
            Permit::Handler => Some(1),
        }
    }

    /// A message is done with all it held: a notification written, a call never written.
    pub(crate) fn message(&mut self, message: &Outbound) {
        self.written(message.permit, message.queued);
        self.answered(message.permit);
    }

    /// A call is written: its `queued` bytes are free, its count stays until it is answered.
    pub(crate) fn written(&mut self, permit: Permit, queued: u32) {
        if let Some(class) = Self::class(permit) {
            self.bytes[class] += queued as usize;
        }
    }

    /// A call is answered (or failed, or cancelled).
    pub(crate) fn answered(&mut self, permit: Permit) {
        if let Some(class) = Self::class(permit) {
            self.count[class] += 1;
        }
    }

    pub(crate) fn give_back(&mut self, lifecycle: &Lifecycle) {
        let Self { count, bytes } = std::mem::take(self);
        lifecycle.release(Permit::Handle, count[0], bytes[0]);
        lifecycle.release(Permit::Handler, count[1], bytes[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answers::{test_channel, TestReceiver};
    use crate::envelope::Method;
    use crate::message::Attributes;
    use crate::shared::RawResponse;
    use bytes::Bytes;

    fn answer() -> RawAnswer {
        Ok(RawResponse {
            payload: Bytes::new(),
            attributes: Attributes::new(),
            codec: Codec::default(),
        })
    }

    fn outbound(len: usize) -> Outbound {
        Outbound::new(
            Method::from_static("m"),
            Attributes::new(),
            Bytes::from(vec![1; len]),
            Permit::Handle,
            len as u32,
            None,
        )
    }

    fn call(id: u64, len: usize) -> (Command, TestReceiver) {
        let (reply, rx) = test_channel();
        let command = Command::Call {
            id,
            call: outbound(len),
            deadline: None,
            reply,
        };
        (command, rx)
    }

    fn window(requests: usize, notifications: usize, bytes: usize) -> PeerWindow {
        PeerWindow::new(&Limits {
            max_pending_requests: requests,
            max_pending_notifications: notifications,
            max_pending_bytes: bytes,
            ..Limits::default()
        })
    }

    #[test]
    fn an_answer_is_delivered_once_and_gives_back_what_the_call_held() {
        let mut outgoing = Outgoing::default();
        let (tx, mut rx) = test_channel();
        let held = Held {
            permit: Permit::Handle,
            window: Window::Request(10),
        };
        outgoing.insert_request(7, tx, held);
        let held = outgoing.complete_request(7, answer()).expect("pending");
        assert_eq!(held.window, Window::Request(10));
        assert!(rx.try_recv().is_ok());
        assert!(
            outgoing.complete_request(7, answer()).is_none(),
            "a late answer finds nobody"
        );
        assert!(outgoing.cancel_request(7).is_none() && outgoing.len() == 0);
    }

    #[test]
    fn failing_calls_at_a_stop_keeps_the_nested_ones() {
        let mut outgoing = Outgoing::default();
        let (tx, mut rx) = test_channel();
        let nested = Held {
            permit: Permit::None,
            window: Window::Nested { parent: 3 },
        };
        outgoing.insert_request(1, tx, nested);
        let (tx, mut ordinary) = test_channel();
        let held = Held {
            permit: Permit::Handle,
            window: Window::Request(0),
        };
        outgoing.insert_request(2, tx, held);
        let stopped = || CallError::Terminated(crate::Termination::Stopped);
        let failed = outgoing.fail(false, stopped);
        assert_eq!(
            failed.len(),
            1,
            "a nested call stays for its draining handler"
        );
        assert!(matches!(
            ordinary.try_recv().map(|answer| answer.map_err(|e| *e)),
            Ok(Err(CallError::Terminated(_)))
        ));
        assert!(outgoing.contains(1));
        assert_eq!(outgoing.fail(true, stopped).len(), 1);
        assert!(matches!(
            rx.try_recv().map(|answer| answer.map_err(|e| *e)),
            Ok(Err(CallError::Terminated(_)))
        ));
        assert!(!outgoing.contains(1));
    }

    #[test]
    fn the_window_holds_back_work_over_the_peers_limits() {
        let mut window = window(2, 1, 100);
        assert!(window.fits_request(1000), "one message alone always fits");
        window.add(Window::Request(60));
        assert!(!window.fits_request(50), "over the bytes");
        assert!(window.fits_request(40));
        window.add(Window::Request(40));
        assert!(!window.fits_request(0), "over the count");
        window.remove(Window::Request(60));
        window.remove(Window::Request(40));
        window.add_notification(10);
        assert!(!window.fits_notification(1), "one notification at most");
        window.credit(u64::MAX);
        assert!(window.is_empty(), "credit frees no more than was sent");
        assert!(window.fits_notification(1));
    }

    #[test]
    fn the_outbox_keeps_order_and_drops_calls_whose_caller_is_gone() {
        let codec = Codec::default();
        let window = window(1, 4, 1 << 20);
        let mut outbox = Outbox::default();
        let (first, _first_rx) = call(1, 5);
        let (gone, gone_rx) = call(2, 5);
        outbox.push(first);
        outbox.push(gone);
        outbox.push(Command::Notify(outbound(3)));
        drop(gone_rx);
        let mut abandoned = 0;
        let next = outbox.pop_ready(&window, codec, |_| abandoned += 1);
        assert!(matches!(next, Some(Command::Call { id: 1, .. })));
        let next = outbox.pop_ready(&window, codec, |_| abandoned += 1);
        assert!(matches!(next, Some(Command::Notify(_))));
        assert_eq!(abandoned, 1, "the abandoned call is never written");
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_handler_fanning_out_nested_calls_waits_for_its_own_but_not_another_handlers() {
        let mut window = PeerWindow::new(&Limits {
            max_nested_requests: 1,
            ..Limits::default()
        });
        assert!(window.may_nest(7));
        window.add(Window::Nested { parent: 7 });
        assert!(!window.may_nest(7), "its second one waits for its first");
        assert!(
            window.may_nest(8),
            "another handler's first one goes (and may be refused)"
        );
        window.remove(Window::Nested { parent: 7 });
        assert!(window.may_nest(7) && window.is_empty());
    }

    #[test]
    fn nested_calls_do_not_wait_for_the_request_window() {
        let codec = Codec::default();
        let mut full = window(1, 1, 1 << 20);
        full.add(Window::Request(1));
        let mut outbox = Outbox::default();
        let (ordinary, _rx) = call(1, 5);
        let (nested, _nested_rx) = call(2, 5);
        outbox.push(ordinary);
        outbox.push_nested(nested);
        let next = outbox.pop_ready(&full, codec, |_| {});
        assert!(matches!(next, Some(Command::Call { id: 2, .. })));
        assert!(
            outbox.pop_ready(&full, codec, |_| {}).is_none(),
            "the ordinary call waits for room"
        );
        let mut failed = 0;
        outbox.fail_calls(
            true,
            || CallError::Terminated(crate::Termination::Stopped),
            |_| failed += 1,
        );
        assert_eq!(failed, 1);
    }

    #[test]
    fn a_notification_with_room_does_not_wait_behind_a_call_without() {
        let codec = Codec::default();
        let mut full = window(1, 4, 1 << 20);
        full.add(Window::Request(1));
        let mut outbox = Outbox::default();
        let (call, _rx) = call(1, 5);
        outbox.push(call);
        outbox.push(Command::Notify(outbound(3)));
        let next = outbox.pop_ready(&full, codec, |_| {});
        assert!(matches!(next, Some(Command::Notify(_))), "{next:?}");
        assert!(outbox.pop_ready(&full, codec, |_| {}).is_none());
        full.remove(Window::Request(1));
        assert!(matches!(
            outbox.pop_ready(&full, codec, |_| {}),
            Some(Command::Call { id: 1, .. })
        ));
    }

    #[test]
    fn released_permits_are_counted_by_class() {
        let mut released = Released::default();
        let message = outbound(8);
        released.message(&message);
        released.written(Permit::Handler, 3);
        released.answered(Permit::Handler);
        released.answered(Permit::None);
        assert_eq!((released.count, released.bytes), ([1, 1], [8, 3]));
    }
}
