//! A pool of peers (typically worker processes) that spreads calls across them with tower's
//! power-of-two-choices balancer (the `pool` feature).
//!
//! [`Pool::builder`] takes a function that connects worker number `i` (spawns a child process
//! and shakes hands with it, or dials a server) and keeps that many connected: a worker whose
//! connection ends is removed from the balancer at once (its pending calls fail with
//! [`CallError::Terminated`]) and connected again after a back-off that doubles while workers
//! keep dying young. A call goes to the less loaded of two ready workers (tower's
//! `balance::p2c` over `load::PendingRequests`), and waits for a ready worker up to its timeout.
//!
//! Calls that fail because their worker died are not sent again: that is for the caller to
//! decide, for example with a tower `Retry` layer around the pool (a [`Service`] of
//! [`RawCall`]) whose policy retries `Terminated` for calls it knows are idempotent.
//!
//! # Examples
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> Result<(), channel_dispatcher::CallError> {
//! use channel_dispatcher::pool::Pool;
//! use channel_dispatcher::{request, Channel, Dispatcher};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)] struct Hash(Vec<u8>);
//! # request!(Hash => u64, "hash");
//!
//! let pool = Pool::builder().size(4).spawn(|worker: usize| async move {
//!     let mut command = tokio::process::Command::new("my-worker");
//!     command.arg(worker.to_string());
//!     let (channel, _child) = Channel::spawn_child(&mut command)?;
//!     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
//!         Dispatcher::builder().connect(channel).await?,
//!     )
//! });
//! let digest: u64 = pool.request(Hash(b"some bytes".to_vec())).await?;
//! # Ok(())
//! # }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Mutex};
use tower::balance::p2c::Balance;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower_service::Service;

use crate::backoff::Backoff;
use crate::codec::Codec;
use crate::dispatcher::{CallService, Dispatcher, RawCall};
use crate::error::{CallError, Termination};
use crate::message::Request;
use crate::shared::RawResponse;

type Worker = PendingRequests<CallService<RawCall>, CompleteOnResponse>;
type Changes =
    Pin<Box<dyn futures_util::Stream<Item = Result<Change<u64, Worker>, Infallible>> + Send>>;
type Balancer = Balance<Changes, RawCall>;

/// Configures a [`Pool`]; [`spawn`](Self::spawn) starts it.
#[derive(Clone, Debug)]
#[must_use = "a pool builder does nothing until `spawn`"]
pub struct PoolBuilder {
    size: usize,
    timeout: Duration,
    backoff: (Duration, Duration),
}

impl PoolBuilder {
    /// How many workers to keep connected (at least 1). Default: the number of CPUs.
    pub fn size(mut self, workers: usize) -> Self {
        self.size = workers.max(1);
        self
    }

    /// How long a call may take, waiting for a ready worker included. Default: 30 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The shortest and longest pause before a worker is connected again; it doubles while
    /// workers die within 5 s of connecting (or fail to connect). Default: 100 ms to 10 s.
    pub fn backoff(mut self, shortest: Duration, longest: Duration) -> Self {
        self.backoff = (shortest, longest.max(shortest));
        self
    }

    /// Starts the pool on the current tokio runtime: `connect(i)` makes worker `i` (from 0),
    /// now and whenever it must be replaced. Its workers should share one codec.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn<F, Fut, E>(self, connect: F) -> Pool
    where
        F: Fn(usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Dispatcher, E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        let (changes_tx, mut changes_rx) = mpsc::unbounded_channel();
        let changes: Changes = Box::pin(futures_util::stream::poll_fn(move |cx| {
            changes_rx.poll_recv(cx).map(|change| change.map(Ok))
        }));
        let (closing, closed) = watch::channel(false);
        let status = Arc::new(Status {
            codec: watch::channel(None).0,
            live: watch::channel(0).0,
            running: watch::channel(0).0,
            restarts: AtomicU64::new(0),
        });
        let inner = Arc::new(Inner {
            balancer: Mutex::new(Balance::new(changes)),
            status: Arc::clone(&status),
            timeout: self.timeout,
            closing,
        });
        let connect = Arc::new(connect);
        for index in 0..self.size {
            let supervisor = supervise(
                index,
                Arc::clone(&connect),
                changes_tx.clone(),
                Arc::clone(&status),
                closed.clone(),
                self.backoff,
            );
            tokio::spawn(supervisor);
        }
        Pool { inner }
    }
}

/// Worker keys in the balancer: never reused, so a restarted worker is a new endpoint.
static KEYS: AtomicU64 = AtomicU64::new(1);

/// Keeps worker `index` connected until the pool closes (or every `Pool` handle is gone,
/// which drops the closing watch's sender).
async fn supervise<F, Fut, E>(
    index: usize,
    connect: Arc<F>,
    changes: mpsc::UnboundedSender<Change<u64, Worker>>,
    pool: Arc<Status>,
    mut closed: watch::Receiver<bool>,
    backoff: (Duration, Duration),
) where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Dispatcher, E>> + Send + 'static,
    E: fmt::Display + Send + 'static,
{
    let mut backoff = Backoff::new(backoff.0, backoff.1);
    let mut first = true;
    while !*closed.borrow() {
        if !first {
            pool.restarts.fetch_add(1, Ordering::Relaxed);
            let wait = std::pin::pin!(tokio::time::sleep(backoff.jittered()));
            let close = std::pin::pin!(closed.wait_for(|closed| *closed));
            if let futures_util::future::Either::Right(_) =
                futures_util::future::select(wait, close).await
            {
                return;
            }
        }
        first = false;
        let started = tokio::time::Instant::now();
        // Counted from the start, so that `close` waits for a worker still starting.
        let _running = Running::new(&pool.running);
        let connecting = {
            let connecting = std::pin::pin!(connect(index));
            let close = std::pin::pin!(closed.wait_for(|closed| *closed));
            match futures_util::future::select(connecting, close).await {
                futures_util::future::Either::Left((connected, _)) => connected,
                futures_util::future::Either::Right(_) => return,
            }
        };
        let worker = match connecting {
            Ok(worker) => worker,
            Err(error) => {
                tracing::warn!(worker = index, %error, retry_in = ?backoff.pause(), "a worker failed to start");
                backoff.failed();
                continue;
            }
        };
        if closed.has_changed().is_err() || *closed.borrow() {
            worker.stop().await;
            return;
        }
        pool.codec
            .send_if_modified(|codec| codec.replace(worker.codec()).is_none());
        let key = KEYS.fetch_add(1, Ordering::Relaxed);
        let service =
            PendingRequests::new(worker.service::<RawCall>(), CompleteOnResponse::default());
        if changes.send(Change::Insert(key, service)).is_err() {
            worker.stop().await;
            return;
        }
        pool.live.send_modify(|live| *live += 1);
        tracing::debug!(worker = index, key, "a worker joined the pool");
        let ended = {
            let end = std::pin::pin!(worker.closed());
            let close = std::pin::pin!(closed.wait_for(|closed| *closed));
            match futures_util::future::select(end, close).await {
                futures_util::future::Either::Left((reason, _)) => Some(reason),
                futures_util::future::Either::Right(_) => None,
            }
        };
        let _ = changes.send(Change::Remove(key));
        pool.live.send_modify(|live| *live -= 1);
        let Some(reason) = ended else {
            worker.stop().await;
            return;
        };
        tracing::warn!(worker = index, %reason, "a worker left the pool: connecting another");
        backoff.lived(started.elapsed());
    }
}

/// One worker starting, connected or stopping, for [`Pool::close`] to wait for.
struct Running<'a>(&'a watch::Sender<usize>);

impl<'a> Running<'a> {
    fn new(running: &'a watch::Sender<usize>) -> Self {
        running.send_modify(|running| *running += 1);
        Self(running)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|running| *running -= 1);
    }
}

/// Workers behind one balancer: see the [module docs](self). Cloning it is cheap; every clone
/// calls the same workers.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    balancer: Mutex<Balancer>,
    status: Arc<Status>,
    timeout: Duration,
    closing: watch::Sender<bool>,
}

/// What the supervisors share with the handles (not the balancer: when the last handle goes,
/// the balancer and the closing watch go with it, and the supervisors stop their workers).
struct Status {
    /// The workers' codec, once one connected.
    codec: watch::Sender<Option<Codec>>,
    /// Workers connected now.
    live: watch::Sender<usize>,
    /// Workers starting, connected or stopping.
    running: watch::Sender<usize>,
    restarts: AtomicU64,
}

impl Pool {
    /// A pool with the default settings, to configure.
    pub fn builder() -> PoolBuilder {
        PoolBuilder {
            size: std::thread::available_parallelism().map_or(1, usize::from),
            timeout: Duration::from_secs(30),
            backoff: (Duration::from_millis(100), Duration::from_secs(10)),
        }
    }

    /// Sends `request` to the less loaded of two ready workers and returns its answer.
    ///
    /// # Errors
    /// As [`Dispatcher::request`]; [`CallError::Timeout`] when no worker was ready in time.
    pub async fn request<R: Request>(&self, request: R) -> Result<R::Response, CallError> {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let codec = self.codec(deadline).await?;
        let payload = codec.encode(&request).map_err(CallError::Encode)?;
        let answer = self
            .call_by(RawCall::new(R::METHOD, payload), deadline)
            .await?;
        answer.decode().map_err(CallError::Decode)
    }

    /// Sends an untyped request (its payload encoded with the workers' codec).
    ///
    /// # Errors
    /// As [`request`](Self::request).
    pub async fn call_raw(&self, call: RawCall) -> Result<RawResponse, CallError> {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        self.call_by(call, deadline).await
    }

    /// One call, waiting for a ready worker, answered by `deadline`.
    async fn call_by(
        &self,
        call: RawCall,
        deadline: tokio::time::Instant,
    ) -> Result<RawResponse, CallError> {
        let timeout = self.inner.timeout;
        let mut closed = self.inner.closing.subscribe();
        let answer = async {
            let sent = {
                let mut balancer = self.inner.balancer.lock().await;
                // A close while this call waits for a worker ends the wait.
                let ready = std::pin::pin!(std::future::poll_fn(|cx| balancer.poll_ready(cx)));
                let close = std::pin::pin!(closed.wait_for(|closed| *closed));
                match futures_util::future::select(ready, close).await {
                    futures_util::future::Either::Left((ready, _)) => {
                        ready.map_err(into_call_error)?
                    }
                    futures_util::future::Either::Right(_) => {
                        return Err(CallError::Terminated(Termination::Stopped))
                    }
                }
                balancer.call(call)
            };
            sent.await.map_err(into_call_error)
        };
        if *self.inner.closing.borrow() {
            return Err(CallError::Terminated(Termination::Stopped));
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(answer) => answer,
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }

    /// How many workers are connected now.
    pub fn workers(&self) -> usize {
        *self.inner.status.live.borrow()
    }

    /// How many times a worker was connected again (after its end or a failed start).
    pub fn restarts(&self) -> u64 {
        self.inner.status.restarts.load(Ordering::Relaxed)
    }

    /// Stops every worker and connects no more; calls made after fail.
    pub async fn close(&self) {
        self.inner.closing.send_replace(true);
        let mut running = self.inner.status.running.subscribe();
        let _ = running.wait_for(|running| *running == 0).await;
    }

    /// The workers' codec, known once one has connected.
    async fn codec(&self, deadline: tokio::time::Instant) -> Result<Codec, CallError> {
        let mut codec = self.inner.status.codec.subscribe();
        let known = async {
            codec
                .wait_for(Option::is_some)
                .await
                .map(|codec| codec.expect("waited for it"))
        };
        match tokio::time::timeout_at(deadline, known).await {
            Ok(Ok(codec)) => Ok(codec),
            Ok(Err(_)) => Err(CallError::Terminated(Termination::Stopped)),
            Err(_) => Err(CallError::Timeout(self.inner.timeout)),
        }
    }
}

/// The balancer boxes its services' errors: they are `CallError`s.
fn into_call_error(error: tower::BoxError) -> CallError {
    match error.downcast::<CallError>() {
        Ok(error) => *error,
        // Not reached: discovery cannot fail, and the workers' errors are `CallError`s.
        Err(other) => {
            tracing::error!(error = %other, "the pool's balancer failed");
            CallError::Terminated(Termination::Closed)
        }
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.workers())
            .field("restarts", &self.restarts())
            .finish_non_exhaustive()
    }
}

/// The pool as a tower [`Service`] of raw calls, for layers around it (a `Retry` for
/// idempotent calls, a `Timeout`...). It is always ready: a call waits for a ready worker.
impl Service<RawCall> for Pool {
    type Response = RawResponse;
    type Error = CallError;
    type Future = Pin<Box<dyn Future<Output = Result<RawResponse, CallError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: RawCall) -> Self::Future {
        let pool = self.clone();
        Box::pin(async move { pool.call_raw(call).await })
    }
}
