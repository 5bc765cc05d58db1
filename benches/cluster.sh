# cluster.sh - sourced by the bench scripts: a fresh 3-node raftsql cluster on loopback.
#
#   start_raftsql BIN DATA LOG    nodes 1-3 at 127.0.0.31-33 (Raft on :7000, etcd API on
#                                 :2379), data in DATA/n1..n3, logs at LOGn1.log..LOGn3.log
#                                 (LOG a directory with its slash, or a file prefix); their
#                                 pids are appended to the array `pids`; returns once a put
#                                 succeeds (1 if none did within 20 s)
#   raftsql_leader                the member that says it leads (1-3; 0 if none does)
#   members_cpu_ticks             CPU time (user + system, clock ticks) the processes in
#                                 `pids` have used so far

start_raftsql() {
  local bin=$1 data=$2 log=$3 i
  local peers="1=127.0.0.31:7000,2=127.0.0.32:7000,3=127.0.0.33:7000"
  for i in 1 2 3; do
    "$bin" node --id $i --listen 127.0.0.3$i:7000 --bootstrap-peers "$peers" \
      --data-dir "$data/n$i" --etcd-listen 127.0.0.3$i:2379 >"${log}n$i.log" 2>&1 &
    pids+=($!)
  done
  for _ in $(seq 100); do
    etcdctl --endpoints=127.0.0.31:2379 put /ready yes >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  return 1
}

raftsql_leader() {
  local i
  for i in 1 2 3; do
    curl -s 127.0.0.3$i:2379/metrics | grep -q '^etcd_server_is_leader 1' && { echo $i; return; }
  done
  echo 0
}

members_cpu_ticks() {
  local p t=0
  for p in "${pids[@]}"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo $t
}
