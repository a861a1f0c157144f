//! A client that keeps its link to a server up: [`Reconnecting`] connects again, with
//! exponential back-off and jitter, whenever the connection ends.
//!
//! What it promises:
//! - a call pending when the link drops fails with [`CallError::Terminated`] (the reason says how
//!   the link ended); it is **never sent again** silently, since it may have run;
//! - a call made while the link is down waits for the next link, up to its timeout;
//! - the `on_connect` hook runs on every new link before any call uses it (to subscribe again,
//!   to send a hello of the application's own).
//!
//! # Examples
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> Result<(), channel_dispatcher::CallError> {
//! use channel_dispatcher::reconnect::Reconnecting;
//! use channel_dispatcher::{request, Channel, Dispatcher};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)] struct Subscribe(String);
//! # request!(Subscribe => (), "subscribe");
//! # #[derive(Serialize, Deserialize)] struct Ping;
//! # request!(Ping => (), "ping");
//!
//! let client = Reconnecting::builder()
//!     .on_connect(|link: Dispatcher| async move {
//!         link.request(Subscribe("prices".into())).await
//!     })
//!     .connect(|| async {
//!         let channel = Channel::connect("tcp:127.0.0.1:7000").await?;
//!         Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
//!             Dispatcher::builder().connect(channel).await?,
//!         )
//!     });
//! client.request(Ping).await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{select, Either};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::dispatcher::Dispatcher;
use crate::error::{CallError, Termination};
use crate::message::{Notification, Request};
use crate::shared::RawResponse;

type OnConnect = Arc<
    dyn Fn(Dispatcher) -> Pin<Box<dyn Future<Output = Result<(), CallError>> + Send>> + Send + Sync,
>;

/// Configures a [`Reconnecting`] client; [`connect`](Self::connect) starts it.
#[must_use = "a builder does nothing until `connect`"]
pub struct ReconnectingBuilder {
    backoff: (Duration, Duration),
    timeout: Duration,
    on_connect: Option<OnConnect>,
}

impl fmt::Debug for ReconnectingBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReconnectingBuilder")
            .field("backoff", &self.backoff)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ReconnectingBuilder {
    /// The shortest and longest pause between attempts to connect; it doubles after each
    /// failed attempt (and each link that lasted under 5 s), with jitter. Default: 100 ms to
    /// 10 s.
    pub fn backoff(mut self, shortest: Duration, longest: Duration) -> Self {
        self.backoff = (shortest, longest.max(shortest));
        self
    }

    /// How long a call may take, waiting for a link included. Default: 30 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs on every new link before calls use it; a failure ends that link and a new one
    /// is tried.
    pub fn on_connect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Dispatcher) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), CallError>> + Send + 'static,
    {
        self.on_connect = Some(Arc::new(move |link| Box::pin(hook(link))));
        self
    }

    /// Starts connecting, on the current tokio runtime, with `connect` (now and after every
    /// end of the link).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn connect<F, Fut, E>(self, connect: F) -> Reconnecting
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Dispatcher, E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        let (link, _) = watch::channel(Link::Down);
        let connections = Arc::new(AtomicU64::new(0));
        tokio::spawn(keep_up(
            link.clone(),
            Arc::clone(&connections),
            connect,
            self.on_connect,
            self.backoff,
            self.timeout,
        ));
        let inner = Arc::new(Inner {
            link,
            timeout: self.timeout,
            connections,
        });
        Reconnecting { inner }
    }
}

#[derive(Clone)]
enum Link {
    Down,
    Up(Dispatcher),
    Closed,
}

struct Inner {
    link: watch::Sender<Link>,
    timeout: Duration,
    connections: Arc<AtomicU64>,
}

/// The last handle gone: the supervisor stops the link and connects no more.
impl Drop for Inner {
    fn drop(&mut self) {
        self.link.send_replace(Link::Closed);
    }
}

/// Connects, publishes the link, waits for its end, and again, until closed.
async fn keep_up<F, Fut, E>(
    published: watch::Sender<Link>,
    connections: Arc<AtomicU64>,
    connect: F,
    on_connect: Option<OnConnect>,
    backoff: (Duration, Duration),
    timeout: Duration,
) where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Dispatcher, E>> + Send + 'static,
    E: fmt::Display + Send + 'static,
{
    let mut closed = published.subscribe();
    let mut backoff = Backoff::new(backoff.0, backoff.1);
    let mut attempt: u64 = 0;
    loop {
        if matches!(*closed.borrow(), Link::Closed) {
            return;
        }
        if attempt > 0 {
            let wait = std::pin::pin!(tokio::time::sleep(backoff.jittered()));
            let close = std::pin::pin!(closed.wait_for(|link| matches!(link, Link::Closed)));
            if let Either::Right(_) = select(wait, close).await {
                return;
            }
        }
        attempt += 1;
        let connecting = {
            let connecting = std::pin::pin!(connect());
            let close = std::pin::pin!(closed.wait_for(|link| matches!(link, Link::Closed)));
            match select(connecting, close).await {
                Either::Left((connected, _)) => connected,
                Either::Right(_) => return,
            }
        };
        let link = match connecting {
            Ok(link) => link,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff.pause(), "connecting failed");
                backoff.failed();
                continue;
            }
        };
        if let Some(hook) = &on_connect {
            // Within the client's timeout, and not past a close.
            let hooked = {
                let hooked = std::pin::pin!(tokio::time::timeout(timeout, hook(link.clone())));
                let close = std::pin::pin!(closed.wait_for(|link| matches!(link, Link::Closed)));
                match select(hooked, close).await {
                    Either::Left((hooked, _)) => Some(hooked),
                    Either::Right(_) => None,
                }
            };
            let failure = match hooked {
                None => {
                    link.stop().await;
                    return;
                }
                Some(Ok(Ok(()))) => None,
                Some(Ok(Err(error))) => Some(error.to_string()),
                Some(Err(_)) => Some(format!("it took more than {timeout:?}")),
            };
            if let Some(error) = failure {
                tracing::warn!(%error, "the on_connect hook failed: connecting again");
                link.stop().await;
                backoff.failed();
                continue;
            }
        }
        let started = tokio::time::Instant::now();
        connections.fetch_add(1, Ordering::Relaxed);
        let up = published.send_if_modified(|current| match current {
            Link::Closed => false,
            _ => {
                *current = Link::Up(link.clone());
                true
            }
        });
        if !up {
            link.stop().await;
            return;
        }
        tracing::debug!("link up");
        let end = {
            let ended = std::pin::pin!(link.closed());
            let close = std::pin::pin!(closed.wait_for(|link| matches!(link, Link::Closed)));
            match select(ended, close).await {
                Either::Left((reason, _)) => Some(reason),
                Either::Right(_) => None,
            }
        };
        let Some(reason) = end else {
            link.stop().await;
            return;
        };
        published.send_if_modified(|current| match current {
            Link::Up(_) => {
                *current = Link::Down;
                true
            }
            _ => false,
        });
        tracing::warn!(%reason, "the link was lost: connecting again");
        backoff.lived(started.elapsed());
    }
}

/// A client whose link to the server is kept up: see the [module docs](self). Cloning it is
/// cheap; clones share the link.
#[derive(Clone)]
pub struct Reconnecting {
    inner: Arc<Inner>,
}

impl fmt::Debug for Reconnecting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconnecting")
            .field("connected", &self.current().is_some())
            .field("connections", &self.connections())
            .finish()
    }
}

impl Reconnecting {
    /// A client with the default settings, to configure.
    pub fn builder() -> ReconnectingBuilder {
        ReconnectingBuilder {
            backoff: (Duration::from_millis(100), Duration::from_secs(10)),
            timeout: Duration::from_secs(30),
            on_connect: None,
        }
    }

    /// The current link, if it is up.
    pub fn current(&self) -> Option<Dispatcher> {
        match &*self.inner.link.borrow() {
            Link::Up(link) if !link.is_stopping() => Some(link.clone()),
            _ => None,
        }
    }

    /// How many links were made so far.
    pub fn connections(&self) -> u64 {
        self.inner.connections.load(Ordering::Relaxed)
    }

    /// Waits for a link, up to `timeout`.
    async fn link(&self, timeout: Duration) -> Result<Dispatcher, CallError> {
        let mut link = self.inner.link.subscribe();
        let up = async {
            loop {
                match &*link.borrow_and_update() {
                    Link::Up(up) if !up.is_stopping() => return Ok(up.clone()),
                    Link::Closed => return Err(CallError::Terminated(Termination::Stopped)),
                    _ => {}
                }
                if link.changed().await.is_err() {
                    return Err(CallError::Terminated(Termination::Stopped));
                }
            }
        };
        match tokio::time::timeout(timeout, up).await {
            Ok(link) => link,
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }

    /// Sends `request` on the current link (waiting for one if it is down), within the
    /// client's timeout.
    ///
    /// # Errors
    /// As [`Dispatcher::request`]: [`CallError::Terminated`] when the link dropped before the
    /// answer (the request is not sent again), [`CallError::Timeout`] when no link came up
    /// or no answer arrived in time.
    pub async fn request<R: Request>(&self, request: R) -> Result<R::Response, CallError> {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let link = self.link(self.inner.timeout).await?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        link.request(request).timeout_at_most(Some(left)).await
    }

    /// As [`request`](Self::request), untyped.
    ///
    /// # Errors
    /// As [`request`](Self::request).
    pub async fn call_raw(
        &self,
        method: impl Into<String>,
        payload: Bytes,
    ) -> Result<RawResponse, CallError> {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let link = self.link(self.inner.timeout).await?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        link.call_raw(method, payload)
            .timeout_at_most(Some(left))
            .await
    }

    /// Sends a notification on the current link, waiting for one if it is down.
    ///
    /// # Errors
    /// As [`Dispatcher::notify`]; [`CallError::Timeout`] when no link came up in time.
    pub async fn notify<N: Notification>(&self, notification: N) -> Result<(), CallError> {
        let timeout = self.inner.timeout;
        let sent = async { self.link(timeout).await?.notify(notification).await };
        tokio::time::timeout(timeout, sent)
            .await
            .unwrap_or(Err(CallError::Timeout(timeout)))
    }

    /// Stops the current link and connects no more; calls made after fail.
    pub async fn close(&self) {
        let previous = self.inner.link.send_replace(Link::Closed);
        if let Link::Up(link) = previous {
            link.stop().await;
        }
    }
}
