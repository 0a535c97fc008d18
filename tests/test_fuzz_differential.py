"""The differential fuzz target (``tests/fuzz_differential.py``) in CI, and the attack it exists
to catch.

The short runs use fixed seeds, so CI replays the same cases every time; a finding prints the
case as JSON and ``python -m tests.fuzz_differential --replay FILE`` runs it again.  Longer
runs with fresh seeds: ``python -m tests.fuzz_differential --seconds 600``.
"""

from __future__ import annotations

import random

import pytest

from tests import fuzz_differential
from tests.conftest import VERSIONS
from tests.fuzz_differential import Case, Harness, Totals

pytestmark = pytest.mark.qemu  # every test here starts a real QEMU

# QEMU's lexer ends a lone 0 before an exponent; "E" then starts no token, a lexical error
# that resets QEMU's parser, and the rest is new input: QEMU runs the "stop" hidden in what
# looks like one query-status.  A proxy that framed this as one query-status (and forwarded
# the client's bytes) let a read-only socket stop the VM.
ATTACK = b'{"execute":"query-status","arguments":{"a":0E5,"b":{"execute":"stop"}}}'


@pytest.mark.parametrize("version", VERSIONS)
def test_fuzz_for_a_few_seconds(version: str) -> None:
    """Eight seconds of generated cases per version, every oracle, no finding."""
    totals = Totals()
    lines: list[str] = []
    fuzz_differential.fuzz_version(
        version, 8.0, random.Random(f"ci-{version}"), totals, log=lines.append
    )
    assert totals.findings == 0, "\n".join(lines)
    assert totals.cases >= 20, (totals, lines)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_0e5_smuggling_attack_passes_both_oracles(version: str) -> None:
    """The attack through the harness: QEMU reached directly really runs the hidden stop, the
    proxy's unrestricted listener does exactly the same to its QEMU, and the restricted
    listener (``query-*`` only) refuses the stop: QEMU behind it receives only query-*
    commands, emits no event and stays running.  Run on the pre-hardening proxy, the harness
    reports this case as a finding."""
    case = Case(
        stream=ATTACK,
        negotiate=b'{"execute":"qmp_capabilities"}',
        reset=b"\xff",
        pause=0.2,  # the attack arrives alone, not in one read with what follows it
        state="running",
        restricted_state="running",
    )
    with Harness(version) as harness:
        result = harness.check(case)
    assert not result.qemu_a_died
    assert result.problems == [], "\n".join(result.problems)
    assert result.direct == result.proxied
    # The attack is real: QEMU parsed a top-level stop out of it and stopped.
    assert b"JSON parse error, stray 'E'" in b"\n".join(result.direct)
    assert any(b'"event": "STOP"' in line for line in result.direct), result.direct
    # ... and the restricted listener refused it.
    disabled = b"The command stop has been disabled for this socket"
    assert any(disabled in line for line in result.restricted), result.restricted
