"""
Contender (i): a bare Twisted SOCKS5 relay, the reference for what tsmux's own work costs over Twisted's.

    python -m tests.bench._barerelay --listen PATH [--mode 0600] --dialer localapi:SOCKET|direct
                                     [--connect adopt|twisted]

It does what every SOCKS5 relay must and nothing else: a Unix listening socket; the SOCKS5 handshake
(no-auth greeting, CONNECT to an IPv4 address or a domain name); one dial; then a relay both ways with
the transports registered as each other's producers (so a slow reader pauses the other side) and a
half-close passed on. No log, no credentials, no timers, no limits, no splice.

The dial (C{--dialer}):
    - C{localapi:SOCKET}: C{POST /localapi/v0/dial} with the C{ts-dial} upgrade on a new connection to
      tailscaled's LocalAPI socket (what tsmux's C{--dialer localapi} does); the C{101} head is read,
      and any bytes after it are kept and passed to the client;
    - C{direct}: a TCP connection to the target (what tsmux's C{--dialer direct} does).

How the upstream socket is connected (C{--connect}):
    - C{adopt} (the default, and the reference the benchmark's targets compare tsmux with): a
      non-blocking C{socket()}/C{connect()} made at once, and the connected socket handed to the reactor
      with C{reactor.adoptStreamConnection}. A Unix connect completes at once; a TCP one is waited for by
      the reactor (C{addWriter}) first. This is also how tsmux has to connect, since it connects as its
      caller (ids switched around a synchronous C{connect()}).
    - C{twisted}: C{reactor.connectUNIX} / C{reactor.connectTCP} with a C{ClientFactory} per dial, which
      connect on a later reactor turn (and, for TCP, arm Twisted's connect timeout).

Stops on SIGTERM or SIGINT (the reactor's handlers).
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import socket
import struct
import sys
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IReadDescriptor, IWriteDescriptor
from zope.interface import implementer

GREETING_OK = b"\x05\x00"
GREETING_REFUSED = b"\x05\xff"
REPLY_OK = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
REPLY_FAILURE = b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"
REPLY_COMMAND = b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"
REPLY_ADDRESS = b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00"
MAX_HEAD = 65536
_PORT = struct.Struct("!H")

_GREETING, _REQUEST, _DIALING, _RELAYING, _CLOSED = range(5)


def tsdialRequest(host: str, port: int) -> bytes:
    """The C{ts-dial} upgrade request, as C{tailscale nc} (and tsmux) send it."""
    return (
        "POST /localapi/v0/dial HTTP/1.1\r\n"
        "Host: local-tailscaled.sock\r\n"
        "Connection: upgrade\r\n"  # lower case: tailscaled's check is case-sensitive
        "Upgrade: ts-dial\r\n"
        f"Dial-Host: {host}\r\n"
        f"Dial-Port: {port}\r\n"
        "Dial-Network: tcp\r\n"
        "\r\n"
    ).encode("ascii")


def _halfDone(mine: protocol.Protocol, other: protocol.Protocol | None) -> None:
    """One direction ended (C{mine} read EOF): pass the EOF on; close both once both directions ended."""
    mine.readDone = True  # type: ignore[attr-defined]
    if other is None or other.transport is None:
        mine.transport.loseConnection()
        return
    other.transport.loseWriteConnection()
    if other.readDone:  # type: ignore[attr-defined]
        mine.transport.loseConnection()
        other.transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class Upstream(protocol.Protocol):
    """The dialed side: speaks C{ts-dial} first when there is a request to send, then relays."""

    def __init__(self, client: Client, request: bytes | None) -> None:
        self.client = client
        self.request = request
        self.head = b""
        self.relaying = False
        self.readDone = False

    def connectionMade(self) -> None:
        if self.client.state == _CLOSED:
            self.transport.loseConnection()
        elif self.request is not None:
            self.transport.write(self.request)
            self.request = None
        else:
            self.relaying = True
            self.client.upstreamReady(self, b"")

    def dataReceived(self, data: bytes) -> None:
        if self.relaying:
            self.client.transport.write(data)
            return
        head = self.head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEAD:
                self.client.dialFailed()
                self.transport.loseConnection()
            else:
                self.head = head
            return
        self.head = b""
        if not head.startswith((b"HTTP/1.1 101 ", b"HTTP/1.0 101 ")):
            self.client.dialFailed()
            self.transport.loseConnection()
            return
        self.relaying = True
        self.client.upstreamReady(self, head[end + 4 :])

    def readConnectionLost(self) -> None:
        if self.relaying:
            _halfDone(self, self.client)
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        client = self.client
        if not self.relaying:
            client.dialFailed()
        elif client.transport is not None:
            client.transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class Client(protocol.Protocol):
    """The SOCKS5 side: greeting, CONNECT request, dial, then relay."""

    def __init__(self, relay: RelayFactory) -> None:
        self.relay = relay
        self.state = _GREETING
        self.buffer = b""
        self.upstream: Upstream | None = None
        self.readDone = False

    def dataReceived(self, data: bytes) -> None:
        if self.state == _RELAYING:
            self.upstream.transport.write(data)  # type: ignore[union-attr]
            return
        buffer = self.buffer + data
        if self.state == _GREETING:
            if len(buffer) < 2 or len(buffer) < 2 + buffer[1]:
                self.buffer = buffer
                return
            count = buffer[1]
            if buffer[0] != 5 or 0 not in buffer[2 : 2 + count]:
                self.transport.write(GREETING_REFUSED)
                self.transport.loseConnection()
                self.state = _CLOSED
                return
            buffer = buffer[2 + count :]
            self.transport.write(GREETING_OK)
            self.state = _REQUEST
        if self.state == _REQUEST:
            if len(buffer) < 5:
                self.buffer = buffer
                return
            atyp = buffer[3]
            if atyp == 1:
                end = 10
            elif atyp == 3:
                end = 7 + buffer[4]
            elif atyp == 4:
                end = 22
            else:
                self.refuse(REPLY_ADDRESS)
                return
            if len(buffer) < end:
                self.buffer = buffer
                return
            if buffer[0] != 5 or buffer[1] != 1:
                self.refuse(REPLY_COMMAND)
                return
            if atyp == 1:
                host = socket.inet_ntop(socket.AF_INET, buffer[4:8])
            elif atyp == 3:
                host = buffer[5 : end - 2].decode("ascii", "replace")
            else:
                host = socket.inet_ntop(socket.AF_INET6, buffer[4:20])
            port = _PORT.unpack_from(buffer, end - 2)[0]
            self.buffer = buffer[end:]
            self.state = _DIALING
            self.relay.dial(self, host, port)
            return
        self.buffer = buffer  # _DIALING: bytes sent early, kept for the upstream

    def refuse(self, reply: bytes) -> None:
        self.transport.write(reply)
        self.transport.loseConnection()
        self.state = _CLOSED

    def dialFailed(self) -> None:
        if self.state == _DIALING:
            self.refuse(REPLY_FAILURE)

    def upstreamReady(self, upstream: Upstream, leftover: bytes) -> None:
        if self.state != _DIALING:
            upstream.transport.loseConnection()
            return
        self.state = _RELAYING
        self.upstream = upstream
        client = self.transport
        server = upstream.transport
        client.write(REPLY_OK)
        if leftover:
            client.write(leftover)
        if self.buffer:
            server.write(self.buffer)
            self.buffer = b""
        # Flow control both ways: a full write buffer on one side pauses reading on the other.
        client.registerProducer(server, True)
        server.registerProducer(client, True)
        if self.readDone:
            _halfDone(self, upstream)

    def readConnectionLost(self) -> None:
        if self.state == _RELAYING:
            _halfDone(self, self.upstream)
        elif self.state == _DIALING:
            self.readDone = True  # the EOF is passed on once the upstream is there
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        state, self.state = self.state, _CLOSED
        if state == _RELAYING and self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()


class _DialFactory(protocol.ClientFactory):
    """C{--connect twisted}: one per dial, as C{connectUNIX}/C{connectTCP} want."""

    noisy = False

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def buildProtocol(self, addr: Any) -> Upstream:
        return self.upstream

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.upstream.client.dialFailed()


class _Adopter(protocol.Factory):
    """C{--connect adopt}: C{adoptStreamConnection} calls C{buildProtocol} at once, so one factory serves all."""

    noisy = False
    next: Upstream | None = None

    def buildProtocol(self, addr: Any) -> Upstream | None:
        upstream, self.next = self.next, None
        return upstream


@implementer(IReadDescriptor, IWriteDescriptor)
class _PendingTCP:
    """A non-blocking TCP connect in progress: adopted once writable."""

    def __init__(self, relay: RelayFactory, sock: socket.socket, upstream: Upstream) -> None:
        self.relay = relay
        self.sock = sock
        self.upstream = upstream

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "bare-connect"

    def doWrite(self) -> None:
        reactor = self.relay.reactor
        reactor.removeWriter(self)
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.sock.close()
            self.upstream.client.dialFailed()
            return
        self.relay.adopt(self.sock, self.upstream)

    def doRead(self) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        self.sock.close()
        self.upstream.client.dialFailed()


class RelayFactory(protocol.Factory):
    noisy = False

    def __init__(self, reactor: Any, localapi: str | None, adopt: bool) -> None:
        self.reactor = reactor
        self.localapi = localapi
        self.useAdopt = adopt
        self.adopter = _Adopter()

    def buildProtocol(self, addr: Any) -> Client:
        return Client(self)

    def dial(self, client: Client, host: str, port: int) -> None:
        if self.localapi is not None:
            upstream = Upstream(client, tsdialRequest(host, port))
            if not self.useAdopt:
                self.reactor.connectUNIX(self.localapi, _DialFactory(upstream))
                return
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            code = sock.connect_ex(self.localapi)
            if code:
                sock.close()
                client.dialFailed()
                return
            self.adopt(sock, upstream)
            return
        upstream = Upstream(client, None)
        if not self.useAdopt:
            self.reactor.connectTCP(host, port, _DialFactory(upstream))
            return
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError:
            client.dialFailed()
            return
        code = sock.connect_ex((host, port))
        if code == 0:
            self.adopt(sock, upstream)
        elif code == errno.EINPROGRESS:
            self.reactor.addWriter(_PendingTCP(self, sock, upstream))
        else:
            sock.close()
            client.dialFailed()

    def adopt(self, sock: socket.socket, upstream: Upstream) -> None:
        self.adopter.next = upstream
        try:
            self.reactor.adoptStreamConnection(sock.fileno(), sock.family, self.adopter)
        except OSError:
            upstream.client.dialFailed()
        finally:
            sock.close()  # the reactor holds its own duplicate


def somaxconn() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 4096


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench._barerelay")
    parser.add_argument("--listen", required=True, help="Unix socket path")
    parser.add_argument("--mode", default="0600", help="octal permissions of the socket")
    parser.add_argument("--dialer", required=True, help="localapi:SOCKET or direct")
    parser.add_argument("--connect", choices=("adopt", "twisted"), default="adopt")
    options = parser.parse_args(argv)
    if options.dialer.startswith("localapi:"):
        localapi: str | None = options.dialer.partition(":")[2]
    elif options.dialer == "direct":
        localapi = None
    else:
        parser.error("--dialer must be localapi:SOCKET or direct")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from twisted.internet import reactor

    if os.path.exists(options.listen):
        os.unlink(options.listen)
    factory = RelayFactory(reactor, localapi, options.connect == "adopt")
    reactor.listenUNIX(options.listen, factory, backlog=somaxconn(), mode=int(options.mode, 8))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
