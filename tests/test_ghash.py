"""proxy.ghash against hand-worked layouts and against real QEMU 7.2 and 10.0.

Which unexpected member QEMU names is decided by GLib's hash-table layout, so the only proof
that the emulation is exact is QEMU's own answer.  One QEMU per version serves the module, and
each differential test sends a few hundred objects with random extra members (ASCII with quotes
and backslashes, control characters, U+0000, Latin, Greek, CJK, astral characters, the empty
string, and keys built to share a hash, including the hashes 0 and 1 that GLib clamps to 2):

- to ``qmp_capabilities`` in negotiation mode, with and without the visited ``enable``; a failed
  negotiation leaves the connection negotiating, so one connection takes every case;
- nested in a ``migrate-set-capabilities`` list element, where ``capability`` and ``state`` are
  visited;
- to ``migrate-set-parameters`` together with many of its real members, which the visitor removes
  one by one in schema order: tables only shrink on removal, so this is what makes QEMU shrink
  them (twice, in some cases).

Objects are written as JSON text by hand so that member order in the text, which is QDict
insertion order, is the one the test intends.  The random generator has a fixed seed.
"""

from __future__ import annotations

import array
import json
import random
from collections.abc import Iterator, Sequence
from typing import Any, Final

import pytest

from proxy.ghash import first_unexpected
from proxy.qjson import qdict_order
from tests.qemu import QEMU_BINARIES, QemuProcess, RawQMP

_UINT32: Final = 0xFFFFFFFF
# Code point ranges random keys draw from, with weights: QEMU's parser accepts all of them.
_POOLS: Final = (
    (0x20, 0x7F),
    (0x01, 0x1F),
    (0xA0, 0x24F),
    (0x391, 0x3C9),
    (0x4E00, 0x9FFF),
    (0x1F300, 0x1F64F),
)
_POOL_WEIGHTS: Final = (60, 3, 12, 5, 8, 5)


def djb(key: str) -> int:
    """g_str_hash, written again here so that the test does not trust the module's own copy."""
    value = 5381
    for signed_char in array.array("b", key.encode().replace(b"\x00", b"\xc0\x80")):
        value = (value * 33 + signed_char) % 2**32
    return value


def key_with_hash(target: int, prefix: str) -> str:
    """``prefix`` and seven printable ASCII characters, hashing to ``target`` under g_str_hash.

    The suffix is the target, less the prefix's contribution, written in base 33 with digits
    32..126; seven such digits span more than 2**32 values, so every target is reachable.
    """
    weights = [33**i for i in range(6, -1, -1)]
    low = 32 * sum(weights)
    need = (target - djb(prefix) * 33**7) & _UINT32
    need += ((low - need + _UINT32) >> 32) << 32  # the least representative >= low
    need -= low
    digits = []
    for weight in weights:
        digit = min(94, need // weight)
        digits.append(32 + digit)
        need -= digit * weight
    assert need == 0
    key = prefix + "".join(map(chr, digits))
    assert djb(key) == target
    return key


# Unit tests: layouts small enough to follow by hand.  An 8-slot table takes its first probe
# modulo 7: g_str_hash("a") = 5381 * 33 + 97 = 177670, and 177670 * 11 % 7 = 5; "b" is 2.


def test_djb_known_values() -> None:
    assert djb("") == 5381
    assert djb("a") == 177670
    assert djb("\xe9") == ((5381 * 33 - 61) * 33 - 87) & _UINT32  # C3 A9 as signed bytes
    assert djb("AA") == djb("B ")  # 65 * 33 + 65 == 66 * 33 + 32


def test_two_keys_in_slot_order() -> None:
    assert first_unexpected(["a", "b"], []) == "b"  # slots 5 and 2
    assert first_unexpected(["b", "a"], []) == "b"
    assert first_unexpected(["a", "b"], ["b"]) == "a"
    assert first_unexpected(["a", "b"], ["a"]) == "b"


def test_qmp_capabilities_example() -> None:
    assert first_unexpected(qdict_order(["a", "b"]), []) == "b"


def test_nothing_or_one_left() -> None:
    assert first_unexpected([], []) is None
    assert first_unexpected(["a", "b"], ["b", "a"]) is None
    assert first_unexpected(["only"], []) == "only"
    assert first_unexpected(["a", "b", "c"], ["c", "a"]) == "b"


def test_visited_but_absent_is_ignored() -> None:
    assert first_unexpected(["a", "b"], ["enable", "zzz"]) == "b"


def test_equal_hash_goes_to_the_next_probe() -> None:
    # Same home slot; the later key probes one slot further on (no wrap from a slot below 7).
    assert first_unexpected(["AA", "B "], []) == "AA"
    assert first_unexpected(["B ", "AA"], []) == "B "
    assert first_unexpected(["AA", "B "], ["AA"]) == "B "


def test_hashes_below_two_are_clamped() -> None:
    # Hashes 0, 1 and 2 all become 2 (0 and 1 mark unused slots and tombstones): home 22 % 7 = 1,
    # then probes 2 and 4, so the slots follow insertion order.
    zero, one, two = (key_with_hash(h, "k") for h in (0, 1, 2))
    assert first_unexpected([one, zero, two], []) == one
    assert first_unexpected([two, one, zero], []) == two
    # Removing the key in slot 1 leaves a tombstone the next removal must probe past.
    assert first_unexpected([zero, one, two], [zero, one]) == two
    assert first_unexpected([zero, one, two], [zero, two]) == one


def test_c_string_bytes() -> None:
    # "\xe9" is C3 A9: signed, it hashes to 5857809, home 3, after "b" (home 2); read unsigned
    # it would hash to 5866513, home 1, and come first.
    assert djb("\xe9") == 5857809 and 5857809 * 11 % 7 == 3
    assert first_unexpected(["b", "\xe9"], []) == "b"
    # U+0000 is C0 80, not the end of the string: hash 5857669, home 3, so after "b" (home 2)
    # and before "f" (home 4).  As a 00 byte it would hash to 177573, home 2, and take slot 2
    # when inserted before "b"; as an empty C string, to 5381, home 6, after "f".
    assert djb("\x00") == 5857669
    assert first_unexpected(["\x00", "b"], []) == "b"
    assert first_unexpected(["f", "\x00"], []) == "\x00"


def test_large_tables_keep_every_key() -> None:
    rng = random.Random(7)
    keys = [f"key{i}" for i in range(3000)]
    for _ in range(20):
        visited = rng.sample(keys, rng.randrange(len(keys)))
        left = set(keys).difference(visited)
        assert first_unexpected(keys, visited) in left
    assert first_unexpected(keys, keys) is None


# Differential tests against QEMU.


def random_key(rng: random.Random) -> str:
    if rng.random() < 0.03:
        return ""
    length = rng.choice((1, 1, 2, 3, 4, 5, 6, 8, 12, 24))
    chars = []
    for _ in range(length):
        low, high = rng.choices(_POOLS, _POOL_WEIGHTS)[0]
        chars.append(chr(rng.randint(low, high)))
    if rng.random() < 0.02:
        chars.insert(rng.randrange(len(chars) + 1), "\x00")
    return "".join(chars)


def random_keys(rng: random.Random, count: int, reserved: Sequence[str]) -> list[str]:
    """``count`` distinct keys not in ``reserved``; some share a hash with another, or clamp."""
    keys: list[str] = []
    seen = set(reserved)
    while len(keys) < count:
        roll = rng.random()
        if roll < 0.04:
            key = key_with_hash(rng.randrange(3), random_key(rng))
        elif roll < 0.10 and keys:
            key = key_with_hash(djb(rng.choice(keys)), random_key(rng))
        else:
            key = random_key(rng)
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return keys


def key_count(rng: random.Random) -> int:
    return rng.randint(1, 12) if rng.random() < 0.5 else rng.randint(1, 40)


def json_object(members: Sequence[tuple[str, str]], ascii_only: bool) -> str:
    """An object whose members appear in the text exactly in the given order."""
    return "{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{v}" for k, v in members) + "}"


def unexpected_key(reply: Any, prefix: str = "") -> str:
    assert isinstance(reply, dict) and "error" in reply, reply
    desc = reply["error"]["desc"]
    head, tail = f"Parameter '{prefix}", "' is unexpected"
    assert isinstance(desc, str) and desc.startswith(head) and desc.endswith(tail), desc
    return desc[len(head) : -len(tail)]


def ask(qmp: RawQMP, command: str, arguments: str) -> Any:
    """QEMU's reply to ``command`` with the arguments object given as JSON text."""
    qmp.send(f'{{"execute":"{command}","arguments":{arguments}}}'.encode())
    while True:
        reply = qmp.recv_message()
        if isinstance(reply, dict) and ("return" in reply or "error" in reply):
            return reply


def check(results: list[tuple[str, str, str]]) -> None:
    """All cases at once, so a failure shows how many disagree, not just the first."""
    wrong = [(text[:300], want, got) for text, want, got in results if want != got]
    assert not wrong, f"{len(wrong)}/{len(results)} differ (text, emulated, QEMU): {wrong[:5]}"


@pytest.fixture(scope="module", params=sorted(QEMU_BINARIES))
def qemu_vm(request: pytest.FixtureRequest) -> Iterator[QemuProcess]:
    with QemuProcess(request.param, "-M", "none") as qemu:
        yield qemu


def test_qmp_capabilities_vs_qemu(qemu_vm: QemuProcess) -> None:
    rng = random.Random(20240611)
    counts = [key_count(rng) for _ in range(300)] + [150, 400, 1000]
    results = []
    with RawQMP(qemu_vm.sock_path) as qmp:
        qmp.recv_message()  # greeting
        for count in counts:
            keys = random_keys(rng, count, ["enable"])
            members = [(key, str(rng.randrange(3))) for key in keys]
            visited = []
            if rng.random() < 0.5:
                members.insert(rng.randint(0, len(members)), ("enable", "[]"))
                visited.append("enable")
            text = json_object(members, rng.random() < 0.5)
            reply = ask(qmp, "qmp_capabilities", text)
            want = first_unexpected(qdict_order(k for k, _ in members), visited)
            assert want is not None
            results.append((text, want, unexpected_key(reply)))
        # Still negotiating: no case succeeded by accident.
        assert "CommandNotFound" in str(ask(qmp, "query-status", "{}"))
    check(results)


def test_nested_struct_vs_qemu(qemu_vm: QemuProcess) -> None:
    rng = random.Random(1971)
    results = []
    valid = '{"capability":"events","state":false}'
    with RawQMP(qemu_vm.sock_path) as qmp:
        qmp.negotiate()
        for _ in range(120):
            members = [("capability", '"events"'), ("state", "false")]
            extra = random_keys(rng, key_count(rng), ["capability", "state"])
            members += [(key, "0") for key in extra]
            rng.shuffle(members)
            before = rng.randrange(3)
            text = json_object(members, rng.random() < 0.5)
            elements = ",".join([valid] * before + [text])
            reply = ask(qmp, "migrate-set-capabilities", f'{{"capabilities":[{elements}]}}')
            want = first_unexpected(qdict_order(k for k, _ in members), ["capability", "state"])
            assert want is not None
            results.append((text, want, unexpected_key(reply, f"capabilities[{before}].")))
    check(results)


def test_many_removals_vs_qemu(qemu_vm: QemuProcess) -> None:
    """Real members are visited in the schema's order and removed: tables shrink, some twice."""
    rng = random.Random(86)
    values = {"int": "1", "bool": "false"}
    results = []
    with RawQMP(qemu_vm.sock_path) as qmp:
        qmp.negotiate()
        schema = qmp.command({"execute": "query-qmp-schema"})["return"]
        by_name = {entity["name"]: entity for entity in schema}
        arg_type = by_name["migrate-set-parameters"]["arg-type"]
        params = [m for m in by_name[arg_type]["members"] if m["type"] in values]
        names = [m["name"] for m in params]
        assert len(names) >= 20
        for _ in range(150):
            chosen = rng.sample(params, rng.randint(len(params) // 2, len(params)))
            members = [(m["name"], values[m["type"]]) for m in chosen]
            members += [(key, "0") for key in random_keys(rng, rng.randint(1, 12), names)]
            rng.shuffle(members)
            text = json_object(members, rng.random() < 0.5)
            reply = ask(qmp, "migrate-set-parameters", text)
            present = {k for k, _ in members}
            visited = [name for name in names if name in present]
            want = first_unexpected(qdict_order(k for k, _ in members), visited)
            assert want is not None
            results.append((text, want, unexpected_key(reply)))
    check(results)
