//! The public types can cross threads: checked at compile time.

use channel_dispatcher::middleware::{MiddlewareFuture, Next, Stack};
use channel_dispatcher::{
    CallError, Connection, Context, Dispatcher, Incoming, RawResponse, RemoteStream, Reply,
    ResponseFuture, Router, Streams, Termination,
};

fn send<T: Send>() {}
fn sync<T: Sync>() {}

#[test]
fn handles_futures_and_streams_are_send() {
    send::<Dispatcher>();
    sync::<Dispatcher>();
    send::<Connection<Router>>();
    send::<Connection<Stack<Router>>>();
    send::<ResponseFuture<String>>();
    send::<ResponseFuture<RawResponse>>();
    send::<RemoteStream<u64>>();
    send::<Context>();
    sync::<Context>();
    send::<Incoming>();
    send::<Reply>();
    send::<Next>();
    send::<MiddlewareFuture>();
    send::<Streams>();
    sync::<Streams>();
    send::<CallError>();
    sync::<CallError>();
    send::<Termination>();
    sync::<Termination>();
}
