"""Fakes shared by the unit tests."""

from __future__ import annotations

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

    def dial(self, host: str, port: int) -> defer.Deferred[IUpstream]:
        def cancel(d: defer.Deferred[IUpstream]) -> None:
            self.cancelled.append((host, port))

        deferred: defer.Deferred[IUpstream] = defer.Deferred(cancel)
        self.dials.append((host, port, deferred))
        return deferred
