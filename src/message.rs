//! Typed messages: requests (answered), notifications (never answered), built-in responses and
//! the attributes every envelope carries.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A request: a message the peer answers with exactly one `Response` (or an error).
///
/// Modelled on `lsp_types::request::Request`: the type names its method and its response
/// type, so [`Dispatcher::request`](crate::Dispatcher::request) returns the right type and the
/// [`Router`](crate::Router) routes by [`METHOD`](Request::METHOD). Declare one in a line with
/// [`request!`](crate::request!).
///
/// # Examples
/// ```
/// use channel_dispatcher::Request;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Add { a: i64, b: i64 }
///
/// impl Request for Add {
///     type Response = i64;
///     const METHOD: &'static str = "math/add";
/// }
/// ```
pub trait Request: Serialize + DeserializeOwned + Send + 'static {
    /// The type of a successful answer.
    type Response: Serialize + DeserializeOwned + Send + 'static;
    /// The method name on the wire.
    const METHOD: &'static str;
}

/// A notification: fire and forget, never answered (the seed's `MeekRequest`).
///
/// Declare one in a line with [`notification!`](crate::notification!).
pub trait Notification: Serialize + DeserializeOwned + Send + 'static {
    /// The method name on the wire.
    const METHOD: &'static str;
}

/// Declares that a type is a [`Request`]: `request!(Type => Response, "method")`.
///
/// # Examples
/// ```
/// use channel_dispatcher::request;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Ping(u32);
/// #[derive(Serialize, Deserialize)]
/// struct Pong(u32);
///
/// request!(Ping => Pong, "ping");
/// ```
#[macro_export]
macro_rules! request {
    ($ty:ty => $response:ty, $method:expr) => {
        impl $crate::Request for $ty {
            type Response = $response;
            const METHOD: &'static str = $method;
        }
    };
}

/// Declares that a type is a [`Notification`]: `notification!(Type, "method")`.
///
/// # Examples
/// ```
/// use channel_dispatcher::notification;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Progress { done: u32 }
///
/// notification!(Progress, "progress");
/// ```
#[macro_export]
macro_rules! notification {
    ($ty:ty, $method:expr) => {
        impl $crate::Notification for $ty {
            const METHOD: &'static str = $method;
        }
    };
}

/// The generic success response (the seed's `SuccessResponse`): "done, nothing to return".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Success;

/// The acknowledgement response (the seed's `AcceptedResponse`): "received, work goes on".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted;

/// String-keyed metadata on every envelope, like headers: trace ids, auth tokens, tenant names.
///
/// They travel on the wire with requests, notifications and responses; handlers and middleware
/// read and set them. Iteration is in key order.
///
/// # Examples
/// ```
/// use channel_dispatcher::Attributes;
///
/// let mut attributes = Attributes::new();
/// attributes.insert("trace-id", "4bf92f35");
/// assert_eq!(attributes.get("trace-id"), Some("4bf92f35"));
/// assert_eq!(attributes.len(), 1);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Attributes(BTreeMap<String, String>);

impl Attributes {
    /// No attributes.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Sets `name` to `value`, returning the previous value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0.insert(name.into(), value.into())
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.0.remove(name)
    }

    /// The number of attributes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// `true` when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The attributes in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Bytes of keys and values together, the measure the frame limits use.
    pub(crate) fn encoded_len_hint(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len() + 4).sum()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Attributes {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl<K: Into<String>, V: Into<String>> Extend<(K, V)> for Attributes {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        self.0
            .extend(iter.into_iter().map(|(k, v)| (k.into(), v.into())));
    }
}

impl<'a> IntoIterator for &'a Attributes {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
