"""
The ways out over sockets: L{LocalAPIDialer} (tailscaled's C{ts-dial}
upgrade, the default), L{DirectDialer} (TCP from this host) and
L{SOCKS5Dialer} (an upstream SOCKS5 server).  The C{tailscale nc} dialer is
in L{tsmux._nc}.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocol, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._ascaller import Identity, connectTCPAs
from ._client import SOCKS5ClientProtocol
from ._errors import (
    DialError,
    DialRefusedByPolicy,
    LocalAPIUnreachable,
    UpstreamUnreachable,
    dialErrorFromLocalAPI,
    failureReason,
)
from ._http import HTTPParseError, ResponseHead, parseResponseHead
from ._interfaces import IDialer, IUpstream
from ._localapi import LocalAPIAccess, LocalAPIHealth
from ._peercred import PeerCredentials
from ._upstream import HandshakeThenHold, HeldConnection, asDialError, boundedDial, dialHost, quietConnect

TCPConnector = Callable[[Any, str, int, "Identity | None", IProtocol, float], defer.Deferred[IProtocol]]

DialSelfPolicy = Literal["refuse", "direct"]
DEFAULT_DIAL_TIMEOUT = 10.0
_MAX_ERROR_BODY = 64 * 1024


@implementer(IDialer)
class DirectDialer:
    """
    TCP from this host, as this process.  Names are resolved here (with the
    host's resolver, not MagicDNS); used without tailscaled, for Dial-Self
    answers when so configured, and as a reference in tests and benchmarks.
    """

    description = "direct"

    def __init__(self, reactor: IReactorTime, timeout: float = DEFAULT_DIAL_TIMEOUT) -> None:
        self._reactor = reactor
        self._timeout = timeout

    def dial(self, host: str, port: int, caller: PeerCredentials | None = None) -> defer.Deferred[IUpstream]:
        def start() -> defer.Deferred[IUpstream]:
            endpoint = _tcpEndpoint(self._reactor, dialHost(host) or host, port, self._timeout)
            return quietConnect(endpoint, HeldConnection())  # type: ignore[return-value]

        return boundedDial(self._reactor, host, port, self._timeout, f"dial {host}:{port}", start)


def _tcpEndpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    An IP literal gets a plain TCP endpoint: L{HostnameEndpoint} would add
    its 0.3 s attempt delay to every refused connection.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 4:
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)


@dataclass(frozen=True)
class _DialSelf:
    """tailscaled's "dial it yourself" answer (≥ 1.98): the target is not on the tailnet."""

    address: str


def buildDialRequest(host: str, port: int) -> bytes:
    """The C{ts-dial} upgrade request, as C{tailscale nc} sends it."""
    return (
        "POST /localapi/v0/dial HTTP/1.1\r\n"
        "Host: local-tailscaled.sock\r\n"
        # lower case: tailscaled's check of this header is case-sensitive
        "Connection: upgrade\r\n"
        "Upgrade: ts-dial\r\n"
        f"Dial-Host: {host}\r\n"
        f"Dial-Port: {port}\r\n"
        "Dial-Network: tcp\r\n"
        "\r\n"
    ).encode("ascii")


class TsDialProtocol(HandshakeThenHold):
    """
    Speaks the C{ts-dial} upgrade on a LocalAPI connection.  On C{101} it
    becomes the upstream itself, with the bytes after the response head held
    for the relay.
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self._request = buildDialRequest(host, port)
        self._buffer = b""
        self._head: ResponseHead | None = None
        self._bodyLength: int | None = None

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def _handshakeData(self, data: bytes) -> None:
        self._buffer += data
        if self._head is None:
            try:
                parsed = parseResponseHead(self._buffer)
            except HTTPParseError as error:
                self._fail(DialError(f"tailscaled's LocalAPI answered the dial with garbage: {error}"))
                return
            if parsed is None:
                return
            self._head, used = parsed
            leftover = self._buffer[used:]
            if self._head.status == 101:
                # Held for the connection's life: keep nothing of the exchange.
                self._buffer = self._request = b""
                self._head = None
                self._opened(leftover)
                return
            self._buffer = leftover
            if 100 <= self._head.status < 200 or self._head.status in (204, 304):
                self._bodyLength = 0  # no body; never wait for one
                self._answerWithoutUpgrade()
                return
            try:
                self._bodyLength = self._head.contentLength()
            except HTTPParseError as error:
                self._fail(DialError(f"tailscaled's LocalAPI answered the dial with garbage: {error}"))
                return
        if self._bodyLength is not None and len(self._buffer) >= self._bodyLength:
            self._answerWithoutUpgrade()
        elif len(self._buffer) > _MAX_ERROR_BODY:
            self._answerWithoutUpgrade()

    def _answerWithoutUpgrade(self) -> None:
        head = self._head
        assert head is not None
        body = self._buffer[: self._bodyLength if self._bodyLength is not None else _MAX_ERROR_BODY]
        dialSelf = head.header("Dial-Self")
        if head.status == 200 and dialSelf is not None and dialSelf.lower() == "true":
            self.answered.callback(_DialSelf(head.header("Dial-Addr") or ""))
            self.transport.loseConnection()
            return
        self._fail(dialErrorFromLocalAPI(head.status, body.decode("utf-8", "replace")))

    def _handshakeEnded(self) -> None:
        if self.answered.called:
            return
        if self._head is not None:
            # A body framed by the connection's end.
            self._bodyLength = None
            self._answerWithoutUpgrade()
        else:
            self.answered.errback(DialError("tailscaled's LocalAPI closed the connection without answering the dial"))


@implementer(IDialer)
class LocalAPIDialer:
    """
    Dials through tailscaled with C{POST /localapi/v0/dial} and the
    C{ts-dial} upgrade, one LocalAPI connection per dial, exactly as
    C{tailscale nc} does.  Names go to tailscaled unresolved, so MagicDNS
    names work.  The LocalAPI connection is made as the caller (see
    L{LocalAPIAccess}), so tailscaled attributes each dial to the real user,
    and so is the TCP socket of a C{Dial-Self} answer dialed here.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        access: LocalAPIAccess | str,
        dialSelf: DialSelfPolicy = "refuse",
        timeout: float = DEFAULT_DIAL_TIMEOUT,
        health: LocalAPIHealth | None = None,
        connectTCP: TCPConnector = connectTCPAs,
    ) -> None:
        if dialSelf not in ("refuse", "direct"):
            raise ValueError(f"dialSelf must be 'refuse' or 'direct', not {dialSelf!r}")
        if isinstance(access, str):
            access = LocalAPIAccess(reactor, access, timeout)
        self._reactor = reactor
        self._access = access
        self.socketPath = access.path
        self.dialSelf = dialSelf
        self._timeout = timeout
        self._connectTCP = connectTCP
        self.health = health if health is not None else LocalAPIHealth(access.path)
        self.description = f"localapi:{access.path}"

    def dial(self, host: str, port: int, caller: PeerCredentials | None = None) -> defer.Deferred[IUpstream]:
        def start() -> defer.Deferred[IUpstream]:
            connecting: defer.Deferred[Any] = self._access.connect(caller, TsDialProtocol(host, port))
            connecting.addCallbacks(self._connected, self._unreachable)  # type: ignore[arg-type]
            return connecting.addCallback(self._answered, host, port, caller)  # type: ignore[call-overload]

        return boundedDial(self._reactor, host, port, self._timeout, f"dial {host}:{port} via tailscaled", start)

    def _connected(self, protocol: TsDialProtocol) -> defer.Deferred[object]:
        self.health.succeeded()
        return protocol.answered

    def _unreachable(self, failure: Failure) -> Failure:
        if failure.check(defer.CancelledError, error.ConnectingCancelledError):
            return failure
        reason = failureReason(failure)
        self.health.failed(reason)
        return Failure(LocalAPIUnreachable(f"tailscaled's LocalAPI at {self.socketPath} is unreachable: {reason}"))

    def _answered(self, result: object, host: str, port: int, caller: PeerCredentials | None) -> object:
        if not isinstance(result, _DialSelf):
            return result
        if self.dialSelf == "direct":
            # "Dial it yourself, as your own uid": the socket is created with the
            # caller's ids, so owner-match firewall rules see the caller.
            target = _splitAddress(result.address)
            if target is None:
                raise DialError(f"tailscaled answered Dial-Self with an unusable address {result.address!r}")
            selfHost, selfPort = target
            identity = self._access.identityFor(caller)
            connecting = self._connectTCP(
                self._reactor, selfHost, selfPort, identity, HeldConnection(), self._timeout
            ).addErrback(asDialError)
            return connecting
        raise DialRefusedByPolicy(
            f"tailscaled answered Dial-Self: {host}:{port} is not on the tailnet and --dial-self=refuse"
        )


def _splitAddress(address: str) -> tuple[str, int] | None:
    """C{"1.2.3.4:80"} or C{"[::1]:80"} → IP, port; C{None} if unusable."""
    host, colon, port = address.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 0xFFFF:
        return None
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, int(port)


@implementer(IDialer)
class SOCKS5Dialer:
    """
    Chains to an upstream SOCKS5 server (tailscaled's C{--socks5-server} on
    TCP, or another Unix socket), with the project's codec in the client
    role.  Names go upstream unresolved; the upstream's reply code is passed
    on to our client unchanged.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        description: str,
        credentials: tuple[bytes, bytes] | None = None,
        timeout: float = DEFAULT_DIAL_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._credentials = credentials
        self._timeout = timeout
        self.description = f"socks5:{description}"
        self._where = description

    def dial(self, host: str, port: int, caller: PeerCredentials | None = None) -> defer.Deferred[IUpstream]:
        def start() -> defer.Deferred[IUpstream]:
            connecting = quietConnect(self._endpoint, SOCKS5ClientProtocol(host, port, self._credentials))
            return connecting.addCallbacks(lambda connected: connected.answered, self._unreachable)

        return boundedDial(
            self._reactor, host, port, self._timeout, f"dial {host}:{port} via {self.description}", start
        )

    def _unreachable(self, failure: Failure) -> Failure:
        if failure.check(defer.CancelledError, error.ConnectingCancelledError):
            return failure
        return Failure(
            UpstreamUnreachable(f"upstream SOCKS5 server {self._where} is unreachable: {failureReason(failure)}")
        )
