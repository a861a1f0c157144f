//! Authentication in the handshake: an [`Authenticator`] sees the token the peer presents
//! and what the transport knows about it, and returns its [`Identity`] or refuses it with a
//! reason the peer is told.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::peer::{Identity, PeerInfo};

/// What an [`Authenticator`] decides: the peer's identity, or `None` to accept it as it is
/// (with the identity its transport established, such as a TLS client certificate's name, or
/// anonymous), or a refusal.
pub type AuthResult = Result<Option<Identity>, Refusal>;

/// The future an [`Authenticator`] returns.
pub type AuthFuture = Pin<Box<dyn Future<Output = AuthResult> + Send>>;

/// What the handshake knows about a peer when it authenticates it.
#[derive(Clone, Debug)]
pub struct AuthRequest {
    pub(crate) token: Option<String>,
    pub(crate) peer: PeerInfo,
}

impl AuthRequest {
    /// A request for a peer that presented `token`, for testing an authenticator.
    pub fn new(token: Option<String>, peer: PeerInfo) -> Self {
        Self { token, peer }
    }

    /// The token the peer presented, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Its address, and the identity its transport established (the subject of its TLS
    /// client certificate), if any.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
}

/// Why an [`Authenticator`] refused a peer; the peer is told the reason in the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    reason: String,
}

impl Refusal {
    /// A refusal the peer is told as `reason`. Say what to fix, not what the secret was.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }

    /// The reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Decides in the handshake whether a peer may connect, and who it is.
///
/// It runs on the accepting side of every connection whose [`Builder`](crate::Builder) has
/// one, after the versions and codecs matched, within the handshake timeout. The identity it
/// returns is what handlers see in [`Context::peer`](crate::Context::peer). Without an
/// authenticator every peer is accepted, with the identity its transport established (a TLS
/// client certificate's subject) or none.
///
/// Any `Fn(AuthRequest) -> impl Future<Output = AuthResult>` is one; [`SharedToken`] is the
/// simplest.
///
/// # Examples
/// ```
/// use channel_dispatcher::{AuthRequest, Dispatcher, Identity, Refusal};
///
/// let builder = Dispatcher::builder().authenticator(|request: AuthRequest| async move {
///     match request.token() {
///         Some(token) if token.starts_with("user:") => Ok(Some(Identity::new(&token[5..]))),
///         _ => Err(Refusal::new("present a token of the form user:<name>")),
///     }
/// });
/// ```
pub trait Authenticator: Send + Sync + 'static {
    /// Accepts the peer (with its identity, or anonymous) or refuses it.
    fn authenticate(&self, request: AuthRequest) -> AuthFuture;
}

impl<F, Fut> Authenticator for F
where
    F: Fn(AuthRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = AuthResult> + Send + 'static,
{
    fn authenticate(&self, request: AuthRequest) -> AuthFuture {
        Box::pin(self(request))
    }
}

/// Accepts the peers that present one shared token, compared in constant time; refuses the
/// others alike whether their token was missing or wrong. A peer accepted keeps the identity
/// its transport established, if any.
///
/// [`Builder::expect_token`](crate::Builder::expect_token) sets one.
#[derive(Clone)]
pub struct SharedToken {
    token: Vec<u8>,
}

impl SharedToken {
    /// The reason a refused peer is told.
    pub(crate) const REFUSAL: &'static str = "the peer's authentication token was missing or wrong";

    /// Expects `token`.
    pub fn new(token: impl Into<String>) -> Self {
        Self {
            token: token.into().into_bytes(),
        }
    }

    /// Whether `presented` is the token, in time that depends on its length only.
    fn matches(&self, presented: Option<&str>) -> bool {
        let presented = presented.unwrap_or("").as_bytes();
        let mut difference = (presented.len() != self.token.len()) as u8;
        for (i, expected) in self.token.iter().enumerate() {
            difference |= expected ^ presented.get(i).copied().unwrap_or(!expected);
        }
        std::hint::black_box(difference) == 0
    }
}

impl fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedToken").finish_non_exhaustive()
    }
}

impl Authenticator for SharedToken {
    fn authenticate(&self, request: AuthRequest) -> AuthFuture {
        let verdict = match self.matches(request.token()) {
            true => Ok(request.peer.identity().cloned()),
            false => Err(Refusal::new(Self::REFUSAL)),
        };
        Box::pin(std::future::ready(verdict))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerAddress;

    fn request(token: Option<&str>) -> AuthRequest {
        AuthRequest::new(token.map(str::to_owned), PeerInfo::new(PeerAddress::Memory))
    }

    #[tokio::test]
    async fn a_shared_token_accepts_only_itself_and_refuses_missing_and_wrong_alike() {
        let auth = SharedToken::new("s3cret");
        assert_eq!(auth.authenticate(request(Some("s3cret"))).await, Ok(None));
        let refusals: Vec<_> = [
            None,
            Some(""),
            Some("s3cre"),
            Some("s3cret!"),
            Some("S3cret"),
        ]
        .into_iter()
        .map(|token| futures_util::FutureExt::now_or_never(auth.authenticate(request(token))))
        .collect();
        for refusal in &refusals {
            assert_eq!(
                refusal.as_ref().unwrap().as_ref().unwrap_err().reason(),
                SharedToken::REFUSAL
            );
        }
        let empty = SharedToken::new("");
        assert_eq!(
            empty.authenticate(request(None)).await,
            Ok(None),
            "no token expected"
        );
    }
}
