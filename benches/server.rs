#![allow(missing_docs)]
//! Many peers over TCP loopback: a `Server` in one process, 1,000 client connections in
//! another, beside a raw length-prefixed TCP echo measured the same way in the same run.
//!
//! - aggregate calls per second with 1 and with 16 calls in flight on every connection;
//! - memory per idle connection (the RSS growth of each process, divided by the connections);
//! - connection set-up time (connect and handshake), plaintext and TLS, against a raw TCP
//!   connect plus one echo.
//!
//! ```text
//! cargo bench --bench server --features tls
//! cargo bench --bench server --features tls -- --clients 200 --seconds 2
//! ```
//! Each case starts a fresh server process (this binary again, with `--serve`), so that memory
//! one case freed does not flatter the next.

#[path = "support/raw_echo.rs"]
mod raw_echo;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use channel_dispatcher::server::Server;
use channel_dispatcher::tls::{self, TlsListener};
use channel_dispatcher::{request, Connector, Context, Dispatcher, PeerInfo, Router};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::io::{BufWriter, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use raw_echo::raw_echo;

const PAYLOAD: &str = "0123456789abcdef0123456789abcdef"; // 32 bytes

#[derive(Serialize, Deserialize)]
struct Echo(String);
request!(Echo => String, "echo");

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Raw,
    Plain,
    Tls,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Plain => "plain",
            Kind::Tls => "tls",
        }
    }
    fn parse(name: &str) -> Kind {
        match name {
            "raw" => Kind::Raw,
            "plain" => Kind::Plain,
            _ => Kind::Tls,
        }
    }
}

// ===== the server process =====

async fn serve(kind: Kind) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    let router = Router::new().request(|_cx: Context, Echo(s)| async move { Ok(s) });
    let setup = move |_: &PeerInfo| Dispatcher::builder().handler(router.clone());
    let _server = match kind {
        Kind::Raw => loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (read, write) = stream.into_split();
            tokio::spawn(raw_echo(read, write, 8 * 1024));
        },
        Kind::Plain => Server::builder()
            .max_connections(100_000)
            .serve(listener, setup),
        Kind::Tls => {
            let config = tls::server_config(
                std::env::var("BENCH_CHAIN").unwrap().as_bytes(),
                std::env::var("BENCH_KEY").unwrap().as_bytes(),
                tls::ClientAuth::None,
            )
            .unwrap();
            Server::builder()
                .max_connections(100_000)
                .serve(TlsListener::new(listener, config), setup)
        }
    };
    // Until the parent closes our stdin.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
}

struct ServerProcess {
    child: tokio::process::Child,
    port: u16,
}

impl ServerProcess {
    async fn start(kind: Kind, certificate: &(String, String, String)) -> Self {
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--serve", kind.name()])
            .env("BENCH_CHAIN", &certificate.0)
            .env("BENCH_KEY", &certificate.1)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .await
            .unwrap();
        let port = line.trim().parse().unwrap();
        Self { child, port }
    }

    fn rss(&self) -> u64 {
        rss_kib(&format!("/proc/{}/status", self.child.id().unwrap()))
    }
}

/// The resident set of a process, in KiB, from `/proc/<pid>/status`.
fn rss_kib(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

// ===== the client process =====

enum Client {
    Raw(Arc<tokio::sync::Mutex<RawLink>>),
    Dispatcher(Dispatcher),
}

struct RawLink {
    reader: BufReader<ReadHalf<TcpStream>>,
    writer: BufWriter<WriteHalf<TcpStream>>,
}

struct Clients {
    connector: Connector,
}

impl Clients {
    async fn connect(&self, kind: Kind, port: u16) -> Client {
        match kind {
            Kind::Raw => {
                let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let (read, write) = tokio::io::split(stream);
                let mut link = RawLink {
                    reader: BufReader::with_capacity(8 * 1024, read),
                    writer: BufWriter::with_capacity(8 * 1024, write),
                };
                // One echo: the raw counterpart of a handshake.
                raw_round_trip(&mut link).await;
                Client::Raw(Arc::new(tokio::sync::Mutex::new(link)))
            }
            Kind::Plain => {
                let channel = self
                    .connector
                    .connect(&format!("tcp:127.0.0.1:{port}"))
                    .await
                    .unwrap();
                Client::Dispatcher(Dispatcher::builder().connect(channel).await.unwrap())
            }
            Kind::Tls => {
                let channel = self
                    .connector
                    .connect(&format!("tls:localhost:{port}"))
                    .await
                    .unwrap();
                Client::Dispatcher(Dispatcher::builder().connect(channel).await.unwrap())
            }
        }
    }
}

async fn raw_round_trip(link: &mut RawLink) {
    link.writer.write_u32(PAYLOAD.len() as u32).await.unwrap();
    link.writer.write_all(PAYLOAD.as_bytes()).await.unwrap();
    link.writer.flush().await.unwrap();
    let len = link.reader.read_u32().await.unwrap();
    let mut body = vec![0; len as usize];
    link.reader.read_exact(&mut body).await.unwrap();
}

/// Calls on `client` with `in_flight` outstanding until `stop`, counting answers.
async fn load(client: Client, in_flight: usize, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    match client {
        Client::Dispatcher(dispatcher) => {
            let workers: Vec<_> = (0..in_flight)
                .map(|_| {
                    let (dispatcher, stop, done) = (dispatcher.clone(), stop.clone(), done.clone());
                    tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            dispatcher.request(Echo(PAYLOAD.into())).await.unwrap();
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for worker in workers {
                worker.await.unwrap();
            }
            dispatcher.stop().await;
        }
        Client::Raw(link) => {
            let RawLink { reader, writer } = Arc::try_unwrap(link).ok().unwrap().into_inner();
            raw_load(reader, writer, in_flight, stop, done).await;
        }
    }
}

/// Pipelined echoes, `in_flight` at a time; the writer flushes when it must wait. At the
/// stop it sends an empty frame, whose echo tells the reader that nothing more will come.
async fn raw_load(
    mut reader: BufReader<ReadHalf<TcpStream>>,
    mut writer: BufWriter<WriteHalf<TcpStream>>,
    in_flight: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) {
    let permits = Arc::new(Semaphore::new(in_flight));
    let writing = {
        let (permits, stop) = (permits.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let permit = match permits.try_acquire() {
                    Ok(permit) => permit,
                    Err(_) => {
                        writer.flush().await.unwrap();
                        permits.acquire().await.unwrap()
                    }
                };
                permit.forget();
                writer.write_u32(PAYLOAD.len() as u32).await.unwrap();
                writer.write_all(PAYLOAD.as_bytes()).await.unwrap();
            }
            writer.write_u32(0).await.unwrap();
            writer.flush().await.unwrap();
            writer
        })
    };
    let mut body = Vec::new();
    loop {
        let len = reader.read_u32().await.unwrap();
        if len == 0 {
            break;
        }
        body.resize(len as usize, 0);
        reader.read_exact(&mut body).await.unwrap();
        done.fetch_add(1, Ordering::Relaxed);
        permits.add_permits(1);
    }
    drop(writing.await.unwrap());
}

struct Options {
    clients: usize,
    seconds: f64,
    setups: usize,
    profile: Option<usize>,
}

fn options() -> Options {
    let mut options = Options {
        clients: 1_000,
        seconds: 3.0,
        setups: 200,
        profile: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--clients" => options.clients = args.next().unwrap().parse().unwrap(),
            "--seconds" => options.seconds = args.next().unwrap().parse().unwrap(),
            "--setups" => options.setups = args.next().unwrap().parse().unwrap(),
            "--profile" => options.profile = Some(args.next().unwrap().parse().unwrap()),
            _ => {} // cargo bench passes --bench
        }
    }
    options
}

/// A server certificate for `localhost` and its key, and the CA that signed it, as PEM.
fn certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let certificate = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (certificate.pem(), key.serialize_pem(), ca_pem)
}

async fn open(clients: &Arc<Clients>, kind: Kind, port: u16, count: usize) -> Vec<Client> {
    // 64 connecting at a time: the listen backlog is finite.
    let mut opened = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(64) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|_| {
                let clients = clients.clone();
                tokio::spawn(async move { clients.connect(kind, port).await })
            })
            .collect();
        for handle in handles {
            opened.push(handle.await.unwrap());
        }
    }
    opened
}

async fn throughput(
    clients: &Arc<Clients>,
    certificate: &(String, String, String),
    kind: Kind,
    options: &Options,
    in_flight: usize,
) -> f64 {
    let server = ServerProcess::start(kind, certificate).await;
    let opened = open(clients, kind, server.port, options.clients).await;
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let loads: Vec<_> = opened
        .into_iter()
        .map(|client| tokio::spawn(load(client, in_flight, stop.clone(), done.clone())))
        .collect();
    // Warm up, then count over the measured window only.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (start, before) = (Instant::now(), done.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs_f64(options.seconds)).await;
    let calls = done.load(Ordering::Relaxed) - before;
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for handle in loads {
        handle.await.unwrap();
    }
    drop(server);
    calls as f64 / elapsed.as_secs_f64()
}

/// (server KiB, client KiB) per idle connection, each side a fresh process.
async fn idle_memory(
    certificate: &(String, String, String),
    kind: Kind,
    count: usize,
) -> (f64, f64) {
    let server = ServerProcess::start(kind, certificate).await;
    let mut client = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--idle-client",
            kind.name(),
            &server.port.to_string(),
            &count.to_string(),
        ])
        .env("BENCH_CA", &certificate.2)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    // The client connects once, says so, then opens `count` more and says its growth.
    lines.next_line().await.unwrap();
    let server_before = server.rss();
    let client_growth: f64 = lines.next_line().await.unwrap().unwrap().parse().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server_growth = server.rss().saturating_sub(server_before) as f64;
    drop(client);
    (server_growth / count as f64, client_growth / count as f64)
}

/// The client process of [`idle_memory`].
async fn idle_client(kind: Kind, port: u16, count: usize) {
    let clients = Arc::new(Clients {
        connector: tls_connector(std::env::var("BENCH_CA").unwrap().as_bytes()),
    });
    // One connection first, so that start-up allocations are not counted.
    let _first = open(&clients, kind, port, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("ready");
    let before = rss_kib("/proc/self/status");
    let _opened = open(&clients, kind, port, count).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("{}", rss_kib("/proc/self/status").saturating_sub(before));
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
}

fn tls_connector(ca_pem: &[u8]) -> Connector {
    Connector::new().tls(tls::client_config(ca_pem, None).unwrap())
}

/// Median and mean set-up time, in microseconds, of `count` connections one after another.
async fn setup_time(
    clients: &Arc<Clients>,
    certificate: &(String, String, String),
    kind: Kind,
    count: usize,
) -> (f64, f64) {
    let server = ServerProcess::start(kind, certificate).await;
    let _warm = clients.connect(kind, server.port).await;
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let client = clients.connect(kind, server.port).await;
        times.push(start.elapsed().as_secs_f64() * 1e6);
        if let Client::Dispatcher(dispatcher) = client {
            dispatcher.stop().await;
        }
    }
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    (times[times.len() / 2], mean)
}

async fn bench() {
    let options = options();
    let certificate = certificates();
    let clients = Arc::new(Clients {
        connector: tls_connector(certificate.2.as_bytes()),
    });
    println!(
        "{} client connections over TCP loopback, {} s per case, 2 processes\n",
        options.clients, options.seconds
    );

    if let Some(in_flight) = options.profile {
        // Only the dispatcher's load, for a profiler.
        let calls = throughput(&clients, &certificate, Kind::Plain, &options, in_flight).await;
        println!("{in_flight} in flight per client: {calls:.0} calls/s");
        return;
    }
    println!("aggregate calls/s          raw echo   dispatcher   ratio");
    for in_flight in [1, 16] {
        let raw = throughput(&clients, &certificate, Kind::Raw, &options, in_flight).await;
        let ours = throughput(&clients, &certificate, Kind::Plain, &options, in_flight).await;
        println!(
            "  {in_flight:>2} in flight per client  {raw:>9.0}   {ours:>10.0}   {:.2}x raw",
            ours / raw
        );
    }

    println!("\nmemory per idle connection  server KiB   client KiB");
    for kind in [Kind::Raw, Kind::Plain, Kind::Tls] {
        let (server, client) = idle_memory(&certificate, kind, options.clients).await;
        println!("  {:<26} {server:>9.1}   {client:>10.1}", kind.name());
    }

    println!("\nconnection set-up, one at a time   median us   mean us   median ratio");
    let mut raw_median = 0.0;
    for kind in [Kind::Raw, Kind::Plain, Kind::Tls] {
        let (median, mean) = setup_time(&clients, &certificate, kind, options.setups).await;
        if kind == Kind::Raw {
            raw_median = median;
        }
        let label = match kind {
            Kind::Raw => "raw (TCP connect + one echo)",
            Kind::Plain => "dispatcher (connect + hello)",
            Kind::Tls => "dispatcher over TLS",
        };
        println!(
            "  {label:<32} {median:>9.0}   {mean:>7.0}   {:.2}x raw",
            median / raw_median
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let arg = |i: usize| args[i].as_str();
    if let Some(i) = args.iter().position(|a| a == "--serve") {
        runtime.block_on(serve(Kind::parse(arg(i + 1))));
    } else if let Some(i) = args.iter().position(|a| a == "--idle-client") {
        let (port, count) = (arg(i + 2).parse().unwrap(), arg(i + 3).parse().unwrap());
        runtime.block_on(idle_client(Kind::parse(arg(i + 1)), port, count));
    } else {
        runtime.block_on(bench());
    }
}
