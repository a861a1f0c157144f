//! A reconnecting client against a server process that is killed and started again, twice:
//! calls before, during and after each outage; calls pending at a kill fail typed and are
//! not sent again; calls made during an outage wait for the next link (or their timeout);
//! `on_connect` runs on every link before calls use it. The server is this test binary again
//! (its own `main`, not libtest's).

mod support;

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_dispatcher::reconnect::Reconnecting;
use channel_dispatcher::server::Server;
use channel_dispatcher::{
    request, CallError, Channel, Context, Dispatcher, HandlerError, PeerInfo, Router,
};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};

/// Answers the server's process id, and whether this connection said `Hello` first.
#[derive(Serialize, Deserialize)]
struct Who;
request!(Who => (u32, bool), "who");

#[derive(Serialize, Deserialize)]
struct Hello;
request!(Hello => (), "hello");

#[derive(Serialize, Deserialize)]
struct Hang;
request!(Hang => (), "hang");

use support::PATIENCE;
const SOCKET: &str = "CHANNEL_DISPATCHER_TEST_RECONNECT_SOCKET";

/// The server process: serves on the socket until it is killed.
async fn server(path: PathBuf) -> ExitCode {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let router = Router::new()
        .request(|cx: Context, Hello| async move {
            cx.state::<Arc<AtomicBool>>()?.store(true, Ordering::SeqCst);
            Ok(())
        })
        .request(|cx: Context, Who| async move {
            let greeted = cx.state::<Arc<AtomicBool>>()?.load(Ordering::SeqCst);
            Ok((std::process::id(), greeted))
        })
        .request(|_cx: Context, Hang| std::future::pending::<Result<(), HandlerError>>());
    let _server = Server::builder().serve(listener, move |_: &PeerInfo| {
        // Whether this connection said hello.
        Dispatcher::builder()
            .handler(router.clone())
            .with_state(Arc::new(AtomicBool::new(false)))
    });
    std::future::pending::<ExitCode>().await
}

fn start_server(path: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env(SOCKET, path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn kill(server: &mut Child, path: &Path) {
    server.kill().await.unwrap();
    let _ = std::fs::remove_file(path);
}

async fn until(mut condition: impl FnMut() -> bool) {
    while !condition() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn client(path: &Path, timeout: Duration, hooks: Arc<AtomicUsize>) -> Reconnecting {
    let path = path.to_owned();
    Reconnecting::builder()
        .backoff(Duration::from_millis(10), Duration::from_millis(100))
        .timeout(timeout)
        .on_connect(move |link: Dispatcher| {
            let hooks = Arc::clone(&hooks);
            async move {
                link.request(Hello).await?;
                hooks.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .connect(move || dial(path.clone()))
}

/// A connection to the server on `path`, handshake done.
async fn dial(path: PathBuf) -> std::io::Result<Dispatcher> {
    let stream = UnixStream::connect(&path).await?;
    Dispatcher::builder()
        .connect(Channel::from(stream))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
}

fn socket_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chd-reconnect-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("server.sock")
}

async fn a_server_restarted_twice_mid_run() {
    let path = socket_path("twice");
    let mut server = start_server(&path);
    let hooks = Arc::new(AtomicUsize::new(0));
    let client = client(&path, PATIENCE, Arc::clone(&hooks));

    // Before: the hook ran first on this link.
    let (first_pid, greeted) = client.request(Who).await.unwrap();
    assert!(greeted, "on_connect ran before the call");
    let mut pids = vec![first_pid];

    for _restart in 0..2 {
        // A call pending at the kill fails typed, and is not sent again.
        let pending = tokio::spawn({
            let client = client.clone();
            async move { client.request(Hang).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        kill(&mut server, &path).await;
        let lost = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .expect("the pending call fails promptly")
            .unwrap();
        assert!(
            matches!(lost, Err(CallError::Terminated(_))),
            "the pending call failed typed: {lost:?}"
        );

        // During the outage: a call waits for the next link.
        let during = tokio::spawn({
            let client = client.clone();
            async move { client.request(Who).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!during.is_finished(), "waits while the server is down");
        server = start_server(&path);
        let (pid, greeted) = during.await.unwrap().unwrap();
        assert!(greeted, "on_connect ran on the new link first");
        assert!(!pids.contains(&pid), "a new server process answered");
        pids.push(pid);

        // After.
        assert_eq!(client.request(Who).await.unwrap(), (pid, true));
    }
    assert_eq!(client.connections(), 3);
    assert_eq!(hooks.load(Ordering::SeqCst), 3);
    client.close().await;
    assert!(matches!(
        client.request(Who).await,
        Err(CallError::Terminated(_))
    ));
    kill(&mut server, &path).await;
}

async fn a_call_during_an_outage_fails_when_its_timeout_passes() {
    let path = socket_path("timeout");
    let client = client(&path, Duration::from_millis(300), Arc::default());
    let started = tokio::time::Instant::now();
    let error = client.request(Who).await.unwrap_err();
    assert!(matches!(error, CallError::Timeout(_)), "{error:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Once a server is there, the client finds it.
    let mut server = start_server(&path);
    until(|| client.current().is_some()).await;
    assert!(client.request(Who).await.unwrap().1);
    client.close().await;
    kill(&mut server, &path).await;
}

async fn dropping_the_last_handle_ends_the_link() {
    let path = socket_path("drop");
    let listener = UnixListener::bind(&path).unwrap();
    let server = Server::builder().serve(listener, |_: &PeerInfo| {
        Dispatcher::builder().with_state(Arc::new(AtomicBool::new(false)))
    });
    let dialled = path.clone();
    let client = Reconnecting::builder().connect(move || dial(dialled.clone()));
    let clone = client.clone();
    until(|| server.peers().len() == 1).await;
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.peers().len(), 1, "a clone still holds the link");
    drop(clone);
    until(|| server.peers().is_empty()).await;
    server.shutdown().await;
}

#[tokio::main]
async fn main() -> ExitCode {
    if let Some(path) = std::env::var_os(SOCKET) {
        return server(PathBuf::from(path)).await;
    }
    let tests: Vec<(&str, support::MainTest)> = vec![
        (
            "a_server_restarted_twice_mid_run",
            Box::pin(a_server_restarted_twice_mid_run()),
        ),
        (
            "a_call_during_an_outage_fails_when_its_timeout_passes",
            Box::pin(a_call_during_an_outage_fails_when_its_timeout_passes()),
        ),
        (
            "dropping_the_last_handle_ends_the_link",
            Box::pin(dropping_the_last_handle_ends_the_link()),
        ),
    ];
    support::run_tests(tests).await
}
