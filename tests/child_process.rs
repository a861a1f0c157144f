//! The child-process transport, with real processes: this test binary spawns itself as the
//! child (so it has its own `main`, not libtest's, whose output would corrupt stdout).
//!
//! - an exchange both ways with nested calls, then a graceful stop and a clean child exit;
//! - the child killed while a request is in flight: the call fails typed, promptly,
//!   `on_stop` runs, nothing hangs;
//! - a child that exits by itself: the connection reports its exit status;
//! - dropping the `ChildProcess` handle does not kill the child (the connection owns it).

mod support;

use std::future::IntoFuture;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_dispatcher::{
    request, CallError, Channel, ChildProcess, Context, Dispatcher, HandlerError, Router,
    Termination,
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

/// Makes the child exit at once with this code, without a goodbye.
#[derive(Serialize, Deserialize)]
struct Exit(u8);
request!(Exit => (), "exit");

fn router(name: &'static str) -> Router {
    Router::new()
        .request(move |cx: Context, Depth(n)| async move {
            let mut trail = if n == 0 {
                Vec::new()
            } else {
                cx.request(Depth(n - 1)).await?
            };
            trail.push(format!("{name}{n}"));
            Ok(trail)
        })
        .request(|_cx: Context, Pid| async { Ok(std::process::id()) })
        .request(|_cx: Context, Hang| std::future::pending::<Result<(), HandlerError>>())
        .request(|_cx: Context, Exit(code)| async move {
            std::process::exit(code.into());
            #[allow(unreachable_code)]
            Ok(())
        })
}

async fn child() -> ExitCode {
    let dispatcher = Dispatcher::builder()
        .handler(router("child"))
        .spawn(Channel::stdio());
    let ended = dispatcher.closed().await;
    if std::env::var_os("CHANNEL_DISPATCHER_TEST_STUBBORN").is_some() {
        // A worker that does not exit when its connection ends.
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
    match ended {
        Termination::PeerStopped { .. } => ExitCode::SUCCESS,
        other => {
            eprintln!("child: connection ended badly: {other}");
            ExitCode::FAILURE
        }
    }
}

fn spawn_child() -> (Channel, ChildProcess) {
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
    child.start_kill();
    let err = call.await.unwrap().unwrap_err();
    let CallError::Terminated(Termination::ChildExited { status }) = err else {
        panic!("not the child's exit: {err:?}");
    };
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status}");
    }
    assert!(!parent.closed().await.is_graceful());
    assert_eq!(stops.load(Ordering::SeqCst), 1);
    assert_eq!(child.wait().await.unwrap(), status);
}

// issue 9, item 5: the parent saw only "Broken pipe".
async fn a_child_that_exits_reports_its_status() {
    let (channel, mut child) = spawn_child();
    let parent = Dispatcher::builder()
        .connect(channel)
        .await
        .expect("handshake with the child");
    let err = parent.request(Exit(3)).await.unwrap_err();
    let CallError::Terminated(Termination::ChildExited { status }) = &err else {
        panic!("not the child's exit: {err:?}");
    };
    assert_eq!(status.code(), Some(3));
    assert!(err.to_string().contains("exited (exit status: 3)"), "{err}");
    assert!(matches!(
        parent.closed().await,
        Termination::ChildExited { .. }
    ));
    assert_eq!(child.try_wait().and_then(|s| s.code()), Some(3));
    assert_eq!(child.wait().await.unwrap().code(), Some(3));
}

// issue 9, item 5: a child nobody holds any more does not outlive its parent's interest.
#[cfg(target_os = "linux")]
async fn an_orphaned_child_that_does_not_exit_is_killed() {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.env("CHANNEL_DISPATCHER_TEST_CHILD", "1");
    command.env("CHANNEL_DISPATCHER_TEST_STUBBORN", "1");
    let (channel, child) = Channel::spawn_child(&mut command).unwrap();
    let parent = Dispatcher::builder().connect(channel).await.unwrap();
    let pid = child.id().unwrap();
    drop(child);
    assert!(matches!(parent.stop().await, Termination::Stopped));
    drop(parent);
    let proc = format!("/proc/{pid}");
    assert!(std::path::Path::new(&proc).exists(), "still running");
    // Killed 5 s after the connection ended, and reaped.
    while std::path::Path::new(&proc).exists() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// issue 9, item 5: dropping tokio's `Child` killed the worker.
async fn dropping_the_child_handle_keeps_the_worker() {
    let (channel, child) = spawn_child();
    let parent = Dispatcher::builder()
        .connect(channel)
        .await
        .expect("handshake with the child");
    let pid = child.id();
    drop(child);
    // Past the time a killed child takes to be seen gone.
    for _ in 0..20 {
        assert_eq!(Some(parent.request(Pid).await.unwrap()), pid);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(parent.stop().await, Termination::Stopped));
}

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::var_os("CHANNEL_DISPATCHER_TEST_CHILD").is_some() {
        return child().await;
    }
    #[allow(unused_mut)]
    let mut tests: Vec<(&str, support::MainTest)> = vec![
        (
            "exchange_both_ways_with_nested_calls",
            Box::pin(exchange_both_ways_with_nested_calls()),
        ),
        (
            "killed_child_fails_the_call_in_flight",
            Box::pin(killed_child_fails_the_call_in_flight()),
        ),
        (
            "a_child_that_exits_reports_its_status",
            Box::pin(a_child_that_exits_reports_its_status()),
        ),
        (
            "dropping_the_child_handle_keeps_the_worker",
            Box::pin(dropping_the_child_handle_keeps_the_worker()),
        ),
    ];
    #[cfg(target_os = "linux")]
    tests.push((
        "an_orphaned_child_that_does_not_exit_is_killed",
        Box::pin(an_orphaned_child_that_does_not_exit_is_killed()),
    ));
    support::run_tests(tests).await
}
