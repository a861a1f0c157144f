//! A payload nested deeper than any message needs is a decode error, answered as such, not a
//! stack overflow. Alone in its own test binary: on failure it aborts the whole process.

mod support;

use channel_dispatcher::error::code;
use channel_dispatcher::{request, Context, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use support::raw::RawPeer;

/// Any value: decoding one recurses as deep as the payload is nested.
#[derive(Serialize, Deserialize)]
struct Deep(serde_json::Value);
request!(Deep => (), "deep");

fn router() -> Router {
    Router::new()
        .request(|_cx: Context, Deep(_)| async move { Ok(()) })
        .request(|_cx: Context, support::Echo(s)| async move { Ok(s) })
}

/// `depth` one-element MessagePack arrays, one inside the other, around a nil.
fn nested(depth: usize) -> Vec<u8> {
    let mut payload = vec![0x91; depth];
    payload.push(0xc0);
    payload
}

// issue 8, item 10
#[tokio::test]
async fn a_payload_nested_1000_deep_is_answered_invalid_params() {
    let (_dispatcher, mut peer) = RawPeer::connect(router(), 1 << 20).await;
    peer.request_with_raw_payload(1, "deep", &nested(1000))
        .await;
    let answer = peer.read().await;
    assert_eq!((&answer[0], &answer[1]), (&json!(4), &json!(1)), "{answer}");
    assert_eq!(answer[3], code::INVALID_PARAMS, "{answer}");
    peer.request(2, "echo", "still up").await;
    assert_eq!(peer.read().await, json!([3, 2, {}, "still up"]));
}

// issue 8, item 10
#[tokio::test]
async fn a_payload_nested_100_deep_is_still_decoded() {
    // Under the depth limit: the limit must not refuse ordinary nesting.
    let (_dispatcher, mut peer) = RawPeer::connect(router(), 1 << 20).await;
    peer.request_with_raw_payload(1, "deep", &nested(100)).await;
    assert_eq!(peer.read().await, json!([3, 1, {}, null]));
}
