#!/usr/bin/env bash
# Install the Prometheus server and promtool that tests/test_prometheus.py runs against
# contrib/prometheus/alerts.yml and contrib/grafana/qmp-proxy.json, on Debian 12 (bookworm).
#
# Debian's own `prometheus` package (bookworm: 2.42), downloaded with `apt-get download` from the
# mirror this machine's apt already uses, and unpacked with dpkg-deb -x into $PROMETHEUS_PREFIX
# (default /opt/prometheus): the tests run $PROMETHEUS_PREFIX/usr/bin/prometheus and .../promtool.
# The package is NOT installed: its maintainer scripts never run, so no service is enabled or
# started (with or without systemd, with or without a policy-rc.d), no `prometheus` user, no
# /etc/prometheus, no /var/lib/prometheus, no web-UI JavaScript packages, and nothing in dpkg's
# database; removing $PROMETHEUS_PREFIX removes it all. Both binaries need only libc.
#
# Usage (as root, or as any user who can write $PROMETHEUS_PREFIX once apt's lists are fresh):
#   scripts/install-prometheus.sh
#
# Idempotent: a prefix this script made whose binaries run is left alone. On success it prints
# one line, e.g. "Prometheus 2.42.0+ds ready in /opt/prometheus"; on failure the failing step and
# its output go to stderr.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

PROMETHEUS_PREFIX=${PROMETHEUS_PREFIX:-/opt/prometheus}
MARKER=.installed-by-qmp-proxy   # lets a re-install replace the prefix without risking another dir

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
case ${1:-} in
  '') ;;
  -h|--help) usage; exit 0 ;;
  *) printf 'install-prometheus.sh: unknown argument: %s (see --help)\n' "$1" >&2; exit 2 ;;
esac

die() { printf 'install-prometheus.sh: %s\n' "$*" >&2; exit 1; }

case $PROMETHEUS_PREFIX in
  /?*) PROMETHEUS_PREFIX=${PROMETHEUS_PREFIX%/} ;;
  *) die "PROMETHEUS_PREFIX must be an absolute path other than / (got '$PROMETHEUS_PREFIX')" ;;
esac
bin=$PROMETHEUS_PREFIX/usr/bin

# version BINARY: "2.42.0+ds" from "prometheus, version 2.42.0+ds (branch: ...)"; empty if it
# does not run.
version() {
  "$1" --version 2>&1 | awk '$2 == "version" { print $3; exit }' || true
}

installed() {
  [ -e "$PROMETHEUS_PREFIX/$MARKER" ] && [ -n "$(version "$bin/prometheus")" ] &&
    [ -n "$(version "$bin/promtool")" ]
}

if installed; then
  echo "Prometheus $(version "$bin/prometheus") ready in $PROMETHEUS_PREFIX"
  exit 0
fi

if [ -e "$PROMETHEUS_PREFIX" ] && [ -n "$(ls -A "$PROMETHEUS_PREFIX" 2>/dev/null)" ] &&
   [ ! -e "$PROMETHEUS_PREFIX/$MARKER" ]; then
  die "$PROMETHEUS_PREFIX exists, is not empty and was not made by this script: remove it or set PROMETHEUS_PREFIX"
fi

WORK=$(mktemp -d /tmp/install-prometheus.XXXXXX)
stage=$PROMETHEUS_PREFIX.new.$$
trap 'rm -rf "$WORK" "$stage"' EXIT

# run STEP CMD...: run quietly; on failure print the step and its output to stderr and stop.
run() {
  local step=$1; shift
  if ! "$@" >"$WORK/log" 2>&1; then
    printf 'install-prometheus.sh: %s failed: %s\n' "$step" "$*" >&2
    tail -n 40 "$WORK/log" >&2
    exit 1
  fi
}

# download: the package from apt's configured sources, verified by apt as any other. The sandbox
# user (_apt) cannot write into a private mktemp dir, hence APT::Sandbox::User.
download() {
  ( cd "$WORK" && apt-get download -qq -o APT::Sandbox::User="$(id -un)" prometheus ) \
    >"$WORK/log" 2>&1
}
# apt's lists are refreshed only when they fail: unknown package (a fresh machine) or a version
# that has left the mirror.
if ! download; then
  [ "$(id -u)" -eq 0 ] || { tail -n 20 "$WORK/log" >&2; die "cannot download 'prometheus': run apt-get update as root"; }
  run "apt-get update" apt-get update -qq
  run "downloading the prometheus package" download
fi
deb=$(find "$WORK" -maxdepth 1 -name 'prometheus_*.deb' -print -quit)
[ -n "$deb" ] || die "apt-get download left no prometheus_*.deb"

rm -rf "$stage"
mkdir -p "$stage"
run "unpacking ${deb##*/}" dpkg-deb -x "$deb" "$stage"
# Keep the binaries, the web templates and the example config; drop the init script, unit,
# logrotate and default files: nothing here is a service.
for drop in etc/init.d etc/default etc/logrotate.d lib var usr/share/doc usr/share/man; do
  rm -rf "${stage:?}/$drop"
done
dpkg-deb -f "$deb" Version >"$stage/VERSION"
touch "$stage/$MARKER"
for tool in prometheus promtool; do
  [ -n "$(version "$stage/usr/bin/$tool")" ] ||
    die "$stage/usr/bin/$tool does not run: $("$stage/usr/bin/$tool" --version 2>&1 | head -5)"
done
rm -rf "$PROMETHEUS_PREFIX"
mv "$stage" "$PROMETHEUS_PREFIX"

installed || die "$PROMETHEUS_PREFIX does not hold working binaries after the install"
echo "Prometheus $(version "$bin/prometheus") ready in $PROMETHEUS_PREFIX"
