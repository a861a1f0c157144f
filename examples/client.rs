//! A chat client for `server.rs`: joins as NAME, sends each line of stdin to the room, prints
//! what the others say; `/who` lists the room. Ends at the end of its input or when the
//! server goes away.
//!
//! ```text
//! cargo run --example client -- NAME [ADDRESS]     # ADDRESS: tcp:127.0.0.1:7878 (default)
//! ```

#[path = "chat/protocol.rs"]
mod protocol;

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use channel_dispatcher::{Connector, Context, Dispatcher, Router};
use protocol::{Notice, Said, Say, Who, DEFAULT_ADDRESS, DEFAULT_PASSWORD};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let name = args.next().ok_or("usage: client NAME [ADDRESS]")?;
    let address = args.next().unwrap_or_else(|| DEFAULT_ADDRESS.to_owned());
    let password = std::env::var("CHAT_PASSWORD").unwrap_or_else(|_| DEFAULT_PASSWORD.into());

    // What the server pushes to us.
    let router = Router::new()
        .notification(|_cx: Context, Said { from, text }| async move {
            println!("{from}: {text}");
            Ok(())
        })
        .notification(|_cx: Context, Notice(text)| async move {
            println!("* {text}");
            Ok(())
        });

    // The three lines of a client: connect, hand over the token, handshake.
    let channel = Connector::new()
        .timeout(Duration::from_secs(5))
        .connect(&address)
        .await?;
    let client = Dispatcher::builder()
        .handler(router)
        .token(format!("{name}:{password}"))
        .connect(channel)
        .await?;
    println!(
        "* joined {address} as {name}; in the room: {:?}",
        client.request(Who).await?
    );

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(line) if line.trim() == "/who" => println!("* {:?}", client.request(Who).await?),
                Some(line) if line.trim().is_empty() => {}
                Some(text) => {
                    let heard = client.request(Say { text }).await?;
                    println!("* ({heard} heard it)");
                }
                None => break,
            },
            end = client.closed() => {
                println!("* the connection ended: {end}");
                return Ok(());
            }
        }
    }
    client.stop().await;
    Ok(())
}
