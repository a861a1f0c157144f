//! The messages of the chat example, shared by `server.rs` and `client.rs`.

use channel_dispatcher::{notification, request};
use serde::{Deserialize, Serialize};

/// Where the server listens and the client connects unless told otherwise.
pub(crate) const DEFAULT_ADDRESS: &str = "tcp:127.0.0.1:7878";

/// The room's password: a client presents `<name>:<password>` as its token.
pub(crate) const DEFAULT_PASSWORD: &str = "open-sesame";

/// Client -> server: say something to the room; answered with how many heard it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Say {
    pub(crate) text: String,
}
request!(Say => usize, "chat/say");

/// Client -> server: who is in the room?
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Who;
request!(Who => Vec<String>, "chat/who");

/// Server -> client: someone said something.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Said {
    pub(crate) from: String,
    pub(crate) text: String,
}
notification!(Said, "chat/said");

/// Server -> client: someone came or went, or the server is going away.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Notice(pub(crate) String);
notification!(Notice, "chat/notice");
