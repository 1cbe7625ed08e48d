"""
Doing the few things whose credentials matter as the caller, not as tsmux.

tailscaled decides every LocalAPI request from SO_PEERCRED (and
SO_PEERGROUPS) of the connection, which the kernel takes from the task's
I{effective} ids at C{connect()} time.  A root relay that connected as
itself would lend root's rights to every caller, so tsmux connects as the
caller: it switches the ids of the calling thread around a synchronous,
non-blocking C{connect()} and switches back at once, then hands the
connected socket to the reactor.  Twisted's own C{connectUNIX} connects on a
later reactor turn, so ids switched around it would do nothing.

The same trick makes a direct TCP socket belong to the caller (its owner uid
is what iptables' owner match and C{/proc/net/tcp} see) and starts
C{tailscale nc} as the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import platform
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProcessProtocol, IProcessTransport, IProtocol, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._upstream import OneShotFactory

__all__ = [
    "CannotActAs",
    "Identity",
    "actingAs",
    "canActAsOthers",
    "connectTCPAs",
    "connectUnixAs",
    "openPathDescriptor",
    "spawnProcessAs",
]

_log = Logger()

_MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "leave unchanged" to the set*id calls: never a caller
_CAP_SETGID = 6
_CAP_SETUID = 7
_EX_SOFTWARE = 70
_FIRST_RETRY = 0.005
_MAX_RETRY = 0.05


@dataclass(frozen=True)
class Identity:
    """Who to act as: the caller's uid, primary gid and exact supplementary groups."""

    uid: int
    gid: int
    groups: frozenset[int]

    def __post_init__(self) -> None:
        # Accept any iterable of groups (a set literal is the natural spelling) but keep the
        # value immutable and hashable; refuse ids the syscalls would read as "unchanged".
        groups = frozenset(self.groups)
        object.__setattr__(self, "groups", groups)
        for value in (self.uid, self.gid, *groups):
            if not isinstance(value, int) or not 0 <= value <= _MAX_ID:
                raise ValueError(f"not a usable uid/gid: {value!r}")


class CannotActAs(OSError):
    """Switching to a caller's ids failed (no privileges, unknown machine); nothing was left changed."""


# Why raw syscalls: glibc's seteuid/setegid/setgroups (and Python's os.set*id, which call
# them) change the ids of EVERY thread of the process: NPTL broadcasts each set*id call to
# all threads with a signal, because POSIX says credentials are per process.  The kernel
# keeps them per thread (task), and the raw syscalls change only the calling thread, so
# Twisted's resolver threads (and anything else running meanwhile) keep tsmux's own ids.
# The numbers are the 32-bit-id versions (x86_64: asm/unistd_64.h; aarch64:
# asm-generic/unistd.h); a machine not listed here gets no switching at all, because a
# wrong number would be a wrong syscall.
class _Numbers(NamedTuple):
    setgroups: int
    setresuid: int
    setresgid: int
    setfsuid: int
    setfsgid: int


_SYSCALLS: dict[str, _Numbers] = {
    "x86_64": _Numbers(setgroups=116, setresuid=117, setresgid=119, setfsuid=122, setfsgid=123),
    "aarch64": _Numbers(setgroups=159, setresuid=147, setresgid=149, setfsuid=151, setfsgid=152),
}


def _syscallNumbers() -> _Numbers | None:
    """The numbers for this machine, or C{None}; a 32-bit Python on a 64-bit kernel has other numbers."""
    if sys.platform != "linux" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    return _SYSCALLS.get(platform.machine())


_libcSyscall: Any = None


def _syscall(number: int, *args: int | ctypes.Array[ctypes.c_uint]) -> int:
    """One raw syscall; C{-1} from libc becomes an L{OSError} with the errno."""
    global _libcSyscall
    if _libcSyscall is None:
        function = ctypes.CDLL(None, use_errno=True).syscall
        function.restype = ctypes.c_long
        _libcSyscall = function
    # syscall() is variadic and reads longs: plain Python ints would be passed as C ints.
    long = ctypes.c_long
    result: int = _libcSyscall(long(number), *[long(arg) if type(arg) is int else arg for arg in args])
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _setgroups(numbers: _Numbers, groups: Sequence[int] | frozenset[int]) -> None:
    values = sorted(groups)
    _syscall(numbers.setgroups, len(values), (ctypes.c_uint * max(len(values), 1))(*values))


class _OwnIds(NamedTuple):
    uids: tuple[int, int, int]
    gids: tuple[int, int, int]
    groups: frozenset[int]


def _ownIds() -> _OwnIds:
    """This thread's ids, read now (getres*id and getgroups are per thread, like the ids)."""
    return _OwnIds(os.getresuid(), os.getresgid(), frozenset(os.getgroups()))


def _isOwn(identity: Identity, own: _OwnIds) -> bool:
    return identity.uid == own.uids[1] and identity.gid == own.gids[1] and identity.groups == own.groups


def _requireSwitching(own: _OwnIds) -> _Numbers:
    """The syscall numbers, if this thread may switch at all (see L{canActAsOthers} for why only as root)."""
    numbers = _syscallNumbers()
    if numbers is None:
        raise CannotActAs(errno.ENOSYS, f"acting as another user is unsupported on machine {platform.machine()!r}")
    if own.uids[1] != 0:
        raise CannotActAs(errno.EPERM, "acting as another user needs an effective uid of 0")
    return numbers


def _cannot(identity: Identity, failure: OSError) -> CannotActAs:
    return CannotActAs(failure.errno, f"cannot act as uid {identity.uid} gid {identity.gid}: {failure.strerror}")


def _idsNow(numbers: _Numbers) -> tuple[object, ...]:
    """This thread's ids, filesystem ones included, in the shape L{_expected} gives."""
    return (
        os.getresuid(),
        os.getresgid(),
        frozenset(os.getgroups()),
        _syscall(numbers.setfsuid, -1),
        _syscall(numbers.setfsgid, -1),
    )


def _expected(own: _OwnIds) -> tuple[object, ...]:
    # Setting the effective ids resets the filesystem ids to them, so that is where they end.
    return (own.uids, own.gids, own.groups, own.uids[1], own.gids[1])


def _restore(numbers: _Numbers, own: _OwnIds, *, switched: bool, realIds: bool) -> None:
    """
    Come back to C{own}, or end the process: running on with a caller's ids
    would let later work of this thread (other callers' connections) act
    with the wrong rights, and there is no safe way to continue.

    C{switched}: the switch completed (else look first whether anything
    changed at all).  C{realIds}: the real (and saved) ids were changed too.
    """
    try:
        if not switched and _idsNow(numbers) == _expected(own):
            return  # the first step failed, nothing changed (and we may lack the rights to "restore")
        # The effective uid first: back to ours (allowed: our saved uid is still ours),
        # which also brings back the effective capabilities the other calls need.
        _syscall(numbers.setresuid, -1, own.uids[1], -1)
        if realIds or not switched:
            _syscall(numbers.setresuid, *own.uids)
        _syscall(numbers.setresgid, *own.gids)
        _setgroups(numbers, own.groups)
        now = _idsNow(numbers)
        if now != _expected(own):
            raise OSError(errno.EPERM, f"ids are {now} after restoring, not {_expected(own)}")
    except BaseException as failure:
        _abort(f"tsmux could not restore its own ids after acting as a caller ({failure!r}); aborting")


def _abort(message: str) -> None:
    """
    End the process at once (EX_SOFTWARE): the thread may still hold a
    caller's ids, and an exception would let the reactor carry on with them.
    """
    with contextlib.suppress(BaseException):
        _log.critical("{message}", message=message)
        os.write(2, message.encode() + b"\n")
    os._exit(_EX_SOFTWARE)


@contextlib.contextmanager
def actingAs(identity: Identity | None, *, ownFilesystemIds: bool = True) -> Iterator[None]:
    """
    Make the calling thread's effective uid, gid and groups C{identity}'s
    for the body, and come back to its own after (aborting the process if
    that fails).  C{None}, or an identity equal to ours, switches nothing.

    With C{ownFilesystemIds} (the default) the filesystem uid and gid stay
    ours, so path lookup keeps our rights: tailscaled's socket may sit in a
    directory only root may enter, and setting the filesystem uid back to 0
    brings CAP_DAC_OVERRIDE and friends back into the effective set
    (capabilities(7)), while SO_PEERCRED still reports the caller's
    effective ids.  Without it the filesystem ids are the caller's too,
    which is what a newly created socket records as its owner.

    Not reentrant: the body must not use L{actingAs} again.  Keep the body
    to the syscalls that need the caller's ids: Python signal handlers and
    finalizers that happen to run meanwhile in this thread run as the caller.

    The kernel marks the process non-dumpable at the first switch, as for
    any change of effective uid (no core dumps while fs.suid_dumpable is 0,
    /proc/PID owned by root); for a root daemon that changes nothing else.
    """
    if identity is None:
        yield
        return
    own = _ownIds()
    if _isOwn(identity, own):
        yield
        return
    numbers = _requireSwitching(own)
    switched = False
    try:
        try:
            # Groups first and the uid last: setgroups and setresgid need CAP_SETGID, which the
            # effective set loses once the effective uid is not 0.  Real and saved ids stay ours,
            # which is what allows the way back.
            _setgroups(numbers, identity.groups)
            _syscall(numbers.setresgid, -1, identity.gid, -1)
            _syscall(numbers.setresuid, -1, identity.uid, -1)
            if ownFilesystemIds:
                # setfsuid cannot report failure (it returns the old value either way); no
                # check is needed: should it fail, lookup runs with the caller's rights, and
                # the connect fails with EACCES rather than gaining anything.
                _syscall(numbers.setfsuid, own.uids[1])
                _syscall(numbers.setfsgid, own.gids[1])
        except OSError as failure:
            raise _cannot(identity, failure) from failure
        switched = True
        yield
    finally:
        _restore(numbers, own, switched=switched, realIds=False)


@contextlib.contextmanager
def _becomingForExec(identity: Identity) -> Iterator[None]:
    """
    Give the calling thread the caller's real and effective ids (for a
    child to inherit through fork or posix_spawn), keeping only our saved
    ids as the way back.  execve copies the effective ids into the saved
    ones, so the child ends with nothing of ours.
    """
    own = _ownIds()
    numbers = _requireSwitching(own)
    switched = False
    try:
        try:
            _setgroups(numbers, identity.groups)
            _syscall(numbers.setresgid, identity.gid, identity.gid, own.gids[1])
            _syscall(numbers.setresuid, identity.uid, identity.uid, own.uids[1])
        except OSError as failure:
            raise _cannot(identity, failure) from failure
        switched = True
        yield
    finally:
        _restore(numbers, own, switched=switched, realIds=True)


def _capabilitySets() -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of the calling thread (capabilities are per thread too)."""
    try:
        with open("/proc/thread-self/status") as status:
            text = status.read()
    except FileNotFoundError:  # kernels before 3.17
        with open("/proc/self/status") as status:
            text = status.read()
    sets = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.startswith("Cap"):
            sets[name] = int(value.strip(), 16)
    return sets


def canActAsOthers() -> str | None:
    """
    C{None} when this process can act as its callers, else why not, in a
    line.  Asked when called: twistd may drop root after tsmux is imported.
    """
    if _syscallNumbers() is None:
        return f"unsupported machine {platform.machine()!r}: no known syscall numbers for per-thread id switching"
    try:
        effective = _capabilitySets().get("CapEff", 0)
    except OSError as failure:
        return f"cannot read this process's capabilities from /proc: {failure.strerror}"
    if os.geteuid() != 0:
        # With CAP_SETUID/CAP_SETGID alone the way back would cost them: acting as a root
        # caller and returning to a non-zero euid clears the capabilities (capabilities(7)),
        # and a child could keep ambient ones.  So tsmux acts as its callers only as root.
        return "not root"
    missing = [
        name for bit, name in ((_CAP_SETUID, "CAP_SETUID"), (_CAP_SETGID, "CAP_SETGID")) if not effective >> bit & 1
    ]
    if not missing:
        return None
    return f"root, but without {'/'.join(missing)} in the effective capability set"


def _connectError(code: int | None, text: str | None = None) -> error.ConnectError:
    """Twisted's error for errno C{code} (ECONNREFUSED: ConnectionRefusedError), with the OS's words."""
    if code is None:
        return error.ConnectError(string=text or "connect failed")
    return error.getConnectError((code, os.strerror(code)))


def _failedConnect(failure: OSError) -> error.ConnectError:
    """A connect's OSError as Twisted's error; a failed switch keeps its own words (it is not the OS's answer)."""
    if isinstance(failure, CannotActAs):
        return error.ConnectError(string=failure.strerror or str(failure))
    return _connectError(failure.errno, str(failure))


def _adopt(reactor: Any, sock: socket.socket, protocol: IProtocol, deferred: Deferred[IProtocol]) -> None:
    """Hand a connected socket to the reactor (which dups it), close ours, fire C{deferred}."""
    try:
        reactor.adoptStreamConnection(sock.fileno(), sock.family, OneShotFactory(protocol))
    except Exception:
        failure = Failure()
        sock.close()
        deferred.errback(failure)
        return
    sock.close()
    deferred.callback(protocol)


class _UnixAttempt:
    """
    One C{connectUnixAs}: a non-blocking AF_UNIX connect either succeeds at
    once or fails; EAGAIN (tailscaled's accept queue is full) is retried on
    a short timer until the deadline, acting as the caller on every try.
    """

    def __init__(self, reactor: Any, path: str, identity: Identity | None, protocol: IProtocol, timeout: float) -> None:
        self._reactor = reactor
        self._path = path
        self._identity = identity
        self._protocol = protocol
        self._timeout = timeout
        self._deadline = reactor.seconds() + timeout
        self._delay = _FIRST_RETRY
        self._retry: IDelayedCall | None = None
        self.deferred: Deferred[IProtocol] = Deferred(self._cancel)

    def attempt(self) -> None:
        self._retry = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as failure:  # EMFILE and the like
            self.deferred.errback(_connectError(failure.errno, str(failure)))
            return
        try:
            with actingAs(self._identity):
                sock.connect(self._path)
        except BlockingIOError:
            sock.close()
            self._later()
            return
        except OSError as failure:
            # errno None: Python's own complaints, e.g. "AF_UNIX path too long".
            sock.close()
            self.deferred.errback(_failedConnect(failure))
            return
        except Exception:  # e.g. ValueError for a NUL in the path: fail, never leave the Deferred hanging
            sock.close()
            self.deferred.errback(Failure())
            return
        except BaseException:
            sock.close()
            raise
        _adopt(self._reactor, sock, self._protocol, self.deferred)

    def _later(self) -> None:
        remaining = self._deadline - self._reactor.seconds()
        if remaining <= 0:
            self.deferred.errback(
                error.TimeoutError(string=f"{self._path}: accept queue still full after {self._timeout:g} s")
            )
            return
        self._retry = self._reactor.callLater(min(self._delay, remaining), self.attempt)
        self._delay = min(self._delay * 2, _MAX_RETRY)

    def _cancel(self, deferred: Deferred[IProtocol]) -> None:
        # Between tries no socket is open: stopping the timer is all there is to do.
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None


def connectUnixAs(
    reactor: Any, path: str, identity: Identity | None, protocol: IProtocol, timeout: float
) -> Deferred[IProtocol]:
    """
    Connect C{protocol} to the Unix socket at C{path} as C{identity}
    (C{None}: as this process), so the server's SO_PEERCRED shows the
    caller.  Path lookup uses our own rights.

    C{reactor} provides IReactorTime and IReactorSocket.  Fires with
    C{protocol}, connected; fails with a L{error.ConnectError} carrying the
    errno, L{error.TimeoutError} when the server's accept queue stays full
    for C{timeout} seconds, or C{CancelledError}.
    """
    attempt = _UnixAttempt(reactor, path, identity, protocol, timeout)
    attempt.attempt()
    return attempt.deferred


@implementer(IWriteDescriptor)
class _TCPAttempt:
    """One C{connectTCPAs}: waits through the reactor for a non-blocking connect to finish."""

    def __init__(
        self,
        reactor: Any,
        family: socket.AddressFamily,
        address: tuple[str, int],
        identity: Identity | None,
        protocol: IProtocol,
        timeout: float,
    ) -> None:
        self._reactor = reactor
        self._family = family
        self._address = address
        self._identity = identity
        self._protocol = protocol
        self._timeout = timeout
        self._socket: socket.socket | None = None
        self._timer: IDelayedCall | None = None
        self.deferred: Deferred[IProtocol] = Deferred(self._cancel)

    def start(self) -> None:
        try:
            # The socket records its owner (sk_uid, and the file's credentials that iptables'
            # owner match reads) from the creating task's *filesystem* ids, so those must be the
            # caller's here; the caller's groups too, for --suppl-groups.  No path is looked up.
            with actingAs(self._identity, ownFilesystemIds=False):
                sock = socket.socket(self._family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                try:
                    code = sock.connect_ex(self._address)
                except BaseException:
                    sock.close()
                    raise
        except OSError as failure:
            self.deferred.errback(_failedConnect(failure))
            return
        except Exception:
            self.deferred.errback(Failure())
            return
        if code == 0:
            _adopt(self._reactor, sock, self._protocol, self.deferred)
        elif code == errno.EINPROGRESS:
            self._socket = sock
            self._reactor.addWriter(self)
            self._timer = self._reactor.callLater(self._timeout, self._timedOut)
        else:
            sock.close()
            self.deferred.errback(_connectError(code))

    def _stop(self) -> socket.socket | None:
        """Stop watching and timing; return the socket, now ours alone, if still open."""
        sock = self._socket
        if sock is not None:
            self._reactor.removeWriter(self)  # while fileno() still answers
            self._socket = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return sock

    def _finish(self, lost: Failure | None) -> None:
        sock = self._stop()
        if sock is None:
            return
        try:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as failure:
            code = failure.errno or errno.EBADF
        if code:
            sock.close()
            self.deferred.errback(_connectError(code))
        elif lost is not None:
            sock.close()
            self.deferred.errback(_connectError(None, lost.getErrorMessage()))
        else:
            _adopt(self._reactor, sock, self._protocol, self.deferred)

    def _timedOut(self) -> None:
        self._timer = None
        sock = self._stop()
        if sock is not None:
            sock.close()
            host, port = self._address[:2]
            self.deferred.errback(error.TimeoutError(string=f"connect to {host} port {port}: {self._timeout:g} s"))

    def _cancel(self, deferred: Deferred[IProtocol]) -> None:
        sock = self._stop()
        if sock is not None:
            sock.close()

    # IWriteDescriptor
    def fileno(self) -> int:
        return self._socket.fileno() if self._socket is not None else -1

    def doWrite(self) -> None:
        self._finish(None)

    def connectionLost(self, reason: Failure) -> None:
        # epoll reports a failed connect as EPOLLERR|EPOLLHUP, which the reactor turns into this.
        self._finish(reason)

    def logPrefix(self) -> str:
        return "connectTCPAs"


def connectTCPAs(
    reactor: Any, host: str, port: int, identity: Identity | None, protocol: IProtocol, timeout: float
) -> Deferred[IProtocol]:
    """
    Connect C{protocol} to C{host} (an IPv4 or IPv6 literal, else
    L{ValueError}) port C{port} over a TCP socket owned by C{identity}
    (C{None}: by this process).

    C{reactor} provides IReactorTime, IReactorFDSet and IReactorSocket.
    Fires with C{protocol}, connected; fails like L{connectUnixAs}
    (ECONNREFUSED: L{error.ConnectionRefusedError}; no answer within
    C{timeout}: L{error.TimeoutError}).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r}") from None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    attempt = _TCPAttempt(reactor, family, (host, port), identity, protocol, timeout)
    attempt.start()
    return attempt.deferred


def spawnProcessAs(
    reactor: Any,
    identity: Identity | None,
    processProtocol: IProcessProtocol,
    executable: str,
    args: Sequence[str],
    env: Mapping[str, str] | None,
    childFDs: Mapping[int, int | str] | None = None,
) -> IProcessTransport:
    """
    C{reactor.spawnProcess}, with the child running as C{identity}: real,
    effective, saved and filesystem uid and gid the caller's, exactly the
    caller's groups, no capabilities (C{None}: as this process).

    Twisted's own C{uid=}/C{gid=} cannot do this: they call initgroups and
    C{pwd.getpwuid}, and a caller may have no passwd entry.  Instead this
    thread takes the caller's real and effective ids (keeping ours only as
    the saved ones, the way back), and the child, forked or posix_spawned
    from this thread, inherits them; execve then overwrites the saved ids.
    The executable is looked up with the caller's rights.

    While that lasts (one C{spawnProcess} call, well under a millisecond),
    the caller's processes may signal tsmux: kill(2) lets a sender whose uid
    matches the target's real uid.  ptrace stays out of their reach (it also
    wants the saved uid, still ours).
    """
    if identity is None or _isOwn(identity, _ownIds()):
        return reactor.spawnProcess(processProtocol, executable, args, env, childFDs=childFDs)
    # The child keeps this thread's inheritable (and so any ambient) capabilities across the
    # change of uid, and ambient ones become its permitted and effective set after execve.
    # A root daemon has none; rather than hand any to a caller, refuse.
    try:
        inheritable = _capabilitySets().get("CapInh", 0)
    except OSError as failure:
        raise OSError(failure.errno, f"cannot read capabilities: {failure.strerror}") from None
    if inheritable:
        raise OSError(errno.EPERM, f"this process has inheritable capabilities ({inheritable:#x}) a child could keep")
    with _becomingForExec(identity):
        return reactor.spawnProcess(processProtocol, executable, args, env, childFDs=childFDs)


def openPathDescriptor(path: str) -> int:
    """
    An C{O_PATH} descriptor of C{path}, opened as this process, for a child
    as the caller to reach it through C{/proc/self/fd/N} even when a
    directory on the way is closed to the caller.  The caller closes it.
    """
    return os.open(path, os.O_PATH | os.O_CLOEXEC)
