"""The shipped alerts and dashboard, against promtool and a real Prometheus scraping a real proxy.

``contrib/prometheus/alerts.yml`` is checked and unit-tested with ``promtool``; then a real
Prometheus (Debian's, from ``scripts/install-prometheus.sh``) loads it and scrapes a real
``python -m proxy`` in front of QEMU 7.2 every second.  After traffic that covers every panel
(commands, errors, events, a split migrate, a protocol error), every query of
``contrib/grafana/qmp-proxy.json`` (its template variables substituted as Grafana would) and every
alert's expression without its comparison must return series, and the alerts that the traffic
provoked must be pending for the right route.  A missing Prometheus fails: it must not skip.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.helpers import free_port
from tests.proxyproc import REPO, ProxyProcess
from tests.qemu import QemuProcess, RawQMP

ALERTS = REPO / "contrib" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "contrib" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "qmp-proxy.json"
PREFIX = Path(os.environ.get("PROMETHEUS_PREFIX", "/opt/prometheus"))

VM = "vm1"
CAPS = [{"capability": "xbzrle", "state": True}]
# Grafana's $__rate_interval: longer than this test runs, so each window holds every sample
# Prometheus took, from before the traffic (the first scrape) to after it.
RATE_INTERVAL = "5m"
# What the traffic below provokes: these alerts' full expressions return a series for VM.
PROVOKED = {"QmpProxyProtocolErrors"}

T = TypeVar("T")


def tool(name: str) -> str:
    """``prometheus`` or ``promtool`` from the install script's prefix, else from PATH."""
    path = PREFIX / "usr" / "bin" / name
    if os.access(path, os.X_OK):
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found in {path.parent} or on PATH: run scripts/install-prometheus.sh"
        )
    return found


def alert_names() -> list[str]:
    """The alerts named in alerts.yml, in order (the file is YAML; its alert lines are simple)."""
    return re.findall(r"^\s*- alert:\s*(\w+)\s*$", ALERTS.read_text(), re.MULTILINE)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def variable(name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        v for v in dashboard()["templating"]["list"] if v["name"] == name
    ]
    (var,) = found
    return var


def variable_query(var: dict[str, Any]) -> str:
    query = var["query"]
    return query if isinstance(query, str) else str(query["query"])  # both Grafana forms


def panel_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query target of every panel."""
    return [
        (panel["title"], target["refId"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def substitute(expr: str, vm: str) -> str:
    """Grafana's substitution in a Prometheus query; ``vm`` is the variable's text as Grafana puts
    it in: one value regex-escaped, several as ``(a|b)``, or "All" as the allValue."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL).replace("${vm}", vm).replace("$vm", vm)
    assert "$" not in out, f"an unsubstituted variable in {out!r}"
    return out


def selected(values: list[str]) -> str:
    """The multi-value variable's substitution when ``values`` are selected."""
    escaped = [re.escape(v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def without_comparison(expr: str) -> str:
    """An alert expression less its trailing ``OP number``: what the alert compares."""
    m = re.fullmatch(r"(?s)(.*?)\s*(==|!=|>=|<=|>|<)\s*-?[0-9.]+(e[+-]?[0-9]+)?\s*", expr)
    assert m is not None, f"alert expression without a trailing comparison: {expr!r}"
    return m.group(1)


# -- promtool --------------------------------------------------------------------------------


@pytest.mark.qemu
def test_promtool_check_rules() -> None:
    out = subprocess.run(
        [tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in out.stdout, out.stdout


@pytest.mark.qemu
def test_promtool_test_rules() -> None:
    out = subprocess.run(
        [tool("promtool"), "test", "rules", ALERTS_TEST.name],
        capture_output=True,
        text=True,
        cwd=ALERTS_TEST.parent,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout
    tested = set(re.findall(r"alertname:\s*(\w+)", ALERTS_TEST.read_text()))
    assert tested == set(alert_names()), "every alert needs unit tests"


def test_alerts_cover_the_issue() -> None:
    assert alert_names() == [
        "QmpProxyUpstreamDown",
        "QmpProxyCapabilityRestoreFailed",
        "QmpProxySlowClientDisconnects",
        "QmpProxyProtocolErrors",
        "QmpProxyUpstreamDesync",
        "QmpProxyInternalError",
    ]


# -- the dashboard's shape -------------------------------------------------------------------


def test_dashboard_is_importable_json() -> None:
    d = dashboard()
    assert d["uid"] == "qmp-proxy" and d["id"] is None and d["title"] == "qmp-proxy"
    assert isinstance(d["schemaVersion"], int)
    ds = variable("datasource")
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    vm = variable("vm")
    assert vm["type"] == "query" and variable_query(vm) == "label_values(qmp_proxy_upstream_up, vm)"
    assert vm["multi"] and vm["includeAll"] and vm["allValue"] == ".*"
    assert vm["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in d["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'vm=~"$vm"' in target["expr"], (panel["title"], target["expr"])
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(pos["x"] + i, pos["y"] + j) for i in range(pos["w"]) for j in range(pos["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
    titles = [p["title"] for p in d["panels"]]
    assert titles == [
        "Routes up",
        "Client sessions",
        "Command rate by command",
        "Command latency p50 / p99",
        "Lane wait p50 / p99",
        "Backport outcomes",
        "Events rate",
        "Bytes in / out",
        "Problems",
    ]


def test_latency_is_by_vm_only() -> None:
    """command_duration_seconds has no command label: the panel must not group by one."""
    for title, _, expr in panel_queries():
        if "_seconds_bucket" in expr:
            assert "sum by (le, vm)" in expr, (title, expr)
            assert "command" not in expr.replace("command_duration", ""), (title, expr)


# -- a real Prometheus -----------------------------------------------------------------------


def eventually(what: str, probe: Callable[[], T | None], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Prometheus:
    """A Prometheus server on a free loopback port, with its own storage, as a context manager."""

    def __init__(self, tmp: Path, target: str, rule_files: list[Path]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": "qmp-proxy", "static_configs": [{"targets": [target]}]}
            ],
        }
        config_path = tmp / "prometheus.yml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        self.log_path = tmp / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{url}: {e.code} {e.read()[:500]!r}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    return True if r.status == 200 else None
            except (OSError, urllib.error.URLError):
                return None

        eventually("prometheus /-/ready", ready, timeout)

    def scrapes(self) -> int:
        """How many samples of the proxy's ``up`` Prometheus holds: one per scrape."""
        result = self.query('count_over_time(up{job="qmp-proxy"}[10m])')
        return int(float(result[0]["value"][1])) if result else 0

    def next_scrape(self) -> None:
        """Wait until Prometheus holds a scrape of the proxy that began after now: the second
        one from now on (the first may have been under way already)."""
        before = self.scrapes()
        eventually("two scrapes", lambda: True if self.scrapes() >= before + 2 else None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def drive(c: RawQMP) -> None:
    """Traffic for every panel."""
    for _ in range(20):
        assert "return" in c.command({"execute": "query-status"})
    assert "error" in c.command({"execute": "query-status", "arguments": {"bogus": 1}})
    assert "error" in c.command({"execute": "no-such-command"})
    assert c.command({"execute": "cont"}) == {"return": {}}  # RESUME
    assert c.command({"execute": "stop"}) == {"return": {}}  # STOP
    # 7.2 has no 'capabilities' argument: the proxy splits (sets them, migrates).
    migrate = {"uri": "exec:cat > /dev/null", "capabilities": CAPS}
    assert c.command({"execute": "migrate", "arguments": migrate}) == {"return": {}}

    def completed() -> bool | None:
        status = c.command({"execute": "query-migrate"})["return"].get("status")
        assert status not in ("failed", "cancelled"), status
        return True if status == "completed" else None

    eventually("the migration to complete", completed)
    c.send(b"}")  # a protocol error (parse)
    reply = c.recv_message()
    assert reply["error"]["desc"].startswith("JSON parse error"), reply


@pytest.mark.qemu
def test_real_prometheus_scrapes_the_proxy(short_tmp: Path) -> None:
    """Rules load healthy; every dashboard query and every alert's comparand returns series."""
    names = alert_names()
    with QemuProcess("7.2", "-M", "none") as qemu:
        listen = str(short_tmp / "proxy.sock")
        metrics = f"127.0.0.1:{free_port()}"
        state = short_tmp / "state"
        state.mkdir()
        proxy = ProxyProcess(
            "--upstream",
            f"unix:{qemu.sock_path}",
            "--listen",
            f"unix:{listen}",
            "--name",
            VM,
            "--metrics",
            metrics,
            "--state-dir",
            str(state),
            "--control",
            "none",
            tmp_path=short_tmp,
        )
        with proxy, Prometheus(short_tmp, metrics, [ALERTS]) as prom:
            proxy.wait_log("event=upstream_ready")
            prom.wait_ready()

            # The rules loaded and evaluate cleanly.
            def rules_ok() -> list[dict[str, Any]] | None:
                groups = prom.get("/api/v1/rules")["groups"]
                rules = [r for g in groups for r in g["rules"]]
                return rules if rules and all(r["health"] == "ok" for r in rules) else None

            rules = eventually("the rules to be evaluated", rules_ok)
            assert [r["name"] for r in rules] == names
            assert all(r["type"] == "alerting" and not r.get("lastError") for r in rules), rules

            # A scrape before the traffic: rate() and increase() need a sample on each side.
            eventually(
                "the first scrape",
                lambda: prom.query(f'qmp_proxy_upstream_up{{vm="{VM}"}} == 1') or None,
            )
            client = RawQMP(listen)
            try:
                client.negotiate()
                # Twice: a command's or event's series is born at its first occurrence, with
                # the value 1, which rate() cannot see; the second round is what the panels show.
                for _ in range(2):
                    drive(client)
                    prom.next_scrape()
                check_dashboard(prom)
                check_alert_expressions(prom, rules)
                pending = eventually(
                    "QmpProxyProtocolErrors pending", lambda: alerts(prom, "pending") or None
                )
                assert {(a["labels"]["alertname"], a["labels"]["vm"]) for a in pending} == {
                    ("QmpProxyProtocolErrors", VM)
                }

                # QEMU goes away: the route is down, QmpProxyUpstreamDown waits its 5 minutes.
                qemu.stop()
                proxy.wait_log("event=upstream_lost")

                def down_pending() -> list[dict[str, Any]] | None:
                    found = [
                        a
                        for a in alerts(prom, "pending")
                        if a["labels"]["alertname"] == "QmpProxyUpstreamDown"
                    ]
                    return found or None

                (down,) = eventually("QmpProxyUpstreamDown pending", down_pending)
                assert down["labels"]["vm"] == VM and down["labels"]["severity"] == "critical"
                assert down["labels"]["instance"] == metrics
                assert down["annotations"]["summary"] == (
                    f"QEMU behind qmp-proxy route {VM} is unreachable"
                )
                assert not alerts(prom, "firing")
            finally:
                client.close()
            assert "level=error" not in prom.log(), prom.log()


def alerts(prom: Prometheus, state: str) -> list[dict[str, Any]]:
    return [a for a in prom.get("/api/v1/alerts")["alerts"] if a["state"] == state]


def finite(series: list[dict[str, Any]]) -> list[float]:
    return [v for s in series if math.isfinite(v := float(s["value"][1]))]


def check_dashboard(prom: Prometheus) -> None:
    # The vm variable, as Grafana's label_values(METRIC, LABEL) asks it.
    m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable_query(variable("vm")))
    assert m is not None
    values = prom.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": m.group(1)})
    assert values == [VM], values
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for title, ref, expr in panel_queries():
        for vm in (variable("vm")["allValue"], selected(values)):  # "All", then the route
            query = substitute(expr, vm)
            series = prom.query(query)
            assert series, f"panel {title!r} {ref}: no series for {query}"
            assert finite(series), f"panel {title!r} {ref}: only NaN for {query}: {series}"
            assert all(s["metric"].get("vm", VM) == VM for s in series), (query, series)
        results[(title, ref)] = series

    def by(title: str, ref: str, label: str) -> dict[str, float]:
        return {s["metric"][label]: float(s["value"][1]) for s in results[(title, ref)]}

    assert by("Routes up", "A", "vm") == {VM: 1.0}
    assert by("Client sessions", "A", "vm") == {VM: 1.0}
    rates = by("Command rate by command", "A", "command")
    assert rates["query-status"] > 0 and rates["migrate"] > 0 and rates["other"] > 0, rates
    assert by("Command rate by command", "B", "command").keys() == {"query-status", "other"}
    for title in ("Command latency p50 / p99", "Lane wait p50 / p99"):
        p50, p99 = by(title, "A", "vm")[VM], by(title, "B", "vm")[VM]
        assert 0 < p50 <= p99 < 10, (title, p50, p99)
    backports = {
        (s["metric"]["command"], s["metric"]["mode"], s["metric"]["outcome"]): float(s["value"][1])
        for s in results[("Backport outcomes", "A")]
    }
    assert backports.get(("migrate", "split", "ok"), 0) > 0, backports
    events = by("Events rate", "A", "event")
    assert events["RESUME"] > 0 and events["STOP"] > 0, events
    traffic = {
        (s["metric"]["peer"], s["metric"]["direction"]) for s in results[("Bytes in / out", "A")]
    }
    assert traffic == {(p, d) for p in ("client", "upstream") for d in ("in", "out")}
    assert by("Problems", "B", "kind")["parse"] > 0


def check_alert_expressions(prom: Prometheus, rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        name, expr = rule["name"], rule["query"]
        operand = without_comparison(expr)
        series = prom.query(operand)
        assert series, f"{name}: {operand} returns no series"
        assert {s["metric"].get("vm") for s in series} == {VM}, (name, series)
        assert all(s["metric"]["job"] == "qmp-proxy" for s in series), (name, series)
        firing = prom.query(expr)
        if name in PROVOKED:
            assert [s["metric"]["vm"] for s in firing] == [VM], (name, firing)
        else:
            assert firing == [], f"{name} would fire on a healthy proxy: {firing}"
