//! Shared helpers for the integration tests: connected channel pairs over each transport, and
//! the messages the suites exchange.
#![allow(dead_code, unreachable_pub)]

pub mod raw;

use channel_dispatcher::{notification, request, Channel};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// The transports every suite runs over.
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Memory,
    Unix,
    Tcp,
}

/// Two connected channels over `transport`.
pub async fn pair(transport: Transport) -> (Channel, Channel) {
    match transport {
        Transport::Memory => Channel::pair(),
        Transport::Unix => {
            let (a, b) = UnixStream::pair().expect("unix socket pair");
            (Channel::from(a), Channel::from(b))
        }
        Transport::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind loopback");
            let addr = listener.local_addr().expect("local addr");
            let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
            (
                Channel::from(client.expect("connect")),
                Channel::from(server.expect("accept").0),
            )
        }
    }
}

/// Generates one `#[tokio::test]` per transport for each listed `async fn(Transport)`.
#[macro_export]
macro_rules! over_every_transport {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::support::Transport::Memory).await })*
        }
        mod unix {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::support::Transport::Unix).await })*
        }
        mod tcp {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::support::Transport::Tcp).await })*
        }
    };
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Echo(pub String);
request!(Echo => String, "echo");

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Square(pub u64);
request!(Square => u64, "square");

/// Never answered by the test routers: keeps a call pending.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Hang;
request!(Hang => (), "hang");

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Count(pub u32);
notification!(Count, "count");

/// Bounds every wait in the tests: generous, so only a hang trips it.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

pub async fn within<F: std::future::IntoFuture>(fut: F) -> F::Output {
    tokio::time::timeout(PATIENCE, fut.into_future())
        .await
        .expect("timed out: something hangs")
}

/// An error's message followed by its sources': `outer: inner: root`.
pub fn error_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A test of a suite with its own `main` (`harness = false`: the suites whose binary is also
/// a child process, which libtest's output on stdout would disturb).
pub type MainTest = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Runs `tests` one after another, each within [`PATIENCE`], printing libtest's summary lines;
/// the first argument that is not an option filters them by name.
pub async fn run_tests(tests: Vec<(&'static str, MainTest)>) -> std::process::ExitCode {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    println!("\nrunning {} tests", tests.len());
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let outcome = tokio::spawn(async move { tokio::time::timeout(PATIENCE, test).await });
        match outcome.await {
            Ok(Ok(())) => {
                println!("test {name} ... ok");
                passed += 1;
            }
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
        "\ntest result: {}. {passed} passed; {failed} failed; 0 ignored; 0 measured\n",
        if failed == 0 { "ok" } else { "FAILED" },
    );
    match failed {
        0 => std::process::ExitCode::SUCCESS,
        _ => std::process::ExitCode::FAILURE,
    }
}

/// The log lines written while its guard lives (this thread's tasks only), at `filter`
/// (`tracing_subscriber`'s `EnvFilter` syntax), without colours.
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    pub fn capture(filter: &str) -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
