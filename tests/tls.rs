//! TLS over TCP loopback, with certificates made by the test: a round trip, a wrong server
//! name and an untrusted certificate refused with clear errors, mutual TLS whose client name
//! reaches the handler, and plaintext against TLS (both ways) refused, never hanging.

mod support;

use std::time::Duration;

use channel_dispatcher::server::{FromStream, Server};
use channel_dispatcher::tls::{self, ClientAuth, TlsListener};
use channel_dispatcher::{
    Channel, Connector, Context, Dispatcher, HandshakeError, PeerInfo, Router, Termination,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use support::{within, Echo, Logs};
use tokio::net::TcpListener;

/// A certificate authority, and certificates it signs, as PEM.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Authority {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        Self {
            pem: certificate.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names`, with `common_name`; returns (chain PEM, key PEM).
    fn sign(&self, names: &[&str], common_name: &str) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (certificate.pem(), key.serialize_pem())
    }
}

/// Answers who the handler's context says the peer is.
fn whoami() -> Router {
    Router::new().request(|cx: Context, Echo(_)| async move {
        Ok(cx
            .peer()
            .and_then(PeerInfo::identity)
            .map_or("anonymous".to_owned(), |id| id.to_string()))
    })
}

/// A TLS server for `localhost` signed by `ca`, with `client_auth`; returns it and its port.
async fn tls_server(ca: &Authority, client_auth: ClientAuth<'_>) -> (Server, u16) {
    let (chain, key) = ca.sign(&["localhost"], "localhost");
    let config = tls::server_config(chain.as_bytes(), key.as_bytes(), client_auth).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = Server::builder().serve(TlsListener::new(listener, config), |_: &PeerInfo| {
        Dispatcher::builder().handler(whoami())
    });
    (server, port)
}

fn connector(roots: &Authority, identity: Option<&(String, String)>) -> Connector {
    let identity = identity.map(|(chain, key)| (chain.as_bytes(), key.as_bytes()));
    Connector::new()
        .timeout(Duration::from_secs(10))
        .tls(tls::client_config(roots.pem.as_bytes(), identity).unwrap())
}

/// Connects to the TLS server on `port` and shakes hands; the failure's text if either fails.
async fn dial(connector: Connector, port: u16) -> Result<Dispatcher, String> {
    let channel = connector
        .connect(&format!("tls:localhost:{port}"))
        .await
        .map_err(|e| e.to_string())?;
    Dispatcher::builder()
        .connect(channel)
        .await
        .map_err(|e| e.to_string())
}

/// Who the server's handler says `client` is.
async fn whoami_of(client: &Dispatcher) -> String {
    within(client.request(Echo(String::new()))).await.unwrap()
}

#[tokio::test]
async fn a_tls_round_trip() {
    let ca = Authority::new("test CA");
    let (server, port) = tls_server(&ca, ClientAuth::None).await;
    let client = within(dial(connector(&ca, None), port)).await.unwrap();
    assert_eq!(whoami_of(&client).await, "anonymous");
    assert_eq!(server.peers().len(), 1);
    within(server.shutdown()).await;
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_with_a_clear_error() {
    let ca = Authority::new("test CA");
    let (_server, port) = tls_server(&ca, ClientAuth::None).await;
    // The certificate is for `localhost`; the client asks for the address it dialled.
    let error = within(connector(&ca, None).connect(&format!("tls:127.0.0.1:{port}")))
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("TLS handshake") && text.contains("not valid for name"),
        "{text}"
    );
}

#[tokio::test]
async fn a_certificate_from_untrusted_roots_is_refused() {
    let ca = Authority::new("test CA");
    let stranger = Authority::new("someone else's CA");
    let (_server, port) = tls_server(&ca, ClientAuth::None).await;
    let error = within(connector(&stranger, None).connect(&format!("tls:localhost:{port}")))
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(text.contains("UnknownIssuer"), "{text}");
}

#[tokio::test]
async fn a_client_certificate_names_the_peer_to_its_handlers() {
    let ca = Authority::new("test CA");
    let clients = Authority::new("clients CA");
    let (server, port) = tls_server(&ca, ClientAuth::Optional(clients.pem.as_bytes())).await;
    let identity = clients.sign(&["worker-7.example"], "worker-7");
    let client = within(dial(connector(&ca, Some(&identity)), port))
        .await
        .unwrap();
    assert_eq!(whoami_of(&client).await, "worker-7");
    let peer = server.peers().list().pop().unwrap();
    assert_eq!(peer.info().identity().unwrap().name(), "worker-7");
    // The server's own name, as the client sees it.
    assert_eq!(
        client.peer().unwrap().identity().unwrap().name(),
        "localhost"
    );

    // Without a certificate: accepted, anonymous.
    let anonymous = within(dial(connector(&ca, None), port)).await.unwrap();
    assert_eq!(whoami_of(&anonymous).await, "anonymous");

    // A certificate from roots the server does not trust: refused.
    let stranger = Authority::new("someone else's CA").sign(&["x.example"], "impostor");
    // TLS 1.3 finishes the client's side before the server checks its certificate: the
    // refusal arrives as the connection's end.
    let refused = dial(connector(&ca, Some(&stranger)), port);
    assert!(
        within(refused).await.is_err(),
        "an untrusted client certificate is refused"
    );
}

#[tokio::test]
async fn a_server_that_requires_client_certificates_refuses_a_client_without_one() {
    let ca = Authority::new("test CA");
    let clients = Authority::new("clients CA");
    let (server, port) = tls_server(&ca, ClientAuth::Required(clients.pem.as_bytes())).await;
    let refused = dial(connector(&ca, None), port);
    let error = within(refused).await.unwrap_err();
    assert!(error.to_string().contains("Certificate"), "{error}");
    assert!(server.peers().is_empty());

    let identity = clients.sign(&["worker-1.example"], "worker-1");
    let client = within(dial(connector(&ca, Some(&identity)), port))
        .await
        .unwrap();
    assert_eq!(whoami_of(&client).await, "worker-1");
}

#[tokio::test]
async fn clients_that_never_finish_their_tls_handshake_do_not_hold_up_others() {
    let ca = Authority::new("test CA");
    let (chain, key) = ca.sign(&["localhost"], "localhost");
    let config = tls::server_config(chain.as_bytes(), key.as_bytes(), ClientAuth::None).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let listener = TlsListener::new(listener, config)
        .max_handshakes(4)
        .handshake_timeout(Duration::from_millis(300));
    let server = Server::builder().serve(listener, |_: &PeerInfo| {
        Dispatcher::builder().handler(whoami())
    });
    // Eight silent clients: twice the handshakes the listener runs at once.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    // A real client still gets in, once the silent ones time out.
    let client = within(dial(connector(&ca, None), port)).await.unwrap();
    assert_eq!(whoami_of(&client).await, "anonymous");
    // The silent ones were dropped by the server.
    for mut stream in silent {
        let mut byte = [0u8; 1];
        let read = within(tokio::io::AsyncReadExt::read(&mut stream, &mut byte)).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    within(server.shutdown()).await;
}

#[tokio::test]
async fn a_plaintext_client_and_a_tls_server_refuse_each_other_at_once() {
    let (logs, _guard) = Logs::capture("channel_dispatcher=warn");
    let ca = Authority::new("test CA");
    let (_server, port) = tls_server(&ca, ClientAuth::None).await;
    let channel = within(Channel::connect(&format!("tcp:localhost:{port}")))
        .await
        .unwrap();
    let end = within(Dispatcher::builder().connect(channel))
        .await
        .unwrap_err();
    assert!(
        matches!(end, Termination::Handshake(HandshakeError::PeerSpeaksTls)),
        "{end:?}"
    );
    // The server's side says what happened too.
    within(async {
        while !logs.text().contains("does not speak TLS") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_tls_client_and_a_plaintext_server_refuse_each_other_at_once() {
    let ca = Authority::new("test CA");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (accepted_tx, accepted) = tokio::sync::mpsc::unbounded_channel();
    let server = Server::builder()
        .serve(FromStream(tokio_stream_from(accepted)), |_: &PeerInfo| {
            Dispatcher::builder()
        });
    let mut events = server.peers().events();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let _ = accepted_tx.send(Ok(Channel::from(stream)));
    });
    let error = within(connector(&ca, None).connect(&format!("tls:localhost:{port}")))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("does the server speak TLS"),
        "{error}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.recv())
            .await
            .is_err(),
        "nobody joined"
    );
}

#[tokio::test]
async fn a_server_that_never_finishes_the_handshake_times_the_connection_out() {
    let ca = Authority::new("test CA");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts, and never says a word.
    let silent = tokio::spawn(async move {
        let (_stream, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await
    });
    let error = within(
        connector(&ca, None)
            .timeout(Duration::from_millis(200))
            .connect(&format!("tls:localhost:{port}")),
    )
    .await
    .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    assert!(
        error.to_string().contains("took more than 200ms"),
        "{error}"
    );
    silent.abort();
}

/// An mpsc receiver as a `Stream`.
fn tokio_stream_from<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + Unpin {
    Box::pin(futures_util::stream::poll_fn(move |cx| {
        receiver.poll_recv(cx)
    }))
}

const CHILD_PORT_FILE: &str = "CHANNEL_DISPATCHER_TEST_TLS_PORT_FILE";

/// The child's side of the test below: a TLS server whose handshakes time out quickly,
/// under the descriptor limit its parent set; it writes its port to a file.
#[tokio::test]
async fn tls_child_server() {
    let Some(port_file) = std::env::var_os(CHILD_PORT_FILE) else {
        return; // run by the parent test only
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("channel_dispatcher=warn")
        .init();
    let config = tls::server_config(
        std::env::var("TEST_CHAIN").unwrap().as_bytes(),
        std::env::var("TEST_KEY").unwrap().as_bytes(),
        ClientAuth::None,
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let listener = TlsListener::new(listener, config).handshake_timeout(Duration::from_millis(300));
    let _server = Server::builder().serve(listener, |_: &PeerInfo| {
        Dispatcher::builder().handler(whoami())
    });
    std::fs::write(&port_file, port.to_string()).unwrap();
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn silent_clients_that_exhaust_descriptors_time_out_and_the_server_serves_again() {
    use tokio::io::AsyncBufReadExt;
    if std::env::var_os(CHILD_PORT_FILE).is_some() {
        return; // the child runs `tls_child_server` only
    }
    let patience = Duration::from_secs(20);
    let ca = Authority::new("test CA");
    let (chain, key) = ca.sign(&["localhost"], "localhost");
    let port_file = std::env::temp_dir().join(format!("chd-tls-emfile-{}", std::process::id()));
    let _ = std::fs::remove_file(&port_file);
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 64 && exec "$0" --exact tls_child_server --nocapture"#)
        .arg(std::env::current_exe().unwrap())
        .env(CHILD_PORT_FILE, &port_file)
        .env("TEST_CHAIN", chain)
        .env("TEST_KEY", key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the server");
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let port: u16 = tokio::time::timeout(patience, async {
        loop {
            if let Ok(port) = std::fs::read_to_string(&port_file) {
                if let Ok(port) = port.parse() {
                    return port;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the server listens");

    // More silent connections than the child has descriptors, kept open: its accepts fail,
    // and only the handshakes' timeouts free descriptors again.
    let mut crowd = Vec::new();
    for _ in 0..100 {
        crowd.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    tokio::time::timeout(patience, async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("accepting a connection failed") {
                return;
            }
        }
        panic!("the server's log ended");
    })
    .await
    .expect("the accept error is logged");

    let client = tokio::time::timeout(patience, async {
        loop {
            if let Ok(client) = dial(connector(&ca, None), port).await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a TLS client gets in while the silent crowd still holds its sockets");
    assert_eq!(whoami_of(&client).await, "anonymous");
    drop(crowd);
    child.kill().await.unwrap();
    let _ = std::fs::remove_file(&port_file);
}
