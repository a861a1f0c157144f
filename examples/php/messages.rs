//! The messages of the PHP example, as `messages.php` declares them on the PHP side (global
//! namespace): a struct's name is its PHP class and its fields are the constructor's
//! parameters, in order. The private `id` and the answers' `requestId` are the wire's: the
//! codec adds them.

#![allow(dead_code)] // the worker serves some, the client sends others

use channel_dispatcher::php::PhpValue;
use channel_dispatcher::{notification, request, Success};
use serde::{Deserialize, Serialize};

/// Answered with a [`PongResponse`] of `"pong: " + note`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct PingRequest {
    pub(crate) note: String,
}
request!(PingRequest => PongResponse, "PingRequest");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct PongResponse {
    pub(crate) reply: String,
}

/// Answered with the same payload, exactly: same types, same key order, same bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct EchoRequest {
    pub(crate) payload: PhpValue,
}
request!(EchoRequest => EchoResponse, "EchoRequest");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct EchoResponse {
    pub(crate) payload: PhpValue,
}

/// Answered with the id of an iterator of `"item-0"`, `"item-1"`, ... (`count` items), which
/// the caller pulls with the PHP library's `IteratorContinue`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct OpenIteratorRequest {
    pub(crate) count: i64,
}
request!(OpenIteratorRequest => OpenIteratorResponse, "OpenIteratorRequest");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct OpenIteratorResponse {
    #[serde(rename = "iteratorId")]
    pub(crate) iterator_id: u64,
}

/// The PHP test peer's handler throws `RuntimeException(message, code)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ThrowRequest {
    pub(crate) message: String,
    pub(crate) code: i64,
}
request!(ThrowRequest => Success, "ThrowRequest");

/// No handler on either side: answered with PHP's 404.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct UnknownRequest {
    pub(crate) what: String,
}
request!(UnknownRequest => Success, "UnknownRequest");

/// The PHP test peer answers it with a `FatalErrorResponse`, which ends the link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct FatalRequest {
    pub(crate) message: String,
}
request!(FatalRequest => Success, "FatalRequest");

/// A PHP `MeekRequest`: a notification, never answered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct NotifyRequest {
    pub(crate) text: String,
}
notification!(NotifyRequest, "NotifyRequest");
