"""qmp-proxy's benchmarks, a package run from the repository root.

    .venv/bin/python bench/run.py [--quick] [--only latency,cpu,throughput,fanout,memory,migrate]
    .venv/bin/python -m bench.run [...]             (the same; bench/run.py re-executes as this)

Layout: ``run`` is the entry point (options, the order of the benchmarks, the summary);
``harness`` holds what they share (processes, clients, measurements, tables, the report); one
module per benchmark, each with a ``measure(env, qemu, plan, report)``: ``latency``, ``cpu``,
``throughput``, ``fanout``, ``memory``, ``migrate``.  ``relay.py`` and ``fakeqemu.py`` are
stand-alone programs the benchmarks start as processes (they import nothing from here);
``instructions.py`` and ``hotspots.py`` are tools for working on the hot path.

Why a package rather than a launcher of its own: the benchmarks start real QEMU exactly as the
tests do, through ``tests.qemu.QemuProcess`` (which binary is which version, TCG, no default
devices, ``-S``, a private socket directory, stderr kept, the process always killed and reaped).
A second copy of that in bench/ would drift from the one the tests keep correct.  As a package
run from the repository root, ``from tests.qemu import QemuProcess`` is an ordinary import of
the ``tests`` package, and so is ``from bench.harness import ...``: nothing edits ``sys.path``.
Run as a file, ``python bench/run.py`` (and the two tools) cannot import the package, whose
parent directory is not on the path, so they re-execute themselves as ``python -m bench.NAME``
from the repository root with the same arguments.
"""
