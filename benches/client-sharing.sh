#!/usr/bin/env bash
# client-sharing.sh - 64 tasks sharing one multiplexed `Client` against 64 tasks with a
# client each, on one 3-node release cluster (127.0.0.41-43), alternating, ROUNDS times.
# Prints one JSON line per run and a Markdown table.
#
# usage: benches/client-sharing.sh [SECONDS] [ROUNDS]     (defaults: 10, 2)
#        WORKLOAD=kvreadwrite WORKERS=64 benches/client-sharing.sh
# needs: a release build (cargo build --release -p raftsql-cli).
set -euo pipefail
secs=${1:-10}
rounds=${2:-2}
workers=${WORKERS:-64}
root=$(cd "$(dirname "$0")/.." && pwd)
raftsql=${RAFTSQL_BIN:-$root/target/release/raftsql}
[ -x "$raftsql" ] || { echo "build first: cargo build --release -p raftsql-cli" >&2; exit 1; }
out=$(mktemp -d /tmp/client-sharing.XXXX)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null' EXIT
peers="1=127.0.0.41:7000,2=127.0.0.42:7000,3=127.0.0.43:7000"
for i in 1 2 3; do
  "$raftsql" node --id $i --listen 127.0.0.4$i:7000 --bootstrap-peers "$peers" \
    --data-dir "$out/n$i" >"$out/n$i.log" 2>&1 &
  pids+=($!)
done
eps=127.0.0.41:7000,127.0.0.42:7000,127.0.0.43:7000
for t in $(seq 100); do
  "$raftsql" sql --endpoints $eps -e "SELECT 1" >/dev/null 2>&1 && break
  sleep 0.2
done
# A first run fills the table to its working size (the first 100,000 keys are inserts, which
# are cheaper than the replacements after): it is not counted.
"$raftsql" bench sql --endpoints $eps --workers "$workers" --duration "$secs" \
  --workload "${WORKLOAD:-kvwrite}" >/dev/null 2>&1
for r in $(seq "$rounds"); do
  # Alternate which goes first, so that neither always runs on the warmer cluster.
  order="$workers 1"; [ $((r % 2)) = 0 ] && order="1 $workers"
  for clients in $order; do
    "$raftsql" bench sql --endpoints $eps --workers "$workers" --clients "$clients" \
      --duration "$secs" --workload "${WORKLOAD:-kvwrite}" 2>/dev/null | tee -a "$out/results.jsonl"
  done
done
python3 - "$out/results.jsonl" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("\n| workers | clients | ops/s | p50 ms | p99 ms | errors |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['workers']} | {r['clients']} | {r['ops_per_s']:,.0f} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")
for c in sorted({r['clients'] for r in rows}, reverse=True):
    v = [r['ops_per_s'] for r in rows if r['clients'] == c]
    print(f"clients={c}: mean {statistics.mean(v):,.0f} ops/s, median {statistics.median(v):,.0f} over {len(v)} runs")
PY
