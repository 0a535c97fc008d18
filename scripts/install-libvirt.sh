#!/usr/bin/env bash
# Install the libvirt that tests/test_libvirt.py drives qmp-proxy-qemu with, on Debian 12
# (bookworm): Debian's libvirt-daemon (libvirtd, virtlogd), its QEMU driver, libvirt-clients
# (virsh) and qemu-utils (qemu-img), from the mirror this machine's apt already uses.
#
# The minimal packages, not libvirt-daemon-system (which on bookworm pulls in systemd as init,
# a default network, polkit and a firewall): nothing is enabled or started; the tests start
# virtlogd and libvirtd by hand, in a private mount namespace, and stop them again. What
# libvirt-daemon-system's postinst would add and libvirt needs, the user libvirt runs QEMU as,
# is made here the same way when missing: system user libvirt-qemu (uid 64055 if free, primary
# group kvm, home /var/lib/libvirt, no login) and its group libvirt-qemu (gid 64055 if free).
# Should a maintainer script still ask invoke-rc.d to start a service, a policy-rc.d that
# forbids it is in place for the install only (an existing /usr/sbin/policy-rc.d is left as it
# is).
#
# Usage (as root):
#   scripts/install-libvirt.sh
#
# Idempotent: when every package is installed and libvirtd, virtlogd, virsh and qemu-img run, it
# only says so. On success it prints one line, e.g. "libvirt 9.0.0 ready"; on failure the failing
# step and its output go to stderr.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-utils)
POLICY=/usr/sbin/policy-rc.d
QEMU_ID=64055   # Debian's allocated uid and gid for libvirt-qemu

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
case ${1:-} in
  '') ;;
  -h|--help) usage; exit 0 ;;
  *) printf 'install-libvirt.sh: unknown argument: %s (see --help)\n' "$1" >&2; exit 2 ;;
esac

die() { printf 'install-libvirt.sh: %s\n' "$*" >&2; exit 1; }

# version: "9.0.0" from "libvirtd (libvirt) 9.0.0"; empty if it does not run.
version() { libvirtd --version 2>/dev/null | awk '{ print $NF; exit }' || true; }

installed() {
  local pkg
  for pkg in "${PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f '${db:Status-Status}' "$pkg" 2>/dev/null)" = installed ] || return 1
  done
  command -v virtlogd >/dev/null && command -v virsh >/dev/null && command -v qemu-img >/dev/null &&
    [ -n "$(version)" ] && getent passwd libvirt-qemu >/dev/null &&
    getent group libvirt-qemu >/dev/null
}

if installed; then
  echo "libvirt $(version) ready"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || die "run as root: ${PACKAGES[*]} must be installed with apt-get"

WORK=$(mktemp -d /tmp/install-libvirt.XXXXXX)
own_policy=0
cleanup() {
  if [ "$own_policy" = 1 ]; then rm -f "$POLICY"; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# run STEP CMD...: run quietly; on failure print the step and its output to stderr and stop.
run() {
  local step=$1; shift
  if ! "$@" >"$WORK/log" 2>&1; then
    printf 'install-libvirt.sh: %s failed: %s\n' "$step" "$*" >&2
    tail -n 40 "$WORK/log" >&2
    exit 1
  fi
}

if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\n# install-libvirt.sh: no service starts during the install\nexit 101\n' >"$POLICY"
  chmod 755 "$POLICY"
  own_policy=1
fi

apt_install() { apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"$WORK/log" 2>&1; }
# apt's lists are refreshed only when the install fails: unknown packages (a fresh machine) or a
# version that has left the mirror.
if ! apt_install; then
  run "apt-get update" apt-get update -qq
  run "installing ${PACKAGES[*]}" apt_install
fi

# qemu_user: libvirt-qemu as libvirt-daemon-system's postinst makes it, if missing.
qemu_user() {
  local uid=() gid=()
  getent group kvm >/dev/null || run "adding group kvm" groupadd --system kvm
  if ! getent passwd libvirt-qemu >/dev/null; then
    getent passwd "$QEMU_ID" >/dev/null || uid=(--uid "$QEMU_ID")
    run "adding user libvirt-qemu" useradd --system "${uid[@]}" --gid kvm --no-create-home \
      --home-dir /var/lib/libvirt --shell /usr/sbin/nologin --comment "Libvirt Qemu" libvirt-qemu
  fi
  if ! getent group libvirt-qemu >/dev/null; then
    getent group "$QEMU_ID" >/dev/null || gid=(--gid "$QEMU_ID")
    run "adding group libvirt-qemu" groupadd --system "${gid[@]}" libvirt-qemu
    run "adding libvirt-qemu to its group" usermod --append --groups libvirt-qemu libvirt-qemu
  fi
}
qemu_user

installed || die "libvirt does not run after the install: $(libvirtd --version 2>&1 | head -5)"
echo "libvirt $(version) ready"
