//! Memory per pending call, both sides together: one process holds a client and a server
//! connected by a Unix socket; the client makes 10,000 calls whose handlers all wait, and the
//! process's resident memory grows by what those calls hold (the call futures, their answer
//! slots, the pending maps, the handlers' futures and contexts, the frames in the buffers).
//!
//! The baseline, in the same run: a raw length-prefixed peer that holds each request's body
//! until all have come (the least a pending call can cost), the client keeping only a count.
//!
//! ```text
//! cargo bench --bench memory
//! cargo bench --bench memory -- --calls 100000
//! ```
//! Each case runs in a fresh process (this binary again, with `--only raw|dispatcher`):
//! memory freed by one case would be reused by the next and hide its cost. The growth is
//! counted in KiB pages from before the first call: at 10,000 calls one page is under half a
//! byte per call.
#![allow(missing_docs)]

use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_dispatcher::{request, Channel, Context, Dispatcher, Limits, Router};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

const PAYLOAD: &str = "0123456789abcdef0123456789abcdef"; // 32 bytes

#[derive(Serialize, Deserialize)]
struct Echo(String);
request!(Echo => String, "echo");

/// This process's resident set, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("a Linux /proc");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Bytes per pending call, with `calls` outstanding.
async fn pending_calls(calls: usize) -> f64 {
    let (a, b) = UnixStream::pair().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let router = Router::new().request({
        let (gate, entered) = (Arc::clone(&gate), Arc::clone(&entered));
        move |_cx: Context, Echo(s)| {
            let (gate, entered) = (Arc::clone(&gate), Arc::clone(&entered));
            async move {
                entered.fetch_add(1, Ordering::Relaxed);
                gate.acquire().await.unwrap().forget();
                Ok(s)
            }
        }
    });
    let mut limits = Limits::default();
    limits.max_pending_requests = calls;
    let server = Dispatcher::builder()
        .limits(limits)
        .max_concurrent_handlers(calls)
        .handler(router)
        .spawn(Channel::from(b));
    let client = Dispatcher::builder()
        .max_in_flight(calls)
        .connect(Channel::from(a))
        .await
        .unwrap();
    // The futures' own bytes live in this vector, allocated before the count starts; they
    // are added back below.
    let mut futures = Vec::with_capacity(calls);
    let before = rss_kib();
    for _ in 0..calls {
        futures.push(client.request(Echo(PAYLOAD.into())).into_future());
    }
    while entered.load(Ordering::Relaxed) < calls {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let during = rss_kib();
    gate.add_permits(calls);
    for answer in futures_util::future::join_all(futures).await {
        assert_eq!(answer.unwrap(), PAYLOAD);
    }
    drop((client, server));
    let heap = during.saturating_sub(before) as f64 * 1024.0 / calls as f64;
    heap + std::mem::size_of::<channel_dispatcher::ResponseFuture<String>>() as f64
}

/// Bytes per pending request of a raw peer: the server holds `calls` bodies, then answers.
async fn raw_pending(calls: usize) -> f64 {
    let (a, b) = UnixStream::pair().unwrap();
    let before = rss_kib();
    let server = tokio::spawn(async move {
        let (read, write) = b.into_split();
        let mut reader = BufReader::new(read);
        let mut held = Vec::with_capacity(calls);
        for _ in 0..calls {
            let len = reader.read_u32().await.unwrap();
            let mut body = vec![0; len as usize];
            reader.read_exact(&mut body).await.unwrap();
            held.push(body);
        }
        let during = rss_kib();
        let mut writer = BufWriter::new(write);
        for body in held {
            writer.write_u32(body.len() as u32).await.unwrap();
            writer.write_all(&body).await.unwrap();
        }
        writer.flush().await.unwrap();
        during
    });
    let (read, write) = a.into_split();
    let client = tokio::spawn(async move {
        let mut writer = BufWriter::new(write);
        for _ in 0..calls {
            writer.write_u32(PAYLOAD.len() as u32).await.unwrap();
            writer.write_all(PAYLOAD.as_bytes()).await.unwrap();
        }
        writer.flush().await.unwrap();
        writer
    });
    let mut reader = BufReader::new(read);
    let mut body = vec![0; PAYLOAD.len()];
    for _ in 0..calls {
        assert_eq!(reader.read_u32().await.unwrap() as usize, PAYLOAD.len());
        reader.read_exact(&mut body).await.unwrap();
    }
    drop(client.await.unwrap());
    let during = server.await.unwrap();
    during.saturating_sub(before) as f64 * 1024.0 / calls as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let calls: usize = args
        .iter()
        .position(|a| a == "--calls")
        .and_then(|i| args.get(i + 1))
        .map_or(10_000, |n| n.parse().expect("--calls <n>"));
    if let Some(i) = args.iter().position(|a| a == "--only") {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let bytes = match args.get(i + 1).map(String::as_str) {
            Some("raw") => runtime.block_on(raw_pending(calls)),
            _ => runtime.block_on(pending_calls(calls)),
        };
        return println!("{bytes}");
    }
    let run = |case: &str| -> f64 {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--only", case, "--calls", &calls.to_string()])
            .output()
            .expect("the bench runs itself");
        assert!(output.status.success(), "{case}: {output:?}");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap()
    };
    let (dispatcher, raw) = (run("dispatcher"), run("raw"));
    println!(
        "memory: {calls} calls pending at once, both sides in one process, current-thread runtime"
    );
    println!("bytes per pending call, dispatcher (RSS growth / calls + the call future) {dispatcher:>6.0}");
    println!(
        "bytes per pending request, raw peer holding the bodies                     {raw:>6.0}"
    );
    println!(
        "ratio                                                                     {:>5.1}x",
        dispatcher / raw.max(1.0)
    );
}
