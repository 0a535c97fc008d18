"""What differs between QEMU versions and is not in the schema: the wording of some errors.

The proxy follows what QEMU announces.  Arguments, commands and capabilities come from
``query-qmp-schema`` (:mod:`proxy.schema`); only what the schema cannot show is keyed on the
greeting's version, and all of it lives here, so a reader finds every version-dependent
behaviour in one file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Dialect:
    version: tuple[int, int, int] = (99, 0, 0)

    def enum_error(self, member: str | None, value: str) -> str:
        """The input visitor's error for a value its enum lacks (qapi/qapi-visit-core.c).

        QEMU 6.0 names the member (``null`` for a list element, which has no name); before
        that it named only the value.
        """
        if self.version < (6, 0, 0):
            return f"Invalid parameter '{value}'"
        return f"Parameter '{member or 'null'}' does not accept value '{value}'"


LATEST = Dialect()
