"""What differs between QEMU versions and is not in the schema: the wording of some errors.

The proxy follows what QEMU announces.  Arguments, commands and capabilities come from
``query-qmp-schema`` (:mod:`proxy.schema`); only what the schema cannot show is keyed on the
greeting's version, and all of it lives here, so a reader finds every version-dependent
behaviour in one file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.framing import Rules


@dataclass(frozen=True, slots=True)
class Dialect:
    """The behaviour of QEMU ``version`` (by default 10.0's, until a greeting tells).

    ``before_6_0``: QEMU before 6.0 wrote doubles with ``%f`` (see :func:`proxy.qjson.dumps`).
    ``json_rules``: QEMU 11.1 parses JSON token by token and locates its errors (``1:12: ...``);
    10.0 and older parse whole messages.  10.1 to 11.0 could not be checked (no Debian build);
    they are taken to be like 10.0.  Both are worked out once: they are read per message.
    """

    version: tuple[int, int, int] = (10, 0, 0)
    before_6_0: bool = field(init=False)
    json_rules: Rules = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "before_6_0", self.version < (6, 0, 0))
        rules = Rules.PUSH if self.version >= (11, 1, 0) else Rules.BATCH
        object.__setattr__(self, "json_rules", rules)

    def enum_error(self, member: str | None, value: str) -> str:
        """The input visitor's error for a value its enum lacks (qapi/qapi-visit-core.c).

        QEMU 6.0 names the member (``null`` for a list element, which has no name); before
        that it named only the value.
        """
        if self.version < (6, 0, 0):
            return f"Invalid parameter '{value}'"
        return f"Parameter '{member or 'null'}' does not accept value '{value}'"


DEFAULT = Dialect()
