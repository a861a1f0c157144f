#!/usr/bin/env bash
# chd bench against the library's round-trip bench (benches/roundtrip.rs), same machine, in turn.
# Build first: cargo build --release -p chd && cargo bench --bench roundtrip --no-run
set -u
cd "$(dirname "$0")/../.."
R=$(ls -t target/release/deps/roundtrip-* | grep -v "\.d$" | head -1)
mkdir -p /tmp/chd-bench; rm -f /tmp/chd-bench/s.sock
target/release/chd listen --quiet unix:/tmp/chd-bench/s.sock & L=$!
sleep 1
P='"0123456789abcdef0123456789abcdef"'
for round in 1 2 3; do
  echo "== round $round, load: $(cut -d' ' -f1-3 /proc/loadavg)"
  $R 2>&1 | grep "two processes" | sed 's/^/lib  /'
  for k in 1 64 1024; do
    n=200000; [ $k = 1 ] && n=20000
    best=0
    for t in 1 2 3; do
      v=$(target/release/chd bench unix:/tmp/chd-bench/s.sock echo "$P" -c 1 -k $k -n $n --warmup 1000 --json | python3 -c "import json,sys; print(json.load(sys.stdin)['throughput'])" 2>/dev/null || echo 0)
      best=$(python3 -c "print(max($best, $v))")
    done
    echo "chd  k=$k best of 3: $best calls/s"
  done
done
kill $L
