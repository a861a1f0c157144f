//! `bench`: a load generator. Each connection gets one task that keeps `-k` calls in flight
//! and records every latency into its own HDR histogram; the histograms and error counts are
//! merged once the run is over, so the measured loop shares nothing between connections.

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use channel_dispatcher::{Attributes, CallError, Dispatcher};
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::cli::BenchArgs;
use crate::common::{
    attributes, connect, encode, human_duration, human_nanos, print_line, read_payload, Address,
    Failure, Outcome,
};

/// How much one connection does.
#[derive(Clone, Copy, Debug)]
enum Quota {
    Calls(u64),
    Until(Instant),
}

/// What went wrong with a call, for the error table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ErrorKind {
    Remote(i64),
    Timeout,
    Terminated,
    Other,
}

impl ErrorKind {
    fn of(error: &CallError) -> Self {
        match error {
            CallError::Remote(remote) => Self::Remote(remote.code),
            CallError::Timeout(_) => Self::Timeout,
            CallError::Terminated(_) => Self::Terminated,
            _ => Self::Other,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Remote(_) => "remote",
            Self::Timeout => "timeout",
            Self::Terminated => "terminated",
            Self::Other => "other",
        }
    }
}

/// One connection's results (and, merged, the run's).
struct Tally {
    latencies: Histogram<u64>,
    ok: u64,
    /// Per kind: how many, and the first message seen.
    errors: BTreeMap<ErrorKind, (u64, String)>,
}

impl Tally {
    fn new() -> Self {
        Self {
            // Nanoseconds, 3 significant digits; it grows to fit the largest value recorded.
            latencies: Histogram::new(3).expect("a histogram of 3 significant digits"),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies
            .add(&other.latencies)
            .expect("histograms of one precision merge");
        self.ok += other.ok;
        for (kind, (count, message)) in other.errors {
            self.errors.entry(kind).or_insert((0, message)).0 += count;
        }
    }

    fn calls(&self) -> u64 {
        self.ok + self.errors.values().map(|(count, _)| count).sum::<u64>()
    }
}

/// What every call of the run sends.
struct Work {
    method: Arc<str>,
    payload: Bytes,
    attributes: Option<Attributes>,
    timeout: Option<Duration>,
    in_flight: usize,
}

impl Work {
    /// One call, timed from `started`: the caller passes the time it just read (after the
    /// previous call completed), which saves a clock read per call.
    fn call(
        &self,
        client: &Dispatcher,
        started: Instant,
    ) -> impl Future<Output = (Instant, Result<(), CallError>)> + Send + 'static {
        let mut call = client.call_raw(&*self.method, self.payload.clone());
        if let Some(attributes) = &self.attributes {
            call = call.attributes(attributes.clone());
        }
        if let Some(timeout) = self.timeout {
            call = call.timeout(timeout);
        }
        let answer = call.into_future();
        async move { (started, answer.await.map(drop)) }
    }
}

/// Keeps `in_flight` calls going on `client` until the quota is met, recording each.
async fn drive(client: Dispatcher, work: Arc<Work>, quota: Quota) -> Tally {
    let mut tally = Tally::new();
    let mut in_flight = FuturesUnordered::new();
    let mut launched: u64 = 0;
    let mut now = Instant::now();
    let mut broken = false;
    loop {
        while !broken && in_flight.len() < work.in_flight {
            let more = match quota {
                Quota::Calls(total) => launched < total,
                Quota::Until(end) => now < end,
            };
            if !more {
                break;
            }
            in_flight.push(work.call(&client, now));
            launched += 1;
        }
        let Some((started, result)) = in_flight.next().await else {
            break;
        };
        now = Instant::now();
        let nanos = now.saturating_duration_since(started).as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX).max(1);
        if tally.latencies.record(nanos).is_err() {
            tally.latencies.saturating_record(nanos);
        }
        match result {
            Ok(()) => tally.ok += 1,
            Err(error) => {
                let kind = ErrorKind::of(&error);
                // A connection that ended fails every call at once: stop launching on it.
                broken |= kind == ErrorKind::Terminated;
                tally
                    .errors
                    .entry(kind)
                    .or_insert_with(|| (0, error.to_string()))
                    .0 += 1;
            }
        }
    }
    tally
}

pub(crate) async fn bench(args: BenchArgs) -> Outcome {
    let value = read_payload(args.payload.as_deref())?;
    let address = Address::parse(&args.address)?;
    let payload = encode(args.connect.codec.codec(), &value)?;
    let (connections, in_flight) = (args.connections, args.in_flight as usize);
    let max_in_flight = in_flight.max(4096);

    let dials = (0..connections).map(|_| {
        connect(&address, &args.connect, move |builder| {
            builder.max_in_flight(max_in_flight)
        })
    });
    let mut clients = Vec::with_capacity(connections as usize);
    let mut dials = futures_util::stream::iter(dials).buffer_unordered(64);
    while let Some(client) = dials.next().await {
        clients.push(client?);
    }
    let headers = attributes(&args.headers);
    let work = Arc::new(Work {
        method: Arc::from(args.method.as_str()),
        payload,
        attributes: (!headers.is_empty()).then_some(headers),
        timeout: args.call_timeout,
        in_flight,
    });

    if args.warmup > 0 {
        let warmups = clients.iter().map(|client| {
            tokio::spawn(drive(
                client.clone(),
                Arc::clone(&work),
                Quota::Calls(args.warmup),
            ))
        });
        for warmup in warmups.collect::<Vec<_>>() {
            let _ = warmup.await;
        }
    }

    let started = Instant::now();
    let quotas: Vec<Quota> = match (args.duration, args.total) {
        (Some(duration), _) => vec![Quota::Until(started + duration); clients.len()],
        (None, total) => {
            let total = total.unwrap_or(10_000);
            let (each, rest) = (total / connections, total % connections);
            (0..connections)
                .map(|i| Quota::Calls(each + u64::from(i < rest)))
                .collect()
        }
    };
    let mut tally = Tally::new();
    let tasks: Vec<_> = clients
        .iter()
        .zip(quotas)
        .map(|(client, quota)| tokio::spawn(drive(client.clone(), Arc::clone(&work), quota)))
        .collect();
    for task in tasks {
        match task.await {
            Ok(result) => tally.merge(result),
            Err(e) => return Err(Failure::other(format!("a benchmark task failed: {e}"))),
        }
    }
    let elapsed = started.elapsed();
    for client in &clients {
        client.stop().await;
    }

    let report = Report {
        address: address.to_string(),
        method: args.method.clone(),
        connections,
        in_flight: in_flight as u64,
        elapsed,
        tally,
    };
    if args.json {
        print_line(&report.json().to_string());
    } else {
        print_line(report.text().trim_end());
    }
    if report.tally.ok == 0 && report.tally.calls() > 0 {
        let (kind, (_, message)) = report.tally.errors.iter().next().expect("an error");
        let failure = format!("every call failed ({}): {message}", kind.name());
        return Err(match kind {
            ErrorKind::Remote(_) => Failure {
                status: crate::common::EXIT_REMOTE,
                message: failure,
            },
            _ => Failure::transport(failure),
        });
    }
    Ok(())
}

struct Report {
    address: String,
    method: String,
    connections: u64,
    in_flight: u64,
    elapsed: Duration,
    tally: Tally,
}

const QUANTILES: [(&str, f64); 5] = [
    ("p50", 0.5),
    ("p90", 0.9),
    ("p99", 0.99),
    ("p99.9", 0.999),
    ("p99.99", 0.9999),
];

impl Report {
    fn throughput(&self) -> f64 {
        self.tally.calls() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Buckets of a 1-2-5 series (in nanoseconds) from the fastest call to the slowest.
    fn buckets(&self) -> Vec<(u64, u64)> {
        let latencies = &self.tally.latencies;
        if latencies.is_empty() {
            return Vec::new();
        }
        let mut bounds = Vec::new();
        let mut decade: u64 = 100;
        while bounds.last().map_or(true, |&bound| bound < latencies.max()) {
            for step in [1, 2, 5] {
                bounds.push(decade * step);
            }
            decade = decade.saturating_mul(10);
        }
        let mut counts = vec![0u64; bounds.len()];
        for value in latencies.iter_recorded() {
            let at = value.value_iterated_to();
            let index = bounds.partition_point(|&bound| bound < at);
            counts[index.min(bounds.len() - 1)] += value.count_at_value();
        }
        let first = counts.iter().position(|&c| c > 0).unwrap_or(0);
        let last = counts.iter().rposition(|&c| c > 0).unwrap_or(0);
        bounds
            .into_iter()
            .zip(counts)
            .take(last + 1)
            .skip(first)
            .collect()
    }

    fn text(&self) -> String {
        use std::fmt::Write;
        let t = &self.tally;
        let mut out = String::new();
        let errors = t.calls() - t.ok;
        let _ = writeln!(out, "Summary:");
        let _ = writeln!(out, "  Target:       {} {}", self.address, self.method);
        let _ = writeln!(
            out,
            "  Connections:  {} ({} in flight each, {} in total)",
            self.connections,
            self.in_flight,
            self.connections * self.in_flight
        );
        let _ = writeln!(
            out,
            "  Calls:        {} ({} ok, {errors} errors)",
            t.calls(),
            t.ok
        );
        let _ = writeln!(out, "  Time:         {}", human_duration(self.elapsed));
        let _ = writeln!(out, "  Throughput:   {:.0} calls/s", self.throughput());
        if t.latencies.is_empty() {
            return out;
        }
        let l = &t.latencies;
        let _ = writeln!(out, "\nLatency:");
        let _ = writeln!(out, "  min      {:>10}", human_nanos(l.min() as f64));
        let _ = writeln!(out, "  mean     {:>10}", human_nanos(l.mean()));
        let _ = writeln!(out, "  stdev    {:>10}", human_nanos(l.stdev()));
        for (name, quantile) in QUANTILES {
            let value = l.value_at_quantile(quantile) as f64;
            let _ = writeln!(out, "  {name:<8} {:>10}", human_nanos(value));
        }
        let _ = writeln!(out, "  max      {:>10}", human_nanos(l.max() as f64));
        let _ = writeln!(out, "\nLatency histogram:");
        let buckets = self.buckets();
        let most = buckets.iter().map(|&(_, c)| c).max().unwrap_or(1).max(1);
        for (bound, count) in buckets {
            let bar = "#".repeat(((count * 40).div_ceil(most)) as usize);
            let share = 100.0 * count as f64 / l.len() as f64;
            let _ = writeln!(
                out,
                "  <= {:>9}  {count:>10}  {share:>5.1}%  {bar}",
                human_nanos(bound as f64)
            );
        }
        if !t.errors.is_empty() {
            let _ = writeln!(out, "\nErrors:");
            for (kind, (count, message)) in &t.errors {
                let label = match kind {
                    ErrorKind::Remote(code) => code.to_string(),
                    other => other.name().to_owned(),
                };
                let _ = writeln!(out, "  {label:>10}  {count:>10}  {message}");
            }
        }
        out
    }

    fn json(&self) -> Value {
        let t = &self.tally;
        let l = &t.latencies;
        let micros = |ns: f64| (ns / 10.0).round() / 100.0;
        let mut latency = serde_json::Map::new();
        if !l.is_empty() {
            latency.insert("min".into(), json!(micros(l.min() as f64)));
            latency.insert("mean".into(), json!(micros(l.mean())));
            latency.insert("stdev".into(), json!(micros(l.stdev())));
            for (name, quantile) in QUANTILES {
                let value = micros(l.value_at_quantile(quantile) as f64);
                latency.insert(name.into(), json!(value));
            }
            latency.insert("max".into(), json!(micros(l.max() as f64)));
        }
        let histogram: Vec<Value> = self
            .buckets()
            .into_iter()
            .map(|(bound, count)| json!({"le_us": micros(bound as f64), "count": count}))
            .collect();
        let errors: Vec<Value> = t
            .errors
            .iter()
            .map(|(kind, (count, message))| {
                let code = match kind {
                    ErrorKind::Remote(code) => Some(*code),
                    _ => None,
                };
                json!({"kind": kind.name(), "code": code, "count": count, "message": message})
            })
            .collect();
        json!({
            "address": self.address,
            "method": self.method,
            "connections": self.connections,
            "in_flight": self.in_flight,
            "calls": t.calls(),
            "ok": t.ok,
            "errors": errors,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "throughput": self.throughput(),
            "latency_us": latency,
            "histogram": histogram,
        })
    }
}
