"""tsmux's own /tsmux/v0/ endpoints: metrics and status, for admins only."""

from __future__ import annotations

import json
import socket

from twisted.internet import threads
from twisted.trial.unittest import TestCase

from ._httpclient import buildRequest, exchange, request
from ._realsockets import Echo, listenTCP, recvAll, recvExactly, socksConnect, startMux, waitUntilClosed


class TsmuxAPITests(TestCase):
    timeout = 30

    async def test_metricsCountWhatHappened(self) -> None:
        path, factory = startMux(self)
        echoPort = listenTCP(self, Echo)

        def traffic() -> None:
            sock, reply = socksConnect(path, "127.0.0.1", echoPort, extra=b"ping")
            assert reply == 0 and recvExactly(sock, 4) == b"ping"
            sock.close()
            sock, reply = socksConnect(path, "127.0.0.1", 1)
            assert reply == 5
            sock.close()
            junk = socket.socket(socket.AF_UNIX)
            junk.connect(path)
            junk.sendall(b"\x16\x03\x01")
            recvAll(junk)
            junk.close()

        await threads.deferToThread(traffic)
        await waitUntilClosed(factory)
        response = await threads.deferToThread(request, path, "/tsmux/v0/metrics")
        self.assertEqual(response.status, 200)
        self.assertIn("text/plain; version=0.0.4", response.header("Content-Type") or "")
        text = response.text
        self.assertIn('tsmux_connections_total{protocol="socks5",outcome="ok"} 1', text)
        self.assertIn('tsmux_connections_total{protocol="socks5",outcome="dial-error"} 1', text)
        self.assertIn('tsmux_connections_total{protocol="rejected",outcome="client-error"} 1', text)
        self.assertIn("tsmux_dial_seconds_count 2", text)
        self.assertIn('tsmux_dial_errors_total{kind="connection-refused"} 1', text)
        self.assertIn("tsmux_open_connections 1", text)  # this request itself

    async def test_status(self) -> None:
        path, factory = startMux(self)
        response = await threads.deferToThread(request, path, "/tsmux/v0/status")
        status = json.loads(response.body)
        self.assertEqual(status["dialer"], "direct")
        self.assertEqual(status["localapi"]["path"], "/nonexistent/tailscaled.sock")
        self.assertEqual(status["openConnections"], 1)

    async def test_unknownEndpoint(self) -> None:
        path, _ = startMux(self)
        response = await threads.deferToThread(request, path, "/tsmux/v0/nope")
        self.assertEqual(response.status, 404)


class TsmuxAPIHeadTests(TestCase):
    timeout = 30

    async def test_headHasNoBody(self) -> None:
        path, _ = startMux(self)
        # Raw: the server must send no body, and close after the HEAD (no Connection: close asked).
        data = await threads.deferToThread(exchange, path, buildRequest("HEAD", "/tsmux/v0/status", close=False))
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK"), data)
        self.assertTrue(data.endswith(b"\r\n\r\n"), data)
