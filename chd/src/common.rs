//! What every command shares: failures and exit statuses, addresses, payloads, connecting.

use std::fmt;
use std::io::{self, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use channel_dispatcher::{
    tls, Attributes, CallError, Channel, Codec, Connector, Dispatcher, Termination,
};
use serde_json::Value;

use crate::cli::{CodecArg, ConnectArgs};

/// Exit status: the peer answered with an error.
pub(crate) const EXIT_REMOTE: u8 = 1;
/// Exit status: bad usage (arguments, JSON, codec, address, files).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit status: the transport failed (unreachable, handshake, timeout, connection lost).
pub(crate) const EXIT_TRANSPORT: u8 = 3;
/// Exit status: anything else.
pub(crate) const EXIT_OTHER: u8 = 4;

/// Why a command failed: its message (what went wrong and what to do, on one line) and its
/// exit status.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: u8,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            status: EXIT_USAGE,
            message: message.into(),
        }
    }

    pub(crate) fn transport(message: impl Into<String>) -> Self {
        Self {
            status: EXIT_TRANSPORT,
            message: message.into(),
        }
    }

    pub(crate) fn other(message: impl Into<String>) -> Self {
        Self {
            status: EXIT_OTHER,
            message: message.into(),
        }
    }

    /// A failed call (or stream) to `address`, with its exit status.
    pub(crate) fn call(error: CallError, address: &str) -> Self {
        match error {
            CallError::Remote(remote) => {
                let mut message = format!(
                    "the peer answered error {}: {}",
                    remote.code, remote.message
                );
                if let Ok(Some(data)) = remote.data::<Value>() {
                    message.push_str(&format!(" (data: {data})"));
                }
                Self {
                    status: EXIT_REMOTE,
                    message,
                }
            }
            CallError::Timeout(after) => Self::transport(format!(
                "no answer from {address} within {}: the peer is slow or stuck; raise --timeout",
                human_duration(after)
            )),
            CallError::Terminated(reason) => Self::transport(format!(
                "the connection to {address} ended before the answer: {reason}"
            )),
            CallError::Encode(e) => Self::usage(format!(
                "the payload cannot be encoded (nothing was sent): {e}; try --codec json"
            )),
            CallError::Limit(e) => Self::usage(format!(
                "the message is over the peer's limits (nothing was sent): {e}; send less"
            )),
            CallError::Decode(e) => Self::other(format!(
                "the answer cannot be shown as JSON: {e}; try --codec json on both sides"
            )),
            other => Self::other(format!("the call to {address} failed: {other}")),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub(crate) type Outcome<T = ()> = Result<T, Failure>;

impl CodecArg {
    pub(crate) fn codec(self) -> Codec {
        match self {
            Self::Msgpack => Codec::MessagePack,
            Self::Json => Codec::Json,
        }
    }
}

/// `500ms`, `2s`, `1.5s`, `1m`, `1h`, or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: write 500ms, 2s, 1m or 1h"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1e3,
        "us" | "µs" => number / 1e6,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        other => {
            return Err(format!(
                "`{other}` is not a unit of time: write 500ms, 2s, 1m or 1h"
            ))
        }
    };
    if !seconds.is_finite() || seconds > 1e9 {
        return Err(format!("`{text}` is too long a duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `key=value` (or `key: value`).
pub(crate) fn parse_header(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .or_else(|| text.split_once(':'))
        .ok_or_else(|| format!("`{text}` is not an attribute: write key=value"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("`{text}` has no key: write key=value"));
    }
    Ok((key.to_owned(), value.trim_start().to_owned()))
}

pub(crate) fn attributes(headers: &[(String, String)]) -> Attributes {
    let mut attributes = Attributes::new();
    for (key, value) in headers {
        attributes.insert(key.clone(), value.clone());
    }
    attributes
}

/// Where a peer is, parsed from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Address {
    Unix(PathBuf),
    Tcp(String),
    Tls(String),
}

impl Address {
    pub(crate) fn parse(text: &str) -> Outcome<Self> {
        let help =
            "use unix:/path/to.sock, tcp:host:port or tls:host:port (a bare path means unix:)";
        let host_port = |rest: &str, scheme: &str| -> Outcome<String> {
            match rest.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(rest.to_owned())
                }
                _ => Err(Failure::usage(format!(
                    "`{text}` is not an address: {scheme}: needs host:port, e.g. {scheme}:127.0.0.1:7000"
                ))),
            }
        };
        if text.starts_with('/') || text.starts_with('.') || !text.contains(':') {
            if text.is_empty() {
                return Err(Failure::usage(format!("the address is empty: {help}")));
            }
            return Ok(Self::Unix(PathBuf::from(text)));
        }
        match text.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix(PathBuf::from(path))),
            Some(("tcp", rest)) => Ok(Self::Tcp(host_port(rest, "tcp")?)),
            Some(("tls", rest)) => Ok(Self::Tls(host_port(rest, "tls")?)),
            Some((_, port)) if port.parse::<u16>().is_ok() => Err(Failure::usage(format!(
                "`{text}` is not an address: {help} (did you mean tcp:{text}?)"
            ))),
            Some((scheme, _)) if !scheme.contains('/') => Err(Failure::usage(format!(
                "`{text}` is not an address (unknown scheme `{scheme}:`): {help}"
            ))),
            _ => Err(Failure::usage(format!(
                "`{text}` is not an address: {help}"
            ))),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(host_port) => write!(f, "tcp:{host_port}"),
            Self::Tls(host_port) => write!(f, "tls:{host_port}"),
        }
    }
}

/// Reads a file named on the command line, or fails with a usage error saying which option.
pub(crate) fn read_file(path: &Path, what: &str) -> Outcome<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Failure::usage(format!(
            "cannot read {what} {}: {e}; check the path",
            path.display()
        ))
    })
}

/// The payload of a command: the argument as JSON, `@file`, `-` for stdin, or (when absent)
/// stdin if it is not a terminal, else null.
pub(crate) fn read_payload(argument: Option<&str>) -> Outcome<Value> {
    let (text, source) = match argument {
        Some("-") | Some("@-") => (read_stdin()?, "stdin".to_owned()),
        Some(file) if file.starts_with('@') => {
            let path = Path::new(&file[1..]);
            let bytes = read_file(path, "the payload file")?;
            let text = String::from_utf8(bytes).map_err(|_| {
                Failure::usage(format!(
                    "the payload file {} is not UTF-8 text; give a JSON file",
                    path.display()
                ))
            })?;
            (text, format!("file {}", path.display()))
        }
        Some(json) => (json.to_owned(), "the argument".to_owned()),
        None if io::stdin().is_terminal() => return Ok(Value::Null),
        None => (read_stdin()?, "stdin".to_owned()),
    };
    parse_json(&text, &source)
}

pub(crate) fn parse_json(text: &str, source: &str) -> Outcome<Value> {
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text).map_err(|e| {
        Failure::usage(format!(
            "the payload ({source}) is not valid JSON: {e}; give one JSON value, e.g. \
             '{{\"id\": 7}}' (quoted for the shell), @file.json, or - for stdin"
        ))
    })
}

fn read_stdin() -> Outcome<String> {
    let mut text = String::new();
    io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| Failure::usage(format!("cannot read the payload from stdin: {e}")))?;
    Ok(text)
}

/// Encodes `value` with `codec`.
pub(crate) fn encode(codec: Codec, value: &Value) -> Outcome<bytes::Bytes> {
    codec
        .encode(value)
        .map_err(|e| Failure::usage(format!("the payload cannot be encoded: {e}")))
}

/// Dials `address` and completes the handshake, with the given builder settings.
pub(crate) async fn connect(
    address: &Address,
    args: &ConnectArgs,
    configure: impl FnOnce(channel_dispatcher::Builder) -> channel_dispatcher::Builder,
) -> Outcome<Dispatcher> {
    let channel = dial(address, args).await?;
    let mut builder = Dispatcher::builder()
        .codec(args.codec.codec())
        .handshake_timeout(args.timeout);
    if let Some(token) = &args.token {
        builder = builder.token(token.clone());
    }
    configure(builder)
        .connect(channel)
        .await
        .map_err(|reason| handshake_failure(address, reason))
}

/// The transport to `address`, TLS set up from the options.
pub(crate) async fn dial(address: &Address, args: &ConnectArgs) -> Outcome<Channel> {
    let mut connector = Connector::new().timeout(args.timeout);
    if let Address::Tls(_) = address {
        let Some(ca) = &args.ca else {
            return Err(Failure::usage(format!(
                "{address} needs --ca FILE: the roots (PEM) that signed the server's certificate"
            )));
        };
        let roots = read_file(ca, "--ca")?;
        let identity = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => Some((read_file(cert, "--cert")?, read_file(key, "--key")?)),
            _ => None,
        };
        let config = tls::client_config(
            &roots,
            identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        )
        .map_err(|e| Failure::usage(format!("the TLS options are not usable: {e}")))?;
        connector = connector.tls(config);
    } else if args.ca.is_some() || args.cert.is_some() {
        return Err(Failure::usage(format!(
            "--ca, --cert and --key are for tls: addresses, and {address} is not one; use tls:host:port"
        )));
    }
    connector
        .connect(&address.to_string())
        .await
        .map_err(|e| connect_failure(address, &e))
}

fn connect_failure(address: &Address, error: &io::Error) -> Failure {
    let hint = match error.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            "is the peer running and listening there?"
        }
        io::ErrorKind::TimedOut => "is the address right and reachable? raise --timeout",
        io::ErrorKind::PermissionDenied => "check the socket's permissions",
        io::ErrorKind::InvalidInput => "check the address",
        _ => "check the address and that the peer is running",
    };
    Failure::transport(format!("cannot connect to {address}: {error}; {hint}"))
}

pub(crate) fn handshake_failure(address: &dyn fmt::Display, reason: Termination) -> Failure {
    Failure::transport(format!(
        "the handshake with {address} failed: {reason}; check --codec, --token and that it is a channel-dispatcher peer"
    ))
}

/// `850 ns`, `12.3 µs`, `4.56 ms`, `1.23 s`.
pub(crate) fn human_duration(duration: Duration) -> String {
    human_nanos(duration.as_nanos() as f64)
}

pub(crate) fn human_nanos(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.1} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

/// The time now as RFC 3339 in UTC, with milliseconds: `2025-01-31T12:34:56.789Z`.
pub(crate) fn now_rfc3339() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since.as_secs();
    let (days, rest) = ((seconds / 86_400) as i64, seconds % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (eras of 400 years).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Writes `text` and a newline to stdout and flushes; a closed stdout (`chd ... | head`)
/// ends the process quietly.
pub(crate) fn print_line(text: &str) {
    use std::io::Write;
    let mut out = io::stdout().lock();
    let written = out
        .write_all(text.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    if let Err(e) = written {
        exit_on_output_error(&e);
    }
}

pub(crate) fn exit_on_output_error(error: &io::Error) -> ! {
    if error.kind() == io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("chd: cannot write to stdout: {error}");
    std::process::exit(i32::from(EXIT_OTHER));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(
            Address::parse("/tmp/a.sock").unwrap(),
            Address::Unix("/tmp/a.sock".into())
        );
        assert_eq!(
            Address::parse("a.sock").unwrap(),
            Address::Unix("a.sock".into())
        );
        assert_eq!(
            Address::parse("unix:/x").unwrap(),
            Address::Unix("/x".into())
        );
        assert_eq!(
            Address::parse("tcp:localhost:7").unwrap(),
            Address::Tcp("localhost:7".into())
        );
        assert_eq!(
            Address::parse("tcp:[::1]:7").unwrap(),
            Address::Tcp("[::1]:7".into())
        );
        assert_eq!(
            Address::parse("tls:h:7").unwrap(),
            Address::Tls("h:7".into())
        );
        for bad in [
            "tcp:localhost",
            "tcp:",
            "http://x",
            "localhost:7000",
            "tls:h:port",
            "",
        ] {
            let failure = Address::parse(bad).unwrap_err();
            assert_eq!(failure.status, EXIT_USAGE, "{bad}");
        }
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(parse_header("a: b").unwrap(), ("a".into(), "b".into()));
        assert!(parse_header("ab").is_err());
        assert!(parse_header("=b").is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
