//! The per-message [`Context`] handlers receive, and the [`ContextFactory`] hook that prepares it.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::IntoFuture;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::time::Instant;

use crate::codec::Codec;
use crate::dispatcher::{send_notification, Call, Dispatcher, RequestOver};
use crate::envelope::Method;
use crate::error::{CallError, CodecError, HandlerError, Termination};
use crate::message::{Attributes, Notification, Request, StreamRequest};
use crate::peer::PeerInfo;
use crate::shared::{Permit, Shared};
use crate::stream::RemoteStream;
use crate::stream::Streams;

/// What a handler knows about the message it handles, and its way back to the peer.
///
/// It holds the dispatcher weakly: a handler never keeps a
/// connection alive. Nested calls through it go to the peer that sent the message, and may be
/// made while the peer waits for this handler's answer.
///
/// # Examples
/// ```
/// use channel_dispatcher::{request, Context, Router};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct Outer(u32);
/// # #[derive(Serialize, Deserialize)] struct Inner(u32);
/// # request!(Outer => u32, "outer");
/// # request!(Inner => u32, "inner");
///
/// // Answer `Outer` by asking the peer an `Inner` question first.
/// let router = Router::new().request(|cx: Context, Outer(n)| async move {
///     let m = cx.request(Inner(n)).await?;
///     Ok(m * 2)
/// });
/// ```
#[derive(Clone)]
pub struct Context {
    shared: Weak<Shared>,
    codec: Codec,
    id: Option<u64>,
    method: Method,
    attributes: Attributes,
    deadline: Option<Instant>,
    over: Option<RequestOver>,
    extensions: Extensions,
}

impl Context {
    pub(crate) fn new(
        shared: Weak<Shared>,
        codec: Codec,
        id: Option<u64>,
        method: Method,
        attributes: Attributes,
        deadline: Option<Instant>,
        over: Option<RequestOver>,
    ) -> Self {
        Self {
            shared,
            codec,
            id,
            method,
            attributes,
            deadline,
            over,
            extensions: Extensions::default(),
        }
    }

    pub(crate) fn detached(method: String, id: Option<u64>, codec: Codec) -> Self {
        Self::new(
            Weak::new(),
            codec,
            id,
            Method::from(method),
            Attributes::new(),
            None,
            None,
        )
    }

    /// The dispatcher, unless every handle is gone and the connection is ending.
    pub fn dispatcher(&self) -> Option<Dispatcher> {
        self.shared.upgrade().map(Dispatcher::from_shared)
    }

    /// Sends a nested request to the peer. It inherits this message's deadline: its timeout
    /// is at most the time left.
    ///
    /// While this handler runs, the peer admits the nested request outside its handler limit
    /// and its request window ([`Limits::max_nested_requests`](crate::Limits::max_nested_requests)),
    /// and it takes none of this side's in-flight permits, so a chain of calls back and forth
    /// completes however busy both sides are. Each level of nesting takes one of the receiving
    /// side's `max_nested_requests` while it runs. A handler's nested calls beyond them wait
    /// for its earlier ones (fanning out never fails); a chain deeper than them is refused at
    /// its deepest call ([`code::OVERLOADED`](crate::error::code::OVERLOADED)), never left
    /// waiting.
    ///
    /// Make calls from a handler through its context: a call through
    /// [`dispatcher()`](Self::dispatcher) is an ordinary one, which waits for permits and room
    /// that the very call waiting for this handler may hold.
    pub fn request<R: Request>(&self, request: R) -> Call<R::Response> {
        let call = match self.dispatcher() {
            Some(dispatcher) => dispatcher.request(request),
            None => Call::new(
                Err(Termination::Dropped),
                Method::from_static(R::METHOD),
                self.codec.encode(&request),
                |codec, raw| codec.decode(&raw.payload).map_err(CallError::Decode),
            ),
        };
        call.nested(self.id).timeout_at_most(self.remaining())
    }

    /// Opens a remote stream from the peer, as [`Dispatcher::stream`] does, nested in this
    /// message's request like [`request`](Self::request): the opening call and every pull of
    /// the stream.
    pub fn stream<R: StreamRequest>(&self, request: R) -> RemoteStream<R::Item> {
        let Some(shared) = self.shared.upgrade() else {
            return RemoteStream::failed(CallError::Terminated(Termination::Dropped));
        };
        let parent = self.id;
        let answer = Call::new(
            Ok(Arc::clone(&shared)),
            Method::from_static(R::METHOD),
            self.codec.encode(&request),
            |codec, raw| codec.decode::<u64>(&raw.payload).map_err(CallError::Decode),
        )
        .nested(parent)
        .timeout_at_most(self.remaining())
        .into_future();
        let window = shared.stream_window;
        RemoteStream::opening(shared, answer, window, parent)
    }

    /// Sends a notification to the peer. It takes none of the handles' in-flight permits
    /// (calls waiting for this very handler may hold them all) but one of as many of its own,
    /// given back once it is written.
    ///
    /// # Errors
    /// As [`Dispatcher::notify`].
    pub async fn notify<N: Notification>(&self, notification: N) -> Result<(), CallError> {
        let Some(dispatcher) = self.dispatcher() else {
            return Err(CallError::Terminated(Termination::Dropped));
        };
        let payload = self
            .codec
            .encode(&notification)
            .map_err(CallError::Encode)?;
        let method = Method::from_static(N::METHOD);
        let attributes = Attributes::new();
        send_notification(
            dispatcher.shared(),
            method,
            attributes,
            payload,
            Permit::Handler,
        )
        .await
    }

    /// The request id; `None` for a notification.
    pub fn id(&self) -> Option<u64> {
        self.id
    }

    /// The method name.
    pub fn method(&self) -> &str {
        self.method.as_str()
    }

    /// The attributes that came with the message.
    pub fn attributes(&self) -> &Attributes {
        &self.attributes
    }

    /// The attributes, mutably.
    pub fn attributes_mut(&mut self) -> &mut Attributes {
        &mut self.attributes
    }

    /// When the caller stops waiting, if it set a timeout.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left until the deadline (zero once passed); `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// `true` once the request is over: the peer cancelled it, its deadline passed, the
    /// connection ended, or its handler has returned.
    ///
    /// The handler's own future is simply dropped when it is cancelled; this is for the work it
    /// hands to other tasks (`tokio::spawn`, `spawn_blocking`), which should stop once the
    /// request is over. A context built by hand ([`Incoming::new`](crate::Incoming::new)) is
    /// never over.
    pub fn is_cancelled(&self) -> bool {
        self.over.as_ref().is_some_and(RequestOver::is_over)
    }

    /// Resolves once the request is over (see [`is_cancelled`](Self::is_cancelled)).
    ///
    /// # Examples
    /// ```
    /// use channel_dispatcher::{request, Context, Router};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Serialize, Deserialize)] struct Crunch;
    /// # request!(Crunch => u64, "crunch");
    ///
    /// let router = Router::new().request(|cx: Context, _: Crunch| async move {
    ///     let work = tokio::spawn({
    ///         let cx = cx.clone();
    ///         async move {
    ///             tokio::select! {
    ///                 _ = cx.cancelled() => None,          // the caller gave up: stop
    ///                 n = async { 42u64 } => Some(n),     // the real work
    ///             }
    ///         }
    ///     });
    ///     Ok(work.await.ok().flatten().unwrap_or_default())
    /// });
    /// ```
    pub async fn cancelled(&self) {
        match &self.over {
            Some(over) => over.wait().await,
            None => std::future::pending().await,
        }
    }

    /// The connection's stream storage, to offer the peer a
    /// stream by id; `None` once the dispatcher is gone.
    pub fn streams(&self) -> Option<Streams> {
        self.shared
            .upgrade()
            .map(|shared| shared.lifecycle.streams.clone())
    }

    /// The connection's codec.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Encodes a value with the connection's codec (for [`Reply::value`](crate::Reply::value)
    /// and error data).
    ///
    /// # Errors
    /// A [`CodecError`] when serde refuses the value.
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError> {
        self.codec.encode(value)
    }

    /// The state of type `T` the router was given with
    /// [`Router::with_state`](crate::Router::with_state) (or that a middleware or the
    /// [`ContextFactory`] attached to this message).
    ///
    /// # Errors
    /// An internal error naming the type when there is none, so that `cx.state::<T>()?`
    /// answers the caller instead of panicking.
    ///
    /// # Examples
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use channel_dispatcher::{request, Context, Router};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Serialize, Deserialize)] struct Hit;
    /// # request!(Hit => u64, "hit");
    ///
    /// struct Counter(AtomicU64);
    ///
    /// let router = Router::new()
    ///     .with_state(Counter(AtomicU64::new(0)))
    ///     .request(|cx: Context, Hit| async move {
    ///         let counter = cx.state::<Counter>()?;
    ///         Ok(counter.0.fetch_add(1, Ordering::Relaxed) + 1)
    ///     });
    /// ```
    pub fn state<T: Send + Sync + 'static>(&self) -> Result<&T, HandlerError> {
        self.extensions.get::<T>().ok_or_else(|| {
            HandlerError::internal(format!(
                "the handler of `{}` needs state of type `{}`, which the router was not given: \
                 add it with `Router::with_state`",
                self.method(),
                std::any::type_name::<T>()
            ))
        })
    }

    /// What is known about the peer that sent this message: its address and the identity the
    /// handshake's [`Authenticator`](crate::Authenticator) gave it. `None` outside a
    /// connection (a context built for a test).
    ///
    /// # Examples
    /// ```
    /// use channel_dispatcher::{request, Context, HandlerError, Router};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Serialize, Deserialize)] struct WhoAmI;
    /// # request!(WhoAmI => String, "whoami");
    ///
    /// let router = Router::new().request(|cx: Context, WhoAmI| async move {
    ///     let peer = cx.peer().ok_or_else(|| HandlerError::internal("no peer"))?;
    ///     Ok(peer.identity().map_or("anonymous".to_owned(), |id| id.to_string()))
    /// });
    /// ```
    pub fn peer(&self) -> Option<&PeerInfo> {
        self.extensions.get::<PeerInfo>()
    }

    /// Typed values attached by middleware or the [`ContextFactory`], and the router's state.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The extensions, mutably.
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.id)
            .field("method", &self.method)
            .field("attributes", &self.attributes)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// A map from type to value: the state a [`Router`](crate::Router) shares with its handlers
/// ([`Router::with_state`](crate::Router::with_state)) and the values middleware and context
/// factories attach to one message.
///
/// Cloning is cheap (the map is shared, and copied on the first insert into a clone).
///
/// # Examples
/// ```
/// use channel_dispatcher::Extensions;
///
/// struct User(String);
///
/// let mut extensions = Extensions::default();
/// extensions.insert(User("ada".into()));
/// assert_eq!(extensions.get::<User>().map(|u| u.0.as_str()), Some("ada"));
/// ```
#[derive(Clone, Default)]
pub struct Extensions {
    // NB. Most contexts have none, and a context is moved several times per request: `None`
    // keeps it one pointer wide, and a router's state is shared, not copied, per message.
    map: Option<Arc<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>>,
}

impl Extensions {
    /// Stores `value`, replacing any value of the same type.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        let map = Arc::make_mut(self.map.get_or_insert_with(Arc::default));
        map.insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The value of type `T`, if stored.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.map
            .as_ref()?
            .get(&TypeId::of::<T>())
            .and_then(|value| value.downcast_ref())
    }

    /// `true` when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.map.as_ref().map_or(true, |map| map.is_empty())
    }

    /// Adds the values of `defaults` whose types are not stored yet.
    pub(crate) fn fill_from(&mut self, defaults: &Extensions) {
        let Some(defaults) = &defaults.map else {
            return;
        };
        match &mut self.map {
            None => self.map = Some(Arc::clone(defaults)),
            Some(map) => {
                let map = Arc::make_mut(map);
                for (type_id, value) in defaults.iter() {
                    map.entry(*type_id).or_insert_with(|| Arc::clone(value));
                }
            }
        }
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("len", &self.map.as_ref().map_or(0, |map| map.len()))
            .finish()
    }
}

/// Prepares the [`Context`] of every inbound message before the handler sees it: derive
/// values from its attributes, for example. (State shared by every handler is simpler to give
/// the router: [`Router::with_state`](crate::Router::with_state).)
///
/// Any `Fn(&mut Context)` is one.
///
/// # Examples
/// ```
/// use channel_dispatcher::{Context, Dispatcher};
///
/// struct Tenant(String);
///
/// let builder = Dispatcher::builder().context_factory(|cx: &mut Context| {
///     let tenant = cx.attributes().get("tenant").unwrap_or("default").to_owned();
///     cx.extensions_mut().insert(Tenant(tenant));
/// });
/// ```
pub trait ContextFactory: Send + Sync + 'static {
    /// Fills in the context of one inbound message.
    fn prepare(&self, context: &mut Context);
}

impl<F: Fn(&mut Context) + Send + Sync + 'static> ContextFactory for F {
    fn prepare(&self, context: &mut Context) {
        self(context)
    }
}
