//! Encoding and decoding one user struct with each codec, in the same run: what writing
//! structs as maps (`Codec::MessagePack`) costs against arrays (`Codec::MessagePackCompact`)
//! and JSON (and, with the `php` feature, PHP `serialize()`). Best of 5 runs of 200,000
//! encode + decode pairs.
//!
//! ```text
//! cargo bench --bench codec --all-features
//! ```
//!
//! A codec's name (`MessagePackCompact`) as an argument runs only that one, for callgrind.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use channel_dispatcher::Codec;
use serde::{Deserialize, Serialize};

/// A typical request: a few scalars, a string, a short list.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Order {
    id: u64,
    customer: String,
    quantity: u32,
    price: f64,
    tags: Vec<String>,
}

const PAIRS: usize = 200_000;

fn run(codec: Codec, order: &Order) -> Duration {
    let start = Instant::now();
    for _ in 0..PAIRS {
        let bytes = codec.encode(black_box(order)).unwrap();
        let back: Order = codec.decode(black_box(&bytes)).unwrap();
        black_box(back);
    }
    start.elapsed()
}

fn main() {
    let order = Order {
        id: 4_201_337,
        customer: "ACME Corporation".into(),
        quantity: 12,
        price: 19.95,
        tags: vec!["express".into(), "gift".into()],
    };
    let baseline = Codec::all()[0];
    let mut best_baseline = Duration::MAX;
    let mut rows = Vec::new();
    let only = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    // The PHP wire's codec too: `Order` is an object of class `Order` there.
    #[cfg(feature = "php")]
    let codecs = Codec::all().iter().chain([&Codec::Php]);
    #[cfg(not(feature = "php"))]
    let codecs = Codec::all().iter();
    for &codec in codecs {
        if only
            .as_ref()
            .is_some_and(|name| *name != format!("{codec:?}"))
        {
            continue;
        }
        let best = (0..5).map(|_| run(codec, &order)).min().unwrap();
        if codec == baseline {
            best_baseline = best;
        }
        let size = codec.encode(&order).unwrap().len();
        assert_eq!(
            codec
                .decode::<Order>(&codec.encode(&order).unwrap())
                .unwrap(),
            order
        );
        rows.push((codec, size, best));
    }
    println!("| codec | bytes | ns per encode + decode | vs {baseline:?} |");
    println!("| --- | ---: | ---: | ---: |");
    for (codec, size, best) in rows {
        let ratio = match best_baseline {
            Duration::MAX => "-".to_string(),
            baseline => format!("{:.2}x", best.as_secs_f64() / baseline.as_secs_f64()),
        };
        println!(
            "| {codec:?} | {size} | {:.0} | {ratio} |",
            best.as_nanos() as f64 / PAIRS as f64,
        );
    }
}
