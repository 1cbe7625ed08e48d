"""
A real tailscaled 1.96.4 for integration tests, run in a private network namespace.

The test process stays in the host namespace. tailscaled's LocalAPI is a Unix socket, reachable
from here because the filesystem is shared; the loopback TCP targets (HTTP, echo, a closed port)
and tailscaled's TCP SOCKS5 port live inside the namespace and are reachable only through
tailscaled or through L{PrivateTailnet.runInNamespace}.

Three modules, as treq's C{local_httpbin} has them: this one is the parent (it starts the child
and reads its description), L{tests._netns_tailnet} is the child (it runs inside the namespace
and serves), and L{tests._tailnet_shared} defines what they say to each other, once.

Typical use in a trial test::

    class SomethingTests(TestCase):
        skip = tailnetSkipReason()

        def setUp(self) -> None:
            self.tailnet = startPrivateTailnet(self)

When C{TSMUX_REQUIRE_INTEGRATION=1} (CI sets it), a missing prerequisite is an error, never a
skip, so CI cannot go green without running these tests.
"""

from __future__ import annotations

import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from typing import IO, Any

from tests._tailnet_shared import (
    HELLO_BODY,
    ChildOptions,
    Command,
    CommandReply,
    Message,
    Ready,
    StartFailed,
)
from tests._tailscale_binaries import (
    TAILSCALE_VERSION,
    defaultCacheDir,
    findTailscaleBinaries,
    tailscaledVersion,
)

__all__ = ["HELLO_BODY", "PrivateTailnet", "startPrivateTailnet", "tailnetSkipReason"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
# sockaddr_un.sun_path is 108 bytes including the NUL; keep a margin.
_MAX_SOCKET_PATH = 100


class TailnetError(Exception):
    """
    The helper or tailscaled failed; the message says where to look.
    """


class TailnetUnavailable(Exception):
    """
    A prerequisite is missing while C{TSMUX_REQUIRE_INTEGRATION=1} forbids skipping.
    """


def integrationRequired() -> bool:
    """
    True when integration tests must run (CI): skipping them would hide a broken setup.
    """
    return os.environ.get("TSMUX_REQUIRE_INTEGRATION", "") == "1"


@functools.cache
def tailnetUnavailableReason() -> str | None:
    """
    Why a private tailnet cannot be started here, or None if it can. Cached: the answer does
    not change within one test run, and probing spawns processes.
    """
    if not sys.platform.startswith("linux"):
        return "the private tailnet needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the private tailnet needs root (unshare -n, ip link set lo up)"
    for tool, package in (("unshare", "util-linux"), ("nsenter", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install {package})"
    try:
        probe = subprocess.run(
            ["unshare", "-n", "--", "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`unshare -n` failed: {e}"
    if probe.returncode != 0:
        return f"`unshare -n` is not permitted here: {probe.stderr.strip()}"
    binaries = findTailscaleBinaries()
    if binaries is None:
        return (
            f"tailscale {TAILSCALE_VERSION} binaries not found in {defaultCacheDir()}; fetch "
            f"them with `python -m tests._tailscale_binaries` (or set TSMUX_TAILSCALE_DIR)"
        )
    try:
        version = tailscaledVersion(binaries[1])
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return f"{binaries[1]} --version failed: {e}"
    if version != TAILSCALE_VERSION:
        return f"{binaries[1]} is version {version!r}, expected {TAILSCALE_VERSION}"
    return None


def endHelper(process: subprocess.Popen[Any], grace: float) -> None:
    """
    End a namespace helper child: close its stdin (its signal to stop what it started and exit),
    wait C{grace} seconds, then SIGTERM, then SIGKILL.
    """
    if process.stdin is not None:
        try:
            process.stdin.close()
        except OSError:
            pass
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def skipOrFail(reason: str) -> None:
    """
    Skip the current test with C{reason}, or fail it when integration tests are required.
    Works under trial and pytest alike (both honour C{unittest.SkipTest}).
    """
    if integrationRequired():
        raise TailnetUnavailable(f"{reason} (TSMUX_REQUIRE_INTEGRATION=1: this is an error, not a skip)")
    raise unittest.SkipTest(reason)


def requireTailnet() -> None:
    """
    Return if a private tailnet can be started; otherwise skip, or fail under CI.
    """
    reason = tailnetUnavailableReason()
    if reason is not None:
        skipOrFail(reason)


def tailnetSkipReason() -> str | None:
    """
    For a TestCase's C{skip} attribute: the reason to skip, or None when the tests should run,
    including when CI requires them (their setUp then fails loudly through L{requireTailnet}).
    """
    if integrationRequired():
        return None
    return tailnetUnavailableReason()


class PrivateTailnet:
    """
    A real tailscaled 1.96.4 and loopback targets in a private network namespace.

    Attributes, valid after L{start}:
        - localapi: tailscaled's LocalAPI socket path (reachable from the host namespace)
        - httpPort, echoPort, closedPort, socks5Port: TCP ports on 127.0.0.1 inside the namespace
        - tailscaledPid: pid of the running tailscaled (changes on restart; None while stopped)
        - helperPid: pid of the helper; its network namespace is C{/proc/helperPid/ns/net}
        - tailscale, tailscaled: paths of the binaries
        - tailscaledLog, helperLog: where their output goes, for diagnosing failures
    """

    localapi: str
    httpPort: int
    echoPort: int
    closedPort: int
    socks5Port: int
    tailscaledPid: int | None
    helperPid: int
    tailscale: str
    tailscaled: str

    def __init__(self, workdir: str, binaries: tuple[str, str] | None = None) -> None:
        """
        C{workdir} holds tailscaled's state and the logs; it is created if missing.
        C{binaries} defaults to L{findTailscaleBinaries}.
        """
        self.workdir = os.path.abspath(workdir)
        found = binaries if binaries is not None else findTailscaleBinaries()
        if found is None:
            raise TailnetError(
                f"tailscale {TAILSCALE_VERSION} binaries not found in {defaultCacheDir()}; run "
                f"`python -m tests._tailscale_binaries`"
            )
        self.tailscale, self.tailscaled = found
        self.tailscaledLog = os.path.join(self.workdir, "tailscaled.log")
        self.helperLog = os.path.join(self.workdir, "helper.log")
        self.tailscaledPid = None
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._socketDir: str | None = None
        self._stderr: IO[bytes] | None = None

    def start(self) -> None:
        """
        Spawn the helper in a new network namespace and wait (up to 30 s) for its ready line.
        Raises L{TailnetError}, after cleaning up, if it does not come up.
        """
        if self._process is not None:
            raise TailnetError("already started")
        os.makedirs(self.workdir, exist_ok=True)
        socketPath = os.path.join(self.workdir, "tailscaled.sock")
        if len(os.fsencode(socketPath)) > _MAX_SOCKET_PATH:
            # trial's and pytest's mktemp() paths can be too long for a Unix socket.
            self._socketDir = tempfile.mkdtemp(prefix="tsmux-ts-")
            # Traversable like the mktemp() dirs, so tests may connect as another uid.
            os.chmod(self._socketDir, 0o755)
            socketPath = os.path.join(self._socketDir, "tailscaled.sock")
        self._stderr = open(self.helperLog, "ab")
        self._process = subprocess.Popen(
            ["unshare", "-n", "--", *ChildOptions(self.tailscaled, self.workdir, socketPath).toArgv(sys.executable)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.helperPid = self._process.pid
        try:
            message = self._readMessage(START_TIMEOUT)
            if isinstance(message, StartFailed):
                raise TailnetError(f"tailnet helper failed: {message.error}{self._logTail()}")
            ready = Ready.expect(message)
            self.localapi = ready.localapi
            self.httpPort = ready.httpPort
            self.echoPort = ready.echoPort
            self.closedPort = ready.closedPort
            self.socks5Port = ready.socks5Port
            self.tailscaledPid = ready.tailscaledPid
        except BaseException:
            self.stop()
            raise

    def stopTailscaled(self) -> None:
        """
        Stop tailscaled gracefully (SIGTERM; SIGKILL after 5 s), keeping the namespace and targets.
        """
        self._command(Command.STOP)
        self.tailscaledPid = None

    def startTailscaled(self) -> None:
        """
        Start tailscaled again with the same state and socket; returns once the socket accepts.
        """
        reply = self._command(Command.START)
        self.tailscaledPid = reply.tailscaledPid

    def killTailscaled(self) -> None:
        """
        SIGKILL tailscaled, as a crash would: its socket file may be left behind.
        """
        self._command(Command.KILL)
        self.tailscaledPid = None

    def stop(self) -> None:
        """
        Stop tailscaled, the targets and the helper; idempotent, and safe after a failed start.
        Closing the helper's stdin is its signal to clean up; signals are the fallback.
        """
        process = self._process
        if process is not None:
            self._process = None
            # tailscaled dies with it if it comes to SIGKILL: the helper set PR_SET_PDEATHSIG=SIGKILL.
            endHelper(process, 15)
            if process.stdout is not None:
                process.stdout.close()
            self.tailscaledPid = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._socketDir is not None:
            shutil.rmtree(self._socketDir, ignore_errors=True)
            self._socketDir = None

    def runInNamespace(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """
        Run a command in the tailnet's network namespace (e.g. curl to 127.0.0.1:httpPort).
        Keyword arguments go to C{subprocess.run}; the timeout defaults to 60 s so a hung
        command cannot hang the test run.
        """
        if self._process is None:
            raise TailnetError("not started")
        kw.setdefault("timeout", 60)
        if "input" not in kw:
            kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(["nsenter", f"--net=/proc/{self.helperPid}/ns/net", "--", *argv], **kw)

    def runTailscale(self, args: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """
        Run the tailscale CLI against this tailscaled's LocalAPI socket. It talks only over the
        Unix socket, so it needs no namespace.
        """
        kw.setdefault("timeout", 60)
        if "input" not in kw:
            kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run([self.tailscale, f"--socket={self.localapi}", *args], **kw)

    def _command(self, command: Command) -> CommandReply:
        """
        Send one command to the helper and return its reply, raising if not ok.
        """
        process = self._process
        if process is None or process.stdin is None:
            raise TailnetError("not started")
        process.stdin.write(command.toLine())
        process.stdin.flush()
        reply = CommandReply.expect(self._readMessage(COMMAND_TIMEOUT))
        if not reply.ok:
            raise TailnetError(f"{command.value!r} failed: {reply.error}{self._logTail()}")
        return reply

    def _readMessage(self, timeout: float) -> Message:
        """
        Read one message line from the helper within C{timeout} seconds.
        """
        process = self._process
        assert process is not None and process.stdout is not None
        fd = process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TailnetError(f"tailnet helper gave no answer within {timeout:g} s{self._logTail()}")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    try:
                        status: int | str | None = process.wait(5)
                    except subprocess.TimeoutExpired:
                        status = "unknown (still running)"
                    raise TailnetError(f"tailnet helper closed its stdout; exit status {status}{self._logTail()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return Message.fromJSON(line)

    def _logTail(self, lines: int = 20) -> str:
        """
        The last lines of the helper's and tailscaled's logs, to put in an error message.
        """
        parts = []
        for path in (self.helperLog, self.tailscaledLog):
            try:
                with open(path, "rb") as f:
                    tail = f.read().decode("utf-8", "replace").splitlines()[-lines:]
            except OSError:
                continue
            if tail:
                parts.append(f"\n--- last lines of {path}:\n" + "\n".join(tail))
        return "".join(parts)


def startPrivateTailnet(testCase: unittest.TestCase) -> PrivateTailnet:
    """
    Skip (or fail under CI) if unavailable, else start a tailnet in a fresh C{mktemp()} directory
    and register its stop as a cleanup, so no tailscaled outlives the test.
    """
    requireTailnet()
    mktemp = getattr(testCase, "mktemp", None)
    workdir = mktemp() if mktemp is not None else tempfile.mkdtemp(prefix="tsmux-tailnet-")
    tailnet = PrivateTailnet(workdir)
    testCase.addCleanup(tailnet.stop)
    tailnet.start()
    return tailnet
