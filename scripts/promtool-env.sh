#!/usr/bin/env bash
# Provides promtool (Prometheus' own linter) for the metrics test, from Debian's archive only:
# the system one if installed, else `apt-get download prometheus` unpacked (dpkg -x) into
# .cache/promtool without installing the Prometheus service. Prints the path on its last line.
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${VBALLOON_PROMTOOL_CACHE:-$ROOT_DIR/.cache/promtool}"
if command -v promtool >/dev/null; then command -v promtool; exit 0; fi
BIN="$CACHE/root/usr/bin/promtool"
if [ ! -x "$BIN" ]; then
  mkdir -p "$CACHE"
  (
    cd "$CACHE"
    rm -f prometheus_*.deb
    apt-get update -qq >&2 || { echo "promtool-env: apt-get update failed" >&2; exit 1; }
    apt-get download prometheus >&2 || { echo "promtool-env: apt-get download prometheus failed" >&2; exit 1; }
    dpkg -x prometheus_*.deb root
    rm -f prometheus_*.deb
  )
fi
"$BIN" --version >&2
echo "$BIN"
