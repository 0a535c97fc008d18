"""Write the man pages qmp-proxy(8) and qmp-proxy-qemu(8) as roff, from the code itself.

qmp-proxy(8) is made from the very argparse parsers the daemon parses its command line with
(``proxy.config.parser`` and ``proxy.control.parser``), so a flag, its unit or its default can
never be documented differently in ``--help`` and in the man page.  qmp-proxy-qemu takes QEMU's
own arguments and has no parser: its page is the wrapper module's docstring, which is what
explains it in the code.  No dependency beyond the project: roff is simple enough to write here.

    python scripts/manpage.py qmp-proxy > qmp-proxy.8
    python scripts/manpage.py qmp-proxy-qemu > qmp-proxy-qemu.8

The date is $SOURCE_DATE_EPOCH's when set (scripts/build-deb.sh sets it to the last commit's),
so two builds of one commit give the same page.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections.abc import Iterable

from proxy import VERSION, config, control, emulator


def escape(text: str) -> str:
    """Text as roff shows it literally: backslashes and hyphens escaped, no control lines."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def inline(text: str) -> str:
    """A docstring's ``literal`` in bold, *emphasis* in italics, the rest escaped."""
    out = []
    for i, part in enumerate(re.split(r"``(.+?)``", text, flags=re.S)):
        part = escape(part)
        if i % 2:
            out.append(f"\\fB{part}\\fR")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*|\*(\S(?:.*?\S)?)\*", _emphasis, part))
    return "".join(out)


def _emphasis(m: re.Match[str]) -> str:
    return f"\\fB{m.group(1)}\\fR" if m.group(1) else f"\\fI{m.group(2)}\\fR"


def header(name: str, summary: str) -> list[str]:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        if epoch
        else datetime.datetime.now(datetime.UTC)
    )
    return [
        f'.TH {name.upper()} 8 "{when:%Y-%m-%d}" "qmp-proxy {VERSION}" "System Administration"',
        ".SH NAME",
        f"{name} \\- {escape(summary)}",
    ]


def option_label(action: argparse.Action) -> str:
    """``--flag METAVAR`` or ``--flag {a,b}``, bold flag, italic value."""
    flags = ", ".join(f"\\fB{escape(f)}\\fR" for f in action.option_strings)
    if action.nargs == 0:
        return flags
    if action.choices is not None:
        value = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        value = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return f"{flags} \\fI{escape(value)}\\fR"


def options(parser: argparse.ArgumentParser) -> list[str]:
    """Every option of every group, with its help text as --help shows it (defaults filled)."""
    formatter = parser._get_formatter()
    lines: list[str] = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings]
        if not actions:
            continue
        if group.title and group.title not in ("options", "optional arguments"):
            lines.append(f".SS {escape(group.title)}")
        for action in actions:
            lines += [".TP", option_label(action)]
            text = formatter._expand_help(action) if action.help else ""
            lines.append(escape(text) if text else "")
    return lines


def paragraphs(text: str) -> Iterable[list[str]]:
    """A docstring's blocks: runs of lines separated by blank lines."""
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


def prose(text: str) -> list[str]:
    """A docstring body (paragraphs and ``*`` bullet lists) as roff."""
    lines: list[str] = []
    for block in paragraphs(text):
        if not block[0].startswith("* "):
            lines += [".PP", inline(" ".join(line.strip() for line in block))]
            continue
        items: list[list[str]] = []
        for line in block:
            if line.startswith("* "):
                items.append([])
            items[-1].append(line.strip().removeprefix("* "))
        for item in items:
            lines += [".IP \\(bu 2", inline(" ".join(item))]
    return lines


def qmp_proxy() -> list[str]:
    main = config.parser()
    status = control.parser(config.default_control().address)
    lines = header("qmp-proxy", "a multiplexing QMP proxy for unmodified QEMU")
    lines += [
        ".SH SYNOPSIS",
        ".B qmp-proxy",
        "[\\fIOPTIONS\\fR]",
        ".br",
        ".B qmp-proxy status",
        "[\\fB\\-\\-json\\fR] [\\fB\\-\\-control\\fR \\fIADDRESS\\fR]",
        ".SH DESCRIPTION",
        escape(main.description or ""),
        ".PP",
        "Addresses are written as QEMU writes them: \\fBunix:\\fR\\fI/path\\fR, "
        "\\fBtcp:\\fR\\fIHOST\\fR\\fB:\\fR\\fIPORT\\fR or an absolute path; a listener may also "
        "be \\fBsystemd:\\fR\\fINAME\\fR (a socket unit's FileDescriptorName=).  Flags given with "
        "\\fB\\-\\-config\\fR are laid over the file, and applied again when SIGHUP re-reads it.",
        ".SH OPTIONS",
        *options(main),
        ".SH STATUS",
        escape(f"{status.prog}: {status.description}."),
        *options(status),
        ".SH SIGNALS",
        ".TP",
        ".B SIGHUP",
        "re-read the configuration file: log level, limits and listener policies apply at once; "
        "other changes are logged as needing a restart.",
        ".TP",
        ".B SIGTERM, SIGINT",
        "stop accepting, wait up to the drain limit for commands in flight, exit.",
        ".SH EXIT STATUS",
        "0 after a clean stop or a valid \\fB\\-\\-check\\-config\\fR; 1 when the daemon cannot "
        "start; 2 for bad arguments or a bad configuration file.",
        ".SH FILES",
        ".TP",
        ".I /etc/qmp\\-proxy/qmp\\-proxy.toml",
        "one daemon, many routes (qmp\\-proxy.service); every key documented with its default.",
        ".TP",
        ".I /etc/qmp\\-proxy/NAME.toml",
        "one VM per instance of qmp\\-proxy@NAME.service and its socket unit.",
        ".TP",
        ".I /run/qmp\\-proxy/control.sock",
        "the live view's socket read by \\fBqmp\\-proxy status\\fR.",
        ".SH SEE ALSO",
        ".BR qmp\\-proxy\\-qemu (8),",
        ".BR systemd.socket (5),",
        ".BR qemu (1)",
    ]
    return lines


def qmp_proxy_qemu() -> list[str]:
    doc = emulator.__doc__ or ""
    first, _, body = doc.strip().partition("\n")
    summary = re.sub(r"^``[^`]+``:\s*", "", first).rstrip(".")
    lines = header("qmp-proxy-qemu", summary.replace("``", ""))
    lines += [
        ".SH SYNOPSIS",
        ".B qmp-proxy-qemu",
        "\\fIQEMU-ARGUMENTS\\fR...",
        ".SH DESCRIPTION",
        *prose(body),
        ".SH EXAMPLE",
        "In the domain's XML:",
        ".PP",
        ".RS",
        ".nf",
        escape("<emulator>/usr/bin/qmp-proxy-qemu</emulator>"),
        ".fi",
        ".RE",
        ".SH ENVIRONMENT",
        ".TP",
        f".B {escape(emulator.CONFIG_ENV)}",
        "the settings file to read instead of the default; it must exist.",
        ".SH FILES",
        ".TP",
        f".I {escape(str(emulator.DEFAULT_CONFIG))}",
        "the wrapper's settings (absent: every default); every key documented with its default.",
        ".SH SEE ALSO",
        ".BR qmp\\-proxy (8),",
        ".BR virsh (1)",
    ]
    return lines


PAGES = {"qmp-proxy": qmp_proxy, "qmp-proxy-qemu": qmp_proxy_qemu}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in PAGES:
        print(f"usage: manpage.py {{{','.join(PAGES)}}} > PAGE.8", file=sys.stderr)
        return 2
    sys.stdout.write("\n".join(PAGES[argv[0]]()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
