#!/usr/bin/env bash
# raftsql-ab.sh - two raftsql builds compared on the etcd API, alternated on fresh clusters so
# that a noisy machine hits both alike: per round, each build gets a new 3-node cluster
# (127.0.0.31-33), 64 put clients over the three members for 10 s, then 1 put client for 5 s
# straight to the leader and to a follower. One line per run, ending with each member's Raft log
# fsyncs over the run (count/mean) and each member's checkpoint stalls in the 64-client phase
# (raftsql_checkpoint_stall_seconds, count/mean), and the members' CPU time per put in the
# 64-client phase (/proc/PID/stat; the machine is CPU-bound there on a quiet day). The load
# generator is one binary for both builds (LOADGEN, by default BEFORE_BIN), so that a change
# to the client side of the binary does not count for the nodes. ONLY64=1: the 64-client
# phase only. OP=txn (or range): that operation in the 64-client phase instead of put.
#
# usage: benches/raftsql-ab.sh BEFORE_BIN AFTER_BIN [ROUNDS]      (default 3 rounds)
# needs: etcdctl (apt-get install etcd-client), curl, python3.
set -uo pipefail
before=$1; after=$2; rounds=${3:-3}
gen=${LOADGEN:-$before}
op=${OP:-put}
dir=$(mktemp -d /tmp/raftsql-ab.XXXXXX)
stop() {
  pkill -f "node --id [123] --listen 127.0.0.3" 2>/dev/null
  for _ in $(seq 100); do pgrep -f "node --id [123] --listen 127.0.0.3" >/dev/null || return 0; sleep 0.1; done
}
trap stop EXIT
. "$(dirname "$0")/cluster.sh"
one() { # BIN LABEL
  local bin=$1 label=$2 pids=()
  stop; rm -rf "$dir/c"; mkdir -p "$dir/c"
  start_raftsql "$bin" "$dir/c" "$dir/c/" || true
  local leader
  leader=$(raftsql_leader)
  local follower=$(( leader % 3 + 1 ))
  pick() { python3 -c "import json,sys; d=json.load(sys.stdin); print(' '.join(str(d[k]) for k in sys.argv[1:]))" "$@"; }
  local p64 p1l p1f cpu0 cpu
  cpu0=$(members_cpu_ticks)
  p64=$("$gen" bench etcd --endpoints 127.0.0.31:2379,127.0.0.32:2379,127.0.0.33:2379 --op "$op" --clients 64 --duration 10 2>/dev/null | pick ops_per_s p50_ms p99_ms)
  cpu=$(( ($(members_cpu_ticks) - cpu0) * 1000000 / $(getconf CLK_TCK) ))
  cpu="$(python3 -c "import sys; print(round($cpu / (float(sys.argv[1]) * 10)))" "${p64%% *}")us"
  # The state machines' checkpoint stalls during the 64-client phase (builds without the metric: 0/0us).
  local st=""
  for i in 1 2 3; do
    st="$st $(curl -s 127.0.0.3$i:2379/metrics | awk '/^raftsql_checkpoint_stall_seconds_sum/ {s=$2} /^raftsql_checkpoint_stall_seconds_count/ {c=$2} END {printf "%d/%.0fus", c, c ? s/c*1e6 : 0}')"
  done
  if [ -n "${ONLY64:-}" ]; then
    echo "$label $op-64 ops/s p50 p99: $p64 | members' CPU per op: $cpu | checkpoint stalls/mean:$st"
    return
  fi
  p1l=$("$gen" bench etcd --endpoints 127.0.0.3$leader:2379 --op put --clients 1 --duration 5 2>/dev/null | pick p50_ms p99_ms)
  p1f=$("$gen" bench etcd --endpoints 127.0.0.3$follower:2379 --op put --clients 1 --duration 5 2>/dev/null | pick p50_ms p99_ms)
  # The Raft log's fsyncs over the whole run, on every member: count and mean.
  local fs=""
  for i in 1 2 3; do
    fs="$fs $(curl -s 127.0.0.3$i:2379/metrics | awk '/^etcd_disk_wal_fsync_duration_seconds_sum/ {s=$2} /^etcd_disk_wal_fsync_duration_seconds_count/ {c=$2} END {printf "%d/%.0fus", c, c ? s/c*1e6 : 0}')"
  done
  echo "$label $op-64 ops/s p50 p99: $p64 | members' CPU per op: $cpu | put-1 leader p50 p99: $p1l | put-1 follower p50 p99: $p1f | fsyncs/mean:$fs | checkpoint stalls/mean:$st"
}
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then one "$before" before; one "$after" after; else one "$after" after; one "$before" before; fi
done
rm -rf "$dir"
