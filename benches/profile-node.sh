#!/usr/bin/env bash
# profile-node.sh OP CLIENTS SECONDS OUT - a fresh 3-node release cluster (127.0.0.31-33, data in
# $DIR, default /tmp/raftsql-profile), `raftsql bench etcd --op OP --clients CLIENTS` for SECONDS
# against all three members, and `perf record -g` (DWARF call graphs, 499 Hz) of one node for
# SECONDS-4 in the middle of the load. Writes OUT.data, OUT.txt (perf script) and OUT.svg (flame
# graph), prints the bench's JSON line and the state machine thread's shares
# (scripts/thread-shares.py).
#
#   NODE=leader (default) or NODE=follower   which member is profiled
#   TO=all (default) or TO=node              the clients go to all members or to that one only
#   RAFTSQL_BIN=path                         another build (default: target/release/raftsql)
#
# e.g. benches/profile-node.sh put 64 14 /tmp/leader-put-64
# needs: perf (apt-get install linux-perf), etcdctl, python3, a release build.
set -euo pipefail
op=$1 clients=$2 secs=$3 out=$4
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${RAFTSQL_BIN:-$root/target/release/raftsql}
dir=${DIR:-/tmp/raftsql-profile}
[ "$secs" -ge 6 ] || { echo "SECONDS must be at least 6" >&2; exit 1; }
pids=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 100); do pgrep -f -- "--data-dir $dir/n" >/dev/null || return 0; sleep 0.1; done
}
trap stop EXIT
rm -rf "$dir" && mkdir -p "$dir"
. "$root/benches/cluster.sh"
start_raftsql "$bin" "$dir" "$dir/" || true
leader=$(raftsql_leader)
[ "$leader" != 0 ] || { echo "no leader" >&2; exit 1; }
n=$leader; [ "${NODE:-leader}" = follower ] && n=$(( leader % 3 + 1 ))
eps=127.0.0.31:2379,127.0.0.32:2379,127.0.0.33:2379; [ "${TO:-all}" = node ] && eps=127.0.0.3$n:2379
echo "profiling node $n (leader: $leader), pid ${pids[$((n-1))]}" >&2
pre=(); [ "$op" = put ] || pre=(--preload --keys 10000)
( sleep 2; perf record -F 499 -g --call-graph dwarf,16384 -p "${pids[$((n-1))]}" -o "$out.data" \
    -- sleep $((secs - 4)) >/dev/null 2>&1 ) &
recording=$!
"$bin" bench etcd --endpoints "$eps" --duration "$secs" --op "$op" --clients "$clients" "${pre[@]}" 2>/dev/null
wait "$recording"  # not the nodes, which run until the EXIT trap
perf script -i "$out.data" 2>/dev/null > "$out.txt"
python3 "$root/scripts/flamegraph.py" "raftsql node $n, $clients $op clients" < "$out.txt" > "$out.svg"
python3 "$root/scripts/thread-shares.py" raftsql-sm 40 < "$out.txt"
