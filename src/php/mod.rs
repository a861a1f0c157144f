//! The PHP original's wire (the `php` feature): its `serialize()` payloads as [`PhpValue`]s,
//! written byte for byte as PHP 8 writes them and read back within [`DecodeLimits`], serde
//! types mapped onto them ([`to_object`], [`from_object`]), and its frames ([`framing`]).
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
pub use decode::{DecodeLimits, PhpError};
pub use value::{ArrayKey, PhpObject, PhpValue, Property, Visibility};
