"""The backport's plan without a QEMU: ``proxy.backport.split`` and ``proxy.schema``.

``split`` is a generator: it yields :class:`~proxy.backport.Call` steps, is sent QEMU's reply
to each, and returns an :class:`~proxy.backport.Outcome`.  The schemas below are small
hand-written copies of what ``query-qmp-schema`` returns on QEMU 7.2 and 10.0 (same shapes,
same masked numeric type names), so every path of the plan runs here in microseconds, with
QEMU's exact error strings (docs/protocol.md, 'Arguments: the QObject input visitor' and
'Migration capabilities').
"""

from __future__ import annotations

import copy
import json
from collections.abc import Generator
from typing import Any

import pytest

from proxy import qjson, schema
from proxy.backport import (
    PROBE_URI,
    SPLIT_RUNS,
    Call,
    Outcome,
    Record,
    never_started,
    split,
)
from proxy.policy import Policy
from proxy.schema import Schema

Reply = dict[str, Any]
OK: Reply = {"return": {}}


def _error(desc: str) -> Reply:
    return {"error": {"class": "GenericError", "desc": desc}}


def _opt(name: str, type_: str) -> dict[str, Any]:
    return {"name": name, "default": None, "type": type_}


def _req(name: str, type_: str) -> dict[str, Any]:
    return {"name": name, "type": type_}


def _command(name: str, arg_type: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ret-type": "0", "meta-type": "command", "arg-type": arg_type, **extra}


def _object(name: str, *members: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "members": list(members), "meta-type": "object"}


def _common(set_caps_arg: str, status_type: str, enum_type: str) -> list[dict[str, Any]]:
    return [
        _command("migrate-set-capabilities", set_caps_arg),
        _object(set_caps_arg, _req("capabilities", f"[{status_type}]")),
        {"name": f"[{status_type}]", "element-type": status_type, "meta-type": "array"},
        _object(status_type, _req("capability", enum_type), _req("state", "bool")),
        {
            "name": enum_type,
            "meta-type": "enum",
            "values": ["xbzrle", "rdma-pin-all", "auto-converge", "events"],
        },
        _command("query-migrate-capabilities", "0", **{"ret-type": f"[{status_type}]"}),
        _command("query-migrate", "0"),
        _command("query-status", "0"),
        _command("query-yank", "0"),
        _command("migrate-pause", "0", **{"allow-oob": True}),
        _command("migrate-recover", "160", **{"allow-oob": True}),
        _object("160", _req("uri", "str")),
        _object("0"),
        {"name": "MIGRATION", "meta-type": "event", "arg-type": "146"},
        {"name": "STOP", "meta-type": "event", "arg-type": "0"},
        {"name": "str", "meta-type": "builtin", "json-type": "string"},
        {"name": "bool", "meta-type": "builtin", "json-type": "boolean"},
    ]


def schema_72() -> list[dict[str, Any]]:
    """QEMU 7.2: migrate has a required uri and no channels; migrate-incoming only uri."""
    return [
        _command("migrate", "150"),
        _object(
            "150",
            _req("uri", "str"),
            _opt("blk", "bool"),
            _opt("inc", "bool"),
            _opt("detach", "bool"),
            _opt("resume", "bool"),
        ),
        _command("migrate-incoming", "151"),
        _object("151", _req("uri", "str")),
        *_common("141", "142", "407"),
    ]


def schema_100() -> list[dict[str, Any]]:
    """QEMU 10.0: uri and channels both optional (exactly one needed), exit-on-error."""
    return [
        _command("migrate", "155"),
        _object(
            "155",
            _opt("uri", "str"),
            _opt("channels", "[443]"),
            _opt("detach", "bool"),
            _opt("resume", "bool"),
        ),
        _command("migrate-incoming", "156"),
        _object(
            "156", _opt("uri", "str"), _opt("channels", "[443]"), _opt("exit-on-error", "bool")
        ),
        {"name": "[443]", "element-type": "443", "meta-type": "array"},
        *_common("147", "148", "436"),
    ]


def schema_patched() -> list[dict[str, Any]]:
    """A QEMU with the proposed patch: both commands already take ``capabilities``."""
    entries = schema_100()
    for entry in entries:
        if entry["name"] in ("155", "156"):
            entry["members"].append(_opt("capabilities", "[148]"))
    return entries


def schema_52() -> list[dict[str, Any]]:
    """QEMU 5.2: 7.2's migrate commands, and no yank (it came in 6.0)."""
    return [e for e in schema_72() if e["name"] != "query-yank"]


S52 = schema.parse(schema_52())
S72 = schema.parse(schema_72())
S100 = schema.parse(schema_100())
BOTH = pytest.mark.parametrize("probed", [S72, S100], ids=["7.2", "10.0"])

CHANNELS = [{"channel-type": "main", "addr": {"transport": "file", "filename": "/x", "offset": 0}}]
CAPS = [{"capability": "xbzrle", "state": True}, {"capability": "events", "state": True}]
# query-migrate-capabilities' reply: the full list, state first, in enum order.
BEFORE: Reply = {
    "return": [
        {"state": False, "capability": "xbzrle"},
        {"state": False, "capability": "rdma-pin-all"},
        {"state": True, "capability": "auto-converge"},
        {"state": False, "capability": "events"},
    ]
}


class Driver:
    """Runs a plan step by step, recording every call and answering with the given replies."""

    def __init__(
        self, command: str, arguments: dict[str, Any], probed: Schema, journal: bool = False
    ) -> None:
        self.command = command
        self.plan: Generator[Call | Record, Reply, Outcome] = split(
            command, arguments, probed, journal=journal
        )
        self.calls: list[Call] = []
        self.outcome: Outcome | None = None
        self._pending: Call | None = None
        self._advance(None)

    def _advance(self, reply: Reply | None) -> None:
        try:
            step = next(self.plan) if reply is None else self.plan.send(reply)
        except StopIteration as done:
            self.outcome = done.value
            self._pending = None
            return
        if isinstance(step, Record):
            step = self.plan.send({})
        assert isinstance(step, Call), step
        # What a listener's policy is asked about must be all the plan ever runs.
        assert step.command == self.command or step.command in SPLIT_RUNS[self.command], step
        self.calls.append(step)
        self._pending = step

    @property
    def step(self) -> Call | None:
        """The step waiting for QEMU's reply (None once the plan has returned)."""
        return self._pending

    def reply(self, reply: Reply) -> Driver:
        assert self._pending is not None, f"plan already returned {self.outcome}"
        self._advance(reply)
        return self

    @property
    def names(self) -> list[str]:
        return [c.command for c in self.calls]


def run(
    command: str, arguments: dict[str, Any], probed: Schema, replies: dict[str, list[Reply]]
) -> Driver:
    """Drive a plan to its end, answering each command from a per-command queue of replies."""
    queues = {k: list(v) for k, v in replies.items()}
    driver = Driver(command, arguments, probed)
    while driver.step is not None:
        name = driver.step.command
        assert queues.get(name), f"unexpected step {driver.step} after {driver.names}"
        driver.reply(queues[name].pop(0))
    return driver


def migrate_args(caps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"uri": "exec:cat >/dev/null", "capabilities": CAPS if caps is None else caps}


INCOMING_READY: dict[str, list[Reply]] = {
    "query-status": [{"return": {"status": "inmigrate", "running": False}}],
    "query-migrate": [{"return": {}}],
    "query-yank": [{"return": []}],
}


def stripped(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k != "capabilities"}


def assert_precheck(driver: Driver, command: str, args: dict[str, Any], reply: Reply) -> None:
    """QEMU is sure to refuse: the command goes to QEMU without capabilities, QEMU's reply is
    the answer, and no capability was read or written."""
    assert driver.outcome == Outcome("precheck_error", reply), driver.outcome
    assert driver.calls[-1] == Call(command, stripped(args)), driver.calls
    assert "migrate-set-capabilities" not in driver.names, driver.names
    assert "query-migrate-capabilities" not in driver.names, driver.names


def refused(command: str, desc: str, **extra: list[Reply]) -> dict[str, list[Reply]]:
    return {**extra, command: [_error(desc)]}


# -- pre-checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["migrate", "migrate-incoming"])
def test_missing_uri_on_72_goes_to_qemu_without_capabilities(command: str) -> None:
    args = {"capabilities": CAPS}
    driver = run(command, args, S72, refused(command, "Parameter 'uri' is missing"))
    assert_precheck(driver, command, args, _error("Parameter 'uri' is missing"))
    assert driver.names == [command]


@BOTH
@pytest.mark.parametrize("command", ["migrate", "migrate-incoming"])
def test_unexpected_member(probed: Schema, command: str) -> None:
    args = {"uri": "exec:cat >/dev/null", "bogus-arg": 1, "capabilities": CAPS}
    desc = "Parameter 'bogus-arg' is unexpected"
    driver = run(command, args, probed, refused(command, desc))
    assert_precheck(driver, command, args, _error(desc))
    assert driver.names == [command]


@BOTH
@pytest.mark.parametrize(
    ("member", "value"), [("uri", 123), ("uri", None), ("detach", "yes"), ("resume", 1)]
)
def test_wrongly_typed_member(probed: Schema, member: str, value: object) -> None:
    args = {"uri": "exec:x", member: value, "capabilities": CAPS}
    desc = f"Invalid parameter type for '{member}'"
    driver = run("migrate", args, probed, refused("migrate", desc))
    assert_precheck(driver, "migrate", args, _error(desc))


def test_channels_is_unexpected_on_72() -> None:
    args = {"uri": "exec:x", "channels": CHANNELS, "capabilities": CAPS}
    desc = "Parameter 'channels' is unexpected"
    driver = run("migrate", args, S72, refused("migrate", desc))
    assert_precheck(driver, "migrate", args, _error(desc))


@pytest.mark.parametrize(
    "args",
    [
        {"uri": "exec:x", "channels": CHANNELS},
        {},
        {"channels": []},
        {"detach": True},
    ],
    ids=["both", "neither", "empty-channels", "neither-with-detach"],
)
def test_migrate_uri_xor_channels_on_100(args: dict[str, Any]) -> None:
    args = {**args, "capabilities": CAPS}
    desc = "need either 'uri' or 'channels' argument"
    driver = run("migrate", args, S100, refused("migrate", desc))
    assert_precheck(driver, "migrate", args, _error(desc))
    assert driver.names == ["migrate"]


@pytest.mark.parametrize(
    "args", [{"uri": "exec:x"}, {"channels": CHANNELS}, {"uri": "exec:x", "channels": []}]
)
def test_migrate_exactly_one_of_uri_and_channels_passes_on_100(args: dict[str, Any]) -> None:
    # An empty channels list counts as absent, so uri + [] is accepted, as QEMU accepts it.
    driver = run(
        "migrate",
        {**args, "capabilities": CAPS},
        S100,
        {"query-migrate-capabilities": [BEFORE], "migrate-set-capabilities": [OK], "migrate": [OK]},
    )
    assert driver.outcome == Outcome("ok", OK)
    assert driver.calls[-1] == Call("migrate", args)


@pytest.mark.parametrize(
    "args",
    [{"uri": "exec:x", "channels": CHANNELS}, {}, {"channels": []}],
    ids=["both", "neither", "empty-channels"],
)
def test_migrate_incoming_uri_xor_channels_on_100(args: dict[str, Any]) -> None:
    args = {**args, "capabilities": CAPS}
    desc = "need either 'uri' or 'channels' argument"
    driver = run(
        "migrate-incoming", args, S100, refused("migrate-incoming", desc, **INCOMING_READY)
    )
    assert_precheck(driver, "migrate-incoming", args, _error(desc))
    # QEMU refuses it whatever the incoming state: it goes straight to QEMU, which picks the
    # fault it meets first ("-incoming" and "once" come before uri/channels there).
    assert driver.names == ["migrate-incoming"]


@BOTH
@pytest.mark.parametrize("status", ["setup", "active", "completed", "failed"])
def test_migrate_incoming_already_started(probed: Schema, status: str) -> None:
    args = {"uri": "tcp:127.0.0.1:0", "capabilities": CAPS}
    desc = "The incoming migration has already been started"
    replies = refused(
        "migrate-incoming",
        desc,
        **{
            "query-status": INCOMING_READY["query-status"],
            "query-migrate": [{"return": {"status": status}}],
        },
    )
    driver = run("migrate-incoming", args, probed, replies)
    assert_precheck(driver, "migrate-incoming", args, _error(desc))


def test_migrate_incoming_already_started_without_status_is_seen_by_yank() -> None:
    """QEMU 7.2 shows no status while an incoming migration waits: its yank instance tells."""
    args = {"uri": "exec:cat /tmp/x", "capabilities": CAPS}
    desc = "The incoming migration has already been started"
    replies = refused(
        "migrate-incoming",
        desc,
        **{**INCOMING_READY, "query-yank": [{"return": [{"type": "migration"}]}]},
    )
    driver = run("migrate-incoming", args, S72, replies)
    assert_precheck(driver, "migrate-incoming", args, _error(desc))
    assert driver.names == ["query-status", "query-migrate", "query-yank", "migrate-incoming"]


def test_migrate_incoming_with_idle_yank_list_is_split() -> None:
    args = {"uri": "exec:cat /tmp/x", "capabilities": CAPS}
    driver = run(
        "migrate-incoming",
        args,
        S72,
        {
            **INCOMING_READY,
            "query-yank": [{"return": [{"type": "chardev", "id": "x"}]}],
            "query-migrate-capabilities": [BEFORE],
            "migrate-set-capabilities": [OK],
            "migrate-incoming": [OK],
        },
    )
    assert driver.outcome == Outcome("ok", OK)


@BOTH
@pytest.mark.parametrize("runstate", ["prelaunch", "running", "paused", "postmigrate"])
def test_migrate_incoming_without_dash_incoming(probed: Schema, runstate: str) -> None:
    args = {"uri": "tcp:127.0.0.1:0", "capabilities": CAPS}
    desc = "'-incoming' was not specified on the command line"
    replies = refused(
        "migrate-incoming",
        desc,
        **{"query-status": [{"return": {"status": runstate, "running": False}}]},
    )
    driver = run("migrate-incoming", args, probed, replies)
    assert_precheck(driver, "migrate-incoming", args, _error(desc))
    assert driver.names == ["query-status", "migrate-incoming"]


@BOTH
def test_migrate_does_not_query_incoming_state(probed: Schema) -> None:
    driver = Driver("migrate", migrate_args(), probed)
    assert driver.step == Call("query-migrate-capabilities")


# -- the sequence --------------------------------------------------------------------------


@BOTH
@pytest.mark.parametrize("command", ["migrate", "migrate-incoming"])
def test_success_sets_caps_runs_command_and_restores_nothing(probed: Schema, command: str) -> None:
    args = {"uri": "exec:cat >/dev/null", "capabilities": CAPS}
    replies = {
        "query-migrate-capabilities": [BEFORE],
        "migrate-set-capabilities": [OK],
        command: [OK],
        **(INCOMING_READY if command == "migrate-incoming" else {}),
    }
    driver = run(command, args, probed, replies)
    incoming = [Call("query-status"), Call("query-migrate"), Call("query-yank")]
    prefix = incoming if command == "migrate-incoming" else []
    assert driver.calls == [
        *prefix,
        Call("query-migrate-capabilities"),
        Call("migrate-set-capabilities", {"capabilities": CAPS}),
        Call(command, {"uri": "exec:cat >/dev/null"}),
    ]
    assert driver.outcome == Outcome("ok", OK)
    assert driver.outcome.restore is None


@BOTH
def test_client_list_reaches_qemu_unchanged(probed: Schema) -> None:
    # Duplicates and all: a well-formed list goes to QEMU as written; QEMU judges combinations.
    caps = [
        {"capability": "xbzrle", "state": True},
        {"capability": "xbzrle", "state": False},
        {"state": True, "capability": "events"},
    ]
    args = {"uri": "exec:x", "capabilities": caps}
    snapshot = copy.deepcopy(args)
    driver = Driver("migrate", args, probed).reply(BEFORE)
    assert driver.step == Call("migrate-set-capabilities", {"capabilities": caps})
    assert args == snapshot  # the client's arguments are not modified


@BOTH
def test_other_arguments_are_kept(probed: Schema) -> None:
    args: dict[str, Any] = {"uri": "exec:x", "detach": True, "resume": False, "capabilities": []}
    driver = Driver("migrate", args, probed).reply(BEFORE).reply(OK)
    assert driver.step == Call("migrate", {"uri": "exec:x", "detach": True, "resume": False})


@BOTH
@pytest.mark.parametrize(
    ("caps", "desc"),
    [
        ("xbzrle", "Invalid parameter type for 'capabilities', expected: array"),
        ({"capability": "xbzrle"}, "Invalid parameter type for 'capabilities', expected: array"),
        (None, "Invalid parameter type for 'capabilities', expected: array"),
        (["xbzrle"], "Invalid parameter type for 'capabilities[0]', expected: object"),
        ([{"state": True}], "Parameter 'capabilities[0].capability' is missing"),
        # The attacker's case: a name that is not a string (it used to crash the split).
        (
            [{"capability": ["xbzrle"], "state": True}],
            "Invalid parameter type for 'capabilities[0].capability', expected: string",
        ),
        (
            [{"capability": 7, "state": True}],
            "Invalid parameter type for 'capabilities[0].capability', expected: string",
        ),
        (
            [{"capability": "bogus", "state": True}],
            "Parameter 'capability' does not accept value 'bogus'",
        ),
        ([{"capability": "events"}], "Parameter 'capabilities[0].state' is missing"),
        (
            [{"capability": "events", "state": 1}],
            "Invalid parameter type for 'capabilities[0].state', expected: boolean",
        ),
        (
            [{"capability": "events", "state": "true"}],
            "Invalid parameter type for 'capabilities[0].state', expected: boolean",
        ),
        (
            [{"capability": "events", "state": True}, {"capability": "xbzrle", "state": None}],
            "Invalid parameter type for 'capabilities[1].state', expected: boolean",
        ),
        # GLib's hash order picks among unexpected members (here: 'b' before 'a').
        (
            [{"capability": "events", "state": True, "a": 1, "b": 2}],
            "Parameter 'capabilities[0].b' is unexpected",
        ),
        # The element's type is checked before its members, the name before the state.
        ([{"capability": "bogus"}], "Parameter 'capability' does not accept value 'bogus'"),
    ],
)
@pytest.mark.parametrize("command", ["migrate", "migrate-incoming"])
def test_malformed_list_gets_the_visitors_error_before_anything_runs(
    probed: Schema, command: str, caps: object, desc: str
) -> None:
    """What a patched QEMU's argument visitor would say, with nothing sent to QEMU."""
    driver = Driver(command, {"uri": "exec:x", "capabilities": caps}, probed)
    assert driver.outcome == Outcome("precheck_error", _error(desc))
    assert driver.calls == []


@BOTH
def test_a_fault_in_a_declared_member_comes_before_the_lists(probed: Schema) -> None:
    """A patched QEMU visits uri (declared first) before capabilities (appended)."""
    args = {"uri": 5, "capabilities": "xbzrle"}
    desc = "Invalid parameter type for 'uri', expected: string"
    driver = run("migrate", args, probed, refused("migrate", desc))
    assert_precheck(driver, "migrate", args, _error(desc))


@BOTH
def test_the_lists_fault_comes_before_an_unknown_member(probed: Schema) -> None:
    """Unknown members are found after every declared one is visited, capabilities too."""
    args = {"uri": "exec:x", "bogus": 1, "capabilities": [{"capability": "events"}]}
    driver = Driver("migrate", args, probed)
    assert driver.outcome == Outcome(
        "precheck_error", _error("Parameter 'capabilities[0].state' is missing")
    )


@BOTH
@pytest.mark.parametrize(
    "desc",
    ["There's a migration process in progress", "Postcopy preempt not compatible with compress"],
)
def test_caps_error_is_qemus_reply_and_stops(probed: Schema, desc: str) -> None:
    refused = {"error": {"class": "GenericError", "desc": desc}}
    driver = Driver("migrate", migrate_args(), probed).reply(BEFORE).reply(refused)
    assert driver.outcome == Outcome("caps_error", reply=refused)
    assert driver.names == ["query-migrate-capabilities", "migrate-set-capabilities"]
    assert driver.step is None  # no further steps: no migrate, no restore


def test_caps_error_on_migrate_incoming_stops_too() -> None:
    refused = _error("There's a migration process in progress")
    driver = run(
        "migrate-incoming",
        {"uri": "exec:cat /x", "capabilities": [{"capability": "events", "state": True}]},
        S72,
        {
            **INCOMING_READY,
            "query-migrate-capabilities": [BEFORE],
            "migrate-set-capabilities": [refused],
        },
    )
    assert driver.outcome == Outcome("caps_error", reply=refused)
    assert "migrate-incoming" not in driver.names


@BOTH
@pytest.mark.parametrize("command", ["migrate", "migrate-incoming"])
def test_command_error_restores_previous_values(probed: Schema, command: str) -> None:
    failed = _error("unknown migration protocol: bogus:x")
    caps = [
        {"capability": "events", "state": True},
        {"capability": "auto-converge", "state": False},
    ]
    driver = run(
        command,
        {"uri": "bogus:x", "capabilities": caps},
        probed,
        {
            **(INCOMING_READY if command == "migrate-incoming" else {}),
            "query-migrate-capabilities": [BEFORE],
            "migrate-set-capabilities": [OK, OK],
            command: [failed],
        },
    )
    restore = driver.calls[-1]
    assert restore == Call(
        "migrate-set-capabilities",
        {
            "capabilities": [
                {"capability": "events", "state": False},
                {"capability": "auto-converge", "state": True},
            ]
        },
    )
    assert driver.outcome == Outcome("command_error", reply=failed, restore="ok")


@BOTH
def test_restore_names_each_distinct_capability_once(probed: Schema) -> None:
    caps = [
        {"capability": "xbzrle", "state": True},
        {"capability": "events", "state": True},
        {"capability": "xbzrle", "state": False},
        {"capability": "auto-converge", "state": False},
        {"capability": "events", "state": False},
    ]
    failed = _error("Guest is waiting for an incoming migration")
    driver = run(
        "migrate",
        {"uri": "exec:x", "capabilities": caps},
        probed,
        {
            "query-migrate-capabilities": [BEFORE],
            "migrate-set-capabilities": [OK, OK],
            "migrate": [failed],
        },
    )
    assert driver.names == [
        "query-migrate-capabilities",
        "migrate-set-capabilities",
        "migrate",
        "migrate-set-capabilities",
    ]
    restored = driver.calls[-1].arguments
    assert restored == {
        "capabilities": [
            {"capability": "xbzrle", "state": False},
            {"capability": "events", "state": False},
            {"capability": "auto-converge", "state": True},
        ]
    }
    assert driver.outcome == Outcome("command_error", reply=failed, restore="ok")


@BOTH
def test_restore_only_touches_listed_names(probed: Schema) -> None:
    caps = [{"capability": "rdma-pin-all", "state": True}]
    failed = _error("Migration requires seekable transport (e.g. file)")
    driver = Driver("migrate", migrate_args(caps), probed)
    driver.reply(BEFORE).reply(OK).reply(failed)
    assert driver.step == Call(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "rdma-pin-all", "state": False}]},
    )
    driver.reply(OK)
    assert driver.outcome == Outcome("command_error", reply=failed, restore="ok")


@BOTH
def test_restore_failure_is_reported_and_client_gets_command_error(probed: Schema) -> None:
    failed = _error("unknown migration protocol: bogus:x")
    refused = _error("There's a migration process in progress")
    driver = Driver("migrate", {"uri": "bogus:x", "capabilities": CAPS}, probed)
    driver.reply(BEFORE).reply(OK).reply(failed).reply(refused)
    assert driver.outcome == Outcome(
        "command_error",
        reply=failed,
        restore="failed",
        restore_error="There's a migration process in progress",
    )
    assert driver.step is None


@BOTH
def test_empty_capability_list_is_still_split(probed: Schema) -> None:
    # QEMU accepts an empty list (and refuses it while a migration runs), so it goes through.
    driver = run(
        "migrate",
        {"uri": "exec:x", "capabilities": []},
        probed,
        {"query-migrate-capabilities": [BEFORE], "migrate-set-capabilities": [OK], "migrate": [OK]},
    )
    assert driver.calls[1] == Call("migrate-set-capabilities", {"capabilities": []})
    assert driver.outcome == Outcome("ok", OK)


def test_migrate_success_reply_is_qemus_reply_object() -> None:
    qemu_reply = {"return": {}, "id": 17}
    driver = Driver("migrate", {"uri": "exec:x", "capabilities": CAPS}, S72)
    driver.reply(BEFORE).reply(OK).reply(qemu_reply)
    assert driver.outcome is not None
    assert driver.outcome.reply is qemu_reply


# -- schema: probe and advertise ------------------------------------------------------------


def test_parse_72() -> None:
    assert S72.members["migrate"] == ("uri", "blk", "inc", "detach", "resume")
    assert S72.required["migrate"] == frozenset({"uri"})
    assert S72.members["migrate-incoming"] == ("uri",)
    assert S72.required["migrate-incoming"] == frozenset({"uri"})
    assert S72.arg_types == {"migrate": "150", "migrate-incoming": "151"}
    assert S72.caps_type == "[142]"
    assert not S72.has_member("migrate", "channels")
    assert {"migrate-pause", "migrate-recover"} <= S72.allow_oob
    assert "migrate" not in S72.allow_oob
    assert S72.events == frozenset({"MIGRATION", "STOP"})
    assert "query-migrate-capabilities" in S72.commands


def test_parse_100() -> None:
    assert S100.members["migrate"] == ("uri", "channels", "detach", "resume")
    assert S100.required["migrate"] == frozenset()
    assert S100.members["migrate-incoming"] == ("uri", "channels", "exit-on-error")
    assert S100.caps_type == "[148]"
    assert S100.has_member("migrate-incoming", "channels")


def test_native_detection() -> None:
    for probed in (S72, S100):
        assert not probed.native("migrate")
        assert not probed.native("migrate-incoming")
    patched = schema.parse(schema_patched())
    assert patched.native("migrate")
    assert patched.native("migrate-incoming")
    assert not patched.native("query-status")
    # Only one of the two commands patched: each is judged on its own.
    half = schema_100()
    next(e for e in half if e["name"] == "155")["members"].append(_opt("capabilities", "[148]"))
    probed = schema.parse(half)
    assert probed.native("migrate")
    assert not probed.native("migrate-incoming")


def test_parse_tolerates_garbage() -> None:
    assert schema.parse(None) == Schema()
    assert schema.parse({"return": []}) == Schema()
    empty = schema.parse([1, "x", {"name": 3}, {"meta-type": "command"}])
    assert empty.commands == frozenset()
    assert not empty.native("migrate")


def _members(entries: list[dict[str, Any]], type_name: str) -> list[dict[str, Any]]:
    members: list[dict[str, Any]] = next(e for e in entries if e["name"] == type_name)["members"]
    return members


def _line(entries: list[dict[str, Any]]) -> bytes:
    """The reply line as QEMU writes it (its writer: QDict order, ": " and ", ")."""
    return qjson.dumps({"return": entries, "id": "c1"}) + b"\r\n"


@pytest.mark.parametrize(
    ("build", "types", "caps_type"),
    [(schema_72, ("150", "151"), "[142]"), (schema_100, ("155", "156"), "[148]")],
    ids=["7.2", "10.0"],
)
def test_advertise_adds_optional_member_in_split_mode(
    build: Any, types: tuple[str, str], caps_type: str
) -> None:
    entries = build()
    line = _line(entries)
    patched_line = schema.advertise(line, schema.parse(entries))
    assert patched_line is not None
    patched = json.loads(patched_line)["return"]
    member = {"name": "capabilities", "default": None, "type": caps_type}
    for type_name in types:
        assert _members(patched, type_name) == [*_members(entries, type_name), member]
    # Nothing else changes, byte for byte: QEMU's formatting stays, only the members are added.
    added = b', {"name": "capabilities", "default": null, "type": "%s"}' % caps_type.encode()
    assert patched_line.replace(added, b"") == line
    assert patched_line.count(added) == 2
    # Advertised once only, and the probe of the patched reply sees a "native" member.
    assert schema.parse(patched).native("migrate")


def test_advertise_leaves_native_schema_alone() -> None:
    entries = schema_patched()
    assert schema.advertise(_line(entries), schema.parse(entries)) is None


def test_advertise_only_the_command_that_lacks_it() -> None:
    entries = schema_100()
    next(e for e in entries if e["name"] == "155")["members"].append(_opt("capabilities", "[148]"))
    patched_line = schema.advertise(_line(entries), schema.parse(entries))
    assert patched_line is not None
    patched = json.loads(patched_line)["return"]
    assert [m["name"] for m in _members(patched, "155")].count("capabilities") == 1
    assert _members(patched, "156")[-1] == {
        "name": "capabilities",
        "default": None,
        "type": "[148]",
    }


def test_advertise_without_a_probed_caps_type_changes_nothing() -> None:
    entries = [e for e in schema_72() if e["name"] != "migrate-set-capabilities"]
    probed = schema.parse(entries)
    assert probed.caps_type is None
    assert schema.advertise(_line(entries), probed) is None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda e: {**e, "members": "not a list"},
        lambda e: {k: v for k, v in e.items() if k != "members"},
        lambda e: {**e, "members": [1, None, {"name": 3}]},
        lambda e: {"meta-type": "object", **e},  # another key order than QEMU's
    ],
)
def test_advertise_and_parse_survive_any_shape_of_migrates_type(mangle: Any) -> None:
    """A schema of an unexpected shape must not break the reply path: the reply is relayed
    as QEMU wrote it (nothing advertised) or with the member spliced in, never an exception."""
    entries = [mangle(e) if e.get("name") == "150" else e for e in schema_72()]
    probed = schema.parse(entries)
    line = _line(entries)
    patched = schema.advertise(line, probed)
    assert patched is None or json.loads(patched)["return"]


def test_parse_reads_the_capability_names_from_the_enum() -> None:
    assert S72.capability_names == frozenset({"xbzrle", "rdma-pin-all", "auto-converge", "events"})
    broken = [e for e in schema_72() if e.get("meta-type") != "enum"]
    assert schema.parse(broken).capability_names is None


# -- recovery after a crash: the same checks as the pre-check ------------------------------------


def recovery(
    command: str, before: Any, probed: Schema, replies: dict[str, list[Reply]]
) -> tuple[bool, list[str]]:
    plan = never_started(command, before, probed)
    names: list[str] = []
    queues = {k: list(v) for k, v in replies.items()}
    try:
        step = next(plan)
        while True:
            names.append(step.command)
            step = plan.send(queues[step.command].pop(0))
    except StopIteration as done:
        return bool(done.value), names


def test_recovery_restores_a_migrate_that_changed_nothing() -> None:
    assert recovery("migrate", {}, S100, {"query-migrate": [{"return": {}}]}) == (
        True,
        ["query-migrate"],
    )


def test_recovery_leaves_a_migrate_that_started() -> None:
    started = {"query-migrate": [{"return": {"status": "setup"}}]}
    assert recovery("migrate", {}, S100, started)[0] is False
    # A completed one differs from the completed one before it (its timings and counters).
    before = {"status": "completed", "total-time": 5}
    again = {"query-migrate": [{"return": {"status": "completed", "total-time": 7}}]}
    assert recovery("migrate", before, S100, again)[0] is False


def test_recovery_sees_a_listening_incoming_migration_by_its_yank_instance() -> None:
    """QEMU 7.2: an exec: incoming migration shows no status, but a yank instance: the
    restore must not run under it (the attacker's review found it did)."""
    replies = {**INCOMING_READY, "query-yank": [{"return": [{"type": "migration"}]}]}
    assert recovery("migrate-incoming", {}, S72, replies) == (
        False,
        ["query-status", "query-migrate", "query-yank"],
    )
    idle = {**INCOMING_READY, "query-yank": [{"return": [{"type": "chardev", "id": "m"}]}]}
    assert recovery("migrate-incoming", {}, S72, idle)[0] is True


def test_recovery_leaves_an_incoming_migration_that_moved_the_vm_on() -> None:
    ran = {"query-status": [{"return": {"status": "running", "running": True}}]}
    assert recovery("migrate-incoming", {}, S72, ran) == (False, ["query-status"])


@pytest.mark.parametrize("odd", [{"return": []}, {"return": None}, {"error": {}}, {}])
def test_recovery_treats_odd_answers_as_started(odd: Reply) -> None:
    """An answer of an unexpected shape proves nothing: the restore is not applied."""
    assert recovery("migrate", {}, S100, {"query-migrate": [odd]})[0] is False
    assert recovery("migrate-incoming", {}, S72, {"query-status": [odd]})[0] is False


def test_journaled_migrate_runs_only_what_the_policy_checks() -> None:
    """With the crash journal the plan also asks query-migrate (Driver checks every step)."""
    driver = Driver("migrate", migrate_args(), schema.parse(schema_72()), journal=True)
    replies: list[Reply] = [BEFORE, {"return": {}}]
    for reply in replies:
        driver.reply(reply)
    assert "query-migrate" in driver.names


@pytest.mark.parametrize(
    ("command", "denied"), [("migrate", "query-migrate"), ("migrate-incoming", "query-yank")]
)
def test_a_policy_denying_any_step_of_a_split_denies_the_split(command: str, denied: str) -> None:
    policy = Policy(deny=(denied,))
    assert policy.permits_request(command, {"uri": "x"})
    assert not policy.permits_request(command, {"uri": "x", "capabilities": []})


# -- QEMU 5.2: no yank, so an incoming migration that has received nothing is probed -------------

UNKNOWN_PROTOCOL = _error("unknown migration protocol: " + PROBE_URI)
ALREADY_STARTED = _error("The incoming migration has already been started")
INCOMING_READY_52 = {k: v for k, v in INCOMING_READY.items() if k != "query-yank"}


def test_52_idle_incoming_is_probed_then_split() -> None:
    """QEMU refuses the probe's URI with "unknown migration protocol" and changes nothing: no
    migration has started, so the capabilities are set and the client's command runs."""
    args = {"uri": "exec:cat /tmp/x", "capabilities": CAPS}
    driver = run(
        "migrate-incoming",
        args,
        S52,
        {
            **INCOMING_READY_52,
            "migrate-incoming": [UNKNOWN_PROTOCOL, OK],
            "query-migrate-capabilities": [BEFORE],
            "migrate-set-capabilities": [OK],
        },
    )
    assert driver.outcome == Outcome("ok", OK)
    assert driver.calls[2] == Call("migrate-incoming", {"uri": PROBE_URI})
    assert driver.names == [
        "query-status",
        "query-migrate",
        "migrate-incoming",
        "query-migrate-capabilities",
        "migrate-set-capabilities",
        "migrate-incoming",
    ]
    assert driver.calls[-1] == Call("migrate-incoming", stripped(args))


@pytest.mark.parametrize(
    "probe_reply",
    [ALREADY_STARTED, _error("For use with '-incoming defer'"), OK, {"return": 1}, {}],
    ids=["started", "not-deferred", "accepted", "odd-return", "empty"],
)
def test_52_a_probe_that_is_not_refused_as_unknown_means_busy(probe_reply: Reply) -> None:
    """Only QEMU's "unknown migration protocol" proves nothing has started; any other answer
    leaves the capabilities alone and lets QEMU answer the client's command itself."""
    args = {"uri": "exec:cat /tmp/x", "capabilities": CAPS}
    driver = Driver("migrate-incoming", args, S52)
    driver.reply(INCOMING_READY_52["query-status"][0]).reply(INCOMING_READY_52["query-migrate"][0])
    assert driver.step == Call("migrate-incoming", {"uri": PROBE_URI})
    driver.reply(probe_reply).reply(ALREADY_STARTED)
    assert_precheck(driver, "migrate-incoming", args, ALREADY_STARTED)
    assert driver.names == ["query-status", "query-migrate", "migrate-incoming", "migrate-incoming"]


def test_52_a_listening_socket_shows_in_query_migrate_without_a_probe() -> None:
    args = {"uri": "tcp:127.0.0.1:0", "capabilities": CAPS}
    listening = {"return": {"socket-address": [{"type": "inet", "host": "0.0.0.0", "port": "4"}]}}
    replies = refused(
        "migrate-incoming",
        ALREADY_STARTED["error"]["desc"],
        **{"query-status": INCOMING_READY_52["query-status"], "query-migrate": [listening]},
    )
    driver = run("migrate-incoming", args, S52, replies)
    assert_precheck(driver, "migrate-incoming", args, ALREADY_STARTED)
    assert driver.names == ["query-status", "query-migrate", "migrate-incoming"]


def test_52_recovery_probes_too() -> None:
    idle = {**INCOMING_READY_52, "migrate-incoming": [UNKNOWN_PROTOCOL]}
    assert recovery("migrate-incoming", {}, S52, idle) == (
        True,
        ["query-status", "query-migrate", "migrate-incoming"],
    )
    started = {**INCOMING_READY_52, "migrate-incoming": [ALREADY_STARTED]}
    assert recovery("migrate-incoming", {}, S52, started)[0] is False
