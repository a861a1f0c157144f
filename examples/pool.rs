//! A worker pool: this program spawns itself once per CPU core as a worker process (over the
//! child's stdin/stdout) and farms CPU-bound jobs out to the pool, which balances them across
//! the workers and restarts any that die.
//!
//! ```text
//! cargo run --release --features pool --example pool
//! ```

use std::error::Error;
use std::hash::{DefaultHasher, Hasher};
use std::time::Instant;

use channel_dispatcher::pool::Pool;
use channel_dispatcher::{request, Channel, Context, Dispatcher, Router};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// Hash `rounds` times a 64 KiB buffer made from `seed`: CPU-bound work.
#[derive(Serialize, Deserialize)]
struct Digest {
    seed: u64,
    rounds: u32,
}
request!(Digest => u64, "digest");

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

async fn worker() -> Result<(), Box<dyn Error>> {
    let router = Router::new().request(|_cx: Context, job: Digest| async move {
        // CPU-bound: off the connection's task, onto a blocking thread.
        Ok(tokio::task::spawn_blocking(move || digest(job)).await?)
    });
    let dispatcher = Dispatcher::builder()
        .handler(router)
        .spawn(Channel::stdio());
    dispatcher.closed().await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    if std::env::args().nth(1).as_deref() == Some("worker") {
        return worker().await;
    }
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let pool = Pool::builder()
        .size(workers)
        .spawn(|index: usize| async move {
            let mut command = Command::new(std::env::current_exe()?);
            command.arg("worker");
            let (channel, _child) = Channel::spawn_child(&mut command)?;
            eprintln!("started worker {index}");
            Dispatcher::builder()
                .connect(channel)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
        });

    let jobs = 400;
    let start = Instant::now();
    let mut running = FuturesUnordered::new();
    let mut checksum = 0u64;
    for seed in 0..jobs {
        if running.len() == 4 * workers {
            checksum ^= running.next().await.unwrap()?;
        }
        let pool = pool.clone();
        running.push(async move { pool.request(Digest { seed, rounds: 8 }).await });
    }
    while let Some(result) = running.next().await {
        checksum ^= result?;
    }
    let elapsed = start.elapsed();
    println!(
        "{jobs} jobs on {workers} workers in {elapsed:.2?} ({:.0} jobs/s), checksum {checksum:016x}",
        jobs as f64 / elapsed.as_secs_f64()
    );
    pool.close().await;
    Ok(())
}
