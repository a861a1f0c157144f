//! `call`, `notify` and `stream`: one connection, one message (or one stream), then goodbye.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use channel_dispatcher::{RawCall, RawResponse};
use futures_util::{FutureExt, StreamExt};
use serde_json::Value;

use crate::cli::{CallArgs, StreamArgs};
use crate::common::{
    attributes, connect, encode, exit_on_output_error, human_duration, print_line, read_payload,
    Address, Failure, Outcome,
};

pub(crate) async fn call(args: CallArgs) -> Outcome {
    let payload = read_payload(args.json.as_deref())?;
    let address = Address::parse(&args.address)?;
    let codec = args.connect.codec.codec();
    let payload = encode(codec, &payload)?;
    let client = connect(&address, &args.connect, |b| b).await?;
    let started = Instant::now();
    let answer = client
        .call_raw(args.method.clone(), payload)
        .attributes(attributes(&args.headers))
        .timeout(args.connect.timeout)
        .await;
    let took = started.elapsed();
    let result = match answer {
        Ok(raw) => show_answer(&raw, args.pretty, args.verbose, took),
        Err(error) => Err(Failure::call(error, &address.to_string())),
    };
    client.stop().await;
    result
}

fn show_answer(raw: &RawResponse, pretty: bool, verbose: bool, took: Duration) -> Outcome {
    if verbose {
        for (key, value) in raw.attributes.iter() {
            eprintln!("< {key}: {value}");
        }
        eprintln!("< answered in {}", human_duration(took));
    }
    let value: Value = raw.decode().map_err(|e| {
        Failure::other(format!(
            "the answer ({} bytes) cannot be shown as JSON: {e}; try --codec json on both sides",
            raw.payload.len()
        ))
    })?;
    let text = if pretty || std::io::stdout().is_terminal() {
        serde_json::to_string_pretty(&value)
    } else {
        serde_json::to_string(&value)
    };
    print_line(&text.map_err(|e| Failure::other(format!("cannot print the answer: {e}")))?);
    Ok(())
}

pub(crate) async fn notify(args: CallArgs) -> Outcome {
    let payload = read_payload(args.json.as_deref())?;
    let address = Address::parse(&args.address)?;
    let payload = encode(args.connect.codec.codec(), &payload)?;
    let client = connect(&address, &args.connect, |b| b).await?;
    let sent = client
        .notify_raw(args.method.clone(), attributes(&args.headers), payload)
        .await
        .map_err(|e| Failure::call(e, &address.to_string()));
    // stop() writes what is queued before it says goodbye.
    let reason = client.stop().await;
    sent?;
    if !reason.is_graceful() {
        return Err(Failure::transport(format!(
            "the connection to {address} ended badly, the notification may be lost: {reason}"
        )));
    }
    Ok(())
}

pub(crate) async fn stream(args: StreamArgs) -> Outcome {
    let payload = read_payload(args.json.as_deref())?;
    let address = Address::parse(&args.address)?;
    let payload = encode(args.connect.codec.codec(), &payload)?;
    let timeout = args.connect.timeout;
    let client = connect(&address, &args.connect, move |builder| {
        builder.default_timeout(timeout)
    })
    .await?;
    let call = RawCall::new(args.method.clone(), payload);
    let call = args
        .headers
        .iter()
        .fold(call, |call, (key, value)| call.attribute(key, value));
    let mut items = client.stream_raw::<Value>(call);
    if args.pull {
        items = items.pull_mode();
    }
    if let Some(window) = args.window {
        items = items.window(window);
    }

    let progress = std::io::stderr().is_terminal();
    let (started, mut last_shown) = (Instant::now(), Instant::now());
    let mut count: u64 = 0;
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let mut result = Ok(());
    loop {
        // Flush only when no item is ready at once: one write per batch, not per line.
        let next = match items.next().now_or_never() {
            Some(next) => next,
            None => {
                if let Err(e) = out.flush() {
                    exit_on_output_error(&e);
                }
                items.next().await
            }
        };
        let Some(item) = next else { break };
        match item {
            Ok(value) => {
                let written = serde_json::to_writer(&mut out, &value)
                    .map_err(std::io::Error::from)
                    .and_then(|()| out.write_all(b"\n"));
                if let Err(e) = written {
                    exit_on_output_error(&e);
                }
                count += 1;
            }
            Err(error) => {
                result = Err(Failure::call(error, &address.to_string()));
                break;
            }
        }
        if progress && last_shown.elapsed() >= Duration::from_millis(200) {
            last_shown = Instant::now();
            show_progress(count, started.elapsed(), false);
        }
    }
    if let Err(e) = out.flush() {
        exit_on_output_error(&e);
    }
    drop(out);
    if progress {
        show_progress(count, started.elapsed(), true);
    }
    drop(items);
    client.stop().await;
    result
}

fn show_progress(count: u64, elapsed: Duration, done: bool) {
    let rate = count as f64 / elapsed.as_secs_f64().max(1e-9);
    let end = if done { "\n" } else { "" };
    eprint!("\r\x1b[2K{count} items, {rate:.0} items/s{end}");
}
