"""
Acting as the caller: what tailscaled's SO_PEERCRED sees, per-thread id
switching, TCP socket owners, and children started as the caller.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import platform
import pwd
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tsmux import _ascaller
from tsmux._ascaller import (
    CannotActAs,
    Identity,
    actingAs,
    canActAsOthers,
    connectTCPAs,
    connectUnixAs,
    openPathDescriptor,
    spawnProcessAs,
)
from tsmux._errors import failureReason

from ._waiting import waitUntilAsync

NOBODY = 65534
AS_NOBODY = Identity(NOBODY, NOBODY, frozenset({NOBODY}))
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _requireRoot() -> None:
    if os.geteuid() != 0:
        raise SkipTest("acting as another user needs root (CAP_SETUID and CAP_SETGID); CI runs these as root")


def _status(path: str = "/proc/self/status") -> dict[str, str]:
    with open(path) as status:
        return {name: value.strip() for name, _, value in (line.partition(":") for line in status)}


def _parseStatus(text: str) -> dict[str, str]:
    return {name: value.strip() for name, _, value in (line.partition(":") for line in text.splitlines())}


def _snapshot() -> tuple[object, ...]:
    """This thread's ids, and the main thread's as /proc shows them."""
    status = _status()
    return (
        os.getresuid(),
        os.getresgid(),
        sorted(os.getgroups()),
        status["Uid"],
        status["Gid"],
        status["Groups"],
        _status("/proc/thread-self/status")["Uid"],
    )


def _openSockets() -> int:
    """Open socket descriptors (not all: the reactor makes its signal pipes when it first runs)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
    return count


class _Peer(Protocol):
    """Remembers that it was connected, what arrived, and when it was lost."""

    def __init__(self) -> None:
        self.made = False
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


def _closeLater(test: TestCase, peer: _Peer) -> None:
    def close() -> Deferred[None]:
        peer.transport.abortConnection()  # type: ignore[union-attr]
        return peer.lost

    test.addCleanup(close)


def _credentials(connection: socket.socket) -> tuple[int, int, list[int]]:
    _pid, uid, gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    raw = connection.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    return uid, gid, sorted(struct.unpack(f"{len(raw) // 4}I", raw))


class _UnixListener:
    """A plain listening Unix socket (mode 0666, like tailscaled's) that reports who connected."""

    def __init__(self, test: TestCase, path: str, backlog: int = 16, listen: bool = True) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        test.addCleanup(self.socket.close)
        self.socket.bind(path)
        os.chmod(path, 0o666)
        if listen:
            self.socket.listen(backlog)
        self.socket.settimeout(10)
        self._test = test

    def accept(self) -> socket.socket:
        """One queued connection (the tests only call this when one is queued)."""
        connection, _ = self.socket.accept()
        self._test.addCleanup(connection.close)
        return connection

    def fill(self) -> list[socket.socket]:
        """Connect until the accept queue is full (EAGAIN), so the next connect must wait."""
        fillers: list[socket.socket] = []
        for _ in range(256):
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            self._test.addCleanup(filler.close)
            try:
                filler.connect(self.path)
            except BlockingIOError:
                filler.close()
                return fillers
            fillers.append(filler)
        raise AssertionError("the accept queue never filled")


def _directory(test: TestCase, mode: int = 0o700) -> str:
    """A fresh directory from mktemp (relative: Unix socket paths must stay short), owned by us."""
    path = test.mktemp()
    os.mkdir(path)
    os.chmod(path, mode)
    return path


class IdentityTests(SynchronousTestCase):
    def test_groupsAreFrozen(self) -> None:
        identity = Identity(1, 2, {3, 4})  # type: ignore[arg-type]
        self.assertEqual(identity.groups, frozenset({3, 4}))
        self.assertIsInstance(identity.groups, frozenset)
        self.assertEqual(hash(identity), hash(Identity(1, 2, frozenset({4, 3}))))

    def test_unchangedMarkersRefused(self) -> None:
        """(uid_t)-1 means "leave it as it is" to setresuid: acting as it would keep our own ids."""
        for uid, gid, groups in [(-1, 1, set()), (1, 0xFFFFFFFF, set()), (1, 1, {-1}), (1, 1, {2**32})]:
            self.assertRaises(ValueError, Identity, uid, gid, groups)


class _Exited(BaseException):
    pass


class SwitchingOrderTests(SynchronousTestCase):
    """
    The syscalls and their order, against a fake that models the kernel's
    per-thread ids (setres*id also set the filesystem id): nothing real changes.
    """

    def setUp(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.failOn: tuple[object, ...] | None = None
        self.aborted: str | None = None
        numbers = _ascaller._SYSCALLS["x86_64"]
        self.names = {number: name for name, number in numbers._asdict().items()}
        # As root, whoever runs the tests: the model is the kernel's, not this process's.
        self.own: tuple[tuple[int, int, int], tuple[int, int, int], list[int]] = ((0, 0, 0), (0, 0, 0), [])
        self.state: dict[str, Any] = {
            "uids": list(self.own[0]),
            "gids": list(self.own[1]),
            "groups": self.own[2],
            "fsuid": self.own[0][1],
            "fsgid": self.own[1][1],
        }
        self.patch(_ascaller, "_syscallNumbers", lambda: numbers)
        self.patch(_ascaller, "_syscall", self.fakeSyscall)
        self.patch(_ascaller, "_idsNow", self.fakeIdsNow)
        self.patch(_ascaller, "_abort", self.fakeAbort)
        self.patch(_ascaller, "_ownIds", self.fakeOwnIds)
        self.caller = Identity(4321, 5432, frozenset({5432, 6543}))

    def fakeSyscall(self, number: int, *args: Any) -> int:
        name = self.names[number]
        if name in ("setfsuid", "setfsgid"):
            old = self.state[name[3:]]
            if args[0] == -1:
                return old  # the "ask" form: not a change, not recorded
        call: tuple[object, ...] = (name, sorted(args[1][: args[0]])) if name == "setgroups" else (name, *args)
        if call == self.failOn:
            raise OSError(errno.EPERM, "Operation not permitted")
        self.calls.append(call)
        if name == "setgroups":
            self.state["groups"] = call[1]
        elif name in ("setresuid", "setresgid"):
            ids = self.state[name[-3:] + "s"]
            for index, value in enumerate(args):
                if value != -1:
                    ids[index] = value
            self.state["fs" + name[-3:]] = ids[1]
        else:
            self.state[name[3:]] = args[0]
            return old
        return 0

    def fakeOwnIds(self) -> _ascaller._OwnIds:
        state = self.state
        return _ascaller._OwnIds(tuple(state["uids"]), tuple(state["gids"]), frozenset(state["groups"]))

    def fakeIdsNow(self, numbers: object) -> tuple[object, ...]:
        state = self.state
        return (tuple(state["uids"]), tuple(state["gids"]), frozenset(state["groups"]), state["fsuid"], state["fsgid"])

    def fakeAbort(self, message: str) -> None:
        self.aborted = message
        raise _Exited()

    def restoreCalls(self, realIds: bool = True) -> list[tuple[object, ...]]:
        """Back: effective uid first, the real and saved ones when they may have changed, gids, groups."""
        (ruid, euid, suid), (rgid, egid, sgid), groups = self.own
        calls: list[tuple[object, ...]] = [("setresuid", -1, euid, -1)]
        if realIds:
            calls.append(("setresuid", ruid, euid, suid))
        return [*calls, ("setresgid", rgid, egid, sgid), ("setgroups", groups)]

    def assertBackToOwn(self) -> None:
        self.assertEqual(self.fakeIdsNow(None), ((0, 0, 0), (0, 0, 0), frozenset(), 0, 0))
        self.assertIsNone(self.aborted)

    def test_groupsThenGidThenUidThenOwnFilesystemIds(self) -> None:
        (_, euid, _), (_, egid, _), _ = self.own
        with actingAs(self.caller):
            self.calls.append(("body", self.state["uids"][1], self.state["fsuid"]))
        self.assertEqual(
            self.calls,
            [
                ("setgroups", [5432, 6543]),
                ("setresgid", -1, 5432, -1),
                ("setresuid", -1, 4321, -1),
                ("setfsuid", euid),
                ("setfsgid", egid),
                ("body", 4321, euid),
                *self.restoreCalls(realIds=False),
            ],
        )
        self.assertBackToOwn()

    def test_callerFilesystemIds(self) -> None:
        with actingAs(self.caller, ownFilesystemIds=False):
            self.calls.append(("body", self.state["fsuid"], self.state["fsgid"]))
        self.assertEqual(
            self.calls,
            [
                ("setgroups", [5432, 6543]),
                ("setresgid", -1, 5432, -1),
                ("setresuid", -1, 4321, -1),
                ("body", 4321, 5432),
                *self.restoreCalls(realIds=False),
            ],
        )
        self.assertBackToOwn()

    def test_failedSwitchIsUndone(self) -> None:
        self.failOn = ("setresuid", -1, 4321, -1)
        with self.assertRaises(CannotActAs) as caught:
            with actingAs(self.caller):
                self.calls.append(("body",))
        self.assertEqual(caught.exception.errno, errno.EPERM)
        self.assertEqual(self.calls, [("setgroups", [5432, 6543]), ("setresgid", -1, 5432, -1), *self.restoreCalls()])
        self.assertBackToOwn()

    def test_nothingToUndoWhenTheFirstStepFails(self) -> None:
        """Without the rights, "restoring" would fail too, and abort: an unprivileged process just gets EPERM."""
        self.failOn = ("setgroups", [5432, 6543])
        with self.assertRaises(CannotActAs):
            with actingAs(self.caller):
                self.fail("switched")
        self.assertEqual(self.calls, [])
        self.assertBackToOwn()

    def test_failedRestoreAborts(self) -> None:
        self.failOn = self.restoreCalls()[0]
        with self.assertRaises(_Exited):
            with actingAs(self.caller):
                pass
        self.assertIn("could not restore", self.aborted or "")

    def test_restoreThatDoesNotStickAborts(self) -> None:
        self.patch(_ascaller, "_expected", lambda own: ("never",))
        with self.assertRaises(_Exited):
            with actingAs(self.caller):
                pass

    def test_forExecTheRealIdsChangeToo(self) -> None:
        (_, euid, _), (_, egid, _), _ = self.own
        with _ascaller._becomingForExec(self.caller):
            self.calls.append(("spawn", tuple(self.state["uids"]), tuple(self.state["gids"])))
        self.assertEqual(
            self.calls,
            [
                ("setgroups", [5432, 6543]),
                ("setresgid", 5432, 5432, egid),  # saved: ours, the way back
                ("setresuid", 4321, 4321, euid),
                ("spawn", (4321, 4321, euid), (5432, 5432, egid)),
                *self.restoreCalls(),
            ],
        )
        self.assertBackToOwn()

    def test_noSwitchForNoneOrOurselves(self) -> None:
        for identity in (None, Identity(0, 0, frozenset())):
            with actingAs(identity):
                pass
        self.assertEqual(self.calls, [])

    def test_onlyAsRoot(self) -> None:
        """With capabilities but not root, coming back from a root caller would cost them: refused."""
        self.state["uids"] = [1000, 1000, 1000]
        for switch in (actingAs, _ascaller._becomingForExec):
            with self.assertRaises(CannotActAs) as caught:
                with switch(self.caller):
                    self.fail("switched")
            self.assertEqual(caught.exception.errno, errno.EPERM)
        self.assertEqual(self.calls, [])


class SupportTests(SynchronousTestCase):
    def test_unsupportedMachine(self) -> None:
        self.patch(platform, "machine", lambda: "sparc64")
        self.assertIn("unsupported machine 'sparc64'", canActAsOthers() or "")
        before = _snapshot()
        with self.assertRaises(CannotActAs) as caught:
            with actingAs(Identity(4321, 4321, frozenset())):
                self.fail("switched on an unknown machine")
        self.assertEqual(caught.exception.errno, errno.ENOSYS)
        self.assertEqual(_snapshot(), before)
        with actingAs(None):
            pass
        # A connect as somebody else fails with those words (not the OS's "Function not implemented").
        connecting = connectUnixAs(MemoryReactorClock(), "/nonexistent", Identity(4321, 4321, frozenset()), _Peer(), 1)
        failure = self.failureResultOf(connecting, error.ConnectError)
        self.assertIn("unsupported on machine 'sparc64'", failureReason(failure))

    def test_syscallNumbersOfThisMachine(self) -> None:
        """The table matches the kernel headers where they are installed."""
        machine = platform.machine()
        numbers = _ascaller._SYSCALLS.get(machine)
        header = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"}.get(
            machine, "/usr/include/asm-generic/unistd.h"
        )
        if numbers is None or not os.path.exists(header):
            raise SkipTest(f"no syscall table or header for {machine}")
        with open(header) as text:
            defined = {
                parts[1]: int(parts[2])
                for parts in (line.split() for line in text)
                if len(parts) == 3 and parts[0] == "#define" and parts[2].isdigit()
            }
        for name, number in numbers._asdict().items():
            self.assertEqual(defined[f"__NR_{name}"], number, name)

    def test_notRoot(self) -> None:
        self.patch(_ascaller, "_capabilitySets", lambda: {"CapEff": (1 << 7) | (1 << 6)})
        self.patch(os, "geteuid", lambda: 1000)
        self.assertIn("not root", canActAsOthers() or "")

    def test_missingCapabilities(self) -> None:
        self.patch(os, "geteuid", lambda: 0)
        for effective, missing in [(0, "CAP_SETUID/CAP_SETGID"), (1 << 7, "CAP_SETGID"), (1 << 6, "CAP_SETUID")]:
            self.patch(_ascaller, "_capabilitySets", lambda effective=effective: {"CapEff": effective})
            reason = canActAsOthers()
            self.assertIsNotNone(reason)
            self.assertIn(f"without {missing} ", reason or "")
        self.patch(_ascaller, "_capabilitySets", lambda: {"CapEff": (1 << 7) | (1 << 6)})
        self.assertIsNone(canActAsOthers())

    def test_rootCanActAsOthers(self) -> None:
        _requireRoot()
        self.assertIsNone(canActAsOthers())

    def test_spawnRefusedWithInheritableCapabilities(self) -> None:
        """Ambient capabilities (a subset of the inheritable ones) would survive into the child."""
        spawned = []

        class FakeReactor:
            def spawnProcess(self, *args: object, **kwargs: object) -> None:
                spawned.append(args)

        self.patch(_ascaller, "_capabilitySets", lambda: {"CapInh": 1 << 7, "CapAmb": 1 << 7})
        caller = Identity(4321, 4321, frozenset())
        with self.assertRaises(OSError) as caught:
            spawnProcessAs(FakeReactor(), caller, ProcessProtocol(), "/bin/true", ["true"], {})
        self.assertEqual(caught.exception.errno, errno.EPERM)
        self.assertEqual(spawned, [])


def _runAsNobody(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*_SETPRIV, *argv], capture_output=True, timeout=60, **kwargs)


@functools.cache
def _pythonForNobody() -> str | None:
    """An interpreter that imports tsmux when setpriv runs it as uid 65534 (pyenv's under /root may not)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            result = _runAsNobody([candidate, "-c", "import tsmux._ascaller"], cwd="/", env={"PYTHONPATH": PROJECT})
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode == 0:
            return candidate
    return None


class DroppedPrivilegeTests(SynchronousTestCase):
    def test_reasonWithoutPrivileges(self) -> None:
        _requireRoot()
        python = _pythonForNobody()
        if python is None:
            raise SkipTest("no Python that uid 65534 may run and that imports tsmux (check PYTHONPATH)")
        script = (
            "import errno\n"
            "from tsmux._ascaller import Identity, actingAs, canActAsOthers\n"
            "print(canActAsOthers())\n"
            "try:\n"
            "    with actingAs(Identity(1, 1, {1})):\n"
            "        print('switched')\n"
            "except OSError as e:\n"
            "    print(errno.errorcode[e.errno])\n"
        )
        result = _runAsNobody([python, "-c", script], cwd="/", env={"PYTHONPATH": PROJECT})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            result.stdout.decode().splitlines(),
            [
                "not root",
                "EPERM",
            ],
        )


class ThreadLocalityTests(SynchronousTestCase):
    def test_otherThreadsKeepTheirIds(self) -> None:
        """
        A thread started before the switch reads its ids while this thread is
        switched: they stay ours, while /proc shows this (main) thread
        switched, which also proves the read happened during the switch.
        """
        _requireRoot()
        if threading.current_thread() is not threading.main_thread():
            raise SkipTest("needs to run in the main thread (/proc/self is the main thread)")
        go, done = threading.Event(), threading.Event()
        seen: dict[str, object] = {}

        def other() -> None:
            go.wait(10)
            seen["ids"] = (os.getresuid(), os.getresgid(), sorted(os.getgroups()))
            seen["own"] = _status("/proc/thread-self/status")
            seen["main"] = _status("/proc/self/status")
            done.set()

        helper = threading.Thread(target=other)
        helper.start()
        own = (os.getresuid(), os.getresgid(), sorted(os.getgroups()))
        ownStatus = _status()
        try:
            with actingAs(Identity(1234, 2345, frozenset({2345, 3456}))):
                inside = _status("/proc/thread-self/status")
                go.set()
                self.assertTrue(done.wait(10))
        finally:
            go.set()
            helper.join(10)
        self.assertEqual(inside["Uid"].split(), ["0", "1234", "0", "0"])
        self.assertEqual(inside["Gid"].split(), ["0", "2345", "0", "0"])
        self.assertEqual(inside["Groups"].split(), ["2345", "3456"])
        self.assertEqual(seen["ids"], own)
        self.assertEqual(seen["own"]["Uid"], ownStatus["Uid"])  # type: ignore[index]
        self.assertEqual(seen["own"]["Groups"], ownStatus["Groups"])  # type: ignore[index]
        self.assertEqual(seen["main"]["Uid"].split()[1], "1234")  # type: ignore[index]
        self.assertEqual(_snapshot()[:3], own)

    def test_idsComeBackAfterAnException(self) -> None:
        _requireRoot()
        before = _snapshot()
        with self.assertRaises(ZeroDivisionError):
            with actingAs(AS_NOBODY):
                self.assertEqual(os.geteuid(), NOBODY)
                1 / 0  # noqa: B018
        self.assertEqual(_snapshot(), before)


class ConnectUnixAsTests(TestCase):
    def setUp(self) -> None:
        self.directory = _directory(self)
        self.path = os.path.join(self.directory, "s")

    def connect(self, identity: Identity | None, timeout: float = 10.0) -> tuple[_Peer, Deferred[Any]]:
        peer = _Peer()
        return peer, connectUnixAs(_reactor(), self.path, identity, peer, timeout)

    def connected(self, identity: Identity | None) -> _Peer:
        peer, connecting = self.connect(identity)
        self.assertIs(self.successResultOf(connecting), peer)  # AF_UNIX connects at once
        self.assertTrue(peer.made)
        _closeLater(self, peer)
        return peer

    def test_serverSeesTheCaller(self) -> None:
        _requireRoot()
        listener = _UnixListener(self, self.path)
        cases = [
            (AS_NOBODY, (NOBODY, NOBODY, [NOBODY])),
            (Identity(1234, 2345, frozenset({2345, 3456})), (1234, 2345, [2345, 3456])),
            (None, (os.geteuid(), os.getegid(), sorted(os.getgroups()))),
        ]
        for identity, expected in cases:
            self.connected(identity)
            self.assertEqual(_credentials(listener.accept()), expected, identity)

    def test_ownIdsUnchangedAfterwards(self) -> None:
        _requireRoot()
        before = _snapshot()
        listener = _UnixListener(self, self.path)
        for identity in (AS_NOBODY, Identity(1234, 2345, frozenset({2345, 3456})), None):
            self.connected(identity)
            listener.accept()
            self.assertEqual(_snapshot(), before)
        self.failureResultOf(connectUnixAs(_reactor(), self.path + "x", AS_NOBODY, _Peer(), 1))
        self.assertEqual(_snapshot(), before)

    def test_rootOnlyDirectory(self) -> None:
        """Path lookup keeps our rights (fsuid 0), SO_PEERCRED shows the caller."""
        _requireRoot()
        listener = _UnixListener(self, self.path)
        info = os.stat(self.directory)
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_uid), (0o700, 0))
        # The control: as the caller through and through, the directory is closed.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(probe.close)
        with self.assertRaises(PermissionError):
            with actingAs(AS_NOBODY, ownFilesystemIds=False):
                probe.connect(self.path)
        self.connected(AS_NOBODY)
        self.assertEqual(_credentials(listener.accept()), (NOBODY, NOBODY, [NOBODY]))

    @inlineCallbacks
    def test_retriesWhileTheQueueIsFull(self) -> Generator[Deferred[Any], Any, Any]:
        identity = AS_NOBODY if os.geteuid() == 0 else None
        listener = _UnixListener(self, self.path, backlog=0)
        fillers = listener.fill()
        self.assertTrue(fillers)
        peer, connecting = self.connect(identity)
        self.assertNoResult(connecting)
        for _ in fillers:
            listener.accept()
        self.assertIs((yield connecting), peer)
        _closeLater(self, peer)
        expected = (NOBODY, NOBODY, [NOBODY]) if identity else (os.geteuid(), os.getegid(), sorted(os.getgroups()))
        self.assertEqual(_credentials(listener.accept()), expected)

    @inlineCallbacks
    def test_timeoutWhileTheQueueStaysFull(self) -> Generator[Deferred[Any], Any, Any]:
        listener = _UnixListener(self, self.path, backlog=0)
        listener.fill()
        started = time.monotonic()
        _, connecting = self.connect(AS_NOBODY if os.geteuid() == 0 else None, timeout=0.3)
        yield self.assertFailure(connecting, error.TimeoutError)
        self.assertTrue(0.25 <= time.monotonic() - started < 5, time.monotonic() - started)

    def test_cancelWhileRetrying(self) -> None:
        reactor = _reactor()
        listener = _UnixListener(self, self.path, backlog=0)
        listener.fill()
        calls = set(reactor.getDelayedCalls())
        descriptors = _openSockets()
        _, connecting = self.connect(AS_NOBODY if os.geteuid() == 0 else None)
        self.assertNoResult(connecting)
        self.assertTrue([call for call in reactor.getDelayedCalls() if call not in calls], "no retry scheduled")
        connecting.cancel()
        self.failureResultOf(connecting, CancelledError)
        self.assertEqual([call for call in reactor.getDelayedCalls() if call not in calls and call.active()], [])
        self.assertEqual(_openSockets(), descriptors)

    def test_missingPath(self) -> None:
        _, connecting = self.connect(AS_NOBODY if os.geteuid() == 0 else None)
        failure = self.failureResultOf(connecting, error.ConnectError)
        self.assertEqual(failureReason(failure), "No such file or directory")

    def test_notListening(self) -> None:
        _UnixListener(self, self.path, listen=False)
        _, connecting = self.connect(AS_NOBODY if os.geteuid() == 0 else None)
        failure = self.failureResultOf(connecting, error.ConnectionRefusedError)
        self.assertEqual(failureReason(failure), "Connection refused")

    @inlineCallbacks
    def test_bytesFlow(self) -> Generator[Deferred[Any], Any, Any]:
        listener = _UnixListener(self, self.path)
        peer = self.connected(None)
        server = listener.accept()
        server.sendall(b"ping")
        yield waitUntilAsync(lambda: peer.received == b"ping")
        peer.transport.write(b"pong")  # type: ignore[union-attr]
        server.setblocking(False)
        yield waitUntilAsync(lambda: _recv(server) == b"pong")


def _hasReceived(peer: _Peer, data: bytes) -> Callable[[], bool]:
    return lambda: peer.received == data


def _nextRecvIs(connection: socket.socket, data: bytes) -> Callable[[], bool]:
    return lambda: _recv(connection) == data


def _recv(connection: socket.socket) -> bytes:
    try:
        return connection.recv(100)
    except BlockingIOError:
        return b""


def _tcpOwner(family: socket.AddressFamily, port: int) -> int:
    """The uid /proc/net/tcp(6) shows for the socket whose local port is C{port}."""
    table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
    with open(table) as lines:
        next(lines)
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[7])
    raise AssertionError(f"no socket with local port {port} in {table}")


class ConnectTCPAsTests(TestCase):
    def listen(self, host: str, backlog: int = 16) -> tuple[socket.socket, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        try:
            listener.bind((host, 0))
        except OSError as failure:
            raise SkipTest(f"cannot listen on {host}: {failure}") from None
        listener.listen(backlog)
        listener.settimeout(10)
        return listener, listener.getsockname()[1]

    @inlineCallbacks
    def ownedByTheCaller(self, host: str) -> Generator[Deferred[Any], Any, Any]:
        _requireRoot()
        listener, port = self.listen(host)
        family = listener.family
        for identity, owner in ((AS_NOBODY, NOBODY), (None, os.geteuid())):
            peer = _Peer()
            self.assertIs((yield connectTCPAs(_reactor(), host, port, identity, peer, 10)), peer)
            self.assertTrue(peer.made)
            _closeLater(self, peer)
            self.assertEqual(_tcpOwner(family, peer.transport.getHost().port), owner)  # type: ignore[union-attr]
            server, _ = listener.accept()
            self.addCleanup(server.close)
            server.sendall(b"ping")
            yield waitUntilAsync(_hasReceived(peer, b"ping"))
            peer.transport.write(b"pong")  # type: ignore[union-attr]
            server.setblocking(False)
            yield waitUntilAsync(_nextRecvIs(server, b"pong"))
        self.assertEqual(_tcpOwner(family, port), os.geteuid())  # the listener: ours

    def test_ownedByTheCallerIPv4(self) -> Deferred[Any]:
        return self.ownedByTheCaller("127.0.0.1")

    def test_ownedByTheCallerIPv6(self) -> Deferred[Any]:
        return self.ownedByTheCaller("::1")

    @inlineCallbacks
    def test_refused(self) -> Generator[Deferred[Any], Any, Any]:
        bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound, never listening: RST
        self.addCleanup(bound.close)
        bound.bind(("127.0.0.1", 0))
        identity = AS_NOBODY if os.geteuid() == 0 else None
        descriptors = _openSockets()
        connecting = connectTCPAs(_reactor(), "127.0.0.1", bound.getsockname()[1], identity, _Peer(), 10)
        failure = yield self.assertFailure(connecting, error.ConnectionRefusedError)
        self.assertEqual(failureReason(Failure(failure)), "Connection refused")
        self.assertEqual(_openSockets(), descriptors)

    def test_notAnIPLiteral(self) -> None:
        for host in ("localhost", "example.com", "1.2.3", ""):
            self.assertRaises(ValueError, connectTCPAs, _reactor(), host, 80, None, _Peer(), 1)

    def pending(self, timeout: float) -> tuple[Deferred[Any], int]:
        """
        A connect that stays in SYN_SENT (a listener whose accept queue is
        full drops SYNs), and the number of open sockets just before it.
        """
        listener, port = self.listen("127.0.0.1", backlog=0)
        for _ in range(4):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.addCleanup(filler.close)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        identity = AS_NOBODY if os.geteuid() == 0 else None
        before = _openSockets()
        connecting = connectTCPAs(_reactor(), "127.0.0.1", port, identity, _Peer(), timeout)
        self.assertNoResult(connecting)
        self.assertEqual(_openSockets(), before + 1)
        return connecting, before

    @inlineCallbacks
    def test_timeout(self) -> Generator[Deferred[Any], Any, Any]:
        started = time.monotonic()
        connecting, before = self.pending(0.3)
        yield self.assertFailure(connecting, error.TimeoutError)
        self.assertTrue(0.25 <= time.monotonic() - started < 5, time.monotonic() - started)
        self.assertEqual(_openSockets(), before)

    def test_cancel(self) -> None:
        reactor = _reactor()
        writers = set(reactor.getWriters())
        calls = set(reactor.getDelayedCalls())
        connecting, before = self.pending(10)
        connecting.cancel()
        self.failureResultOf(connecting, CancelledError)
        self.assertEqual(set(reactor.getWriters()), writers)
        self.assertEqual([call for call in reactor.getDelayedCalls() if call not in calls and call.active()], [])
        self.assertEqual(_openSockets(), before)


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[tuple[int | None, bytes, bytes]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback((getattr(reason.value, "exitCode", None), self.out, self.err))


@inlineCallbacks
def _spawnablePython(identity: Identity) -> Generator[Deferred[Any], Any, Any]:
    """
    A Python that a child as C{identity} may run: pyenv's under /root (mode
    0700) is out of its reach.  (setpriv runs it anyway: it execs with
    capabilities still effective, so it is no test of this.)
    """
    for candidate in ("/usr/bin/python3", sys.executable):
        collect = _Collect()
        try:
            spawnProcessAs(_reactor(), identity, collect, candidate, [candidate, "-I", "-c", "import socket"], {})
        except OSError:
            continue
        code, _, _ = yield collect.ended
        if code == 0:
            return candidate
    raise SkipTest(f"no Python interpreter that uid {identity.uid} may run")


def _unusedUid(start: int = 54321) -> int:
    for uid in range(start, start + 1000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise SkipTest("no uid without a passwd entry near 54321")


class SpawnProcessAsTests(TestCase):
    @inlineCallbacks
    def childStatus(self, identity: Identity | None) -> Generator[Deferred[Any], Any, Any]:
        collect = _Collect()
        spawnProcessAs(_reactor(), identity, collect, "cat", ["cat", "/proc/self/status"], {"PATH": "/usr/bin:/bin"})
        code, out, err = yield collect.ended
        self.assertEqual(code, 0, err)
        return _parseStatus(out.decode())

    @inlineCallbacks
    def assertChildIs(self, identity: Identity) -> Generator[Deferred[Any], Any, Any]:
        before = _snapshot()
        status = yield self.childStatus(identity)
        self.assertEqual(_snapshot(), before)
        self.assertEqual(status["Uid"].split(), [str(identity.uid)] * 4)
        self.assertEqual(status["Gid"].split(), [str(identity.gid)] * 4)
        self.assertEqual(sorted(map(int, status["Groups"].split())), sorted(identity.groups))
        for capabilities in ("CapEff", "CapPrm", "CapAmb", "CapInh"):
            self.assertEqual(int(status[capabilities], 16), 0, capabilities)

    def test_childRunsAsTheCaller(self) -> Deferred[Any]:
        _requireRoot()
        return self.assertChildIs(Identity(NOBODY, NOBODY, frozenset({NOBODY, 4242})))

    def test_callerWithoutPasswdEntry(self) -> Deferred[Any]:
        _requireRoot()
        uid = _unusedUid()
        return self.assertChildIs(Identity(uid, uid, frozenset({uid})))

    def test_forkedChildRunsAsTheCaller(self) -> Deferred[Any]:
        """Twisted forks instead of posix_spawn in some cases; its private switch forces that here."""
        _requireRoot()
        reactor = _reactor()
        reactor._neverUseSpawn = True
        self.addCleanup(delattr, reactor, "_neverUseSpawn")
        return self.assertChildIs(Identity(NOBODY, NOBODY, frozenset({NOBODY, 4242})))

    @inlineCallbacks
    def test_asThisProcess(self) -> Generator[Deferred[Any], Any, Any]:
        status = yield self.childStatus(None)
        self.assertEqual(status["Uid"].split()[1], str(os.geteuid()))

    @inlineCallbacks
    def test_socketThroughPathDescriptor(self) -> Generator[Deferred[Any], Any, Any]:
        """
        A child as uid 65534 cannot reach a socket in a root-only directory by
        its path, but can through the O_PATH descriptor given as fd 3.
        """
        _requireRoot()
        python = yield _spawnablePython(AS_NOBODY)
        path = os.path.join(_directory(self), "s")
        listener = _UnixListener(self, path)
        listener.socket.setblocking(False)
        script = (
            "import socket, sys\n"
            "probe = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    probe.connect(sys.argv[1])\n"
            "except PermissionError:\n"
            "    print('by path: denied')\n"
            "else:\n"
            "    print('by path: connected')\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect('/proc/self/fd/3')\n"
            "s.sendall(b'hello')\n"
            "print('fd 3: connected')\n"
        )
        descriptor = openPathDescriptor(path)
        collect = _Collect()
        try:
            spawnProcessAs(
                _reactor(),
                Identity(NOBODY, NOBODY, frozenset({NOBODY})),
                collect,
                python,
                [python, "-I", "-c", script, path],
                {},
                childFDs={0: "w", 1: "r", 2: "r", 3: descriptor},
            )
        finally:
            os.close(descriptor)
        code, out, err = yield collect.ended
        self.assertEqual((code, out.decode().splitlines()), (0, ["by path: denied", "fd 3: connected"]), err)
        connection = yield waitUntilAsync(lambda: _accepted(listener.socket))
        self.addCleanup(connection.close)
        connection.setblocking(True)
        connection.settimeout(10)
        self.assertEqual(_credentials(connection), (NOBODY, NOBODY, [NOBODY]))
        self.assertEqual(connection.recv(100), b"hello")

    def test_pathDescriptorIsOPath(self) -> None:
        path = os.path.join(_directory(self), "f")
        open(path, "w").close()
        descriptor = openPathDescriptor(path)
        self.addCleanup(os.close, descriptor)
        self.assertRaises(OSError, os.read, descriptor, 1)  # EBADF: O_PATH opens nothing to read
        self.assertFalse(os.get_inheritable(descriptor))
        self.assertEqual(os.path.realpath(f"/proc/self/fd/{descriptor}"), os.path.realpath(path))


def _accepted(listener: socket.socket) -> socket.socket | None:
    try:
        return listener.accept()[0]
    except BlockingIOError:
        return None
