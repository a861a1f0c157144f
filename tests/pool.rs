//! Worker pools with real child processes (this test binary spawns itself as the worker, so it
//! has its own `main`, not libtest's, whose output would corrupt stdout):
//!
//! - calls spread across the workers (per-worker counts);
//! - a worker killed mid-call: its calls fail typed, the others' go on, it is restarted;
//! - a `Retry` layer around the pool re-sends an idempotent call whose worker died;
//! - with no worker to take it, a call fails when its timeout passes.

mod support;

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use channel_dispatcher::pool::Pool;
use channel_dispatcher::{
    request, CallError, Channel, ChildProcess, Context, Dispatcher, HandlerError, RawCall, Router,
    Termination,
};
use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tower::retry::Policy;
use tower::{Service, ServiceExt};

/// Answers the worker's process id after `ms` milliseconds.
#[derive(Serialize, Deserialize)]
struct Work(u64);
request!(Work => u32, "work");

#[derive(Serialize, Deserialize)]
struct Hang;
request!(Hang => (), "hang");

/// The first worker to get it exits at once (it creates the file); the next answers its pid.
#[derive(Serialize, Deserialize)]
struct ExitOnce(String);
request!(ExitOnce => u32, "exit_once");

use support::PATIENCE;
const WORKER: &str = "CHANNEL_DISPATCHER_TEST_POOL_WORKER";

async fn worker() -> ExitCode {
    let router = Router::new()
        .request(|_cx: Context, Work(ms)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(std::process::id())
        })
        .request(|_cx: Context, Hang| std::future::pending::<Result<(), HandlerError>>())
        .request(|_cx: Context, ExitOnce(marker)| async move {
            if std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&marker)
                .is_ok()
            {
                std::process::exit(3);
            }
            Ok(std::process::id())
        });
    let dispatcher = Dispatcher::builder()
        .handler(router)
        .spawn(Channel::stdio());
    dispatcher.closed().await;
    ExitCode::SUCCESS
}

/// The live worker processes, by pid.
type Children = Arc<Mutex<HashMap<u32, ChildProcess>>>;

fn pool_of(size: usize, children: &Children) -> Pool {
    let children = Arc::clone(children);
    Pool::builder()
        .size(size)
        .timeout(PATIENCE)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .spawn(move |_worker: usize| {
            let children = Arc::clone(&children);
            async move {
                let mut command = Command::new(std::env::current_exe()?);
                command.env(WORKER, "1");
                let (channel, child) = Channel::spawn_child(&mut command)?;
                let pid = child.id().expect("a running child");
                children.lock().unwrap().insert(pid, child);
                Dispatcher::builder()
                    .connect(channel)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
            }
        })
}

async fn until(mut condition: impl FnMut() -> bool) {
    while !condition() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn calls_spread_across_workers() {
    let children = Children::default();
    let pool = pool_of(2, &children);
    until(|| pool.workers() == 2).await;
    let mut counts: HashMap<u32, usize> = HashMap::new();
    let mut running = futures_util::stream::FuturesUnordered::new();
    for call in 0..200 {
        if running.len() == 16 {
            let pid = futures_util::StreamExt::next(&mut running).await.unwrap();
            *counts.entry(pid).or_default() += 1;
        }
        let pool = pool.clone();
        running.push(async move { pool.request(Work(call % 3)).await.unwrap() });
    }
    while let Some(pid) = futures_util::StreamExt::next(&mut running).await {
        *counts.entry(pid).or_default() += 1;
    }
    assert_eq!(counts.len(), 2, "both workers served: {counts:?}");
    for (pid, count) in &counts {
        assert!(
            *count >= 40,
            "worker {pid} served only {count} of 200: {counts:?}"
        );
    }
    pool.close().await;
}

async fn a_killed_worker_fails_its_calls_and_is_restarted() {
    let children = Children::default();
    let pool = pool_of(2, &children);
    until(|| pool.workers() == 2).await;
    let pids: HashSet<u32> = children.lock().unwrap().keys().copied().collect();
    // Calls that never end, on both workers.
    let hanging: Vec<_> = (0..10)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.request(Hang).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let victim = *pids.iter().next().unwrap();
    children.lock().unwrap().get(&victim).unwrap().start_kill();

    // The victim's calls fail with the worker's end; the other worker's are still running.
    let mut failed = 0;
    let mut still_running = Vec::new();
    for call in hanging {
        let outcome = tokio::time::timeout(Duration::from_secs(1), async {
            let mut call = call;
            let result = (&mut call).await;
            (call, result)
        })
        .await;
        match outcome {
            Ok((_, Ok(Err(CallError::Terminated(Termination::ChildExited { .. }))))) => failed += 1,
            Ok((_, other)) => panic!("a call ended otherwise: {other:?}"),
            Err(_) => still_running.push(()),
        }
    }
    assert!(failed >= 1, "the killed worker's calls failed");
    assert!(!still_running.is_empty(), "the other worker's calls go on");

    // A new worker replaces it, and serves.
    until(|| pool.restarts() >= 1 && pool.workers() == 2).await;
    // (The surviving worker still holds its hanging calls: the balancer prefers the new one.)
    let mut seen = HashSet::new();
    while seen.iter().all(|pid| pids.contains(pid)) {
        seen.insert(pool.request(Work(1)).await.unwrap());
    }
    assert!(!seen.contains(&victim), "the dead worker serves no more");
    pool.close().await;
}

/// Re-sends calls whose worker died: for calls the caller knows are idempotent.
#[derive(Clone)]
struct RetryIdempotent {
    left: usize,
}

impl Policy<RawCall, channel_dispatcher::RawResponse, CallError> for RetryIdempotent {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _call: &mut RawCall,
        result: &mut Result<channel_dispatcher::RawResponse, CallError>,
    ) -> Option<Self::Future> {
        let worker_died = matches!(result, Err(CallError::Terminated(_)));
        (worker_died && self.left > 0).then(|| {
            self.left -= 1;
            std::future::ready(())
        })
    }

    fn clone_request(&mut self, call: &RawCall) -> Option<RawCall> {
        Some(call.clone())
    }
}

async fn a_retry_layer_resends_an_idempotent_call_whose_worker_died() {
    let children = Children::default();
    let pool = pool_of(2, &children);
    until(|| pool.workers() == 2).await;
    let marker = std::env::temp_dir().join(format!("chd-pool-exit-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let payload = channel_dispatcher::Codec::default()
        .encode(&marker.display().to_string())
        .unwrap();
    let call = RawCall::new("exit_once", payload);

    // Without a retry, the caller sees the worker's end.
    let error = pool.call_raw(call.clone()).await.unwrap_err();
    assert!(
        matches!(
            error,
            CallError::Terminated(Termination::ChildExited { .. })
        ),
        "{error:?}"
    );
    // With one, the call is sent again and a live worker answers.
    std::fs::remove_file(&marker).unwrap();
    let mut retrying = tower::retry::Retry::new(RetryIdempotent { left: 3 }, pool.clone());
    let answer = retrying.ready().await.unwrap().call(call).await.unwrap();
    let pid: u32 = answer.decode().unwrap();
    assert!(children.lock().unwrap().contains_key(&pid));
    let _ = std::fs::remove_file(&marker);
    pool.close().await;
}

async fn with_no_worker_a_call_fails_when_its_timeout_passes() {
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&attempts);
    let pool = Pool::builder()
        .size(1)
        .timeout(Duration::from_millis(300))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .spawn(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Err::<Dispatcher, _>("no such worker") }
        });
    let started = tokio::time::Instant::now();
    let error = pool.request(Work(0)).await.unwrap_err();
    assert!(matches!(error, CallError::Timeout(_)), "{error:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        attempts.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the pool kept trying to start the worker"
    );
    pool.close().await;
}

async fn a_close_ends_the_calls_waiting_for_a_worker() {
    let pool = Pool::builder()
        .size(1)
        .timeout(PATIENCE)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .spawn(|_| async { Err::<Dispatcher, _>("no worker today") });
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.call_raw(RawCall::new("work", Default::default()))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished());
    pool.close().await;
    let ended = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the waiting call ends with the close, not at its timeout")
        .unwrap();
    assert!(matches!(ended, Err(CallError::Terminated(_))), "{ended:?}");
}

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::var_os(WORKER).is_some() {
        return worker().await;
    }
    let tests: Vec<(&str, support::MainTest)> = vec![
        (
            "calls_spread_across_workers",
            Box::pin(calls_spread_across_workers()),
        ),
        (
            "a_killed_worker_fails_its_calls_and_is_restarted",
            Box::pin(a_killed_worker_fails_its_calls_and_is_restarted()),
        ),
        (
            "a_retry_layer_resends_an_idempotent_call_whose_worker_died",
            Box::pin(a_retry_layer_resends_an_idempotent_call_whose_worker_died()),
        ),
        (
            "with_no_worker_a_call_fails_when_its_timeout_passes",
            Box::pin(with_no_worker_a_call_fails_when_its_timeout_passes()),
        ),
        (
            "a_close_ends_the_calls_waiting_for_a_worker",
            Box::pin(a_close_ends_the_calls_waiting_for_a_worker()),
        ),
    ];
    support::run_tests(tests).await
}
