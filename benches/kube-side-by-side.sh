#!/usr/bin/env bash
# kube-side-by-side.sh - the same kube-apiserver on a real 3-member etcd (../shared/anchors/etcd3.sh,
# 127.0.0.11-13) and on a 3-node raftsql (127.0.0.31-33), one after the other: the time to
# /readyz and the duration of one kubectl workload (N configmaps created one by one, listed
# in pages of 50, then deleted with one call). Prints one line per system.
#
# usage: benches/kube-side-by-side.sh [N]            (default 300)
#        KUBE_BIN=/work/kube-current/bin ETCD_BIN_DIR=/work/kube-current/bin benches/kube-side-by-side.sh
# needs: scripts/build-kube-current.sh (kube-apiserver, kubectl, and etcd 3.6 put first on the
# PATH of the anchor), a release build of raftsql, openssl.
set -euo pipefail
n=${1:-300}
root=$(cd "$(dirname "$0")/.." && pwd)
raftsql=${RAFTSQL_BIN:-$root/target/release/raftsql}
kube=${KUBE_BIN:-/work/kube-current/bin}
anchors=${ANCHORS:-$root/../shared/anchors}
out=$(mktemp -d /tmp/kube-side-by-side.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  PATH=${ETCD_BIN_DIR:-/work/kube-current/bin}:$PATH "$anchors/etcd3.sh" stop "$out/etcd" 2>/dev/null || true
}
trap cleanup EXIT
openssl genrsa -out "$out/sa.key" 2048 2>/dev/null
openssl rsa -in "$out/sa.key" -pubout -out "$out/sa.pub" 2>/dev/null
echo "bench-token,admin,admin-uid,system:masters" >"$out/tokens.csv"

now() { date +%s.%N; }
run() { # label etcd-servers port
  local label=$1 servers=$2 port=$3
  local t0 ready t1 api
  t0=$(now)
  "$kube/kube-apiserver" --etcd-servers="$servers" --secure-port="$port" --bind-address=127.0.0.1 \
    --service-account-key-file="$out/sa.pub" --service-account-signing-key-file="$out/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc --cert-dir="$out/certs-$label" \
    --authorization-mode=AlwaysAllow --token-auth-file="$out/tokens.csv" \
    --service-cluster-ip-range=10.0.0.0/24 >"$out/apiserver-$label.log" 2>&1 &
  api=$!
  pids+=($api)
  k() { "$kube/kubectl" --server "https://127.0.0.1:$port" --insecure-skip-tls-verify --token bench-token "$@"; }
  until [ "$(k get --raw /readyz 2>/dev/null)" = ok ]; do sleep 0.1; done
  ready=$(echo "$(now) - $t0" | bc)
  k create namespace bench >/dev/null
  t1=$(now)
  for i in $(seq "$n"); do k -n bench create configmap "cm$i" --from-literal=i="$i" >/dev/null; done
  local created listed
  created=$(echo "$(now) - $t1" | bc)
  [ "$(k -n bench get configmaps --chunk-size=50 -o name | grep -c configmap/cm)" = "$n" ]
  k -n bench delete configmaps --all >/dev/null
  listed=$(echo "$(now) - $t1" | bc)
  printf '%-8s readyz after %5.2f s; %d creates %6.2f s (%.1f ms each); with paged list and delete %6.2f s\n' \
    "$label" "$ready" "$n" "$created" "$(echo "$created * 1000 / $n" | bc -l)" "$listed"
  kill "$api"; wait "$api" 2>/dev/null || true
}

PATH=${ETCD_BIN_DIR:-/work/kube-current/bin}:$PATH "$anchors/etcd3.sh" start "$out/etcd" >/dev/null
echo "reference: $(PATH=${ETCD_BIN_DIR:-/work/kube-current/bin}:$PATH etcd --version | head -1); $("$kube/kube-apiserver" --version)"
run etcd "http://127.0.0.11:2379,http://127.0.0.12:2379,http://127.0.0.13:2379" 16443
PATH=${ETCD_BIN_DIR:-/work/kube-current/bin}:$PATH "$anchors/etcd3.sh" stop "$out/etcd" >/dev/null

peers="1=127.0.0.31:7000,2=127.0.0.32:7000,3=127.0.0.33:7000"
for i in 1 2 3; do
  "$raftsql" node --id $i --listen 127.0.0.3$i:7000 --bootstrap-peers "$peers" \
    --data-dir "$out/raftsql/n$i" --etcd-listen 127.0.0.3$i:2379 >"$out/raftsql-n$i.log" 2>&1 &
  pids+=($!)
done
until etcdctl --endpoints=127.0.0.31:2379 put /ready yes >/dev/null 2>&1; do sleep 0.2; done
run raftsql "http://127.0.0.31:2379,http://127.0.0.32:2379,http://127.0.0.33:2379" 16444
