#!/usr/bin/env bash
# profile-stages.sh - where a 3-node raftsql cluster spends its CPU under etcd load, by stage
# of the write path: a fresh cluster (benches/cluster.sh, 127.0.0.31-33), `raftsql bench etcd`
# for SECONDS against all three members, and `perf record --call-graph dwarf` of the three
# nodes in the middle of the run. Prints the members' CPU time per operation and each stage's
# share of the samples of all three nodes (a sample counts for the first stage, in the order
# below, whose function is on its stack):
#
#   sm: etcd request SQL        the leader executing a batch's requests (execute_batch)
#   sm: capture+diff+commit     the leader's COMMIT, page capture and diff (commit_and_propose)
#   sm: apply entry             applying committed entries (apply_entry; followers rebuild
#                               and write each page, the leader re-exposes its own frames)
#   sm: checkpoint              the state machine's part of a checkpoint
#   tokio: gRPC                 tonic/hyper/h2: the etcd API's connections, requests, answers
#   tokio: peer inbound         frames from peers (net::server::serve_conn): Raft messages,
#                               forwarded requests and their execution hand-off
#   tokio: forward (mux)        a follower's forwarding of its clients' requests to the leader
#   tokio: raft out             the per-peer Raft senders (peer_sender)
#   raft: log sync / append     the Raft thread's fsync and log writes
#   raft: other                 the rest of the Raft thread (RawNode, messages, reads)
#   THREAD: other               anything else, by thread name (idle spinning, timers, kernel)
#
# usage: benches/profile-stages.sh [SECONDS] [OUTDIR]        (defaults: 10, /tmp/profile-stages)
#        OP=put|range|txn CLIENTS=64 RAFTSQL_BIN=path benches/profile-stages.sh
# needs: perf (apt-get install linux-perf), etcdctl, python3, a release build (its debug info
# names the functions).
set -euo pipefail
secs=${1:-10}
out=${2:-/tmp/profile-stages}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${RAFTSQL_BIN:-$root/target/release/raftsql}
op=${OP:-put}
clients=${CLIENTS:-64}
[ -x "$bin" ] || { echo "build first: cargo build --release -p raftsql-cli" >&2; exit 1; }
command -v perf >/dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 1; }
rm -rf "$out" && mkdir -p "$out"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
}
trap cleanup EXIT
. "$root/benches/cluster.sh"
start_raftsql "$bin" "$out" "$out/" || { echo "the cluster did not start (logs in $out)" >&2; exit 1; }
cpu0=$(members_cpu_ticks)
"$bin" bench etcd --endpoints 127.0.0.31:2379,127.0.0.32:2379,127.0.0.33:2379 --op "$op" \
  --clients "$clients" --duration "$secs" >"$out/bench.json" 2>"$out/bench.err" &
bench=$!
# The middle of the run: after the clients connected, before they stop.
sleep $((secs / 4 + 1))
perf record -F 299 --call-graph dwarf,16384 -p "$(IFS=,; echo "${pids[*]}")" \
  -o "$out/perf.data" -- sleep $((secs / 2)) 2>"$out/perf.err" >/dev/null
wait $bench
cpu=$(( ($(members_cpu_ticks) - cpu0) * 1000000 / $(getconf CLK_TCK) ))
perf script -i "$out/perf.data" -F comm,ip,sym 2>/dev/null >"$out/stacks.txt"
python3 - "$out/bench.json" "$cpu" "$out/stacks.txt" "$(raftsql_leader)" <<'EOF'
import collections, json, re, sys
bench = json.load(open(sys.argv[1]))
cpu_us, ops = int(sys.argv[2]), bench["ops"]
stages = [
    ("sm: etcd request SQL", r"execute_batch"),
    ("sm: capture+diff+commit", r"commit_and_propose"),
    ("sm: apply entry", r"apply_entry"),
    ("sm: checkpoint", r"checkpoint"),
    ("tokio: gRPC", r"serve_connection|hyper::|h2::|tonic::"),
    ("tokio: peer inbound", r"net::server::serve_conn"),
    ("tokio: forward (mux)", r"net::mux"),
    ("tokio: raft out", r"peer_sender"),
    ("raft: log sync", r"RaftLog::sync"),
    ("raft: log append", r"RaftLog::(append|flush|set_hard_state)"),
    ("raft: other", r"RaftDriver"),
]
counts, total = collections.Counter(), 0
for block in open(sys.argv[3]).read().split("\n\n"):
    lines = [l for l in block.split("\n") if l.strip()]
    if not lines:
        continue
    total += 1
    stack = "\n".join(lines[1:])
    name = next((n for n, rx in stages if re.search(rx, stack)), None)
    counts[name or lines[0].split()[0] + ": other"] += 1
print(f"{bench['op']} at {bench['clients']} clients: {bench['ops_per_s']} ops/s, p50 {bench['p50_ms']} ms, "
      f"p99 {bench['p99_ms']} ms; members' CPU {cpu_us / max(ops, 1):.0f} us per op "
      f"(leader: node {sys.argv[4]}); {total} samples")
for name, n in counts.most_common():
    print(f"{100 * n / total:5.1f}%  {name}")
EOF
