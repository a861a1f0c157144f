//! Middleware around a handler: a tracing logger, an auth check on an attribute token and a
//! timer, in the PHP original's order (the first is outermost), plus a caller-side middleware
//! that adds the token to every outgoing request.
//!
//! ```text
//! cargo run --example middleware
//! ```

use std::error::Error;
use std::time::Instant;

use channel_dispatcher::error::code;
use channel_dispatcher::middleware::{from_fn, stack_middleware, Middleware, Next, OutgoingCall};
use channel_dispatcher::{request, Channel, Context, Dispatcher, Incoming, Reply, Router};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Greet(String);
request!(Greet => String, "greet");

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_target(false)
        .init();

    let logger = from_fn(|incoming: Incoming, next: Next| async move {
        let (method, id) = (incoming.method().to_owned(), incoming.id());
        tracing::info!(%method, ?id, "-> request");
        let reply = next.run(incoming).await;
        match &reply {
            Ok(reply) => tracing::info!(%method, error = ?reply.error_code(), "<- reply"),
            Err(error) => tracing::warn!(%method, %error, "<- failed"),
        }
        reply
    });
    let auth = from_fn(|incoming: Incoming, next: Next| async move {
        if incoming.attributes().get("token") != Some("s3cret") {
            // Short-circuit: the handler never runs.
            return Ok(Reply::error(
                code::INVALID_REQUEST,
                "missing or wrong token",
            ));
        }
        next.run(incoming).await
    });
    let timer = from_fn(|incoming: Incoming, next: Next| async move {
        let started = Instant::now();
        let reply = next.run(incoming).await?;
        let took = format!("{}us", started.elapsed().as_micros());
        Ok(reply.with_attribute("took", took))
    });

    let router = Router::new()
        .request(|_cx: Context, Greet(name)| async move { Ok(format!("hello, {name}")) });
    let handler = stack_middleware(
        router,
        [logger.boxed(), auth.clone().boxed(), timer.boxed()],
    );

    let (a, b) = Channel::pair();
    let server = Dispatcher::builder().handler(handler).spawn(b);
    let anonymous = Dispatcher::builder().spawn(a);

    match anonymous.request(Greet("mallory".into())).await {
        Err(e) => println!(
            "without a token: {}",
            e.as_remote().map_or(e.to_string(), |r| r.message.clone())
        ),
        Ok(answer) => println!("without a token: unexpectedly answered {answer:?}"),
    }
    anonymous.stop().await;
    server.closed().await;

    // The caller side: every outgoing request gets the token from a middleware.
    let (a, b) = Channel::pair();
    let handler = stack_middleware(
        Router::new()
            .request(|_cx: Context, Greet(name)| async move { Ok(format!("hello, {name}")) }),
        [auth.boxed()],
    );
    let _server = Dispatcher::builder().handler(handler).spawn(b);
    let with_token = from_fn(|mut call: OutgoingCall, next: Next<OutgoingCall>| {
        call.attributes_mut().insert("token", "s3cret");
        next.run(call)
    });
    let client = Dispatcher::builder().outbound(with_token).spawn(a);
    println!(
        "with a token:    {}",
        client.request(Greet("alice".into())).await?
    );
    client.stop().await;
    Ok(())
}
