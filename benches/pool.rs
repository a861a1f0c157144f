#![allow(missing_docs)]
//! A CPU-bound handler (hashing a buffer) served by a pool of 1 and of 2 worker processes on
//! this machine: what the second worker adds. Each worker computes one job at a time on one
//! blocking thread; the parent keeps 4 jobs in flight per worker.
//!
//! ```text
//! cargo bench --bench pool --features pool
//! ```
//! The workers are this binary again, run with `--worker`, over their stdin/stdout.

use std::hash::{DefaultHasher, Hasher};
use std::time::{Duration, Instant};

use channel_dispatcher::pool::Pool;
use channel_dispatcher::{request, Channel, Context, Dispatcher, Router};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Digest {
    seed: u64,
    rounds: u32,
}
request!(Digest => u64, "digest");

const JOBS: u64 = 200;
const ROUNDS: u32 = 400; // about 5 ms of hashing per job here

fn digest(Digest { seed, rounds }: Digest) -> u64 {
    let buffer: Vec<u8> = (0..64 * 1024u64)
        .map(|i| (i.wrapping_mul(seed | 1) >> 7) as u8)
        .collect();
    let mut value = seed;
    for _ in 0..rounds {
        let mut hasher = DefaultHasher::new();
        hasher.write_u64(value);
        hasher.write(&buffer);
        value = hasher.finish();
    }
    value
}

fn worker() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .unwrap();
    runtime.block_on(async {
        let router = Router::new().request(|_cx: Context, job: Digest| async move {
            Ok(tokio::task::spawn_blocking(move || digest(job)).await?)
        });
        let dispatcher = Dispatcher::builder()
            .handler(router)
            .spawn(Channel::stdio());
        dispatcher.closed().await;
    });
}

async fn run(workers: usize) -> Duration {
    let pool = Pool::builder().size(workers).spawn(|_| async {
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command.arg("--worker");
        let (channel, _child) = Channel::spawn_child(&mut command)?;
        Dispatcher::builder()
            .connect(channel)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    });
    while pool.workers() < workers {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    let mut running = FuturesUnordered::new();
    for seed in 0..JOBS {
        if running.len() == 4 * workers {
            running.next().await.unwrap();
        }
        let pool = pool.clone();
        running.push(async move {
            pool.request(Digest {
                seed,
                rounds: ROUNDS,
            })
            .await
            .unwrap()
        });
    }
    while running.next().await.is_some() {}
    let elapsed = start.elapsed();
    pool.close().await;
    elapsed
}

fn main() {
    if std::env::args().any(|a| a == "--worker") {
        return worker();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut best = [Duration::MAX; 2];
        for _ in 0..3 {
            for (slot, workers) in [(0, 1), (1, 2)] {
                best[slot] = best[slot].min(run(workers).await);
            }
        }
        let rate = |d: Duration| JOBS as f64 / d.as_secs_f64();
        println!("pool: {JOBS} CPU-bound jobs ({ROUNDS} rounds of hashing 64 KiB), best of 3");
        println!("1 worker   {:>8.0} jobs/s", rate(best[0]));
        println!("2 workers  {:>8.0} jobs/s", rate(best[1]));
        println!("speed-up   {:>8.2}x", rate(best[1]) / rate(best[0]));
    });
}
