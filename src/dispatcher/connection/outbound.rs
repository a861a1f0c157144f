//! Our side: commands from the handles (calls, notifications, cancels, stop, streams).

use super::*;

impl<S> Driver<S>
where
    S: Service<Incoming, Response = Reply>,
    S::Error: IntoHandlerError,
{
    pub(super) fn on_command(&mut self, command: Command) {
        match command {
            Command::Call(call, reply) => {
                if !matches!(self.phase, Phase::Open) {
                    let _ = reply.send(Err(self.terminated()));
                    self.released += usize::from(call.limited);
                    return;
                }
                let limited = call.limited;
                let id = call.id;
                let envelope = Envelope::Request {
                    id,
                    method: call.method,
                    attributes: call.attributes,
                    timeout_us: call.timeout_us,
                    payload: call.payload,
                };
                match self.write(&envelope) {
                    Ok(()) => self.outgoing.insert_request(id, reply, limited),
                    Err(error) => {
                        let _ = reply.send(Err(CallError::Limit(error)));
                        self.released += usize::from(limited);
                    }
                }
            }
            Command::Notify(notification) => {
                self.released += usize::from(notification.limited);
                if !matches!(self.phase, Phase::Open) {
                    tracing::debug!(method = %notification.method, "notification after stop dropped");
                    return;
                }
                let method = notification.method.clone();
                let envelope = Envelope::Notification {
                    method: notification.method,
                    attributes: notification.attributes,
                    payload: notification.payload,
                };
                if let Err(error) = self.write(&envelope) {
                    tracing::warn!(%method, %error, "notification over the peer's frame limit dropped");
                }
            }
            Command::Cancel(id) => {
                if self.outgoing.cancel_request(id) && !matches!(self.phase, Phase::Closing { .. })
                {
                    let _ = self.write(&Envelope::Cancel { id });
                }
            }
            Command::Stop => self.begin_stop(Termination::Stopped),
            Command::OpenStream {
                stream,
                events,
                credit,
            } => {
                if !matches!(self.phase, Phase::Open) {
                    let reason = self.lifecycle.reason_or(Termination::Stopped);
                    let _ = events.send(StreamEvent::Terminated(reason));
                    return;
                }
                self.streams_in.insert(stream, events);
                let _ = self.write(&Envelope::StreamCredit { stream, credit });
            }
            Command::GrantCredit { stream, credit } => {
                if self.streams_in.contains_key(&stream) && matches!(self.phase, Phase::Open) {
                    let _ = self.write(&Envelope::StreamCredit { stream, credit });
                }
            }
            Command::CancelStream { stream } => {
                self.streams_in.remove(&stream);
                if !matches!(self.phase, Phase::Closing { .. }) {
                    let _ = self.write(&Envelope::StreamCancel { stream });
                }
            }
        }
    }
}
