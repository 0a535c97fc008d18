"""Configuration: the TOML file, its validation, ``--check-config`` and the command line.

A bad file is reported completely, one line per problem naming the file and the key, and exits
2; route flags combined with a multi-route file exit 2; bad arguments print one line and exit 2.
The process tests run ``python -m proxy`` exactly as an operator would.
"""

from __future__ import annotations

import grp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import address, config
from proxy.config import ConfigError, Limits, load
from proxy.policy import Policy
from proxy.session import MAX_CLIENT_MESSAGE

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "qmp-proxy.toml"

ROUTE = """
[[route]]
name = "vm1"
upstream = "unix:/run/qemu/vm1.qmp"
listen = ["unix:/run/qmp-proxy/vm1.qmp"]
"""


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    """Every problem ``load`` reports; fails the test if the file loads."""
    with pytest.raises(ConfigError) as info:
        load(path)
    found = info.value.problems
    assert found, "ConfigError without problems"
    for line in found:
        assert "\n" not in line, f"a problem spans lines: {line!r}"
        assert line.startswith(f"{path}: "), f"problem does not name the file: {line!r}"
    assert str(info.value).splitlines() == found
    return found


def one_problem(path: Path, key: str, *fragments: str) -> str:
    """Exactly one problem, naming ``key`` and containing every fragment."""
    found = problems(path)
    assert len(found) == 1, found
    line = found[0]
    assert line.startswith(f"{path}: {key}: "), f"expected key {key!r}: {line!r}"
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def run_proxy(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for var in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC"):
        env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# -- the example file ---------------------------------------------------------------------------


def test_example_file_is_valid() -> None:
    cfg = load(EXAMPLE)
    assert cfg.source == EXAMPLE
    assert len(cfg.routes) == 1
    route = cfg.routes[0]
    assert route.name == "vm1"
    assert route.upstream == address.parse("unix:/run/qemu/vm1.qmp")
    assert [str(lc.address) for lc in route.listen] == [
        "unix:/run/qmp-proxy/vm1.qmp",
        "unix:/run/qmp-proxy/vm1-monitor.qmp",
    ]
    main, monitor = route.listen
    assert main.mode == 0o660
    assert main.policy.open
    assert monitor.mode == 0o666
    assert monitor.policy == Policy(allow=("query-*",))
    assert monitor.policy.permits("query-status")
    assert not monitor.policy.permits("stop")
    assert main.max_message is None  # the route's limit
    assert monitor.max_message == config.RESTRICTED_MAX_MESSAGE
    # The example documents every default: it must state exactly the built-in values.
    assert cfg.limits == Limits()
    assert cfg.log_level == "info"
    assert cfg.backport is True
    assert cfg.metrics is None


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    for key in (*config._TOP_KEYS, *config._LIMIT_TYPES, *config._ROUTE_KEYS, *config._LISTEN_KEYS):
        assert key in text, f"config/qmp-proxy.toml does not mention {key!r}"


def test_minimal_file_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, ROUTE))
    assert cfg.limits == Limits()
    (route,) = cfg.routes
    (listen,) = route.listen
    assert listen.mode == 0o600
    assert listen.group is None
    assert listen.allow_remote is False
    assert listen.policy.open


def test_single_route_name_defaults_to_vm(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, '[[route]]\nupstream = "/q.sock"\nlisten = ["/l.sock"]\n'))
    assert cfg.routes[0].name == "vm"
    assert cfg.routes[0].upstream == address.Address("unix", path="/q.sock")


def test_metrics_key(tmp_path: Path) -> None:
    assert load(write(tmp_path, 'metrics = "9740"\n' + ROUTE)).metrics == ("127.0.0.1", 9740)
    assert load(write(tmp_path, 'metrics = "[::1]:9741"\n' + ROUTE)).metrics == ("::1", 9741)
    assert load(write(tmp_path, 'metrics = "0.0.0.0:9742"\n' + ROUTE)).metrics == ("0.0.0.0", 9742)


# -- one problem at a time ----------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    one_problem(write(tmp_path, "colour = 'blue'\n" + ROUTE), "colour", "unknown key")


def test_unknown_limits_key(tmp_path: Path) -> None:
    text = "[limits]\nmax_sesions = 3\n" + ROUTE
    one_problem(write(tmp_path, text), "limits.max_sesions", "unknown key")


def test_unknown_route_key(tmp_path: Path) -> None:
    one_problem(write(tmp_path, ROUTE + "upstrem = 'x'\n"), "route[0].upstrem", "unknown key")


def test_listener_max_message(tmp_path: Path) -> None:
    """A restricted listener's messages are bounded at 64 KiB unless it says otherwise; an
    open one keeps the route's limit; the value is checked like the route's."""
    text = """
[[route]]
name = "vm1"
upstream = "unix:/q.sock"
listen = [
  "unix:/open.sock",
  { address = "unix:/ro.sock", allow = ["query-*"] },
  { address = "unix:/ro-big.sock", allow = ["query-*"], max_message = 1048576 },
  { address = "unix:/small.sock", max_message = 4096 },
]
"""
    listens = load(write(tmp_path, text)).routes[0].listen
    assert [lc.max_message for lc in listens] == [None, 65536, 1048576, 4096]
    for bad in ("0", "true", '"1"', str(MAX_CLIENT_MESSAGE + 1)):
        text = f"""
[[route]]
name = "vm1"
upstream = "unix:/q.sock"
listen = [{{ address = "unix:/l.sock", max_message = {bad} }}]
"""
        one_problem(write(tmp_path, text), "route[vm1].listen[0].max_message", "integer")


def test_unknown_listener_key(tmp_path: Path) -> None:
    text = """
[[route]]
name = "vm1"
upstream = "unix:/q.sock"
listen = [{ address = "unix:/l.sock", mod = "0660" }]
"""
    one_problem(write(tmp_path, text), "route[vm1].listen[0].mod", "unknown key")


@pytest.mark.parametrize(
    ("upstream", "fragment"),
    [
        ("relative/path.sock", "expected unix:/path"),
        ("unix:", "empty unix socket path"),
        ("tcp:localhost", "expected tcp:HOST:PORT"),
        ("tcp:localhost:0", "port out of range"),
        ("tcp:localhost:70000", "port out of range"),
        ("tcp::4444", "empty host"),
        ("ftp:host:21", "unknown address kind"),
        ("systemd:qmp", "systemd: names a listener, not QEMU"),
    ],
)
def test_bad_upstream_address(tmp_path: Path, upstream: str, fragment: str) -> None:
    text = f'[[route]]\nname = "vm1"\nupstream = "{upstream}"\nlisten = ["/l.sock"]\n'
    one_problem(write(tmp_path, text), "route[vm1].upstream", fragment)


@pytest.mark.parametrize(
    ("listen", "fragment"),
    [
        ('"relative.sock"', "expected unix:/path"),
        ('"tcp:127.0.0.1:99999"', "port out of range"),
        ('"systemd:"', "empty systemd socket name"),
        ('{ address = "tcp:127.0.0.1" }', "expected tcp:HOST:PORT"),
    ],
)
def test_bad_listen_address(tmp_path: Path, listen: str, fragment: str) -> None:
    text = f'[[route]]\nname = "vm1"\nupstream = "/q.sock"\nlisten = [{listen}]\n'
    one_problem(write(tmp_path, text), "route[vm1].listen[0].address", fragment)


def test_missing_upstream_and_listen(tmp_path: Path) -> None:
    found = problems(write(tmp_path, '[[route]]\nname = "vm1"\n'))
    assert len(found) == 2, found
    assert any(": route[vm1].upstream: required" in p for p in found), found
    assert any(": route[vm1].listen: needs at least one address" in p for p in found), found


def test_listener_table_without_address(tmp_path: Path) -> None:
    text = '[[route]]\nname = "vm1"\nupstream = "/q.sock"\nlisten = [{ mode = "0600" }]\n'
    one_problem(write(tmp_path, text), "route[vm1].listen[0].address", "required")


def test_two_routes_on_one_upstream(tmp_path: Path) -> None:
    # The same socket spelled two ways is still one upstream.
    text = """
[[route]]
name = "a"
upstream = "unix:/run/qemu/vm.qmp"
listen = ["/run/a.sock"]
[[route]]
name = "b"
upstream = "/run/qemu/vm.qmp"
listen = ["/run/b.sock"]
"""
    one_problem(write(tmp_path, text), "route[b].upstream", "also used by route a")


def test_two_listeners_on_one_address_in_a_route(tmp_path: Path) -> None:
    text = '[[route]]\nname = "a"\nupstream = "/q.sock"\nlisten = ["unix:/l.sock", "/l.sock"]\n'
    one_problem(write(tmp_path, text), "route[a].listen[1].address", "unix:/l.sock", "route[a]")


def test_two_listeners_on_one_address_across_routes(tmp_path: Path) -> None:
    text = """
[[route]]
name = "a"
upstream = "/q1.sock"
listen = ["/l.sock", "tcp:127.0.0.1:4444"]
[[route]]
name = "b"
upstream = "/q2.sock"
listen = [{ address = "tcp:127.0.0.1:4444" }]
"""
    one_problem(write(tmp_path, text), "route[b].listen[0].address", "tcp:127.0.0.1:4444", "[a]")


def test_duplicate_route_name(tmp_path: Path) -> None:
    text = """
[[route]]
name = "a"
upstream = "/q1.sock"
listen = ["/l1.sock"]
[[route]]
name = "a"
upstream = "/q2.sock"
listen = ["/l2.sock"]
"""
    one_problem(write(tmp_path, text), "route[a].name", "two routes")


def test_multi_route_needs_names(tmp_path: Path) -> None:
    text = """
[[route]]
name = "a"
upstream = "/q1.sock"
listen = ["/l1.sock"]
[[route]]
upstream = "/q2.sock"
listen = ["/l2.sock"]
"""
    one_problem(write(tmp_path, text), "route[1].name", "required")


def test_unnamed_route_problems_name_the_route_by_index(tmp_path: Path) -> None:
    """A route without a name is ``route[1]``; its other keys must be named from there."""
    text = """
[[route]]
name = "a"
upstream = "/q1.sock"
listen = ["/l1.sock"]
[[route]]
upstream = "ftp:nope"
listen = ["/l2.sock"]
"""
    found = problems(write(tmp_path, text))
    assert len(found) == 2, found
    path = tmp_path / "c.toml"
    assert found[0].startswith(f"{path}: route[1].name: "), found
    # Not "route[route[1]].upstream": that names no key the operator can find.
    assert found[1].startswith(f"{path}: route[1].upstream: "), found


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "[::]", "[2001:db8::1]", "example.com"])
def test_remote_tcp_listener_refused(tmp_path: Path, host: str) -> None:
    text = f'[[route]]\nname = "a"\nupstream = "/q.sock"\nlisten = ["tcp:{host}:4444"]\n'
    one_problem(write(tmp_path, text), "route[a].listen[0].address", "not loopback", "allow_remote")


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "example.com"])
def test_remote_tcp_listener_with_allow_remote(tmp_path: Path, host: str) -> None:
    text = f"""
[[route]]
name = "a"
upstream = "/q.sock"
listen = [{{ address = "tcp:{host}:4444", allow_remote = true }}]
"""
    (listen,) = load(write(tmp_path, text)).routes[0].listen
    assert listen.allow_remote is True
    assert listen.address.kind == "tcp"
    assert listen.address.port == 4444


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "[::1]", "localhost"])
def test_loopback_tcp_listener_needs_nothing(tmp_path: Path, host: str) -> None:
    text = f'[[route]]\nname = "a"\nupstream = "/q.sock"\nlisten = ["tcp:{host}:4444"]\n'
    assert load(write(tmp_path, text)).routes[0].listen[0].allow_remote is False


def test_allow_remote_must_be_bool(tmp_path: Path) -> None:
    text = """
[[route]]
name = "a"
upstream = "/q.sock"
listen = [{ address = "/l.sock", allow_remote = "yes" }]
"""
    one_problem(write(tmp_path, text), "route[a].listen[0].allow_remote", "true or false")


@pytest.mark.parametrize("mode", ['"0999"', '"rw-rw----"', '"01777"', '"-1"', "true", '""'])
def test_bad_mode(tmp_path: Path, mode: str) -> None:
    text = f"""
[[route]]
name = "a"
upstream = "/q.sock"
listen = [{{ address = "/l.sock", mode = {mode} }}]
"""
    one_problem(write(tmp_path, text), "route[a].listen[0].mode", "octal")


@pytest.mark.parametrize(
    ("mode", "bits"), [('"0660"', 0o660), ('"600"', 0o600), ('"0o640"', 0o640)]
)
def test_good_mode(tmp_path: Path, mode: str, bits: int) -> None:
    text = f"""
[[route]]
name = "a"
upstream = "/q.sock"
listen = [{{ address = "/l.sock", mode = {mode} }}]
"""
    assert load(write(tmp_path, text)).routes[0].listen[0].mode == bits


def test_toml_octal_integer_mode_is_not_misread(tmp_path: Path) -> None:
    """``mode = 0o660`` is a TOML octal integer (432).  It must mean 0o660 or be rejected.

    Read as the octal *string* of its decimal value it becomes 0o432 (``r---wx-w-``), which
    lets every local user connect: a QMP socket is root over the VM.
    """
    text = """
[[route]]
name = "a"
upstream = "/q.sock"
listen = [{ address = "/l.sock", mode = 0o660 }]
"""
    path = write(tmp_path, text)
    try:
        cfg = load(path)
    except ConfigError as exc:
        assert len(exc.problems) == 1, exc.problems
        assert f"{path}: route[a].listen[0].mode: " in exc.problems[0]
        return
    mode = cfg.routes[0].listen[0].mode
    assert mode == 0o660, f"mode = 0o660 became {oct(mode)}"


def test_unknown_group(tmp_path: Path) -> None:
    text = """
[[route]]
name = "a"
upstream = "/q.sock"
listen = [{ address = "/l.sock", group = "no-such-group-qmp" }]
"""
    one_problem(write(tmp_path, text), "route[a].listen[0].group", "no-such-group-qmp")


def test_known_group(tmp_path: Path) -> None:
    name = grp.getgrgid(os.getgid()).gr_name
    text = f"""
[[route]]
name = "a"
upstream = "/q.sock"
listen = [{{ address = "/l.sock", group = "{name}" }}]
"""
    assert load(write(tmp_path, text)).routes[0].listen[0].group == name


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("max_sessions", '"10"', "must be a number"),
        ("max_sessions", "true", "must be a number"),
        ("max_sessions", "[1]", "must be a number"),
        ("max_sessions", "1.5", "whole number"),
        ("max_sessions", "-1", "positive"),
        ("max_sessions", "0", "positive"),
        ("max_queued", "0", "positive"),
        ("max_message", "-5", "positive"),
        ("max_backlog", "2.0", "whole number"),
        ("client_wait", "-0.5", "positive"),
        ("drain", "-1", "positive"),
        ("backoff_min", '"fast"', "must be a number"),
        ("max_message", "67108865", "must not exceed"),
    ],
)
def test_bad_limit(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    one_problem(write(tmp_path, f"[limits]\n{key} = {value}\n" + ROUTE), f"limits.{key}", fragment)


def test_limits_values_taken(tmp_path: Path) -> None:
    text = "[limits]\nmax_sessions = 3\nclient_wait = 2\ndrain = 0.5\nmax_message = 4096\n"
    limits = load(write(tmp_path, text + ROUTE)).limits
    assert limits == Limits(max_sessions=3, client_wait=2, drain=0.5, max_message=4096)


def test_backoff_order(tmp_path: Path) -> None:
    text = "[limits]\nbackoff_min = 3.0\nbackoff_max = 1.0\n" + ROUTE
    one_problem(write(tmp_path, text), "limits.backoff_min", "backoff_max")


def test_limits_not_a_table(tmp_path: Path) -> None:
    one_problem(write(tmp_path, "limits = 5\n" + ROUTE), "limits", "table")


@pytest.mark.parametrize(
    ("line", "key", "fragment"),
    [
        ('log_level = "loud"', "log_level", "debug, info, warning, error"),
        ('backport = "yes"', "backport", "true or false"),
        ('metrics = "host:"', "metrics", "[HOST:]PORT"),
        ("metrics = 70000", "metrics", "[HOST:]PORT"),
    ],
)
def test_bad_top_level_value(tmp_path: Path, line: str, key: str, fragment: str) -> None:
    one_problem(write(tmp_path, line + "\n" + ROUTE), key, fragment)


def test_route_must_be_array_of_tables(tmp_path: Path) -> None:
    text = '[route]\nname = "a"\nupstream = "/q.sock"\nlisten = ["/l.sock"]\n'
    one_problem(write(tmp_path, text), "route", "[[route]]")


@pytest.mark.parametrize(
    ("listen", "key"),
    [
        ('[{ address = "/l.sock", allow = "query-*" }]', "route[a].listen[0].allow"),
        ('[{ address = "/l.sock", deny = [1] }]', "route[a].listen[0].deny"),
        ('[{ address = "/l.sock", allow = [""] }]', "route[a].listen[0].allow"),
        ("[42]", "route[a].listen[0]"),
    ],
)
def test_bad_listener_values(tmp_path: Path, listen: str, key: str) -> None:
    text = f'[[route]]\nname = "a"\nupstream = "/q.sock"\nlisten = {listen}\n'
    one_problem(write(tmp_path, text), key)


def test_policy_from_file(tmp_path: Path) -> None:
    text = """
[[route]]
name = "a"
upstream = "/q.sock"
listen = [{ address = "/l.sock", allow = ["query-*", "cont"], deny = ["query-migrate*"] }]
"""
    policy = load(write(tmp_path, text)).routes[0].listen[0].policy
    assert policy == Policy(allow=("query-*", "cont"), deny=("query-migrate*",))
    assert policy.permits("query-status")
    assert policy.permits("cont")
    assert policy.permits("qmp_capabilities")
    assert not policy.permits("query-migrate-capabilities")
    assert not policy.permits("stop")


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load(missing)
    assert info.value.problems == [f"{missing}: No such file or directory"]
    broken = write(tmp_path, "[[route]\nname = \n")
    with pytest.raises(ConfigError) as info:
        load(broken)
    (line,) = info.value.problems
    assert line.startswith(f"{broken}: not valid TOML: "), line
    assert "\n" not in line


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    text = """
colour = "blue"
log_level = "loud"
[limits]
max_sessions = -1
bogus = 1
[[route]]
name = "a"
upstream = "unix:/q.sock"
extra = 1
listen = [
  { address = "/l.sock", mode = "0999", group = "no-such-group-qmp", what = 1 },
  "tcp:0.0.0.0:4444",
]
[[route]]
name = "b"
upstream = "/q.sock"
listen = ["unix:/l.sock"]
"""
    path = write(tmp_path, text)
    found = problems(path)
    keys = [line.removeprefix(f"{path}: ").split(": ", 1)[0] for line in found]
    assert sorted(keys) == sorted(
        [
            "colour",
            "log_level",
            "limits.max_sessions",
            "limits.bogus",
            "route[0].extra",
            "route[a].listen[0].what",
            "route[a].listen[0].mode",
            "route[a].listen[0].group",
            "route[a].listen[1].address",
            "route[b].upstream",
            "route[b].listen[0].address",
        ]
    ), found


# -- --check-config as a process ----------------------------------------------------------------


def test_check_config_ok() -> None:
    result = run_proxy("--check-config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{EXAMPLE}: ok (1 route)"]
    assert result.stderr == ""


def test_check_config_two_routes_ok(tmp_path: Path) -> None:
    text = """
[[route]]
name = "a"
upstream = "/q1.sock"
listen = ["/l1.sock"]
[[route]]
name = "b"
upstream = "/q2.sock"
listen = ["/l2.sock"]
"""
    path = write(tmp_path, text)
    result = run_proxy("--check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{path}: ok (2 routes)"]


def test_check_config_problems(tmp_path: Path) -> None:
    text = """
colour = "blue"
[limits]
max_sessions = "many"
[[route]]
name = "a"
upstream = "ftp:x"
listen = ["tcp:0.0.0.0:1"]
"""
    path = write(tmp_path, text)
    result = run_proxy("--check-config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 4, result.stderr
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    joined = "\n".join(lines)
    for key in ("colour", "limits.max_sessions", "route[a].upstream", "route[a].listen[0].address"):
        assert f": {key}: " in joined, (key, lines)
    assert "Traceback" not in result.stderr


def test_check_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    result = run_proxy("--check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{path}: No such file or directory"]


def test_bad_config_file_at_start(tmp_path: Path) -> None:
    path = write(tmp_path, "colour = 1\n[limits]\nmax_queued = 0\n" + ROUTE)
    result = run_proxy("--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert all(line.startswith(f"qmp-proxy: error: {path}: ") for line in lines), lines


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--upstream", "/q.sock", "--listen"], "--listen"),
        (["--upstream", "/q.sock", "--listen", "/l.sock", "--max-sessions", "x"], "max-sessions"),
        (["--upstream", "/q.sock", "--listen", "/l.sock", "--log-level", "loud"], "log-level"),
        (["--upstream", "/q.sock", "--listen", "/l.sock", "--backport", "maybe"], "backport"),
        ([], "--upstream is required"),
        (["--upstream", "/q.sock"], "--listen is required"),
        (["--upstream", "q.sock", "--listen", "/l.sock"], "--upstream"),
        (["--upstream", "systemd:qmp", "--listen", "/l.sock"], "--upstream"),
        (["--upstream", "/q.sock", "--listen", "ftp:x"], "--listen"),
        (["--upstream", "/q.sock", "--listen", "tcp:0.0.0.0:4444"], "not loopback"),
        (["--upstream", "/q.sock", "--listen", "/l.sock", "--max-sessions", "0"], "positive"),
        (["--upstream", "/q.sock", "--listen", "/l.sock", "--drain", "-1"], "positive"),
        (["--upstream", "/q.sock", "--listen", "/l.sock", "--metrics", "x"], "--metrics"),
        (["--upstream", "/q.sock", "--listen", "/l.sock", "--metrics", "70000"], "--metrics"),
        (["--config", "/nonexistent/qmp-proxy.toml"], "No such file"),
    ],
)
def test_bad_arguments_one_line_exit_2(args: list[str], fragment: str) -> None:
    result = run_proxy(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{result.stderr}"
    assert lines[0].startswith("qmp-proxy: error: "), lines
    assert fragment in lines[0], lines
    assert result.stdout == ""


MULTI = """
[[route]]
name = "a"
upstream = "/q1.sock"
listen = ["/l1.sock"]
[[route]]
name = "b"
upstream = "/q2.sock"
listen = ["/l2.sock"]
"""


@pytest.mark.parametrize(
    "flags", [["--upstream", "/q3.sock"], ["--listen", "/l3.sock"], ["--name", "c"]]
)
def test_route_flags_with_multi_route_file(tmp_path: Path, flags: list[str]) -> None:
    path = write(tmp_path, MULTI)
    result = run_proxy("--config", str(path), *flags)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert flags[0] in lines[0] and "multi-route" in lines[0], lines
    with pytest.raises(ConfigError):
        config.from_args(config.parser().parse_args(["--config", str(path), *flags]))


def args(*argv: str) -> config.Config:
    return config.from_args(config.parser().parse_args(list(argv)))


def test_one_route_file_with_listen_override(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_sessions = 3\n" + ROUTE)
    cfg = args("--config", str(path), "--listen", "/tmp/x.sock", "--listen", "tcp:[::1]:4444")
    (route,) = cfg.routes
    assert route.name == "vm1"
    assert route.upstream == address.parse("unix:/run/qemu/vm1.qmp")
    assert [str(lc.address) for lc in route.listen] == ["unix:/tmp/x.sock", "tcp:[::1]:4444"]
    assert all(lc.mode == 0o600 and lc.policy.open for lc in route.listen)
    assert cfg.limits.max_sessions == 3
    assert cfg.source == path


def test_one_route_file_with_upstream_and_name_override(tmp_path: Path) -> None:
    path = write(tmp_path, ROUTE)
    cfg = args("--config", str(path), "--upstream", "tcp:127.0.0.1:4445", "--name", "other")
    (route,) = cfg.routes
    assert route.name == "other"
    assert route.upstream == address.Address("tcp", host="127.0.0.1", port=4445)
    assert [str(lc.address) for lc in route.listen] == ["unix:/run/qmp-proxy/vm1.qmp"]


def test_flags_override_file_settings(tmp_path: Path) -> None:
    path = write(tmp_path, 'log_level = "warning"\nbackport = true\n' + ROUTE)
    cfg = args(
        "--config",
        str(path),
        "--log-level",
        "debug",
        "--backport",
        "off",
        "--max-queued",
        "5",
        "--client-wait",
        "0.25",
    )
    assert cfg.log_level == "debug"
    assert cfg.backport is False
    assert cfg.limits.max_queued == 5
    assert cfg.limits.client_wait == 0.25


@pytest.mark.parametrize(
    ("flags", "missing"),
    [(["--listen", "/l.sock"], "--upstream"), (["--upstream", "/q.sock"], "--listen")],
)
def test_flags_over_a_file_without_routes_must_name_both_ends(
    tmp_path: Path, flags: list[str], missing: str
) -> None:
    path = write(tmp_path, 'log_level = "info"\n')
    with pytest.raises(ConfigError) as raised:
        args("--config", str(path), *flags)
    (problem,) = raised.value.problems
    assert missing in problem and f"a [[route]] in {path}" in problem, problem
    assert args("--config", str(path), "--upstream", "/q.sock", "--listen", "/l.sock").routes


def test_flags_only() -> None:
    cfg = args("--upstream", "/q.sock", "--listen", "/l.sock")
    (route,) = cfg.routes
    assert route.name == "vm"
    assert route.upstream == address.Address("unix", path="/q.sock")
    assert cfg.metrics is None
    assert cfg.source is None
    assert cfg.limits == Limits()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9999", ("127.0.0.1", 9999)),
        ("127.0.0.1:9998", ("127.0.0.1", 9998)),
        ("0.0.0.0:9740", ("0.0.0.0", 9740)),
        ("[::1]:9997", ("::1", 9997)),
        (":9996", ("127.0.0.1", 9996)),
    ],
)
def test_metrics_flag(text: str, expected: tuple[str, int]) -> None:
    assert args("--upstream", "/q.sock", "--listen", "/l.sock", "--metrics", text).metrics == (
        expected
    )


def test_help_exits_0() -> None:
    result = run_proxy("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: qmp-proxy")
    for flag in ("--config", "--check-config", "--upstream", "--listen", "--metrics"):
        assert flag in result.stdout
