#!/usr/bin/env bash
# cost-per-op.sh - what one operation costs the machine, etcd 3.4 against raftsql, in one run:
# a fresh 3-member etcd (../shared/anchors/etcd3.sh, 127.0.0.11-13) and a fresh 3-node raftsql
# cluster (127.0.0.31-33), then `raftsql bench etcd` against each for SECONDS, and around each
# run: CPU time per operation of each member (/proc/PID/stat) and of the load generator, bytes
# the disk holding OUTDIR wrote per operation (/sys/class/block/DEV/stat, so run it on a
# quiet machine), and the machine's steal and iowait (/proc/stat). One line per cluster.
#
# usage: benches/cost-per-op.sh [SECONDS] [OUTDIR]          (defaults: 10, /tmp/cost-per-op)
#        OP=put CLIENTS=64 RAFTSQL_BIN=path ETCD=0 (raftsql only) benches/cost-per-op.sh
# needs: etcd and etcdctl (apt-get install etcd-server etcd-client), python3, a release build.
set -uo pipefail
secs=${1:-10}
out=${2:-/tmp/cost-per-op}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${RAFTSQL_BIN:-$root/target/release/raftsql}
anchors=${ANCHORS:-$root/../shared/anchors}
op=${OP:-put} clients=${CLIENTS:-64}
[ -x "$bin" ] || { echo "build first: cargo build --release -p raftsql-cli" >&2; exit 1; }
rm -rf "$out" && mkdir -p "$out"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$anchors/etcd3.sh" stop "$out/etcd" >/dev/null 2>&1 || true
  for _ in $(seq 100); do pgrep -f -- "--data-dir $out/" >/dev/null || return 0; sleep 0.1; done
}
trap cleanup EXIT
dev=$(basename "$(df --output=source "$out" | tail -1)")
[ -r "/sys/class/block/$dev/stat" ] || { echo "no /sys/class/block/$dev/stat for $out" >&2; exit 1; }
pre=(); [ "$op" = put ] || pre=(--preload --keys 10000)

# One line: `label: ops/s p50 p99 | CPU µs per op: each member, members, load generator |
# disk KB written per op | steal, iowait (% of the machine)`.
measure() { # label endpoints pid...
  local label=$1 eps=$2; shift 2
  local before after
  before=$(snap "$@")
  /usr/bin/time -f "%U %S" -o "$out/$label.time" "$bin" bench etcd --endpoints "$eps" \
    --duration "$secs" --op "$op" --clients "$clients" "${pre[@]}" 2>/dev/null >"$out/$label.json"
  after=$(snap "$@")
  python3 - "$label" "$out/$label.json" "$out/$label.time" "$(getconf CLK_TCK)" "$(nproc)" "$before" "$after" <<'PY'
import json, sys
label, res, tm, tck, ncpu = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
b, a = [list(map(int, s.split())) for s in sys.argv[6:8]]
ops = res["ops"]
members = [(a[i] - b[i]) / tck / ops * 1e6 for i in range(len(a) - 4)]
client = sum(map(float, open(tm).read().split())) / ops * 1e6
disk = (a[-3] - b[-3]) * 512 / 1024 / ops
ticks = (a[-1] - b[-1]) or 1  # all CPU ticks of the machine
print(f"{label}: {res['ops_per_s']} ops/s p50 {res['p50_ms']} p99 {res['p99_ms']} ms | CPU µs per op: "
      + " ".join(f"{m:.0f}" for m in members) + f", members {sum(members):.0f}, load generator {client:.0f}"
      + f" | disk {disk:.1f} KB per op | steal {100 * (a[-2] - b[-2]) / ticks:.0f}% iowait {100 * (a[-4] - b[-4]) / ticks:.0f}%"
      + (f" | errors {res['errors']}" if res.get("errors") else ""))
PY
}
# CPU ticks of each pid, then iowait, sectors written, steal, all ticks.
snap() {
  local p
  for p in "$@"; do awk '{printf "%d ", $14 + $15}' "/proc/$p/stat"; done
  awk 'NR == 1 {printf "%d ", $6}' /proc/stat
  awk '{printf "%d ", $7}' "/sys/class/block/$dev/stat"
  awk 'NR == 1 {t = 0; for (i = 2; i <= NF; i++) t += $i; printf "%d %d\n", $9, t}' /proc/stat
}

if [ "${ETCD:-1}" = 1 ]; then
  "$anchors/etcd3.sh" start "$out/etcd" >/dev/null
  mapfile -t epids < <(pgrep -f -- "--data-dir $out/etcd" | head -3)
  [ "${#epids[@]}" = 3 ] || { echo "etcd did not start 3 members" >&2; exit 1; }
  measure etcd 127.0.0.11:2379,127.0.0.12:2379,127.0.0.13:2379 "${epids[@]}"
fi
. "$root/benches/cluster.sh"
start_raftsql "$bin" "$out/raftsql" "$out/raftsql-" || { echo "raftsql did not start" >&2; exit 1; }
echo "(raftsql's leader: n$(raftsql_leader))"
measure raftsql 127.0.0.31:2379,127.0.0.32:2379,127.0.0.33:2379 "${pids[@]}"
