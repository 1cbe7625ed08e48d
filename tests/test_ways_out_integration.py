"""Every way out against the real tailscaled: chaining to its SOCKS5 port, and HTTP CONNECT."""

from __future__ import annotations

import socket

from twisted.trial.unittest import SynchronousTestCase

from tsmux._socks5 import Reply

from ._httpclient import buildRequest, connect, request, socksCurl
from ._realsockets import recvExactly, socksConnect
from ._tailnet import HELLO_BODY
from ._tsmuxprocess import IntegrationTestMixin, TsmuxProcess


def httpConnect(path: str, authority: str, extra: bytes = b"") -> tuple[bytes, socket.socket]:
    """An HTTP CONNECT (and C{extra} in the same write): the answer's head, and the socket after it."""
    sock = connect(path)
    sock.sendall(buildRequest("CONNECT", authority, close=False, host=authority) + extra)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return head, sock


class UpstreamSOCKS5Tests(IntegrationTestMixin, SynchronousTestCase):
    """tsmux runs inside the namespace here: tailscaled's SOCKS5 port is on its loopback."""

    def startInNamespace(self, *args: str) -> TsmuxProcess:
        prefix = ["nsenter", f"--net=/proc/{self.tailnet.helperPid}/ns/net"]
        return self.startTsmux(*args, prefix=prefix)

    def test_chainedThroughTailscaledSOCKS5(self) -> None:
        tsmux = self.startInNamespace("--dialer", f"socks5:tcp:127.0.0.1:{self.tailnet.socks5Port}")
        result = socksCurl(tsmux.socketPath, f"http://127.0.0.1:{self.tailnet.httpPort}/")
        self.assertEqual((result.returncode, result.stdout), (0, HELLO_BODY), result.stderr)
        sock, reply = socksConnect(tsmux.socketPath, "127.0.0.1", self.tailnet.echoPort, extra=b"ping")
        self.assertEqual((reply, recvExactly(sock, 4)), (0, b"ping"))
        sock.close()

    def test_upstreamRefusalPassedOn(self) -> None:
        tsmux = self.startInNamespace("--dialer", f"socks5:tcp:127.0.0.1:{self.tailnet.socks5Port}")
        sock, reply = socksConnect(tsmux.socketPath, "127.0.0.1", self.tailnet.closedPort)
        sock.close()
        # tailscaled 1.96's SOCKS5 answers 01 for every dial error; tsmux passes it on as is.
        self.assertEqual(reply, Reply.GENERAL_FAILURE)
        tsmux.stop()
        self.assertIn("upstream-refused: upstream SOCKS5: general SOCKS server failure", tsmux.log())

    def test_upstreamUnreachable(self) -> None:
        tsmux = self.startInNamespace("--dialer", f"socks5:tcp:127.0.0.1:{self.tailnet.closedPort}")
        sock, reply = socksConnect(tsmux.socketPath, "127.0.0.1", self.tailnet.echoPort)
        sock.close()
        self.assertEqual(reply, Reply.GENERAL_FAILURE)
        tsmux.stop()
        self.assertIn("upstream-unreachable", tsmux.log())


class HTTPConnectTests(IntegrationTestMixin, SynchronousTestCase):
    def test_connectThroughTailscaled(self) -> None:
        tsmux = self.startTsmux()
        head, sock = httpConnect(tsmux.socketPath, f"127.0.0.1:{self.tailnet.echoPort}", extra=b"early")
        self.assertEqual(head, b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertEqual(recvExactly(sock, 5), b"early")
        sock.sendall(b" and later")
        self.assertEqual(recvExactly(sock, 10), b" and later")
        sock.close()

    def test_refusedIs502WithTheReason(self) -> None:
        tsmux = self.startTsmux()
        head, sock = httpConnect(tsmux.socketPath, f"127.0.0.1:{self.tailnet.closedPort}")
        body = sock.recv(4096)
        sock.close()
        self.assertTrue(head.startswith(b"HTTP/1.1 502 Bad Gateway"), head)
        self.assertIn(b"connection refused", body)

    def test_otherMethodsStillReachTheLocalAPI(self) -> None:
        tsmux = self.startTsmux()
        self.assertEqual(request(tsmux.socketPath, "/localapi/v0/status").status, 200)
