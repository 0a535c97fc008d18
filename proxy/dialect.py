"""What differs between QEMU versions and is not in the schema: the wording of some errors.

The proxy follows what QEMU announces.  Arguments, commands and capabilities come from
``query-qmp-schema`` (:mod:`proxy.schema`); only what the schema cannot show is keyed on the
greeting's version, and all of it lives here, so a reader finds every version-dependent
behaviour in one file.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.framing import Rules


@dataclass(frozen=True, slots=True)
class Dialect:
    """The behaviour of QEMU ``version`` (by default 10.0's, until a greeting tells)."""

    version: tuple[int, int, int] = (10, 0, 0)

    @property
    def before_6_0(self) -> bool:
        """QEMU before 6.0 wrote doubles with ``%f`` (see :func:`proxy.qjson.dumps`)."""
        return self.version < (6, 0, 0)

    @property
    def json_rules(self) -> Rules:
        """QEMU 11.1 parses JSON token by token and locates its errors (``1:12: ...``); 10.0
        and older parse whole messages.  10.1 to 11.0 could not be checked (no Debian build);
        they are taken to be like 10.0."""
        return Rules.PUSH if self.version >= (11, 1, 0) else Rules.BATCH

    def enum_error(self, member: str | None, value: str) -> str:
        """The input visitor's error for a value its enum lacks (qapi/qapi-visit-core.c).

        QEMU 6.0 names the member (``null`` for a list element, which has no name); before
        that it named only the value.
        """
        if self.version < (6, 0, 0):
            return f"Invalid parameter '{value}'"
        return f"Parameter '{member or 'null'}' does not accept value '{value}'"


DEFAULT = Dialect()
