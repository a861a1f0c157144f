//! Typed messages: requests (answered), notifications (never answered), built-in responses and
//! the attributes every envelope carries.

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

/// A notification: fire and forget, never answered.
///
/// Declare one in a line with [`notification!`](crate::notification!).
pub trait Notification: Serialize + DeserializeOwned + Send + 'static {
    /// The method name on the wire.
    const METHOD: &'static str;
}

/// A streaming request: answered by a stream of `Item`s (see [`stream`](crate::stream)).
///
/// Declare one in a line with [`stream_request!`](crate::stream_request!).
pub trait StreamRequest: Serialize + DeserializeOwned + Send + 'static {
    /// The type of each item.
    type Item: Serialize + DeserializeOwned + Send + 'static;
    /// The method name on the wire.
    const METHOD: &'static str;
}

/// Declares that a type is a [`StreamRequest`]: `stream_request!(Type => Item, "method")`.
///
/// # Examples
/// ```
/// use channel_dispatcher::stream_request;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Rows { table: String }
///
/// stream_request!(Rows => Vec<String>, "rows");
/// ```
#[macro_export]
macro_rules! stream_request {
    ($ty:ty => $item:ty, $method:expr) => {
        impl $crate::StreamRequest for $ty {
            type Item = $item;
            const METHOD: &'static str = $method;
        }
    };
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

/// The generic success response: "done, nothing to return". On the PHP wire it is the PHP
/// library's `SuccessResponse`.
// NB. The serde name is the PHP class; the other codecs write a unit struct without its name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename = "Flyokai\\AmpChannelDispatcher\\SuccessResponse")]
pub struct Success;

/// The acknowledgement response: "received, work goes on". On the PHP wire it is the PHP
/// library's `AcceptedResponse`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename = "Flyokai\\AmpChannelDispatcher\\AcceptedResponse")]
pub struct Accepted;

/// String-keyed metadata on every envelope, like headers: trace ids, auth tokens, tenant names.
///
/// They travel on the wire with requests, notifications and responses; handlers and middleware
/// read and set them. Iteration is in key order. Their number and size are bounded by the
/// [`Limits`](crate::Limits).
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
// NB. A sorted `Vec`: envelopes carry few attributes, usually none, and an empty `Vec` costs
// nothing to create or drop (a `BTreeMap` showed up in profiles). Boxed, and absent when there
// are none: one pointer in every envelope, call, answer and context instead of three.
#[derive(Clone, Default, PartialEq, Eq)]
#[allow(clippy::box_collection)] // NB. The box is the point: one pointer, not a `Vec`'s three.
pub struct Attributes(Option<Box<Vec<(String, String)>>>);

impl Attributes {
    /// No attributes.
    pub fn new() -> Self {
        Self::default()
    }

    /// The pairs, sorted by name. (Never `Some` of an empty `Vec`: equality relies on it.)
    fn pairs(&self) -> &[(String, String)] {
        debug_assert!(!matches!(&self.0, Some(pairs) if pairs.is_empty()));
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.pairs()
            .binary_search_by(|(key, _)| key.as_str().cmp(name))
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        let index = self.position(name).ok()?;
        Some(&self.pairs()[index].1)
    }

    /// Sets `name` to `value`, returning the previous value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) -> Option<String> {
        let name = name.into();
        let position = self.position(&name);
        let pairs = self.0.get_or_insert_with(Box::default);
        match position {
            Ok(index) => Some(std::mem::replace(&mut pairs[index].1, value.into())),
            Err(index) => {
                pairs.insert(index, (name, value.into()));
                None
            }
        }
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let index = self.position(name).ok()?;
        let pairs = self.0.as_mut()?;
        let (_, value) = pairs.remove(index);
        if pairs.is_empty() {
            self.0 = None;
        }
        Some(value)
    }

    /// The number of attributes.
    pub fn len(&self) -> usize {
        self.pairs().len()
    }

    /// `true` when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The attributes in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.pairs().iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Attributes from pairs in any order; a later duplicate name wins. O(n log n), so a peer
    /// cannot make decoding quadratic.
    pub(crate) fn from_unsorted(mut pairs: Vec<(String, String)>) -> Self {
        pairs.reverse();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|later, earlier| later.0 == earlier.0);
        Self((!pairs.is_empty()).then(|| Box::new(pairs)))
    }

    /// Bytes of keys and values together, the measure the frame limits use.
    pub(crate) fn encoded_len_hint(&self) -> usize {
        self.iter().map(|(k, v)| k.len() + v.len() + 4).sum()
    }
}

impl std::fmt::Debug for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Attributes {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut attributes = Self::new();
        attributes.extend(iter);
        attributes
    }
}

impl<K: Into<String>, V: Into<String>> Extend<(K, V)> for Attributes {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl Serialize for Attributes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Attributes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Attributes;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of string attributes")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Attributes, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<String, String>()? {
                    if pairs.len() == crate::codec::MAX_DECODED_ATTRIBUTES {
                        return Err(serde::de::Error::custom(
                            "more attributes than any peer may send",
                        ));
                    }
                    pairs.push(pair);
                }
                Ok(Attributes::from_unsorted(pairs))
            }
        }

        deserializer.deserialize_map(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_keep_key_order_and_replace_on_insert() {
        let mut attributes: Attributes = [("b", "2"), ("a", "1"), ("c", "3")].into_iter().collect();
        assert_eq!(attributes.insert("b", "two"), Some("2".into()));
        assert_eq!(attributes.remove("c"), Some("3".into()));
        assert_eq!(attributes.remove("c"), None);
        let pairs: Vec<_> = attributes.iter().collect();
        assert_eq!(pairs, [("a", "1"), ("b", "two")]);
    }

    #[test]
    fn unsorted_pairs_are_sorted_and_the_last_duplicate_wins() {
        let pairs = [("b", "1"), ("a", "2"), ("b", "3")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .to_vec();
        let attributes = Attributes::from_unsorted(pairs);
        assert_eq!(
            attributes.iter().collect::<Vec<_>>(),
            [("a", "2"), ("b", "3")]
        );
    }

    #[test]
    fn attributes_emptied_equal_none_and_take_one_pointer() {
        let mut attributes: Attributes = [("a", "1")].into_iter().collect();
        assert_ne!(attributes, Attributes::new());
        attributes.remove("a");
        assert_eq!(attributes, Attributes::new());
        assert!(attributes.is_empty());
        assert_eq!(Attributes::from_unsorted(Vec::new()), Attributes::new());
        assert_eq!(
            format!("{:?}", [("k", "v")].into_iter().collect::<Attributes>()),
            r#"{"k": "v"}"#
        );
        assert_eq!(
            std::mem::size_of::<Attributes>(),
            std::mem::size_of::<usize>()
        );
    }
}
