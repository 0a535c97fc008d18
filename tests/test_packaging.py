"""Packaging: the Dockerfile, the README's install command, the console script.

The image must install the package the way the README tells operators to, run the same entry
point as everywhere (the ``[project.scripts]`` console script) as a non-root user, keep the
sockets on a volume and check ``/healthz``.  The HEALTHCHECK command itself is run against a
real proxy, so a typo in it fails here rather than in production.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from proxy import config
from tests.helpers import console_script, free_port
from tests.proxyproc import ProxyProcess
from tests.qemu import QemuProcess

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
README = (REPO / "README.md").read_text()


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a continuation line"
    return out


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def script_name() -> str:
    """The daemon's console script (the other one is libvirt's emulator wrapper)."""
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"qmp-proxy", "qmp-proxy-qemu"}, scripts
    assert scripts["qmp-proxy"] == "proxy.__main__:main", scripts
    return "qmp-proxy"


# -- the README and the image agree -------------------------------------------------------------


def readme_install_commands() -> list[list[str]]:
    commands = []
    for found in re.finditer(r"`([^`\n]*\bpip install\b[^`\n]*)`", README):
        commands.append(shlex.split(found.group(1)))
    for block in re.findall(r"```(?:sh|bash|console)?\n(.*?)```", README, re.S):
        for line in block.splitlines():
            if re.search(r"\bpip install\b", line):
                commands.append(shlex.split(line.split("#", 1)[0]))
    return commands


def pip_targets(argv: list[str]) -> list[str]:
    """The positional arguments after ``pip install`` (what is installed)."""
    i = argv.index("install")
    targets = []
    skip = False
    for arg in argv[i + 1 :]:
        if skip:
            skip = False
        elif arg in ("-r", "-c", "-e", "--target", "--prefix", "--root", "-t"):
            skip = arg != "-e"
            if arg == "-e":
                continue
        elif arg.startswith("-"):
            continue
        elif arg in ("&&", ";", "|"):
            break
        else:
            targets.append(arg)
    return targets


def test_readme_states_an_install_command() -> None:
    commands = readme_install_commands()
    assert commands, "README.md gives no `pip install` command for operators"
    assert any(pip_targets(c) == ["."] for c in commands), commands
    assert script_name() in README


def test_dockerfile_installs_the_way_the_readme_says() -> None:
    readme_targets = {tuple(pip_targets(c)) for c in readme_install_commands()}
    runs = [shlex.split(r) for r in instructions("RUN")]
    installs = []
    for argv in runs:
        for i, word in enumerate(argv):
            if word == "pip" and argv[i + 1 : i + 2] == ["install"]:
                installs.append(argv[i:])
    assert installs, "the Dockerfile never runs pip install"
    for argv in installs:
        targets = tuple(pip_targets(argv))
        assert targets in readme_targets, (argv, readme_targets)
        assert "-e" not in argv and "--editable" not in argv, "an image wants a real install"


def test_dockerfile_copies_what_the_build_needs() -> None:
    copied: set[str] = set()
    workdir = "/"
    for word, args in dockerfile():
        if word == "WORKDIR":
            workdir = args
        if word == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            copied.update(p.rstrip("/") for p in parts[:-1])
    project = PYPROJECT["project"]
    needed = {"pyproject.toml", project["readme"]}
    needed.update(PYPROJECT["tool"]["setuptools"]["packages"])
    assert needed <= copied, f"the image build lacks {needed - copied}"
    # pip install . runs where the sources were copied.
    assert workdir.startswith("/"), workdir


def test_dockerfile_base_matches_requires_python() -> None:
    (base,) = instructions("FROM")
    found = re.match(r"python:(\d+)\.(\d+)", base)
    assert found, base
    required = re.match(r">=\s*(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert required
    assert tuple(map(int, found.groups())) >= tuple(map(int, required.groups())), base


def test_dockerfile_runs_as_non_root() -> None:
    users = instructions("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    runs = " ".join(instructions("RUN"))
    created = re.search(r"useradd\b.*?\s" + re.escape(user) + r"\b", runs)
    assert created, f"USER {user} is never created"
    uid = re.search(r"--uid\s+(\d+)", created.group(0))
    assert uid is None or int(uid.group(1)) != 0
    # USER comes after the RUNs that need root, before the entry point.
    words = [w for w, _ in dockerfile()]
    last_user = len(words) - 1 - words[::-1].index("USER")
    assert "RUN" not in words[last_user:], "RUN after USER: the install would run unprivileged"


def test_dockerfile_socket_volume_owned_by_the_user() -> None:
    (volume,) = instructions("VOLUME")
    paths = exec_form(volume) if volume.startswith("[") else volume.split()
    assert "/run/qmp-proxy" in paths, paths
    user = instructions("USER")[-1].split(":")[0]
    runs = " ".join(instructions("RUN"))
    assert re.search(rf"chown\s+{re.escape(user)}(:\S+)?\s+/run/qmp-proxy\b", runs), runs


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    (entrypoint,) = instructions("ENTRYPOINT")
    argv = exec_form(entrypoint)
    assert argv == [script_name()], argv
    target = PYPROJECT["project"]["scripts"][script_name()]
    assert target == "proxy.__main__:main", target
    # CMD holds arguments the entry point accepts, complete without a config file (one the
    # README's mounts need not provide): tests/test_container.py runs it.
    (cmd,) = instructions("CMD")
    args = config.parser().parse_args(exec_form(cmd))
    assert args.config is None, "CMD names a config file the image does not have"
    config.from_args(args)
    host, port = config.parse_metrics(args.metrics)
    assert host == "0.0.0.0", "inside a container, metrics must listen beyond loopback"
    exposed = {int(p.split("/")[0]) for e in instructions("EXPOSE") for p in e.split()}
    assert port in exposed, (port, exposed)


def healthcheck_argv() -> list[str]:
    (check,) = instructions("HEALTHCHECK")
    assert " CMD " in f" {check} ", check
    command = check.split("CMD", 1)[1].strip()
    return exec_form(command) if command.startswith("[") else shlex.split(command)


def test_dockerfile_healthcheck_hits_healthz() -> None:
    argv = healthcheck_argv()
    joined = " ".join(argv)
    assert "/healthz" in joined, joined
    (cmd,) = instructions("CMD")
    _, port = config.parse_metrics(config.parser().parse_args(exec_form(cmd)).metrics)
    assert f":{port}/healthz" in joined, (port, joined)


def test_healthcheck_command_works(tmp_path: Path, qemu72: QemuProcess) -> None:
    argv = healthcheck_argv()
    assert argv[0] == "python", argv  # the image's python; here, ours
    port = free_port()
    argv = [sys.executable, *(a.replace(":9740/", f":{port}/") for a in argv[1:])]
    assert any(f":{port}/healthz" in a for a in argv), argv
    dead = subprocess.run(argv, capture_output=True, timeout=20)
    assert dead.returncode != 0, "healthy with nothing listening"
    with ProxyProcess(
        "--upstream",
        qemu72.sock_path,
        "--listen",
        str(tmp_path / "p.sock"),
        "--metrics",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(tmp_path),
        tmp_path=tmp_path,
    ) as p:
        p.wait_log("event=metrics_listening")
        alive = subprocess.run(argv, capture_output=True, timeout=20)
        assert alive.returncode == 0, alive.stderr
        assert p.stop(signal.SIGTERM) == 0


# -- the entry points ---------------------------------------------------------------------------


def test_python_m_proxy_help() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: qmp-proxy"), result.stdout
    assert "--config" in result.stdout


def test_console_script_help_and_check_config() -> None:
    script = console_script(script_name())
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: qmp-proxy"), result.stdout
    example = REPO / "config" / "qmp-proxy.toml"
    result = subprocess.run(
        [str(script), "--check-config", str(example)], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{example}: ok (1 route)"


def test_console_script_runs_the_proxy(tmp_path: Path, qemu72: QemuProcess) -> None:
    from tests.qemu import RawQMP

    script = console_script(script_name())
    sock = tmp_path / "p.sock"
    log = tmp_path / "log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                str(script),
                "--upstream",
                qemu72.sock_path,
                "--listen",
                str(sock),
                "--state-dir",
                str(tmp_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 10
            while "event=upstream_ready" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            with RawQMP(str(sock)) as c:
                c.negotiate()
                assert c.command({"execute": "query-status"})["return"]["status"] == "prelaunch"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
