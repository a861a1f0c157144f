//! A child process as the peer ([`Channel::spawn_child`](super::Channel::spawn_child)): its
//! standard input and output carry the channel, and a task waits for it to exit, so that the
//! parent can collect its status and a connection that loses the child says how it ended
//! ("the child process exited (signal: 9)") instead of "broken pipe".

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::process::ExitStatus;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, watch};

/// How long a pipe that closed or failed waits for the child's exit status before it reports
/// the plain end of file or error (the exit is usually seen within milliseconds of the pipe
/// closing; a child that closes its output and lives on costs this much once).
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// How long a child that nobody holds any more (its [`ChildProcess`] dropped, its connection
/// ended, so its standard input closed) has to exit by itself before it is killed.
const ORPHAN_GRACE: Duration = Duration::from_secs(5);

/// The error a child's pipe fails with once the child has exited: the connection turns it
/// into [`Termination::ChildExited`](crate::Termination::ChildExited).
#[derive(Debug, thiserror::Error)]
#[error("the child process exited ({0})")]
pub(crate) struct ChildExited(pub(crate) ExitStatus);

/// What the handle and both pipes share with the watching task.
#[derive(Clone, Debug)]
struct Exit {
    status: watch::Receiver<Option<ExitStatus>>,
    /// Kill requests; the task sees the child orphaned once every sender is gone.
    control: mpsc::Sender<()>,
}

impl Exit {
    /// The exit status, if it comes within `grace`.
    fn status_within(
        &self,
        grace: Duration,
    ) -> Pin<Box<dyn Future<Output = Option<ExitStatus>> + Send>> {
        let mut status = self.status.clone();
        Box::pin(async move {
            let exited = tokio::time::timeout(grace, status.wait_for(Option::is_some));
            match exited.await {
                Ok(Ok(status)) => *status,
                _ => None,
            }
        })
    }
}

/// The child process of a [`Channel::spawn_child`](super::Channel::spawn_child) channel.
///
/// The connection owns the child: it runs for as long as the connection does, and dropping
/// this handle neither kills it nor stops the connection. When the connection ends, the
/// child's standard input closes and it is expected to exit (a child built on
/// [`Channel::stdio`](super::Channel::stdio) does); one that is still running
/// 5 s after both this handle and its connection are gone is killed. Keep the handle to learn
/// its id, to [`wait`](Self::wait) for its exit status after `stop()`, or to
/// [`start_kill`](Self::start_kill) it.
///
/// If the child exits without saying goodbye, the connection ends with
/// [`Termination::ChildExited`](crate::Termination::ChildExited), which carries the status.
#[derive(Debug)]
pub struct ChildProcess {
    id: Option<u32>,
    exit: Exit,
}

impl ChildProcess {
    /// The child's process id (`None` if it had already exited when it was spawned).
    pub fn id(&self) -> Option<u32> {
        self.id
    }

    /// Waits for the child to exit and returns its status (at once if it has).
    ///
    /// # Errors
    /// If the status could not be collected (the operating system's wait failed, or the
    /// runtime that watched the child shut down).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self.exit.status.wait_for(Option::is_some).await {
            Ok(status) => Ok(status.expect("waited for a status")),
            Err(_) => Err(io::Error::other(
                "the child's exit status could not be collected: waiting for it failed or its \
                 runtime shut down",
            )),
        }
    }

    /// The child's exit status, if it has exited.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        *self.exit.status.borrow()
    }

    /// Starts killing the child (`SIGKILL` on Unix) without waiting for it to exit; nothing
    /// happens if it already has. Its connection then ends with
    /// [`Termination::ChildExited`](crate::Termination::ChildExited).
    pub fn start_kill(&self) {
        let _ = self.exit.control.try_send(());
    }
}

/// Takes over `child` (spawned with piped standard input and output): returns the pipes,
/// wrapped to report its exit, and its handle.
pub(super) fn watch(mut child: Child) -> io::Result<(ChildReader, ChildWriter, ChildProcess)> {
    let missing = || io::Error::other("child standard input/output not piped");
    let stdin = child.stdin.take().ok_or_else(missing)?;
    let stdout = child.stdout.take().ok_or_else(missing)?;
    let (status_tx, status_rx) = watch::channel(None);
    let (control_tx, control_rx) = mpsc::channel(1);
    let id = child.id();
    tokio::spawn(watch_child(child, status_tx, control_rx));
    let exit = Exit {
        status: status_rx,
        control: control_tx,
    };
    Ok((
        ChildReader {
            pipe: stdout,
            ended: Ended::new(exit.clone()),
        },
        ChildWriter {
            pipe: stdin,
            ended: Ended::new(exit.clone()),
        },
        ChildProcess { id, exit },
    ))
}

enum Event {
    Exited(io::Result<ExitStatus>),
    Kill,
    Orphaned,
    OrphanTimedOut,
}

/// Waits for the child to exit and publishes its status; kills it on request, or once it is
/// orphaned and has not exited within [`ORPHAN_GRACE`].
async fn watch_child(
    mut child: Child,
    status: watch::Sender<Option<ExitStatus>>,
    mut control: mpsc::Receiver<()>,
) {
    let mut reachable = true;
    let mut orphan_deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let event = {
            let mut wait = pin!(child.wait());
            poll_fn(|cx| {
                if let Poll::Ready(result) = wait.as_mut().poll(cx) {
                    return Poll::Ready(Event::Exited(result));
                }
                if reachable {
                    match control.poll_recv(cx) {
                        Poll::Ready(Some(())) => return Poll::Ready(Event::Kill),
                        Poll::Ready(None) => return Poll::Ready(Event::Orphaned),
                        Poll::Pending => {}
                    }
                }
                if let Some(deadline) = orphan_deadline.as_mut() {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::OrphanTimedOut);
                    }
                }
                Poll::Pending
            })
            .await
        };
        match event {
            Event::Exited(Ok(exit)) => {
                tracing::debug!(status = %exit, "child process exited");
                status.send_replace(Some(exit));
                return;
            }
            Event::Exited(Err(e)) => {
                tracing::warn!(error = %e, "waiting for the child process failed");
                return;
            }
            Event::Kill => {
                let _ = child.start_kill();
            }
            Event::Orphaned => {
                reachable = false;
                orphan_deadline = Some(Box::pin(tokio::time::sleep(ORPHAN_GRACE)));
            }
            Event::OrphanTimedOut => {
                tracing::warn!(
                    grace = ?ORPHAN_GRACE,
                    "the child process did not exit after its connection ended: killing it"
                );
                orphan_deadline = None;
                let _ = child.start_kill();
            }
        }
    }
}

/// A pipe's end (end of file or an error), held back until the child's exit status is known
/// or [`EXIT_GRACE`] has passed.
struct Ended {
    exit: Exit,
    waiting: Option<Pin<Box<dyn Future<Output = Option<ExitStatus>> + Send>>>,
    /// The pipe's own error, reported if the child has not exited.
    error: Option<io::Error>,
}

impl Ended {
    fn new(exit: Exit) -> Self {
        Self {
            exit,
            waiting: None,
            error: None,
        }
    }

    fn start(&mut self, error: Option<io::Error>) {
        self.error = error;
        self.waiting = Some(self.exit.status_within(EXIT_GRACE));
    }

    /// The child's exit as an error, or else the pipe's own error (`None`: its end of file).
    fn poll(&mut self, cx: &mut TaskContext<'_>, kind: io::ErrorKind) -> Poll<Option<io::Error>> {
        let waiting = self.waiting.as_mut().expect("started");
        let status = ready!(waiting.as_mut().poll(cx));
        self.waiting = None;
        let exited = status.map(|status| io::Error::new(kind, ChildExited(status)));
        Poll::Ready(exited.or_else(|| self.error.take()))
    }
}

/// The child's standard output: its end of file (or failure) is reported as the child's exit
/// when the child has exited.
pub(super) struct ChildReader {
    pipe: ChildStdout,
    ended: Ended,
}

impl AsyncRead for ChildReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ended.waiting.is_none() {
            let before = buf.filled().len();
            match ready!(Pin::new(&mut this.pipe).poll_read(cx, buf)) {
                Ok(()) if buf.filled().len() > before || buf.remaining() == 0 => {
                    return Poll::Ready(Ok(()))
                }
                Ok(()) => this.ended.start(None),
                Err(e) => this.ended.start(Some(e)),
            }
        }
        match ready!(this.ended.poll(cx, io::ErrorKind::UnexpectedEof)) {
            Some(error) => Poll::Ready(Err(error)),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// The child's standard input: a write that fails because the child has exited reports its
/// exit.
pub(super) struct ChildWriter {
    pipe: ChildStdin,
    ended: Ended,
}

impl ChildWriter {
    fn poll_io<T>(
        &mut self,
        cx: &mut TaskContext<'_>,
        op: impl FnOnce(Pin<&mut ChildStdin>, &mut TaskContext<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.ended.waiting.is_none() {
            match ready!(op(Pin::new(&mut self.pipe), cx)) {
                Ok(value) => return Poll::Ready(Ok(value)),
                Err(e) => self.ended.start(Some(e)),
            }
        }
        let error = ready!(self.ended.poll(cx, io::ErrorKind::BrokenPipe));
        Poll::Ready(Err(
            error.unwrap_or_else(|| io::ErrorKind::BrokenPipe.into())
        ))
    }
}

impl AsyncWrite for ChildWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_io(cx, |pipe, cx| pipe.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_io(cx, |pipe, cx| pipe.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.pipe.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_io(cx, |pipe, cx| pipe.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_io(cx, |pipe, cx| pipe.poll_shutdown(cx))
    }
}
