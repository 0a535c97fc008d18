"""qmp-proxy: many QMP clients over one unmodified QEMU monitor, with ``capabilities`` on
``migrate``/``migrate-incoming`` backported.  See docs/design.md."""

import importlib.metadata

# One place for the version: the installed package's metadata (pyproject.toml).
try:
    VERSION = importlib.metadata.version("qmp-proxy")
except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
    VERSION = "unknown"
