#!/usr/bin/env bash
# Install the two real QEMUs that qmp-proxy's integration tests drive, on Debian 12 (bookworm) x86_64:
#
#   QEMU 7.2   Debian's own qemu-system-x86 (system-wide, --no-install-recommends), plus socat.
#              This is the version that lacks the feature; the README demo needs only this one.
#   QEMU 10.0  qemu-system-x86 from bookworm-backports, fetched with a PRIVATE apt state dir (nothing
#              under /etc/apt is changed), unpacked with dpkg-deb -x into $QEMU10_PREFIX
#              (default /opt/qemu-10), and started through /usr/local/bin/qemu10-system-x86_64.
#
# Usage (as root, non-interactive):
#   scripts/install-qemu.sh            install 7.2 + socat + 10.0; the host's QEMU is left as Debian ships it
#   scripts/install-qemu.sh --only-72  install only 7.2 + socat (alias: --demo); enough for the README demo
#   scripts/install-qemu.sh --ci       also apply the host-changing module fix (throwaway CI machines only):
#                                      a dpkg path-exclude in /etc/dpkg/dpkg.cfg.d/ plus deleting 7.2's
#                                      non-TCG modules from /usr/lib/x86_64-linux-gnu/qemu. Without it,
#                                      QEMU 10.0 aborts on module-loading commands such as qom-list-types
#                                      because it also searches 7.2's module dir; nothing the proxy and its
#                                      tests need is affected. On a shared machine, run such a 10.0 in a
#                                      private mount namespace with an empty dir bound over that module dir.
#
# Idempotent: what is already installed is skipped. On success it prints one line, e.g.
# "QEMU 7.2.15 + 10.0.2 ready"; on failure the failing step and its output go to stderr.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

QEMU10_PREFIX=${QEMU10_PREFIX:-/opt/qemu-10}
WRAPPER=/usr/local/bin/qemu10-system-x86_64
SYS_MODDIR=/usr/lib/x86_64-linux-gnu/qemu
DPKG_FILTER=/etc/dpkg/dpkg.cfg.d/qemu-headless-modules
MARKER=.installed-by-qmp-proxy   # lets a re-install replace $QEMU10_PREFIX without risking another dir
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
SUITE=bookworm

ci=0 only72=0
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
for arg in "$@"; do
  case $arg in
    --ci) ci=1 ;;
    --only-72|--demo) only72=1 ;;
    -h|--help) usage; exit 0 ;;
    *) printf 'install-qemu.sh: unknown argument: %s (see --help)\n' "$arg" >&2; exit 2 ;;
  esac
done

die() { printf 'install-qemu.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
[ "$(uname -m)" = x86_64 ] || die "x86_64 only (this is $(uname -m))"
grep -q '^VERSION_CODENAME=bookworm$' /etc/os-release 2>/dev/null || die "Debian 12 (bookworm) only"
case $QEMU10_PREFIX in
  /?*) ;;
  *) die "QEMU10_PREFIX must be an absolute path other than / (got '$QEMU10_PREFIX')" ;;
esac
QEMU10_PREFIX=${QEMU10_PREFIX%/}

WORK=$(mktemp -d /tmp/install-qemu.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# run STEP CMD...: run quietly; on failure print the step and its output to stderr and stop.
run() {
  local step=$1; shift
  if ! "$@" >"$WORK/log" 2>&1; then
    printf 'install-qemu.sh: %s failed: %s\n' "$step" "$*" >&2
    tail -n 60 "$WORK/log" >&2
    exit 1
  fi
}

# qemu_version CMD: "7.2.15" from "QEMU emulator version 7.2.15 (Debian ...)"; empty if it doesn't run.
qemu_version() {
  "$1" --version 2>/dev/null | awk '/^QEMU emulator version /{print $4; exit}' || true
}

# sq STR: STR single-quoted for /bin/sh.
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# The Debian mirror this machine already uses, for suite $SUITE (never a hard-coded host).
debian_mirror() {
  local f uri=
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    # deb822: the first stanza of Types "deb" whose Suites has exactly "bookworm"; its first URI.
    uri=$(awk -v suite="$SUITE" 'BEGIN { RS = "" }
      {
        uri = ""; has_suite = 0; is_deb = 0; enabled = 1
        n = split($0, line, "\n")
        for (i = 1; i <= n; i++) {
          if (line[i] ~ /^URIs:/)    { split(line[i], w, /[ \t]+/); uri = w[2] }
          if (line[i] ~ /^Types:/   && (line[i] " ") ~ /[ \t]deb[ \t]/) is_deb = 1
          if (line[i] ~ /^Suites:/  && (line[i] " ") ~ ("[ \t]" suite "[ \t]")) has_suite = 1
          if (line[i] ~ /^Enabled:[ \t]*no/) enabled = 0
        }
        if (uri != "" && has_suite && is_deb && enabled) { print uri; exit }
      }' "$f")
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ]; then
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -r "$f" ] || continue
      # one-line format: deb [options] URI SUITE COMPONENTS...
      uri=$(awk -v suite="$SUITE" '$1 == "deb" {
          i = 2
          if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
          if ($(i + 1) == suite) { print $i; exit }
        }' "$f")
      [ -n "$uri" ] && break
    done
  fi
  [ -n "$uri" ] || die "no Debian '$SUITE' mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
  printf '%s\n' "${uri%/}"
}

# qmp_smoke NAME QEMU-CMD QMP-COMMAND...: boot a paused TCG PC, drive QMP over stdio, expect a clean quit.
qmp_smoke() {
  local name=$1 q=$2 out; shift 2
  local cmds=('{"execute":"qmp_capabilities"}' "$@" '{"execute":"quit"}')
  out=$(printf '%s\n' "${cmds[@]}" |
        timeout 30 "$q" -M pc -accel tcg -m 32 -nodefaults -display none -S -qmp stdio 2>&1) || true
  case $out in
    *'"QMP"'*'"SHUTDOWN"'*) ;;
    *) printf 'install-qemu.sh: %s failed the QMP smoke test (%s):\n%s\n' "$name" "$q" "${out:0:3000}" >&2
       exit 1 ;;
  esac
  case $out in
    *'"error"'*) printf 'install-qemu.sh: %s answered a QMP smoke-test command with an error:\n%s\n' \
                   "$name" "${out:0:3000}" >&2
                 exit 1 ;;
  esac
}

# ---------------------------------------------------------------- --ci: keep 7.2's modules out of the way
# QEMU 10.0 also searches the system module dir (compiled in; QEMU_MODULE_DIR only goes first). Finding a
# 7.2 module there (ui-opengl.so, *-gl.so, spice, dbus ...) makes 10.0 abort on qom-list-types & co. with
# "module_load_dso: Assertion `QTAILQ_EMPTY(&dso_init_list)' failed". Keep only 7.2's TCG accelerators,
# now and for later 7.2 upgrades. Written before the install so the modules are never unpacked.
if [ "$ci" = 1 ]; then
  filter='path-exclude=/usr/lib/x86_64-linux-gnu/qemu/*.so
path-include=/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-*.so'
  if [ "$(cat "$DPKG_FILTER" 2>/dev/null)" != "$filter" ]; then
    mkdir -p "${DPKG_FILTER%/*}"
    printf '%s\n' "$filter" >"$DPKG_FILTER"
  fi
fi

# ---------------------------------------------------------------- QEMU 7.2 + socat (Debian bookworm)
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v socat >/dev/null; then
  run "apt-get update" apt-get update -qq
  # qemu-system-common/-data, seabios and ipxe-qemu come as Depends; they also bring every shared
  # library QEMU 10.0 needs.
  run "installing qemu-system-x86 and socat" \
    apt-get install -y -qq --no-install-recommends qemu-system-x86 socat
fi
if [ "$ci" = 1 ] && [ -d "$SYS_MODDIR" ]; then
  find "$SYS_MODDIR" -name '*.so' ! -name 'accel-tcg-*' -delete   # 7.2 installed before the filter
fi
v72=$(qemu_version qemu-system-x86_64)
[ -n "$v72" ] || die "qemu-system-x86_64 --version gives no version: $(qemu-system-x86_64 --version 2>&1 | head -5)"
# 7.2 with its own modules handles module-loading commands; --ci left it only the TCG ones, also fine.
qmp_smoke "QEMU $v72" qemu-system-x86_64 '{"execute":"query-status"}' '{"execute":"qom-list-types"}'

if [ "$only72" = 1 ]; then
  echo "QEMU $v72 ready"
  exit 0
fi

# ---------------------------------------------------------------- QEMU 10.0 (bookworm-backports, unpacked)
bin10=$QEMU10_PREFIX/usr/bin/qemu-system-x86_64
v10=
if [ -x "$WRAPPER" ] && grep -qF "$bin10" "$WRAPPER"; then
  v10=$(qemu_version "$WRAPPER")
fi
case $v10 in
  10.*) ;;   # already installed: skip the download
  *)
    if [ -e "$QEMU10_PREFIX" ] && [ -n "$(ls -A "$QEMU10_PREFIX" 2>/dev/null)" ] &&
       [ ! -e "$QEMU10_PREFIX/$MARKER" ]; then
      die "$QEMU10_PREFIX exists, is not empty and was not made by this script: remove it or set QEMU10_PREFIX"
    fi
    [ -r "$KEYRING" ] || die "$KEYRING is missing (package debian-archive-keyring)"
    mirror=$(debian_mirror)
    # Private apt state: own sources, lists and cache; the system's /etc/apt and lists stay untouched.
    mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/debs"
    printf 'deb [signed-by=%s] %s %s-backports main\n' "$KEYRING" "$mirror" "$SUITE" >"$WORK/sources.list"
    apto=(-o Dir::Etc::SourceList="$WORK/sources.list" -o Dir::Etc::SourceParts=/nonexistent
          -o Dir::State::Lists="$WORK/lists" -o Dir::Cache="$WORK/cache" -o APT::Sandbox::User=root)
    run "apt-get update (private, $SUITE-backports)" apt-get "${apto[@]}" update -qq
    # Selected by suite, not exact version: old backports versions leave the mirror. The version check
    # below says if backports has moved past 10.0.
    ( cd "$WORK/debs" &&
      run "downloading QEMU from $SUITE-backports" apt-get "${apto[@]}" download -qq \
        "qemu-system-x86/$SUITE-backports" "qemu-system-common/$SUITE-backports" \
        "qemu-system-data/$SUITE-backports" "seabios/$SUITE-backports" )
    # Unpack beside the final place, then swap, so a failed run leaves the previous install intact.
    stage=$QEMU10_PREFIX.new.$$
    rm -rf "$stage"; mkdir -p "$stage"
    for deb in "$WORK"/debs/*.deb; do run "unpacking ${deb##*/}" dpkg-deb -x "$deb" "$stage"; done
    rm -rf "$stage/usr/share/doc" "$stage/usr/share/man"
    touch "$stage/$MARKER"
    rm -rf "$QEMU10_PREFIX"
    mv "$stage" "$QEMU10_PREFIX"

    # Wrapper: 10.0's own module dir and firmware dirs (-L); exec keeps the PID for callers.
    mkdir -p "${WRAPPER%/*}"
    {
      printf '#!/bin/sh\n'
      printf '# QEMU 10.0 from bookworm-backports, unpacked by qmp-proxy scripts/install-qemu.sh\n'
      printf 'QEMU_MODULE_DIR=%s\nexport QEMU_MODULE_DIR\n' "$(sq "$QEMU10_PREFIX/usr/lib/x86_64-linux-gnu/qemu")"
      printf 'exec %s -L %s -L %s "$@"\n' "$(sq "$bin10")" \
        "$(sq "$QEMU10_PREFIX/usr/share/qemu")" "$(sq "$QEMU10_PREFIX/usr/share/seabios")"
    } >"$WRAPPER.tmp"
    chmod 755 "$WRAPPER.tmp"
    mv "$WRAPPER.tmp" "$WRAPPER"
    ;;
esac

# ---------------------------------------------------------------- sanity checks for 10.0
if missing=$(ldd "$bin10" 2>&1 | grep 'not found'); then
  die "$bin10 misses shared libraries:
$missing"
fi
v10=$(qemu_version "$WRAPPER")
case $v10 in
  10.0.*) ;;
  10.*) printf 'install-qemu.sh: warning: bookworm-backports now has QEMU %s, not 10.0.x\n' "$v10" >&2 ;;
  *) die "$WRAPPER --version gives no QEMU 10 version: $("$WRAPPER" --version 2>&1 | head -5)" ;;
esac
if [ "$ci" = 1 ]; then
  qmp_smoke "QEMU $v10" "$WRAPPER" '{"execute":"query-status"}' '{"execute":"qom-list-types"}'
else
  # Without --ci the system dir still holds 7.2's modules: no module-loading command here.
  qmp_smoke "QEMU $v10" "$WRAPPER" '{"execute":"query-status"}' '{"execute":"query-version"}'
fi

echo "QEMU $v72 + $v10 ready"
