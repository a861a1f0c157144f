//! The server: many clients at once over Unix and TCP, the registry and broadcasts (with a
//! peer that never reads, and peers coming and going), the connection limit, authentication,
//! and shutdown with calls in flight.

mod support;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_dispatcher::server::{Peer, PeerEvent, PeerId, Peers, Server};
use channel_dispatcher::{
    notification, request, AuthRequest, CallError, Channel, Context, Dispatcher, HandshakeError,
    Identity, PeerInfo, Refusal, Router, Termination,
};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use support::raw::{hello, VERSION};
use support::{within, Echo};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

#[derive(Serialize, Deserialize, Clone)]
struct News(String);
notification!(News, "news");

/// Tells every other peer `text`, from the handler of one peer.
#[derive(Serialize, Deserialize)]
struct Say(String);
request!(Say => usize, "say");

/// Takes `ms` to answer.
#[derive(Serialize, Deserialize)]
struct Slow(u64);
request!(Slow => u64, "slow");

fn router() -> Router {
    Router::new()
        .request(|_cx: Context, Echo(s)| async move { Ok(s) })
        .request(|_cx: Context, Slow(ms)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(ms)
        })
        .request(|cx: Context, Say(text)| async move {
            let peers = cx.state::<Peers>()?;
            let me = *cx.state::<PeerId>()?;
            let sent = peers
                .broadcast_to(&News(text), |peer: &Peer| peer.id() != me)
                .await;
            Ok(sent.delivered())
        })
}

/// A client whose notification handler counts what it hears.
async fn client(channel: Channel, heard: Arc<AtomicUsize>) -> Dispatcher {
    let router = Router::new().notification(move |_cx: Context, News(_)| {
        heard.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    });
    within(Dispatcher::builder().handler(router).connect(channel))
        .await
        .expect("connected")
}

async fn unix_server(max: usize) -> (Server, std::path::PathBuf, tempdir::Dir) {
    let dir = tempdir::Dir::new();
    let path = dir.path().join("server.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = Server::builder()
        .max_connections(max)
        .serve(listener, |_: &PeerInfo| {
            Dispatcher::builder().handler(router())
        });
    (server, path, dir)
}

/// A fresh directory for socket files, removed when dropped.
mod tempdir {
    pub(super) struct Dir(std::path::PathBuf);
    impl Dir {
        pub(super) fn new() -> Self {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = std::env::temp_dir().join(format!(
                "channel-dispatcher-server-{}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
        pub(super) fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn wait_for_peers(server: &Server, count: usize) {
    within(async {
        while server.peers().len() != count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn two_hundred_clients_over_unix_and_tcp_call_at_once() {
    let (unix, path, _dir) = unix_server(1000).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let tcp = Server::builder().serve(listener, |peer: &PeerInfo| {
        assert!(peer.address().to_string().starts_with("tcp:127.0.0.1:"));
        Dispatcher::builder().handler(router())
    });
    let clients = (0..200).map(|i| {
        let path = path.clone();
        async move {
            let channel = match i % 2 {
                0 => Channel::from(UnixStream::connect(&path).await.unwrap()),
                _ => Channel::from(TcpStream::connect(address).await.unwrap()),
            };
            let client = client(channel, Arc::default()).await;
            for call in 0..10 {
                let text = format!("{i}/{call}");
                assert_eq!(client.request(Echo(text.clone())).await.unwrap(), text);
            }
            client
        }
    });
    let clients = within(join_all(clients)).await;
    wait_for_peers(&unix, 100).await;
    wait_for_peers(&tcp, 100).await;
    drop(clients);
    wait_for_peers(&unix, 0).await;
    wait_for_peers(&tcp, 0).await;
    within(unix.shutdown()).await;
    within(tcp.shutdown()).await;
}

#[tokio::test]
async fn a_broadcast_reaches_everyone_while_one_peer_never_reads() {
    let dir = tempdir::Dir::new();
    let path = dir.path().join("server.sock");
    let server = Server::builder()
        .broadcast_timeout(Duration::from_millis(300))
        .serve(UnixListener::bind(&path).unwrap(), |_: &PeerInfo| {
            Dispatcher::builder()
                .handler(router())
                .max_queued_bytes(64 << 10)
                .write_buffer_limit(16 << 10)
        });
    let heard: Vec<Arc<AtomicUsize>> = (0..10).map(|_| Arc::default()).collect();
    let mut clients = Vec::new();
    for count in &heard {
        let channel = Channel::from(UnixStream::connect(&path).await.unwrap());
        clients.push(client(channel, Arc::clone(count)).await);
    }
    // A raw peer that completes its handshake and then never reads again.
    let mut stuck = UnixStream::connect(&path).await.unwrap();
    for body in [hello(VERSION, "msgpack"), vec![0]] {
        stuck.write_all(&support::raw::frame(&body)).await.unwrap();
    }
    wait_for_peers(&server, 11).await;
    let news = News("x".repeat(16 << 10));
    let mut stuck_failures = 0;
    for round in 1..=40 {
        let sent = within(server.peers().broadcast(&news)).await;
        assert!(sent.delivered() >= 10, "round {round}: {sent:?}");
        for (_, error) in sent.failures() {
            assert!(matches!(error, CallError::Timeout(_)), "{error:?}");
            stuck_failures += 1;
        }
    }
    assert!(
        stuck_failures > 10,
        "the stuck peer's queue is bounded: {stuck_failures} failures"
    );
    within(async {
        while heard.iter().any(|count| count.load(Ordering::SeqCst) < 40) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    drop(stuck);
    within(server.shutdown()).await;
}

#[tokio::test]
async fn peers_join_and_leave_during_broadcasts_and_the_registry_follows() {
    let (server, path, _dir) = unix_server(1000).await;
    let mut events = server.peers().events();
    let churn = {
        let path = path.clone();
        tokio::spawn(async move {
            for _ in 0..30 {
                let channel = Channel::from(UnixStream::connect(&path).await.unwrap());
                let client = client(channel, Arc::default()).await;
                client.request(Echo("hi".into())).await.unwrap();
                drop(client);
            }
        })
    };
    let steady = client(
        Channel::from(UnixStream::connect(&path).await.unwrap()),
        Arc::default(),
    )
    .await;
    while !churn.is_finished() {
        let sent = within(server.peers().broadcast(&News("tick".into()))).await;
        for (_, error) in sent.failures() {
            assert!(matches!(error, CallError::Terminated(_)), "{error:?}");
        }
        tokio::task::yield_now().await;
    }
    churn.await.unwrap();
    wait_for_peers(&server, 1).await;
    let (mut joined, mut left) = (0, 0);
    while let Ok(event) = events.try_recv() {
        match event {
            PeerEvent::Joined(_) => joined += 1,
            PeerEvent::Left { .. } => left += 1,
            _ => {}
        }
    }
    assert_eq!((joined, left), (31, 30));
    drop(steady);
    wait_for_peers(&server, 0).await;
}

#[tokio::test]
async fn a_peer_over_the_connection_limit_is_refused_with_the_reason() {
    let (server, path, _dir) = unix_server(2).await;
    let first = client(
        Channel::from(UnixStream::connect(&path).await.unwrap()),
        Arc::default(),
    )
    .await;
    let _second = client(
        Channel::from(UnixStream::connect(&path).await.unwrap()),
        Arc::default(),
    )
    .await;
    let third = Dispatcher::builder()
        .connect(Channel::from(UnixStream::connect(&path).await.unwrap()))
        .await;
    let Err(Termination::Handshake(HandshakeError::Refused { reason })) = third else {
        panic!("not refused: {third:?}");
    };
    assert!(reason.contains("limit of 2 connections"), "{reason}");
    first.stop().await;
    within(async {
        while server.connections() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let fourth = client(
        Channel::from(UnixStream::connect(&path).await.unwrap()),
        Arc::default(),
    )
    .await;
    assert_eq!(fourth.request(Echo("in".into())).await.unwrap(), "in");
}

#[tokio::test]
async fn shutdown_lets_calls_in_flight_on_every_connection_finish() {
    let (server, path, _dir) = unix_server(1000).await;
    let mut calls = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..20 {
        let client = client(
            Channel::from(UnixStream::connect(&path).await.unwrap()),
            Arc::default(),
        )
        .await;
        calls.push(tokio::spawn(client.request(Slow(300)).into_future()));
        clients.push(client);
    }
    wait_for_peers(&server, 20).await;
    // Every call has reached its handler.
    within(async {
        while server
            .peers()
            .list()
            .iter()
            .any(|peer| peer.dispatcher().running_handlers() == 0)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    within(server.shutdown()).await;
    assert_eq!(server.connections(), 0);
    for call in calls {
        assert_eq!(
            call.await.unwrap().unwrap(),
            300,
            "answered during the drain"
        );
    }
    for client in clients {
        assert!(matches!(
            within(client.closed()).await,
            Termination::PeerStopped { .. }
        ));
    }
    assert!(
        UnixStream::connect(&path).await.is_err(),
        "no longer accepting: the listener is closed"
    );
}

#[tokio::test]
async fn the_authenticators_identity_reaches_handlers_and_a_refusal_its_client() {
    let dir = tempdir::Dir::new();
    let path = dir.path().join("server.sock");
    let authenticate = |request: AuthRequest| async move {
        match request.token() {
            Some("ada-secret") => Ok(Some(Identity::new("ada"))),
            _ => Err(Refusal::new("unknown token: ask the admin for one")),
        }
    };
    let whoami = Router::new().request(|cx: Context, Echo(_)| async move {
        Ok(cx
            .peer()
            .and_then(|p| p.identity())
            .map_or("?".into(), |id| id.to_string()))
    });
    let server =
        Server::builder().serve(UnixListener::bind(&path).unwrap(), move |_: &PeerInfo| {
            Dispatcher::builder()
                .authenticator(authenticate)
                .handler(whoami.clone())
        });
    let ada = Dispatcher::builder()
        .token("ada-secret")
        .connect(Channel::from(UnixStream::connect(&path).await.unwrap()))
        .await
        .unwrap();
    assert_eq!(ada.request(Echo(String::new())).await.unwrap(), "ada");
    let peer = server.peers().list().pop().unwrap();
    assert_eq!(peer.info().identity().map(Identity::name), Some("ada"));
    let intruder = Dispatcher::builder()
        .token("guess")
        .connect(Channel::from(UnixStream::connect(&path).await.unwrap()))
        .await;
    let Err(Termination::Handshake(HandshakeError::Refused { reason })) = intruder else {
        panic!("not refused: {intruder:?}");
    };
    assert!(reason.contains("ask the admin"), "{reason}");
    assert_eq!(server.peers().len(), 1);
}

#[tokio::test]
async fn a_handler_pushes_to_the_other_peers_through_the_registry() {
    let (server, path, _dir) = unix_server(1000).await;
    let heard: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let mut clients = Vec::new();
    for count in &heard {
        let channel = Channel::from(UnixStream::connect(&path).await.unwrap());
        clients.push(client(channel, Arc::clone(count)).await);
    }
    wait_for_peers(&server, 3).await;
    assert_eq!(
        within(clients[0].request(Say("hello".into())))
            .await
            .unwrap(),
        2
    );
    within(async {
        while heard[1].load(Ordering::SeqCst) + heard[2].load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(heard[0].load(Ordering::SeqCst), 0, "not to the sender");
}

#[tokio::test]
async fn a_peer_of_any_codec_over_the_limit_is_told_about_the_limit() {
    let (_server, path, _dir) = unix_server(1).await;
    let _first = client(
        Channel::from(UnixStream::connect(&path).await.unwrap()),
        Arc::default(),
    )
    .await;
    // A raw peer that speaks a codec the server has never heard of.
    let mut peer = support::raw::RawPeer::new(UnixStream::connect(&path).await.unwrap());
    peer.send_frame(&hello(VERSION, "no-such-codec")).await;
    let _their_hello = within(peer.read_frame()).await.expect("the server's hello");
    let verdict = within(peer.read_frame())
        .await
        .expect("the server's verdict");
    assert_eq!(verdict[0], 1, "a refusal");
    let reason = String::from_utf8_lossy(&verdict[1..]);
    assert!(reason.contains("limit of 1 connections"), "{reason}");
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_peer_that_never_finishes_its_handshake() {
    let dir = tempdir::Dir::new();
    let path = dir.path().join("server.sock");
    let server = Server::builder().serve(UnixListener::bind(&path).unwrap(), |_: &PeerInfo| {
        Dispatcher::builder().drain_timeout(Duration::from_millis(200))
    });
    let _silent = UnixStream::connect(&path).await.unwrap();
    within(async {
        while server.connections() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // The handshake timeout is 10 s; the shutdown stops the handshake within the drain.
    tokio::time::timeout(Duration::from_secs(3), server.shutdown())
        .await
        .expect("shutdown waited for the handshake");
    assert_eq!(server.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_filter_may_use_the_registry() {
    let (server, path, _dir) = unix_server(10).await;
    let heard = Arc::new(AtomicUsize::new(0));
    let _client = client(
        Channel::from(UnixStream::connect(&path).await.unwrap()),
        heard.clone(),
    )
    .await;
    wait_for_peers(&server, 1).await;
    let peers = server.peers().clone();
    let sent = within(
        server
            .peers()
            .broadcast_to(&News("x".into()), |peer| peers.get(peer.id()).is_some()),
    )
    .await;
    assert_eq!(sent.delivered(), 1);
    within(async {
        while heard.load(Ordering::SeqCst) != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_server_on_ipv6_loopback_serves_a_client_that_dials_by_address() {
    let Ok(listener) = TcpListener::bind("[::1]:0").await else {
        eprintln!("no IPv6 loopback on this machine: nothing to test");
        return;
    };
    let port = listener.local_addr().unwrap().port();
    let server = Server::builder().serve(listener, |peer: &PeerInfo| {
        assert!(
            peer.address().to_string().starts_with("tcp:[::1]:"),
            "{peer}"
        );
        Dispatcher::builder().handler(router())
    });
    let channel = within(Channel::connect(&format!("tcp:[::1]:{port}")))
        .await
        .unwrap();
    let client = client(channel, Arc::default()).await;
    assert_eq!(
        within(client.request(Echo("v6".into()))).await.unwrap(),
        "v6"
    );
    within(server.shutdown()).await;
}
