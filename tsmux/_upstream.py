"""
The way out, up to the relay: a connected stream held until the relay takes
it (L{HeldConnection}), one that first negotiates (L{HandshakeThenHold}), and
the one frame every dialer's attempt goes through (L{boundedDial}: the
target checked, the attempt bounded, every failure a typed
L{tsmux._errors.DialError}).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IProtocol, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from ._errors import DialError, DialTimeout, HostUnreachable, dialErrorFromFailure
from ._interfaces import IStreamTransport, IUpstream
from ._relay import switchProtocol

_P = TypeVar("_P", bound=IProtocol)

# A host is an IP literal or a DNS name; anything else (spaces, CR/LF, other
# controls, non-ASCII letters Go would fold into ASCII ones) must never reach a
# header or a resolver.
_HOST_RE = re.compile(r"[A-Za-z0-9_.:%-]{1,255}")


def dialHost(host: str) -> str | None:
    """
    The host as every dialer passes it on, and as rules judge it: one pair of
    enclosing brackets taken off (C{[fd7a::1]}), nothing else changed; C{None}
    for anything that is not a plain host (stray brackets, spaces, controls,
    non-ASCII), which no dialer passes on.  One form for both, so that a rule
    never sees a different host from the one dialed (tailscaled would take
    the brackets off C{[web-1]} after the rules saw a name tied to no node).
    """
    if len(host) > 2 and host[0] == "[" and host[-1] == "]":
        host = host[1:-1]
    return host if _HOST_RE.fullmatch(host) else None


def checkTarget(host: str, port: int) -> None:
    """Raise L{HostUnreachable} for a host or port no dialer may pass on."""
    if dialHost(host) is None:
        raise HostUnreachable(f"not a valid host name: {host!r}")
    if not 0 < port <= 0xFFFF:
        raise HostUnreachable(f"not a valid port: {port}")


def asDialError(failure: Failure) -> Failure:
    return Failure(dialErrorFromFailure(failure))


def boundedDial(
    reactor: IReactorTime,
    host: str,
    port: int,
    timeout: float,
    what: str,
    start: Callable[[], Deferred[IUpstream]],
) -> Deferred[IUpstream]:
    """
    Every dialer's attempt, framed the same way: C{host} and C{port} checked
    first, C{start()} bounded by C{timeout} seconds (then cancelled, and a
    L{DialTimeout}), every failure mapped to a L{DialError}.
    """
    try:
        checkTarget(host, port)
    except DialError as error:
        return defer.fail(error)
    deferred = start()

    def timedOut(result: object, timeout: float) -> object:
        raise DialTimeout(f"{what}: no answer within {timeout:g} s")

    deferred.addTimeout(timeout, reactor, onTimeoutCancel=timedOut)
    return deferred.addErrback(asDialError)


class OneShotFactory(Factory):
    """Hands out one prepared protocol, without a log line per connection."""

    noisy = False

    def __init__(self, protocol: IProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Any:
        # Any: the IProtocol it was given, where Factory's annotation asks for a Protocol.
        return self._protocol


def quietConnect(endpoint: IStreamClientEndpoint, protocol: _P) -> Deferred[_P]:
    """L{twisted.internet.endpoints.connectProtocol} without its two log lines per connection."""
    return endpoint.connect(OneShotFactory(protocol))  # type: ignore[return-value]


@implementer(IUpstream, IHalfCloseableProtocol)
class HeldConnection(Protocol):
    """
    Owns a freshly connected transport until somebody L{attach}es, holding
    what arrives meanwhile (bytes, EOF, loss) so it can be replayed.
    """

    transport: IStreamTransport

    def __init__(self) -> None:
        self._held: list[bytes] = []
        self._heldEOF = False
        self._heldLoss: Failure | None = None
        self.attached = False

    def dataReceived(self, data: bytes) -> None:
        self._held.append(data)

    def readConnectionLost(self) -> None:
        self._heldEOF = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._heldLoss = reason

    def takeHeld(self) -> bytes:
        """Remove and return the bytes held so far."""
        data = b"".join(self._held)
        self._held = []
        return data

    def attach(self, protocol: IProtocol) -> None:
        if self.attached:
            raise RuntimeError("an upstream can be attached once")
        self.attached = True
        switchProtocol(self.transport, protocol, self.takeHeld())
        if self._heldEOF:
            halfCloseable = IHalfCloseableProtocol(protocol, None)
            if halfCloseable is not None:
                halfCloseable.readConnectionLost()
            else:
                self.transport.loseConnection()
        if self._heldLoss is not None:
            protocol.connectionLost(self._heldLoss)

    def abort(self) -> None:
        self.transport.abortConnection()


class HandshakeThenHold(HeldConnection):
    """
    A client protocol that first negotiates (a C{ts-dial} upgrade, a SOCKS5
    handshake) and then becomes the held upstream.  L{answered} fires once:
    with this protocol when the way is open, or with a L{DialError}; until
    then bytes, EOF and loss go to the subclass's C{_handshakeData},
    C{_handshakeEnded}.  Cancelling L{answered} aborts the connection.
    """

    def __init__(self) -> None:
        super().__init__()
        self.answered: Deferred[object] = Deferred(self._cancel)

    def _cancel(self, deferred: Deferred[object]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def _handshakeData(self, data: bytes) -> None:
        raise NotImplementedError

    def _handshakeEnded(self) -> None:
        """The connection ended (EOF or loss) before the answer: fail, or answer from what came."""
        raise NotImplementedError

    def _opened(self, leftover: bytes) -> None:
        """The way is open: hold C{leftover} (bytes after the handshake) for the relay."""
        self._held = [leftover] if leftover else []
        self.answered.callback(self)

    def _fail(self, error: Exception) -> None:
        if not self.answered.called:
            self.answered.errback(error)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.answered.called:
            super().dataReceived(data)
        else:
            self._handshakeData(data)

    def readConnectionLost(self) -> None:
        if self.answered.called:
            super().readConnectionLost()
            return
        self._handshakeEnded()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.answered.called:
            super().connectionLost(reason)
        else:
            self._handshakeEnded()
