"""
The client side against a real tailscaled 1.96.4 in a private network
namespace: the endpoint, the agent, the LocalAPI client and the documentation's
examples, through a tsmux process with the C{localapi} dialer.  The targets
listen on 127.0.0.1 inside the namespace, so only tailscaled can reach them.
"""

from __future__ import annotations

import treq
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tsmux.client import ConnectionRefused, TsmuxEndpoint, agent
from tsmux.localapi import LocalAPIClient, LocalAPIError

from ._realsockets import Collector, reactor
from ._tailnet import HELLO_BODY
from ._tsmuxprocess import IntegrationTestMixin, runExample
from ._waiting import waitUntilAsync


class ClientThroughTailscaledTests(IntegrationTestMixin, TestCase):
    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.tsmux = self.startTsmux()

    async def test_endpointReachesTheTarget(self) -> None:
        endpoint = TsmuxEndpoint(reactor, "127.0.0.1", self.tailnet.httpPort, self.tsmux.socketPath)
        request = b"GET / HTTP/1.1\r\nHost: target\r\nConnection: close\r\n\r\n"
        # No half-close: through the localapi dialer tailscaled would drop the answer (see design.rst).
        collector = await connectProtocol(endpoint, Collector(request, halfClose=False))
        response = await collector.done
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:200])
        self.assertTrue(response.endswith(b"\r\n\r\n" + HELLO_BODY), response[-200:])

    async def test_endpointStringEcho(self) -> None:
        description = f"tsmux:host=127.0.0.1:port={self.tailnet.echoPort}:path={self.tsmux.socketPath}"
        collector = await connectProtocol(
            clientFromString(reactor, description), Collector(b"x" * 100_000, halfClose=False)
        )
        await waitUntilAsync(lambda: len(collector.received) >= 100_000, 20, "the echo of all 100,000 bytes")
        assert collector.transport is not None
        collector.transport.loseConnection()
        self.assertEqual(await collector.done, b"x" * 100_000)

    async def test_refusedBecomesTheTypedError(self) -> None:
        endpoint = TsmuxEndpoint(reactor, "127.0.0.1", self.tailnet.closedPort, self.tsmux.socketPath)
        with self.assertRaises(ConnectionRefused) as raised:
            await connectProtocol(endpoint, Protocol())
        self.assertEqual(raised.exception.reply, 0x05)

    async def test_treq(self) -> None:
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        throughTsmux = agent(reactor, self.tsmux.socketPath, pool=pool)
        for _ in range(2):
            response = await treq.get(f"http://127.0.0.1:{self.tailnet.httpPort}/", agent=throughTsmux)
            self.assertEqual((response.code, await response.content()), (200, HELLO_BODY))

    async def test_localapiStatusThroughTsmux(self) -> None:
        client = LocalAPIClient(reactor, self.tsmux.socketPath)
        self.addCleanup(client.close)
        status = await client.status()
        self.assertEqual(status["BackendState"], "NeedsLogin")
        prefs = await client.prefs()
        self.assertIn("WantRunning", prefs)
        with self.assertRaises(LocalAPIError) as raised:
            await client.request("GET", "no-such-endpoint")
        self.assertEqual(raised.exception.status, 404)

    async def test_documentationExamples(self) -> None:
        code, out, err = await runExample(
            "greet.py", f"tsmux:host=127.0.0.1:port={self.tailnet.echoPort}:path={self.tsmux.socketPath}"
        )
        self.assertEqual((code, out), (0, "hello through tsmux\n"), err)
        code, out, err = await runExample(
            "fetch.py", f"http://127.0.0.1:{self.tailnet.httpPort}/", self.tsmux.socketPath
        )
        self.assertEqual((code, out), (0, "200\n" + HELLO_BODY.decode()), err)
        code, out, err = await runExample("status.py", self.tsmux.socketPath)
        self.assertEqual((code, out.splitlines()[0]), (0, "NeedsLogin"), err)
