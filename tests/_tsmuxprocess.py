"""
Run the real C{tsmux} (or C{twistd -n tsmux}) as a child process in a test, alone or in front of
a private tailnet's tailscaled (L{IntegrationTestMixin}); and the documentation's examples.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import unittest
from collections.abc import Sequence
from typing import Any

from tests._fakes import TestCaseMixinBase
from tests._tailnet import REPO_ROOT, PrivateTailnet, integrationRequired, startPrivateTailnet, tailnetSkipReason
from tests._waiting import waitUntil

EXAMPLES = os.path.join(REPO_ROOT, "docs", "examples")
CONNECTION_LINE = "tsmux.connection"
"""In every line tsmux logs for a finished connection, in the text and JSON formats alike."""


def tsmuxCommand() -> list[str]:
    """The installed console script when there is one (CI), else C{python -m tsmux}."""
    script = os.path.join(os.path.dirname(sys.executable), "tsmux")
    if os.path.exists(script):
        return [script]
    if integrationRequired():
        raise AssertionError(f"CI must test the installed console script, and {script} is missing")
    return [sys.executable, "-m", "tsmux"]


def twistdCommand(twistdArgs: Sequence[str] = ()) -> list[str]:
    """twistd itself (C{python -m twisted} is the newer C{twist}, with other options)."""
    run = "from twisted.scripts.twistd import run; run()"
    return [sys.executable, "-c", run, "--pidfile=", *twistdArgs, "-n", "tsmux"]


def childEnvironment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def shortDir(testCase: unittest.TestCase) -> str:
    path = tempfile.mkdtemp(prefix="tsmux-", dir="/tmp")
    os.chmod(path, 0o755)
    testCase.addCleanup(shutil.rmtree, path, True)
    return path


def answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class TsmuxProcess:
    """A running tsmux; L{stop} sends SIGTERM and checks it exits cleanly."""

    def __init__(self, argv: list[str], socketPath: str, logPath: str) -> None:
        self.socketPath = socketPath
        self.logPath = logPath
        self._log = open(logPath, "wb")
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=childEnvironment()
        )
        self.returncode: int | None = None

    def waitUntilListening(self, timeout: float = 15.0) -> None:
        waitUntil(
            lambda: self.process.poll() is not None or answers(self.socketPath),
            timeout,
            lambda: f"tsmux to listen on {self.socketPath}:\n{self.log()}",
        )
        if self.process.poll() is not None:
            raise AssertionError(f"tsmux exited with {self.process.returncode}:\n{self.log()}")

    def log(self) -> str:
        with open(self.logPath, encoding="utf-8", errors="replace") as f:
            return f.read()

    def connectionLines(self) -> int:
        """How many connections tsmux has logged as finished (one line each)."""
        return self.log().count(CONNECTION_LINE)

    def waitForConnectionLines(self, count: int, timeout: float = 15.0) -> None:
        """
        Until tsmux has logged C{count} finished connections, counting the readiness probe's:
        each logs its line once both its sockets are closed.
        """
        waitUntil(
            lambda: self.connectionLines() >= count,
            timeout,
            lambda: f"{count} connection lines (have {self.connectionLines()}):\n{self.log()[-3000:]}",
        )

    def waitForLog(self, text: str, timeout: float = 15.0) -> None:
        """Until C{text} is in tsmux's log."""
        waitUntil(lambda: text in self.log(), timeout, lambda: f"{text!r} in tsmux's log:\n{self.log()[-3000:]}")

    def openFds(self) -> int:
        """tsmux's open file descriptors now."""
        return openFds(self.process.pid)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self.returncode = self.process.returncode
        return self.returncode


def startTsmux(
    testCase: unittest.TestCase,
    *args: str,
    twistd: bool = False,
    socketPath: str | None = None,
    twistdArgs: tuple[str, ...] | list[str] = (),
    prefix: tuple[str, ...] | list[str] = (),
) -> TsmuxProcess:
    directory = shortDir(testCase)
    path = socketPath or os.path.join(directory, "tsmux.sock")
    command = twistdCommand(list(twistdArgs)) if twistd else tsmuxCommand()
    argv = [*prefix, *command, "--listen", path, *args]
    tsmux = TsmuxProcess(argv, path, os.path.join(directory, "tsmux.log"))
    testCase.addCleanup(tsmux.stop)
    tsmux.waitUntilListening()
    return tsmux


def openFds(pid: int) -> int:
    """How many file descriptors process C{pid} has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def assertCleanLog(testCase: unittest.TestCase, log: str) -> None:
    """No traceback or unhandled error in a tsmux log; on failure, show where (not the whole log)."""
    for marker in ("Traceback", "Unhandled"):
        index = log.find(marker)
        if index >= 0:
            testCase.fail(f"{marker!r} in tsmux's log:\n{log[max(0, index - 300) : index + 3000]}")


class IntegrationTestMixin(TestCaseMixinBase):
    """
    For a trial test case: a private tailnet per test (C{self.tailnet}), and L{startTsmux} for a
    tsmux process in front of its tailscaled, whose log must be clean at the end.
    """

    skip = tailnetSkipReason()
    tailnet: PrivateTailnet

    def setUp(self) -> None:
        self.tailnet = startPrivateTailnet(self)

    def startTsmux(self, *args: str, **kw: Any) -> TsmuxProcess:
        tsmux = startTsmux(self, "--localapi", self.tailnet.localapi, *args, **kw)
        self.addCleanup(self.assertNoTraceback, tsmux)
        return tsmux

    def assertNoTraceback(self, tsmux: TsmuxProcess) -> None:
        tsmux.stop()
        assertCleanLog(self, tsmux.log())


async def runExample(name: str, *args: str) -> tuple[int, str, str]:
    """Run docs/examples/NAME as a user would, with the reactor running: (exit code, stdout, stderr)."""
    from twisted.internet import reactor
    from twisted.internet.utils import getProcessOutputAndValue

    out, err, code = await getProcessOutputAndValue(
        sys.executable, [os.path.join(EXAMPLES, name), *args], env=childEnvironment(), path=REPO_ROOT, reactor=reactor
    )
    return code, out.decode(), err.decode()
