"""
Handing transports between protocols, and the two-way relay.

There is no wrapper layer in the data path: after protocol detection the
chosen protocol becomes C{transport.protocol} (Twisted's TCP and Unix
transports look the protocol up on every event, as TLS start does), and a
relay end is just a protocol whose C{dataReceived} writes to the other
transport.  Flow control is Twisted's producer/consumer: each transport is
the other's streaming producer, so a slow reader pauses the fast writer and
tsmux holds about one read chunk per direction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocol,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from ._errors import WayOutFailed
from ._interfaces import IStreamTransport, IUpstream
from ._splice import SpliceRelay, canSplice
from ._twistedprivate import sendNow

_P = TypeVar("_P", bound=IProtocol)

LINGER = 10.0
"""Seconds a relay's surviving side gets to flush after the other side is gone."""


def switchProtocol(transport: ITransport, protocol: IProtocol, buffered: bytes = b"") -> None:
    """
    Make C{protocol} the owner of C{transport} and replay C{buffered}, the
    bytes the previous owner read but did not consume.
    """
    transport.protocol = protocol  # type: ignore[attr-defined]
    protocol.makeConnection(transport)
    if buffered:
        # Whoever owns the transport now: C{protocol} may already have handed it on
        # (a way out that connected at once, within connectionMade).
        transport.protocol.dataReceived(buffered)  # type: ignore[attr-defined]


def closeTransport(transport: IStreamTransport) -> None:
    """
    C{loseConnection}, after unregistering any producer: with a paused
    streaming producer still registered, Twisted resumes it when the buffer
    drains instead of closing, and the connection would never end.
    """
    if getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()
    transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class RelayEnd(Protocol):
    """One side of a L{Relay}: what it reads goes to the other side's transport."""

    peer: RelayEnd
    transport: IStreamTransport  # a connected stream, not Protocol's ITransport | None

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.bytesReceived = 0
        self.readDone = False
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.bytesReceived += len(data)
        self.forward(data)
        if self.bytesReceived > self.relay.spliceAfter:
            self.relay._startSplice()

    def forward(self, data: bytes) -> None:
        """Pass C{data} from this side on to the other (uncounted: L{dataReceived} counts)."""
        sendNow(self.peer.transport, data)

    def readConnectionLost(self) -> None:
        self.relay._readDone(self)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.relay._endLost(self, reason)


class Relay:
    """
    Joins a client transport and an upstream both ways, keeping half-close:
    EOF from one side becomes a write shutdown toward the other, and the
    relay ends when both directions are done or either side is lost.

    @ivar client: the client side's L{RelayEnd}; C{client.bytesReceived}
        counts bytes the relay read from the client (not those handed in at
        L{start}: whoever received those counted them).
    @ivar upstream: the upstream side's L{RelayEnd}.
    """

    clientEndClass: type[RelayEnd] = RelayEnd
    upstreamEndClass: type[RelayEnd] = RelayEnd
    spliceAfter: float = math.inf
    """
    Once either direction has carried this many bytes, move bytes with
    splice(2) (when both sides are plain sockets).  Short exchanges stay in
    Python: a pair of pipes per relay costs more than it saves for them.
    """

    def __init__(self, clock: IReactorTime, onFinished: Callable[[Relay, Failure], None] | None = None) -> None:
        self._clock = clock
        self.client = self.clientEndClass(self, "client")
        self.upstream = self.upstreamEndClass(self, "upstream")
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        self.onFinished = onFinished
        """Called once, with the relay and the reason, when both sides are gone."""
        self.finished = False
        self.failure: Failure | None = None
        self.closedIdle: str | None = None
        self.hungUp: RelayEnd | None = None
        self.lingerSince: float | None = None
        """When one side went and the other was left to flush (see L{LINGER})."""
        self.splice: SpliceRelay | None = None
        self._idleSeen = -1
        self._lastActive: float | None = None

    def start(
        self,
        clientTransport: IStreamTransport,
        upstream: IUpstream,
        clientBuffered: bytes = b"",
        clientEOF: bool = False,
        resumeClient: bool = False,
    ) -> None:
        """
        Take over C{clientTransport} and C{upstream}.

        @param clientBuffered: bytes the client sent before the relay
            started (SOCKS5 optimistic data, an HTTP request head); they go
            upstream first.
        @param clientEOF: the client already shut down its write side.
        @param resumeClient: the client transport was paused meanwhile; resume it.
        """
        switchProtocol(clientTransport, self.client)
        upstream.attach(self.upstream)
        if not (self.client.lost or self.upstream.lost):
            if not self.upstream.readDone:
                clientTransport.registerProducer(self.upstream.transport, True)
            self.upstream.transport.registerProducer(clientTransport, True)
        if clientBuffered and not self.upstream.lost:
            # Counted by the front end that received them; the relay counts what it reads.
            self.client.forward(clientBuffered)
        if clientEOF and not self.client.readDone:
            self._readDone(self.client)
        if resumeClient and not self.client.lost:
            clientTransport.resumeProducing()

    def abort(self) -> None:
        """Drop both sides now, whatever is unsent (shutdown cuts, a peer that never reads)."""
        for end in (self.client, self.upstream):
            if not end.lost and end.transport is not None:
                end.transport.abortConnection()

    def peerGone(self, end: RelayEnd, reason: Failure) -> None:
        """
        C{end}'s peer hung up while C{end} was not being read (see
        L{tsmux._hangup}): it can take nothing more, so drop it now; the
        other side gets the usual L{LINGER} to flush what it is owed.
        """
        if end.lost or self.finished:
            return
        self.hungUp = end
        if self.failure is None:
            self.failure = reason
        end.transport.abortConnection()

    def _startSplice(self) -> None:
        """Switch to the kernel path, once; stay in Python where it does not apply."""
        self.spliceAfter = math.inf
        if (
            self.splice is None
            and not (self.client.lost or self.upstream.lost or self.client.readDone or self.upstream.readDone)
            and canSplice(self.client.transport)
            and canSplice(self.upstream.transport)
        ):
            self.splice = SpliceRelay(self.client, self.upstream, self._readDone)
            self.splice.start()

    def idleCheck(self, now: float, idleTimeout: float | None, halfCloseTimeout: float | None) -> None:
        """
        Called periodically (cheaper than resetting a timer on every read):
        close the relay when no byte moved for C{idleTimeout} seconds, or for
        C{halfCloseTimeout} seconds once one direction has ended.  The
        latter bounds a relay whose client sent EOF and then left: tsmux no
        longer reads that socket, so only the target's silence shows it.
        A side left flushing after the other went gets L{LINGER} seconds.
        """
        if self.lingerSince is not None:
            if not self.finished and now - self.lingerSince >= LINGER:
                self.abort()
            return
        seen = self.client.bytesReceived + self.upstream.bytesReceived
        if seen != self._idleSeen or self._lastActive is None:
            self._idleSeen = seen
            self._lastActive = now
            return
        quiet = now - self._lastActive
        halfClosed = self.client.readDone or self.upstream.readDone
        if idleTimeout is not None and quiet >= idleTimeout:
            self.closedIdle = "idle"
        elif halfClosed and halfCloseTimeout is not None and quiet >= halfCloseTimeout:
            self.closedIdle = "half-closed"
        else:
            return
        if not self.finished:
            # Nothing moved for that long: a peer holding unread bytes will not read
            # them now, so abort rather than wait for a flush that never comes.
            for end in (self.client, self.upstream):
                if not end.lost:
                    end.transport.abortConnection()

    def _readDone(self, end: RelayEnd) -> None:
        if end.readDone:
            return
        end.readDone = True
        if not end.peer.lost:
            peerTransport = end.peer.transport
            # Unregister first: a paused streaming producer would otherwise be
            # resumed (re-reading a closed socket) instead of the shutdown.
            if getattr(peerTransport, "producer", None) is end.transport:
                peerTransport.unregisterProducer()
            peerTransport.loseWriteConnection()
        if self.client.readDone and self.upstream.readDone:
            for each in (self.client, self.upstream):
                if not each.lost:
                    closeTransport(each.transport)

    def _endLost(self, end: RelayEnd, reason: Failure) -> None:
        if end.lost:
            return
        end.lost = True
        bothDone = self.client.readDone and self.upstream.readDone
        # A hang-up is the normal end once everything owed to that end was sent and its
        # EOF forwarded (its peer's read side is done), both directions' ends included:
        # the client that closes once it has the whole response (curl does) shows as a
        # hang-up (epoll's HUP, not an EOF) about one time in ten. A way out that says it
        # failed is an error whenever it says so.
        if (
            self.failure is None
            and not reason.check(ConnectionDone)
            and (not (bothDone or end.peer.readDone) or reason.check(WayOutFailed))
        ):
            self.failure = reason
        if not end.peer.lost and end.peer.transport is not None:
            # Flush what the peer is owed, but not forever: a peer that stopped
            # reading would otherwise keep the relay (and its log line) open.
            closeTransport(end.peer.transport)
            if self.lingerSince is None:
                # Enforced by the periodic sweep (L{idleCheck}): no timer per connection.
                self.lingerSince = self._clock.seconds()
        if self.client.lost and self.upstream.lost and not self.finished:
            self.finished = True
            if self.splice is not None:
                self.splice.close()
            if self.onFinished is not None:
                self.onFinished(self, reason)
