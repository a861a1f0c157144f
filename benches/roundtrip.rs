#![allow(missing_docs)]
//! Round trips through the dispatcher, side by side with a raw tokio length-prefixed echo over
//! the same kind of Unix socket, in the same run: sequential latency and pipelined throughput
//! (64 and 1024 in flight), within one process and between two.
//!
//! ```text
//! cargo bench --bench roundtrip                    # everything
//! cargo bench --bench roundtrip -- --quick         # fewer iterations
//! cargo bench --bench roundtrip -- --current-thread
//! ```
//! The two-process cases spawn this binary again as the peer, connected by a Unix socket.
//! The clients (raw and dispatcher alike) run in the runtime's main future; with
//! `CLIENT_TASK=1` each runs in a task of its own, as a server's callers do: a call's answer
//! then wakes its caller inside the runtime, where the main future is woken through the I/O
//! driver (one more system call and park per wake on the current-thread runtime).

#[path = "support/raw_echo.rs"]
mod raw_echo;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use channel_dispatcher::{request, Channel, Context, Dispatcher, Router};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use raw_echo::raw_echo;

const PAYLOAD: &str = "0123456789abcdef0123456789abcdef"; // 32 bytes

#[derive(Serialize, Deserialize)]
struct Echo(String);
request!(Echo => String, "echo");

fn echo_router() -> Router {
    Router::new().request(|_cx: Context, Echo(s)| async move { Ok(s) })
}

// ===== raw baseline: a length-prefixed echo, with the same write coalescing =====

async fn raw_echo_server(stream: UnixStream) {
    let (read, write) = stream.into_split();
    raw_echo(read, write, 64 * 1024).await;
}

/// `total` echoes with at most `window` in flight; the writer flushes when it must wait.
async fn raw_client(stream: UnixStream, total: usize, window: usize) {
    let (read, write) = stream.into_split();
    let permits = Arc::new(Semaphore::new(window));
    let writer_permits = Arc::clone(&permits);
    let writer = tokio::spawn(async move {
        let mut writer = BufWriter::with_capacity(64 * 1024, write);
        for _ in 0..total {
            let permit = match writer_permits.try_acquire() {
                Ok(permit) => permit,
                Err(_) => {
                    writer.flush().await.unwrap();
                    writer_permits.acquire().await.unwrap()
                }
            };
            permit.forget();
            writer.write_u32(PAYLOAD.len() as u32).await.unwrap();
            writer.write_all(PAYLOAD.as_bytes()).await.unwrap();
        }
        writer.flush().await.unwrap();
        writer
    });
    let mut reader = BufReader::with_capacity(64 * 1024, read);
    let mut body = vec![0; PAYLOAD.len()];
    for _ in 0..total {
        let len = reader.read_u32().await.unwrap();
        assert_eq!(len as usize, PAYLOAD.len());
        reader.read_exact(&mut body).await.unwrap();
        permits.add_permits(1);
    }
    drop(writer.await.unwrap());
}

// ===== dispatcher =====

async fn dispatcher_client(dispatcher: &Dispatcher, total: usize, window: usize) {
    let mut in_flight = FuturesUnordered::new();
    let mut sent = 0;
    while sent < total.min(window) {
        in_flight.push(dispatcher.request(Echo(PAYLOAD.into())).into_future());
        sent += 1;
    }
    while let Some(answer) = in_flight.next().await {
        assert_eq!(answer.unwrap().len(), PAYLOAD.len());
        if sent < total {
            in_flight.push(dispatcher.request(Echo(PAYLOAD.into())).into_future());
            sent += 1;
        }
    }
}

use std::future::IntoFuture;

// ===== scenarios =====

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Raw,
    Dispatcher,
}

/// Connects to a peer in this process or in a child process; returns the client's stream.
async fn connect(
    peer: Peer,
    two_processes: bool,
    dir: &Path,
) -> (UnixStream, Option<tokio::process::Child>) {
    if !two_processes {
        let (client, server) = UnixStream::pair().unwrap();
        match peer {
            Peer::Raw => drop(tokio::spawn(raw_echo_server(server))),
            Peer::Dispatcher => {
                let dispatcher = Dispatcher::builder()
                    .handler(echo_router())
                    .spawn(Channel::from(server));
                tokio::spawn(async move { dispatcher.closed().await });
            }
        }
        return (client, None);
    }
    let path = dir.join(format!("peer-{}.sock", rand_suffix()));
    let listener = UnixListener::bind(&path).unwrap();
    let mode = if peer == Peer::Raw {
        "raw"
    } else {
        "dispatcher"
    };
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command
        .args(["--child", mode])
        .arg(&path)
        .kill_on_drop(true);
    if std::env::args().any(|a| a == "--current-thread") {
        command.arg("--current-thread");
    }
    let child = command.spawn().unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    let _ = std::fs::remove_file(&path);
    (stream, Some(child))
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    u64::from(std::process::id()) << 20 | N.fetch_add(1, Ordering::Relaxed)
}

/// Runs `total` round trips with `window` in flight; returns the elapsed time.
async fn measure(
    peer: Peer,
    two_processes: bool,
    total: usize,
    window: usize,
    dir: &Path,
) -> Duration {
    let (stream, child) = connect(peer, two_processes, dir).await;
    let in_task = std::env::var_os("CLIENT_TASK").is_some();
    let elapsed = match peer {
        Peer::Raw => {
            let start = Instant::now();
            if in_task {
                tokio::spawn(raw_client(stream, total, window))
                    .await
                    .unwrap();
            } else {
                raw_client(stream, total, window).await;
            }
            start.elapsed()
        }
        Peer::Dispatcher => {
            let dispatcher = Dispatcher::builder()
                .connect(Channel::from(stream))
                .await
                .unwrap();
            // Warm up the connection (buffers, allocator) before timing.
            dispatcher_client(&dispatcher, 1000.min(total), window).await;
            let start = Instant::now();
            if in_task {
                let client = dispatcher.clone();
                tokio::spawn(async move { dispatcher_client(&client, total, window).await })
                    .await
                    .unwrap();
            } else {
                dispatcher_client(&dispatcher, total, window).await;
            }
            let elapsed = start.elapsed();
            dispatcher.stop().await;
            elapsed
        }
    };
    if let Some(mut child) = child {
        let _ = child.kill().await;
    }
    elapsed
}

async fn child(mode: &str, path: PathBuf) {
    let stream = UnixStream::connect(path).await.unwrap();
    match mode {
        "raw" => raw_echo_server(stream).await,
        _ => {
            let dispatcher = Dispatcher::builder()
                .handler(echo_router())
                .spawn(Channel::from(stream));
            dispatcher.closed().await;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let current_thread = args.iter().any(|a| a == "--current-thread");
    let runtime = if current_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    }
    .unwrap();

    if let Some(i) = args.iter().position(|a| a == "--child") {
        let (mode, path) = (args[i + 1].clone(), PathBuf::from(&args[i + 2]));
        return runtime.block_on(child(&mode, path));
    }

    if args.iter().any(|a| a == "--profile") {
        // For profilers: one process, 1024 in flight (`PROFILE_WINDOW` to change it), the
        // dispatcher (or, with `PROFILE_RAW`, the raw echo).
        let total = std::env::var("PROFILE_TOTAL").map_or(200_000, |v| v.parse().unwrap());
        let window = std::env::var("PROFILE_WINDOW").map_or(1024, |v| v.parse().unwrap());
        let peer = match std::env::var_os("PROFILE_RAW") {
            Some(_) => Peer::Raw,
            None => Peer::Dispatcher,
        };
        let dir = std::env::temp_dir();
        let elapsed = runtime.block_on(measure(peer, false, total, window, &dir));
        println!("{total} calls in {elapsed:?}");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let dir = std::env::temp_dir().join(format!("cd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    println!(
        "roundtrip: 32-byte echo over Unix sockets, {} runtime, {} cores",
        if current_thread {
            "current-thread"
        } else {
            "multi-thread (2 workers)"
        },
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<34} {:>14} {:>14} {:>8}",
        "case", "dispatcher", "raw echo", "ratio"
    );
    runtime.block_on(async {
        for two_processes in [false, true] {
            let place = if two_processes {
                "two processes"
            } else {
                "one process"
            };
            let total = 20_000 / scale;
            let d = best_of(3, || {
                measure(Peer::Dispatcher, two_processes, total, 1, &dir)
            })
            .await;
            let r = best_of(3, || measure(Peer::Raw, two_processes, total, 1, &dir)).await;
            let (d_us, r_us) = (micros(d) / total as f64, micros(r) / total as f64);
            println!(
                "{:<34} {:>11.2} us {:>11.2} us {:>7.2}x",
                format!("sequential, {place}"),
                d_us,
                r_us,
                d_us / r_us
            );
            for window in [64, 1024] {
                let total = 200_000 / scale;
                let d = best_of(3, || {
                    measure(Peer::Dispatcher, two_processes, total, window, &dir)
                })
                .await;
                let r = best_of(3, || measure(Peer::Raw, two_processes, total, window, &dir)).await;
                let (d_rate, r_rate) = (
                    total as f64 / d.as_secs_f64(),
                    total as f64 / r.as_secs_f64(),
                );
                println!(
                    "{:<34} {:>9.0} k/s {:>9.0} k/s {:>7.2}x",
                    format!("{window} in flight, {place}"),
                    d_rate / 1e3,
                    r_rate / 1e3,
                    r_rate / d_rate
                );
            }
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    println!("(ratio: dispatcher time / raw time; 1.00x is the raw transport's speed)");
}

async fn best_of<F, Fut>(runs: usize, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    let mut best = Duration::MAX;
    for _ in 0..runs {
        best = best.min(f().await);
    }
    best
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
