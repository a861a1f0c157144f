//! Serde over [`PhpValue`]: [`to_value`] and [`from_value`] map Rust types onto PHP values,
//! and [`to_object`] / [`from_object`] map a message struct onto a PHP object of a class.
//!
//! The mapping: integers and floats as `i`/`d` (a `u64` beyond `i64` is an error), strings and
//! byte buffers as `s`, `None` and `()` as `N`, sequences and tuples as arrays keyed 0, 1, ...,
//! maps as arrays (keys must be integers or strings), structs as arrays keyed by field name in
//! declaration order, unit enum variants as their name, other variants as a one-entry array.
//! A [`PhpValue`] inside a type passes through unchanged, whatever it holds.

use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::ser::{self, Serialize};

use super::value::{ArrayKey, PhpObject, PhpValue, Property};
use super::{DecodeLimits, PhpError};

/// The serializer methods of a serializer that takes one kind of value only: every other one
/// (but `serialize_unit_struct`, which each writes) fails with `$error`.
macro_rules! serde_impossible {
    ($error:expr) => {
        fn serialize_bool(self, _: bool) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_i8(self, _: i8) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_i16(self, _: i16) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_i32(self, _: i32) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_i64(self, _: i64) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_u8(self, _: u8) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_u16(self, _: u16) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_u32(self, _: u32) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_u64(self, _: u64) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_f32(self, _: f32) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_f64(self, _: f64) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_char(self, _: char) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_str(self, _: &str) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_none(self) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_unit(self) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_unit_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
        ) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: &T,
        ) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: &T,
        ) -> Result<Self::Ok, PhpError> {
            Err($error)
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, PhpError> {
            Err($error)
        }
        fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, PhpError> {
            Err($error)
        }
        fn serialize_tuple_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleStruct, PhpError> {
            Err($error)
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleVariant, PhpError> {
            Err($error)
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, PhpError> {
            Err($error)
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeStructVariant, PhpError> {
            Err($error)
        }
    };
}

/// The newtype name a [`PhpValue`] uses to pass through this module's serializer and
/// deserializer whole: its `serialize()` bytes travel inside.
const PASSTHROUGH: &str = "\0channel_dispatcher::php::PhpValue";

/// A Rust value as a PHP value.
///
/// # Errors
/// [`PhpError::Mapping`] for what PHP cannot hold (a `u64` over `i64::MAX`, a map key that
/// is neither an integer nor a string).
pub fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<PhpValue, PhpError> {
    value.serialize(ValueSerializer)
}

/// A PHP value as a Rust value.
///
/// # Errors
/// [`PhpError::Mapping`] when the value does not have the type's shape.
pub fn from_value<T: DeserializeOwned>(value: PhpValue) -> Result<T, PhpError> {
    T::deserialize(ValueDeserializer(value))
}

/// A message struct as an object of `class`: its fields are the public properties, in
/// order, followed by the private `id` when there is one.
///
/// # Errors
/// As [`to_value`]; [`PhpError::Mapping`] when `message` is not a struct (or a map).
pub fn to_object<T: Serialize + ?Sized>(
    class: &str,
    message: &T,
    id: Option<PhpValue>,
) -> Result<PhpObject, PhpError> {
    let fields = match to_value(message)? {
        PhpValue::Array(fields) => fields,
        // A unit struct: a class without properties.
        PhpValue::Null => Vec::new(),
        _ => {
            return Err(mapping(
                "a message must be a struct, to map onto an object's properties",
            ))
        }
    };
    let mut object = PhpObject::new(class);
    for (key, value) in fields {
        let name = match key {
            ArrayKey::String(name) => name,
            ArrayKey::Int(i) => i.to_string().into_bytes(),
        };
        object.properties.push((Property::public(name), value));
    }
    if let Some(id) = id {
        object.properties.push((Property::private(class, "id"), id));
    }
    Ok(object)
}

/// An object as a message struct: properties are matched by name in any order, whatever
/// their visibility; unknown ones are ignored; the private `id` (in any of its spellings:
/// private, protected or plain, as PHP reads it) is returned apart, so a message's own fields
/// cannot be named `id`.
///
/// # Errors
/// As [`from_value`].
pub fn from_object<T: DeserializeOwned>(
    object: PhpObject,
) -> Result<(T, Option<PhpValue>), PhpError> {
    let mut id = None;
    let mut fields = Vec::with_capacity(object.properties.len());
    for (property, value) in object.properties {
        // PHP itself reads the private `id` from `\0Class\0id`, `\0*\0id` or `id`: a message's
        // own fields cannot be called `id`.
        if property.name == b"id" {
            id.get_or_insert(value);
            continue;
        }
        fields.push((ArrayKey::String(property.name), value));
    }
    Ok((from_value(PhpValue::Array(fields))?, id))
}

fn mapping(message: impl fmt::Display) -> PhpError {
    PhpError::Mapping {
        message: message.to_string(),
    }
}

impl ser::Error for PhpError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        mapping(message)
    }
}

impl de::Error for PhpError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        mapping(message)
    }
}

// ===== PhpValue itself =====

impl Serialize for PhpValue {
    fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_newtype_struct(PASSTHROUGH, &Bytes(&self.to_bytes()))
    }
}

struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl<'de> de::Deserialize<'de> for PhpValue {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_newtype_struct(PASSTHROUGH, PhpValueVisitor)
    }
}

struct PhpValueVisitor;

impl<'de> Visitor<'de> for PhpValueVisitor {
    type Value = PhpValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a PHP value (from the php module's deserializer)")
    }

    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<PhpValue, D::Error> {
        d.deserialize_byte_buf(SerializedVisitor)
    }
}

/// A value's `serialize()` bytes, read back.
struct SerializedVisitor;

impl Visitor<'_> for SerializedVisitor {
    type Value = PhpValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the serialize() bytes of a PHP value")
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<PhpValue, E> {
        PhpValue::from_bytes(bytes, &DecodeLimits::default()).map_err(E::custom)
    }
}

// ===== Rust to PHP =====

struct ValueSerializer;

/// The bytes of a passthrough [`PhpValue`].
struct Capture;

impl ser::Serializer for Capture {
    type Ok = PhpValue;
    type Error = PhpError;
    type SerializeSeq = ser::Impossible<PhpValue, PhpError>;
    type SerializeTuple = ser::Impossible<PhpValue, PhpError>;
    type SerializeTupleStruct = ser::Impossible<PhpValue, PhpError>;
    type SerializeTupleVariant = ser::Impossible<PhpValue, PhpError>;
    type SerializeMap = ser::Impossible<PhpValue, PhpError>;
    type SerializeStruct = ser::Impossible<PhpValue, PhpError>;
    type SerializeStructVariant = ser::Impossible<PhpValue, PhpError>;

    fn serialize_bytes(self, bytes: &[u8]) -> Result<PhpValue, PhpError> {
        PhpValue::from_bytes(bytes, &DecodeLimits::default())
    }

    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, PhpError> {
        Err(not_captured())
    }

    fn serialize_unit_struct(self, _: &'static str) -> Result<PhpValue, PhpError> {
        Err(not_captured())
    }

    serde_impossible!(not_captured());
}

/// Finds a struct's serde name (its class) without serializing its fields.
struct NameProbe;

impl ser::Serializer for NameProbe {
    type Ok = &'static str;
    type Error = PhpError;
    type SerializeSeq = ser::Impossible<&'static str, PhpError>;
    type SerializeTuple = ser::Impossible<&'static str, PhpError>;
    type SerializeTupleStruct = ser::Impossible<&'static str, PhpError>;
    type SerializeTupleVariant = ser::Impossible<&'static str, PhpError>;
    type SerializeMap = ser::Impossible<&'static str, PhpError>;
    type SerializeStruct = NameOnly;
    type SerializeStructVariant = ser::Impossible<&'static str, PhpError>;

    fn serialize_bytes(self, _: &[u8]) -> Result<&'static str, PhpError> {
        Err(not_a_struct())
    }

    fn serialize_struct(self, name: &'static str, _: usize) -> Result<NameOnly, PhpError> {
        Ok(NameOnly(name))
    }

    fn serialize_unit_struct(self, name: &'static str) -> Result<&'static str, PhpError> {
        Ok(name)
    }

    serde_impossible!(not_a_struct());
}

/// A struct's name; its fields are skipped.
struct NameOnly(&'static str);

impl ser::SerializeStruct for NameOnly {
    type Ok = &'static str;
    type Error = PhpError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        _: &'static str,
        _: &T,
    ) -> Result<(), PhpError> {
        Ok(())
    }

    fn end(self) -> Result<&'static str, PhpError> {
        Ok(self.0)
    }
}

fn not_a_struct() -> PhpError {
    mapping("a message must be a struct: its name is the PHP class")
}

/// The class of a message struct: its serde name (`#[serde(rename = "Ns\\Class")]` sets a
/// namespaced one).
fn class_of<T: Serialize + ?Sized>(message: &T) -> Result<&'static str, PhpError> {
    message.serialize(NameProbe)
}

/// A message struct as an object of the class its serde name gives (`PingRequest`, or what
/// `#[serde(rename = "...")]` says), the private `id` last when there is one; see
/// [`to_object`].
///
/// # Errors
/// As [`to_object`]; [`PhpError::Mapping`] when `message` is not a struct.
pub fn to_message<T: Serialize + ?Sized>(
    message: &T,
    id: Option<PhpValue>,
) -> Result<PhpObject, PhpError> {
    to_object(class_of(message)?, message, id)
}

fn not_captured() -> PhpError {
    mapping("a PhpValue passes through as its bytes")
}

fn int(value: impl TryInto<i64>) -> Result<PhpValue, PhpError> {
    value
        .try_into()
        .map(PhpValue::Int)
        .map_err(|_| mapping("an integer beyond PHP's 64-bit int"))
}

/// Collects entries for an array.
struct Entries {
    entries: Vec<(ArrayKey, PhpValue)>,
    key: Option<ArrayKey>,
    /// For variants: the variant's name, to wrap the result in.
    variant: Option<&'static str>,
}

impl Entries {
    fn new(len: Option<usize>, variant: Option<&'static str>) -> Self {
        Self {
            entries: Vec::with_capacity(len.unwrap_or(0).min(1024)),
            key: None,
            variant,
        }
    }

    fn push(&mut self, value: PhpValue) {
        let key = ArrayKey::Int(self.entries.len() as i64);
        self.entries.push((key, value));
    }

    fn done(self) -> PhpValue {
        let array = PhpValue::Array(self.entries);
        match self.variant {
            Some(name) => PhpValue::Array(vec![(ArrayKey::from(name), array)]),
            None => array,
        }
    }
}

impl ser::Serializer for ValueSerializer {
    type Ok = PhpValue;
    type Error = PhpError;
    type SerializeSeq = Entries;
    type SerializeTuple = Entries;
    type SerializeTupleStruct = Entries;
    type SerializeTupleVariant = Entries;
    type SerializeMap = Entries;
    type SerializeStruct = Entries;
    type SerializeStructVariant = Entries;

    fn serialize_bool(self, v: bool) -> Result<PhpValue, PhpError> {
        Ok(PhpValue::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<PhpValue, PhpError> {
        int(v)
    }
    fn serialize_i16(self, v: i16) -> Result<PhpValue, PhpError> {
        int(v)
    }
    fn serialize_i32(self, v: i32) -> Result<PhpValue, PhpError> {
        int(v)
    }
    fn serialize_i64(self, v: i64) -> Result<PhpValue, PhpError> {
        int(v)
    }
    fn serialize_i128(self, v: i128) -> Result<PhpValue, PhpError> {
        int(v)
    }
    fn serialize_u8(self, v: u8) -> Result<PhpValue, PhpError> {
        int(v)
    }
    fn serialize_u16(self, v: u16) -> Result<PhpValue, PhpError> {
        int(v)
    }
    fn serialize_u32(self, v: u32) -> Result<PhpValue, PhpError> {
        int(v)
    }
    fn serialize_u64(self, v: u64) -> Result<PhpValue, PhpError> {
        int(v)
    }
    fn serialize_u128(self, v: u128) -> Result<PhpValue, PhpError> {
        int(v)
    }
    fn serialize_f32(self, v: f32) -> Result<PhpValue, PhpError> {
        Ok(PhpValue::Float(f64::from(v)))
    }
    fn serialize_f64(self, v: f64) -> Result<PhpValue, PhpError> {
        Ok(PhpValue::Float(v))
    }
    fn serialize_char(self, v: char) -> Result<PhpValue, PhpError> {
        Ok(PhpValue::String(v.to_string().into_bytes()))
    }
    fn serialize_str(self, v: &str) -> Result<PhpValue, PhpError> {
        Ok(PhpValue::String(v.as_bytes().to_vec()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<PhpValue, PhpError> {
        Ok(PhpValue::String(v.to_vec()))
    }
    fn serialize_none(self) -> Result<PhpValue, PhpError> {
        Ok(PhpValue::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<PhpValue, PhpError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<PhpValue, PhpError> {
        Ok(PhpValue::Null)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<PhpValue, PhpError> {
        Ok(PhpValue::Null)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<PhpValue, PhpError> {
        Ok(PhpValue::String(variant.as_bytes().to_vec()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<PhpValue, PhpError> {
        match name {
            PASSTHROUGH => value.serialize(Capture),
            _ => value.serialize(self),
        }
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<PhpValue, PhpError> {
        Ok(PhpValue::Array(vec![(
            ArrayKey::from(variant),
            value.serialize(self)?,
        )]))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Entries, PhpError> {
        Ok(Entries::new(len, None))
    }
    fn serialize_tuple(self, len: usize) -> Result<Entries, PhpError> {
        Ok(Entries::new(Some(len), None))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<Entries, PhpError> {
        Ok(Entries::new(Some(len), None))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Entries, PhpError> {
        Ok(Entries::new(Some(len), Some(variant)))
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Entries, PhpError> {
        Ok(Entries::new(len, None))
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<Entries, PhpError> {
        Ok(Entries::new(Some(len), None))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Entries, PhpError> {
        Ok(Entries::new(Some(len), Some(variant)))
    }
}

impl ser::SerializeSeq for Entries {
    type Ok = PhpValue;
    type Error = PhpError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), PhpError> {
        self.push(to_value(value)?);
        Ok(())
    }
    fn end(self) -> Result<PhpValue, PhpError> {
        Ok(self.done())
    }
}

impl ser::SerializeTuple for Entries {
    type Ok = PhpValue;
    type Error = PhpError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), PhpError> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Result<PhpValue, PhpError> {
        Ok(self.done())
    }
}

impl ser::SerializeTupleStruct for Entries {
    type Ok = PhpValue;
    type Error = PhpError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), PhpError> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Result<PhpValue, PhpError> {
        Ok(self.done())
    }
}

impl ser::SerializeTupleVariant for Entries {
    type Ok = PhpValue;
    type Error = PhpError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), PhpError> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Result<PhpValue, PhpError> {
        Ok(self.done())
    }
}

impl ser::SerializeMap for Entries {
    type Ok = PhpValue;
    type Error = PhpError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), PhpError> {
        self.key = Some(match to_value(key)? {
            PhpValue::Int(i) => ArrayKey::Int(i),
            PhpValue::String(s) => ArrayKey::from(&s[..]),
            other => return Err(mapping(format!("a map key PHP cannot hold: {other}"))),
        });
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), PhpError> {
        let key = self
            .key
            .take()
            .ok_or_else(|| mapping("a map value without its key"))?;
        self.entries.push((key, to_value(value)?));
        Ok(())
    }
    fn end(self) -> Result<PhpValue, PhpError> {
        Ok(self.done())
    }
}

impl ser::SerializeStruct for Entries {
    type Ok = PhpValue;
    type Error = PhpError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), PhpError> {
        self.entries
            .push((ArrayKey::String(name.as_bytes().to_vec()), to_value(value)?));
        Ok(())
    }
    fn end(self) -> Result<PhpValue, PhpError> {
        Ok(self.done())
    }
}

impl ser::SerializeStructVariant for Entries {
    type Ok = PhpValue;
    type Error = PhpError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), PhpError> {
        ser::SerializeStruct::serialize_field(self, name, value)
    }
    fn end(self) -> Result<PhpValue, PhpError> {
        Ok(self.done())
    }
}

// ===== PHP to Rust =====

struct ValueDeserializer(PhpValue);

impl<'de> IntoDeserializer<'de, PhpError> for ValueDeserializer {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

/// An array key as a deserializer: an integer or a string, and an integer key read as a
/// string is its decimal form (PHP turned the string `"7"` into the key 7).
fn key_deserializer(key: ArrayKey) -> KeyDeserializer {
    KeyDeserializer(key)
}

struct KeyDeserializer(ArrayKey);

impl<'de> IntoDeserializer<'de, PhpError> for KeyDeserializer {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> de::Deserializer<'de> for KeyDeserializer {
    type Error = PhpError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PhpError> {
        match self.0 {
            ArrayKey::Int(i) => visitor.visit_i64(i),
            ArrayKey::String(s) => ValueDeserializer(PhpValue::String(s)).deserialize_any(visitor),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PhpError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PhpError> {
        match self.0 {
            ArrayKey::Int(i) => visitor.visit_string(i.to_string()),
            other => KeyDeserializer(other).deserialize_any(visitor),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PhpError> {
        self.deserialize_string(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        ignored_any
    }
}

/// `true` for the keys 0, 1, 2, ... in order: a list.
fn is_list(entries: &[(ArrayKey, PhpValue)]) -> bool {
    entries
        .iter()
        .enumerate()
        .all(|(i, (key, _))| *key == ArrayKey::Int(i as i64))
}

impl<'de> de::Deserializer<'de> for ValueDeserializer {
    type Error = PhpError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PhpError> {
        match self.0 {
            PhpValue::Null => visitor.visit_unit(),
            PhpValue::Bool(b) => visitor.visit_bool(b),
            PhpValue::Int(i) => visitor.visit_i64(i),
            PhpValue::Float(f) => visitor.visit_f64(f),
            PhpValue::String(s) => match String::from_utf8(s) {
                Ok(text) => visitor.visit_string(text),
                Err(bytes) => visitor.visit_byte_buf(bytes.into_bytes()),
            },
            PhpValue::Array(entries) if is_list(&entries) => {
                visitor.visit_seq(de::value::SeqDeserializer::new(
                    entries.into_iter().map(|(_, v)| ValueDeserializer(v)),
                ))
            }
            PhpValue::Array(entries) => visitor.visit_map(de::value::MapDeserializer::new(
                entries
                    .into_iter()
                    .map(|(key, value)| (key_deserializer(key), ValueDeserializer(value))),
            )),
            PhpValue::Object(object) => visitor.visit_map(de::value::MapDeserializer::new(
                object.properties.into_iter().map(|(property, value)| {
                    (
                        ValueDeserializer(PhpValue::String(property.name)),
                        ValueDeserializer(value),
                    )
                }),
            )),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PhpError> {
        match self.0 {
            PhpValue::Null => visitor.visit_none(),
            other => visitor.visit_some(ValueDeserializer(other)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, PhpError> {
        match name {
            PASSTHROUGH => visitor.visit_newtype_struct(Passthrough(self.0)),
            _ => visitor.visit_newtype_struct(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, PhpError> {
        match self.0 {
            // A struct from a list: by position (tuples written as arrays).
            PhpValue::Array(entries) => visitor.visit_map(de::value::MapDeserializer::new(
                entries
                    .into_iter()
                    .map(|(key, value)| (key_deserializer(key), ValueDeserializer(value))),
            )),
            other => ValueDeserializer(other).deserialize_any(visitor),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PhpError> {
        match self.0 {
            // A PHP array is a sequence in key order, whatever the keys.
            PhpValue::Array(entries) => visitor.visit_seq(de::value::SeqDeserializer::new(
                entries.into_iter().map(|(_, v)| ValueDeserializer(v)),
            )),
            other => ValueDeserializer(other).deserialize_any(visitor),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PhpError> {
        match self.0 {
            PhpValue::Array(entries) => visitor.visit_map(de::value::MapDeserializer::new(
                entries
                    .into_iter()
                    .map(|(key, value)| (key_deserializer(key), ValueDeserializer(value))),
            )),
            other => ValueDeserializer(other).deserialize_any(visitor),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, PhpError> {
        match self.0 {
            PhpValue::String(name) => {
                let name = String::from_utf8(name)
                    .map_err(|_| mapping("an enum variant's name is not UTF-8"))?;
                visitor.visit_enum(name.into_deserializer())
            }
            PhpValue::Array(mut entries) if entries.len() == 1 => {
                let (key, value) = entries.pop().expect("one entry");
                let ArrayKey::String(name) = key else {
                    return Err(mapping("an enum variant's name is not a string"));
                };
                let name = String::from_utf8(name)
                    .map_err(|_| mapping("an enum variant's name is not UTF-8"))?;
                visitor.visit_enum(de::value::MapAccessDeserializer::new(
                    de::value::MapDeserializer::new(std::iter::once((
                        name,
                        ValueDeserializer(value),
                    ))),
                ))
            }
            other => Err(mapping(format!("{other} is not an enum variant"))),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct tuple tuple_struct identifier ignored_any
    }
}

/// Hands a [`PhpValue`] its own bytes.
struct Passthrough(PhpValue);

impl<'de> de::Deserializer<'de> for Passthrough {
    type Error = PhpError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PhpError> {
        visitor.visit_byte_buf(self.0.to_bytes())
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}
