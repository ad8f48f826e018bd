#!/bin/sh
# Build the ollama-like example into OUTDIR:
#   OUTDIR/ollama                 the Go server (cgo, dynamically linked, like the real ollama)
#   OUTDIR/libcuda.so.1           the fake driver library (0 devices)
#   OUTDIR/libvgpu-test-shim.so   the test shim (VGPU_TEST_DEVICES devices, default 1)
# Each artefact is rebuilt only when a source is newer than it, so a second run is instant.
# Needs gcc and Go (Debian: gcc golang-go).
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
src=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
CC=${CC:-gcc}
CFLAGS=${CFLAGS:--O2 -Wall -Wextra}

need() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "build.sh: $1 not found (Debian/Ubuntu: apt-get install $2)" >&2
        exit 1
    }
}

# stale TARGET SOURCE...: true when TARGET is missing or older than one of the sources
stale() {
    target=$1
    shift
    [ -e "$target" ] || return 0
    for s in "$@"; do
        [ "$s" -nt "$target" ] && return 0
    done
    return 1
}

need "$CC" gcc
if stale "$out/libcuda.so.1" "$src/fake-libcuda.c"; then
    # shellcheck disable=SC2086
    $CC $CFLAGS -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$out/libcuda.so.1.tmp" "$src/fake-libcuda.c"
    mv -f "$out/libcuda.so.1.tmp" "$out/libcuda.so.1"
fi
if stale "$out/libvgpu-test-shim.so" "$src/vgpu-test-shim.c"; then
    # shellcheck disable=SC2086
    $CC $CFLAGS -shared -fPIC -o "$out/libvgpu-test-shim.so.tmp" "$src/vgpu-test-shim.c" -ldl -pthread
    mv -f "$out/libvgpu-test-shim.so.tmp" "$out/libvgpu-test-shim.so"
fi
if stale "$out/ollama" "$src/main.go" "$src/go.mod"; then
    need go golang-go
    # Go needs a writable build cache; fall back to one inside OUTDIR (no HOME, read-only HOME).
    gocache=${GOCACHE:-$(go env GOCACHE 2>/dev/null || true)}
    if [ -z "$gocache" ] || [ "$gocache" = off ] || ! mkdir -p "$gocache" 2>/dev/null ||
        [ ! -w "$gocache" ]; then
        gocache=$out/.gocache
    fi
    (
        cd "$src"
        GOCACHE=$gocache CGO_ENABLED=1 GO111MODULE=on GOFLAGS=-mod=mod GOPROXY=off \
            GOTOOLCHAIN=local CC="$CC" go build -o "$out/ollama.tmp" .
    )
    mv -f "$out/ollama.tmp" "$out/ollama"
fi
