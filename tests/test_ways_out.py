"""The upstream-SOCKS5 dialer (client role of the codec), SOCKS5 authentication and HTTP CONNECT."""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tsmux import IDialer, IUpstream
from tsmux._auth import Credentials, readUpstreamCredentials
from tsmux._client import SOCKS5ClientProtocol, SOCKS5ReplyError
from tsmux._connect import HTTPConnectProtocol
from tsmux._dialers import SOCKS5Dialer
from tsmux._errors import DialError, DialRefusedByPolicy, DialTimeout, UpstreamUnreachable
from tsmux._listen import StartupError
from tsmux._relay import RelayEnd
from tsmux._socks5 import (
    ConnectFailed,
    CredentialsRefused,
    ProtocolViolation,
    Reply,
    buildReply,
    buildRequest,
    buildUsernamePassword,
)
from tsmux._socks5server import SOCKS5ServerProtocol
from tsmux._upstream import HeldConnection

from ._fakes import DONE, GREETING, HalfCloseStringTransport, MuxTestMixin, connectedUpstream


def connected(protocol):
    transport = HalfCloseStringTransport()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return transport


class SOCKS5ClientTests(SynchronousTestCase):
    def test_noAuthPipelinesGreetingAndRequest(self) -> None:
        protocol = SOCKS5ClientProtocol("peer.ts.net", 22)
        transport = connected(protocol)
        self.assertEqual(transport.value(), b"\x05\x01\x00" + buildRequest("peer.ts.net", 22))
        results: list[Any] = []
        protocol.answered.addBoth(results.append)
        reply = b"\x05\x00" + buildReply(Reply.SUCCEEDED, "100.64.0.1", 4242)
        for index in range(len(reply)):
            protocol.dataReceived(reply[index : index + 1])
        protocol.dataReceived(b"SSH-2.0-")
        self.assertEqual(results, [protocol])
        self.assertTrue(verifyObject(IUpstream, protocol))
        self.assertEqual(protocol.boundAddress, ("100.64.0.1", 4242))
        held = HeldConnection()
        protocol.attach(held)
        self.assertEqual(held.takeHeld(), b"SSH-2.0-")

    def test_upstreamReplyCodePassedOn(self) -> None:
        for code in (1, 2, 4, 5, 0x42):
            protocol = SOCKS5ClientProtocol("h", 1)
            connected(protocol)
            results: list[Any] = []
            protocol.answered.addBoth(results.append)
            protocol.dataReceived(b"\x05\x00" + buildReply(code))
            self.assertIsInstance(results[0].value, SOCKS5ReplyError)
            self.assertEqual(results[0].value.reply, code)  # even an undefined code is passed on
            self.assertEqual(results[0].value.kind, "upstream-refused")
            self.assertIsInstance(protocol.failedWith, ConnectFailed)
        self.assertEqual(results[0].value.reason, "upstream SOCKS5: reply 0x42")

    def test_replyTexts(self) -> None:
        for code, text in (
            (1, "general SOCKS server failure"),
            (5, "connection refused"),
            (8, "address type not supported"),
        ):
            protocol = SOCKS5ClientProtocol("h", 1)
            transport = connected(protocol)
            results: list[Any] = []
            protocol.answered.addBoth(results.append)
            protocol.dataReceived(b"\x05\x00" + buildReply(code) + b"ignored")
            self.assertEqual(results[0].value.reason, f"upstream SOCKS5: {text}")
            self.assertTrue(transport.disconnecting)

    def test_usernamePassword(self) -> None:
        protocol = SOCKS5ClientProtocol("h", 1, (b"alice", b"pw"))
        transport = connected(protocol)
        self.assertEqual(transport.value(), b"\x05\x02\x02\x00")
        transport.clear()
        protocol.dataReceived(b"\x05\x02")
        self.assertEqual(transport.value(), buildUsernamePassword(b"alice", b"pw"))
        transport.clear()
        protocol.dataReceived(b"\x01\x00")
        self.assertEqual(transport.value(), buildRequest("h", 1))
        results: list[Any] = []
        protocol.answered.addBoth(results.append)
        protocol.dataReceived(buildReply(0))
        self.assertEqual(results, [protocol])

    def test_badCredentials(self) -> None:
        protocol = SOCKS5ClientProtocol("h", 1, (b"alice", b"wrong"))
        connected(protocol)
        results: list[Any] = []
        protocol.answered.addBoth(results.append)
        protocol.dataReceived(b"\x05\x02\x01\x01")
        self.assertIsInstance(results[0].value, SOCKS5ReplyError)
        self.assertEqual(results[0].value.reply, Reply.NOT_ALLOWED)
        self.assertEqual(results[0].value.reason, "the upstream SOCKS5 server refused our credentials")
        self.assertIsInstance(protocol.failedWith, CredentialsRefused)

    def test_noAcceptableMethod(self) -> None:
        protocol = SOCKS5ClientProtocol("h", 1)
        transport = connected(protocol)
        results: list[Any] = []
        protocol.answered.addBoth(results.append)
        protocol.dataReceived(b"\x05\xff")
        self.assertIs(type(results[0].value), DialError)
        self.assertEqual(
            results[0].value.reason, "the upstream SOCKS5 server accepts none of our authentication methods"
        )
        self.assertTrue(transport.disconnecting)

    def test_closedOrGarbage(self) -> None:
        for data, reason in (
            (b"", "the upstream SOCKS5 server closed the connection during the handshake"),
            (
                b"HTTP/1.1 400 Bad Request\r\n\r\n",
                "the upstream is not a SOCKS5 server we understand: not a SOCKS5 server (version byte 0x48)",
            ),
        ):
            protocol = SOCKS5ClientProtocol("h", 1)
            connected(protocol)
            results: list[Any] = []
            protocol.answered.addBoth(results.append)
            if data:
                protocol.dataReceived(data)
                self.assertIsInstance(protocol.failedWith, ProtocolViolation)
            else:
                protocol.connectionLost(Failure(ConnectionDone()))
                self.assertIsNone(protocol.failedWith)
            self.assertIs(type(results[0].value), DialError)
            self.assertEqual(results[0].value.reason, reason)

    def test_eofDuringTheHandshake(self) -> None:
        protocol = SOCKS5ClientProtocol("h", 1)
        transport = connected(protocol)
        results: list[Any] = []
        protocol.answered.addBoth(results.append)
        protocol.dataReceived(b"\x05\x00\x05")
        protocol.readConnectionLost()
        self.assertIs(type(results[0].value), DialError)
        self.assertTrue(transport.disconnecting)

    def test_cancelAborts(self) -> None:
        protocol = SOCKS5ClientProtocol("h", 1)
        transport = connected(protocol)
        protocol.answered.addErrback(lambda failure: None)
        protocol.answered.cancel()
        self.assertTrue(transport.disconnected)
        protocol.dataReceived(b"\x05\x00" + buildReply(0))  # late bytes are only held, never a second answer


class SOCKS5DialerTests(SynchronousTestCase):
    def setUp(self) -> None:
        from twisted.internet.endpoints import TCP4ClientEndpoint

        self.reactor = MemoryReactorClock()
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", 1080)
        self.dialer = SOCKS5Dialer(self.reactor, endpoint, "tcp:127.0.0.1:1080", timeout=5)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IDialer, self.dialer))
        self.assertEqual(self.dialer.description, "socks5:tcp:127.0.0.1:1080")

    def test_upstreamUnreachableIs01(self) -> None:
        results: list[Any] = []
        self.dialer.dial("peer", 22).addBoth(results.append)
        connector: Any = None  # the dialer's factory does not look at it
        self.reactor.tcpClients[0][2].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.assertIsInstance(results[0].value, UpstreamUnreachable)
        self.assertEqual(results[0].value.reply, Reply.GENERAL_FAILURE)
        self.assertIn("tcp:127.0.0.1:1080 is unreachable", results[0].value.reason)

    def test_timeout(self) -> None:
        results: list[Any] = []
        self.dialer.dial("peer", 22).addBoth(results.append)
        self.reactor.advance(5.1)
        self.assertIsInstance(results[0].value, DialTimeout)


class CredentialFileTests(SynchronousTestCase):
    def write(self, content: bytes, mode: int) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def test_checks(self) -> None:
        credentials = Credentials.fromFile(self.write(b"# users\nalice:s3cret\nbob:pw:with:colons\n", 0o600))
        self.assertTrue(credentials.check(b"alice", b"s3cret"))
        self.assertTrue(credentials.check(b"bob", b"pw:with:colons"))
        self.assertFalse(credentials.check(b"alice", b"wrong"))
        self.assertFalse(credentials.check(b"mallory", b"s3cret"))

    def test_readableByOthersRefused(self) -> None:
        for mode in (0o644, 0o622, 0o606):
            with self.assertRaises(StartupError) as caught:
                Credentials.fromFile(self.write(b"a:b\n", mode))
            self.assertIn("others may read or change it", str(caught.exception))

    def test_upstreamFileHasOneLine(self) -> None:
        self.assertEqual(readUpstreamCredentials(self.write(b"u:p\n", 0o600)), (b"u", b"p"))
        self.assertRaises(StartupError, readUpstreamCredentials, self.write(b"u:p\nv:q\n", 0o600))


class SOCKS5AuthServerTests(MuxTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.context.credentials = Credentials(((b"alice", b"s3cret"),))

    def test_noAuthClientGetsFF(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(GREETING)
        self.assertEqual(transport.value(), b"\x05\xff")

    def test_goodCredentials(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(
            b"\x05\x01\x02" + buildUsernamePassword(b"alice", b"s3cret") + buildRequest("peer", 22)
        )
        self.assertEqual(transport.value(), b"\x05\x02\x01\x00")
        self.assertEqual(self.dialer.dials[0][:2], ("peer", 22))
        transport.protocol.connectionLost(DONE)
        self.assertEqual(self.connectionLines()[0]["username"], "alice")

    def test_badCredentials(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(b"\x05\x01\x02" + buildUsernamePassword(b"alice", b"nope"))
        self.assertEqual(transport.value(), b"\x05\x02\x01\x01")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.dialer.dials, [])
        self.assertIsInstance(transport.protocol, SOCKS5ServerProtocol)


class HTTPConnectTests(MuxTestMixin, SynchronousTestCase):
    def request(self, data: bytes) -> HalfCloseStringTransport:
        _, transport = self.connect()
        transport.protocol.dataReceived(data)
        return transport

    def test_connectRelaysWithLeftover(self) -> None:
        transport = self.request(b"CONNECT peer.ts.net:443 HTTP/1.1\r\nHost: peer.ts.net:443\r\n\r\n\x16\x03\x01")
        self.assertIsInstance(transport.protocol, HTTPConnectProtocol)
        self.assertEqual(self.dialer.dials[0][:2], ("peer.ts.net", 443))
        upstream, upstreamTransport = connectedUpstream()
        self.dialer.dials[0][2].callback(upstream)
        self.assertEqual(transport.value(), b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertEqual(upstreamTransport.value(), b"\x16\x03\x01")
        self.assertIsInstance(transport.protocol, RelayEnd)

    def test_ipv6Authority(self) -> None:
        self.request(b"CONNECT [fd7a:115c::1]:22 HTTP/1.1\r\n\r\n")
        self.assertEqual(self.dialer.dials[0][:2], ("fd7a:115c::1", 22))

    def test_malformedAuthority(self) -> None:
        for authority in (b"peer", b"peer:0", b"peer:99999", b"fd7a::1:22", b"[fd7a::1:22", b"peer:http"):
            transport = self.request(b"CONNECT " + authority + b" HTTP/1.1\r\n\r\n")
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request"), authority)
        self.assertEqual(self.dialer.dials, [])

    def test_dialErrorsAsStatuses(self) -> None:
        for error, status in (
            (DialTimeout("slow"), b"504"),
            (DialRefusedByPolicy("Dial-Self"), b"403"),
            (DialError("refused"), b"502"),
        ):
            transport = self.request(b"CONNECT peer:22 HTTP/1.1\r\n\r\n")
            self.dialer.dials[-1][2].errback(error)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 " + status), transport.value())
            self.assertIn(error.reason.encode(), transport.value())

    def test_policy(self) -> None:
        from tsmux._policy import AccessPolicy

        self.context.policy = AccessPolicy(socksAllowUids=frozenset({1000}))
        transport = self.request(b"CONNECT peer:22 HTTP/1.1\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 Forbidden"))

    def test_proxyAuthorization(self) -> None:
        self.context.credentials = Credentials(((b"alice", b"s3cret"),))
        transport = self.request(b"CONNECT peer:22 HTTP/1.1\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 407"))
        self.assertIn(b'Proxy-Authenticate: Basic realm="tsmux"', transport.value())
        token = base64.b64encode(b"alice:s3cret").decode()
        self.request(f"CONNECT peer:22 HTTP/1.1\r\nProxy-Authorization: Basic {token}\r\n\r\n".encode())
        self.assertEqual(len(self.dialer.dials), 1)
