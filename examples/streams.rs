//! Remote streams: a handler answers with a stream of rows; the caller reads it as an ordinary
//! `futures::Stream`, windowed (the default) and in pull mode (the PHP original's remote
//! iterator), and drops one early.
//!
//! ```text
//! cargo run --release --example streams
//! ```

use std::error::Error;
use std::time::Instant;

use channel_dispatcher::{stream_request, Channel, Context, Dispatcher, Router};
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Row {
    id: u64,
    name: String,
}

/// Rows `0..count` of a table.
#[derive(Serialize, Deserialize)]
struct Scan {
    count: u64,
}
stream_request!(Scan => Row, "table/scan");

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let router = Router::new().stream(|_cx: Context, Scan { count }| async move {
        let rows = (0..count).map(|id| {
            Ok(Row {
                id,
                name: format!("row-{id}"),
            })
        });
        Ok(stream::iter(rows))
    });
    let (a, b) = Channel::pair();
    let _server = Dispatcher::builder().handler(router).spawn(b);
    let client = Dispatcher::builder().spawn(a);

    for pull in [false, true] {
        let count = if pull { 20_000 } else { 1_000_000 };
        let started = Instant::now();
        let rows = client.stream(Scan { count });
        let rows = if pull { rows.pull_mode() } else { rows };
        let (n, last) = rows
            .fold(
                (0u64, None),
                |(n, _), row| async move { (n + 1, Some(row)) },
            )
            .await;
        let rate = n as f64 / started.elapsed().as_secs_f64();
        let mode = if pull { "pull mode" } else { "windowed" };
        println!("{mode:>9}: {n} rows at {rate:.0} rows/s; last {last:?}");
    }

    // Dropping a stream early tells the producer, which drops its side.
    let mut rows = client.stream(Scan { count: u64::MAX });
    let first = rows.next().await.transpose()?;
    println!(
        "   early: first row {first:?}, position {:?}; dropped",
        rows.position()
    );
    drop(rows);

    client.stop().await;
    Ok(())
}
