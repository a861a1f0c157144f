//! A parent/child pingpong: this program spawns itself as a child process, and the
//! two talk over the child's stdin/stdout. Requests go both ways, including a nested call: the
//! parent asks the child to `describe` something, and the child asks the parent to `lookup`
//! a detail before it answers.
//!
//! ```text
//! cargo run --release --example pingpong
//! ```

use std::error::Error;
use std::time::Instant;

use channel_dispatcher::{notification, request, Channel, Context, Dispatcher, Router};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

#[derive(Debug, Serialize, Deserialize)]
struct Ping {
    n: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Pong {
    n: u32,
    pid: u32,
}

request!(Ping => Pong, "ping");

/// Child -> parent: add these up.
#[derive(Debug, Serialize, Deserialize)]
struct Sum(Vec<i64>);
request!(Sum => i64, "sum");

/// Parent -> child: describe a thing (the child needs the parent's help for that).
#[derive(Debug, Serialize, Deserialize)]
struct Describe(String);
request!(Describe => String, "describe");

/// Child -> parent, from inside the `describe` handler: the nested call.
#[derive(Debug, Serialize, Deserialize)]
struct Lookup(String);
request!(Lookup => String, "lookup");

/// Child -> parent, fire and forget.
#[derive(Debug, Serialize, Deserialize)]
struct Log(String);
notification!(Log, "log");

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    if std::env::args().nth(1).as_deref() == Some("child") {
        child().await
    } else {
        parent().await
    }
}

async fn parent() -> Result<(), Box<dyn Error>> {
    let router = Router::new()
        .request(|_cx: Context, Sum(values)| async move {
            println!("[parent] child asks for the sum of {values:?}");
            Ok(values.iter().sum::<i64>())
        })
        .request(|_cx: Context, Lookup(key)| async move {
            println!("[parent] child looks up {key:?} (while the parent waits for the child)");
            Ok(format!("{key} is a fruit"))
        })
        .notification(|_cx: Context, Log(line)| async move {
            println!("[parent] child logs: {line}");
            Ok(())
        });

    let mut command = Command::new(std::env::current_exe()?);
    command.arg("child");
    let (channel, mut child) = Channel::spawn_child(&mut command)?;
    let dispatcher = Dispatcher::builder()
        .handler(router)
        .connect(channel)
        .await?;
    println!("[parent] connected to child process {:?}", child.id());

    for n in 1..=3 {
        let pong = dispatcher.request(Ping { n }).await?;
        println!("[parent] ping {n} -> pong {} from pid {}", pong.n, pong.pid);
    }

    let description = dispatcher.request(Describe("apple".into())).await?;
    println!("[parent] describe(apple) -> {description:?}");

    let started = Instant::now();
    let rounds = 10_000;
    for n in 0..rounds {
        dispatcher.request(Ping { n }).await?;
    }
    let per_call = started.elapsed() / rounds;
    println!("[parent] {rounds} sequential round trips: {per_call:?} each");

    let reason = dispatcher.stop().await;
    let status = child.wait().await?;
    println!("[parent] stopped ({reason}); child exited with {status}");
    Ok(())
}

async fn child() -> Result<(), Box<dyn Error>> {
    // Standard output carries the channel: the child speaks through the parent, or stderr.
    let router = Router::new()
        .request(|_cx: Context, Ping { n }| async move {
            Ok(Pong {
                n: n * 10,
                pid: std::process::id(),
            })
        })
        .request(|cx: Context, Describe(thing)| async move {
            let detail = cx.request(Lookup(thing.clone())).await?;
            Ok(format!("{thing}: {detail}"))
        });
    let dispatcher = Dispatcher::builder()
        .handler(router)
        .connect(Channel::stdio())
        .await?;

    let total = dispatcher.request(Sum(vec![1, 2, 3, 4])).await?;
    dispatcher
        .notify(Log(format!("the parent says 1+2+3+4 = {total}")))
        .await?;

    let reason = dispatcher.closed().await;
    eprintln!("[child] connection ended: {reason}");
    Ok(())
}
