//! Remote streams against a raw one-way frame stream, in one run: 1 million items of 32 bytes
//! over a Unix socket, in pull mode (a round trip per item), windowed mode, and raw
//! length-prefixed frames of the same items written and read by plain tokio code.
//!
//! ```text
//! cargo bench --bench streams                     # the builder's default window
//! cargo bench --bench streams -- --items 100000 --window 256
//! ```
//! For callgrind, `--profile` runs the windowed stream alone, and `--profile --raw` the raw
//! frames alone; difference two item counts to take the start-up out.
#![allow(missing_docs)]

use std::borrow::Cow;
use std::time::{Duration, Instant};

use channel_dispatcher::{stream_request, Channel, Context, Dispatcher, Router};
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;

const ITEM: &str = "0123456789abcdef0123456789abcdef"; // 32 bytes

#[derive(Serialize, Deserialize)]
struct Items(u64);
// NB. A `Cow`: the producer lends the same `&'static str` each time, as the raw writer does, so
// the bench's own allocation is not counted; the consumer decodes an owned `String` each, as
// the raw reader makes one.
stream_request!(Items => Cow<'static, str>, "items");

/// The window is the builder's default unless `window` says otherwise.
async fn dispatchers(window: Option<u64>) -> (Dispatcher, Dispatcher) {
    let (a, b) = UnixStream::pair().unwrap();
    let router = Router::new().stream(|_cx: Context, Items(n)| async move {
        Ok(stream::iter((0..n).map(|_| Ok(Cow::Borrowed(ITEM)))))
    });
    let server = Dispatcher::builder()
        .handler(router)
        .spawn(Channel::from(b));
    let client = match window {
        Some(window) => Dispatcher::builder().stream_window(window),
        None => Dispatcher::builder(),
    };
    let client = client.connect(Channel::from(a)).await.unwrap();
    (client, server)
}

async fn remote(items: u64, window: Option<u64>, pull: bool) -> Duration {
    let (client, _server) = dispatchers(window).await;
    let start = Instant::now();
    let stream = client.stream(Items(items));
    let stream = if pull { stream.pull_mode() } else { stream };
    let count = stream
        .fold(0u64, |n, item| async move {
            assert_eq!(item.unwrap().len(), ITEM.len());
            n + 1
        })
        .await;
    assert_eq!(count, items);
    let elapsed = start.elapsed();
    client.stop().await;
    elapsed
}

async fn raw(items: u64) -> Duration {
    let (a, b) = UnixStream::pair().unwrap();
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut writer = BufWriter::with_capacity(64 * 1024, a);
        for _ in 0..items {
            writer.write_u32(ITEM.len() as u32).await.unwrap();
            writer.write_all(ITEM.as_bytes()).await.unwrap();
        }
        writer.flush().await.unwrap();
    });
    let mut reader = BufReader::with_capacity(64 * 1024, b);
    let mut body = Vec::new();
    for _ in 0..items {
        let len = reader.read_u32().await.unwrap() as usize;
        body.resize(len, 0);
        reader.read_exact(&mut body).await.unwrap();
        // The same per-item work a consumer does: an owned item.
        let item = String::from_utf8(body.clone()).unwrap();
        assert_eq!(item.len(), ITEM.len());
    }
    writer.await.unwrap();
    start.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let items = args
        .iter()
        .position(|a| a == "--items")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(1_000_000u64);
    let window = args
        .iter()
        .position(|a| a == "--window")
        .and_then(|i| args.get(i + 1)?.parse::<u64>().ok());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if args.iter().any(|a| a == "--profile") {
        // For profilers: the windowed stream alone, or with `--raw` the raw frames alone.
        let elapsed = match args.iter().any(|a| a == "--raw") {
            true => runtime.block_on(raw(items)),
            false => runtime.block_on(remote(items, window, false)),
        };
        println!("{items} items in {elapsed:?}");
        return;
    }
    runtime.block_on(async {
        let raw = raw(items).await;
        let windowed = remote(items, window, false).await;
        let pull = remote(items, window, true).await;
        let rate = |d: Duration| items as f64 / d.as_secs_f64();
        let window = window.map_or("the default window".into(), |w| format!("window {w}"));
        println!("streams: {items} items of 32 bytes, {window}, Unix socket, one process, multi-thread runtime (2 workers)");
        println!("raw frames     {:>12.0} items/s", rate(raw));
        println!(
            "windowed       {:>12.0} items/s   {:.2}x the raw time",
            rate(windowed),
            windowed.as_secs_f64() / raw.as_secs_f64()
        );
        println!(
            "pull           {:>12.0} items/s   windowed is {:.0}x faster",
            rate(pull),
            pull.as_secs_f64() / windowed.as_secs_f64()
        );
    });
}
