//! channel-dispatcher and tarpc side by side in one run: a 32-byte string echoed over a Unix
//! socket pair in one process, sequentially and with 1024 calls in flight. (The raw-transport
//! baseline is in the main crate's `roundtrip` bench.) Ratio: tarpc's time / ours.
//!
//! ```text
//! cd comparisons && cargo run --release
//! ```

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use channel_dispatcher::{request, Channel, Context, Dispatcher, HandlerError, Router};
use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tarpc::serde_transport;
use tarpc::server::{BaseChannel, Channel as _};
use tarpc::tokio_serde::formats::Bincode;
use tokio::net::UnixStream;
use tokio_util::codec::LengthDelimitedCodec;

const PAYLOAD: &str = "0123456789abcdef0123456789abcdef";

#[derive(Serialize, Deserialize)]
struct Echo(String);
request!(Echo => String, "echo");

#[tarpc::service]
trait EchoService {
    async fn echo(s: String) -> String;
}

#[derive(Clone)]
struct EchoServer;

impl EchoService for EchoServer {
    async fn echo(self, _: tarpc::context::Context, s: String) -> String {
        s
    }
}

async fn ours(total: usize, window: usize) -> Duration {
    let (a, b) = UnixStream::pair().unwrap();
    let router = Router::new().request(|_cx: Context, Echo(s)| async move { Ok::<_, HandlerError>(s) });
    let _server = Dispatcher::builder().handler(router).spawn(Channel::from(b));
    let client = Dispatcher::builder().connect(Channel::from(a)).await.unwrap();
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for _ in 0..total {
        if in_flight.len() == window {
            in_flight.next().await;
        }
        in_flight.push(client.request(Echo(PAYLOAD.into())).into_future());
    }
    while in_flight.next().await.is_some() {}
    let elapsed = start.elapsed();
    client.stop().await;
    elapsed
}

async fn tarpc(total: usize, window: usize) -> Duration {
    let (a, b) = UnixStream::pair().unwrap();
    let server_transport = serde_transport::new(LengthDelimitedCodec::builder().new_framed(b), Bincode::default());
    tokio::spawn(
        BaseChannel::with_defaults(server_transport)
            .execute(EchoServer.serve())
            .for_each(|response| async move {
                tokio::spawn(response);
            }),
    );
    let client_transport = serde_transport::new(LengthDelimitedCodec::builder().new_framed(a), Bincode::default());
    let mut config = tarpc::client::Config::default();
    config.max_in_flight_requests = window.max(1024);
    config.pending_request_buffer = window.max(100);
    let client = EchoServiceClient::new(config, client_transport).spawn();
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for _ in 0..total {
        if in_flight.len() == window {
            in_flight.next().await;
        }
        let client = client.clone();
        in_flight.push(async move { client.echo(tarpc::context::current(), PAYLOAD.into()).await.unwrap() });
    }
    while in_flight.next().await.is_some() {}
    start.elapsed()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("32-byte echo over a Unix socket pair, one process, multi-thread runtime (2 workers); best of 3");
        println!("{:<22} {:>18} {:>16} {:>8}", "case", "channel-dispatcher", "tarpc 0.37", "ratio");
        for (name, total, window) in [("sequential", 20_000, 1), ("1024 in flight", 200_000, 1024)] {
            let mut best = [Duration::MAX; 2];
            for _ in 0..3 {
                best[0] = best[0].min(ours(total, window).await);
                best[1] = best[1].min(tarpc(total, window).await);
            }
            let show = |d: Duration| {
                if window == 1 {
                    format!("{:.2} us/call", d.as_secs_f64() * 1e6 / total as f64)
                } else {
                    format!("{:.0} k/s", total as f64 / d.as_secs_f64() / 1e3)
                }
            };
            let ratio = best[1].as_secs_f64() / best[0].as_secs_f64();
            println!("{:<22} {:>18} {:>16} {:>7.2}x", name, show(best[0]), show(best[1]), ratio);
        }
    });
}
