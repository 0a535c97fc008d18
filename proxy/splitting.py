"""Runs the backport's plans against QEMU (asyncio): a client's split, and crash recovery.

The plans themselves are pure (:mod:`proxy.backport`); this driver performs their steps on the
upstream connection and the journal, and nothing else.  The route calls :func:`run_split` while
it holds the lane, and :func:`recover` after every (re)connect, before any client is served.

A journal that cannot be written stops a split before anything changed in QEMU: the client
gets a clear error.  Recovery applies a journaled restore only when the migration provably
never started, by the same checks the split's pre-check makes, and otherwise discards it with a
log line saying why.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from proxy import backport
from proxy.backport import Call, Outcome, Record
from proxy.dialect import Dialect
from proxy.journal import Entry, Journal, JournalInvalid
from proxy.logs import fields
from proxy.metrics import RouteMetrics
from proxy.upstream import Upstream

log = logging.getLogger("qmp_proxy.splitting")


async def _in_thread(function: Any, *args: Any) -> Any:
    """Journal I/O fsyncs: keep it off the event loop, which serves every other route."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


async def run_split(
    command: str, arguments: dict[str, Any], up: Upstream, journal: Journal, dialect: Dialect
) -> Outcome:
    """Drive :func:`proxy.backport.split`; raises :class:`~proxy.upstream.UpstreamError` if
    QEMU is lost (the route ends its sessions, and the journal covers the restore)."""
    plan = backport.split(command, arguments, up.schema, dialect)
    reply: dict[str, Any] = {}
    try:
        step = next(plan)
        while True:
            if isinstance(step, Record):
                migration = backport.journal_form(step.migration)
                entry = Entry(journal.route, up.identity, step.restore, migration, command)
                try:
                    await _in_thread(journal.write, entry)
                except OSError as exc:
                    plan.close()
                    why = exc.strerror or str(exc)
                    log.error(fields("journal_write_failed", path=str(journal.path), why=why))
                    return Outcome(
                        "proxy_error",
                        backport.error(
                            f"qmp-proxy cannot write its crash-safety journal ({why}); "
                            "nothing was changed"
                        ),
                    )
                reply = {}
            else:
                reply = await up.call(step.command, step.arguments)
            step = plan.send(reply)
    except StopIteration as done:
        outcome: Outcome = done.value
    try:
        await _in_thread(journal.remove)
    except OSError as exc:
        # The split is over and its answer stands; the stale entry is judged again (and
        # discarded, the migration having moved on, or restored if nothing changed) on the
        # next connection to this QEMU.
        log.error(fields("journal_remove_failed", path=str(journal.path), why=str(exc)))
    return outcome


async def _drive(plan: Any, up: Upstream) -> Any:
    """Run a plan that only yields :class:`~proxy.backport.Call` steps; return its result."""
    try:
        step: Call = next(plan)
        while True:
            step = plan.send(await up.call(step.command, step.arguments))
    except StopIteration as done:
        return done.value


async def recover(journal: Journal, up: Upstream, metrics: RouteMetrics) -> None:
    """Finish a split that a crash or a lost QEMU cut off; the journal is gone afterwards."""
    route = journal.route
    try:
        entry = journal.read()
        if entry is not None and entry.identity == up.identity:
            names = up.schema.capability_names or frozenset()
            unknown = [r["capability"] for r in entry.restore if r["capability"] not in names]
            if unknown:
                raise JournalInvalid(f"capabilities QEMU does not have: {unknown[:5]}")
    except JournalInvalid as exc:
        aside = journal.quarantine()
        metrics.journal_rejected()
        log.error(
            fields(
                "journal_invalid", route=route, why=str(exc), moved_to=str(aside) if aside else None
            )
        )
        return
    if entry is None:
        return
    if entry.identity != up.identity:
        log.warning(
            fields(
                "journal_discarded",
                route=route,
                why="another QEMU",
                recorded_pid=entry.identity.get("pid"),
                pid=up.identity.get("pid"),
            )
        )
        journal.remove()
        return
    if not await _drive(backport.never_started(entry.command, entry.migration, up.schema), up):
        log.warning(
            fields(
                "journal_discarded",
                route=route,
                command=entry.command,
                why="the migration started: it owns the capabilities",
            )
        )
        journal.remove()
        return
    done = await up.call("migrate-set-capabilities", {"capabilities": entry.restore})
    outcome = "ok" if "return" in done else "failed"
    metrics.restore(outcome)
    (log.warning if outcome == "ok" else log.error)(
        fields(
            "journal_restored",
            route=route,
            command=entry.command,
            outcome=outcome,
            capabilities=",".join(str(c["capability"]) for c in entry.restore),
        )
    )
    journal.remove()
