#!/usr/bin/env bash
# build-kube-current.sh - build current upstream kube-apiserver + kubectl
# (Kubernetes v1.34.x) and etcd + etcdctl (v3.6.x) from the Go module proxy.
#
# Usage: scripts/build-kube-current.sh [OUTDIR]     (default: /work/kube-current)
#
# What it does:
#   1. Kubernetes: writes a throwaway main module OUTDIR/src/kube whose go.mod
#      requires k8s.io/kubernetes $K8S_VERSION (as `tool` lines for
#      cmd/kube-apiserver and cmd/kubectl). Kubernetes' own go.mod replaces
#      every staging module (k8s.io/api, apimachinery, apiserver, client-go,
#      component-base, kubectl, ...) with ./staging/src/...; those replaces do
#      not apply to a dependency, so the list is read from the downloaded
#      kubernetes go.mod (`go mod download -json` -> GoMod) and each one is
#      pinned to the matching published v0.MINOR.PATCH. The go/godebug lines
#      are copied from kubernetes' go.mod too. Then `go mod tidy` (go.sum is
#      checked against sum.golang.org as usual) and
#          go build -trimpath -ldflags "-s -w -X ...version..." \
#              k8s.io/kubernetes/cmd/kube-apiserver   (and cmd/kubectl)
#      with CGO_ENABLED=0, as upstream builds them. The -X flags set
#      k8s.io/component-base/version and k8s.io/client-go/pkg/version
#      gitVersion/gitMajor/gitMinor/buildDate exactly like hack/lib/version.sh,
#      so `kube-apiserver --version` reports $K8S_VERSION, not v0.0.0
#      (kube-apiserver gates features on its version). gitCommit is not known
#      (the proxy has no VCS metadata) and keeps its default.
#   2. etcd: a second module OUTDIR/src/etcd with a tiny main.go calling
#      go.etcd.io/etcd/server/v3/etcdmain.Main (that is all etcd's own root
#      main.go does) plus a `tool` line for go.etcd.io/etcd/etcdctl/v3.
#      Every in-repo etcd module that server/v3 and etcdctl/v3 replace with
#      ../something (api/v3, client/v3, client/pkg/v3, pkg/v3, ...) is pinned
#      to the same $ETCD_VERSION. ETCD_VERSION defaults to the newest v3.6.x
#      the proxy serves for both server/v3 and etcdctl/v3.
#   3. Binaries land in OUTDIR/bin/{kube-apiserver,kubectl,etcd,etcdctl}.
#      Each step is skipped when its result exists for the same version
#      (OUTDIR/bin/.<name>.version stamps), so re-running is cheap.
#      FORCE_BUILD=1 regenerates the modules and rebuilds everything.
#      The wall time of every step is printed.
#   4. Finishes by printing the --version output of all four binaries.
#
# All go commands run under `nice -n 19` with GOFLAGS=-p=$GO_PARALLEL
# (default 1) so that a concurrently running test suite keeps some CPU.
# GOTOOLCHAIN=local: the given Go is used as-is, never auto-downloaded.
#
# Needs: Go >= the `go` line of the modules built (k8s 1.34: go 1.24.0;
# etcd 3.6.17: go 1.26.0), network access to GOPROXY and sum.golang.org.
#
# Environment knobs: GO (default /usr/local/go/bin/go), K8S_VERSION
# (default v1.34.4), ETCD_VERSION (default newest v3.6.x), GO_PARALLEL
# (default 1), GOPROXY (default https://proxy.golang.org,direct),
# FORCE_BUILD=1.
set -euo pipefail

OUTDIR="${1:-/work/kube-current}"
GO="${GO:-/usr/local/go/bin/go}"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-}"
ETCD_SERIES="${ETCD_SERIES:-v3.6}"
GO_PARALLEL="${GO_PARALLEL:-1}"
FORCE_BUILD="${FORCE_BUILD:-0}"

NICE=(nice -n 19)

log() { printf '[build-kube-current %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }
fmt_secs() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

TIMINGS=()
timed() { # timed LABEL cmd... : run cmd, log and record its wall time
  local label=$1; shift
  local start=$SECONDS
  "$@"
  local took=$((SECONDS - start))
  log "$label took $(fmt_secs "$took")"
  TIMINGS+=("$label: $(fmt_secs "$took")")
}

[[ -x "$GO" ]] || die "no Go toolchain at $GO (set GO=...)"
[[ "$K8S_VERSION" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] \
  || die "K8S_VERSION must look like v1.MINOR.PATCH, got $K8S_VERSION"
K8S_MINOR="${BASH_REMATCH[1]}"
STAGING_VERSION="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"

export GOTOOLCHAIN=local
export GOWORK=off
export GOFLAGS="-buildvcs=false -p=${GO_PARALLEL}"
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
export CGO_ENABLED=0

mkdir -p "$OUTDIR/bin" "$OUTDIR/src"
OUTDIR="$(cd "$OUTDIR" && pwd)"
BIN="$OUTDIR/bin"

gorun() { "${NICE[@]}" "$GO" "$@"; }

log "using $("$GO" version), GOFLAGS=$GOFLAGS, OUTDIR=$OUTDIR"

# is_built NAME VERSION: binary exists and was built from VERSION.
is_built() {
  [[ "$FORCE_BUILD" != 1 && -x "$BIN/$1" && -f "$BIN/.$1.version" \
     && "$(cat "$BIN/.$1.version")" == "$2" ]]
}
stamp() { printf '%s\n' "$2" >"$BIN/.$1.version"; }

# json_field FILE-or-STDIN KEY: tiny extractor for `go ... -json` output.
json_field() { sed -n "s/^[[:space:]]*\"$1\": \"\(.*\)\",\{0,1\}\$/\1/p" | head -n1; }

# module_tidy DIR: run go mod tidy unless go.mod.in is unchanged since the
# last successful tidy (go.mod.in is the pre-tidy template).
module_tidy() {
  local dir=$1
  if [[ "$FORCE_BUILD" != 1 && -f "$dir/go.sum" && -f "$dir/.tidy.ok" ]] \
     && cmp -s "$dir/go.mod.in" "$dir/.tidy.ok"; then
    log "$dir: go.mod already tidied (FORCE_BUILD=1 to redo)"
    return
  fi
  cp "$dir/go.mod.in" "$dir/go.mod"
  rm -f "$dir/go.sum" "$dir/.tidy.ok"
  (cd "$dir" && gorun mod tidy)
  cp "$dir/go.mod.in" "$dir/.tidy.ok"
}

# write_if_changed FILE: stdin -> FILE, leaving FILE untouched if identical.
write_if_changed() {
  local tmp; tmp="$(mktemp)"
  cat >"$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

########################################################################
# 1. Kubernetes
########################################################################
KUBE_SRC="$OUTDIR/src/kube"
if is_built kube-apiserver "$K8S_VERSION" && is_built kubectl "$K8S_VERSION"; then
  log "kube-apiserver and kubectl $K8S_VERSION already built (FORCE_BUILD=1 to rebuild)"
else
  mkdir -p "$KUBE_SRC"
  kube_prepare() {
    log "downloading k8s.io/kubernetes@$K8S_VERSION"
    local dl gomod info
    dl="$(cd "$KUBE_SRC" && gorun mod download -json "k8s.io/kubernetes@$K8S_VERSION")"
    gomod="$(json_field GoMod <<<"$dl")"
    info="$(json_field Info <<<"$dl")"
    [[ -f "$gomod" ]] || die "go mod download gave no GoMod file: $dl"
    # Staging modules: "k8s.io/foo => ./staging/src/k8s.io/foo" lines.
    mapfile -t STAGING < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\/src\// {print $1}
                                $1 == "replace" && $3 == "=>" && $4 ~ /^\.\/staging\/src\// {print $2}' "$gomod" | sort -u)
    ((${#STAGING[@]} > 0)) || die "no staging replaces found in $gomod"
    log "kubernetes go.mod replaces ${#STAGING[@]} staging modules; pinning them to $STAGING_VERSION"
    local godir; godir="$(awk '$1 == "go" {print $2; exit}' "$gomod")"
    {
      echo "// Generated by scripts/build-kube-current.sh - throwaway build module."
      echo "module raftsql.local/kube-build"
      echo
      echo "go ${godir}"
      echo
      grep -E '^godebug ' "$gomod" || true
      echo
      echo "require k8s.io/kubernetes $K8S_VERSION"
      echo
      echo "tool ("
      echo "	k8s.io/kubernetes/cmd/kube-apiserver"
      echo "	k8s.io/kubernetes/cmd/kubectl"
      echo ")"
      echo
      echo "replace ("
      local m
      for m in "${STAGING[@]}"; do echo "	$m => $m $STAGING_VERSION"; done
      echo ")"
    } | write_if_changed "$KUBE_SRC/go.mod.in"
    # Release date of the tag, used as buildDate (reproducible builds).
    KUBE_BUILD_DATE="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info")"
    [[ -n "$KUBE_BUILD_DATE" ]] || KUBE_BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    module_tidy "$KUBE_SRC"
    # k8s.io/kubernetes and every staging module really at the pinned version?
    local got
    got="$(cd "$KUBE_SRC" && "$GO" list -m -f '{{.Version}}' k8s.io/kubernetes)"
    [[ "$got" == "$K8S_VERSION" ]] || die "k8s.io/kubernetes resolved to $got, want $K8S_VERSION"
    local bad
    bad="$(cd "$KUBE_SRC" && "$GO" list -m -f '{{.Path}} {{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' all \
           | awk -v v="$STAGING_VERSION" 'NR == FNR {want[$1] = 1; next} ($1 in want) && $2 != v {print}' \
                 <(printf '%s\n' "${STAGING[@]}") -)"
    [[ -z "$bad" ]] || die "staging modules not at $STAGING_VERSION: $bad"
  }
  timed "kube: download + go mod tidy" kube_prepare

  KUBE_LDFLAGS="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    KUBE_LDFLAGS+=" -X '$pkg.gitVersion=$K8S_VERSION'"
    KUBE_LDFLAGS+=" -X '$pkg.gitMajor=1' -X '$pkg.gitMinor=$K8S_MINOR'"
    KUBE_LDFLAGS+=" -X '$pkg.gitTreeState=clean'"
    KUBE_LDFLAGS+=" -X '$pkg.buildDate=$KUBE_BUILD_DATE'"
  done

  kube_build() { # kube_build NAME
    rm -f "$BIN/$1" "$BIN/.$1.version"
    (cd "$KUBE_SRC" && gorun build -trimpath -ldflags "$KUBE_LDFLAGS" \
        -o "$BIN/$1" "k8s.io/kubernetes/cmd/$1")
    stamp "$1" "$K8S_VERSION"
  }
  for name in kube-apiserver kubectl; do
    if is_built "$name" "$K8S_VERSION"; then
      log "$name $K8S_VERSION already built"
    else
      log "building $name $K8S_VERSION (niced, -p=$GO_PARALLEL; slow on a small machine)"
      timed "kube: build $name" kube_build "$name"
    fi
  done
fi

########################################################################
# 2. etcd
########################################################################
ETCD_SRC="$OUTDIR/src/etcd"
if [[ -z "$ETCD_VERSION" ]]; then
  # Newest $ETCD_SERIES.x served for both server/v3 and etcdctl/v3.
  next="${ETCD_SERIES%.*}.$(( ${ETCD_SERIES##*.} + 1 )).0-0"
  sv="$(cd "$OUTDIR" && "$GO" list -m -f '{{.Version}}' "go.etcd.io/etcd/server/v3@<$next")"
  cv="$(cd "$OUTDIR" && "$GO" list -m -f '{{.Version}}' "go.etcd.io/etcd/etcdctl/v3@<$next")"
  [[ "$sv" == "$cv" ]] || die "newest etcd server ($sv) and etcdctl ($cv) differ; set ETCD_VERSION"
  ETCD_VERSION="$sv"
  log "newest etcd $ETCD_SERIES.x on the proxy: $ETCD_VERSION"
fi

if is_built etcd "$ETCD_VERSION" && is_built etcdctl "$ETCD_VERSION"; then
  log "etcd and etcdctl $ETCD_VERSION already built (FORCE_BUILD=1 to rebuild)"
else
  mkdir -p "$ETCD_SRC"
  etcd_prepare() {
    log "downloading etcd server/etcdctl $ETCD_VERSION"
    local dl smod cmod
    dl="$(cd "$ETCD_SRC" && gorun mod download -json "go.etcd.io/etcd/server/v3@$ETCD_VERSION")"
    smod="$(json_field GoMod <<<"$dl")"
    dl="$(cd "$ETCD_SRC" && gorun mod download -json "go.etcd.io/etcd/etcdctl/v3@$ETCD_VERSION")"
    cmod="$(json_field GoMod <<<"$dl")"
    [[ -f "$smod" && -f "$cmod" ]] || die "could not download etcd $ETCD_VERSION go.mod files"
    # In-repo etcd modules: "go.etcd.io/etcd/x/v3 => ../x" replace lines.
    mapfile -t EMODS < <({ awk '$2 == "=>" && $3 ~ /^\.\.\// {print $1}
                               $1 == "replace" && $3 == "=>" && $4 ~ /^\.\.\// {print $2}' "$smod" "$cmod"
                           echo go.etcd.io/etcd/server/v3; echo go.etcd.io/etcd/etcdctl/v3; } | sort -u)
    log "pinning ${#EMODS[@]} etcd modules to $ETCD_VERSION: ${EMODS[*]}"
    local godir; godir="$(awk '$1 == "go" {print $2; exit}' "$smod")"
    cat <<'EOF' | write_if_changed "$ETCD_SRC/main.go"
// Generated by scripts/build-kube-current.sh: the same thing etcd's own
// root main.go does.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
    {
      echo "// Generated by scripts/build-kube-current.sh - throwaway build module."
      echo "module raftsql.local/etcd"
      echo
      echo "go ${godir}"
      echo
      local m
      echo "require ("
      for m in "${EMODS[@]}"; do echo "	$m $ETCD_VERSION"; done
      echo ")"
      echo
      echo "tool go.etcd.io/etcd/etcdctl/v3"
      echo
      echo "replace ("
      for m in "${EMODS[@]}"; do echo "	$m => $m $ETCD_VERSION"; done
      echo ")"
    } | write_if_changed "$ETCD_SRC/go.mod.in"
    module_tidy "$ETCD_SRC"
    local bad
    bad="$(cd "$ETCD_SRC" && "$GO" list -m -f '{{.Path}} {{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' all \
           | awk -v v="$ETCD_VERSION" '$1 ~ /^go\.etcd\.io\/etcd\// && $2 != v {print}')"
    [[ -z "$bad" ]] || die "etcd modules not at $ETCD_VERSION: $bad"
  }
  timed "etcd: download + go mod tidy" etcd_prepare

  etcd_build() { # etcd_build NAME PKG
    rm -f "$BIN/$1" "$BIN/.$1.version"
    (cd "$ETCD_SRC" && gorun build -trimpath -ldflags "-s -w" -o "$BIN/$1" "$2")
    stamp "$1" "$ETCD_VERSION"
  }
  for spec in "etcd ." "etcdctl go.etcd.io/etcd/etcdctl/v3"; do
    read -r name pkg <<<"$spec"
    if is_built "$name" "$ETCD_VERSION"; then
      log "$name $ETCD_VERSION already built"
    else
      log "building $name $ETCD_VERSION"
      timed "etcd: build $name" etcd_build "$name" "$pkg"
    fi
  done
fi

########################################################################
# 3. Report
########################################################################
if ((${#TIMINGS[@]} > 0)); then
  log "step timings:"
  for t in "${TIMINGS[@]}"; do log "  $t"; done
fi
log "binaries in $BIN:"
ls -l "$BIN"/kube-apiserver "$BIN"/kubectl "$BIN"/etcd "$BIN"/etcdctl
echo "+ kube-apiserver --version";   "$BIN/kube-apiserver" --version
echo "+ kubectl version --client";   "$BIN/kubectl" version --client
echo "+ etcd --version";             "$BIN/etcd" --version
echo "+ etcdctl version";            "$BIN/etcdctl" version
