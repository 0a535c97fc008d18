"""examples/*.toml load with the daemon's own config loader and fit the units they are for.

The examples are copied into /etc/qmp-proxy by operators (the package ships them under
/usr/share/doc/qmp-proxy/examples): a renamed key, a socket path the unit may not create, or a
listener name the socket unit does not pass would only show on a production host.  So every
file is loaded here exactly as ``qmp-proxy --config`` loads it, and each is checked against what
its comments promise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.toml"))


def unit_setting(unit: str, key: str) -> str:
    """The one value of KEY in systemd/UNIT (comments skipped)."""
    values = [
        line.partition("=")[2].strip()
        for line in (REPO / "systemd" / unit).read_text().splitlines()
        if line.startswith(f"{key}=")
    ]
    assert len(values) == 1, (unit, key, values)
    return values[0]


def test_the_three_examples_exist() -> None:
    assert [p.name for p in EXAMPLES] == ["many-vms.toml", "monitoring.toml", "one-vm.toml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_loads(path: Path) -> None:
    cfg = config.load(path)  # raises ConfigError listing every problem
    assert cfg.routes, f"{path.name}: no [[route]]: qmp-proxy --config would not run it"
    for route in cfg.routes:
        assert route.listen, route
        for listen in route.listen:
            # QMP has no authentication: no example opens a socket beyond this host.
            assert not listen.allow_remote, (path.name, listen)


def test_one_vm_listens_on_the_socket_units_socket() -> None:
    cfg = config.load(REPO / "examples/one-vm.toml")
    (route,) = cfg.routes
    (listen,) = route.listen
    name = unit_setting("qmp-proxy@.socket", "FileDescriptorName")
    assert (listen.address.kind, str(listen.address)) == ("systemd", f"systemd:{name}")
    # The unit's SocketMode= stands: the example sets no mode of its own.
    assert not listen.mode_given


def test_many_vms_sockets_are_where_the_daemon_unit_lets_it_create_them() -> None:
    cfg = config.load(REPO / "examples/many-vms.toml")
    assert len(cfg.routes) >= 2
    assert cfg.metrics is not None
    runtime = "/run/" + unit_setting("qmp-proxy.service", "RuntimeDirectory") + "/"
    for route in cfg.routes:
        for listen in route.listen:
            if listen.address.kind == "unix":
                assert listen.address.path.startswith(runtime), (route.name, listen.address)
            else:
                assert listen.address.kind == "tcp" and listen.address.is_loopback, listen


def test_monitoring_listener_runs_queries_only() -> None:
    cfg = config.load(REPO / "examples/monitoring.toml")
    (route,) = cfg.routes
    policies = {str(listen.address): listen.policy for listen in route.listen}
    read_only = policies["unix:/run/qmp-proxy/vm1-ro.qmp"]
    for command in ("query-status", "query-block", "query-migrate", "qmp_capabilities"):
        assert read_only.permits(command), command
    for command in ("quit", "stop", "cont", "migrate", "device_add", "human-monitor-command"):
        assert not read_only.permits(command), command
    operator = policies["unix:/run/qmp-proxy/vm1-ops.qmp"]
    assert operator.permits("stop") and operator.permits("query-status")
    for command in ("quit", "system_reset", "system_powerdown", "migrate", "migrate-incoming"):
        assert not operator.permits(command), command
    # The manager's socket is open to every command, and only to its owner.
    manager = next(lc for lc in route.listen if str(lc.address) == "unix:/run/qmp-proxy/vm1.qmp")
    assert manager.policy.open and manager.mode == 0o600
