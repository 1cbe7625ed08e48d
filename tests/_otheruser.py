"""Run a client as another user (nobody, uid 65534) with setpriv, to test per-caller decisions."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import unittest

from tests._tailnet import skipOrFail

NOBODY = 65534
_SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@functools.cache
def pythonForNobody() -> str | None:
    """An interpreter uid 65534 can run (pyenv's under /root is out of its reach)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            result = subprocess.run([*_SETPRIV, candidate, "-c", "pass"], capture_output=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode == 0:
            return candidate
    return None


def requireOtherUser() -> None:
    if os.geteuid() != 0:
        skipOrFail("running a client as uid 65534 needs root (setpriv)")
    if shutil.which("setpriv") is None:
        skipOrFail("setpriv (util-linux) is missing")


def runAsNobody(argv: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*_SETPRIV, *argv], capture_output=True, timeout=timeout, **kw)


def pythonAsNobody(script: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    python = pythonForNobody()
    if python is None:
        skipOrFail("no Python interpreter that uid 65534 may run")
        raise unittest.SkipTest("unreachable")
    return runAsNobody([python, "-c", script, *args], timeout=timeout, cwd="/")
