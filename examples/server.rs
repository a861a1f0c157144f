//! A chat server: many clients over TCP (or a Unix socket), each authenticated by a token
//! `<name>:<password>`; what one says is broadcast to the others; Ctrl-C shuts it down
//! gracefully. Run it, then clients in other terminals:
//!
//! ```text
//! cargo run --example server                         # listens on tcp:127.0.0.1:7878
//! cargo run --example client -- alice                # type lines; Ctrl-D leaves
//! echo 'hello, all' | cargo run --example client -- bob
//! ```
//!
//! `cargo run --example server -- unix:/tmp/chat.sock` listens on a Unix socket instead;
//! `CHAT_PASSWORD` sets the room's password (default `open-sesame`).

#[path = "chat/protocol.rs"]
mod protocol;

use std::collections::HashMap;
use std::error::Error;

use channel_dispatcher::server::{PeerEvent, PeerId, Peers, Server};
use channel_dispatcher::{
    AuthRequest, Context, Dispatcher, HandlerError, Identity, PeerInfo, Refusal, Router,
};
use protocol::{Notice, Said, Say, Who, DEFAULT_ADDRESS, DEFAULT_PASSWORD};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_target(false)
        .init();
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_ADDRESS.to_owned());
    let password = std::env::var("CHAT_PASSWORD").unwrap_or_else(|_| DEFAULT_PASSWORD.into());

    let router = Router::new()
        .request(|cx: Context, Say { text }| async move {
            let peers = cx.state::<Peers>()?;
            let from = name(cx.peer());
            let me = *cx.state::<PeerId>()?;
            // Everyone but the speaker; a client that stopped reading delays nobody.
            let sent = peers
                .broadcast_to(&Said { from, text }, |peer| peer.id() != me)
                .await;
            for (peer, error) in sent.failures() {
                tracing::warn!(%peer, %error, "a client missed a message");
            }
            Ok(sent.delivered())
        })
        .request(|cx: Context, Who| async move {
            let peers = cx.state::<Peers>()?;
            Ok::<_, HandlerError>(peers.list().iter().map(|p| name(Some(p.info()))).collect())
        });

    let setup = move |_peer: &PeerInfo| {
        let password = password.clone();
        Dispatcher::builder()
            .handler(router.clone())
            .authenticator(move |request: AuthRequest| {
                let password = password.clone();
                async move { check_token(request.token(), &password) }
            })
    };
    let builder = Server::builder().max_connections(1_000);
    let server = match address.split_once(':') {
        Some(("tcp", host_port)) => {
            builder.serve(tokio::net::TcpListener::bind(host_port).await?, setup)
        }
        Some(("unix", path)) => {
            let _ = std::fs::remove_file(path);
            builder.serve(tokio::net::UnixListener::bind(path)?, setup)
        }
        _ => return Err(format!("`{address}`: use tcp:<host>:<port> or unix:<path>").into()),
    };
    tracing::info!(%address, "chat server listening; Ctrl-C stops it");

    // Tell the room who comes and goes.
    let peers = server.peers().clone();
    let mut events = peers.events();
    tokio::spawn(async move {
        let mut names = HashMap::new();
        while let Ok(event) = events.recv().await {
            let notice = match event {
                PeerEvent::Joined(peer) => {
                    let who = name(Some(peer.info()));
                    names.insert(peer.id(), who.clone());
                    format!("{who} joined ({} here)", peers.len())
                }
                PeerEvent::Left { id, reason } => {
                    let who = names.remove(&id).unwrap_or_default();
                    tracing::info!(%who, %reason, "left");
                    format!("{who} left")
                }
                _ => continue,
            };
            let _ = peers.broadcast(&Notice(notice)).await; // failures: peers that left
        }
    });

    tokio::signal::ctrl_c().await?;
    tracing::info!(peers = server.peers().len(), "shutting down");
    let _ = server
        .peers()
        .broadcast(&Notice("the server is shutting down".into()))
        .await;
    server.shutdown().await; // in-flight calls finish; every client sees the connection end
    Ok(())
}

/// `<name>:<password>` with the room's password: the peer is `<name>`.
fn check_token(token: Option<&str>, password: &str) -> Result<Option<Identity>, Refusal> {
    match token.and_then(|t| t.split_once(':')) {
        // A real service would check a password hash, in constant time.
        Some((name, given)) if !name.is_empty() && given == password => {
            Ok(Some(Identity::new(name)))
        }
        Some(_) => Err(Refusal::new("wrong name or password")),
        None => Err(Refusal::new("present a token <name>:<password>")),
    }
}

fn name(peer: Option<&PeerInfo>) -> String {
    peer.and_then(PeerInfo::identity)
        .map_or_else(|| "someone".to_owned(), |id| id.name().to_owned())
}
