#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs QEMU 7.2 + 10.0 and socat
# (scripts/install-qemu.sh), Prometheus (install-prometheus.sh), libvirt (install-libvirt.sh),
# a venv with the project and its test tools, then runs pytest.
# Run as root (the installs need apt; the libvirt tests start libvirtd).  Extra arguments go to pytest.
#   --ci   also apply install-qemu.sh's host-changing module fix (throwaway CI machines only)
set -euo pipefail
cd "$(dirname "$0")/.."
qemu_flags=()
if [ "${1:-}" = "--ci" ]; then qemu_flags=(--ci); shift; fi
scripts/install-qemu.sh "${qemu_flags[@]}"
scripts/install-prometheus.sh
scripts/install-libvirt.sh
# The Debian package's test builds a venv from Debian's python3 and renders man pages; the
# container's test runs the entry point in namespaces of its own.
missing=()
for pkg in python3-venv man-db groff-base util-linux; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
scripts/setup-venv.sh test
exec .venv/bin/python -m pytest "$@"
