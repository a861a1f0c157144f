//! A server whose accepts fail for want of file descriptors (EMFILE) logs the error, backs
//! off and goes on serving once descriptors are free again. The server runs in a child
//! process (this test binary again, under `ulimit -n`), so the limit is its own.

use std::process::Stdio;
use std::time::Duration;

use channel_dispatcher::server::Server;
use channel_dispatcher::{request, Channel, Context, Dispatcher, PeerInfo, Router};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Command;

#[derive(Serialize, Deserialize)]
struct Echo(String);
request!(Echo => String, "echo");

const PATIENCE: Duration = Duration::from_secs(20);
const SOCKET: &str = "CHANNEL_DISPATCHER_TEST_SOCKET";

/// The child's side: a server on the socket path it was given, until it is killed.
#[tokio::test]
async fn child_server() {
    let Some(path) = std::env::var_os(SOCKET) else {
        return; // run by the parent test only
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("channel_dispatcher=warn")
        .init();
    let router = Router::new().request(|_cx: Context, Echo(s)| async move { Ok(s) });
    let listener = UnixListener::bind(&path).unwrap();
    let _server = Server::builder().serve(listener, move |_: &PeerInfo| {
        Dispatcher::builder().handler(router.clone())
    });
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn accept_errors_are_logged_and_survived() {
    if std::env::var_os(SOCKET).is_some() {
        return; // the child runs `child_server` only
    }
    let dir =
        std::env::temp_dir().join(format!("channel-dispatcher-emfile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("server.sock");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 64 && exec "$0" --exact child_server --nocapture"#)
        .arg(std::env::current_exe().unwrap())
        .env(SOCKET, &path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the server");
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(PATIENCE, async {
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the server listens");

    // More connections than the child has descriptors: its accepts fail.
    let mut crowd = Vec::new();
    for _ in 0..100 {
        crowd.push(UnixStream::connect(&path).await.unwrap());
    }
    let logged = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("accepting a connection failed") {
                return line;
            }
        }
        panic!("the server's log ended");
    })
    .await
    .expect("the accept error is logged");
    assert!(
        logged.to_lowercase().contains("too many open files"),
        "{logged}"
    );

    // Descriptors free again: the server serves.
    drop(crowd);
    let client = tokio::time::timeout(PATIENCE, async {
        loop {
            let stream = UnixStream::connect(&path).await.unwrap();
            if let Ok(client) = Dispatcher::builder().connect(Channel::from(stream)).await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a connection after the crowd left");
    let answer = tokio::time::timeout(PATIENCE, client.request(Echo("still here".into())))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "still here");
    child.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
