"""Real-socket helpers: a tsmux on a Unix socket, loopback targets, a blocking SOCKS5 client."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as globalReactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests._fakes import makeContext
from tests._httpclient import recvAll as recvAll  # re-exported: a socket helper too
from tests._tailnet_shared import patternBytes
from tests._waiting import waitUntilAsync
from tsmux._context import ConnectionContext
from tsmux._dialers import DirectDialer
from tsmux._listen import defaultBacklog, listenOnPath
from tsmux._localapi import LocalAPIAccess
from tsmux._mux import MuxFactory
from tsmux._relay import RelayEnd
from tsmux._socks5 import buildRequest, parseReply

# Typed loosely: the tests use what the global reactor has beyond any one interface.
reactor: Any = globalReactor


def shortTempDir(testCase: SynchronousTestCase) -> str:
    """A private directory with a short path (Unix socket paths are at most 107 bytes)."""
    path = tempfile.mkdtemp(prefix="tsmux-", dir="/tmp")
    testCase.addCleanup(shutil.rmtree, path, True)
    return path


def startMux(
    testCase: SynchronousTestCase,
    dialer=None,
    localapi: str = "/nonexistent/tailscaled.sock",
    credentials=None,
    **settings,
) -> tuple[str, ConnectionContext]:
    """A mux with the direct dialer (by default) listening on a fresh Unix socket; C{settings} are Config fields."""
    path = os.path.join(shortTempDir(testCase), "tsmux.sock")
    access = LocalAPIAccess(reactor, localapi, timeout=5)
    context = makeContext(reactor, dialer or DirectDialer(reactor, timeout=5), access, credentials, **settings)
    port = listenOnPath(reactor, path, MuxFactory(context), 0o600, defaultBacklog())
    testCase.addCleanup(port.stopListening)
    sweeping = context.startSweeping()
    testCase.addCleanup(sweeping.stop)
    testCase.addCleanup(waitUntilClosed, context)
    return path, context


def waitUntilClosed(context: ConnectionContext, timeout: float = 10.0) -> defer.Deferred[bool]:
    """Let the connections a test made finish closing, so the reactor is clean after it."""

    def closed() -> bool:
        selectables = reactor.getReaders() + reactor.getWriters()
        return not context.openConnections and not any(
            isinstance(getattr(s, "protocol", None), RelayEnd) for s in selectables
        )

    return waitUntilAsync(closed, timeout, "the connections to close")


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Echoes, and on EOF finishes writing and closes: half-close made visible."""

    transport: Any

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Source(Protocol):
    """Sends C{size} bytes of a known pattern, then closes."""

    transport: Any

    size = 0

    def connectionMade(self) -> None:
        self.transport.write(pattern(self.size))
        self.transport.loseConnection()


class Sink(Protocol):
    """
    A target that never reads: its kernel buffers fill, then tsmux cannot
    flush to it.  Kept referenced (L{dropAll} in a cleanup): a paused
    transport is held by nothing in the reactor, and a collected one would
    close the target's side mid-test.
    """

    transport: Any

    held: list[Sink] = []

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.pauseProducing()
        self.held.append(self)

    @classmethod
    def dropAll(cls) -> None:
        for sink in cls.held:
            sink.transport.abortConnection()
        cls.held.clear()


def pattern(size: int) -> bytes:
    """The first C{size} bytes of the pattern the tailnet's C{/big} serves, too."""
    return patternBytes(0, size)


def listenTCP(testCase: SynchronousTestCase, protocol: type[Protocol], **attributes) -> int:
    factory = Factory.forProtocol(protocol)
    factory.noisy = False
    for name, value in attributes.items():
        setattr(protocol, name, value)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testCase.addCleanup(port.stopListening)
    return port.getHost().port


def socksConnect(path: str, host: str, port: int, extra: bytes = b"", timeout: float = 10) -> tuple[socket.socket, int]:
    """
    Blocking SOCKS5 CONNECT over a Unix socket (run it in a thread).  Sends
    greeting, request and C{extra} in one write, as optimistic clients do.
    @return: the socket (positioned after the reply) and the reply code.
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout)
    client.connect(path)
    client.sendall(b"\x05\x01\x00" + buildRequest(host, port) + extra)
    received = recvExactly(client, 2)
    assert received == b"\x05\x00", received
    buffer = b""
    while True:
        chunk = client.recv(1)
        if not chunk:
            raise ConnectionError(f"closed during the reply: {buffer!r}")
        buffer += chunk
        parsed = parseReply(buffer)
        if isinstance(parsed, tuple):
            return client, parsed[0].reply


def recvExactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def openFds() -> int:
    return len(os.listdir("/proc/self/fd"))


def waitUntilReactorRuns() -> defer.Deferred[bool]:
    """
    An async test's body starts before trial (or pytest-twisted) runs the reactor, which then
    makes its waker's pipe: count descriptors (L{openFds}) only after this.
    """
    return waitUntilAsync(lambda: reactor.running, what="the reactor to run")


def relayBufferedBytes(context: ConnectionContext | None = None) -> int:
    """
    Bytes tsmux holds for relays in this process: Twisted's write buffers and,
    for spliced relays, what sits in their pipes.
    """
    total = 0
    for relay in context.relays if context is not None else ():
        if relay.splice is not None:
            for direction in (relay.splice._toUpstream, relay.splice._toClient):
                total += direction.inPipe + len(direction.prefix)
    for selectable in set(reactor.getReaders()) | set(reactor.getWriters()):
        if isinstance(getattr(selectable, "protocol", None), RelayEnd):
            total += len(selectable.dataBuffer) - selectable.offset + selectable._tempDataLen
    return total


class Collector(Protocol):
    """Sends C{toSend}, half-closes if asked, and collects everything until the connection ends."""

    transport: Any

    def __init__(self, toSend: bytes = b"", halfClose: bool = True) -> None:
        self.toSend = toSend
        self.halfClose = halfClose
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.toSend:
            self.transport.write(self.toSend)
        if self.halfClose:
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.received)
