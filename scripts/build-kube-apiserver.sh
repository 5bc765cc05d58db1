#!/usr/bin/env bash
# build-kube-apiserver.sh - build kube-apiserver and kubectl (upstream
# Kubernetes v1.20.2) from Debian bookworm's `kubernetes` source package.
#
# Usage: scripts/build-kube-apiserver.sh [OUTDIR]     (default: /work/kube)
#
# What it does:
#   1. Downloads bookworm's Sources.xz and bullseye's amd64 Packages.xz from
#      deb.debian.org and takes file names + SHA256 sums from them.
#   2. Downloads the kubernetes source package
#      (kubernetes_1.20.5+really1.20.2.orig.tar.gz + the Debian tarball) and the
#      golang-1.15-go / golang-1.15-src .debs, verifying every SHA256.
#   3. `dpkg -x`es the Go debs into OUTDIR/go (nothing is installed system-wide);
#      GOROOT is OUTDIR/go/usr/lib/go-1.15.
#   4. Unpacks the source into OUTDIR/src/kubernetes-1.20.2 and applies the
#      Debian quilt patches (debian/patches/series, incl. CVE-2021-25743).
#   5. Builds offline (GOPROXY=off; the tree is a GOPATH-mode build using its
#      own vendor/ directory) with the upstream wrapper:
#          make WHAT="cmd/kube-apiserver cmd/kubectl"
#      under `nice -n 19`, with go's parallelism capped (-p=2, GO_PARALLEL).
#      The tarball is a `git archive` export, so hack/lib/version.sh already
#      carries commit faecb196 / tag v1.20.2 and the binaries report v1.20.2.
#   6. Copies the results to OUTDIR/bin/kube-apiserver and OUTDIR/bin/kubectl.
#
# Every step is skipped when its result is already there, so re-running is
# cheap. Set FORCE_BUILD=1 to rebuild the binaries anyway.
#
# Why Go 1.15: Kubernetes 1.20 was released with Go 1.15. It still compiles
# with Go 1.19+, but the resulting kube-apiserver crashes at run time, so the
# toolchain has to be the matching one; Debian bullseye still ships
# golang-1.15, which is used here straight from its .debs.
#
# Needs: bash, curl, xz, dpkg (dpkg -x only), tar, patch, make, sha256sum.
# rsync (used by the upstream build to place binaries) is replaced by a tiny
# cp shim if it is not installed.
set -euo pipefail

OUTDIR="${1:-/work/kube}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
K8S_SUITE=bookworm
GO_SUITE=bullseye
K8S_SRCPKG=kubernetes
# The upstream source must be exactly this tarball (v1.20.2).
K8S_ORIG=kubernetes_1.20.5+really1.20.2.orig.tar.gz
K8S_ORIG_SHA256=b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc
K8S_SRCDIR_NAME=kubernetes-1.20.2
GO_DEBS=(golang-1.15-go golang-1.15-src)
GO_PARALLEL="${GO_PARALLEL:-2}"

NICE=(nice -n 19)

log() { printf '[build-kube-apiserver %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }

for tool in curl xz dpkg tar patch make sha256sum awk; do
  command -v "$tool" >/dev/null || die "missing required tool: $tool"
done

mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
DL="$OUTDIR/downloads"
GODIR="$OUTDIR/go"
SRC="$OUTDIR/src"
TOOLS="$OUTDIR/tools"
BIN="$OUTDIR/bin"
mkdir -p "$DL" "$GODIR" "$SRC" "$TOOLS" "$BIN"

log "output dir: $OUTDIR"

# --- helpers -----------------------------------------------------------------

# fetch URL DEST [SHA256]: download unless DEST already exists with that sum.
fetch() {
  local url="$1" dest="$2" sum="${3:-}"
  if [[ -f "$dest" ]]; then
    if [[ -z "$sum" ]] || echo "$sum  $dest" | sha256sum -c --quiet - >/dev/null 2>&1; then
      log "have $(basename "$dest")"
      return 0
    fi
    log "checksum mismatch for existing $(basename "$dest"), re-downloading"
    rm -f "$dest"
  fi
  log "downloading $url"
  curl -fsSL --retry 3 --connect-timeout 30 -o "$dest.part" "$url"
  if [[ -n "$sum" ]]; then
    echo "$sum  $dest.part" | sha256sum -c --quiet - \
      || { rm -f "$dest.part"; die "sha256 mismatch for $url"; }
  fi
  mv "$dest.part" "$dest"
}

# stanza FILE.xz PACKAGE: print the index stanza for PACKAGE (first match).
# (awk reads to the end so that xz never dies of SIGPIPE under pipefail.)
stanza() {
  xz -dc "$1" | awk -v pkg="$2" '
    BEGIN { RS = ""; FS = "\n" }
    !done { for (i = 1; i <= NF; i++) if ($i == "Package: " pkg) { print; done = 1; break } }'
}

# --- 1. indexes ------------------------------------------------------------------

SOURCES_XZ="$DL/${K8S_SUITE}_main_Sources.xz"
PACKAGES_XZ="$DL/${GO_SUITE}_main_binary-amd64_Packages.xz"
fetch "$MIRROR/dists/$K8S_SUITE/main/source/Sources.xz" "$SOURCES_XZ"
fetch "$MIRROR/dists/$GO_SUITE/main/binary-amd64/Packages.xz" "$PACKAGES_XZ"

# --- 2. kubernetes source package ------------------------------------------------

K8S_STANZA="$(stanza "$SOURCES_XZ" "$K8S_SRCPKG")"
[[ -n "$K8S_STANZA" ]] || die "package $K8S_SRCPKG not found in $K8S_SUITE Sources"
K8S_DIR="$(awk '/^Directory:/ {print $2}' <<<"$K8S_STANZA")"
K8S_VERSION="$(awk '/^Version:/ {print $2}' <<<"$K8S_STANZA")"
log "$K8S_SUITE $K8S_SRCPKG source version $K8S_VERSION ($K8S_DIR)"
# "Checksums-Sha256:" lines: " <sha256> <size> <name>"
K8S_SUMS="$(awk '/^Checksums-Sha256:/ {f=1; next} /^[^ ]/ {f=0} f {print $1, $3}' <<<"$K8S_STANZA")"

sum_of() { awk -v n="$1" '$2 == n {print $1}' <<<"$K8S_SUMS"; }

orig_sum="$(sum_of "$K8S_ORIG")"
[[ -n "$orig_sum" ]] || die "$K8S_ORIG not listed in the $K8S_SRCPKG Sources entry"
[[ "$orig_sum" == "$K8S_ORIG_SHA256" ]] \
  || die "$K8S_ORIG: index sha256 $orig_sum != pinned $K8S_ORIG_SHA256"
fetch "$MIRROR/$K8S_DIR/$K8S_ORIG" "$DL/$K8S_ORIG" "$orig_sum"

DEB_TARBALL="$(awk '$2 ~ /\.debian\.tar\.(xz|gz|bz2)$/ {print $2}' <<<"$K8S_SUMS")"
[[ -n "$DEB_TARBALL" ]] || die "no debian tarball in the $K8S_SRCPKG Sources entry"
fetch "$MIRROR/$K8S_DIR/$DEB_TARBALL" "$DL/$DEB_TARBALL" "$(sum_of "$DEB_TARBALL")"

# --- 3. Go 1.15 from bullseye .debs ----------------------------------------------

GOROOT_DIR="$GODIR/usr/lib/go-1.15"
for pkg in "${GO_DEBS[@]}"; do
  st="$(stanza "$PACKAGES_XZ" "$pkg")"
  [[ -n "$st" ]] || die "package $pkg not found in $GO_SUITE Packages"
  fn="$(awk '/^Filename:/ {print $2}' <<<"$st")"
  sum="$(awk '/^SHA256:/ {print $2}' <<<"$st")"
  ver="$(awk '/^Version:/ {print $2}' <<<"$st")"
  deb="$DL/$(basename "$fn")"
  fetch "$MIRROR/$fn" "$deb" "$sum"
  stamp="$GODIR/.unpacked-$(basename "$fn")"
  if [[ -f "$stamp" ]]; then
    log "have unpacked $pkg $ver"
  else
    log "dpkg -x $pkg $ver"
    dpkg -x "$deb" "$GODIR"
    touch "$stamp"
  fi
done
[[ -x "$GOROOT_DIR/bin/go" && -d "$GOROOT_DIR/src/runtime" ]] \
  || die "Go toolchain incomplete under $GOROOT_DIR"
export GOROOT="$GOROOT_DIR"
export PATH="$GOROOT/bin:$PATH"
# The machine's own Go settings (`go env -w`, e.g. GOFLAGS=-buildvcs=false for Go 1.18+)
# are not for Go 1.15, which refuses flags it does not know.
export GOENV=off
unset GOFLAGS GOTOOLCHAIN
log "using $(go version) (GOROOT=$GOROOT)"
case "$(go version)" in
  *" go1.15."*) ;;
  *) die "expected Go 1.15, got: $(go version)" ;;
esac

# --- 4. unpack + patch the source --------------------------------------------------

K8S_ROOT="$SRC/$K8S_SRCDIR_NAME"
UNPACK_STAMP="$SRC/.unpacked-$K8S_VERSION"
if [[ -f "$UNPACK_STAMP" && -d "$K8S_ROOT" ]]; then
  log "have unpacked + patched source at $K8S_ROOT"
else
  log "unpacking source into $K8S_ROOT"
  rm -rf "$K8S_ROOT" "$SRC"/.unpacked-*
  "${NICE[@]}" tar -xzf "$DL/$K8S_ORIG" -C "$SRC"
  [[ -d "$K8S_ROOT" ]] || die "tarball did not contain $K8S_SRCDIR_NAME/"
  tar -xf "$DL/$DEB_TARBALL" -C "$K8S_ROOT"
  if [[ -f "$K8S_ROOT/debian/patches/series" ]]; then
    while read -r p _; do
      [[ -z "$p" || "$p" == \#* ]] && continue
      log "applying debian/patches/$p"
      patch -d "$K8S_ROOT" -p1 --batch --forward --quiet < "$K8S_ROOT/debian/patches/$p"
    done < "$K8S_ROOT/debian/patches/series"
  fi
  touch "$UNPACK_STAMP"
fi

# --- 5. build ----------------------------------------------------------------------

# The upstream build copies binaries with `rsync -pc SRC DIR`; shim it with cp
# if rsync is not installed.
if ! command -v rsync >/dev/null; then
  cat > "$TOOLS/rsync" <<'EOF'
#!/bin/sh
# minimal stand-in for `rsync -pc SRC... DEST` used by hack/lib/golang.sh
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
exec cp -p "$@"
EOF
  chmod +x "$TOOLS/rsync"
  export PATH="$TOOLS:$PATH"
  log "rsync not installed; using cp shim $TOOLS/rsync"
fi

BUILT_APISERVER="$K8S_ROOT/_output/local/bin/linux/amd64/kube-apiserver"
BUILT_KUBECTL="$K8S_ROOT/_output/local/bin/linux/amd64/kubectl"
BUILD_LOG="$OUTDIR/build.log"

if [[ "${FORCE_BUILD:-0}" != 1 && -x "$BUILT_APISERVER" && -x "$BUILT_KUBECTL" \
      && -f "$OUTDIR/.built-$K8S_VERSION" ]]; then
  log "binaries already built (FORCE_BUILD=1 to rebuild)"
else
  log "building kube-apiserver + kubectl with $(go version | awk '{print $3}'), log: $BUILD_LOG"
  log "(this takes a long time on a small machine; progress lines come from the upstream build)"
  rm -f "$OUTDIR/.built-$K8S_VERSION"
  start=$SECONDS
  (
    cd "$K8S_ROOT"
    # Offline: no module proxy, no checksum DB. Kubernetes 1.20's build runs in
    # GOPATH mode (hack/lib/init.sh sets GO111MODULE=off) with vendor/, so no
    # -mod flag is needed (nor allowed). Go's parallelism is capped with -p.
    # hack/lib/golang.sh parses "-tags=..." out of GOFLAGS (and would take a
    # GOFLAGS without one as a tag list), so pass the default tag explicitly.
    export GOPROXY=off GOSUMDB=off GOFLAGS="-p=$GO_PARALLEL -tags=selinux"
    export HOME="${HOME:-/root}" CGO_ENABLED=0
    set +e
    "${NICE[@]}" make WHAT="cmd/kube-apiserver cmd/kubectl" 2>&1 \
      | tee "$BUILD_LOG" \
      | grep --line-buffered -E '^\+\+\+|^!!!|rror|cannot|undefined'
    exit "${PIPESTATUS[0]}"
  ) || die "build failed, see $BUILD_LOG"
  [[ -x "$BUILT_APISERVER" && -x "$BUILT_KUBECTL" ]] \
    || die "build finished but binaries are missing, see $BUILD_LOG"
  touch "$OUTDIR/.built-$K8S_VERSION"
  log "build took $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s"
fi

# --- 6. install ----------------------------------------------------------------------

install -m 0755 "$BUILT_APISERVER" "$BIN/kube-apiserver"
install -m 0755 "$BUILT_KUBECTL" "$BIN/kubectl"
log "kube-apiserver: $BIN/kube-apiserver ($("$BIN/kube-apiserver" --version))"
log "kubectl:        $BIN/kubectl ($("$BIN/kubectl" version --client --short 2>/dev/null || "$BIN/kubectl" version --client))"
log "done"
