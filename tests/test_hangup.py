"""
A peer that hangs up while tsmux is not reading it (flow control paused it)
is noticed by the sweep; one that only half-closed is kept.  Real sockets:
fakes cannot model what the kernel reports.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor, threads
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from tsmux import _relay
from tsmux._hangup import sweepHungUp

from ._realsockets import listenTCP, socksConnect, startMux, waitFor
from .test_relay_sockets import Sink


def fillUntilPaused(path: str, port: int) -> socket.socket:
    """A SOCKS5 client that sends until nothing more fits: tsmux then stops reading it."""
    sock, reply = socksConnect(path, "127.0.0.1", port)
    assert reply == 0
    sock.settimeout(1)
    try:
        for _ in range(1024):
            sock.sendall(b"x" * 65536)
    except TimeoutError:
        pass
    return sock


class HeldSink(Sink):
    """
    A L{Sink} kept referenced: a paused transport is held by nothing in the
    reactor, and a collected one would close the target's side mid-test.
    """

    held: list[Sink] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self.held.append(self)

    @classmethod
    def dropAll(cls) -> None:
        for sink in cls.held:
            sink.transport.abortConnection()
        cls.held.clear()


class HangupSweepTests(TestCase):
    timeout = 30
    splice = False

    async def pausedRelay(self):
        self.patch(_relay, "LINGER", 0.5)
        path, factory = startMux(self, splice=self.splice)
        port = listenTCP(self, HeldSink)
        self.addCleanup(HeldSink.dropAll)
        sock = await threads.deferToThread(fillUntilPaused, path, port)
        self.addCleanup(sock.close)
        (relay,) = factory.relays
        await waitFor(lambda: relay.client.transport not in reactor.getReaders(), what="the client to be paused")
        return factory, relay, sock

    async def test_hungUpClientIsDropped(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        factory, relay, sock = await self.pausedRelay()
        self.assertEqual(sweepHungUp(reactor, factory.relays), 0)
        sock.close()
        await waitFor(lambda: sweepHungUp(reactor, factory.relays) == 1, what="the sweep to see the hang-up")
        await waitFor(lambda: relay.client.lost, what="the client end to be dropped")
        # the target never reads: it gets the linger to take what is queued, then is cut
        await waitFor(lambda: not factory.openConnections, timeout=5, what="the relay to end")
        (line,) = [e for e in events if e.get("log_namespace") == "tsmux.connection"]
        self.assertEqual(line["outcome"], "client-closed")
        self.assertIn("hung up while tsmux was not reading it", line["detail"])

    async def test_halfClosedClientIsKept(self) -> None:
        factory, relay, sock = await self.pausedRelay()
        sock.shutdown(socket.SHUT_WR)
        for _ in range(5):
            self.assertEqual(sweepHungUp(reactor, factory.relays), 0)
        self.assertFalse(relay.client.lost)
        sock.close()
        await waitFor(lambda: sweepHungUp(reactor, factory.relays) == 1, what="the sweep to see the hang-up")


class HangupSweepTestsSpliced(HangupSweepTests):
    splice = True
