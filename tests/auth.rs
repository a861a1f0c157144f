//! Authentication in the handshake and what a connection knows about its peer: the
//! authenticator's identity and refusals, the peer's address, per-connection state.

mod support;

use std::time::Duration;

use channel_dispatcher::{
    request, AuthRequest, Channel, Context, Dispatcher, HandlerError, HandshakeError, Identity,
    PeerAddress, Refusal, Router, Termination,
};
use serde::{Deserialize, Serialize};
use support::within;
use tokio::net::{TcpListener, TcpStream, UnixStream};

#[derive(Serialize, Deserialize)]
struct WhoAmI;
request!(WhoAmI => (Option<String>, String), "whoami");

/// Answers the caller's identity and address, as the handler's context has them.
fn whoami() -> Router {
    Router::new().request(|cx: Context, WhoAmI| async move {
        let peer = cx.peer().ok_or_else(|| HandlerError::internal("no peer"))?;
        Ok((
            peer.identity().map(|id| id.name().to_owned()),
            peer.address().to_string(),
        ))
    })
}

/// Accepts tokens `user:<name>` as `<name>`.
async fn users(request: AuthRequest) -> Result<Option<Identity>, Refusal> {
    match request
        .token()
        .and_then(|token| token.strip_prefix("user:"))
    {
        Some(name) if !name.is_empty() => Ok(Some(Identity::new(name))),
        _ => Err(Refusal::new("present a token of the form user:<name>")),
    }
}

#[tokio::test]
async fn the_authenticators_identity_reaches_the_handlers() {
    let (a, b) = UnixStream::pair().unwrap();
    let server = Dispatcher::builder()
        .authenticator(users)
        .handler(whoami())
        .spawn(Channel::from(a));
    let client = within(
        Dispatcher::builder()
            .token("user:ada")
            .connect(Channel::from(b)),
    )
    .await
    .unwrap();
    let (identity, address) = within(client.request(WhoAmI)).await.unwrap();
    assert_eq!(identity.as_deref(), Some("ada"));
    assert!(address.starts_with("unix"), "{address}");
    let peer = server.peer().expect("the handshake is done");
    assert_eq!(peer.identity(), Some(&Identity::new("ada")));
    // Both ends of a socket pair are this process.
    let PeerAddress::Unix {
        credentials: Some(credentials),
        ..
    } = peer.address()
    else {
        panic!("no Unix credentials: {peer:?}");
    };
    assert_eq!(credentials.pid, Some(std::process::id() as i32));
    assert_eq!(
        client.peer().unwrap().identity(),
        None,
        "the server presented none"
    );
}

#[tokio::test]
async fn a_refusal_is_told_to_the_peer_with_its_reason() {
    let (a, b) = Channel::pair();
    let server = Dispatcher::builder().authenticator(users).spawn(a);
    let client = Dispatcher::builder().token("admin").spawn(b);
    let Termination::Handshake(HandshakeError::Refused { reason }) = within(client.closed()).await
    else {
        panic!("not refused");
    };
    assert!(reason.contains("user:<name>"), "{reason}");
    let Termination::Handshake(HandshakeError::Unauthenticated { reason }) =
        within(server.closed()).await
    else {
        panic!("not refused by the authenticator");
    };
    assert_eq!(reason, "present a token of the form user:<name>");
}

#[tokio::test]
async fn a_panicking_authenticator_refuses_the_peer() {
    let (a, b) = Channel::pair();
    let server = Dispatcher::builder()
        .authenticator(|_: AuthRequest| async { panic!("the user database is gone") })
        .spawn(a);
    let client = Dispatcher::builder().spawn(b);
    assert!(matches!(
        within(client.closed()).await,
        Termination::Handshake(HandshakeError::Refused { .. })
    ));
    assert!(matches!(
        within(server.closed()).await,
        Termination::Handshake(HandshakeError::Unauthenticated { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn an_authenticator_that_never_answers_times_the_handshake_out() {
    let (a, b) = Channel::pair();
    let server = Dispatcher::builder()
        .handshake_timeout(Duration::from_secs(3))
        .authenticator(|_: AuthRequest| std::future::pending())
        .spawn(a);
    let _client = Dispatcher::builder().spawn(b);
    assert!(matches!(
        server.closed().await,
        Termination::Handshake(HandshakeError::Timeout(_))
    ));
}

#[tokio::test]
async fn a_tcp_peer_is_known_by_its_address() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let connecting = tokio::spawn(TcpStream::connect(address));
    let (accepted, _) = listener.accept().await.unwrap();
    let stream = connecting.await.unwrap().unwrap();
    let client_address = stream.local_addr().unwrap();
    let _server = Dispatcher::builder()
        .handler(whoami())
        .spawn(Channel::from(accepted));
    let client = within(Dispatcher::builder().connect(Channel::from(stream)))
        .await
        .unwrap();
    let (identity, seen) = within(client.request(WhoAmI)).await.unwrap();
    assert_eq!(identity, None, "anonymous without an authenticator");
    assert_eq!(seen, format!("tcp:{client_address}"));
    assert_eq!(client.peer().unwrap().address(), &PeerAddress::Tcp(address));
}

#[derive(Serialize, Deserialize)]
struct Greeting;
request!(Greeting => String, "greeting");

struct Greeter(&'static str);

#[tokio::test]
async fn connection_state_reaches_handlers_and_wins_over_the_routers() {
    let router = Router::new()
        .with_state(Greeter("from the router"))
        .request(|cx: Context, Greeting| async move { Ok(cx.state::<Greeter>()?.0.to_owned()) });
    let (a, b) = Channel::pair();
    let _plain = Dispatcher::builder().handler(router.clone()).spawn(a);
    let client = Dispatcher::builder().spawn(b);
    assert_eq!(
        within(client.request(Greeting)).await.unwrap(),
        "from the router"
    );
    let (a, b) = Channel::pair();
    let _per_connection = Dispatcher::builder()
        .with_state(Greeter("from the connection"))
        .handler(router)
        .spawn(a);
    let client = Dispatcher::builder().spawn(b);
    assert_eq!(
        within(client.request(Greeting)).await.unwrap(),
        "from the connection"
    );
}
