#!/usr/bin/env bash
# Install the real QEMUs that qmp-proxy's integration tests drive, on Debian 12 (bookworm) x86_64:
#
#   QEMU 7.2   Debian's own qemu-system-x86 (system-wide, --no-install-recommends), plus socat.
#              This is the version that lacks the feature; the README demo needs only this one.
#              Always installed: it is the host's QEMU, and 10.0 runs on the libraries it brings.
#   QEMU 10.0  qemu-system-x86 from bookworm-backports, fetched with a PRIVATE apt state dir (nothing
#              under /etc/apt is changed), unpacked with dpkg-deb -x into $QEMU10_PREFIX
#              (default /opt/qemu-10), and started through /usr/local/bin/qemu10-system-x86_64.
#   QEMU 5.2   qemu-system-x86 from bullseye + bullseye-updates + bullseye-security, and
#   QEMU 11.1  qemu-system-x86 from trixie-backports (+ trixie for what it needs): the same private apt
#              state, with apt resolving everything the package needs as for an empty system, glibc
#              included; unpacked into $QEMU52_PREFIX / $QEMU111_PREFIX (default /opt/qemu-5.2,
#              /opt/qemu-11.1) and started through /usr/local/bin/qemu52-system-x86_64 /
#              qemu111-system-x86_64. These run the binary through the suite's own ld-linux-x86-64.so.2
#              with --library-path, which reaches QEMU alone: what QEMU starts (exec: migration, helpers)
#              runs on the host's libraries. PID and /proc/PID/comm are QEMU's ("qemu-system-x86").
#
# The mirror is the one this machine's apt uses for bookworm, bullseye-security's the one it uses for
# bookworm-security (set DEBIAN_SECURITY_MIRROR if there is none; without either, 5.2 comes from
# bullseye + bullseye-updates only, and a warning says so).
#
# Usage (as root, non-interactive):
#   scripts/install-qemu.sh            install 5.2, 7.2 + socat, 10.0 and 11.1; the host's QEMU is left
#                                      as Debian ships it
#   scripts/install-qemu.sh --versions 7.2,10.0
#                                      install only these of 5.2, 7.2, 10.0, 11.1 (7.2 always comes too)
#   scripts/install-qemu.sh --only-72  install only 7.2 + socat (alias: --demo); enough for the README demo
#   scripts/install-qemu.sh --ci       also apply the host-changing module fix (throwaway CI machines only):
#                                      a dpkg path-exclude in /etc/dpkg/dpkg.cfg.d/ plus deleting 7.2's
#                                      non-TCG modules from /usr/lib/x86_64-linux-gnu/qemu. Without it,
#                                      QEMU 10.0 aborts on module-loading commands such as qom-list-types
#                                      because it also searches 7.2's module dir; nothing the proxy and its
#                                      tests need is affected. On a shared machine, run such a 10.0 in a
#                                      private mount namespace with an empty dir bound over that module dir.
#                                      5.2 searches there too but only prints "Failed to initialize module"
#                                      lines on stderr; 11.1 searches only its own module dir.
#
# Idempotent: what is already installed and verified is skipped. On success it prints one line, e.g.
# "QEMU 5.2.0 + 7.2.22 + 10.0.2 + 11.1.3 ready"; on failure the failing step and its output go to stderr.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

QEMU10_PREFIX=${QEMU10_PREFIX:-/opt/qemu-10}
QEMU52_PREFIX=${QEMU52_PREFIX:-/opt/qemu-5.2}
QEMU111_PREFIX=${QEMU111_PREFIX:-/opt/qemu-11.1}
WRAPPER=/usr/local/bin/qemu10-system-x86_64
WRAPPER52=/usr/local/bin/qemu52-system-x86_64
WRAPPER111=/usr/local/bin/qemu111-system-x86_64
SYS_MODDIR=/usr/lib/x86_64-linux-gnu/qemu
DPKG_FILTER=/etc/dpkg/dpkg.cfg.d/qemu-headless-modules
MARKER=.installed-by-qmp-proxy   # lets a re-install replace a prefix without risking another dir
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
SUITE=bookworm

ci=0 versions="5.2 7.2 10.0 11.1"
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
while [ $# -gt 0 ]; do
  case $1 in
    --ci) ci=1 ;;
    --only-72|--demo) versions=7.2 ;;
    --versions=*) versions=${1#*=} ;;
    --versions)
      [ $# -ge 2 ] || { printf 'install-qemu.sh: --versions needs a list, e.g. 7.2,10.0\n' >&2; exit 2; }
      versions=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) printf 'install-qemu.sh: unknown argument: %s (see --help)\n' "$1" >&2; exit 2 ;;
  esac
  shift
done
wanted=" 7.2 "
for v in ${versions//,/ }; do
  case $v in
    5.2|7.2|10.0|11.1) wanted+="$v " ;;
    *) printf 'install-qemu.sh: unknown QEMU version: %s (known: 5.2, 7.2, 10.0, 11.1)\n' "$v" >&2; exit 2 ;;
  esac
done
want() { case $wanted in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

die() { printf 'install-qemu.sh: %s\n' "$*" >&2; exit 1; }
warn() { printf 'install-qemu.sh: warning: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
[ "$(uname -m)" = x86_64 ] || die "x86_64 only (this is $(uname -m))"
grep -q '^VERSION_CODENAME=bookworm$' /etc/os-release 2>/dev/null || die "Debian 12 (bookworm) only"
for var in QEMU10_PREFIX QEMU52_PREFIX QEMU111_PREFIX; do
  case ${!var} in
    /?*) printf -v "$var" '%s' "${!var%/}" ;;
    *) die "$var must be an absolute path other than / (got '${!var}')" ;;
  esac
done

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

# apt_uri SUITE: the first URI this machine's apt uses for SUITE (e.g. bookworm-security); empty if none.
apt_uri() {
  local suite=$1 f uri=
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    # deb822: the first stanza of Types "deb" whose Suites has exactly SUITE; its first URI.
    uri=$(awk -v suite="$suite" 'BEGIN { RS = "" }
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
      uri=$(awk -v suite="$suite" '$1 == "deb" {
          i = 2
          if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
          if ($(i + 1) == suite) { print $i; exit }
        }' "$f")
      [ -n "$uri" ] && break
    done
  fi
  [ -z "$uri" ] || printf '%s\n' "${uri%/}"
}

# The Debian mirror this machine already uses, for suite $SUITE (never a hard-coded host).
debian_mirror() {
  local uri
  uri=$(apt_uri "$SUITE")
  [ -n "$uri" ] || die "no Debian '$SUITE' mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
  printf '%s\n' "$uri"
}

# apt_private NAME "URI SUITE"...: a private apt state in $WORK/NAME with these suites (main only): own
# sources list, lists, cache and an empty dpkg status; /etc/apt's sources and pins are not read and
# nothing under /etc/apt changes. Sets aptdir and apto (the apt-get options that select it), runs
# apt-get update and stops with one clear line naming the first suite it could not fetch.
apt_private() {
  local entry uri suite why
  aptdir=$WORK/$1; shift
  [ -r "$KEYRING" ] || die "$KEYRING is missing (package debian-archive-keyring)"
  mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$aptdir/debs"
  : >"$aptdir/status"
  for entry in "$@"; do
    printf 'deb [signed-by=%s] %s main\n' "$KEYRING" "$entry"
  done >"$aptdir/sources.list"
  apto=(-o Dir::Etc::SourceList="$aptdir/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o Dir::Etc::Preferences=/nonexistent -o Dir::Etc::PreferencesParts=/nonexistent
        -o Dir::State::Lists="$aptdir/lists" -o Dir::State::Status="$aptdir/status"
        -o Dir::Cache="$aptdir/cache" -o APT::Sandbox::User=root)
  apt-get "${apto[@]}" update -q >"$aptdir/update.log" 2>&1 || true
  for entry in "$@"; do
    uri=${entry% *} suite=${entry##* }
    if [ -z "$(find "$aptdir/lists" -maxdepth 1 -name "*_dists_${suite}_main_binary-amd64_Packages*" \
                 -print -quit)" ]; then
      # apt's reason: the line after "Err:N URI SUITE ...", else its first E:/W: line.
      why=$(awk -v want=" $uri $suite " 'found { sub(/^[ \t]+/, ""); print; exit }
              /^Err:/ && index($0 " ", want) { found = 1 }' "$aptdir/update.log")
      [ -n "$why" ] || why=$(grep -m1 -E '^(E|W): ' "$aptdir/update.log" || true)
      die "cannot reach Debian suite $suite at $uri: ${why:-no index downloaded, see apt-get update}"
    fi
  done
}

# fetch_closure PKG [APT-GET-OPTION...]: download PKG and everything it Depends/Pre-Depends on, as apt
# resolves it for an empty system from the private state's suites, into $aptdir/debs. Selected by suite,
# not exact version: old versions leave the mirror; the version checks below say if a suite moved on.
fetch_closure() {
  local pkg=$1 pkgs; shift
  run "resolving $pkg" apt-get "${apto[@]}" install -s --no-install-recommends "$@" "$pkg"
  pkgs=$(awk '$1 == "Inst" { v = $3; sub(/^\(/, "", v); print $2 "=" v }' "$WORK/log")
  [ -n "$pkgs" ] || die "apt resolved nothing to install for $pkg"
  # shellcheck disable=SC2086  # one word per package
  ( cd "$aptdir/debs" && run "downloading $(wc -l <<<"$pkgs") packages for $pkg" \
      apt-get "${apto[@]}" download -qq $pkgs )
}

# check_prefix PREFIX VAR: stop before downloading if PREFIX holds something this script did not make.
check_prefix() {
  if [ -e "$1" ] && [ -n "$(ls -A "$1" 2>/dev/null)" ] && [ ! -e "$1/$MARKER" ]; then
    die "$1 exists, is not empty and was not made by this script: remove it or set $2"
  fi
}

# stage_debs PREFIX: unpack $aptdir/debs/*.deb into $stage, beside PREFIX (docs, man pages and
# translations dropped); swap_in PREFIX then replaces PREFIX, so a failed run leaves it intact.
stage_debs() {
  local deb
  stage=$1.new.$$
  rm -rf "$stage"; mkdir -p "$stage"
  for deb in "$aptdir"/debs/*.deb; do run "unpacking ${deb##*/}" dpkg-deb -x "$deb" "$stage"; done
  rm -rf "$stage/usr/share/doc" "$stage/usr/share/man" "$stage/usr/share/info" "$stage/usr/share/locale"
  touch "$stage/$MARKER"
}
swap_in() {
  rm -rf "$1"
  mv "$stage" "$1"
}

# write_wrapper PATH COMMENT QEMU_MODULE_DIR EXEC-WORD...: a /bin/sh wrapper that execs the words (so the
# PID is QEMU's) followed by its own arguments.
write_wrapper() {
  local path=$1 comment=$2 moddir=$3 word; shift 3
  mkdir -p "${path%/*}"
  {
    printf '#!/bin/sh\n'
    printf '%s\n' "$comment" | sed 's/^/# /'
    printf 'QEMU_MODULE_DIR=%s\nexport QEMU_MODULE_DIR\n' "$(sq "$moddir")"
    printf 'exec'
    for word in "$@"; do printf ' %s' "$(sq "$word")"; done
    printf ' "$@"\n'
  } >"$path.tmp"
  chmod 755 "$path.tmp"
  mv "$path.tmp" "$path"
}

# qmp_smoke NAME QEMU-CMD QMP-COMMAND...: boot a paused TCG PC, then a bare "-M none", driving QMP over
# stdio; expect a clean quit and no error.
qmp_smoke() {
  local name=$1 q=$2 machine out; shift 2
  local cmds=('{"execute":"qmp_capabilities"}' "$@" '{"execute":"quit"}')
  for machine in pc none; do
    out=$(printf '%s\n' "${cmds[@]}" |
          timeout 30 "$q" -M "$machine" -accel tcg -m 32 -nodefaults -display none -S -qmp stdio 2>&1) ||
      true
    case $out in
      *'"QMP"'*'"SHUTDOWN"'*) ;;
      *) printf 'install-qemu.sh: %s failed the QMP smoke test (%s -M %s):\n%s\n' \
           "$name" "$q" "$machine" "${out:0:3000}" >&2
         exit 1 ;;
    esac
    case $out in
      *'"error"'*) printf 'install-qemu.sh: %s answered a QMP smoke-test command with an error (-M %s):\n%s\n' \
                     "$name" "$machine" "${out:0:3000}" >&2
                   exit 1 ;;
    esac
  done
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
ready=()   # "VERSION" per installed QEMU, in the order of the final line

# ---------------------------------------------------------------- QEMU 5.2 / 11.1 (own glibc, unpacked)
# own_libpath PREFIX: the library dirs of the Debian system unpacked in PREFIX, for --library-path.
own_libpath() {
  local d p=
  for d in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu; do
    [ -d "$1/$d" ] && p+=${p:+:}$1/$d
  done
  printf '%s\n' "$p"
}

# own_problems PREFIX: what keeps the QEMU unpacked in PREFIX from running on its own files only: a
# library of QEMU or its modules that its loader does not find inside PREFIX (it would silently come
# from the host), or a missing seabios. Empty if none.
own_problems() {
  local prefix=$1 libpath f out
  [ -x "$prefix/ld/qemu-system-x86_64" ] || { echo "no loader $prefix/ld/qemu-system-x86_64"; return; }
  [ -r "$prefix/usr/share/seabios/bios-256k.bin" ] || echo "no $prefix/usr/share/seabios/bios-256k.bin"
  libpath=$(own_libpath "$prefix")
  for f in "$prefix/usr/bin/qemu-system-x86_64" "$prefix"/usr/lib/x86_64-linux-gnu/qemu/*.so; do
    [ -e "$f" ] || continue
    out=$("$prefix/ld/qemu-system-x86_64" --library-path "$libpath" --list "$f" 2>&1) || true
    awk -v f="$f" -v p="$prefix/" '/not found/ { print f ":" $0; next } /linux-vdso|statically linked/ { next }
      { path = ($2 == "=>") ? $3 : $1; if (index(path, p) != 1) print f ": outside the prefix:" $0 }' <<<"$out"
  done
}

# install_own_libc NAME PREFIX PREFIX-VAR WRAPPER VERSION-GLOB "URI SUITE"... [-- APT-GET-OPTION...]:
# install qemu-system-x86 with everything it needs (glibc included) into PREFIX, and WRAPPER to start
# it; skipped when WRAPPER already starts a QEMU matching VERSION-GLOB from PREFIX that passes
# own_problems. Sets ver.
install_own_libc() {
  local name=$1 prefix=$2 var=$3 wrapper=$4 glob=$5 bin=$2/usr/bin/qemu-system-x86_64 loader='' problems ok
  local suites=() names='' d
  shift 5
  while [ $# -gt 0 ] && [ "$1" != -- ]; do suites+=("$1"); names+="${names:+, }${1##* }"; shift; done
  [ $# -eq 0 ] || shift

  ver='' ok=0
  if [ -x "$wrapper" ] && grep -qF "$bin" "$wrapper"; then
    ver=$(qemu_version "$wrapper")
  fi
  # shellcheck disable=SC2254  # glob on purpose
  case $ver in
    $glob) [ -n "$(own_problems "$prefix")" ] || ok=1 ;;   # installed and verified: skip the download
  esac
  if [ "$ok" = 0 ]; then
    check_prefix "$prefix" "$var"
    apt_private "$name" "${suites[@]}"
    fetch_closure qemu-system-x86 "$@"
    stage_debs "$prefix"
    # Old setuid/setgid tools (passwd, chfn ...) come along as dependencies; none runs from here.
    find "$stage" -perm /6000 -type f -exec chmod ug-s {} +
    # The loader: a real file in the prefix (bullseye's /lib64 link is absolute, i.e. the host's).
    for d in usr/lib/x86_64-linux-gnu lib/x86_64-linux-gnu; do
      if [ -e "$stage/$d/ld-linux-x86-64.so.2" ]; then
        loader=$(realpath -e "$stage/$d/ld-linux-x86-64.so.2")
        break
      fi
    done
    case $loader in
      "$stage"/*) ;;
      *) die "QEMU $name: no ld-linux-x86-64.so.2 inside the unpacked packages" ;;
    esac
    # The loader under QEMU's name: the kernel names the process after the file exec'd, so ps and
    # /proc/PID/comm say qemu-system-x86 (like the other QEMUs), not ld-linux-x86-64.
    mkdir -p "$stage/ld"
    ln -s "$(realpath --relative-to="$stage/ld" "$loader")" "$stage/ld/qemu-system-x86_64"
    # QEMU >= 7.1 looks for its compiled-in dirs (modules in /usr/lib/x86_64-linux-gnu/qemu, firmware
    # in /usr/share/qemu, /etc/qemu) under EXEC_DIR/qemu-bundle first if that exists; EXEC_DIR is the
    # loader's dir here. Pointing it at the prefix keeps 11.1 away from 7.2's modules (see --ci).
    # 5.2 predates it and also searches /usr/lib/x86_64-linux-gnu/qemu.
    ln -s "$(realpath --relative-to="${loader%/*}" "$stage")" "${loader%/*}/qemu-bundle"
    swap_in "$prefix"
    write_wrapper "$wrapper" \
      "QEMU $name from $names, unpacked with its own glibc and libraries by
qmp-proxy scripts/install-qemu.sh. Its own loader starts it (ld/qemu-system-x86_64 is that loader under
QEMU's name); --library-path reaches QEMU alone, so what QEMU starts (exec: migration) runs on the
host's libraries. -L: its own firmware first (seabios' bios-256k.bin for -M pc), not the host's." \
      "$prefix/usr/lib/x86_64-linux-gnu/qemu" \
      "$prefix/ld/qemu-system-x86_64" --library-path "$(own_libpath "$prefix")" "$bin" \
      -L "$prefix/usr/share/qemu" -L "$prefix/usr/share/seabios" -L "$prefix/usr/lib/ipxe/qemu"

    problems=$(own_problems "$prefix")
    [ -z "$problems" ] || die "QEMU $name in $prefix cannot run on its own files:
$problems"
    ver=$(qemu_version "$wrapper")
    # shellcheck disable=SC2254
    case $ver in
      $glob) ;;
      *) die "$wrapper --version gives no QEMU $glob version: $("$wrapper" --version 2>&1 | head -5)" ;;
    esac
  fi
  # Module-loading commands are fine: 11.1 never sees 7.2's modules, 5.2 only complains about them.
  qmp_smoke "QEMU $ver" "$wrapper" '{"execute":"query-status"}' '{"execute":"qom-list-types"}'
}

if want 5.2; then
  mirror=$(debian_mirror)
  security=${DEBIAN_SECURITY_MIRROR:-$(apt_uri "$SUITE-security")}
  security=${security%/}
  suites52=("$mirror bullseye" "$mirror bullseye-updates")
  if [ -n "$security" ]; then
    suites52+=("$security bullseye-security")
  elif [ ! -x "$WRAPPER52" ]; then
    warn "no $SUITE-security mirror in this machine's apt sources and no DEBIAN_SECURITY_MIRROR:" \
      "QEMU 5.2 comes from bullseye + bullseye-updates only, without bullseye-security's fixes"
  fi
  install_own_libc 5.2 "$QEMU52_PREFIX" QEMU52_PREFIX "$WRAPPER52" '5.2.*' "${suites52[@]}"
  ready+=("$ver")
fi

ready+=("$v72")

# ---------------------------------------------------------------- QEMU 10.0 (bookworm-backports, unpacked)
if want 10.0; then
  bin10=$QEMU10_PREFIX/usr/bin/qemu-system-x86_64
  v10=
  if [ -x "$WRAPPER" ] && grep -qF "$bin10" "$WRAPPER"; then
    v10=$(qemu_version "$WRAPPER")
  fi
  case $v10 in
    10.*) ;;   # already installed: skip the download
    *)
      check_prefix "$QEMU10_PREFIX" QEMU10_PREFIX
      mirror=$(debian_mirror)
      apt_private qemu10 "$mirror $SUITE-backports"
      # Selected by suite, not exact version: old backports versions leave the mirror. The version check
      # below says if backports has moved past 10.0.
      ( cd "$aptdir/debs" &&
        run "downloading QEMU from $SUITE-backports" apt-get "${apto[@]}" download -qq \
          "qemu-system-x86/$SUITE-backports" "qemu-system-common/$SUITE-backports" \
          "qemu-system-data/$SUITE-backports" "seabios/$SUITE-backports" )
      stage_debs "$QEMU10_PREFIX"
      swap_in "$QEMU10_PREFIX"
      # Wrapper: 10.0's own module dir and firmware dirs (-L); exec keeps the PID for callers.
      write_wrapper "$WRAPPER" "QEMU 10.0 from bookworm-backports, unpacked by qmp-proxy scripts/install-qemu.sh" \
        "$QEMU10_PREFIX/usr/lib/x86_64-linux-gnu/qemu" \
        "$bin10" -L "$QEMU10_PREFIX/usr/share/qemu" -L "$QEMU10_PREFIX/usr/share/seabios"
      ;;
  esac

  # -------------------------------------------------------------- sanity checks for 10.0
  if missing=$(ldd "$bin10" 2>&1 | grep 'not found'); then
    die "$bin10 misses shared libraries:
$missing"
  fi
  v10=$(qemu_version "$WRAPPER")
  case $v10 in
    10.0.*) ;;
    10.*) warn "bookworm-backports now has QEMU $v10, not 10.0.x" ;;
    *) die "$WRAPPER --version gives no QEMU 10 version: $("$WRAPPER" --version 2>&1 | head -5)" ;;
  esac
  if [ "$ci" = 1 ]; then
    qmp_smoke "QEMU $v10" "$WRAPPER" '{"execute":"query-status"}' '{"execute":"qom-list-types"}'
  else
    # Without --ci the system dir still holds 7.2's modules: no module-loading command here.
    qmp_smoke "QEMU $v10" "$WRAPPER" '{"execute":"query-status"}' '{"execute":"query-version"}'
  fi
  ready+=("$v10")
fi

# ---------------------------------------------------------------- QEMU 11.1 (trixie-backports, own glibc)
if want 11.1; then
  mirror=$(debian_mirror)
  # -t: trixie-backports' version of whatever it has (as "apt install -t trixie-backports" on trixie).
  install_own_libc 11.1 "$QEMU111_PREFIX" QEMU111_PREFIX "$WRAPPER111" '11.*' \
    "$mirror trixie-backports" "$mirror trixie" -- -t trixie-backports
  case $ver in
    11.1.*) ;;
    *) warn "trixie-backports now has QEMU $ver, not 11.1.x" ;;
  esac
  ready+=("$ver")
fi

out=${ready[*]}
echo "QEMU ${out// / + } ready"
