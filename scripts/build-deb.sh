#!/usr/bin/env bash
# Build dist/qmp-proxy_VERSION_ARCH.deb from this tree (uncommitted changes included), on Debian
# 12, as root or not.  VERSION is pyproject.toml's.  What the package holds:
#   /usr/lib/qmp-proxy/           the application in its own virtual environment (bookworm has
#                                 no python3-orjson, so it cannot use Debian's Python packages)
#   /usr/bin/qmp-proxy, /usr/bin/qmp-proxy-qemu   symlinks to its console scripts
#   /lib/systemd/system/          systemd/*.service, *.socket (enabled by nobody)
#   /etc/qmp-proxy/               config/*.toml, the commented examples, as conffiles
#   /usr/share/man/man8/          qmp-proxy.8, qmp-proxy-qemu.8 (scripts/manpage.py)
#   /usr/share/doc/qmp-proxy/     copyright, changelogs, README, examples/, operations.md
# Python packages come by name from the package index pip is configured with.
set -euo pipefail
umask 022
# No bytecode in the package: the build runs the venv's python (man pages, copyright), and the
# postinst compiles at the final path (the prerm removes it again).
export PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "$0")/.."
repo=$PWD

python=/usr/bin/python3
if ! "$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "build-deb.sh: $python must be Python >= 3.11 (Debian 12's python3)" >&2; exit 1
fi
# The venv is bound to this interpreter's minor version (its site-packages directory, the
# extension modules' ABI tags), so the package depends on exactly that one.
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
python="/usr/bin/python$pyver"
version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
arch=$(dpkg --print-architecture)
# One date for every timestamp (the man pages, the changelog entry, files' mtimes): the last
# commit's, so that building one commit twice gives the same files.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
maintainer=$(git log -1 --format='%an <%ae>' 2>/dev/null || echo 'qmp-proxy maintainers <root@localhost>')

work=$(mktemp -d /tmp/qmp-proxy-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
stage=$work/root
prefix=/usr/lib/qmp-proxy
venv=$stage$prefix
mkdir -p "$stage/DEBIAN" "$work/src" "$work/wheel"

# --- the application -------------------------------------------------------------------------
# How the venv gets to live at /usr/lib/qmp-proxy without being built there: it is made in the
# staging tree by Debian's own /usr/bin/python3.X, then every place that records the staging
# path is rewritten or dropped, and the build fails if any mention of it is left (below).  A
# venv stores its own location in only a few places: the console scripts' #! lines, pyvenv.cfg's
# "command" line, the activate scripts, and the source paths compiled into .pyc files (none are
# shipped: the postinst compiles at the final path, as Debian's py3compile does).  Its python
# is a symlink to /usr/bin/python3.X, and pyvenv.cfg's home is /usr/bin.  This needs no root,
# no chroot and no mount namespace, and never touches the build host's /usr/lib/qmp-proxy.
cp -r pyproject.toml README.md proxy "$work/src/"
rm -rf "$work/src/proxy/__pycache__"
if ! "$python" -m venv "$venv" 2>/dev/null; then
  # Debian ships venv's ensurepip separately.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-cache-dir -q)
"${pip[@]}" wheel --no-deps -w "$work/wheel" "$work/src"
# Runtime dependencies come by name from pyproject.toml's [project] dependencies, as binary
# wheels (no compiler on the build host, none of the build's paths in any binary).
"${pip[@]}" install --no-compile --only-binary=:all: --no-warn-script-location "$work"/wheel/*.whl
# pip is not needed at run time, and nobody should pip-install into a dpkg-managed directory.
"${pip[@]}" uninstall -y pip setuptools
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1
rm -rf "$venv/include"  # for building C extensions: empty, and nothing builds here
sed -i "1s|^#!$venv/|#!$prefix/|" "$venv"/bin/qmp-proxy "$venv"/bin/qmp-proxy-qemu
sed -i "s|^command = .*|command = $python -m venv $prefix|" "$venv/pyvenv.cfg"
site=$venv/lib/python$pyver/site-packages
# The project was installed from a wheel file that the build removes: forget where it came from.
for url in "$site"/qmp_proxy-*.dist-info/direct_url.json; do
  rm -f "$url"
  sed -i '/direct_url\.json/d' "$(dirname "$url")/RECORD"
done
# The extension modules as Debian ships its own: without their symbol tables (uvloop's alone
# is 14 MB with them, 2 MB without).
find "$venv" -name '*.so' -exec strip --strip-unneeded {} +
mkdir -p "$stage/usr/bin"
ln -s "../lib/qmp-proxy/bin/qmp-proxy" "$stage/usr/bin/qmp-proxy"
ln -s "../lib/qmp-proxy/bin/qmp-proxy-qemu" "$stage/usr/bin/qmp-proxy-qemu"

# --- units, configuration, documentation ------------------------------------------------------
install -d "$stage/lib/systemd/system" "$stage/etc/qmp-proxy" "$stage/usr/share/man/man8"
install -m 0644 systemd/*.service systemd/*.socket "$stage/lib/systemd/system/"
install -m 0644 config/qmp-proxy.toml config/qemu.toml "$stage/etc/qmp-proxy/"
for page in qmp-proxy qmp-proxy-qemu; do
  "$venv/bin/python" scripts/manpage.py "$page" | gzip -9n >"$stage/usr/share/man/man8/$page.8.gz"
done
doc=$stage/usr/share/doc/qmp-proxy
install -d "$doc/examples"
install -m 0644 examples/*.toml "$doc/examples/"
gzip -9n <CHANGELOG.md >"$doc/changelog.gz"
gzip -9n <README.md >"$doc/README.md.gz"
install -m 0644 docs/operations.md "$doc/operations.md"
date_rfc=$(date -u -R -d "@$SOURCE_DATE_EPOCH")
printf '%s\n' "qmp-proxy ($version) unstable; urgency=medium" "" \
  "  * Built from the qmp-proxy repository; the changes are in changelog.gz." "" \
  " -- $maintainer  $date_rfc" | gzip -9n >"$doc/changelog.Debian.gz"
"$venv/bin/python" - "$site" "$prefix" >"$doc/copyright" <<'EOF'
"""DEP-5 copyright: the project, then every distribution bundled in the venv with its licence."""
import importlib.metadata
import sys
from pathlib import Path

site, prefix = Path(sys.argv[1]), sys.argv[2]
print("""Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: qmp-proxy

Files: *
Copyright: 2026 qmp-proxy maintainers
License: GPL-2+
""")
pyroot = f"{prefix.lstrip('/')}/lib/{site.parent.name}/site-packages"
for dist in sorted(importlib.metadata.distributions(path=[str(site)]), key=lambda d: d.name.lower()):
    if dist.name == "qmp-proxy":
        continue
    meta = dist.metadata
    licence = meta.get("License-Expression") or meta.get("License") or ""
    if not licence or "\n" in licence or len(licence) > 80:  # a whole text, not a name
        classifiers = [c.rsplit(" :: ", 1)[-1] for c in meta.get_all("Classifier") or []
                       if c.startswith("License ::")]
        licence = " or ".join(classifiers) or "see its licence files"
    top = {p.parts[0] for p in dist.files or [] if p.parts and p.parts[0] != ".."}
    print("Files: " + " ".join(f"{pyroot}/{t}/*" for t in sorted(top)))
    print(f"Copyright: the {dist.name} {dist.version} authors; the licence files in"
          f" /{pyroot}/{dist.name.replace('-', '_')}-{dist.version}.dist-info")
    print(f"License: {licence}\n")
print("""License: GPL-2+
 This program is free software; you can redistribute it and/or modify it under the terms of
 the GNU General Public License as published by the Free Software Foundation; either version 2
 of the License, or (at your option) any later version.
 .
 This program is distributed in the hope that it will be useful, but WITHOUT ANY WARRANTY;
 without even the implied warranty of MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.
 .
 On Debian systems, the full text of the GNU General Public License version 2 can be found in
 /usr/share/common-licenses/GPL-2.""")
EOF

install -d "$stage/usr/share/lintian/overrides"
cat >"$stage/usr/share/lintian/overrides/qmp-proxy" <<EOF
# The application runs in its own virtual environment (bookworm has no python3-orjson): its
# console scripts start its python.
qmp-proxy: unusual-interpreter $prefix/bin/python [${prefix#/}/bin/*]
# Library modules with a #! line, not executable: never run as scripts.
qmp-proxy: unusual-interpreter python [${prefix#/}/lib/python$pyver/site-packages/prometheus_client/*]
EOF
find "$stage" -depth -type d -name __pycache__ -exec rm -rf {} +
# The venv's python, as a relative link (/usr/lib/qmp-proxy/bin -> /usr/bin): the same file, and
# a package ships no absolute links between its own top-level directories.
ln -sfn "../../../bin/python$pyver" "$venv/bin/python$pyver"

# --- control files ---------------------------------------------------------------------------
for script in postinst prerm postrm; do
  install -m 0755 "scripts/deb/$script" "$stage/DEBIAN/$script"
done
printf '%s\n' /etc/qmp-proxy/qmp-proxy.toml /etc/qmp-proxy/qemu.toml >"$stage/DEBIAN/conffiles"
installed_size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<EOF
Package: qmp-proxy
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: python$pyver, python3 (>= 3.11), libc6 (>= 2.17)
Recommends: qemu-system-x86
Suggests: libvirt-daemon-system
Section: admin
Priority: optional
Description: multiplexing QMP proxy for unmodified QEMU
 A daemon between QMP clients (libvirt-style managers, qmp-shell, qemu.qmp
 scripts, socat) and an unmodified QEMU's QMP socket.  Every client sees
 exactly what it would see talking to QEMU, and any number of them can use
 one QEMU at once.  It backports the capabilities argument of migrate and
 migrate-incoming to QEMU versions that lack it.
 .
 Includes systemd units (one daemon with many routes, or one instance per
 VM with socket activation), qmp-proxy-qemu (a libvirt <emulator> wrapper)
 and Prometheus metrics.  The application and its Python dependencies live
 in their own virtual environment under /usr/lib/qmp-proxy.
EOF
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
  xargs -0 md5sum >DEBIAN/md5sums)

# The build's paths must be nowhere in the package (a #! line or .pyc pointing into /tmp).
if leaks=$(grep -rlF -- "$work" "$stage"); then
  echo "build-deb.sh: the staging path is still recorded in:" >&2
  echo "$leaks" >&2
  exit 1
fi
find "$stage" -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
chmod -R u+rwX,go+rX,go-w "$stage"

mkdir -p dist
out="dist/qmp-proxy_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$out" >/dev/null
echo "$repo/$out"
