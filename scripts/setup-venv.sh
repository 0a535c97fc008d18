#!/usr/bin/env bash
# Create ./.venv with qmp-proxy installed (editable), plus the test tools with "test".
# Python packages come by name from the package index pip is configured with.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}
py=${PYTHON:-python3}
if ! "$py" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "qmp-proxy needs Python >= 3.11 ($py is older or missing)" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$py" -m venv .venv 2>/dev/null; then
    # Debian ships venv separately.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    "$py" -m venv .venv
  fi
fi
target=.
[ "$extra" = test ] && target='.[test]'
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$target"
