"""Fakes shared by the unit tests."""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tsmux._interfaces import IDialer, IUpstream
from tsmux._mux import MuxFactory, MuxProtocol
from tsmux._socks5 import Reply, buildReply
from tsmux._upstream import HeldConnection

if TYPE_CHECKING:
    TestCaseMixinBase = SynchronousTestCase
else:
    TestCaseMixinBase = object
"""The base of a test case mixin: the test case class for mypy, nothing at run time."""


def capturedEvents(testCase: SynchronousTestCase) -> list[LogEvent]:
    """Every log event from now until C{testCase} ends (a global observer, removed at its cleanup)."""
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    testCase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


class HalfCloseStringTransport(StringTransport):
    """A L{StringTransport} that also records write shutdowns."""

    writeLost = False
    protocol: Any
    """Set by the test that connects it, as a real transport has it."""

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


def connectAs(factory: Any, uid: int, data: bytes = b"", groups: tuple[int, ...] = ()) -> CallerTransport:
    """A new connection to C{factory}'s protocol from C{uid} (with C{groups}), sending C{data}."""
    transport = CallerTransport(uid, groups=groups)
    protocol = factory.buildProtocol(None)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    if data:
        transport.protocol.dataReceived(data)
    return transport


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
        self.connects: list[tuple[Any, Any, defer.Deferred[Any]]] = []

    def refusal(self, peer: object) -> str | None:
        return self.refuse

    def identityFor(self, peer: object) -> object:
        return peer

    def connect(self, peer: object, protocol: Any) -> defer.Deferred[Any]:
        deferred: defer.Deferred[Any] = defer.Deferred()
        self.connects.append((peer, protocol, deferred))
        return deferred


class EndpointLocalAPIAccess(FakeLocalAPIAccess):
    """
    Connects through the reactor's C{connectUNIX} (a L{MemoryReactor} records
    it in C{unixClients}), so dialer tests can play tailscaled's side.
    """

    def __init__(self, reactor: Any, path: str = "/nonexistent/tailscaled.sock") -> None:
        super().__init__(path)
        self._reactor = reactor
        self.peers: list[object] = []

    def connect(self, peer: object, protocol: Any) -> defer.Deferred[Any]:
        from twisted.internet.endpoints import UNIXClientEndpoint

        from tsmux._upstream import quietConnect

        self.peers.append(peer)
        return quietConnect(UNIXClientEndpoint(self._reactor, self.path, timeout=10), protocol)


def makeContext(reactor: object, dialer: object, localapi: object, credentials: object = None, **settings: object):
    """A L{ConnectionContext} for tests: C{settings} are L{Config} fields."""
    from tsmux._config import Config
    from tsmux._context import ConnectionContext

    return ConnectionContext(reactor, Config(**settings), dialer, localapi, credentials=credentials)  # type: ignore[arg-type]


GREETING = b"\x05\x01\x00"
DONE = Failure(ConnectionDone())
# StringTransport's getHost(): the SOCKS5 success reply carries the upstream's local address.
SUCCESS = buildReply(Reply.SUCCEEDED, "10.0.0.1", 12345)


class MuxTestMixin(TestCaseMixinBase):
    """A mux on a fake transport, with its log lines captured."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.dialer = FakeDialer()
        self.localapi = FakeLocalAPIAccess()
        self.context = makeContext(self.reactor, self.dialer, self.localapi, detectTimeout=15)
        self.factory = MuxFactory(self.context)
        self.events = capturedEvents(self)

    def connect(self) -> tuple[MuxProtocol, HalfCloseStringTransport]:
        protocol = self.factory.buildProtocol(None)
        assert isinstance(protocol, MuxProtocol)
        transport = HalfCloseStringTransport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def connectionLines(self) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_namespace") == "tsmux.connection"]
