#!/usr/bin/env bash
# etcd-side-by-side.sh - the same `raftsql bench etcd` workloads against a real 3-member etcd
# (../shared/anchors/etcd3.sh: 127.0.0.11-13) and a 3-node raftsql cluster (127.0.0.31-33) in
# one run, clients spread over all three members of each. A single client runs twice on each
# cluster, once against its leader and once against a follower (which forwards): on one
# endpoint the figure depends mostly on which of the two it is, and the leader is elected
# anew in each run. Prints one JSON line per run and a Markdown table at the end.
#
# usage: benches/etcd-side-by-side.sh [SECONDS] [OUTDIR]     (defaults: 10, /tmp/etcd-side-by-side)
#        OPS="put range" CLIENTS="1 64" RAFTSQL_BIN=/path/to/raftsql benches/etcd-side-by-side.sh
# needs: etcd and etcdctl (apt-get install etcd-server etcd-client), a release build of raftsql
# (cargo build --release -p raftsql-cli).
set -euo pipefail
secs=${1:-10}
out=${2:-/tmp/etcd-side-by-side}
root=$(cd "$(dirname "$0")/.." && pwd)
raftsql=${RAFTSQL_BIN:-$root/target/release/raftsql}  # RAFTSQL_BIN: another build's nodes
anchors=${ANCHORS:-$root/../shared/anchors}
[ -x "$raftsql" ] || { echo "build first: cargo build --release -p raftsql-cli" >&2; exit 1; }
rm -rf "$out" && mkdir -p "$out"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$anchors/etcd3.sh" stop "$out/etcd" 2>/dev/null || true
  wait_gone
}
# The previous run's nodes may still be exiting and holding the ports: wait for them.
wait_gone() {
  for t in $(seq 100); do
    pgrep -f -- 'http://127.0.0.1[1-3]:2380|--etcd-listen 127.0.0.3[1-3]:' >/dev/null || return 0
    sleep 0.1
  done
  echo "etcd or raftsql nodes still hold 127.0.0.11-13 or 127.0.0.31-33:" >&2
  pgrep -af -- 'http://127.0.0.1[1-3]:2380|--etcd-listen 127.0.0.3[1-3]:' >&2
  exit 1
}
trap cleanup EXIT
wait_gone

echo "starting etcd (127.0.0.11-13) and raftsql (127.0.0.31-33)" >&2
"$anchors/etcd3.sh" start "$out/etcd"
. "$(dirname "$0")/cluster.sh"
start_raftsql "$raftsql" "$out/raftsql" "$out/raftsql-" || true
etcd_eps=127.0.0.11:2379,127.0.0.12:2379,127.0.0.13:2379
raftsql_eps=127.0.0.31:2379,127.0.0.32:2379,127.0.0.33:2379

# The leader's endpoint (which=leader) or a follower's (which=follower) among `eps`.
member() { # eps which
  etcdctl --endpoints="$1" endpoint status -w json | python3 -c '
import json, sys
which = sys.argv[1]
for s in json.load(sys.stdin):
    st = s["Status"]
    if (st["leader"] == st["header"]["member_id"]) == (which == "leader"):
        print(s["Endpoint"]); sys.exit(0)
sys.exit("no " + which + " among " + sys.argv[2])' "$2" "$1"
}
run() { # label target endpoints args...
  local label=$1 target=$2 eps=$3; shift 3
  "$raftsql" bench etcd --endpoints "$eps" --duration "$secs" --label "$label" "$@" 2>/dev/null \
    | python3 -c 'import json, sys; r = json.loads(sys.stdin.read()); r["target"] = sys.argv[1]; print(json.dumps(r))' "$target" \
    | tee -a "$out/results.jsonl"
}
for op in ${OPS:-put range txn}; do
  for c in ${CLIENTS:-1 16 64 256}; do
    pre=(); [ "$op" = put ] || pre=(--preload --keys 10000)
    if [ "$c" = 1 ]; then
      for target in leader follower; do
        ep=$(member "$etcd_eps" $target)
        run etcd $target "$ep" --op $op --clients $c "${pre[@]}"
        ep=$(member "$raftsql_eps" $target)
        run raftsql $target "$ep" --op $op --clients $c "${pre[@]}"
      done
    else
      run etcd all "$etcd_eps" --op $op --clients $c "${pre[@]}"
      run raftsql all "$raftsql_eps" --op $op --clients $c "${pre[@]}"
    fi
  done
done
if [ "${WATCH:-1}" = 1 ]; then
  run etcd all "$etcd_eps" --op watch --clients 4 --watchers 16 --rate 1000
  run raftsql all "$raftsql_eps" --op watch --clients 4 --watchers 16 --rate 1000
fi

python3 - "$out/results.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault((r["op"], r["clients"], r.get("target", "all")), {})[r["label"]] = r
print("\n| op | clients | to | etcd ops/s | raftsql ops/s | raftsql/etcd | etcd p50/p99 ms | raftsql p50/p99 ms | errors e/r |")
print("|---|---|---|---|---|---|---|---|---|")
for (op, c, to), d in by.items():
    e, r = d.get("etcd", {}), d.get("raftsql", {})
    key = "puts_per_s" if op == "watch" else "ops_per_s"
    ratio = f"{r[key] / e[key]:.2f}x" if e.get(key) and r.get(key) else "-"
    print(f"| {op} | {c} | {to} | {e.get(key)} | {r.get(key)} | {ratio} | {e.get('p50_ms')}/{e.get('p99_ms')} "
          f"| {r.get('p50_ms')}/{r.get('p99_ms')} | {e.get('errors')}/{r.get('errors')} |")
print("\n(watch: puts/s at a capped rate; p50/p99 is the event latency, Put sent to event received by each of 16 watchers)")
for (op, c, to), d in by.items():
    if op == "watch":
        e, r = d.get("etcd", {}), d.get("raftsql", {})
        print(f"(watch: the puts themselves, sent to acknowledged, p50/p99 ms: etcd "
              f"{e.get('put_p50_ms')}/{e.get('put_p99_ms')}, raftsql {r.get('put_p50_ms')}/{r.get('put_p99_ms')})")
EOF
