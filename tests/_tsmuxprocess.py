"""Run the real C{tsmux} (or C{twistd -n tsmux}) as a child process in a test."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from tests._tailnet import REPO_ROOT, integrationRequired


def tsmuxCommand() -> list[str]:
    """The installed console script when there is one (CI), else C{python -m tsmux}."""
    script = os.path.join(os.path.dirname(sys.executable), "tsmux")
    if os.path.exists(script):
        return [script]
    if integrationRequired():
        raise AssertionError(f"CI must test the installed console script, and {script} is missing")
    return [sys.executable, "-m", "tsmux"]


def twistdCommand(twistdArgs: list[str] = ()) -> list[str]:
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
        deadline = time.monotonic() + timeout
        while not answers(self.socketPath):
            if self.process.poll() is not None:
                raise AssertionError(f"tsmux exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"tsmux did not listen on {self.socketPath} within {timeout} s:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        with open(self.logPath, encoding="utf-8", errors="replace") as f:
            return f.read()

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
