//! The answering side: `listen` on a socket, `spawn` a child, `serve-stdio` as a child. One
//! handler for every method prints what arrives and answers by echo, a fixed value or an error.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use channel_dispatcher::server::{PeerEvent, PeerId, Server};
use channel_dispatcher::tls::{self, ClientAuth, TlsListener};
use channel_dispatcher::{
    Attributes, Channel, Codec, Dispatcher, Incoming, PeerInfo, Reply, Service, Termination,
};
use serde_json::{json, Map, Value};

use crate::cli::{AnswerArgs, ListenArgs, ServeStdioArgs, SpawnArgs};
use crate::common::{
    attributes, encode, exit_on_output_error, handshake_failure, now_rfc3339, parse_json,
    print_line, read_file, read_payload, Address, Failure, Outcome,
};

/// How requests are answered.
#[derive(Debug)]
enum Answer {
    /// With the request's own payload, as it came.
    Echo,
    /// With this encoded value.
    Value(Bytes),
    /// With this error.
    Error(i64, String),
}

/// How each envelope is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Nothing,
    Text,
    JsonLines,
}

/// Where envelopes are shown: stdout, or stderr when stdout carries the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sink {
    Stdout,
    Stderr,
}

#[derive(Debug)]
struct Config {
    answer: Answer,
    format: Format,
    sink: Sink,
}

/// The handler of every method: a `tower::Service<Incoming>`.
#[derive(Clone, Debug)]
pub(crate) struct Handler(Arc<Config>);

impl Handler {
    fn new(args: &AnswerArgs, codec: Codec, sink: Sink, show: bool) -> Outcome<Self> {
        let answer = if let Some(error) = &args.error {
            let (code, message) = error.split_once(':').unwrap_or((error, ""));
            let code = code.trim().parse::<i64>().map_err(|_| {
                Failure::usage(format!(
                    "--error `{error}` has no numeric code: write CODE:MESSAGE, e.g. -32000:not today"
                ))
            })?;
            Answer::Error(code, message.to_owned())
        } else if let Some(reply) = &args.reply {
            let value = match reply.strip_prefix('@') {
                Some(_) => read_payload(Some(reply))?,
                None => parse_json(reply, "--reply")?,
            };
            Answer::Value(encode(codec, &value)?)
        } else {
            Answer::Echo
        };
        let format = match (show && !args.quiet, args.json) {
            (false, _) => Format::Nothing,
            (true, false) => Format::Text,
            (true, true) => Format::JsonLines,
        };
        Ok(Self(Arc::new(Config {
            answer,
            format,
            sink,
        })))
    }

    fn describe(&self) -> String {
        match &self.0.answer {
            Answer::Echo => "echo".to_owned(),
            Answer::Value(_) => "a fixed reply".to_owned(),
            Answer::Error(code, message) => format!("error {code}: {message}"),
        }
    }

    fn show(&self, incoming: &Incoming) {
        let line = match self.0.format {
            Format::Nothing => return,
            Format::Text => text_line(incoming),
            Format::JsonLines => json_line(incoming).to_string(),
        };
        match self.0.sink {
            Sink::Stdout => print_line(&line),
            Sink::Stderr => {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{line}");
            }
        }
    }

    fn answer(&self, incoming: &Incoming) -> Reply {
        if incoming.is_notification() {
            return Reply::nothing();
        }
        match &self.0.answer {
            Answer::Echo => Reply::value(incoming.payload().clone()),
            Answer::Value(value) => Reply::value(value.clone()),
            Answer::Error(code, message) => Reply::error(*code, message.clone()),
        }
    }
}

impl Service<Incoming> for Handler {
    type Response = Reply;
    type Error = Infallible;
    type Future = Ready<Result<Reply, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        self.show(&incoming);
        ready(Ok(self.answer(&incoming)))
    }
}

fn kind(incoming: &Incoming) -> &'static str {
    match incoming.is_notification() {
        true => "notification",
        false => "request",
    }
}

fn peer_id(incoming: &Incoming) -> Option<u64> {
    incoming.context().state::<PeerId>().ok().map(|id| id.get())
}

fn payload(incoming: &Incoming) -> Result<Value, String> {
    incoming.decode::<Value>().map_err(|e| {
        format!(
            "{} bytes that are not JSON-like: {e}",
            incoming.payload().len()
        )
    })
}

/// `TIME [peer N] KIND METHOD [id=N] [k=v ...] PAYLOAD`
fn text_line(incoming: &Incoming) -> String {
    let mut line = now_rfc3339();
    if let Some(peer) = peer_id(incoming) {
        line.push_str(&format!(" peer={peer}"));
    }
    line.push_str(&format!(" {} {}", kind(incoming), incoming.method()));
    if let Some(id) = incoming.id() {
        line.push_str(&format!(" id={id}"));
    }
    let attributes = incoming.attributes();
    if !attributes.is_empty() {
        let shown: Vec<String> = attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line.push_str(&format!(" [{}]", shown.join(" ")));
    }
    match payload(incoming) {
        Ok(value) => line.push_str(&format!(" {value}")),
        Err(error) => line.push_str(&format!(" <{error}>")),
    }
    line
}

fn json_line(incoming: &Incoming) -> Value {
    let mut attributes = Map::new();
    for (key, value) in incoming.attributes().iter() {
        attributes.insert(key.to_owned(), Value::String(value.to_owned()));
    }
    let mut line = json!({
        "time": now_rfc3339(),
        "kind": kind(incoming),
        "method": incoming.method(),
        "id": incoming.id(),
        "attributes": attributes,
    });
    if let Some(peer) = peer_id(incoming) {
        line["peer"] = json!(peer);
    }
    if let Some(info) = incoming.context().peer() {
        line["from"] = json!(info.address().to_string());
    }
    match payload(incoming) {
        Ok(value) => line["payload"] = value,
        Err(error) => {
            line["payload"] = Value::Null;
            line["payload_error"] = json!(error);
        }
    }
    line
}

/// Removes a Unix socket file when the listener goes.
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub(crate) async fn listen(args: ListenArgs) -> Outcome {
    let address = Address::parse(&args.address)?;
    let codec = args.codec.codec();
    let handler = Handler::new(&args.answer, codec, Sink::Stdout, true)?;
    let answering = handler.describe();
    let token = args.token.clone();
    let setup = move |_peer: &PeerInfo| {
        let builder = Dispatcher::builder().codec(codec).handler(handler.clone());
        match &token {
            Some(token) => builder.expect_token(token.clone()),
            None => builder,
        }
    };
    let bind_failure = |e: std::io::Error| {
        Failure::transport(format!(
            "cannot listen on {address}: {e}; is the address in use, or not this machine's?"
        ))
    };
    let mut socket_file = SocketFile(None);
    let (server, shown) = match &address {
        Address::Unix(path) => {
            remove_stale_socket(path)?;
            let listener = tokio::net::UnixListener::bind(path).map_err(bind_failure)?;
            socket_file.0 = Some(path.clone());
            (
                Server::builder().serve(listener, setup),
                address.to_string(),
            )
        }
        Address::Tcp(host_port) => {
            let listener = tokio::net::TcpListener::bind(host_port)
                .await
                .map_err(bind_failure)?;
            let local = listener.local_addr().map_err(bind_failure)?;
            (
                Server::builder().serve(listener, setup),
                format!("tcp:{local}"),
            )
        }
        Address::Tls(host_port) => {
            let (Some(cert), Some(key)) = (&args.cert, &args.key) else {
                return Err(Failure::usage(format!(
                    "{address} needs --cert FILE and --key FILE: the server's certificate chain and key (PEM)"
                )));
            };
            let (chain, key) = (read_file(cert, "--cert")?, read_file(key, "--key")?);
            let roots = args
                .ca
                .as_ref()
                .map(|ca| read_file(ca, "--ca"))
                .transpose()?;
            let auth = match &roots {
                Some(roots) => ClientAuth::Required(roots),
                None => ClientAuth::None,
            };
            let config = tls::server_config(&chain, &key, auth)
                .map_err(|e| Failure::usage(format!("the TLS options are not usable: {e}")))?;
            let listener = tokio::net::TcpListener::bind(host_port)
                .await
                .map_err(bind_failure)?;
            let local = listener.local_addr().map_err(bind_failure)?;
            let listener = TlsListener::new(listener, config);
            (
                Server::builder().serve(listener, setup),
                format!("tls:{local}"),
            )
        }
    };
    eprintln!(
        "chd: listening on {shown} (codec {}, answering with {answering}); Ctrl-C stops",
        codec.name()
    );
    if !args.answer.quiet {
        let mut events = server.peers().events();
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                match event {
                    PeerEvent::Joined(peer) => {
                        eprintln!("chd: {} connected ({})", peer.id(), peer.info().address())
                    }
                    PeerEvent::Left { id, reason } => eprintln!("chd: {id} left: {reason}"),
                    _ => {}
                }
            }
        });
    }
    shutdown_signal().await;
    eprintln!("chd: shutting down");
    server.shutdown().await;
    drop(socket_file);
    Ok(())
}

/// A socket file nobody listens on any more is removed; a live one is an error.
fn remove_stale_socket(path: &std::path::Path) -> Outcome {
    if !path.exists() {
        return Ok(());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Failure::transport(format!(
            "cannot listen on unix:{}: a peer is listening there already; stop it or pick another path",
            path.display()
        )));
    }
    std::fs::remove_file(path).map_err(|e| {
        Failure::transport(format!(
            "cannot listen on unix:{}: the path exists and cannot be removed: {e}",
            path.display()
        ))
    })
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// The method and payload of `--call METHOD [JSON]` or `--notify METHOD [JSON]`.
fn message(values: &Option<Vec<String>>, codec: Codec) -> Outcome<Option<(String, Bytes)>> {
    let Some(values) = values else {
        return Ok(None);
    };
    let payload = read_payload(Some(values.get(1).map_or("null", String::as_str)))?;
    Ok(Some((values[0].clone(), encode(codec, &payload)?)))
}

async fn call_once(
    peer: &Dispatcher,
    (method, payload): (String, Bytes),
    attributes: Attributes,
    timeout: Duration,
    what: &str,
) -> Outcome<Value> {
    let raw = peer
        .call_raw(method, payload)
        .attributes(attributes)
        .timeout(timeout)
        .await
        .map_err(|e| Failure::call(e, what))?;
    raw.decode::<Value>().map_err(|e| {
        Failure::other(format!(
            "the answer cannot be shown as JSON: {e}; try --codec json on both sides"
        ))
    })
}

pub(crate) async fn spawn(args: SpawnArgs) -> Outcome {
    if args.call.is_none() && args.notify.is_none() && !args.listen && !args.interactive {
        return Err(Failure::usage(
            "spawn needs something to do: --call METHOD [JSON], --notify METHOD [JSON], --listen or --interactive",
        ));
    }
    let codec = args.codec.codec();
    let (call, notify) = (message(&args.call, codec)?, message(&args.notify, codec)?);
    let handler = Handler::new(&args.answer, codec, Sink::Stdout, args.listen)?;
    let program = &args.command[0];
    let mut command = tokio::process::Command::new(program);
    command.args(&args.command[1..]);
    let (channel, mut child) = Channel::spawn_child(&mut command).map_err(|e| {
        Failure::usage(format!(
            "cannot start `{program}`: {e}; check the command after --"
        ))
    })?;
    let what = format!("the child `{program}`");
    let peer = Dispatcher::builder()
        .codec(codec)
        .handshake_timeout(args.timeout)
        .handler(handler)
        .connect(channel)
        .await
        .map_err(|reason| {
            child.start_kill();
            handshake_failure(&what, reason)
        })?;

    let mut result = Ok(());
    if let Some(call) = call {
        match call_once(&peer, call, attributes(&args.headers), args.timeout, &what).await {
            Ok(value) => print_line(&value.to_string()),
            Err(failure) => result = Err(failure),
        }
    }
    if let (Some((method, payload)), true) = (notify, result.is_ok()) {
        if let Err(e) = peer
            .notify_raw(method, attributes(&args.headers), payload)
            .await
        {
            result = Err(Failure::call(e, &what));
        }
    }
    if args.interactive && result.is_ok() {
        session(&peer, codec, attributes(&args.headers), args.timeout, &what).await;
    }
    let reason = if args.listen && result.is_ok() {
        tokio::select! {
            reason = peer.closed() => reason,
            _ = shutdown_signal() => peer.stop().await,
        }
    } else {
        peer.stop().await
    };
    drop(peer);
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let status = match status {
        Ok(Ok(status)) => Some(status),
        _ => {
            child.start_kill();
            None
        }
    };
    let exit = match &reason {
        Termination::ChildExited { status } => Some(*status),
        _ => status,
    };
    if let Some(exit) = exit.filter(|exit| !exit.success()) {
        let failure = Failure::transport(format!(
            "{what} exited ({exit}); its stderr above may say why"
        ));
        return result.and(Err(failure));
    }
    if !reason.is_graceful() && !matches!(reason, Termination::ChildExited { .. }) {
        let failure = Failure::transport(format!("the connection to {what} ended: {reason}"));
        return result.and(Err(failure));
    }
    result
}

/// Reads `METHOD [JSON]` (a call) and `!METHOD [JSON]` (a notification) lines from stdin
/// until its end, printing each answer as a JSON line and each failure on stderr.
async fn session(
    peer: &Dispatcher,
    codec: Codec,
    attributes: Attributes,
    timeout: Duration,
    what: &str,
) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (notify, line) = match line.strip_prefix('!') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, line),
        };
        let (method, json) = line
            .split_once(char::is_whitespace)
            .unwrap_or((line, "null"));
        let payload = match read_payload(Some(json.trim())).and_then(|v| encode(codec, &v)) {
            Ok(payload) => payload,
            Err(failure) => {
                eprintln!("chd: {failure}");
                continue;
            }
        };
        let outcome = match notify {
            true => peer
                .notify_raw(method.to_owned(), attributes.clone(), payload)
                .await
                .map_err(|e| Failure::call(e, what)),
            false => {
                let call = (method.to_owned(), payload);
                call_once(peer, call, attributes.clone(), timeout, what)
                    .await
                    .map(|value| print_line(&value.to_string()))
            }
        };
        if let Err(failure) = outcome {
            eprintln!("chd: {failure}");
            if peer.is_closed() {
                return;
            }
        }
    }
}

pub(crate) async fn serve_stdio(args: ServeStdioArgs) -> Outcome {
    let codec = args.codec.codec();
    let (call, notify) = (message(&args.call, codec)?, message(&args.notify, codec)?);
    let handler = Handler::new(&args.answer, codec, Sink::Stderr, true)?;
    let parent = Dispatcher::builder()
        .codec(codec)
        .handler(handler)
        .connect(Channel::stdio())
        .await
        .map_err(|reason| handshake_failure(&"the parent", reason))?;
    if call.is_none() && notify.is_none() {
        let reason = parent.closed().await;
        return match reason {
            reason if reason.is_graceful() => Ok(()),
            Termination::Closed => Ok(()),
            reason => Err(Failure::transport(format!(
                "the connection to the parent ended: {reason}"
            ))),
        };
    }
    let mut result = Ok(());
    if let Some(call) = call {
        match call_once(
            &parent,
            call,
            Attributes::new(),
            Duration::from_secs(30),
            "the parent",
        )
        .await
        {
            Ok(value) => {
                let mut err = std::io::stderr().lock();
                if let Err(e) = writeln!(err, "answer: {value}") {
                    exit_on_output_error(&e);
                }
            }
            Err(failure) => result = Err(failure),
        }
    }
    if let Some((method, payload)) = notify {
        if let Err(e) = parent.notify_raw(method, Attributes::new(), payload).await {
            result = Err(Failure::call(e, "the parent"));
        }
    }
    parent.stop().await;
    result
}
