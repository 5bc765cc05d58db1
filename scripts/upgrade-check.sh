#!/usr/bin/env bash
# upgrade-check.sh OLD_BIN NEW_BIN - an upgrade of a 3-node cluster's data, checked through the
# etcd API: a cluster of OLD_BIN (127.0.0.31-33, data in $DIR, default /tmp/raftsql-upgrade)
# takes puts, a Txn, a delete and an overwrite; it stops, and the same data directories start on
# NEW_BIN. Every node must then answer the same prefix read as before the upgrade, once before
# any write (a database still at the old etcd schema) and once after a put (the first write
# migrates it), and a read at a past revision must still see the old value. Prints each
# node's etcd schema version and `kv_live` columns after the write, and exits 1 on a difference.
#
# e.g. a build of the previous release against this one:
#   git worktree add /tmp/old v0.x && (cd /tmp/old && cargo build --release -p raftsql-cli)
#   scripts/upgrade-check.sh /tmp/old/target/release/raftsql target/release/raftsql
# (a worktree built with the same CARGO_TARGET_DIR overwrites target/release/raftsql: copy
# the binaries first). needs: etcdctl (apt-get install etcd-client), python3.
set -uo pipefail
old=$1 new=$2
root=$(cd "$(dirname "$0")/.." && pwd)
d=${DIR:-/tmp/raftsql-upgrade}
E=127.0.0.31:2379,127.0.0.32:2379,127.0.0.33:2379
rm -rf "$d" && mkdir -p "$d"
pids=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  pids=()
  for _ in $(seq 100); do pgrep -f -- "--data-dir $d/" >/dev/null || return 0; sleep 0.1; done
}
trap stop EXIT
. "$root/benches/cluster.sh"
failed=0
check() { # label file... : each file must equal $d/before.txt
  local label=$1 f; shift
  for f in "$@"; do
    if cmp -s "$d/before.txt" "$f"; then echo "$label, $(basename "$f" .txt): same"; else
      echo "$label, $(basename "$f" .txt): DIFFERENT"; diff "$d/before.txt" "$f" | head -5; failed=1; fi
  done
}

start_raftsql "$old" "$d" "$d/old-" || { echo "the old build did not start" >&2; exit 1; }
for i in $(seq 1 30); do etcdctl --endpoints=$E put "/u/k$i" "v$i" >/dev/null; done
printf '\nput /u/t1 a\nput /u/t2 b\n\n\n' | etcdctl --endpoints=$E txn >/dev/null  # no compares; success; no failure
etcdctl --endpoints=$E del /u/k5 >/dev/null
etcdctl --endpoints=$E put /u/k6 six >/dev/null
rev=$(etcdctl --endpoints=$E get /u/k6 -w json | python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])')
etcdctl --endpoints=$E get /u/ --prefix >"$d/before.txt"
stop

# The same data directories on the new build (start_raftsql would put a key: no write yet).
peers="1=127.0.0.31:7000,2=127.0.0.32:7000,3=127.0.0.33:7000"
for i in 1 2 3; do
  "$new" node --id $i --listen 127.0.0.3$i:7000 --bootstrap-peers "$peers" --data-dir "$d/n$i" \
    --etcd-listen 127.0.0.3$i:2379 >"$d/new-n$i.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 100); do etcdctl --endpoints=$E get /u/k1 >/dev/null 2>&1 && break; sleep 0.2; done
for i in 1 2 3; do etcdctl --endpoints=127.0.0.3$i:2379 get /u/ --prefix >"$d/n$i-before-write.txt"; done
check "new build, before any write" "$d"/n{1,2,3}-before-write.txt
etcdctl --endpoints=$E put /v/first-write x >/dev/null || { echo "the first write failed"; failed=1; }
for i in 1 2 3; do etcdctl --endpoints=127.0.0.3$i:2379 get /u/ --prefix >"$d/n$i-after-write.txt"; done
check "new build, after the first write" "$d"/n{1,2,3}-after-write.txt
v=$(etcdctl --endpoints=$E get /u/k6 --rev=$((rev - 1)) --print-value-only)
[ "$v" = v6 ] && echo "/u/k6 at revision $((rev - 1)): v6" || { echo "/u/k6 at revision $((rev - 1)): '$v', not v6"; failed=1; }
for i in 1 2 3; do
  "$new" sql --endpoints 127.0.0.3$i:7000 --db etcd --local --json -e \
    "SELECT (SELECT user_version FROM pragma_user_version) AS etcd_schema, (SELECT group_concat(name) FROM pragma_table_info('kv_live')) AS kv_live" \
    | sed "s/^/node $i: /"
done
exit $failed
