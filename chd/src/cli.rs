//! The command line: every command, option and help text.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::common::{parse_duration, parse_header};

const EXIT_STATUSES: &str = "\
Exit status:
  0  success
  1  the peer answered with an error (its code and message are on stderr)
  2  bad usage: bad arguments, bad JSON, unknown codec, bad address, unreadable file
  3  transport: unreachable address, handshake refused, timeout, connection lost
  4  anything else (an answer that cannot be shown as JSON, output failed)

Addresses: unix:/path/to.sock, tcp:host:port, tls:host:port; a bare path means unix:.
Logs: RUST_LOG=debug (or info, trace, channel_dispatcher=debug, ...) to stderr.";

/// Call, serve, watch, stream and load-test channel-dispatcher peers.
///
/// Values are shown and given as JSON; on the wire they travel with the codec chosen by
/// --codec (MessagePack by default, as the library's default).
#[derive(Debug, Parser)]
#[command(name = "chd", version, after_help = EXIT_STATUSES, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Send one request and print the answer as JSON.
    #[command(after_help = concat!(
        "Examples:\n",
        "  chd call unix:/run/app.sock add '{\"a\": 2, \"b\": 3}'\n",
        "  chd call tcp:localhost:7000 users/get @query.json -H trace-id=abc --timeout 2s\n",
        "  echo '[1, 2, 3]' | chd call /run/app.sock sum\n",
        "  chd call tls:api.example:7443 status --ca ca.pem --cert me.pem --key me.key\n\n",
        "The JSON comes from the argument, from a file (@file.json), from stdin (-), or from\n",
        "stdin when the argument is missing and stdin is not a terminal (else it is null).\n",
        "An error answer prints its code and message on stderr and exits with status 1."
    ))]
    Call(CallArgs),
    /// Send one notification (never answered).
    #[command(after_help = concat!(
        "Examples:\n",
        "  chd notify unix:/run/app.sock log '\"deploy started\"'\n",
        "  chd notify tcp:localhost:7000 cache/flush -H reason=test"
    ))]
    Notify(CallArgs),
    /// Open a remote stream and print each item as one JSON line.
    #[command(after_help = concat!(
        "Examples:\n",
        "  chd stream unix:/run/app.sock logs/tail '{\"lines\": 100}'\n",
        "  chd stream tcp:localhost:7000 export --window 64 > items.jsonl\n",
        "  chd stream tcp:localhost:7000 export --pull    # one round trip per item\n\n",
        "A progress line (items, items/s) goes to stderr when stderr is a terminal."
    ))]
    Stream(StreamArgs),
    /// Serve a socket: print every inbound request and notification, answer requests.
    #[command(after_help = concat!(
        "Examples:\n",
        "  chd listen unix:/tmp/fake.sock                 # echo every request\n",
        "  chd listen tcp:127.0.0.1:7000 --json           # JSON lines, for jq\n",
        "  chd listen tcp:0.0.0.0:7000 --reply '{\"ok\": true}'\n",
        "  chd listen /tmp/fake.sock --error '-32000:not today'\n",
        "  chd listen tls:0.0.0.0:7443 --cert server.pem --key server.key\n\n",
        "The address it listens on (with the port chosen for tcp:host:0) is printed on stderr.\n",
        "Each line: time, peer, kind, method, id, attributes, payload as JSON.\n",
        "Stops on Ctrl-C or SIGTERM, after the connections drain."
    ))]
    Listen(ListenArgs),
    /// Run a command as a child process and talk to it over its stdin/stdout.
    #[command(after_help = concat!(
        "Examples:\n",
        "  chd spawn --call ping '{\"n\": 1}' -- ./my-worker --serve\n",
        "  chd spawn --listen -- ./my-worker              # print what the worker sends\n",
        "  chd spawn --call describe '\"apple\"' --listen -- ./my-worker\n\n",
        "The child's stderr is ours (its logs show); its stdin/stdout carry the channel.\n",
        "Requests the child sends are answered as `chd listen` does (--echo by default).\n",
        "With --listen, chd runs until the child stops or exits."
    ))]
    Spawn(SpawnArgs),
    /// Serve over this process's stdin/stdout: the child side of `chd spawn`.
    #[command(
        name = "serve-stdio",
        after_help = concat!(
            "Examples:\n",
            "  chd spawn --call echo '[1, 2]' -- chd serve-stdio\n",
            "  chd spawn --listen -- chd serve-stdio --call greet '\"hi\"' --notify log '\"bye\"'\n\n",
            "What the parent sends is printed on stderr (stdout carries the channel).\n",
            "With --call or --notify, it sends them once connected, then stops; without,\n",
            "it serves until the parent closes the channel."
        )
    )]
    ServeStdio(ServeStdioArgs),
    /// Load-test a peer: throughput, latency percentiles and histogram, errors by code.
    #[command(after_help = concat!(
        "Examples:\n",
        "  chd bench unix:/run/app.sock echo '\"0123456789abcdef\"' -c 4 -k 16 -n 100000\n",
        "  chd bench tcp:localhost:7000 users/get '{\"id\": 7}' -c 8 -k 8 -d 30s --json\n\n",
        "-c connections, each with -k calls in flight (c x k in flight in total). The run\n",
        "is -n calls in total, or as many as fit in -d. Connecting is not timed."
    ))]
    Bench(BenchArgs),
    /// Print a shell completion script.
    #[command(after_help = concat!(
        "Examples:\n",
        "  chd completions bash > ~/.local/share/bash-completion/completions/chd\n",
        "  chd completions zsh > ~/.zfunc/_chd\n",
        "  chd completions fish > ~/.config/fish/completions/chd.fish"
    ))]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// The codec on the wire; both peers must use the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum CodecArg {
    /// MessagePack (the library's default).
    Msgpack,
    /// JSON.
    Json,
}

/// How to reach and greet the peer.
#[derive(Debug, Clone, Args)]
pub(crate) struct ConnectArgs {
    /// The codec; both peers must use the same one.
    #[arg(long, value_enum, default_value = "msgpack")]
    pub(crate) codec: CodecArg,
    /// The token sent in the handshake (for a peer that expects one).
    #[arg(long, env = "CHD_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// How long connecting, the handshake and the answer may take (500ms, 2s, 1m; a bare
    /// number is seconds).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub(crate) timeout: Duration,
    /// tls: the roots (PEM) that the server's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// tls: this side's certificate chain (PEM), for mutual TLS (with --key).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub(crate) cert: Option<PathBuf>,
    /// tls: this side's private key (PEM), for mutual TLS (with --cert).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub(crate) key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct CallArgs {
    /// unix:/path, tcp:host:port, tls:host:port, or a bare path (unix:).
    pub(crate) address: String,
    /// The method name.
    pub(crate) method: String,
    /// The payload: JSON, @file.json, or - for stdin.
    pub(crate) json: Option<String>,
    /// An attribute sent with the message (repeatable).
    #[arg(short = 'H', long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    pub(crate) headers: Vec<(String, String)>,
    /// Pretty-print the answer (the default when stdout is a terminal).
    #[arg(long)]
    pub(crate) pretty: bool,
    /// Also print the answer's attributes and the time it took, on stderr.
    #[arg(short, long)]
    pub(crate) verbose: bool,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub(crate) struct StreamArgs {
    /// unix:/path, tcp:host:port, tls:host:port, or a bare path (unix:).
    pub(crate) address: String,
    /// The method name of the streaming request.
    pub(crate) method: String,
    /// The payload: JSON, @file.json, or - for stdin.
    pub(crate) json: Option<String>,
    /// How many items the producer may send ahead of what is printed.
    #[arg(long, value_name = "N", conflicts_with = "pull")]
    pub(crate) window: Option<u64>,
    /// Pull mode: one request per item (the PHP original's RemoteIterator).
    #[arg(long)]
    pub(crate) pull: bool,
    /// An attribute sent with the streaming request (repeatable).
    #[arg(short = 'H', long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    pub(crate) headers: Vec<(String, String)>,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

/// How `listen`, `spawn` and `serve-stdio` answer requests.
#[derive(Debug, Clone, Args)]
pub(crate) struct AnswerArgs {
    /// Answer every request with its own payload (the default).
    #[arg(long, conflicts_with_all = ["reply", "error"])]
    pub(crate) echo: bool,
    /// Answer every request with this JSON value (or @file.json).
    #[arg(long, value_name = "JSON", conflicts_with = "error")]
    pub(crate) reply: Option<String>,
    /// Answer every request with this error, e.g. -32000:not today.
    #[arg(long, value_name = "CODE:MESSAGE", allow_hyphen_values = true)]
    pub(crate) error: Option<String>,
    /// Print each envelope as a JSON line.
    #[arg(long)]
    pub(crate) json: bool,
    /// Print no envelopes (answer only): for benchmarks.
    #[arg(short, long)]
    pub(crate) quiet: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ListenArgs {
    /// unix:/path, tcp:host:port (port 0 picks one), tls:host:port, or a bare path.
    pub(crate) address: String,
    #[command(flatten)]
    pub(crate) answer: AnswerArgs,
    /// The codec; both peers must use the same one.
    #[arg(long, value_enum, default_value = "msgpack")]
    pub(crate) codec: CodecArg,
    /// Refuse peers that do not send this token in the handshake.
    #[arg(long, env = "CHD_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// tls: this server's certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    pub(crate) cert: Option<PathBuf>,
    /// tls: this server's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub(crate) key: Option<PathBuf>,
    /// tls: require client certificates that chain to these roots (PEM): mutual TLS.
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long, value_name = "N")]
    pub(crate) threads: Option<usize>,
}

#[derive(Debug, Args)]
pub(crate) struct SpawnArgs {
    /// Make this call once the child is connected and print its answer.
    #[arg(long, num_args = 1..=2, value_names = ["METHOD", "JSON"])]
    pub(crate) call: Option<Vec<String>>,
    /// Send this notification once the child is connected.
    #[arg(long, num_args = 1..=2, value_names = ["METHOD", "JSON"])]
    pub(crate) notify: Option<Vec<String>>,
    /// Print what the child sends, until it stops or exits.
    #[arg(long)]
    pub(crate) listen: bool,
    /// An interactive session: each line of stdin is `METHOD [JSON]` (a call, its answer
    /// printed) or `!METHOD [JSON]` (a notification), until the end of stdin.
    #[arg(short, long)]
    pub(crate) interactive: bool,
    /// An attribute sent with the call or notification (repeatable).
    #[arg(short = 'H', long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    pub(crate) headers: Vec<(String, String)>,
    #[command(flatten)]
    pub(crate) answer: AnswerArgs,
    /// The codec; both peers must use the same one.
    #[arg(long, value_enum, default_value = "msgpack")]
    pub(crate) codec: CodecArg,
    /// How long the handshake and the call may take.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub(crate) timeout: Duration,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ServeStdioArgs {
    #[command(flatten)]
    pub(crate) answer: AnswerArgs,
    /// The codec; both peers must use the same one.
    #[arg(long, value_enum, default_value = "msgpack")]
    pub(crate) codec: CodecArg,
    /// Call the parent once connected (the answer goes to stderr), then stop.
    #[arg(long, num_args = 1..=2, value_names = ["METHOD", "JSON"])]
    pub(crate) call: Option<Vec<String>>,
    /// Notify the parent once connected (after --call), then stop.
    #[arg(long, num_args = 1..=2, value_names = ["METHOD", "JSON"])]
    pub(crate) notify: Option<Vec<String>>,
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// unix:/path, tcp:host:port, tls:host:port, or a bare path (unix:).
    pub(crate) address: String,
    /// The method name.
    pub(crate) method: String,
    /// The payload of every call: JSON, @file.json, or - for stdin.
    #[arg(value_name = "JSON")]
    pub(crate) payload: Option<String>,
    /// Connections.
    #[arg(short = 'c', long, default_value_t = 1, value_name = "CONNECTIONS",
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) connections: u64,
    /// Calls in flight on each connection.
    #[arg(short = 'k', long, default_value_t = 1, value_name = "IN_FLIGHT",
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) in_flight: u64,
    /// Calls in total (default 10000 unless -d is given).
    #[arg(short = 'n', long, value_name = "TOTAL", conflicts_with = "duration",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) total: Option<u64>,
    /// Run for this long instead (10s, 1m, 500ms).
    #[arg(short = 'd', long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Calls per connection before the measured run (not counted).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) warmup: u64,
    /// A timeout for every call (default: none; --timeout covers connecting).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) call_timeout: Option<Duration>,
    /// An attribute sent with every call (repeatable).
    #[arg(short = 'H', long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    pub(crate) headers: Vec<(String, String)>,
    /// Print the results as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
    /// Worker threads (default: one per core).
    #[arg(long, value_name = "N")]
    pub(crate) threads: Option<usize>,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}
