//! The messages of the PHP example, as `messages.php` declares them on the PHP side (global
//! namespace): a struct's name is its PHP class and its fields are the constructor's
//! parameters, in order. The private `id` and the answers' `requestId` are the wire's: the
//! codec adds them. And the worker's routes, shared by the example and its tests.

#![allow(dead_code)] // the worker serves some, the client sends others

use channel_dispatcher::php::PhpValue;
use channel_dispatcher::{notification, request, Context, HandlerError, Router, Success};
use serde::{Deserialize, Serialize};

/// The worker's requests: `PingRequest` (answered `"pong: " + note`), `EchoRequest` (the
/// payload back, exactly), `OpenIteratorRequest` (an iterator of `"item-0"`, `"item-1"`, ...
/// that PHP's `RemoteIterator` pulls) and `ThrowRequest` (an `ErrorResponse` with its message
/// and code). The caller adds what `NotifyRequest` does.
pub(crate) fn router() -> Router {
    Router::new()
        .request(|_cx: Context, PingRequest { note }| async move {
            Ok(PongResponse {
                reply: format!("pong: {note}"),
            })
        })
        .request(
            |_cx: Context, EchoRequest { payload }| async move { Ok(EchoResponse { payload }) },
        )
        .request(|cx: Context, OpenIteratorRequest { count }| async move {
            let streams = cx
                .streams()
                .ok_or_else(|| HandlerError::internal("the connection has ended"))?;
            let items = (0..count.max(0)).map(|i| Ok(format!("item-{i}")));
            let iterator_id = streams.add(futures_util::stream::iter(items))?;
            Ok(OpenIteratorResponse { iterator_id })
        })
        .request(|_cx: Context, ThrowRequest { message, code }| async move {
            Err::<Success, _>(HandlerError::new(code, message))
        })
}

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
