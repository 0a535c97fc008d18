"""Log lines that fit where they go: journald priorities, JSON for shippers, and a QEMU that
stays away logged at a slowing pace instead of once per retry."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from proxy import logs
from proxy.logs import Event, JournalFormatter, JsonFormatter, fields
from tests.proxyproc import in_process


def _record(message: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("qmp_proxy", level, __file__, 1, message, None, None)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.DEBUG, "<7>"),
        (logging.INFO, "<6>"),
        (logging.WARNING, "<4>"),
        (logging.ERROR, "<3>"),
    ],
)
def test_journal_lines_carry_their_priority_and_no_timestamp(level: int, prefix: str) -> None:
    line = JournalFormatter().format(_record(fields("upstream_lost", route="vm1"), level))
    assert line == f"{prefix}event=upstream_lost route=vm1"


def test_json_lines_hold_the_same_fields_as_the_text_form() -> None:
    event = fields("policy_denied", route="vm1", session=3, command="stop\r\nevent=forged")
    assert isinstance(event, Event)
    obj = json.loads(JsonFormatter().format(_record(event, logging.INFO)))
    assert obj["level"] == "info" and obj["event"] == "policy_denied"
    assert obj["route"] == "vm1" and obj["session"] == 3
    assert obj["command"] == "stop\r\nevent=forged"  # escaped by JSON itself, one line
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}$", obj["time"])
    long = fields("policy_denied", command="x" * 5000)
    assert len(json.loads(JsonFormatter().format(_record(long)))["command"]) < 300


def test_a_traceback_stays_one_json_line() -> None:
    logger = logging.getLogger("qmp_proxy.test_logs")
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(JsonFormatter().format(record))

    handler = Collect()
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("boom")
        except ValueError as exc:
            logs.failure(logger, "session_internal_error", exc, route="vm1")
    finally:
        logger.removeHandler(handler)
    [line] = seen
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["event"] == "session_internal_error" and "ValueError: boom" in obj["traceback"]


def test_journald_is_recognised_by_its_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.under_journald()
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # inherited from elsewhere: not ours
    assert not logs.under_journald()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logs.under_journald()


async def test_a_qemu_that_stays_away_is_logged_at_a_slowing_pace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    upstream = str(tmp_path / "no-qemu.sock")
    async with in_process(
        upstream, tmp_path, ready=False, backoff_min=0.001, backoff_max=0.001
    ) as proxy:
        route = proxy.server.routes[0]
        while route._failures < 40:
            await asyncio.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if "upstream_connect_failed" in r.getMessage()]
    attempts = [int(re.findall(r"attempts=(\d+)", line)[0]) for line in lines]
    assert attempts[:6] == [1, 2, 4, 8, 16, 32], attempts
    assert not [r for r in caplog.records if "state=connecting" in r.getMessage()][1:]
