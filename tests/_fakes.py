"""Fakes shared by the unit tests."""

from __future__ import annotations

import socket
import struct

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from tsmux._interfaces import IDialer, IUpstream
from tsmux._relay import HeldConnection


class HalfCloseStringTransport(StringTransport):
    """A L{StringTransport} that also records write shutdowns."""

    writeLost = False

    def loseWriteConnection(self) -> None:
        self.writeLost = True


class _FakeUnixHandle:
    """Answers SO_PEERCRED and SO_PEERGROUPS like an accepted Unix socket."""

    family = socket.AF_UNIX

    def __init__(self, pid: int, uid: int, gid: int, groups: tuple[int, ...]) -> None:
        self._credentials = struct.pack("3i", pid, uid, gid)
        self._groups = struct.pack(f"{len(groups)}I", *groups)

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        if option == socket.SO_PEERCRED:
            return self._credentials
        return self._groups


class CallerTransport(HalfCloseStringTransport):
    """A fake accepted Unix connection from a given uid, gid and groups."""

    def __init__(self, uid: int, gid: int | None = None, groups: tuple[int, ...] = (), pid: int = 4242) -> None:
        super().__init__()
        self._handle = _FakeUnixHandle(pid, uid, uid if gid is None else gid, groups)

    def getHandle(self) -> _FakeUnixHandle:
        return self._handle


def connectedUpstream() -> tuple[HeldConnection, HalfCloseStringTransport]:
    """A fresh upstream as a dialer would hand it over."""
    upstream = HeldConnection()
    transport = HalfCloseStringTransport()
    transport.protocol = upstream
    upstream.makeConnection(transport)
    return upstream, transport


@implementer(IDialer)
class FakeDialer:
    """Records dials; each returns a Deferred the test fires."""

    description = "fake"

    def __init__(self) -> None:
        self.dials: list[tuple[str, int, defer.Deferred[IUpstream]]] = []
        self.cancelled: list[tuple[str, int]] = []
        self.callers: list[object] = []

    def dial(self, host: str, port: int, caller: object = None) -> defer.Deferred[IUpstream]:
        self.callers.append(caller)

        def cancel(d: defer.Deferred[IUpstream]) -> None:
            self.cancelled.append((host, port))

        deferred: defer.Deferred[IUpstream] = defer.Deferred(cancel)
        self.dials.append((host, port, deferred))
        return deferred


class FakeLocalAPIAccess:
    """
    Stands for L{tsmux._localapi.LocalAPIAccess}: records who each LocalAPI
    connection was made for; each returns a Deferred the test fires.
    """

    def __init__(self, path: str = "/nonexistent/tailscaled.sock", refuse: str | None = None) -> None:
        self.path = path
        self.actAsCallers = True
        self.refuse = refuse
        self.connects: list[tuple[object, object, defer.Deferred[object]]] = []

    def refusal(self, peer: object) -> str | None:
        return self.refuse

    def identityFor(self, peer: object) -> object:
        return peer

    def connect(self, peer: object, protocol: object) -> defer.Deferred[object]:
        deferred: defer.Deferred[object] = defer.Deferred()
        self.connects.append((peer, protocol, deferred))
        return deferred


class EndpointLocalAPIAccess(FakeLocalAPIAccess):
    """
    Connects through the reactor's C{connectUNIX} (a L{MemoryReactor} records
    it in C{unixClients}), so dialer tests can play tailscaled's side.
    """

    def __init__(self, reactor: object, path: str = "/nonexistent/tailscaled.sock") -> None:
        super().__init__(path)
        self._reactor = reactor
        self.peers: list[object] = []

    def connect(self, peer: object, protocol: object) -> defer.Deferred[object]:
        from twisted.internet.endpoints import UNIXClientEndpoint

        from tsmux._relay import quietConnect

        self.peers.append(peer)
        return quietConnect(UNIXClientEndpoint(self._reactor, self.path, timeout=10), protocol)
