#!/usr/bin/env bash
# A demo from a fresh Debian 12 machine: installs QEMU 7.2, socat and qmp-proxy (in ./.venv),
# starts a stopped QEMU 7.2, puts qmp-proxy in front of it, and has two clients use it at once.
# Run as root (the QEMU install needs apt).  Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-qemu.sh --only-72
scripts/setup-venv.sh
tmp=$(mktemp -d /tmp/qmp-proxy-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
qemu-system-x86_64 -M none -accel tcg -nodefaults -display none -S \
  -qmp "unix:$tmp/qemu.sock,server=on,wait=off" 2>"$tmp/qemu.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$tmp/qemu.sock" ] && break; sleep 0.05; done
.venv/bin/qmp-proxy --upstream "unix:$tmp/qemu.sock" --listen "unix:$tmp/proxy.sock" 2>"$tmp/proxy.log" &
pids+=($!)
for _ in $(seq 100); do grep -q upstream_ready "$tmp/proxy.log" 2>/dev/null && break; sleep 0.05; done
echo "QEMU 7.2 QMP socket: $tmp/qemu.sock"
echo "qmp-proxy socket:    $tmp/proxy.sock"
echo
.venv/bin/python scripts/demo.py "$tmp/proxy.sock"
echo
echo "--- the proxy's log ---"
cat "$tmp/proxy.log"
