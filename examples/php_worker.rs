//! A Rust worker that a PHP parent (flyokai/amp-channel-dispatcher on amphp) spawns and talks
//! to over stdio, on the PHP library's own wire; and, with `client`, a Rust client of a PHP
//! server that it spawns the same way.
//!
//! ```text
//! cargo run --example php_worker --features php                       # worker on stdin/stdout
//! cargo run --example php_worker --features php -- client php server.php   # client of PHP
//! ```
//!
//! The worker serves `PingRequest` (answered `"pong: " + note`), `EchoRequest` (the payload
//! back, exactly), `OpenIteratorRequest` (an iterator of `"item-0"`, `"item-1"`, ... that PHP's
//! `RemoteIterator` pulls), `ThrowRequest` (an `ErrorResponse` with its message and code) and
//! the notification `NotifyRequest`; it stops, with status 0, when PHP sends its stop marker.
//! stdout carries frames only: logs go to stderr.

#[path = "php/protocol.rs"]
mod protocol;

use std::process::ExitCode;
use std::time::Duration;

use channel_dispatcher::php::{ArrayKey, PhpValue};
use channel_dispatcher::{
    Builder, CallError, Channel, Codec, Context, Dispatcher, Notification, RemoteStream, Router,
};
use futures_util::TryStreamExt;
use protocol::*;

/// The PHP wire: its framing and `serialize()` payloads, no handshake; `NotifyRequest` is a
/// PHP `MeekRequest`, so it is a notification. PHP has no timeouts: ours bounds every call.
fn builder() -> Builder<Router> {
    Dispatcher::builder()
        .codec(Codec::Php)
        .default_timeout(Duration::from_secs(30))
        .php_notification(NotifyRequest::METHOD)
        .handler(
            router().notification(|_cx: Context, NotifyRequest { text }| async move {
                tracing::info!(%text, "notified");
                Ok(())
            }),
        )
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.split_first() {
        None => worker().await,
        Some((mode, command)) if mode == "client" && !command.is_empty() => {
            match client(command).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(%error, "the PHP server did not answer as expected");
                    ExitCode::FAILURE
                }
            }
        }
        Some(_) => {
            eprintln!("usage: php_worker [client <command> [args...]]");
            ExitCode::from(2)
        }
    }
}

/// Serves the PHP parent until it stops: its stop marker is answered, then the worker exits 0.
async fn worker() -> ExitCode {
    let dispatcher = builder().spawn(Channel::stdio());
    let reason = dispatcher.closed().await;
    if reason.is_graceful() {
        tracing::info!(%reason, "stopped");
        ExitCode::SUCCESS
    } else {
        tracing::error!(%reason, "the connection to the PHP parent failed");
        ExitCode::FAILURE
    }
}

/// Spawns a PHP server and asks it what the worker serves.
async fn client(command: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let mut spawn = tokio::process::Command::new(&command[0]);
    spawn.args(&command[1..]);
    let (channel, mut child) = Channel::spawn_child(&mut spawn)?;
    let php = builder().spawn(channel);

    let pong = php
        .request(PingRequest {
            note: "hello".into(),
        })
        .await?;
    tracing::info!(reply = %pong.reply, "ping");

    let payload = PhpValue::Array(vec![
        (ArrayKey::Int(0), PhpValue::Float(1.5)),
        (ArrayKey::from("bytes"), PhpValue::String(b"x\0y".to_vec())),
    ]);
    let echoed = php
        .request(EchoRequest {
            payload: payload.clone(),
        })
        .await?;
    assert_eq!(echoed.payload, payload, "the echo differs");

    let opened = php.request(OpenIteratorRequest { count: 3 }).await?;
    let items: Vec<String> = RemoteStream::pull(&php, opened.iterator_id)
        .try_collect()
        .await?;
    tracing::info!(?items, "iterator");

    php.notify(NotifyRequest { text: "hi".into() }).await?;
    match php.request(UnknownRequest { what: "?".into() }).await {
        Err(CallError::Remote(error)) if error.code == 404 => {
            tracing::info!(message = %error.message, "unknown class refused")
        }
        other => return Err(format!("expected PHP's 404, got {other:?}").into()),
    }

    // The stop marker: PHP answers it with its own and exits.
    let reason = php.stop().await;
    tracing::info!(%reason, "stopped");
    let status = child.wait().await?;
    if !status.success() {
        return Err(format!("the PHP server exited with {status}").into());
    }
    Ok(())
}
