//! End to end: the built `chd` binary against servers started here (a `Server` on a Unix
//! socket in a temporary directory, one on TCP loopback, one with TLS), and `chd` against
//! itself (`listen`, `spawn` with `serve-stdio`). Every child process runs within a
//! deadline and is killed past it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use channel_dispatcher::server::Server;
use channel_dispatcher::tls::{self, ClientAuth, TlsListener};
use channel_dispatcher::{
    request, stream_request, Attributes, Channel, Codec, Context, Dispatcher, HandlerError, Router,
};
use futures_util::stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(20);
const CHD: &str = env!("CARGO_BIN_EXE_chd");

#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct Echo(Value);
request!(Echo => Value, "echo");

#[derive(Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}
request!(Add => i64, "add");

#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct Fail(Value);
request!(Fail => Value, "fail");

/// Answers after this many milliseconds.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct Slow(u64);
request!(Slow => u64, "slow");

/// Answers with the request's `trace` attribute.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct Trace(Value);
request!(Trace => Option<String>, "trace");

#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct Count(u64);
stream_request!(Count => u64, "count");

/// Streams the request's `tag` attribute, `n` times.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct Tagged(u64);
stream_request!(Tagged => Option<String>, "tagged");

fn router() -> Router {
    Router::new()
        .request(|_cx: Context, Echo(value)| async move { Ok(value) })
        .request(|_cx: Context, Add { a, b }| async move { Ok(a + b) })
        .request(|_cx: Context, Fail(_)| async move {
            Err::<Value, _>(HandlerError::new(-32042, "it failed on purpose"))
        })
        .request(|_cx: Context, Slow(ms)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(ms)
        })
        .request(|cx: Context, Trace(_)| async move {
            Ok(cx.attributes().get("trace").map(str::to_owned))
        })
        .stream(|_cx: Context, Count(n)| async move { Ok(stream::iter((0..n).map(Ok))) })
        .stream(|cx: Context, Tagged(n)| async move {
            let tag = cx.attributes().get("tag").map(str::to_owned);
            Ok(stream::iter((0..n).map(move |_| Ok(tag.clone()))))
        })
}

/// A fresh directory under the system's temporary one, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "chd-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `Server` of [`router`] on its own runtime, for as long as it lives.
struct TestServer {
    runtime: tokio::runtime::Runtime,
    server: Server,
    address: String,
    _dir: TempDir,
}

impl TestServer {
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    fn unix(codec: Codec) -> Self {
        let dir = TempDir::new();
        let path = dir.join("server.sock");
        let runtime = Self::runtime();
        let server = runtime.block_on(async {
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            Server::builder().serve(listener, move |_| {
                Dispatcher::builder().codec(codec).handler(router())
            })
        });
        Self {
            runtime,
            server,
            address: format!("unix:{}", path.display()),
            _dir: dir,
        }
    }

    fn tcp() -> Self {
        let runtime = Self::runtime();
        let (server, address) = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let server =
                Server::builder().serve(listener, |_| Dispatcher::builder().handler(router()));
            (server, address)
        });
        Self {
            runtime,
            server,
            address: format!("tcp:{address}"),
            _dir: TempDir::new(),
        }
    }

    fn tls(chain: &str, key: &str) -> Self {
        let runtime = Self::runtime();
        let config =
            tls::server_config(chain.as_bytes(), key.as_bytes(), ClientAuth::None).unwrap();
        let (server, port) = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = Server::builder().serve(TlsListener::new(listener, config), |_| {
                Dispatcher::builder().handler(router())
            });
            (server, port)
        });
        Self {
            runtime,
            server,
            address: format!("tls:localhost:{port}"),
            _dir: TempDir::new(),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let server = self.server.clone();
        self.runtime.block_on(async move {
            let _ = tokio::time::timeout(DEADLINE, server.shutdown()).await;
        });
    }
}

/// Runs `chd args...` with `stdin` as its standard input, within the deadline.
fn chd(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(CHD)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    wait_within(child, args)
}

fn wait_within(child: Child, what: &[&str]) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            kill(pid, "KILL");
            panic!("chd {what:?} did not finish within {DEADLINE:?}");
        }
    }
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status();
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[track_caller]
fn assert_status(output: &Output, status: i32) {
    assert_eq!(
        output.status.code(),
        Some(status),
        "stdout: {}\nstderr: {}",
        stdout(output),
        stderr(output)
    );
}

#[test]
fn call_prints_the_answer_as_json() {
    let server = TestServer::unix(Codec::MessagePack);
    let output = chd(
        &["call", &server.address, "add", r#"{"a": 2, "b": 40}"#],
        None,
    );
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "42\n");

    let output = chd(
        &[
            "call",
            &server.address,
            "echo",
            r#"{"list": [1, "two", null]}"#,
        ],
        None,
    );
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "{\"list\":[1,\"two\",null]}\n");

    // --pretty, and a bare path as the address.
    let path = server.address.strip_prefix("unix:").unwrap();
    let output = chd(&["call", path, "echo", r#"{"a": 1}"#, "--pretty"], None);
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "{\n  \"a\": 1\n}\n");
}

#[test]
fn call_takes_json_from_stdin_and_files_and_sends_attributes() {
    let server = TestServer::unix(Codec::MessagePack);
    let output = chd(&["call", &server.address, "echo", "-"], Some("[1, 2, 3]"));
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "[1,2,3]\n");

    // No argument, stdin not a terminal: stdin is the payload; an empty one is null.
    let output = chd(&["call", &server.address, "echo"], Some(r#""piped""#));
    assert_eq!(stdout(&output), "\"piped\"\n");
    let output = chd(&["call", &server.address, "echo"], Some(""));
    assert_eq!(stdout(&output), "null\n");

    let dir = TempDir::new();
    let file = dir.join("payload.json");
    std::fs::write(&file, r#"{"a": 5, "b": 6}"#).unwrap();
    let output = chd(
        &[
            "call",
            &server.address,
            "add",
            &format!("@{}", file.display()),
        ],
        None,
    );
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "11\n");

    let output = chd(
        &[
            "call",
            &server.address,
            "trace",
            "-H",
            "trace=abc-123",
            "-v",
        ],
        Some(""),
    );
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "\"abc-123\"\n");
    assert!(
        stderr(&output).contains("answered in"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn call_with_the_json_codec() {
    let server = TestServer::unix(Codec::Json);
    let output = chd(
        &[
            "call",
            &server.address,
            "echo",
            r#"{"x": 1.5}"#,
            "--codec",
            "json",
        ],
        None,
    );
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "{\"x\":1.5}\n");

    // A codec mismatch is refused in the handshake: a transport error that says so.
    let output = chd(&["call", &server.address, "echo", "1"], None);
    assert_status(&output, 3);
    assert!(stderr(&output).contains("codec"), "{}", stderr(&output));
}

#[test]
fn exit_statuses_tell_remote_transport_and_usage_errors_apart() {
    let server = TestServer::unix(Codec::MessagePack);
    let address = server.address.as_str();

    let output = chd(&["call", address, "fail", "{}"], None);
    assert_status(&output, 1);
    assert!(stdout(&output).is_empty());
    let error = stderr(&output);
    assert!(
        error.contains("-32042") && error.contains("it failed on purpose"),
        "{error}"
    );

    let output = chd(&["call", address, "no/such/method", "{}"], None);
    assert_status(&output, 1);
    assert!(stderr(&output).contains("-32601"), "{}", stderr(&output));

    let dir = TempDir::new();
    let nowhere = format!("unix:{}", dir.join("nobody.sock").display());
    let output = chd(&["call", &nowhere, "echo", "1"], None);
    assert_status(&output, 3);
    assert!(
        stderr(&output).contains("cannot connect"),
        "{}",
        stderr(&output)
    );

    let output = chd(
        &["call", address, "slow", "5000", "--timeout", "200ms"],
        None,
    );
    assert_status(&output, 3);
    assert!(stderr(&output).contains("--timeout"), "{}", stderr(&output));

    let output = chd(&["call", address, "echo", "{not json"], None);
    assert_status(&output, 2);
    assert!(
        stderr(&output).contains("not valid JSON"),
        "{}",
        stderr(&output)
    );

    let output = chd(&["call", address, "echo", "1", "--codec", "xml"], None);
    assert_status(&output, 2);
    assert!(stderr(&output).contains("xml"), "{}", stderr(&output));

    let output = chd(&["call", "http://localhost", "echo", "1"], None);
    assert_status(&output, 2);
    assert!(
        stderr(&output).contains("tcp:host:port"),
        "{}",
        stderr(&output)
    );

    let output = chd(&["call", address, "echo", "@/no/such/file.json"], None);
    assert_status(&output, 2);
}

#[test]
fn call_over_tcp_loopback() {
    let server = TestServer::tcp();
    let output = chd(
        &["call", &server.address, "add", r#"{"a": 1, "b": 2}"#],
        None,
    );
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "3\n");

    // Nothing listens on the port of a listener just closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = chd(
        &["call", &format!("tcp:127.0.0.1:{port}"), "add", "{}"],
        None,
    );
    assert_status(&output, 3);
}

#[test]
fn call_over_tls_verifies_the_server() {
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let server = TestServer::tls(&certificate.pem(), &key.serialize_pem());
    let dir = TempDir::new();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, certificate.pem()).unwrap();
    let ca = ca.display().to_string();

    let output = chd(
        &["call", &server.address, "echo", "\"secure\"", "--ca", &ca],
        None,
    );
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "\"secure\"\n");

    // A tls: address without roots is a usage error that names the option.
    let output = chd(&["call", &server.address, "echo", "1"], None);
    assert_status(&output, 2);
    assert!(stderr(&output).contains("--ca"), "{}", stderr(&output));

    // Roots that did not sign the server's certificate: the handshake is refused.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&other_key)
        .unwrap();
    let wrong = dir.join("wrong.pem");
    std::fs::write(&wrong, other.pem()).unwrap();
    let wrong = wrong.display().to_string();
    let output = chd(
        &["call", &server.address, "echo", "1", "--ca", &wrong],
        None,
    );
    assert_status(&output, 3);
}

#[test]
fn notify_is_sent_and_answered_by_nothing() {
    let server = TestServer::unix(Codec::MessagePack);
    let output = chd(&["notify", &server.address, "log", "\"hello\""], None);
    assert_status(&output, 0);
    assert!(stdout(&output).is_empty());
}

#[test]
fn stream_prints_one_json_line_per_item() {
    let server = TestServer::unix(Codec::MessagePack);
    let expected: String = (0..50).map(|n| format!("{n}\n")).collect();
    for extra in [&[][..], &["--window", "4"], &["--pull"]] {
        let mut args = vec!["stream", &server.address, "count", "50"];
        args.extend_from_slice(extra);
        let output = chd(&args, None);
        assert_status(&output, 0);
        assert_eq!(stdout(&output), expected, "{extra:?}");
        // stderr is not a terminal here: no progress line.
        assert!(!stderr(&output).contains("items/s"), "{}", stderr(&output));
    }
    let output = chd(&["stream", &server.address, "no/such/stream", "1"], None);
    assert_status(&output, 1);
    // Attributes go with the streaming request.
    let output = chd(
        &["stream", &server.address, "tagged", "2", "-H", "tag=x"],
        None,
    );
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "\"x\"\n\"x\"\n");
}

/// A `chd` that keeps running (listen, spawn), its stdout read line by line.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    errors: mpsc::Receiver<String>,
}

impl Running {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(CHD)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = lines_of(child.stdout.take().unwrap());
        let errors = lines_of(child.stderr.take().unwrap());
        Self {
            child,
            lines,
            errors,
        }
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(DEADLINE)
            .expect("a line on chd's stdout within the deadline")
    }

    fn error_line(&self) -> String {
        self.errors
            .recv_timeout(DEADLINE)
            .expect("a line on chd's stderr within the deadline")
    }

    /// SIGTERM, then the exit status (killed past the deadline).
    fn terminate(mut self) -> i32 {
        kill(self.child.id(), "TERM");
        let started = Instant::now();
        while started.elapsed() < DEADLINE {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("chd did not stop on SIGTERM within {DEADLINE:?}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_for_file(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < DEADLINE,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects to `address` with the library, sends a request (with an attribute) and a
/// notification, and returns the request's answer.
fn poke(address: &str) -> Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = Channel::connect(address).await.unwrap();
        let client = Dispatcher::builder().connect(channel).await.unwrap();
        let codec = client.codec();
        let answer = client
            .call_raw("greet", codec.encode(&json!({"name": "ada"})).unwrap())
            .attribute("trace", "t-1")
            .timeout(DEADLINE)
            .await
            .unwrap();
        let mut attributes = Attributes::new();
        attributes.insert("level", "info");
        client
            .notify_raw("log", attributes, codec.encode(&json!("hello")).unwrap())
            .await
            .unwrap();
        client.stop().await;
        answer.decode::<Value>().unwrap()
    })
}

#[test]
fn listen_prints_what_a_client_sends_and_echoes() {
    let dir = TempDir::new();
    let socket = dir.join("listen.sock");
    let address = format!("unix:{}", socket.display());
    let listen = Running::start(&["listen", &address]);
    wait_for_file(&socket);

    assert_eq!(poke(&address), json!({"name": "ada"}));
    let request = listen.line();
    assert!(
        request.contains(" request greet id=1 [trace=t-1] {\"name\":\"ada\"}"),
        "{request}"
    );
    let notification = listen.line();
    assert!(
        notification.contains(" notification log [level=info] \"hello\""),
        "{notification}"
    );
    assert_eq!(listen.terminate(), 0);
    assert!(!socket.exists(), "the socket file is removed on exit");
}

#[test]
fn listen_json_lines_and_fixed_answers() {
    let dir = TempDir::new();
    let socket = dir.join("json.sock");
    let address = format!("unix:{}", socket.display());
    let listen = Running::start(&["listen", &address, "--json", "--reply", r#"{"ok": true}"#]);
    wait_for_file(&socket);

    assert_eq!(poke(&address), json!({"ok": true}));
    let request: Value = serde_json::from_str(&listen.line()).unwrap();
    assert_eq!(request["kind"], "request");
    assert_eq!(request["method"], "greet");
    assert_eq!(request["id"], 1);
    assert_eq!(request["attributes"], json!({"trace": "t-1"}));
    assert_eq!(request["payload"], json!({"name": "ada"}));
    assert!(request["time"].as_str().unwrap().ends_with('Z'));
    let notification: Value = serde_json::from_str(&listen.line()).unwrap();
    assert_eq!(notification["kind"], "notification");
    assert_eq!(notification["id"], Value::Null);
    assert_eq!(notification["payload"], "hello");
    drop(listen);

    // --error: every request gets it; `chd call` shows it with exit status 1.
    let socket = dir.join("error.sock");
    let address = format!("unix:{}", socket.display());
    let _listen = Running::start(&["listen", &address, "--error", "-32000:not today", "-q"]);
    wait_for_file(&socket);
    let output = chd(&["call", &address, "anything", "{}"], None);
    assert_status(&output, 1);
    assert!(
        stderr(&output).contains("-32000: not today"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn listen_on_tcp_loopback_and_bench_against_it() {
    let listen = Running::start(&["listen", "tcp:127.0.0.1:0", "--quiet"]);
    let banner = listen.error_line();
    let address = banner
        .split_whitespace()
        .find(|word| word.starts_with("tcp:"))
        .unwrap_or_else(|| panic!("no address in {banner:?}"))
        .to_owned();

    let output = chd(
        &["call", &address, "whatever", r#"[true, {"x": null}]"#],
        None,
    );
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "[true,{\"x\":null}]\n");

    let output = chd(
        &[
            "bench",
            &address,
            "echo",
            "\"0123456789abcdef\"",
            "-c",
            "2",
            "-k",
            "4",
            "-n",
            "200",
        ],
        None,
    );
    assert_status(&output, 0);
    assert!(stdout(&output).contains("200 ok"), "{}", stdout(&output));
}

#[test]
fn bench_prints_throughput_a_histogram_and_errors_by_code() {
    let server = TestServer::unix(Codec::MessagePack);
    let args = ["bench", &server.address, "echo", "\"0123456789abcdef\""];
    let counts = ["-c", "2", "-k", "4", "-n", "200"];
    let output = chd(&[&args[..], &counts[..]].concat(), None);
    assert_status(&output, 0);
    let text = stdout(&output);
    for expected in [
        "Calls:        200 (200 ok, 0 errors)",
        "2 (4 in flight each, 8 in total)",
        "calls/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "Latency histogram:",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in\n{text}");
    }
    assert!(text.contains('#'), "no histogram bars in\n{text}");

    let output = chd(&[&args[..], &counts[..], &["--json"]].concat(), None);
    assert_status(&output, 0);
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(report["calls"], 200);
    assert_eq!(report["ok"], 200);
    assert_eq!(report["connections"], 2);
    assert_eq!(report["in_flight"], 4);
    assert!(report["throughput"].as_f64().unwrap() > 0.0);
    let latency = &report["latency_us"];
    for key in ["p50", "p90", "p99", "p99.9", "max"] {
        assert!(latency[key].as_f64().unwrap() > 0.0, "{key}: {latency}");
    }
    let buckets = report["histogram"].as_array().unwrap();
    let total: u64 = buckets.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 200);

    // A run for a duration.
    let output = chd(
        &[
            "bench",
            &server.address,
            "echo",
            "1",
            "-k",
            "2",
            "-d",
            "300ms",
            "--json",
        ],
        None,
    );
    assert_status(&output, 0);
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert!(report["ok"].as_u64().unwrap() > 0);

    // Errors by code; a run where every call failed exits with the remote status.
    let output = chd(
        &[
            "bench",
            &server.address,
            "fail",
            "{}",
            "-n",
            "20",
            "-k",
            "4",
        ],
        None,
    );
    assert_status(&output, 1);
    let text = stdout(&output);
    assert!(
        text.contains("Errors:") && text.contains("-32042"),
        "{text}"
    );
    assert!(text.contains("(0 ok, 20 errors)"), "{text}");
}

#[test]
fn spawn_calls_a_child_over_stdio() {
    let output = chd(
        &[
            "spawn",
            "--call",
            "echo",
            r#"{"a": [1]}"#,
            "--",
            CHD,
            "serve-stdio",
        ],
        None,
    );
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "{\"a\":[1]}\n");

    let output = chd(
        &[
            "spawn",
            "--call",
            "x",
            "--",
            CHD,
            "serve-stdio",
            "--error",
            "7:no",
        ],
        None,
    );
    assert_status(&output, 1);
    assert!(stderr(&output).contains("7: no"), "{}", stderr(&output));

    let output = chd(&["spawn", "--call", "x", "--", "/no/such/program"], None);
    assert_status(&output, 2);
    let output = chd(&["spawn", "--", CHD, "serve-stdio"], None);
    assert_status(&output, 2);
}

#[test]
fn spawn_interactive_calls_and_notifies_line_by_line() {
    let input = "echo {\"a\": 1}\n!log \"x\"\nbad {json\necho [1, 2]\n";
    let output = chd(
        &[
            "spawn",
            "--interactive",
            "--",
            CHD,
            "serve-stdio",
            "--error",
            "9:nope",
        ],
        Some(input),
    );
    // Every call answered with the child's error, the bad line skipped, the session going on.
    assert_status(&output, 0);
    let errors = stderr(&output);
    assert_eq!(errors.matches("error 9: nope").count(), 2, "{errors}");
    assert!(errors.contains("not valid JSON"), "{errors}");

    let output = chd(
        &["spawn", "-i", "--", CHD, "serve-stdio"],
        Some("echo {\"a\": 1}\n!log \"x\"\necho [1, 2]\n"),
    );
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "{\"a\":1}\n[1,2]\n");
}

#[test]
fn spawn_listen_prints_what_the_child_sends() {
    let output = chd(
        &[
            "spawn",
            "--listen",
            "--reply",
            "\"welcome\"",
            "--",
            CHD,
            "serve-stdio",
            "--call",
            "greet",
            "\"hi\"",
            "--notify",
            "log",
            "{\"n\": 1}",
        ],
        None,
    );
    assert_status(&output, 0);
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains(" request greet id=1 \"hi\""), "{text}");
    assert!(lines[1].contains(" notification log {\"n\":1}"), "{text}");
    // The child printed the answer it got on its stderr, which is ours.
    assert!(
        stderr(&output).contains("answer: \"welcome\""),
        "{}",
        stderr(&output)
    );
}

#[test]
fn completions_and_help() {
    for shell in ["bash", "zsh", "fish"] {
        let output = chd(&["completions", shell], None);
        assert_status(&output, 0);
        assert!(stdout(&output).contains("listen"), "{shell}");
    }
    for command in [
        "call",
        "notify",
        "stream",
        "listen",
        "spawn",
        "serve-stdio",
        "bench",
        "completions",
    ] {
        let output = chd(&[command, "--help"], None);
        assert_status(&output, 0);
        assert!(stdout(&output).contains("Examples:"), "{command}");
    }
}
