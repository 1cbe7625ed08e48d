"""Real-socket helpers: a tsmux on a Unix socket, loopback targets, a blocking SOCKS5 client."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

from twisted.internet import defer, task
from twisted.internet import reactor as globalReactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests._fakes import makeContext
from tsmux._context import ConnectionContext
from tsmux._dialers import DirectDialer
from tsmux._listen import defaultBacklog, listenOnPath
from tsmux._localapi import LocalAPIAccess
from tsmux._mux import MuxFactory
from tsmux._relay import RelayEnd
from tsmux._socks5 import buildRequest, parseReply

reactor = globalReactor


def shortTempDir(testCase: TestCase) -> str:
    """A private directory with a short path (Unix socket paths are at most 107 bytes)."""
    path = tempfile.mkdtemp(prefix="tsmux-", dir="/tmp")
    testCase.addCleanup(shutil.rmtree, path, True)
    return path


def startMux(
    testCase: TestCase, dialer=None, localapi: str = "/nonexistent/tailscaled.sock", credentials=None, **settings
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


async def waitFor(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll C{condition} with the reactor running, until true or C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.02, lambda: None)


def waitUntilClosed(context: ConnectionContext, timeout: float = 10.0) -> defer.Deferred[None]:
    """Let the connections a test made finish closing, so the reactor is clean after it."""

    async def poll() -> None:
        deadline = time.monotonic() + timeout
        while context.openConnections or any(
            isinstance(getattr(s, "protocol", None), RelayEnd) for s in reactor.getReaders() + reactor.getWriters()
        ):
            if time.monotonic() > deadline:
                raise AssertionError(f"connections still open after {timeout} s")
            await task.deferLater(reactor, 0.01, lambda: None)

    return defer.ensureDeferred(poll())


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Echoes, and on EOF finishes writing and closes: half-close made visible."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Source(Protocol):
    """Sends C{size} bytes of a known pattern, then closes."""

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
    block = bytes(range(256)) * 4096
    return (block * (size // len(block) + 1))[:size]


def listenTCP(testCase: TestCase, protocol: type[Protocol], **attributes) -> int:
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


def recvAll(sock: socket.socket, bufsize: int = 1 << 20) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(bufsize)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def openFds() -> int:
    return len(os.listdir("/proc/self/fd"))


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


def httpGet(path: str, target: str) -> tuple[bytes, bytes]:
    """One GET over a Unix socket, the server closing after it: (head, body)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(path)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: local-tailscaled.sock\r\nConnection: close\r\n\r\n".encode())
    data = recvAll(sock)
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body
