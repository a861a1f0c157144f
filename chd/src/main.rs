//! `chd`: the command-line tool of channel-dispatcher. Call, notify, stream, listen, spawn
//! and bench a peer; values shown and given as JSON. `chd --help` for the commands.

mod bench;
mod cli;
mod client;
mod common;
mod serve;

use std::future::Future;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command};
use common::Outcome;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let outcome = match cli.command {
        Command::Call(args) => run_small(client::call(args)),
        Command::Notify(args) => run_small(client::notify(args)),
        Command::Stream(args) => run_small(client::stream(args)),
        Command::Listen(args) => {
            let threads = args.threads;
            run_large(threads, serve::listen(args))
        }
        Command::Spawn(args) => run_small(serve::spawn(args)),
        Command::ServeStdio(args) => run_small(serve::serve_stdio(args)),
        Command::Bench(args) => {
            let threads = args.threads;
            run_large(threads, bench::bench(args))
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "chd", &mut std::io::stdout());
            Ok(())
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("chd: {failure}");
            ExitCode::from(failure.status)
        }
    }
}

/// One connection's worth of work: a single-threaded runtime.
fn run_small(work: impl Future<Output = Outcome>) -> Outcome {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| common::Failure::other(format!("cannot start the runtime: {e}")))?
        .block_on(work)
}

/// Servers and load: a runtime with a worker per core (or `threads`).
fn run_large(threads: Option<usize>, work: impl Future<Output = Outcome>) -> Outcome {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads.max(1));
    }
    builder
        .enable_all()
        .build()
        .map_err(|e| common::Failure::other(format!("cannot start the runtime: {e}")))?
        .block_on(work)
}
