"""
End to end against a real tailscaled 1.96.4 in a private network namespace,
with real clients: curl, the tailscale CLI, and raw sockets.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from tsmux._dialers import buildDialRequest
from tsmux._socks5 import Reply

from ._httpclient import buildRequest, connect, curl, exchange, request, socksCurl, statusLines
from ._realsockets import pattern, recvExactly, socksConnect
from ._tailnet import HELLO_BODY
from ._tsmuxprocess import IntegrationTestMixin


class SOCKS5ThroughTailscaledTests(IntegrationTestMixin, SynchronousTestCase):
    def test_curlOverTheUnixSocket(self) -> None:
        tsmux = self.startTsmux()
        result = socksCurl(tsmux.socketPath, f"http://127.0.0.1:{self.tailnet.httpPort}/")
        self.assertEqual((result.returncode, result.stdout), (0, HELLO_BODY), result.stderr)
        tsmux.stop()
        (line,) = [line for line in tsmux.log().splitlines() if "socks5 socket=tsmux pid=" in line]
        self.assertIn(f"target=127.0.0.1:{self.tailnet.httpPort}", line)
        self.assertTrue(line.endswith(" ok"), line)

    def test_largeDownloadIntact(self) -> None:
        size = 64 * 1024 * 1024
        tsmux = self.startTsmux()
        started = time.monotonic()
        result = socksCurl(tsmux.socketPath, f"http://127.0.0.1:{self.tailnet.httpPort}/big?n={size}")
        elapsed = time.monotonic() - started
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(result.stdout).digest(), hashlib.sha256(pattern(size)).digest())
        # Not an assertion on speed (timing is noisy here), a figure for the record:
        print(f"\n64 MiB through tsmux + tailscaled ts-dial: {size / elapsed / 2**20:.0f} MiB/s")

    def test_refusedGetsReply05(self) -> None:
        tsmux = self.startTsmux()
        sock, reply = socksConnect(tsmux.socketPath, "127.0.0.1", self.tailnet.closedPort)
        sock.close()
        self.assertEqual(reply, Reply.CONNECTION_REFUSED)

    def test_echoBothWays(self) -> None:
        tsmux = self.startTsmux()
        sock, reply = socksConnect(tsmux.socketPath, "127.0.0.1", self.tailnet.echoPort, extra=b"optimistic ")
        self.assertEqual(reply, 0)
        sock.sendall(b"and more")
        self.assertEqual(recvExactly(sock, 19), b"optimistic and more")
        sock.close()

    def test_tailscaledStoppedThenRestarted(self) -> None:
        tsmux = self.startTsmux()
        url = f"http://127.0.0.1:{self.tailnet.httpPort}/"
        self.tailnet.stopTailscaled()
        started = time.monotonic()
        result = socksCurl(tsmux.socketPath, url)
        self.assertEqual(result.returncode, 97, result.stderr)  # curl: SOCKS5 connection failed
        self.assertLess(time.monotonic() - started, 5)
        response = request(tsmux.socketPath, "/localapi/v0/status")
        self.assertEqual(response.status, 502)
        self.assertIn(f"LocalAPI at {self.tailnet.localapi} is unreachable".encode(), response.body)

        self.tailnet.startTailscaled()
        result = socksCurl(tsmux.socketPath, url)
        self.assertEqual((result.returncode, result.stdout), (0, HELLO_BODY), result.stderr)
        self.assertEqual(request(tsmux.socketPath, "/localapi/v0/status").status, 200)
        log = tsmux.log()
        self.assertEqual(log.count("is unreachable ("), 1, log)
        self.assertIn("is reachable again", log)


class MetricsIntegrationTests(IntegrationTestMixin, SynchronousTestCase):
    def test_metricsCountWhatHappened(self) -> None:
        tsmux = self.startTsmux()
        for _ in range(3):
            self.assertEqual(socksCurl(tsmux.socketPath, f"http://127.0.0.1:{self.tailnet.httpPort}/").returncode, 0)
        self.assertEqual(socksCurl(tsmux.socketPath, f"http://127.0.0.1:{self.tailnet.closedPort}/").returncode, 97)
        self.assertEqual(request(tsmux.socketPath, "/localapi/v0/status").status, 200)
        # The readiness probe, four SOCKS5 connections and the LocalAPI request: each is counted
        # in the same turn of tsmux's reactor that logs its line.
        tsmux.waitForConnectionLines(6)
        response = request(tsmux.socketPath, "/tsmux/v0/metrics")
        self.assertEqual(response.status, 200)
        text = response.text
        self.assertIn('tsmux_connections_total{protocol="socks5",outcome="ok"} 3', text)
        self.assertIn('tsmux_connections_total{protocol="socks5",outcome="dial-error"} 1', text)
        self.assertIn('tsmux_connections_total{protocol="localapi",outcome="ok"} 1', text)
        self.assertIn("tsmux_dial_seconds_count 4", text)
        self.assertIn("tsmux_localapi_reachable 1", text)


class LocalAPIPassthroughTests(IntegrationTestMixin, SynchronousTestCase):
    def test_tailscaleStatusIdentical(self) -> None:
        tsmux = self.startTsmux()
        direct = self.tailnet.runTailscale(["status"], capture_output=True)
        through = subprocess.run(
            [self.tailnet.tailscale, f"--socket={tsmux.socketPath}", "status"], capture_output=True, timeout=30
        )
        self.assertEqual((through.returncode, through.stdout), (direct.returncode, direct.stdout))
        self.assertIn(b"Logged out.", through.stdout)
        for flags in (["--json"], ["--peers=false"]):
            direct = self.tailnet.runTailscale(["status", *flags], capture_output=True)
            through = subprocess.run(
                [self.tailnet.tailscale, f"--socket={tsmux.socketPath}", "status", *flags],
                capture_output=True,
                timeout=30,
            )
            self.assertEqual(through.returncode, direct.returncode)
            if flags == ["--json"]:
                self.assertEqual(json.loads(through.stdout)["BackendState"], "NeedsLogin")

    def test_curlLocalAPI(self) -> None:
        tsmux = self.startTsmux()
        result = curl("--unix-socket", tsmux.socketPath, "http://local-tailscaled.sock/localapi/v0/status")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["BackendState"], "NeedsLogin")

    def test_keepAliveAndPipelining(self) -> None:
        tsmux = self.startTsmux()
        status = buildRequest("GET", "/localapi/v0/status", close=False)
        data = exchange(tsmux.socketPath, status * 3 + buildRequest("GET", "/localapi/v0/status"))
        self.assertEqual(statusLines(data), ["HTTP/1.1 200 OK"] * 4)

    def test_tsDialThroughThePassthrough(self) -> None:
        """A LocalAPI client doing its own ts-dial upgrade through tsmux reaches the target."""
        tsmux = self.startTsmux()
        sock = connect(tsmux.socketPath)
        sock.sendall(buildDialRequest("127.0.0.1", self.tailnet.echoPort) + b"pipelined")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        self.assertTrue(head.startswith(b"HTTP/1.1 101"), head)
        self.assertEqual(recvExactly(sock, 9), b"pipelined")
        sock.close()


class TwistdPluginTests(IntegrationTestMixin, SynchronousTestCase):
    def test_sameBehaviourUnderTwistd(self) -> None:
        tsmux = self.startTsmux(twistd=True)
        result = socksCurl(tsmux.socketPath, f"http://127.0.0.1:{self.tailnet.httpPort}/")
        self.assertEqual((result.returncode, result.stdout), (0, HELLO_BODY), result.stderr)
        self.assertEqual(request(tsmux.socketPath, "/localapi/v0/status").status, 200)
