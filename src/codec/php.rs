//! The PHP original's envelopes (flyokai/amp-channel-dispatcher): every frame is one
//! `serialize()`d value, and what kind of envelope it is follows from the value itself.
//!
//! | envelope | on the PHP wire |
//! | --- | --- |
//! | request | an object of the class the method names, with the private `id` |
//! | notification | the same (a PHP `MeekRequest`); inbound, the builder's notification classes say which |
//! | response | any object with a `requestId` property (the request's `id`); the unit value is `SuccessResponse` |
//! | error | `ErrorResponse(message, code, requestId)` |
//! | fatal | `FatalErrorResponse(message, code)`: it ends both sides |
//! | goodbye | `N;` (the stop marker) |
//! | pull of a stream | `Request\IteratorContinue(iteratorId)`, answered by `Response\IteratorContinue(continue, position, value)` |
//!
//! Nothing else exists on this wire: attributes, deadlines, cancels, nesting and windowed
//! streams stay on this side (the writer leaves their envelopes out). See the `php` module.

use std::sync::atomic::{AtomicI64, Ordering};

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::envelope::{Envelope, EnvelopeError, EnvelopeKind, ErrorBody, Method, PartialHeader};
use crate::error::{code, CodecError};
use crate::message::Attributes;
use crate::php::{ArrayKey, DecodeLimits, PhpError, PhpObject, PhpValue, Property};
use crate::stream::{POSITION_ATTRIBUTE, PULL_METHOD};

const NAME: &str = "php";

/// The PHP library's namespace.
macro_rules! ns {
    ($class:literal) => {
        concat!("Flyokai\\AmpChannelDispatcher\\", $class)
    };
}

const SUCCESS: &str = ns!("SuccessResponse");
const ERROR: &str = ns!("ErrorResponse");
const FATAL: &str = ns!("FatalErrorResponse");
const CONTINUE_REQUEST: &str = ns!("Request\\IteratorContinue");
const CONTINUE_RESPONSE: &str = ns!("Response\\IteratorContinue");

/// The value of [`POSITION_ATTRIBUTE`] on the answer that ends a pulled stream, in this mode
/// only: it tells the writer to send `continue=false`.
pub(crate) const END_POSITION: &str = "";

/// Ids for what this side makes up: its answers' own `id` (PHP fills it from its own counter
/// and nobody reads it) and its notifications' `id`, which count down from -1 so that PHP's
/// answer to one (it answers them) is never taken for the answer to a call (ids from 1 up).
static OWN_IDS: AtomicI64 = AtomicI64::new(0);
static NOTIFICATION_IDS: AtomicI64 = AtomicI64::new(-1);

fn own_id() -> i64 {
    OWN_IDS.fetch_add(1, Ordering::Relaxed)
}

/// The id a PHP peer's request has here: its bits (PHP's ids are `int`s, from 0 up).
fn peer_request(php_id: i64) -> u64 {
    php_id as u64
}

/// The `requestId` that answers the peer's request `id` (see [`peer_request`]).
fn php_request(id: u64) -> PhpValue {
    PhpValue::Int(id as i64)
}

/// Our own payloads, read back to add the envelope's properties: they are within any limit.
const OWN_LIMITS: DecodeLimits = DecodeLimits {
    max_depth: usize::MAX,
    max_values: usize::MAX,
};

fn codec_error(error: PhpError) -> CodecError {
    CodecError::new(NAME, error)
}

/// A payload: a struct (or a unit struct) is an object of the class its serde name gives,
/// anything else the PHP value it maps to.
pub(crate) fn encode_value<T: Serialize + ?Sized>(
    value: &T,
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    let value = match crate::php::to_message(value, None) {
        Ok(object) => PhpValue::Object(object),
        Err(_) => crate::php::to_value(value).map_err(codec_error)?,
    };
    let mut bytes = Vec::new();
    value.write(&mut bytes);
    dst.extend_from_slice(&bytes);
    Ok(())
}

pub(crate) fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let value = PhpValue::from_bytes(bytes, &DecodeLimits::default()).map_err(codec_error)?;
    crate::php::from_value(value).map_err(codec_error)
}

pub(crate) fn sequence_len(bytes: &[u8]) -> Result<usize, CodecError> {
    match PhpValue::from_bytes(bytes, &DecodeLimits::default()).map_err(codec_error)? {
        PhpValue::Array(entries) => Ok(entries.len()),
        other => Err(CodecError::new(
            NAME,
            format_args!("not a sequence: {other}"),
        )),
    }
}

/// `false` for the envelopes this wire has no place for: the writer leaves them out.
pub(crate) fn carries(envelope: &Envelope) -> bool {
    !matches!(
        envelope.kind(),
        EnvelopeKind::Cancel
            | EnvelopeKind::StreamItems
            | EnvelopeKind::StreamEnd
            | EnvelopeKind::StreamCredit
            | EnvelopeKind::StreamCancel
            | EnvelopeKind::NotificationCredit
    )
}

/// `payload` as an object, when it is one.
fn object_of(payload: &[u8]) -> Option<PhpObject> {
    match PhpValue::from_bytes(payload, &OWN_LIMITS) {
        Ok(PhpValue::Object(object)) => Some(object),
        _ => None,
    }
}

/// Drops every spelling of the private `id`, then adds it as `class` declares it.
fn set_id(object: &mut PhpObject, id: PhpValue) {
    object
        .properties
        .retain(|(property, _)| property.name != b"id");
    let private = Property::private(object.class.clone(), "id");
    object.properties.push((private, id));
}

/// Sets `requestId`, where the message has it, or last.
fn set_request_id(object: &mut PhpObject, id: u64) {
    let value = php_request(id);
    match object
        .properties
        .iter_mut()
        .find(|(property, _)| property.name == b"requestId")
    {
        Some((_, slot)) => *slot = value,
        None => object
            .properties
            .push((Property::public("requestId"), value)),
    }
}

fn error_object(class: &str, error: &ErrorBody, request_id: PhpValue, id: PhpValue) -> PhpObject {
    let mut object = PhpObject::new(class)
        .with(
            Property::public("message"),
            PhpValue::String(error.message.clone().into_bytes()),
        )
        .with(Property::public("code"), PhpValue::Int(error.code))
        .with(Property::public("requestId"), request_id);
    set_id(&mut object, id);
    object
}

/// Appends the envelope as PHP sends it; see [`carries`] for what has no form here.
pub(crate) fn encode(envelope: &Envelope, dst: &mut BytesMut) {
    let value = match envelope {
        Envelope::Request {
            id,
            method,
            payload,
            ..
        } if method.as_str() == PULL_METHOD => {
            let stream = decode_value::<i64>(payload).unwrap_or(-1);
            let mut object = PhpObject::new(CONTINUE_REQUEST)
                .with(Property::public("iteratorId"), PhpValue::Int(stream));
            set_id(&mut object, PhpValue::Int(*id as i64));
            PhpValue::Object(object)
        }
        Envelope::Request {
            id,
            method,
            payload,
            ..
        } => {
            // NB. The dispatcher refuses a call whose payload is not an object (in this mode),
            // so the fallback (no properties) is for a raw peer of ours only.
            let mut object = object_of(payload).unwrap_or_else(|| PhpObject::new(""));
            object.class = method.as_str().as_bytes().to_vec();
            set_id(&mut object, PhpValue::Int(*id as i64));
            PhpValue::Object(object)
        }
        Envelope::Notification {
            method, payload, ..
        } => {
            let mut object = object_of(payload).unwrap_or_else(|| PhpObject::new(""));
            object.class = method.as_str().as_bytes().to_vec();
            let id = NOTIFICATION_IDS.fetch_sub(1, Ordering::Relaxed);
            set_id(&mut object, PhpValue::Int(id));
            PhpValue::Object(object)
        }
        Envelope::Response {
            id,
            attributes,
            payload,
        } => match attributes.get(POSITION_ATTRIBUTE) {
            Some(position) => iterator_continue(*id, position, payload),
            None => response(*id, payload),
        },
        Envelope::Error { id, error, .. } => {
            let id = php_request(*id);
            PhpValue::Object(error_object(ERROR, error, id, PhpValue::Int(own_id())))
        }
        Envelope::Fatal { code, message } => {
            let error = ErrorBody {
                code: *code,
                message: message.clone(),
                data: None,
            };
            PhpValue::Object(error_object(FATAL, &error, PhpValue::Null, PhpValue::Null))
        }
        Envelope::Goodbye { .. } => PhpValue::Null,
        // Nothing: `carries` keeps the writer from getting here.
        _ => return,
    };
    let mut bytes = Vec::new();
    value.write(&mut bytes);
    dst.extend_from_slice(&bytes);
}

/// An answer: the handler's object with `requestId`, `SuccessResponse` for the unit value,
/// an `ErrorResponse` for what PHP cannot take as one (it would stop on a non-object).
fn response(id: u64, payload: &[u8]) -> PhpValue {
    let object = match payload {
        b"" | b"N;" => Some(PhpObject::new(SUCCESS)),
        payload => object_of(payload),
    };
    let Some(mut object) = object else {
        tracing::error!(
            id,
            "a handler answered a PHP peer with a value that is not an object: answered with an \
             error instead (answer with a struct: its serde name is the PHP class)"
        );
        return internal_error(id, "the handler's answer is not an object");
    };
    set_request_id(&mut object, id);
    set_id(&mut object, PhpValue::Int(own_id()));
    PhpValue::Object(object)
}

/// An `ErrorResponse` to the peer's request `id`, for an answer this side cannot send.
fn internal_error(id: u64, message: &str) -> PhpValue {
    let error = ErrorBody {
        code: code::INTERNAL_ERROR,
        message: message.into(),
        data: None,
    };
    let own = PhpValue::Int(own_id());
    PhpValue::Object(error_object(ERROR, &error, php_request(id), own))
}

/// The answer to a pull: the item (our payload is a one-item sequence) or, at the end,
/// `continue=false` with `null` position and value, as PHP sends them.
fn iterator_continue(id: u64, position: &str, payload: &[u8]) -> PhpValue {
    let item = match PhpValue::from_bytes(payload, &OWN_LIMITS) {
        Ok(PhpValue::Array(mut items)) if items.len() == 1 => items.pop().map(|(_, item)| item),
        _ => None,
    };
    let (more, position, value) = match (item, position.parse::<i64>()) {
        (Some(PhpValue::Null), _) => {
            let message = "the iterator yielded null, which a PHP RemoteIterator cannot take";
            return internal_error(id, message);
        }
        (Some(item), Ok(position)) => (true, PhpValue::Int(position), item),
        _ => (false, PhpValue::Null, PhpValue::Null),
    };
    let mut object = PhpObject::new(CONTINUE_RESPONSE)
        .with(Property::public("continue"), PhpValue::Bool(more))
        .with(Property::public("position"), position)
        .with(Property::public("value"), value)
        .with(Property::public("requestId"), php_request(id));
    set_id(&mut object, PhpValue::Int(own_id()));
    PhpValue::Object(object)
}

/// `class` is the PHP library's `name`, in the namespace the wire has it in or in `Response\`,
/// where the library's README puts its built-in responses.
fn is_library(class: &[u8], name: &str) -> bool {
    let Some(rest) = class.strip_prefix(ns!("").as_bytes()) else {
        return false;
    };
    let rest = rest.strip_prefix(b"Response\\").unwrap_or(rest);
    rest == name.as_bytes()
}

fn malformed(header: PartialHeader, message: impl std::fmt::Display) -> EnvelopeError {
    EnvelopeError {
        header,
        error: CodecError::new(NAME, message),
    }
}

fn int_property(object: &PhpObject, name: &[u8]) -> Option<i64> {
    match object.get(name) {
        Some(PhpValue::Int(value)) => Some(*value),
        _ => None,
    }
}

fn string_property(object: &PhpObject, name: &[u8]) -> String {
    match object.get(name) {
        Some(PhpValue::String(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
        _ => String::new(),
    }
}

/// Reads a frame as PHP means it. The payload of a request or an answer is the frame itself
/// (an object, read by the handler's type); PHP's own classes become the envelopes they are.
pub(crate) fn decode(frame: Bytes) -> Result<Envelope, EnvelopeError> {
    let value = PhpValue::from_bytes(&frame, &DecodeLimits::default())
        .map_err(|e| malformed(salvaged_header(&frame), e))?;
    let object = match value {
        PhpValue::Null => {
            return Ok(Envelope::Goodbye {
                reason: String::new(),
            })
        }
        PhpValue::Object(object) => object,
        other if other.is_falsy() => {
            // PHP's read loop stops on a falsy value as it does on `null`.
            return Ok(Envelope::Goodbye {
                reason: format!("the peer sent {other}, which ends a PHP peer's read loop"),
            });
        }
        other => {
            return Err(malformed(
                PartialHeader::default(),
                format_args!("a PHP frame carries an object or null, not {other}"),
            ))
        }
    };
    let class = object.class.as_slice();
    let error_body = |object: &PhpObject| ErrorBody {
        code: int_property(object, b"code").unwrap_or(0),
        message: string_property(object, b"message"),
        data: None,
    };
    if is_library(class, "FatalErrorResponse") {
        let error = error_body(&object);
        return Ok(Envelope::Fatal {
            code: error.code,
            message: error.message,
        });
    }
    if class == CONTINUE_REQUEST.as_bytes() {
        let id = int_property(&object, b"id").map(peer_request);
        let header = PartialHeader {
            kind: Some(EnvelopeKind::Request),
            id,
            method: None,
        };
        let (Some(id), Some(stream)) = (id, int_property(&object, b"iteratorId")) else {
            return Err(malformed(
                header,
                "an IteratorContinue needs an int id and iteratorId",
            ));
        };
        let mut payload = Vec::new();
        PhpValue::Int(stream).write(&mut payload);
        return Ok(Envelope::Request {
            id,
            method: Method::from_static(PULL_METHOD),
            attributes: Attributes::new(),
            timeout_us: 0,
            parent: 0,
            payload: payload.into(),
        });
    }
    if object.get(b"requestId").is_some() {
        // NB. A `requestId` of null answers nothing pending here (our ids are never null):
        // id 0 is never ours, so such an answer is dropped as a late one.
        let id = int_property(&object, b"requestId").map_or(0, |id| id as u64);
        if is_library(class, "ErrorResponse") {
            let error = error_body(&object);
            return Ok(Envelope::Error {
                id,
                attributes: Attributes::new(),
                error,
            });
        }
        if is_library(class, "SuccessResponse") || is_library(class, "AcceptedResponse") {
            return Ok(Envelope::Response {
                id,
                attributes: Attributes::new(),
                payload: Bytes::new(),
            });
        }
        if class == CONTINUE_RESPONSE.as_bytes() {
            let header = PartialHeader {
                kind: Some(EnvelopeKind::Response),
                id: Some(id),
                method: None,
            };
            return continued(id, &object).map_err(|message| malformed(header, message));
        }
        return Ok(Envelope::Response {
            id,
            attributes: Attributes::new(),
            payload: frame,
        });
    }
    // PHP itself accepts the plain and protected spellings of the private `id`. A request
    // without one (PHP's `LegacyPingRequest`) gets one of ours, as PHP does; one whose `id`
    // is not an int cannot be answered (any answer would name an id the peer never sent).
    let id = match object.get(b"id") {
        None => own_id(),
        Some(PhpValue::Int(id)) => *id,
        Some(other) => {
            return Err(malformed(
                PartialHeader::default(),
                format_args!("a request whose `id` is {other}, not an int: it is not answered"),
            ))
        }
    };
    let id = peer_request(id);
    let Ok(method) = std::str::from_utf8(class) else {
        let header = PartialHeader {
            kind: Some(EnvelopeKind::Request),
            id: Some(id),
            method: Some(Method::from(String::from_utf8_lossy(class).into_owned())),
        };
        return Err(malformed(header, "a class name that is not UTF-8"));
    };
    let method = Method::from(method.to_owned());
    Ok(Envelope::Request {
        id,
        method,
        attributes: Attributes::new(),
        timeout_us: 0,
        parent: 0,
        payload: frame,
    })
}

/// What can be read of a frame that does not decode, to answer it (a request: with an error)
/// or fail the call it answers, rather than leave the peer, which has no timeouts, waiting.
fn salvaged_header(frame: &[u8]) -> PartialHeader {
    let Some(salvaged) = crate::php::salvage(frame) else {
        return PartialHeader::default();
    };
    if let Some(request_id) = salvaged.request_id {
        return PartialHeader {
            kind: Some(EnvelopeKind::Response),
            id: Some(request_id as u64),
            method: None,
        };
    }
    match salvaged.id {
        Some(id) => PartialHeader {
            kind: Some(EnvelopeKind::Request),
            id: Some(peer_request(id)),
            method: Some(Method::from(
                String::from_utf8_lossy(&salvaged.class).into_owned(),
            )),
        },
        None => PartialHeader::default(),
    }
}

/// `Response\IteratorContinue` as the answer to a pull: a one-item sequence with its position,
/// or the empty sequence at the end.
fn continued(id: u64, object: &PhpObject) -> Result<Envelope, &'static str> {
    let more = match object.get(b"continue") {
        Some(PhpValue::Bool(more)) => *more,
        _ => return Err("an IteratorContinue answer needs a bool `continue`"),
    };
    let mut attributes = Attributes::new();
    let items = if more {
        let Some(position) = int_property(object, b"position").filter(|p| *p >= 0) else {
            return Err("an IteratorContinue answer needs an int `position` from 0");
        };
        attributes.insert(POSITION_ATTRIBUTE, position.to_string());
        let value = object.get(b"value").cloned().unwrap_or(PhpValue::Null);
        vec![(ArrayKey::Int(0), value)]
    } else {
        Vec::new()
    };
    let mut payload = Vec::new();
    PhpValue::Array(items).write(&mut payload);
    Ok(Envelope::Response {
        id,
        attributes,
        payload: payload.into(),
    })
}
