"""The Debian package, as an operator gets it: built, installed with apt, run, removed, purged.

``scripts/build-deb.sh`` builds the package once for the module; apt installs it on this
machine (tests run as root, on a throwaway CI machine: an installed qmp-proxy package there is
purged first).  The installed units are verified by ``systemd-analyze`` exactly as shipped; the
installed ``/usr/bin/qmp-proxy`` (its own venv under /usr/lib/qmp-proxy, never this checkout)
proxies a real QEMU 7.2; the man pages render without a warning and document every flag of the
parser; a remove keeps the conffiles and a purge leaves no file behind.  The module's finalizer
purges the package whatever happened, so a failure never leaves it installed.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from proxy import config
from tests.qemu import QemuProcess, RawQMP

REPO = Path(__file__).resolve().parent.parent
PROJECT: Final = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VERSION: Final = PROJECT["version"]
PACKAGE: Final = "qmp-proxy"
UNITS: Final = ("qmp-proxy.service", "qmp-proxy@.service", "qmp-proxy@.socket")
# Everywhere the package, or its maintainer scripts, may put a file.
OURS: Final = (
    "/usr/lib/qmp-proxy",
    "/etc/qmp-proxy",
    "/usr/bin/qmp-proxy*",
    "/lib/systemd/system/qmp-proxy*",
    "/etc/systemd/system/qmp-proxy*",
    "/etc/systemd/system/*/qmp-proxy*",
    "/var/lib/systemd/deb-systemd-helper-*/qmp-proxy*",
    "/var/lib/systemd/deb-systemd-helper-*/*/qmp-proxy*",
    "/usr/share/doc/qmp-proxy",
    "/usr/share/man/man8/qmp-proxy*",
    "/usr/share/lintian/overrides/qmp-proxy",
    "/var/lib/qmp-proxy",
)
# apt waits for a dpkg lock held by another apt (an unattended upgrade) instead of failing.
APT: Final = ("apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300")
APT_ENV: Final = dict(os.environ, DEBIAN_FRONTEND="noninteractive")


def run(argv: list[str], timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; its exit status is the caller's to judge (the output names what failed)."""
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


def must(argv: list[str], timeout: float = 300, **kwargs: Any) -> str:
    result = run(argv, timeout, **kwargs)
    assert result.returncode == 0, (
        f"{argv} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


def present() -> list[str]:
    """Every path of OURS that exists now (a dangling symlink counts)."""
    found: list[str] = []
    for pattern in OURS:
        found += glob.glob(pattern)
    return sorted(found)


def is_installed() -> bool:
    """True while dpkg knows the package in any state but not-installed (config-files too)."""
    result = run(["dpkg-query", "-W", "-f", "${Status}", PACKAGE], 30)
    return result.returncode == 0 and not result.stdout.endswith(" not-installed")


def purge() -> None:
    if is_installed():
        must([*APT, "purge", PACKAGE], env=APT_ENV)


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    """The package, built from this checkout (once), and a purge of it when the module ends."""
    purge()  # a run killed before its finalizer (CI machines are reused within a session)
    leftovers = present()
    assert leftovers == [], (
        f"files of {PACKAGE} exist before it is installed, so a purge could not be judged: "
        f"{leftovers}"
    )
    out = must([str(REPO / "scripts/build-deb.sh")], cwd=REPO).strip().splitlines()[-1]
    path = Path(out)
    assert path.name == f"qmp-proxy_{VERSION}_{must(['dpkg', '--print-architecture']).strip()}.deb"
    assert path.is_file(), out
    try:
        yield path
    finally:
        purge()


@pytest.fixture
def installed(deb: Path) -> Path:
    """The package installed the way an operator installs it (``apt-get install ./FILE``)."""
    if not is_installed() or not Path("/usr/bin/qmp-proxy").exists():
        # --no-install-recommends: QEMU is installed by scripts/install-qemu.sh already, and a
        # test must not fetch more than the package depends on.
        must(
            [*APT, "install", "--no-install-recommends", f"./{deb.name}"],
            cwd=deb.parent,
            env=APT_ENV,
        )
    return deb


def test_license_file_and_copyright_match_pyproject() -> None:
    """LICENSE is the text of the licence pyproject.toml names, and so is the package's."""
    assert PROJECT["license"] == {"text": "GPL-2.0-or-later"}
    assert (REPO / "LICENSE").read_bytes() == Path("/usr/share/common-licenses/GPL-2").read_bytes()


def test_package_installs_the_daemon_units_config_and_docs(installed: Path) -> None:
    listed = set(must(["dpkg", "-L", PACKAGE]).splitlines())
    for path in (
        "/usr/bin/qmp-proxy",
        "/usr/bin/qmp-proxy-qemu",
        *(f"/lib/systemd/system/{unit}" for unit in UNITS),
        "/etc/qmp-proxy/qmp-proxy.toml",
        "/etc/qmp-proxy/qemu.toml",
        "/usr/share/man/man8/qmp-proxy.8.gz",
        "/usr/share/man/man8/qmp-proxy-qemu.8.gz",
        "/usr/share/doc/qmp-proxy/copyright",
        "/usr/share/doc/qmp-proxy/changelog.Debian.gz",
        *(f"/usr/share/doc/qmp-proxy/examples/{p.name}" for p in (REPO / "examples").glob("*")),
    ):
        assert path in listed, f"{path} is not in the package"
        assert Path(path).exists(), f"{path} is in the package but not on disk"
    # The commands are the venv's console scripts, run by Debian's python, not this checkout's.
    for command in ("qmp-proxy", "qmp-proxy-qemu"):
        target = Path(f"/usr/bin/{command}").resolve()
        assert target == Path(f"/usr/lib/qmp-proxy/bin/{command}"), target
        assert target.read_text().startswith("#!/usr/lib/qmp-proxy/bin/python\n")
    assert Path("/usr/lib/qmp-proxy/bin/python").resolve().parent == Path("/usr/bin")
    assert must(["/usr/bin/qmp-proxy", "--version"], cwd="/").strip() == f"qmp-proxy {VERSION}"
    # libvirt's wrapper reads the installed /etc/qmp-proxy/qemu.toml and, for anything but a
    # domain start (here a capability probe), execs the QEMU it names unchanged.
    env = {k: v for k, v in os.environ.items() if k != "QMP_PROXY_QEMU_CONFIG"}
    probe = must(["/usr/bin/qmp-proxy-qemu", "-version"], cwd="/", env=env)
    assert probe.startswith("QEMU emulator version "), probe
    conffiles = must(["dpkg-query", "-W", "-f", "${Conffiles}", PACKAGE])
    assert {line.split()[0] for line in conffiles.strip().splitlines()} == {
        "/etc/qmp-proxy/qmp-proxy.toml",
        "/etc/qmp-proxy/qemu.toml",
    }
    for conffile in ("qmp-proxy.toml", "qemu.toml"):
        shipped = Path("/etc/qmp-proxy", conffile).read_bytes()
        assert shipped == (REPO / "config" / conffile).read_bytes(), conffile
    # The shipped bytecode-free venv got its .pyc at install time (the postinst), not from dpkg.
    assert not [p for p in listed if p.endswith(".pyc")], "the package ships bytecode"
    assert list(Path("/usr/lib/qmp-proxy/lib").rglob("proxy/__pycache__/config.*.pyc"))
    dep5 = Path("/usr/share/doc/qmp-proxy/copyright").read_text()
    assert dep5.startswith("Format: https://www.debian.org/doc/packaging-manuals/")
    assert "\nFiles: *\nCopyright: " in dep5 and "\nLicense: GPL-2+\n" in dep5
    for dependency in PROJECT["dependencies"]:  # bundled in the venv: each has its licence
        name = dependency.split(">")[0].replace("-", "_")
        assert f"/site-packages/{name}/*" in dep5, (name, dep5)
    control = must(["dpkg-query", "-W", "-f", "${Depends}|${Recommends}", PACKAGE])
    assert "python3 (>= 3.11)" in control and "qemu-system-x86" in control, control


def test_installed_units_verify_as_shipped(installed: Path) -> None:
    """systemd-analyze on the files in /lib/systemd/system, unchanged: their ExecStart= exists."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing (Debian: apt-get install systemd)"
    for unit in UNITS:
        text = Path("/lib/systemd/system", unit).read_text()
        assert text == (REPO / "systemd" / unit).read_text(), unit
        if unit.endswith(".service"):
            assert "\nExecStart=/usr/bin/qmp-proxy --config /etc/qmp-proxy/" in text, unit
    paths = [
        "/lib/systemd/system/qmp-proxy.service",
        "/lib/systemd/system/qmp-proxy@vm1.service",
        "/lib/systemd/system/qmp-proxy@vm1.socket",
    ]
    result = run(
        [analyze, "verify", *paths],
        60,
        cwd="/",
        env=dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER=""),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"systemd-analyze verify failed:\n{output}"
    assert [line for line in output.splitlines() if "qmp-proxy" in line] == [], output


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"qmp-proxy exited {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never accepted a connection:\n{log.read_text()}")
        time.sleep(0.05)


def test_installed_binary_proxies_real_qemu(installed: Path) -> None:
    """/usr/bin/qmp-proxy in front of QEMU 7.2: QEMU's greeting, a command, the live view."""
    work = Path(tempfile.mkdtemp(prefix="qp-deb-"))
    log = work / "proxy.log"
    listen, control = work / "vm1.qmp", work / "control.sock"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    try:
        with QemuProcess("7.2", "-M", "none") as qemu, log.open("wb") as log_file:
            argv = [
                "/usr/bin/qmp-proxy",
                "--name",
                "vm1",
                "--upstream",
                f"unix:{qemu.sock_path}",
                "--listen",
                f"unix:{listen}",
                "--control",
                f"unix:{control}",
                "--state-dir",
                str(work / "state"),
            ]
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                cwd=work,
                env=env,
            )
            try:
                wait_for_socket(listen, proc, log)
                # The process runs the package's code with the package's interpreter.
                maps = Path(f"/proc/{proc.pid}/maps").read_text()
                assert "/usr/lib/qmp-proxy/lib/python3" in maps, "not the package's venv"
                assert os.path.realpath(f"/proc/{proc.pid}/exe").startswith("/usr/bin/python3")
                with RawQMP(str(listen)) as client:
                    greeting = client.negotiate()
                    assert greeting["QMP"]["version"]["qemu"]["major"] == 7, greeting
                    reply = client.command({"execute": "query-status", "id": "deb"})
                    assert reply == {
                        "return": {"status": "prelaunch", "singlestep": False, "running": False},
                        "id": "deb",
                    }, f"{reply}\nproxy log:\n{log.read_text()}\nQEMU:\n{qemu.stderr_text()}"
                    live = [
                        "/usr/bin/qmp-proxy",
                        "status",
                        "--json",
                        "--control",
                        f"unix:{control}",
                    ]
                    status = json.loads(must(live, env=env))
                    (route,) = status["routes"]
                    assert route["route"] == "vm1" and route["state"] == "ready", status
                    assert len(route["sessions"]) == 1, status
                    assert route["sessions"][0]["commands_done"] >= 1, status
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                try:
                    rc = proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
            assert rc == 0, f"qmp-proxy exited {rc} on SIGTERM:\n{log.read_text()}"
        # The shipped configs and examples are valid for the installed binary itself.
        examples = sorted(Path("/usr/share/doc/qmp-proxy/examples").glob("*.toml"))
        assert examples, "no examples installed"
        for path in [Path("/etc/qmp-proxy/qmp-proxy.toml"), *examples]:
            must(["/usr/bin/qmp-proxy", "--check-config", str(path)], env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_man_pages_render_and_document_every_flag(installed: Path) -> None:
    env = dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="100", LC_ALL="C.UTF-8")
    for page in ("qmp-proxy", "qmp-proxy-qemu"):
        path = Path(f"/usr/share/man/man8/{page}.8.gz")
        roff = gzip.decompress(path.read_bytes())
        # groff's own checks: every warning enabled, none given.
        result = run(["groff", "-man", "-Tutf8", "-ww", "-z"], 60, input=roff.decode(), env=env)
        assert result.returncode == 0 and result.stderr == "", f"{page}: {result.stderr}"
        # man finds it by name (its database knows the package's pages).
        shown = must(["man", "8", page], env=env)
        assert f"{page.upper()}(8)" in shown, shown[:500]
    shown = must(["man", "8", "qmp-proxy"], env=env)
    for action in [*config.parser()._actions]:
        for flag in action.option_strings:
            assert flag in shown, f"man qmp-proxy does not document {flag}"
    assert "qmp-proxy status" in shown and "--json" in shown
    assert "QMP_PROXY_QEMU_CONFIG" in must(["man", "8", "qmp-proxy-qemu"], env=env)


def test_remove_keeps_conffiles_and_purge_leaves_nothing(installed: Path) -> None:
    listed = must(["dpkg", "-L", PACKAGE]).splitlines()
    # Only the package's own paths: shared directories (/usr/bin, /etc) stay, as they should.
    owned = [p for p in listed if "qmp-proxy" in p]
    assert len(owned) > 50, owned
    created = present()
    assert "/usr/lib/qmp-proxy" in created and "/etc/qmp-proxy" in created, created
    # The postinst's record of the unit, which only the postrm's purge removes.
    state = "/var/lib/systemd/deb-systemd-helper-enabled/qmp-proxy.service.dsh-also"
    assert state in created, created

    must([*APT, "remove", PACKAGE], env=APT_ENV)
    status = must(["dpkg-query", "-W", "-f", "${Status}", PACKAGE])
    assert status == "deinstall ok config-files", status
    assert sorted(os.listdir("/etc/qmp-proxy")) == ["qemu.toml", "qmp-proxy.toml"]
    for gone in (
        "/usr/lib/qmp-proxy",
        "/usr/bin/qmp-proxy",
        "/lib/systemd/system/qmp-proxy@.service",
    ):
        assert not os.path.lexists(gone), f"{gone} survived a remove"
    # Masked until purged, as debhelper's packages do: a stale enablement cannot start it.
    assert os.readlink("/etc/systemd/system/qmp-proxy.service") == "/dev/null"

    must([*APT, "purge", PACKAGE], env=APT_ENV)
    assert not is_installed()
    left = [p for p in owned if os.path.lexists(p)]
    assert left == [], f"a purge left files of the package: {left}"
    assert present() == [], f"a purge left files behind: {present()}"
