//! Round trips through five no-op middlewares vs none, in the same run: what a middleware costs
//! per call. One process, a Unix socket pair, 64 calls in flight, best of 5 runs.
//!
//! ```text
//! cargo bench --bench middleware
//! valgrind --tool=callgrind target/release/deps/middleware-<hash> --only 5   # instructions
//! ```
#![allow(missing_docs)]

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use channel_dispatcher::middleware::{from_fn, stack_middleware, Middleware, Next};
use channel_dispatcher::{request, Channel, Context, Dispatcher, Incoming, Router};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

#[derive(Serialize, Deserialize)]
struct Echo(String);
request!(Echo => String, "echo");

const CALLS: usize = 100_000;
const WINDOW: usize = 64;

fn router() -> Router {
    Router::new().request(|_cx: Context, Echo(s)| async move { Ok(s) })
}

async fn run(middlewares: usize) -> Duration {
    let (a, b) = UnixStream::pair().unwrap();
    let noop = from_fn(|incoming: Incoming, next: Next| next.run(incoming));
    let stack = stack_middleware(router(), (0..middlewares).map(|_| noop.clone().boxed()));
    let _server = Dispatcher::builder().handler(stack).spawn(Channel::from(b));
    let client = Dispatcher::builder()
        .connect(Channel::from(a))
        .await
        .unwrap();
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::<channel_dispatcher::ResponseFuture<String>>::new();
    for _ in 0..CALLS {
        if in_flight.len() == WINDOW {
            in_flight.next().await.unwrap().unwrap();
        }
        in_flight.push(
            client
                .request(Echo("0123456789abcdef".into()))
                .into_future(),
        );
    }
    while let Some(answer) = in_flight.next().await {
        answer.unwrap();
    }
    let elapsed = start.elapsed();
    client.stop().await;
    elapsed
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // `--only N`: one run with N middlewares, for `valgrind --tool=callgrind`.
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--only") {
        let middlewares = args[i + 1].parse().unwrap();
        runtime.block_on(run(middlewares));
        return;
    }
    runtime.block_on(async {
        let mut best = [Duration::MAX; 2];
        // Alternate the two cases so drift on a noisy machine hits both alike.
        for _ in 0..5 {
            for (slot, middlewares) in [(0, 0), (1, 5)] {
                best[slot] = best[slot].min(run(middlewares).await);
            }
        }
        let per_call = |d: Duration| d.as_secs_f64() * 1e9 / CALLS as f64;
        let (none, five) = (per_call(best[0]), per_call(best[1]));
        println!("middleware: {CALLS} round trips, {WINDOW} in flight, one process, Unix socket, current-thread runtime");
        println!("no middleware       {none:>8.0} ns per call");
        println!("5 no-op middlewares {five:>8.0} ns per call");
        println!("cost per middleware {:>8.0} ns per call", (five - none) / 5.0);
    });
}
