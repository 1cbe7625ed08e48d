"""
The documentation shows what tsmux prints.

L{QuickstartTests} does the quickstart's first run (docs/quickstart.rst, "Without tailscaled") as
the page says: it starts tsmux with the page's command, fetches a page through it and a refused
port with the page's curl commands, and asks C{tsmux status}; the startup log, the connection
line and the status output are compared line by line with the page's blocks, which are read from
the page itself. Only what depends on the machine or the moment is normalised (L{normalise}):
timestamps, the socket's path, the web server's port, pids, uids, gids, byte counts, durations,
the version, the uptime and the connection limits (their numbers; the page's own numbers must
still be what tsmux derives from the page's descriptor limit). Everything else is compared as
written: a log line changed, added or dropped fails here until the page says the same.

The quickstart's run is a user's, not root's (its warnings say so). As root, tsmux and its
clients run as uid 65534 (setpriv); if this checkout is out of that uid's reach, tsmux runs as
root without CAP_SETUID and CAP_SETGID, and its reason for not acting as its callers is read as
the page's.

L{OneLineErrorsTests} runs the commands whose one-line errors the pages quote, and looks for
each line on its page.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import unittest
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.trial.unittest import SynchronousTestCase

from tsmux._config import DEFAULT_LOCALAPI
from tsmux._limits import ConnectionLimits

from ._otheruser import NOBODY, requireOtherUser, setpriv
from ._tailnet import REPO_ROOT, skipOrFail
from ._tsmuxprocess import CONNECTION_LINE, TsmuxProcess, childEnvironment, shortDir, tsmuxCommand
from ._waiting import WaitTimeout, waitUntil

QUICKSTART = os.path.join(REPO_ROOT, "docs", "quickstart.rst")
DOC_SOCKET = "/tmp/tsmux.sock"
"""The socket path the quickstart uses; the test's own path takes its place."""
DOC_PORT = 8000
"""The web server's port in the quickstart; the test's server's port takes its place."""
STARTUP_TIMEOUT = 15.0

WITHOUT_SETUID = ["setpriv", "--bounding-set=-setuid,-setgid", "--inh-caps=-setuid,-setgid"]
"""Root, without the capabilities that would let tsmux act as its callers."""
WITHOUT_SETUID_REASON = "root, but without CAP_SETUID/CAP_SETGID in the effective capability set"


@functools.cache
def nobodyRunsTsmux() -> bool:
    """Whether uid 65534 can run this checkout's tsmux (its interpreter, its modules)."""
    result = subprocess.run(
        [*setpriv(), *tsmuxCommand(), "--version"], capture_output=True, timeout=60, env=childEnvironment(), cwd="/"
    )
    return result.returncode == 0


@dataclass(frozen=True)
class CodeBlock:
    """One C{.. code-block::} of a page: its language, its lines (dedented) and the line it starts on."""

    language: str
    lines: list[str]
    lineNumber: int


def codeBlocks(text: str) -> list[CodeBlock]:
    """Every C{.. code-block:: LANGUAGE} in C{text}, in order (options and surrounding blank lines left out)."""
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        match = re.match(r"^(\s*)\.\. code-block::\s*(\S+)\s*$", lines[index])
        index += 1
        if match is None:
            continue
        indent = len(match.group(1))
        start = index
        body: list[str] = []
        while index < len(lines):
            line = lines[index]
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            if not body and (not line.strip() or line.strip().startswith(":")):
                index += 1
                continue
            body.append(line)
            index += 1
        while body and not body[-1].strip():
            body.pop()
        margin = min((len(line) - len(line.lstrip()) for line in body if line.strip()), default=0)
        blocks.append(CodeBlock(match.group(2), [line[margin:] for line in body], start))
    return blocks


def blockWith(blocks: Sequence[CodeBlock], language: str, text: str) -> int:
    """The index of the first C{language} block with a line holding C{text}."""
    for index, block in enumerate(blocks):
        if block.language == language and any(text in line for line in block.lines):
            return index
    raise AssertionError(f"no {language} block with {text!r}")


def textBlockAfter(blocks: Sequence[CodeBlock], index: int) -> CodeBlock:
    """The first C{text} block after block C{index}: what the page says the command printed."""
    for block in blocks[index + 1 :]:
        if block.language == "text":
            return block
    raise AssertionError(f"docs/quickstart.rst shows no output after its block on line {blocks[index].lineNumber}")


def commandWith(block: CodeBlock, text: str) -> list[str]:
    """The command of C{block} (a shell block, or a console block's C{$} lines) that holds C{text}, split."""
    for line in block.lines:
        command = line.removeprefix("$ ")
        if text in command:
            return shlex.split(command, comments=True)
    raise AssertionError(f"no command with {text!r} in the block on line {block.lineNumber}")


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ")
_LIMITS = re.compile(
    r"connection limits: (\d+) in all \((\d+) kept for root\), (\d+) per uid; "
    r"descriptor limit (\d+)(?: \(raised from \d+\))?"
)
_NORMALISE: list[tuple[re.Pattern[str], str]] = [
    (_LIMITS, "connection limits: N in all (N kept for root), N per uid; descriptor limit N"),
    (re.compile(r"\b(pid|uid|gid|up|down)=\d+"), r"\1=N"),
    (re.compile(r"\b\d+\.\d{3}s\b"), "N.NNNs"),
    (re.compile(r"\buids other than \d+"), "uids other than N"),
    (re.compile(r"\buid \d+(?: \([^)]*\))?"), "uid N"),
    (re.compile(r"^tsmux \S+, up (?:\d+[dhms] ?)+"), "tsmux VERSION, up T"),
]


def normalise(line: str) -> str:
    """A line with what depends on the machine or the moment replaced by placeholders."""
    line = _TIMESTAMP.sub("", line.rstrip("\n"))
    for pattern, replacement in _NORMALISE:
        line = pattern.sub(replacement, line)
    return line


def completeLines(text: str) -> list[str]:
    """The lines of a log that is still being written, without a last one that is not complete."""
    return text.split("\n")[:-1]


def isConnectionLine(line: str) -> bool:
    return f"[{CONNECTION_LINE}#" in line


def pageText(name: str) -> str:
    """A page of docs/, its whitespace collapsed, so that an inline literal wrapped across lines is found whole."""
    with open(os.path.join(REPO_ROOT, "docs", name), encoding="utf-8") as page:
        return " ".join(page.read().split())


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test's output is tsmux's."""


class QuickstartTests(SynchronousTestCase):
    """
    The quickstart's run without tailscaled, as the page tells it: start tsmux, fetch a page through
    it with curl, a refused port, then C{tsmux status}.
    """

    def setUp(self) -> None:
        self.page = self.readPage()
        self.blocks = codeBlocks(self.page)
        if os.path.exists(DEFAULT_LOCALAPI):
            raise unittest.SkipTest(
                f"something is at {DEFAULT_LOCALAPI}: the quickstart's first run shows a host without tailscaled"
            )
        if shutil.which("curl") is None:
            skipOrFail("curl is missing (the quickstart uses it)")
        self.tsmux = tsmuxCommand()
        # Before tsmux and its clients (as root: setpriv, to be uid 65534), and before tsmux alone.
        self.asUser: list[str] = []
        self.tsmuxAs: list[str] = []
        # When tsmux runs as root without the capabilities: the reason it gives instead of the page's.
        self.whyNot: str | None = None
        self.directory = shortDir(self)
        if os.geteuid() == 0:
            # The page's run is a user's: its warnings are those of a tsmux that is not root.
            requireOtherUser()
            if nobodyRunsTsmux():
                self.asUser = self.tsmuxAs = setpriv()
                os.chown(self.directory, NOBODY, NOBODY)
            else:
                # This checkout is out of uid 65534's reach (under /root, say): root without
                # CAP_SETUID and CAP_SETGID cannot act as its callers either, and says why.
                self.tsmuxAs = WITHOUT_SETUID
                self.whyNot = WITHOUT_SETUID_REASON
        self.socketPath = os.path.join(self.directory, "tsmux.sock")
        self.port = self.serveFiles()

    def readPage(self) -> str:
        with open(QUICKSTART, encoding="utf-8") as page:
            return page.read()

    def serveFiles(self) -> int:
        """The page's C{python3 -m http.server 8000 --bind 127.0.0.1}, on a free port: a directory listing."""
        served = shortDir(self)
        with open(os.path.join(served, "hello.txt"), "w") as file:
            file.write("hello\n")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=served))
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return int(server.server_address[1])

    def substitute(self, argv: Sequence[str]) -> list[str]:
        """The page's command with this test's socket path and port in place of the page's."""
        return [
            word.replace(DOC_SOCKET, self.socketPath).replace(f"127.0.0.1:{DOC_PORT}", f"127.0.0.1:{self.port}")
            for word in argv
        ]

    def actual(self, line: str) -> str:
        """A line tsmux printed, with the page's socket path and port in place of this test's, normalised."""
        line = line.replace(self.socketPath, DOC_SOCKET).replace(f"127.0.0.1:{self.port}", f"127.0.0.1:{DOC_PORT}")
        if self.whyNot is not None:
            line = line.replace(f"({self.whyNot})", "(not root)")
        return normalise(line)

    def runAsUser(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.asUser, *argv], capture_output=True, text=True, timeout=60, env=childEnvironment(), cwd="/"
        )

    def start(self) -> tuple[TsmuxProcess, CodeBlock]:
        """Start tsmux as the page's first command does; the startup lines the page shows."""
        index = blockWith(self.blocks, "shell", "--dialer direct")
        argv = commandWith(self.blocks[index], "--dialer direct")
        self.assertEqual(argv[0], ".venv/bin/tsmux", "the quickstart runs the installed console script")
        self.assertIn(DOC_SOCKET, argv)
        tsmux = TsmuxProcess(
            [*self.tsmuxAs, *self.tsmux, *self.substitute(argv[1:])],
            self.socketPath,
            os.path.join(self.directory, "tsmux.log"),
        )
        self.addCleanup(tsmux.stop)
        return tsmux, textBlockAfter(self.blocks, index)

    def waitForStartup(self, tsmux: TsmuxProcess, count: int) -> None:
        """
        Until tsmux has logged C{count} lines (or has exited), without connecting: a probe would
        log a connection line of its own. A log that stays short is left to the comparison.
        """
        try:
            waitUntil(
                lambda: tsmux.process.poll() is not None or len(completeLines(tsmux.log())) >= count,
                STARTUP_TIMEOUT,
                "tsmux's startup lines",
            )
        except WaitTimeout:
            pass
        if tsmux.process.poll() is not None:
            self.fail(f"tsmux exited with {tsmux.process.returncode}:\n{tsmux.log()}")

    def assertLines(self, shown: CodeBlock, printed: list[str], what: str) -> None:
        """The page's lines and the printed ones, normalised, line by line; on failure, both in full."""
        expected = [normalise(line) for line in shown.lines]
        actual = [self.actual(line) for line in printed]
        if expected != actual:
            self.fail(
                f"docs/quickstart.rst (the block on line {shown.lineNumber}) shows {what} that tsmux does not "
                "print; normalised, the page's lines, then tsmux's:\n  "
                + "\n  ".join(expected)
                + "\n\n  "
                + "\n  ".join(actual)
                + "\n\ntsmux printed:\n"
                + "\n".join(printed)
            )

    def assertLimitsDerived(self, shown: CodeBlock) -> None:
        """The page's connection limits are what tsmux derives from the page's descriptor limit."""
        for line in shown.lines:
            match = _LIMITS.search(line)
            if match is not None:
                total, reserve, perUid, descriptors = (int(number) for number in match.groups())
                limits = ConnectionLimits.derive(descriptors, None, None)
                self.assertEqual(
                    (total, reserve, perUid),
                    (limits.total, limits.rootReserve, limits.perUid),
                    f"the quickstart's connection limits for descriptor limit {descriptors}",
                )
                return
        self.fail("the quickstart's startup lines have no connection limits")

    def test_quickstart(self) -> None:
        """
        The startup lines, the connection lines and C{tsmux status}'s output are what the page
        shows, normalised.
        """
        tsmux, startup = self.start()
        self.assertLimitsDerived(startup)
        self.waitForStartup(tsmux, len(startup.lines))

        # A page through tsmux: curl prints the listing, tsmux one line.
        index = blockWith(self.blocks, "shell", "curl -x")
        fetched = self.runAsUser(self.substitute(commandWith(self.blocks[index], "curl -x")))
        self.assertEqual(fetched.returncode, 0, fetched.stderr)
        self.assertIn("Directory listing", fetched.stdout)
        tsmux.waitForConnectionLines(1)
        logged = completeLines(tsmux.log())
        first = next(number for number, line in enumerate(logged) if isConnectionLine(line))
        self.assertLines(startup, logged[:first], "startup lines")
        self.assertLines(textBlockAfter(self.blocks, index), [logged[first]], "a connection line")

        # A port where nothing listens: curl's reply 5, and the line's ending the page quotes.
        index = blockWith(self.blocks, "console", "curl -x")
        refused = self.runAsUser(self.substitute(commandWith(self.blocks[index], "curl -x")))
        shownOutput = [line for line in self.blocks[index].lines if not line.startswith("$ ")]
        self.assertEqual(refused.returncode, int(re.findall(r"\((\d+)\)", shownOutput[0])[0]), refused.stderr)
        self.assertTrue(
            refused.stderr.rstrip().endswith(shownOutput[0][shownOutput[0].rindex(" ") :]),
            f"curl said {refused.stderr!r}; the page shows {shownOutput[0]!r}",
        )
        tsmux.waitForConnectionLines(2)
        quoted = re.search(r"tsmux logs\s+``([^`]+)``", self.page[self.page.index(shownOutput[0]) :])
        assert quoted is not None, "the quickstart quotes the refused connection's log line"
        second = [line for line in completeLines(tsmux.log()) if isConnectionLine(line)][1]
        self.assertTrue(second.endswith(" " + quoted.group(1)), f"{second!r} should end with {quoted.group(1)!r}")

        # tsmux status, as tsmux's own uid.
        index = blockWith(self.blocks, "shell", "tsmux status")
        argv = commandWith(self.blocks[index], "tsmux status")
        self.assertEqual(argv[0], ".venv/bin/tsmux")
        status = self.runAsUser([*self.tsmux, *self.substitute(argv[1:])])
        self.assertEqual(status.returncode, 0, status.stderr)
        self.assertLines(textBlockAfter(self.blocks, index), status.stdout.splitlines(), "tsmux status's output")

        # tsmux reload, to a tsmux started with flags: the line usage.rst and operations.rst quote.
        reload = self.runAsUser([*self.tsmux, "reload", "--socket", self.socketPath])
        self.assertEqual(reload.returncode, 1, reload.stderr)
        for page in ("usage.rst", "operations.rst"):
            self.assertIn(" ".join(reload.stderr.split()), pageText(page), f"docs/{page} quotes tsmux reload's line")

        self.assertEqual(tsmux.stop(), 0, tsmux.log())
        for marker in ("Traceback", "Unhandled"):
            self.assertNotIn(marker, tsmux.log())


class OneLineErrorsTests(SynchronousTestCase):
    """
    The one-line errors the pages quote are what tsmux prints: each is run, and its line (with the
    page's path in place of the test's) must be on the page.
    """

    def setUp(self) -> None:
        self.directory = shortDir(self)

    def tsmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*tsmuxCommand(), *args], capture_output=True, text=True, timeout=60, env=childEnvironment(), cwd="/"
        )

    def assertQuoted(self, page: str, line: str, replace: dict[str, str] | None = None) -> None:
        for path, shown in (replace or {}).items():
            line = line.replace(path, shown)
        self.assertIn(" ".join(line.split()), pageText(page), f"docs/{page} should quote what tsmux prints")

    def test_badOption(self) -> None:
        result = self.tsmux("--mode", "999")
        self.assertEqual(result.returncode, 2)
        first, second = result.stderr.splitlines()
        self.assertQuoted("usage.rst", first)
        self.assertQuoted("usage.rst", second)

    def test_usageLines(self) -> None:
        """The usage lines of C{tsmux --help} and of each subcommand's are the command-line reference's."""
        result = self.tsmux("--help")
        self.assertEqual(result.returncode, 0)
        head = result.stdout.split("\n\n", 1)[0].splitlines()
        forms = [line.removeprefix("Usage:").strip() for line in head]
        with open(os.path.join(REPO_ROOT, "docs", "usage.rst"), encoding="utf-8") as page:
            blocks = codeBlocks(page.read())
        self.assertEqual(blocks[blockWith(blocks, "text", "tsmux check|")].lines, forms)
        for subcommand in ("check", "status", "explain", "reload", "completion"):
            result = self.tsmux(subcommand, "--help")
            self.assertEqual(result.returncode, 0)
            self.assertQuoted("usage.rst", "``" + result.stdout.splitlines()[0].removeprefix("Usage: ") + "``")

    def test_configWithASocketFlag(self) -> None:
        config = os.path.join(self.directory, "tsmux.toml")
        with open(config, "w") as file:
            file.write(f'[[socket]]\nlisten = "{os.path.join(self.directory, "a.sock")}"\n')
        result = self.tsmux("--config", config, "--mode", "0600")
        self.assertEqual(result.returncode, 2)
        self.assertQuoted("usage.rst", result.stderr.splitlines()[0])

    def test_noDirectory(self) -> None:
        path = os.path.join(self.directory, "missing", "tsmux.sock")
        result = self.tsmux("--listen", path)
        self.assertEqual(result.returncode, 1)
        replace = {path: "/var/run/tailscale/tsmux.sock", os.path.dirname(path): "/var/run/tailscale"}
        self.assertQuoted("deployments.rst", result.stderr.strip(), replace)

    def test_noDaemon(self) -> None:
        """No socket there, and a socket nobody listens on (a stale one)."""
        missing = os.path.join(self.directory, "missing.sock")
        result = self.tsmux("status", "--socket", missing)
        self.assertEqual(result.returncode, 1)
        for page in ("usage.rst", "operations.rst"):
            self.assertQuoted(page, result.stderr.strip(), {missing: "/var/run/tailscale/tsmux.sock"})
        stale = os.path.join(self.directory, "stale.sock")
        unanswered = socket.socket(socket.AF_UNIX)
        unanswered.bind(stale)
        unanswered.close()
        result = self.tsmux("status", "--socket", stale)
        self.assertEqual(result.returncode, 1)
        for page in ("usage.rst", "operations.rst"):
            self.assertQuoted(page, result.stderr.strip(), {stale: "/run/tsmux/dev.sock"})


class NormaliseTests(SynchronousTestCase):
    """What L{normalise} replaces, and that it leaves the rest alone."""

    def test_startupLines(self) -> None:
        self.assertEqual(
            normalise(
                "2026-11-27T17:59:11+0000 [tsmux._service.TsmuxService#info] connection limits: 3322 in all "
                "(415 kept for root), 1661 per uid; descriptor limit 20000 (raised from 1024)"
            ),
            "[tsmux._service.TsmuxService#info] connection limits: N in all (N kept for root), N per uid; "
            "descriptor limit N",
        )
        self.assertEqual(
            normalise("... (not root): LocalAPI requests from uids other than 1000 get 403; ... made as uid 1000"),
            "... (not root): LocalAPI requests from uids other than N get 403; ... made as uid N",
        )

    def test_connectionLine(self) -> None:
        self.assertEqual(
            normalise(
                "[tsmux.connection#info] socks5 socket=tsmux pid=7394 uid=1000 gid=1000 "
                "target=127.0.0.1:8000 up=92 down=438 0.002s dial-error reply=0x05"
            ),
            "[tsmux.connection#info] socks5 socket=tsmux pid=N uid=N gid=N target=127.0.0.1:8000 up=N down=N "
            "N.NNNs dial-error reply=0x05",
        )

    def test_status(self) -> None:
        self.assertEqual(normalise("tsmux 0.1.0, up 1h 2m"), "tsmux VERSION, up T")
        self.assertEqual(normalise("tsmux 0.1.0, up 41s; config /x"), "tsmux VERSION, up T; config /x")
        self.assertEqual(normalise("busiest callers: uid 1000 (alice) 1"), "busiest callers: uid N 1")
        self.assertEqual(normalise("busiest callers: uid 4242 3"), "busiest callers: uid N 3")


class CodeBlocksTests(SynchronousTestCase):
    def test_blocks(self) -> None:
        text = (
            "Intro\n\n.. code-block:: shell\n\n   one --two\n   three\n\nAfter.\n\n"
            "* item\n\n  .. code-block:: text\n     :caption: x\n\n     a\n       b\n\n"
        )
        blocks = codeBlocks(text)
        self.assertEqual([block.language for block in blocks], ["shell", "text"])
        self.assertEqual(blocks[0].lines, ["one --two", "three"])
        self.assertEqual(blocks[1].lines, ["a", "  b"])
        self.assertEqual(commandWith(blocks[0], "--two"), ["one", "--two"])
