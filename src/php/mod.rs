//! The PHP original's wire (the `php` feature): its `serialize()` payloads as [`PhpValue`]s,
//! written byte for byte as PHP 8 writes them and read back within [`DecodeLimits`], serde
//! types mapped onto them ([`to_object`], [`from_object`]), and its frames ([`framing`]).
//!
//! [`Codec::Php`](crate::Codec::Php) puts it all together: a dispatcher built with it talks to
//! flyokai/amp-channel-dispatcher on its own wire, with no handshake. A struct is an object of
//! the class its serde name gives, its fields the constructor's parameters in order; a
//! request's class is its method; the codec adds and reads the private `id` and the answers'
//! `requestId`; PHP's built-in responses are the crate's answers and errors
//! (`SuccessResponse` is [`Success`](crate::Success), `ErrorResponse` a
//! [`CallError::Remote`](crate::CallError::Remote), `FatalErrorResponse` ends both sides);
//! `null` is the stop marker both ways; PHP's iterators are pull-mode
//! [`RemoteStream`](crate::RemoteStream)s. Notifications are PHP `MeekRequest`s: name their
//! classes with [`Builder::php_notification`](crate::Builder::php_notification), since the wire
//! does not tell them from requests.
//!
//! What this wire lacks degrades here: deadlines are local (the call fails with
//! [`CallError::Timeout`](crate::CallError::Timeout), PHP is not told), a dropped call is
//! forgotten without a cancel, attributes are not sent, streams are pulled one item per
//! request (there is no credit), and the peer is taken to keep this side's
//! [`Limits`](crate::Limits) (there is no handshake to announce them; an
//! [`Authenticator`](crate::Authenticator) sees no token). A handler's answer must be an object
//! (a struct): anything else is answered with an `ErrorResponse`, since PHP stops on a
//! non-object; a call whose payload is not an object fails with
//! [`CallError::Encode`](crate::CallError::Encode).
//!
//! Three rules follow from the wire:
//! - An object with a `requestId` property is an answer: a request class must not have one.
//! - An iterator is a stream a handler stores ([`Context::streams`](crate::Context::streams))
//!   and whose id it answers inside a struct (PHP's `OpenIteratorResponse(iteratorId)`); the
//!   caller pulls it with [`RemoteStream::pull`](crate::RemoteStream::pull).
//!   [`Router::stream`](crate::Router::stream) and
//!   [`Dispatcher::stream`](crate::Dispatcher::stream) answer a bare id, which is not an
//!   object: they do not work here.
//! - PHP has no timeouts, and a PHP handler that never answers leaves a call waiting: give
//!   calls one ([`Builder::default_timeout`](crate::Builder::default_timeout)).
//!
//! A frame that does not decode (a reference, an enum case, too deep) is still answered when
//! its class and `id` can be read past what was refused (an `ErrorResponse`), or fails the
//! call it answers (by its `requestId`), so that neither side waits for nothing. Its `id`
//! is read past anything nested up to PHP's own 4,096 levels. A request whose `id` is there
//! but not an int is logged and dropped: an answer would name an id the peer never sent.
//!
//! PHP's `unserialize()` instantiates whatever class the bytes name; this decoder instantiates
//! nothing: an object is its class name and properties, for the application to map onto the
//! types it registered. References (`r:`, `R:`), custom serialization (`C:`) and enums (`E:`)
//! are refused.
//!
//! # Examples
//! ```
//! use channel_dispatcher::php::{DecodeLimits, PhpObject, PhpValue, Property};
//!
//! let ping = PhpValue::Object(
//!     PhpObject::new("PingRequest")
//!         .with(Property::public("note"), PhpValue::String(b"hello".to_vec()))
//!         .with(Property::private("PingRequest", "id"), PhpValue::Int(0)),
//! );
//! let bytes = ping.to_bytes();
//! assert_eq!(
//!     bytes,
//!     b"O:11:\"PingRequest\":2:{s:4:\"note\";s:5:\"hello\";s:15:\"\0PingRequest\0id\";i:0;}"
//! );
//! assert_eq!(PhpValue::from_bytes(&bytes, &DecodeLimits::default()).unwrap(), ping);
//! ```

mod decode;
pub mod framing;
mod serde;
mod value;

pub use self::serde::{from_object, from_value, to_message, to_object, to_value};
pub(crate) use decode::salvage;
pub use decode::{DecodeLimits, PhpError};
pub use value::{ArrayKey, PhpObject, PhpValue, Property, Visibility};
