//! The child-process transport, with real processes: this test binary spawns itself as the
//! child (so it has its own `main`, not libtest's, whose output would corrupt stdout).
//!
//! - an exchange both ways with nested calls, then a graceful stop and a clean child exit;
//! - the child killed while a request is in flight: the call fails typed, promptly,
//!   `on_stop` runs, nothing hangs.

use std::future::IntoFuture;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_dispatcher::{
    request, CallError, Channel, Context, Dispatcher, HandlerError, Router, Termination,
};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

#[derive(Serialize, Deserialize)]
struct Depth(u32);
request!(Depth => Vec<String>, "depth");

#[derive(Serialize, Deserialize)]
struct Pid;
request!(Pid => u32, "pid");

#[derive(Serialize, Deserialize)]
struct Hang;
request!(Hang => (), "hang");

const PATIENCE: Duration = Duration::from_secs(20);

fn router(name: &'static str) -> Router {
    Router::new()
        .request(move |cx: Context, Depth(n)| async move {
            let mut trail = if n == 0 {
                Vec::new()
            } else {
                cx.request(Depth(n - 1)).await?
            };
            trail.push(format!("{name}{n}"));
            Ok::<_, HandlerError>(trail)
        })
        .request(|_cx: Context, Pid| async { Ok::<_, HandlerError>(std::process::id()) })
        .request(|_cx: Context, Hang| std::future::pending::<Result<(), HandlerError>>())
}

async fn child() -> ExitCode {
    let dispatcher = Dispatcher::builder()
        .handler(router("child"))
        .spawn(Channel::stdio());
    match dispatcher.closed().await {
        Termination::PeerStopped { .. } => ExitCode::SUCCESS,
        other => {
            eprintln!("child: connection ended badly: {other}");
            ExitCode::FAILURE
        }
    }
}

fn spawn_child() -> (Channel, tokio::process::Child) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.env("CHANNEL_DISPATCHER_TEST_CHILD", "1");
    Channel::spawn_child(&mut command).expect("spawn the child")
}

async fn exchange_both_ways_with_nested_calls() {
    let (channel, mut child) = spawn_child();
    let parent = Dispatcher::builder()
        .handler(router("parent"))
        .connect(channel)
        .await
        .expect("handshake with the child");
    let pid = parent.request(Pid).await.unwrap();
    assert_eq!(
        Some(pid),
        child.id(),
        "the answer comes from the child process"
    );
    let trail = parent.request(Depth(3)).await.unwrap();
    assert_eq!(trail, ["parent0", "child1", "parent2", "child3"]);
    assert!(matches!(parent.stop().await, Termination::Stopped));
    let status = child.wait().await.unwrap();
    assert!(status.success(), "child exit: {status}");
}

async fn killed_child_fails_the_call_in_flight() {
    let (channel, mut child) = spawn_child();
    let parent = Dispatcher::builder()
        .connect(channel)
        .await
        .expect("handshake with the child");
    let stops = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&stops);
    parent.on_stop(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let call = tokio::spawn(parent.request(Hang).into_future());
    parent.request(Pid).await.unwrap(); // the hanging request has reached the child
    child.start_kill().unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Terminated(Termination::Closed | Termination::Transport(_))
        ),
        "{err:?}"
    );
    assert!(!parent.closed().await.is_graceful());
    assert_eq!(stops.load(Ordering::SeqCst), 1);
    child.wait().await.unwrap();
}

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::var_os("CHANNEL_DISPATCHER_TEST_CHILD").is_some() {
        return child().await;
    }
    let mut failed = 0;
    type Test = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    let tests: [(&str, Test); 2] = [
        (
            "exchange_both_ways_with_nested_calls",
            Box::pin(exchange_both_ways_with_nested_calls()),
        ),
        (
            "killed_child_fails_the_call_in_flight",
            Box::pin(killed_child_fails_the_call_in_flight()),
        ),
    ];
    println!("\nrunning {} tests", tests.len());
    let total = tests.len();
    for (name, test) in tests {
        let outcome = tokio::spawn(async move { tokio::time::timeout(PATIENCE, test).await });
        match outcome.await {
            Ok(Ok(())) => println!("test {name} ... ok"),
            Ok(Err(_)) => {
                println!("test {name} ... FAILED (timed out)");
                failed += 1;
            }
            Err(panic) => {
                println!("test {name} ... FAILED ({panic})");
                failed += 1;
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out\n",
        if failed == 0 { "ok" } else { "FAILED" },
        total - failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
