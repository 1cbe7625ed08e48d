"""
A peer that hangs up while tsmux is not reading it (flow control paused it)
is noticed by the sweep; one that only half-closed is kept.  Real sockets:
fakes cannot model what the kernel reports.
"""

from __future__ import annotations

import socket

from twisted.internet import threads
from twisted.trial.unittest import TestCase

from tsmux import _context, _relay
from tsmux._hangup import sweepHungUp

from ._fakes import capturedEvents
from ._realsockets import Sink, listenTCP, reactor, socksConnect, startMux
from ._waiting import waitUntilAsync


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


class HangupSweepTests(TestCase):
    timeout = 30
    splice = False

    async def pausedRelay(self):
        self.patch(_relay, "LINGER", 0.5)
        self.sweeps = 0

        def countingSweep(reactor, relays) -> int:
            self.sweeps += 1
            return sweepHungUp(reactor, relays)

        # the mux's own periodic sweep, counted
        self.patch(_context, "sweepHungUp", countingSweep)
        path, context = startMux(self, splice=self.splice)
        port = listenTCP(self, Sink)
        self.addCleanup(Sink.dropAll)
        sock = await threads.deferToThread(fillUntilPaused, path, port)
        self.addCleanup(sock.close)
        (relay,) = context.relays
        await waitUntilAsync(lambda: relay.client.transport not in reactor.getReaders(), what="the client to be paused")
        return context, relay, sock

    async def test_hungUpClientIsDropped(self) -> None:
        events = capturedEvents(self)
        context, relay, sock = await self.pausedRelay()
        self.assertEqual(sweepHungUp(reactor, context.relays), 0)
        sock.close()
        await waitUntilAsync(lambda: relay.client.lost, what="the sweep to drop the client end")
        self.assertIs(relay.hungUp, relay.client)
        # the target never reads: it gets the linger to take what is queued, then is cut
        await waitUntilAsync(lambda: not context.openConnections, timeout=5, what="the relay to end")
        (line,) = [e for e in events if e.get("log_namespace") == "tsmux.connection"]
        self.assertEqual(line["outcome"], "client-closed")
        self.assertIn("hung up while tsmux was not reading it", line["detail"])

    async def test_halfClosedClientIsKept(self) -> None:
        context, relay, sock = await self.pausedRelay()
        sock.shutdown(socket.SHUT_WR)
        seen = self.sweeps
        await waitUntilAsync(lambda: self.sweeps >= seen + 3, what="three sweeps")
        self.assertFalse(relay.client.lost)
        self.assertEqual(sweepHungUp(reactor, context.relays), 0)
        sock.close()
        await waitUntilAsync(lambda: relay.client.lost, what="the sweep to see the hang-up")


class HangupSweepTestsSpliced(HangupSweepTests):
    splice = True
