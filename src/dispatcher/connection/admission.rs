//! Inbound admission: the peer's new work (requests and notifications) waits here for a
//! handler slot, bounded by the limits this side announced in the handshake.
//!
//! The driver always reads; this is where reading meets back-pressure. Answers, cancels and
//! credit never come here. New work is counted against the announced [`Limits`]: a compliant
//! peer never exceeds them, so everything it sends is admitted and waits (in order) until a
//! handler slot is free. Work beyond them is refused (`-32005`, a request) or, when the peer
//! keeps on or cannot be refused (a notification), ends the connection.
//!
//! Nested requests (made by the peer's handler of one of our own calls) have a count of their
//! own and skip the queue and the handler limit: a chain of calls back and forth never waits
//! for the handlers it is itself keeping busy.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;

use super::handlers::Run;
use crate::error::{code, ProtocolError};
use crate::hash::SeededState;
use crate::limits::{Limit, Limits};
use crate::message::Attributes;

/// A request or notification admitted and waiting for a handler slot.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) run: Run,
    pub(crate) attributes: Attributes,
    pub(crate) payload: Bytes,
}

/// What admission made of new work.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Within the limits: start it at once if [`Admission::may_start_now`], or
    /// [`defer`](Admission::defer) it until a slot is free.
    Admitted,
    /// A request over the limits: answer it with this error.
    Refused { code: i64, message: String },
    /// The peer broke the limits past refusing: end the connection.
    CutOff(ProtocolError),
}

pub(crate) struct Admission {
    limits: Limits,
    queue: VecDeque<Queued>,
    nested_queue: VecDeque<Queued>,
    /// The ids of the requests in the queues.
    queued_ids: HashSet<u64, SeededState>,
    /// The ids of the pull requests waiting for a stream's item.
    pulls: HashSet<u64, SeededState>,
    /// The peer's requests pending here (running, queued, or pulls waiting for an item).
    requests: usize,
    /// The peer's nested requests pending here (running or queued).
    nested: usize,
    /// The peer's notifications queued.
    notifications: usize,
    /// Payload bytes of the pending requests and queued notifications.
    bytes: usize,
    /// Requests refused in a row for being over the limits.
    strikes: usize,
    /// Notifications started since the last credit sent back.
    credit: u64,
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            queue: VecDeque::new(),
            nested_queue: VecDeque::new(),
            queued_ids: HashSet::default(),
            pulls: HashSet::default(),
            requests: 0,
            nested: 0,
            notifications: 0,
            bytes: 0,
            strikes: 0,
            credit: 0,
        }
    }

    /// Over the pending-bytes limit with `len` more (one message alone always fits).
    fn over_bytes(&self, len: usize) -> bool {
        let pending = self.requests + self.notifications;
        pending > 0 && self.bytes.saturating_add(len) > self.limits.max_pending_bytes
    }

    /// A request over a limit: refused, and after as many refusals in a row as the peer may
    /// have requests pending, cut off.
    fn strike(&mut self, limit: Limit, max: usize) -> Verdict {
        self.strikes += 1;
        if self.strikes > self.limits.max_pending_requests {
            return Verdict::CutOff(ProtocolError::AdmissionExceeded { limit, max });
        }
        Verdict::Refused {
            code: code::OVERLOADED,
            message: format!(
                "too much work pending: the {limit} is over this side's limit of {max}; retry \
                 once some of your calls are answered"
            ),
        }
    }

    /// Admits one of the peer's requests (`run.nested` when it is nested in one of our calls):
    /// it counts as pending from now until [`done`](Self::done).
    pub(crate) fn request(&mut self, run: &Run) -> Verdict {
        if run.nested {
            if self.nested >= self.limits.max_nested_requests {
                // NB. No strike: a compliant peer may nest deeper than the limit (it cannot
                // wait for room its own chain holds), and is refused, never cut off.
                let max = self.limits.max_nested_requests;
                return Verdict::Refused {
                    code: code::OVERLOADED,
                    message: format!(
                        "too many nested calls: {} are pending, the most this side takes; the \
                         chain of calls is too deep or too wide",
                        max
                    ),
                };
            }
            self.nested += 1;
            self.strikes = 0;
            return Verdict::Admitted;
        }
        if self.requests >= self.limits.max_pending_requests {
            return self.strike(Limit::PendingRequests, self.limits.max_pending_requests);
        }
        if self.over_bytes(run.bytes()) {
            return self.strike(Limit::PendingBytes, self.limits.max_pending_bytes);
        }
        self.requests += 1;
        self.bytes += run.bytes();
        self.strikes = 0;
        Verdict::Admitted
    }

    /// Admits one of the peer's notifications (it counts while it waits). It cannot be
    /// refused (nothing answers it), so one over the limits ends the connection.
    pub(crate) fn notification(&self, run: &Run) -> Verdict {
        let max = self.limits.max_pending_notifications;
        if self.notifications >= max {
            let limit = Limit::PendingNotifications;
            return Verdict::CutOff(ProtocolError::AdmissionExceeded { limit, max });
        }
        if self.over_bytes(run.bytes()) {
            let (limit, max) = (Limit::PendingBytes, self.limits.max_pending_bytes);
            return Verdict::CutOff(ProtocolError::AdmissionExceeded { limit, max });
        }
        Verdict::Admitted
    }

    /// `true` when admitted work may start at once: nothing of its kind waits before it.
    pub(crate) fn may_start_now(&self, nested: bool) -> bool {
        match nested {
            true => self.nested_queue.is_empty(),
            false => self.queue.is_empty(),
        }
    }

    /// A notification admitted and started at once: the peer is credited for it.
    pub(crate) fn started_notification(&mut self) {
        self.credit += 1;
    }

    /// Queues admitted work until a slot is free.
    pub(crate) fn defer(&mut self, queued: Queued) {
        match queued.run.id {
            Some(id) => {
                self.queued_ids.insert(id);
            }
            None => {
                self.notifications += 1;
                self.bytes += queued.run.bytes();
            }
        }
        match queued.run.nested {
            true => self.nested_queue.push_back(queued),
            false => self.queue.push_back(queued),
        }
    }

    /// Admits pull request `id` of a remote stream (answered by the stream, not a handler).
    pub(crate) fn pull(&mut self, id: u64) -> Verdict {
        if self.requests >= self.limits.max_pending_requests {
            return self.strike(Limit::PendingRequests, self.limits.max_pending_requests);
        }
        self.requests += 1;
        self.pulls.insert(id);
        self.strikes = 0;
        Verdict::Admitted
    }

    /// The next waiting work to start: nested requests first; the rest only when
    /// `ordinary_room` (a handler slot is free and the write buffer has room).
    pub(crate) fn next(&mut self, ordinary_room: bool) -> Option<Queued> {
        let queued = match self.nested_queue.pop_front() {
            Some(queued) => queued,
            None if ordinary_room => self.queue.pop_front()?,
            None => return None,
        };
        match queued.run.id {
            Some(id) => {
                self.queued_ids.remove(&id);
            }
            None => {
                // A notification leaves the window when it starts: the peer is credited for it.
                self.notifications -= 1;
                self.bytes -= queued.run.bytes();
                self.credit += 1;
            }
        }
        Some(queued)
    }

    /// Nothing waits to start.
    pub(crate) fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.nested_queue.is_empty()
    }

    /// A request that started is over (answered, cancelled or dropped): its place is free.
    pub(crate) fn done(&mut self, run: &Run) {
        if run.id.is_none() {
            return;
        }
        if run.nested {
            self.nested = self.nested.saturating_sub(1);
        } else {
            self.requests = self.requests.saturating_sub(1);
            self.bytes = self.bytes.saturating_sub(run.bytes());
        }
    }

    /// Pull request `id` is answered (or cancelled); `false` if it was not pending.
    pub(crate) fn pull_done(&mut self, id: u64) -> bool {
        let pending = self.pulls.remove(&id);
        if pending {
            self.requests = self.requests.saturating_sub(1);
        }
        pending
    }

    /// `true` while pull request `id` waits for its stream.
    pub(crate) fn is_pull(&self, id: u64) -> bool {
        self.pulls.contains(&id)
    }

    /// Drops a queued request the peer cancelled; `true` if it was queued.
    pub(crate) fn cancel(&mut self, id: u64) -> bool {
        if !self.queued_ids.remove(&id) {
            return false;
        }
        let position = |queue: &VecDeque<Queued>| queue.iter().position(|q| q.run.id == Some(id));
        let queued = match (position(&self.nested_queue), position(&self.queue)) {
            (Some(at), _) => self.nested_queue.remove(at),
            (None, Some(at)) => self.queue.remove(at),
            (None, None) => None,
        };
        match queued {
            Some(queued) => {
                self.done(&queued.run);
                true
            }
            None => false,
        }
    }

    /// `true` when request `id` waits in the queue, or is a pull waiting for its stream.
    pub(crate) fn is_queued(&self, id: u64) -> bool {
        self.queued_ids.contains(&id) || self.pulls.contains(&id)
    }

    /// Notifications started since the last call: the credit to send back.
    pub(crate) fn take_credit(&mut self) -> u64 {
        std::mem::take(&mut self.credit)
    }

    /// Takes the queued requests out (the connection stops; they will not run), returning
    /// their ids. Queued notifications stay and still run.
    pub(crate) fn take_queued_requests(&mut self) -> Vec<u64> {
        let mut runs = Vec::new();
        let mut kept = VecDeque::new();
        let nested = std::mem::take(&mut self.nested_queue);
        for queued in nested.into_iter().chain(std::mem::take(&mut self.queue)) {
            match queued.run.id {
                Some(_) => runs.push(queued.run),
                None => kept.push_back(queued),
            }
        }
        self.queue = kept;
        self.queued_ids.clear();
        runs.iter().for_each(|run| self.done(run));
        runs.into_iter().filter_map(|run| run.id).collect()
    }

    /// Forgets everything waiting (the connection closes).
    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.nested_queue.clear();
        self.queued_ids.clear();
        self.pulls.clear();
        self.notifications = 0;
    }

    #[cfg(test)]
    fn pending(&self) -> (usize, usize, usize, usize) {
        (self.requests, self.nested, self.notifications, self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Method;

    fn limits(requests: usize, notifications: usize, bytes: usize) -> Limits {
        Limits {
            max_pending_requests: requests,
            max_nested_requests: 1,
            max_pending_notifications: notifications,
            max_pending_bytes: bytes,
            ..Limits::default()
        }
    }

    fn queued(id: Option<u64>, nested: bool, bytes: usize) -> Queued {
        Queued {
            run: Run::new(id, Method::from_static("m"), None, nested, bytes),
            attributes: Attributes::new(),
            payload: Bytes::new(),
        }
    }

    /// Admits and queues, as the driver does when no slot is free.
    fn request(admission: &mut Admission, queued: Queued) -> Verdict {
        let verdict = admission.request(&queued.run);
        if verdict == Verdict::Admitted {
            admission.defer(queued);
        }
        verdict
    }

    fn notification(admission: &mut Admission, queued: Queued) -> Verdict {
        let verdict = admission.notification(&queued.run);
        if verdict == Verdict::Admitted {
            admission.defer(queued);
        }
        verdict
    }

    fn refused(verdict: Verdict) -> bool {
        matches!(
            verdict,
            Verdict::Refused {
                code: code::OVERLOADED,
                ..
            }
        )
    }

    #[test]
    fn work_waits_in_order_until_a_slot_is_free() {
        let mut admission = Admission::new(limits(4, 4, 1 << 20));
        assert_eq!(
            request(&mut admission, queued(Some(1), false, 10)),
            Verdict::Admitted
        );
        assert_eq!(
            notification(&mut admission, queued(None, false, 5)),
            Verdict::Admitted
        );
        assert_eq!(
            request(&mut admission, queued(Some(2), false, 10)),
            Verdict::Admitted
        );
        assert!(admission.next(false).is_none(), "no slot: nothing starts");
        let order: Vec<_> = std::iter::from_fn(|| admission.next(true))
            .map(|q| q.run.id)
            .collect();
        assert_eq!(order, [Some(1), None, Some(2)]);
        assert_eq!(
            admission.take_credit(),
            1,
            "the started notification is credited"
        );
        assert_eq!(admission.take_credit(), 0);
        assert_eq!(
            admission.pending(),
            (2, 0, 0, 20),
            "requests count until answered"
        );
        admission.done(&queued(Some(1), false, 10).run);
        admission.done(&queued(Some(2), false, 10).run);
        assert_eq!(admission.pending(), (0, 0, 0, 0));
    }

    #[test]
    fn requests_over_the_count_or_bytes_are_refused_then_cut_off() {
        let mut admission = Admission::new(limits(2, 4, 100));
        assert_eq!(
            request(&mut admission, queued(Some(1), false, 500)),
            Verdict::Admitted,
            "alone"
        );
        assert!(
            refused(request(&mut admission, queued(Some(2), false, 1))),
            "over the bytes"
        );
        admission.done(&queued(Some(1), false, 500).run);
        assert_eq!(
            request(&mut admission, queued(Some(3), false, 50)),
            Verdict::Admitted
        );
        assert_eq!(
            request(&mut admission, queued(Some(4), false, 50)),
            Verdict::Admitted
        );
        assert!(
            refused(request(&mut admission, queued(Some(5), false, 0))),
            "over the count"
        );
        assert!(refused(request(&mut admission, queued(Some(6), false, 0))));
        match request(&mut admission, queued(Some(7), false, 0)) {
            Verdict::CutOff(ProtocolError::AdmissionExceeded { limit, max }) => {
                assert_eq!((limit, max), (Limit::PendingRequests, 2));
            }
            other => panic!("expected a cut-off, got {other:?}"),
        }
    }

    #[test]
    fn a_notification_over_the_window_cuts_off_at_once() {
        let mut admission = Admission::new(limits(2, 1, 1 << 20));
        assert_eq!(
            notification(&mut admission, queued(None, false, 1)),
            Verdict::Admitted
        );
        assert!(matches!(
            notification(&mut admission, queued(None, false, 1)),
            Verdict::CutOff(ProtocolError::AdmissionExceeded {
                limit: Limit::PendingNotifications,
                max: 1
            })
        ));
    }

    #[test]
    fn nested_requests_skip_the_queue_and_have_a_count_of_their_own() {
        let mut admission = Admission::new(limits(1, 1, 1 << 20));
        assert_eq!(
            request(&mut admission, queued(Some(1), false, 0)),
            Verdict::Admitted
        );
        assert_eq!(
            request(&mut admission, queued(Some(2), true, 0)),
            Verdict::Admitted
        );
        assert!(
            refused(request(&mut admission, queued(Some(3), true, 0))),
            "one nested at most"
        );
        let first = admission.next(false).expect("nested starts without a slot");
        assert_eq!(first.run.id, Some(2));
        assert!(admission.next(false).is_none());
        admission.done(&first.run);
        assert_eq!(
            request(&mut admission, queued(Some(4), true, 0)),
            Verdict::Admitted
        );
    }

    #[test]
    fn cancel_and_stop_take_queued_requests_out() {
        let mut admission = Admission::new(limits(4, 4, 1 << 20));
        request(&mut admission, queued(Some(1), false, 10));
        notification(&mut admission, queued(None, false, 5));
        request(&mut admission, queued(Some(2), false, 10));
        assert!(admission.is_queued(1));
        assert!(admission.cancel(1) && !admission.cancel(1));
        assert_eq!(admission.take_queued_requests(), [2]);
        assert_eq!(admission.pending(), (0, 0, 1, 5), "the notification stays");
        assert!(admission.next(true).unwrap().run.id.is_none());
        assert!(admission.is_idle());
    }
}
