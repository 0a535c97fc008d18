"""GLib's GHashTable, as far as QEMU's input visitor lets its iteration order show.

When a QMP object has members the command does not take, QEMU names only one of them:
qapi/qobject-input-visitor.c copies the object's keys, in QDict iteration order, into a
``g_hash_table_new(g_str_hash, g_str_equal)``, removes each member it visits, and then reports
``Parameter '%s' is unexpected`` for the first key ``g_hash_table_iter_next`` yields.  Which key
that is depends on GLib's open-addressing layout: the djb string hash, the prime-modulus bucket,
quadratic probing over tombstones and the in-place relocation done by every resize.  To give the
same error text as QEMU the proxy replays that layout here, following glib/ghash.c, whose
algorithm is the same from GLib 2.66 to 2.84.

Pure functions only; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

_UINT32: Final = 0xFFFFFFFF
_MIN_SHIFT: Final = 3  # the smallest table has 8 slots
_UNUSED: Final = 0
_TOMBSTONE: Final = 1  # hash values below 2 mark slots; real hashes are clamped to at least 2

# The largest prime below each power of two, indexed by shift: the first probe is taken modulo
# this prime (the hash is often poor), the following ones modulo the power of two.
_PRIME_MOD: Final = (
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749,
    65521, 131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393,
    67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647,
)  # fmt: skip


def first_unexpected(keys: Sequence[str], visited: Iterable[str]) -> str | None:
    """The key QEMU's visitor names in "Parameter '%s' is unexpected": keys are the object's
    members in QDict iteration order, visited those the visitor consumed (removed from the table in
    the given order).
    """
    consumed = list(visited)
    left = set(keys).difference(consumed)
    if len(left) < 2:
        # With at most one real entry left, the layout cannot matter.
        return next(iter(left), None)
    table = _Table()
    for key in keys:
        table.insert(key)
    for key in consumed:
        table.remove(key)
    return table.first()


def _str_hash(key: str) -> int:
    """g_str_hash over QEMU's C string for ``key``: djb's ``h * 33 + c`` with *signed* bytes."""
    value = 5381
    for byte in _c_string(key):
        value = (value * 33 + (byte - 256 if byte >= 0x80 else byte)) & _UINT32
    return value


def _c_string(text: str) -> bytes:
    """The bytes QEMU holds for a key: UTF-8, with U+0000 as C0 80 so the C string goes on.

    Lone surrogates never get past QEMU's JSON parser; they are passed through only so that this
    function is total.
    """
    return text.encode("utf-8", "surrogatepass").replace(b"\x00", b"\xc0\x80")


class _Table:
    """A GHashTable used as QEMU uses it: keys only, no destroy functions, no lookups by users.

    Slots hold a hash (0 unused, 1 tombstone, otherwise the key's hash) and a key; the size is
    always a power of two, and iteration walks the slots in ascending order.
    """

    __slots__ = ("hashes", "keys", "mask", "mod", "nnodes", "noccupied", "size")

    def __init__(self) -> None:
        self.size = 0
        self.mod = 1
        self.mask = 0
        self._set_shift(_MIN_SHIFT)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0  # real entries plus tombstones

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _home(self, hash_value: int) -> int:
        # ``hash * 11`` wraps in 32 bits before the modulo.
        return ((hash_value * 11) & _UINT32) % self.mod

    def _lookup(self, key: str, hash_value: int) -> int:
        """The slot holding ``key``, else the first tombstone on its probe path, else the unused
        slot that ends the path (there always is one: the table grows before it fills)."""
        hashes = self.hashes
        index = self._home(hash_value)
        step = 0
        tombstone = -1
        while (slot_hash := hashes[index]) != _UNUSED:
            if slot_hash == hash_value:
                if self.keys[index] == key:
                    return index
            elif slot_hash == _TOMBSTONE and tombstone < 0:
                tombstone = index
            step += 1
            index = (index + step) & self.mask
        return tombstone if tombstone >= 0 else index

    def insert(self, key: str) -> None:
        hash_value = max(_str_hash(key), 2)
        index = self._lookup(key, hash_value)
        old_hash = self.hashes[index]
        if old_hash >= 2:
            return  # already present: GLib keeps the slot (and the old key)
        self.hashes[index] = hash_value
        self.keys[index] = key
        self.nnodes += 1
        if old_hash == _UNUSED:  # a reused tombstone neither counts nor triggers a resize
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        index = self._lookup(key, max(_str_hash(key), 2))
        if self.hashes[index] < 2:
            return  # absent: GLib neither changes nor resizes the table
        self.hashes[index] = _TOMBSTONE
        self.keys[index] = None
        self.nnodes -= 1
        self._maybe_resize()

    def first(self) -> str | None:
        for index, slot_hash in enumerate(self.hashes):
            if slot_hash >= 2:
                return self.keys[index]
        return None

    def _maybe_resize(self) -> None:
        size = self.size
        too_sparse = size > self.nnodes * 4 and size > 1 << _MIN_SHIFT
        too_full = size <= self.noccupied + self.noccupied // 16
        if too_sparse or too_full:
            self._resize()

    def _resize(self) -> None:
        """Rebuild at the size for the current count, moving entries within the same arrays.

        The new layout is not that of a fresh table fed the same keys: each entry still in an
        old slot is taken out, in ascending slot order, and put at the first free slot of its
        new probe path, where "free" means not yet claimed during this resize; an unclaimed
        entry found there is evicted and placed the same way in turn.
        """
        old_size = self.size
        # C multiplies in double precision and truncates towards zero when passing an int.
        self._set_shift(max(int(self.nnodes * 1.333).bit_length(), _MIN_SHIFT))
        hashes, keys, mask = self.hashes, self.keys, self.mask
        if self.size > old_size:
            hashes.extend([_UNUSED] * (self.size - old_size))
            keys.extend([None] * (self.size - old_size))
        claimed = bytearray(max(self.size, old_size))
        for i in range(old_size):
            node_hash = hashes[i]
            if node_hash < 2:
                hashes[i] = _UNUSED  # tombstones go
                continue
            if claimed[i]:
                continue  # put here by an eviction chain during this resize
            hashes[i] = _UNUSED
            node_key, keys[i] = keys[i], None
            while True:
                index = self._home(node_hash)
                step = 0
                while claimed[index]:
                    step += 1
                    index = (index + step) & mask
                claimed[index] = 1
                evicted_hash = hashes[index]
                hashes[index] = node_hash
                if evicted_hash < 2:
                    keys[index] = node_key
                    break
                node_hash = evicted_hash
                node_key, keys[index] = keys[index], node_key
        if self.size < old_size:
            del hashes[self.size :]
            del keys[self.size :]
        self.noccupied = self.nnodes


__all__ = ["first_unexpected"]
