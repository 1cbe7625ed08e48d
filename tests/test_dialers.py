"""The LocalAPI dialer's ts-dial exchange and the direct dialer, with fakes."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectError, ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tsmux import DialError, IDialer, IUpstream
from tsmux._dialers import DirectDialer, LocalAPIDialer, TsDialProtocol, buildDialRequest
from tsmux._errors import (
    ConnectionRefused,
    DialRefusedByPolicy,
    DialTimeout,
    HostUnreachable,
    LocalAPIUnreachable,
    NetworkUnreachable,
)
from tsmux._peercred import PeerCredentials
from tsmux._upstream import HeldConnection

from ._fakes import EndpointLocalAPIAccess, HalfCloseStringTransport

SOCKET = "/run/test/tailscaled.sock"
UPGRADED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ts-dial\r\n\r\n"


def goError(status: int, body: str) -> bytes:
    """An error as Go's http.Error writes it."""
    payload = (body + "\n").encode()
    return (
        f"HTTP/1.1 {status} Whatever\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"X-Content-Type-Options: nosniff\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


class LocalAPIDialerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.direct = RecordingTCPConnector()
        access: Any = EndpointLocalAPIAccess(self.reactor, SOCKET)  # stands for a LocalAPIAccess
        self.access = access
        self.dialer = LocalAPIDialer(self.reactor, access, timeout=10, connectTCP=self.direct)

    def dial(self, host: str = "peer", port: int = 80, caller: PeerCredentials | None = None):
        results: list[Any] = []
        deferred = self.dialer.dial(host, port, caller)
        deferred.addBoth(results.append)
        return deferred, results

    def accept(self) -> tuple[TsDialProtocol, HalfCloseStringTransport]:
        path, factory = self.reactor.unixClients[-1][:2]
        self.assertEqual(path, SOCKET)
        protocol = factory.buildProtocol(None)
        transport = HalfCloseStringTransport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def test_providesIDialer(self) -> None:
        self.assertTrue(verifyObject(IDialer, self.dialer))
        self.assertTrue(verifyObject(IDialer, DirectDialer(self.reactor)))

    def test_requestAsTailscaleNcSendsIt(self) -> None:
        self.dial("peer.tail1234.ts.net", 8080)
        _, transport = self.accept()
        self.assertEqual(transport.value(), buildDialRequest("peer.tail1234.ts.net", 8080))
        self.assertIn(b"\r\nConnection: upgrade\r\n", transport.value())
        self.assertIn(b"\r\nDial-Host: peer.tail1234.ts.net\r\nDial-Port: 8080\r\n", transport.value())

    def test_upgradeKeepsLeftoverBytes(self) -> None:
        _, results = self.dial()
        protocol, transport = self.accept()
        for piece in (UPGRADED[:7], UPGRADED[7:] + b"SSH-2.0-", b"tail"):
            protocol.dataReceived(piece)
        (upstream,) = results
        self.assertTrue(verifyObject(IUpstream, upstream))
        self.assertIs(upstream.transport, transport)
        received = HeldConnection()
        upstream.attach(received)
        self.assertEqual(received.takeHeld(), b"SSH-2.0-tail")
        self.assertIs(transport.protocol, received)

    def test_dialFailureMapped(self) -> None:
        cases = [
            ("dial failure: dial tcp 127.0.0.1:1: connect: connection refused", ConnectionRefused),
            ("dial failure: dial tcp 100.64.0.9:22: connect: no route to host", HostUnreachable),
            ("dial failure: dial tcp 10.0.0.1:22: connect: network is unreachable", NetworkUnreachable),
            ("resolve failure: lookup nope.ts.net: no such host", HostUnreachable),
            ("dial failure: dial tcp 100.64.0.9:22: i/o timeout", DialTimeout),
            ("something new", DialError),
        ]
        for body, errorClass in cases:
            _, results = self.dial()
            protocol, transport = self.accept()
            response = goError(502, body)
            protocol.dataReceived(response[:20])
            protocol.dataReceived(response[20:])
            (failure,) = results
            self.assertIs(type(failure.value), errorClass, body)
            self.assertIn(body, failure.value.reason)
            self.assertTrue(transport.disconnecting)

    def test_badRequestAnswers(self) -> None:
        for status, body in ((400, "bad ts-dial upgrade"), (405, "POST required"), (400, "missing Dial-Host")):
            _, results = self.dial()
            protocol, _ = self.accept()
            protocol.dataReceived(goError(status, body))
            self.assertIs(type(results[0].value), DialError)
            self.assertIn(f"{status} {body}", results[0].value.reason)

    def test_forbiddenIsPolicy(self) -> None:
        _, results = self.dial()
        protocol, _ = self.accept()
        protocol.dataReceived(goError(403, "invalid localapi request"))
        self.assertIsInstance(results[0].value, DialRefusedByPolicy)

    def test_bodyFramedByClose(self) -> None:
        _, results = self.dial()
        protocol, _ = self.accept()
        protocol.dataReceived(b"HTTP/1.1 502 Bad Gateway\r\n\r\ndial failure: connection refused")
        self.assertEqual(results, [])
        protocol.readConnectionLost()
        self.assertIsInstance(results[0].value, ConnectionRefused)

    def test_dialSelfRefused(self) -> None:
        _, results = self.dial("example.com", 443)
        protocol, _ = self.accept()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nDial-Self: true\r\nDial-Addr: 93.184.216.34:443\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertIsInstance(results[0].value, DialRefusedByPolicy)
        self.assertIn("Dial-Self", results[0].value.reason)
        self.assertEqual(self.direct.dials, [])

    def test_dialSelfDirect(self) -> None:
        self.dialer.dialSelf = "direct"
        _, results = self.dial("example.com", 443)
        protocol, _ = self.accept()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nDial-Self: true\r\nDial-Addr: [2001:db8::1]:443\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(self.direct.dials, [("2001:db8::1", 443, None)])
        self.assertEqual(results, ["direct upstream"])

    def test_dialsAsTheCaller(self) -> None:
        """The ts-dial connection, and a Dial-Self socket, are made for the client's credentials."""
        caller = PeerCredentials(1, 65534, 65534, frozenset({65534}))
        self.dialer.dialSelf = "direct"
        _, results = self.dial("example.com", 443, caller)
        self.assertEqual(self.access.peers, [caller])
        protocol, _ = self.accept()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nDial-Self: true\r\nDial-Addr: 192.0.2.7:443\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(self.direct.dials, [("192.0.2.7", 443, caller)])

    def test_dialSelfWithUnusableAddress(self) -> None:
        self.dialer.dialSelf = "direct"
        _, results = self.dial("example.com", 443)
        protocol, _ = self.accept()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nDial-Self: true\r\nDial-Addr: some.name:443\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertIs(type(results[0].value), DialError)
        self.assertEqual(self.direct.dials, [])

    def test_garbage(self) -> None:
        _, results = self.dial()
        protocol, transport = self.accept()
        protocol.dataReceived(b"SSH-2.0-what\r\n")
        self.assertIs(type(results[0].value), DialError)
        self.assertIn("garbage", results[0].value.reason)
        self.assertTrue(transport.disconnecting)

    def test_earlyClose(self) -> None:
        _, results = self.dial()
        protocol, _ = self.accept()
        protocol.dataReceived(b"HTTP/1.1 10")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIn("without answering", results[0].value.reason)

    def test_localAPIMissingIsQuick01(self) -> None:
        _, results = self.dial()
        factory = self.reactor.unixClients[-1][1]
        factory.clientConnectionFailed(None, Failure(ConnectError(osError=2)))
        error = results[0].value
        self.assertIsInstance(error, LocalAPIUnreachable)
        self.assertEqual(error.reply, 0x01)
        self.assertIn(f"{SOCKET} is unreachable: No such file or directory", error.reason)
        self.assertFalse(self.dialer.health.reachable)

    def test_localAPIRefusingIsNot05(self) -> None:
        """The LocalAPI socket refusing is not the target refusing."""
        _, results = self.dial()
        factory = self.reactor.unixClients[-1][1]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(results[0].value.reply, 0x01)

    def test_timeoutWhileWaitingForAnswer(self) -> None:
        _, results = self.dial()
        _, transport = self.accept()
        self.reactor.advance(9.9)
        self.assertEqual(results, [])
        self.reactor.advance(0.2)
        self.assertIsInstance(results[0].value, DialTimeout)
        self.assertEqual(results[0].value.reply, 0x06)
        self.assertTrue(transport.disconnected)

    def test_invalidHostNeverReachesAHeader(self) -> None:
        _, results = self.dial("peer\r\nX-Evil: 1", 80)
        self.assertIsInstance(results[0].value, HostUnreachable)
        self.assertEqual(self.reactor.unixClients, [])


class RecordingTCPConnector:
    """Stands for L{tsmux._ascaller.connectTCPAs}."""

    def __init__(self) -> None:
        self.dials: list[tuple[str, int, object]] = []

    def __call__(self, reactor: object, host: str, port: int, identity: object, protocol: object, timeout: float):
        from twisted.internet import defer

        self.dials.append((host, port, identity))
        return defer.succeed("direct upstream")


class DirectDialerTests(SynchronousTestCase):
    def test_ipLiteralsUsePlainTCP(self) -> None:
        reactor = MemoryReactorClock()
        DirectDialer(reactor).dial("127.0.0.1", 80)
        DirectDialer(reactor).dial("::1", 80)
        self.assertEqual([(c[0], c[1]) for c in reactor.tcpClients], [("127.0.0.1", 80), ("::1", 80)])

    def test_timeout(self) -> None:
        reactor = MemoryReactorClock()
        results: list[Any] = []
        DirectDialer(reactor, timeout=3).dial("192.0.2.1", 80).addBoth(results.append)
        reactor.advance(3.1)
        self.assertIsInstance(results[0].value, DialTimeout)


class HostileAnswerTests(SynchronousTestCase):
    """Regressions from review: odd digits, cancellation while connecting, bodiless statuses."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        access: Any = EndpointLocalAPIAccess(self.reactor, SOCKET)  # stands for a LocalAPIAccess
        self.dialer = LocalAPIDialer(self.reactor, access, timeout=10)

    def accept(self) -> TsDialProtocol:
        protocol = self.reactor.unixClients[-1][1].buildProtocol(None)
        transport = HalfCloseStringTransport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol

    def test_nonASCIIDigitsAreGarbage(self) -> None:
        for answer in (b"HTTP/1.1 \xb2\xb3\xb9 X\r\n\r\n", b"HTTP/1.1 502 Bad\r\nContent-Length: \xb9\r\n\r\nx"):
            results: list[Any] = []
            self.dialer.dial("peer", 80).addBoth(results.append)
            self.accept().dataReceived(answer)
            self.assertIs(type(results[0].value), DialError, answer)
            self.assertIn("garbage", results[0].value.reason)

    def test_cancelWhileConnectingIsNotUnreachable(self) -> None:
        dialing = self.dialer.dial("peer", 80)
        dialing.addErrback(lambda failure: None)
        dialing.cancel()
        self.assertIsNot(self.dialer.health.reachable, False)

    def test_bodilessStatusAnswersAtOnce(self) -> None:
        results: list[Any] = []
        self.dialer.dial("peer", 80).addBoth(results.append)
        self.accept().dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertIs(type(results[0].value), DialError)
