"""
Run a client as another user (nobody, uid 65534, by default) with setpriv, to test per-caller
decisions. As root: C{requireOtherUser} skips (or fails under CI) otherwise.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import unittest
from typing import Any

from tests._tailnet import skipOrFail

NOBODY = 65534
NOBODY_IDS = (NOBODY, NOBODY)


def setpriv(uid: int = NOBODY, gid: int = NOBODY) -> list[str]:
    """The command prefix that runs a program as C{uid}:C{gid} with no supplementary groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


_SETPRIV = setpriv()


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


def runAsNobody(argv: list[str], timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*_SETPRIV, *argv], capture_output=True, timeout=timeout, **kw)


def pythonArgv(ids: tuple[int, int], *args: str) -> list[str]:
    """
    The command line that runs Python as C{ids} (uid, gid) with C{args}: C{["-c", SCRIPT, ...]},
    or L{tests._httpclient.scriptArgv}'s. Skips (or fails under CI) without such an interpreter.
    """
    python = pythonForNobody()
    if python is None:
        skipOrFail("no Python interpreter that another uid may run")
        raise unittest.SkipTest("unreachable")
    return [*setpriv(*ids), python, *args]


def runPythonAs(
    ids: tuple[int, int], *args: str, input: bytes = b"", timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    """Python as C{ids} with C{args} (C{"-c", SCRIPT, ...}), from C{/}, C{input} on stdin; output captured."""
    return subprocess.run(pythonArgv(ids, *args), input=input, capture_output=True, timeout=timeout, cwd="/")


def pythonAsNobody(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """Python as uid 65534 with C{args} (C{"-c", SCRIPT, ...}), from C{/}; output captured."""
    return subprocess.run(pythonArgv(NOBODY_IDS, *args), capture_output=True, timeout=timeout, cwd="/")
