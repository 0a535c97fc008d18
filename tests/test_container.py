"""The container image, run the way a container engine runs it, from the Dockerfile's own words.

No container engine can build the image here: Debian's podman runs containers on this host (with
runc, vfs storage and lowered ulimits), but the image's base, ``python:3.11-slim``, cannot be
pulled without a registry.  So these tests do what the engine does with what the Dockerfile
says, read from the Dockerfile each time (nothing is copied from it):

* the image's user and group (``groupadd``/``useradd``), the directories its ``RUN`` creates
  with their owner and mode, its ``ENV``, ``WORKDIR``, ``ENTRYPOINT``, ``CMD``, ``VOLUME`` and
  ``HEALTHCHECK``;
* the ``docker run`` lines of its header comment: their volumes and the arguments after the
  image name, so the documented override cannot drift from what is tested.

The entry point then runs as the image's uid and gid (``setpriv``) in a mount and network
namespace of its own (``unshare``): the image's paths are the real ones (``/run/qemu``,
``/run/qmp-proxy``, ``/var/lib/qmp-proxy``, ``/etc/qmp-proxy``), laid over the host's by
overlay and bind mounts that vanish with the namespace, and ``0.0.0.0:9740`` is the container's
own port.  The image's build is replayed once for this module: its ``COPY`` lines into a
directory that plays ``WORKDIR``, and its ``pip install`` command, run there by a virtual
environment of the host's ``/usr/bin/python3`` that plays the base image's ``/usr/local``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy import config
from tests.qemu import QemuProcess, RawQMP
from tests.test_crash_safety import group_ended
from tests.test_packaging import REPO, dockerfile, exec_form

# Real QEMU behind the proxy (the marker selects the tests that need the system).
pytestmark = pytest.mark.qemu

DOCKERFILE = REPO / "Dockerfile"
TIMEOUT = 15.0
# What the base image puts on PATH after /usr/local/bin (which the built virtualenv plays).
BASE_PATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
# A Python the image's user can run (this test's own may live under a private home).
BASE_PYTHON = "/usr/bin/python3"
BASE_ENV = {"LANG": "C.UTF-8"}  # python:3.11-slim's own ENV


# -- what the Dockerfile says -------------------------------------------------------------------


@dataclass
class Image:
    """The parts of the image that decide how its entry point runs."""

    user: str
    uid: int
    gid: int
    workdir: str
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: str
    volumes: list[str]
    exposed: set[int]
    # Directories the image's RUN creates: path -> (uid, gid, mode).
    dirs: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    copies: list[list[str]] = field(default_factory=list)  # COPY SRC... DEST
    installs: list[list[str]] = field(default_factory=list)  # RUN python -m pip install ...


def _run_commands() -> list[list[str]]:
    """Every command of every RUN, split at ``&&``."""
    commands: list[list[str]] = []
    for word, args in dockerfile():
        if word != "RUN":
            continue
        current: list[str] = []
        for token in shlex.split(args):
            if token == "&&":
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return commands


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def image() -> Image:
    """Parse the Dockerfile; a RUN command it does not know fails, so it keeps up with it."""
    groups: dict[str, int] = {"root": 0}
    users: dict[str, tuple[int, int]] = {"root": (0, 0)}
    dirs: dict[str, tuple[int, int, int]] = {}
    installs: list[list[str]] = []
    for argv in _run_commands():
        if argv[:1] == ["groupadd"]:
            fixed = _option(argv, "--gid")
            assert fixed is not None, f"a group without a fixed gid: {argv}"
            groups[argv[-1]] = int(fixed)
        elif argv[:1] == ["useradd"]:
            number, group = _option(argv, "--uid"), _option(argv, "--gid")
            assert number is not None and group is not None, f"uid and group must be fixed: {argv}"
            users[argv[-1]] = (int(number), groups[group] if group in groups else int(group))
        elif argv[:2] == ["mkdir", "-p"]:
            dirs.update({path: (0, 0, 0o755) for path in argv[2:]})
        elif argv[:1] == ["chown"]:
            user, _, group = argv[1].partition(":")
            for path in argv[2:]:
                dirs[path] = (
                    users[user][0],
                    groups[group] if group else dirs[path][1],
                    dirs[path][2],
                )
        elif argv[:1] == ["chmod"]:
            for path in argv[2:]:
                dirs[path] = (*dirs[path][:2], int(argv[1], 8))
        elif argv[:4] == ["python", "-m", "pip", "install"]:
            installs.append(argv)
        else:
            raise AssertionError(f"the test does not know what this RUN command does: {argv}")
    env = dict(BASE_ENV)
    for word, args in dockerfile():
        if word == "ENV":
            for assignment in shlex.split(args):
                key, sep, value = assignment.partition("=")
                assert sep, f"ENV {args}: only KEY=VALUE is understood"
                env[key] = value
    (user,) = [args for word, args in dockerfile() if word == "USER"]
    (workdir,) = [args for word, args in dockerfile() if word == "WORKDIR"]
    (entrypoint,) = [args for word, args in dockerfile() if word == "ENTRYPOINT"]
    (cmd,) = [args for word, args in dockerfile() if word == "CMD"]
    (volume,) = [args for word, args in dockerfile() if word == "VOLUME"]
    exposed = {int(p.split("/")[0]) for w, a in dockerfile() if w == "EXPOSE" for p in a.split()}
    (check,) = [args for word, args in dockerfile() if word == "HEALTHCHECK"]
    health = check.split(" CMD ", 1)[1].strip()
    assert not health.startswith("["), "an exec-form HEALTHCHECK: run it without /bin/sh -c"
    uid, gid = users[user]
    copies = [shlex.split(args) for word, args in dockerfile() if word == "COPY"]
    return Image(
        user,
        uid,
        gid,
        workdir,
        env,
        exec_form(entrypoint),
        exec_form(cmd),
        health,
        exec_form(volume),
        exposed,
        dirs,
        copies,
        installs,
    )


@dataclass
class RunExample:
    """One ``docker run`` line of the Dockerfile's header comment."""

    text: str
    volumes: list[tuple[str, str, bool]]  # (host path or volume name, container path, read-only)
    ports: list[str]
    args: list[str]  # what replaces CMD


# docker run options the examples may use: those that take a value, and plain flags.
_VALUED = {"-v", "--volume", "-p", "--publish", "--name", "--group-add"}
_FLAGS = {"-d", "--detach", "--rm"}


def run_examples() -> list[RunExample]:
    """The ``docker run`` lines of the Dockerfile's comments, continuation lines joined."""
    texts: list[str] = []
    pending: str | None = None
    for raw in DOCKERFILE.read_text().splitlines():
        if not raw.startswith("#"):
            assert pending is None, f"a docker run example ends in a continuation: {pending}"
            continue
        text = raw[1:].strip()
        if pending is None and not text.startswith("docker run "):
            continue
        pending = f"{pending or ''} {text.removesuffix(chr(92))}"
        if not text.endswith("\\"):
            texts.append(pending.strip())
            pending = None
    examples = []
    for text in texts:
        tokens = shlex.split(text)[2:]
        volumes: list[tuple[str, str, bool]] = []
        ports: list[str] = []
        while tokens and tokens[0].startswith("-"):
            option = tokens.pop(0)
            if option in _FLAGS:
                continue
            assert option in _VALUED, f"{text}: the test does not know docker run {option}"
            value = tokens.pop(0)
            if option in ("-v", "--volume"):
                source, target, *mode = value.split(":")
                volumes.append((source, target, mode == ["ro"]))
            elif option in ("-p", "--publish"):
                ports.append(value)
        assert tokens and tokens[0] == "qmp-proxy", f"{text}: no image name"
        examples.append(RunExample(text, volumes, ports, tokens[1:]))
    return examples


# -- the container ------------------------------------------------------------------------------

# Runs as root in the new mount and network namespace: lays the image's directories and the
# volumes over the host's paths, brings up loopback, then becomes the image's user and runs the
# command (exec: the entry point keeps this pid, which docker stop would signal).
_INIT = r"""
import fcntl, json, os, socket, struct, subprocess, sys
spec = json.loads(sys.argv[1])
def run(*argv):
    subprocess.run(argv, check=True)
run("mount", "--make-rprivate", "/")
run("mount", "-t", "tmpfs", "-o", "mode=0700", "scratch", spec["scratch"])
overlaid = {}
for d in spec["dirs"]:
    parent = os.path.dirname(d["path"])
    if parent not in overlaid:
        layer = os.path.join(spec["scratch"], str(len(overlaid)))
        os.makedirs(layer + "/upper"), os.makedirs(layer + "/work")
        run("mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={parent},upperdir={layer}/upper,workdir={layer}/work", parent)
        overlaid[parent] = layer
    os.makedirs(d["path"], exist_ok=True)
    if d["source"] is not None:
        run("mount", "--bind", d["source"], d["path"])
        if d["ro"]:
            run("mount", "-o", "remount,bind,ro", d["path"])
    else:
        os.chown(d["path"], d["uid"], d["gid"])
        os.chmod(d["path"], d["mode"])
lo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # loopback up (SIOCGIFFLAGS, SIOCSIFFLAGS)
flags = struct.unpack("16sH", fcntl.ioctl(lo, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
fcntl.ioctl(lo, 0x8914, struct.pack("16sH", b"lo", flags | 1))
with open(spec["pidfile"], "w") as f:
    f.write(str(os.getpid()))
os.chdir(spec["cwd"])
os.execvpe("setpriv", ["setpriv", *spec["setpriv"], "--", *spec["argv"]], spec["env"])
"""


class Container:
    """The image's entry point and ``args`` with the volumes of a ``docker run`` line.

    ``volumes`` maps a container path to a host directory (a bind mount, as the operator made
    it) or to None (a named or anonymous volume: a fresh copy of the image's directory).
    """

    def __init__(
        self,
        built: Built,
        args: list[str],
        volumes: dict[str, tuple[Path | None, bool]],
        scratch: Path,
    ) -> None:
        img = self.image = built.image
        self.argv = [*img.entrypoint, *(args or img.cmd)]  # arguments after the image replace CMD
        self.scratch = scratch
        self.volume_dirs: dict[str, Path] = {}
        dirs: list[dict[str, Any]] = []
        for path in sorted(set(img.dirs) | set(volumes)):
            source, ro = volumes.get(path, (None, False))
            uid, gid, mode = img.dirs.get(path, (0, 0, 0o755))
            if source is None and (path in volumes or path in img.volumes):
                # A volume the engine creates: initialised from the image's directory.
                source = scratch / "volumes" / path.strip("/").replace("/", "-")
                source.mkdir(parents=True)
                os.chown(source, uid, gid)
                source.chmod(mode)
            if source is not None:
                self.volume_dirs[path] = source
            dirs.append(
                {
                    "path": path,
                    "source": None if source is None else str(source),
                    "ro": ro,
                    "uid": uid,
                    "gid": gid,
                    "mode": mode,
                }
            )
        self.env = {**img.env, "PATH": f"{built.prefix / 'bin'}:{BASE_PATH}"}
        self.workdir = built.workdir
        self.setpriv = [f"--reuid={img.uid}", f"--regid={img.gid}", "--clear-groups"]
        (scratch / "ns").mkdir()
        self.pidfile = scratch / "pid"
        self.log_path = scratch / "container.log"
        self.spec = {
            "scratch": str(scratch / "ns"),
            "dirs": dirs,
            "pidfile": str(self.pidfile),
            "cwd": str(built.workdir),
            "setpriv": self.setpriv,
            "argv": self.argv,
            "env": self.env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Container:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--net",
                    "--fork",
                    "--kill-child",
                    sys.executable,
                    "-c",
                    _INIT,
                    json.dumps(self.spec),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        """The entry point's pid (what ``docker stop`` signals)."""
        deadline = time.monotonic() + TIMEOUT
        while not (self.pidfile.exists() and self.pidfile.read_text()):
            assert self.proc is not None and self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.01)
        return int(self.pidfile.read_text())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while needle not in (text := self.log()):
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged (rc={self.proc.poll()}):\n{text}")
            time.sleep(0.02)
        return text

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """``docker exec``: in the container's namespaces, as its user, with its environment."""
        return subprocess.run(
            [
                "nsenter",
                f"--target={self.pid}",
                "--mount",
                "--net",
                f"--wd={self.workdir}",
                "setpriv",
                *self.setpriv,
                "--",
                "env",
                "-i",
                *(f"{k}={v}" for k, v in self.env.items()),
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        """The HEALTHCHECK's CMD as the engine runs a string: ``/bin/sh -c``."""
        return self.exec("/bin/sh", "-c", self.image.healthcheck)

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait(TIMEOUT)

    def stop(self) -> int:
        """``docker stop``: SIGTERM to the entry point, then its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()  # --kill-child takes the entry point with it
                self.proc.wait()

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _traversable_tmp() -> Iterator[Path]:
    """A short directory the image's user can traverse (unix socket paths stay < 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="qc-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


@pytest.fixture
def scratch() -> Iterator[Path]:
    with _traversable_tmp() as path:
        yield path


@dataclass
class Built:
    """The image's build replayed: its WORKDIR's files and its /usr/local."""

    image: Image
    workdir: Path
    prefix: Path


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    """COPY and ``pip install`` as the Dockerfile says, once for these tests."""
    img = image()
    with _traversable_tmp() as root:
        workdir = root / img.workdir.strip("/")
        workdir.mkdir(parents=True)
        for *sources, dest in img.copies:
            target = workdir / dest if not dest.startswith("/") else root / dest.strip("/")
            for source in sources:
                origin = REPO / source
                if origin.is_dir():
                    shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(origin, target / origin.name if dest.endswith("/") else target)
        prefix = root / "usr-local"
        usable = _as_user(img, BASE_PYTHON, "-c", "")
        assert usable.returncode == 0, f"uid {img.uid} cannot run {BASE_PYTHON}: {usable}"
        venv = subprocess.run(
            [BASE_PYTHON, "-m", "venv", str(prefix)], capture_output=True, text=True, timeout=120
        )
        assert venv.returncode == 0, f"{venv.stderr} (Debian: apt-get install python3-venv)"
        assert img.installs, "the Dockerfile installs nothing"
        for argv in img.installs:
            done = subprocess.run(
                [str(prefix / "bin" / "python"), *argv[1:]],
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, done.stderr
        assert (prefix / "bin" / img.entrypoint[0]).exists(), img.entrypoint
        yield Built(img, workdir, prefix)


def _as_user(img: Image, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={img.uid}",
            f"--regid={img.gid}",
            "--clear-groups",
            "--",
            "env",
            "-i",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def host_dirs(
    example: RunExample, scratch: Path, img: Image
) -> dict[str, tuple[Path | None, bool]]:
    """The example's volumes: its host paths made under ``scratch`` as the README says an
    operator makes them (the proxy's socket directory owned by the image's user), named
    volumes left to the engine."""
    volumes: dict[str, tuple[Path | None, bool]] = {}
    for source, target, ro in example.volumes:
        if not source.startswith("/"):
            volumes[target] = (None, ro)
            continue
        host = scratch / "host" / source.strip("/").replace("/", "-")
        host.mkdir(parents=True)
        if target == "/run/qmp-proxy":
            os.chown(host, img.uid, img.gid)
        volumes[target] = (host, ro)
    return volumes


@contextlib.contextmanager
def qemu_at(path: str, img: Image) -> Iterator[tuple[QemuProcess, Path]]:
    """QEMU 7.2 and the host directory to mount at ``/run/qemu`` so that its QMP socket is
    ``path`` there: the helper's own socket directory, its socket's group the image's and
    group-writable (what the README asks of the operator); another name is a symlink."""
    with QemuProcess("7.2", "-M", "none") as q, group_ended(q):
        assert q.tmpdir is not None
        q.tmpdir.chmod(0o755)
        sock = Path(q.sock_path)
        os.chown(sock, -1, img.gid)
        sock.chmod(0o660)
        name = Path(path).relative_to("/run/qemu")
        if name != Path(sock.name):
            (q.tmpdir / name).symlink_to(sock.name)
        yield q, q.tmpdir


def metrics_port(args: list[str]) -> int | None:
    metrics = config.parser().parse_args(args).metrics
    return None if metrics is None else config.parse_metrics(metrics)[1]


def round_trip(sock: Path) -> None:
    """A client's QMP session through the container's socket, and a split migrate (QEMU 7.2
    lacks migrate's capabilities): it answers only once its journal was written."""
    deadline = time.monotonic() + TIMEOUT
    while not sock.exists():
        assert time.monotonic() < deadline, f"{sock} never appeared"
        time.sleep(0.02)
    with RawQMP(str(sock)) as c:
        greeting = c.negotiate()
        assert greeting["QMP"]["version"]["qemu"]["major"] == 7, greeting
        assert c.command({"execute": "query-status"})["return"]["status"] == "prelaunch"
        caps = [{"capability": "events", "state": True}]
        migrate = {"uri": "exec:cat >/dev/null", "capabilities": caps}
        assert c.command({"execute": "migrate", "arguments": migrate}) == {"return": {}}
        states = c.command({"execute": "query-migrate-capabilities"})["return"]
        assert {"capability": "events", "state": True} in states, states


# -- tests --------------------------------------------------------------------------------------


def test_the_examples_are_the_image_s_command_lines() -> None:
    """The header's examples: the first runs the default CMD, the others replace it with
    arguments that keep CMD's --metrics (the HEALTHCHECK's port) and that the entry point
    accepts; every volume they mount is one the image documents, its ports the exposed one."""
    img = image()
    examples = run_examples()
    assert len(examples) >= 2, [e.text for e in examples]
    assert examples[0].args == [], examples[0].text
    port = metrics_port(img.cmd)
    assert port in img.exposed and f":{port}/healthz" in img.healthcheck, (port, img)
    documented = set(img.volumes) | {"/run/qemu", "/etc/qmp-proxy"}
    for example in examples:
        args = example.args or img.cmd
        assert metrics_port(args) == port, f"{example.text}: --metrics is not CMD's"
        parsed = config.parser().parse_args(args)  # the file it names: the next tests
        if parsed.config is None:
            config.from_args(parsed)
        assert {target for _, target, _ in example.volumes} <= documented, example.text
        assert [p.rsplit(":", 1)[1] for p in example.ports] == [str(port)], example.text
    for path in img.volumes:
        assert path in img.dirs and img.dirs[path][0] == img.uid, f"{path} not the user's"


def test_the_state_directory_is_the_image_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """``$STATE_DIRECTORY`` (the image's ENV) is the default when systemd's
    ``$RUNTIME_DIRECTORY`` is not set, whatever arguments replace CMD; a flag still wins."""
    img = image()
    state = img.env["STATE_DIRECTORY"]
    assert img.dirs[state] == (img.uid, img.gid, 0o700), img.dirs
    assert state in img.volumes, "the journal must outlive the container"
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("STATE_DIRECTORY", state)
    cfg = config.from_args(config.parser().parse_args(img.cmd))
    assert config.state_directory(cfg) == Path(state)
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/elsewhere")
    assert config.state_directory(cfg) == Path("/run/elsewhere")
    cfg = config.from_args(config.parser().parse_args([*img.cmd, "--state-dir", "/x"]))
    assert config.state_directory(cfg) == Path("/x")


def test_default_cmd_serves_qemu(built: Built, scratch: Path) -> None:
    """The first example as the engine runs it: QMP through it, journal and lock in the state
    volume, the HEALTHCHECK passes, ``qmp-proxy status`` works by exec, SIGTERM ends it at 0."""
    img = built.image
    example = run_examples()[0]
    volumes = host_dirs(example, scratch, img)
    proxy_dir, _ = volumes["/run/qmp-proxy"]
    assert proxy_dir is not None
    upstream = config.parser().parse_args(img.cmd).upstream.removeprefix("unix:")
    listen = config.parser().parse_args(img.cmd).listen[0].removeprefix("unix:")
    with qemu_at(upstream, img) as (qemu, qemu_dir):
        volumes["/run/qemu"] = (qemu_dir, False)
        with Container(built, example.args, volumes, scratch) as box:
            box.wait_log("event=upstream_ready")
            round_trip(proxy_dir / Path(listen).relative_to("/run/qmp-proxy"))
            log = box.wait_log("event=backport")
            assert re.search(r"event=backport .*outcome=ok", log), log
            state = box.volume_dirs[img.env["STATE_DIRECTORY"]]
            (lock,) = state.glob("*.lock")
            assert lock.stat().st_uid == img.uid and lock.read_text().strip() == str(box.pid)
            health = box.healthcheck()
            assert health.returncode == 0, (health, box.log())
            status = box.exec("qmp-proxy", "status", "--json")
            assert status.returncode == 0, status
            (route,) = json.loads(status.stdout)["routes"]
            assert route["state"] == "ready", route
            assert box.stop() == 0, box.log()
            assert not list(state.iterdir()), "the lock is left behind"
            assert qemu.returncode() is None, qemu.stderr_text()


def test_config_example_serves_qemu(built: Built, scratch: Path) -> None:
    """The override example with the shipped ``config/qmp-proxy.toml`` as its config file: its
    route and listeners, the HEALTHCHECK passes.  Without its ``--metrics`` the same line runs
    but the HEALTHCHECK fails: why every override must keep it."""
    img = built.image
    (example,) = [e for e in run_examples() if "--config" in e.args]
    volumes = host_dirs(example, scratch, img)
    etc, _ = volumes["/etc/qmp-proxy"]
    proxy_dir, _ = volumes["/run/qmp-proxy"]
    assert etc is not None and proxy_dir is not None
    etc.chmod(0o755)
    shipped = REPO / "config" / "qmp-proxy.toml"
    file = Path(config.parser().parse_args(example.args).config)
    (etc / file.relative_to("/etc/qmp-proxy")).write_bytes(shipped.read_bytes())
    ((route,),) = [config.load(shipped).routes]
    listen = Path(route.listen[0].address.path)
    without = list(example.args)
    del without[without.index("--metrics") : without.index("--metrics") + 2]
    for args, healthy in ((example.args, True), (without, False)):
        box_scratch = scratch / ("with" if healthy else "without")
        box_scratch.mkdir()
        with qemu_at(route.upstream.path, img) as (_, qemu_dir):
            volumes["/run/qemu"] = (qemu_dir, False)
            with Container(built, args, volumes, box_scratch) as box:
                box.wait_log("event=upstream_ready")
                round_trip(proxy_dir / listen.relative_to("/run/qmp-proxy"))
                health = box.healthcheck()
                assert (health.returncode == 0) == healthy, (args, health, box.log())
                assert box.stop() == 0, box.log()


def test_a_state_directory_the_user_cannot_own_is_refused(built: Built, scratch: Path) -> None:
    """A host directory mounted on the state volume that is not the image user's (the
    operator forgot the chown): the proxy refuses to start, at ERROR, naming the directory,
    rather than run without crash safety."""
    img = built.image
    example = run_examples()[0]
    volumes = host_dirs(example, scratch, img)
    state = img.env["STATE_DIRECTORY"]
    root_owned = scratch / "host" / "state"
    root_owned.mkdir(mode=0o700)
    volumes[state] = (root_owned, False)
    with Container(built, example.args, volumes, scratch) as box:
        assert box.wait() == 1, box.log()
    log = box.log()
    assert re.search(rf"ERROR .*event=start_failed .*state_dir {re.escape(state)}", log), log
    assert not list(root_owned.iterdir())
