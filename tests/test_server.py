"""The mux and the SOCKS5 and LocalAPI front ends, with fake transports and dialers."""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.error import ConnectError, ConnectionLost
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tsmux._config import PENDING_LIMIT
from tsmux._detect import SOCKS4_REJECTED
from tsmux._errors import ConnectionRefused, DialRefusedByPolicy, DialTimeout, HostUnreachable
from tsmux._limits import ConnectionLimits
from tsmux._mux import MuxProtocol
from tsmux._passthrough import LocalAPIPassthrough
from tsmux._relay import RelayEnd
from tsmux._socks5 import Reply, buildReply, buildRequest
from tsmux._socks5server import SOCKS5ServerProtocol

from ._fakes import DONE, GREETING, SUCCESS, HalfCloseStringTransport, MuxTestMixin, connectedUpstream


class DetectionTests(MuxTestMixin, SynchronousTestCase):
    def test_socks5HandedOffOnFirstByte(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(b"\x05")
        self.assertIsInstance(transport.protocol, SOCKS5ServerProtocol)

    def test_httpHandedOffAfterToken(self) -> None:
        _, transport = self.connect()
        for piece in (b"G", b"E", b"T", b" /localapi/v0/status HTTP/1.1\r\n"):
            self.assertIsInstance(transport.protocol, MuxProtocol)
            transport.protocol.dataReceived(piece)
        self.assertIsInstance(transport.protocol, LocalAPIPassthrough)
        self.assertEqual(len(self.localapi.connects), 1)

    def test_socks4GetsRejection(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00")
        self.assertEqual(transport.value(), SOCKS4_REJECTED)
        self.assertTrue(transport.disconnecting)
        (line,) = self.connectionLines()
        self.assertEqual((line["protocol"], line["outcome"]), ("rejected", "client-error"))
        self.assertIn("SOCKS4", line["detail"])

    def test_junkClosedWithLogLine(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(b"\x16\x03\x01\x00\xa5")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertIn("TLS handshake", self.connectionLines()[0]["detail"])

    def test_detectTimeout(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(b"GE")
        self.reactor.advance(14.9)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(transport.disconnected)
        (line,) = self.connectionLines()
        self.assertEqual(line["outcome"], "timeout")

    def test_timerCancelledOnDetection(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(b"\x05")
        # Only the SOCKS5 handshake timer remains:
        self.assertEqual([call.getTime() for call in self.reactor.getDelayedCalls()], [30.0])

    def test_openConnectionsTracked(self) -> None:
        protocol, transport = self.connect()
        self.assertEqual(len(self.context.openConnections), 1)
        protocol.connectionLost(DONE)
        self.assertEqual(len(self.context.openConnections), 0)


class TsmuxAPITimeoutTests(MuxTestMixin, SynchronousTestCase):
    def test_incompleteRequestTimesOut(self) -> None:
        """Regression (review): an unfinished /tsmux/ request must not hold a slot forever."""
        _, transport = self.connect()
        transport.protocol.dataReceived(b"GET /tsmux/v0/status HTTP/1.1\r\n")
        self.reactor.advance(30.1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.connectionLines()[0]["outcome"], "timeout")


class SOCKS5Tests(MuxTestMixin, SynchronousTestCase):
    def handshake(self, host: str = "peer.example.ts.net", port: int = 80, extra: bytes = b""):
        _, transport = self.connect()
        transport.protocol.dataReceived(GREETING + buildRequest(host, port) + extra)
        self.assertEqual(transport.value(), b"\x05\x00")
        transport.clear()
        return transport

    def test_namesGoToTheDialerUnresolved(self) -> None:
        self.handshake("peer.example.ts.net", 8080)
        self.assertEqual([(h, p) for h, p, _ in self.dialer.dials], [("peer.example.ts.net", 8080)])

    def test_ipv6(self) -> None:
        self.handshake("fd7a:115c:a1e0::1", 22)
        self.assertEqual(self.dialer.dials[0][:2], ("fd7a:115c:a1e0::1", 22))

    def test_successRelaysBothWaysWithOptimisticData(self) -> None:
        transport = self.handshake(extra=b"GET / HTTP/1.0\r\n")
        transport.protocol.dataReceived(b"\r\n")
        upstream, upstreamTransport = connectedUpstream()
        upstream.dataReceived(b"early upstream bytes")
        self.dialer.dials[0][2].callback(upstream)
        self.assertEqual(transport.value(), SUCCESS + b"early upstream bytes")
        self.assertEqual(upstreamTransport.value(), b"GET / HTTP/1.0\r\n\r\n")
        self.assertIsInstance(transport.protocol, RelayEnd)
        transport.protocol.dataReceived(b"more")
        self.assertEqual(upstreamTransport.value(), b"GET / HTTP/1.0\r\n\r\nmore")
        self.assertIs(transport.producer, upstreamTransport)
        self.assertIs(upstreamTransport.producer, transport)

    def test_clientEOFDuringDialIsForwarded(self) -> None:
        transport = self.handshake(extra=b"request")
        transport.protocol.readConnectionLost()
        upstream, upstreamTransport = connectedUpstream()
        self.dialer.dials[0][2].callback(upstream)
        self.assertEqual(upstreamTransport.value(), b"request")
        self.assertTrue(upstreamTransport.writeLost)
        self.assertFalse(transport.disconnecting)

    def test_pendingBoundedDuringDial(self) -> None:
        transport = self.handshake()
        transport.protocol.dataReceived(b"x" * (PENDING_LIMIT + 1))
        self.assertEqual(transport.producerState, "paused")
        upstream, upstreamTransport = connectedUpstream()
        self.dialer.dials[0][2].callback(upstream)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(upstreamTransport.value()), PENDING_LIMIT + 1)

    def test_replyCodesFromDialErrors(self) -> None:
        for error, reply in (
            (ConnectionRefused("no"), Reply.CONNECTION_REFUSED),
            (HostUnreachable("no"), Reply.HOST_UNREACHABLE),
            (DialTimeout("slow"), Reply.TTL_EXPIRED),
            (DialRefusedByPolicy("Dial-Self"), Reply.NOT_ALLOWED),
            (RuntimeError("other"), Reply.GENERAL_FAILURE),
        ):
            transport = self.handshake()
            self.dialer.dials[-1][2].errback(error)
            self.assertEqual(transport.value(), buildReply(reply), error)
            self.assertTrue(transport.disconnecting)
        first = self.connectionLines()[0]
        self.assertEqual(
            (first["outcome"], first["reply"], first["errorKind"]), ("dial-error", 5, "connection-refused")
        )
        self.assertIn(" dial-error reply=0x05 connection-refused: no", first["line"])

    def test_clientLeavingCancelsTheDial(self) -> None:
        transport = self.handshake()
        transport.protocol.connectionLost(DONE)
        self.assertEqual(self.dialer.cancelled, [("peer.example.ts.net", 80)])
        (line,) = self.connectionLines()
        self.assertEqual(line["outcome"], "client-closed")

    def test_upstreamLossUnregistersItAsProducer(self) -> None:
        """
        Closing the client after the upstream is lost must not leave the dead
        upstream registered: Twisted would resume it instead of closing.
        """
        transport = self.handshake()
        upstream, upstreamTransport = connectedUpstream()
        self.dialer.dials[0][2].callback(upstream)
        self.assertIs(transport.producer, upstreamTransport)
        upstreamTransport.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)

    def test_hangUpAfterTheWholeAnswerIsNoError(self) -> None:
        """
        A client that hangs up once it has the whole answer and its EOF (curl, reported by epoll as a
        hang-up, not an EOF) ends normally; one that hangs up while the answer still flows ends in error.
        """
        for answerDone, outcome in ((True, "ok"), (False, "error")):
            transport = self.handshake()
            upstream, upstreamTransport = connectedUpstream()
            self.dialer.dials[-1][2].callback(upstream)
            upstreamTransport.protocol.dataReceived(b"the answer")
            if answerDone:
                upstreamTransport.protocol.readConnectionLost()
            transport.protocol.connectionLost(Failure(ConnectionLost()))
            upstreamTransport.protocol.connectionLost(DONE)
            self.assertEqual(self.connectionLines()[-1]["outcome"], outcome, answerDone)

    def test_bytesCountedWhenClientLeavesDuringDial(self) -> None:
        transport = self.handshake(extra=b"abc")
        transport.protocol.connectionLost(DONE)
        (line,) = self.connectionLines()
        self.assertEqual(line["bytesFromClient"], len(GREETING + buildRequest("peer.example.ts.net", 80)) + 3)

    def test_bytesCountedWhenClientLeavesMidHandshake(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(GREETING)
        transport.protocol.connectionLost(DONE)
        self.assertEqual(self.connectionLines()[0]["bytesFromClient"], 3)

    def relayed(self):
        transport = self.handshake()
        upstream, upstreamTransport = connectedUpstream()
        self.dialer.dials[0][2].callback(upstream)
        return transport, upstreamTransport

    def test_idleTimeout(self) -> None:
        self.context.config = replace(self.context.config, idleTimeout=10)
        transport, upstreamTransport = self.relayed()
        for _ in range(9):
            self.reactor.advance(1)
            self.context.closeIdleRelays()
        transport.protocol.dataReceived(b"activity")
        for _ in range(9):
            self.reactor.advance(1)
            self.context.closeIdleRelays()
        self.assertFalse(transport.disconnecting)
        for _ in range(2):
            self.reactor.advance(1)
            self.context.closeIdleRelays()
        self.assertTrue(transport.disconnecting and upstreamTransport.disconnecting)
        transport.protocol.connectionLost(DONE)
        upstreamTransport.protocol.connectionLost(DONE)
        self.assertEqual(self.connectionLines()[0]["outcome"], "timeout")

    def test_halfCloseTimeoutOnlyAfterOneDirectionEnded(self) -> None:
        self.context.config = replace(self.context.config, halfCloseTimeout=5)
        transport, upstreamTransport = self.relayed()
        for _ in range(10):
            self.reactor.advance(1)
            self.context.closeIdleRelays()
        self.assertFalse(transport.disconnecting)
        transport.protocol.readConnectionLost()
        for _ in range(7):
            self.reactor.advance(1)
            self.context.closeIdleRelays()
        self.assertTrue(upstreamTransport.disconnecting)

    def test_maxConnections(self) -> None:
        """Refused at accept, counted in the metrics, no line per connection (one per burst)."""
        self.context.limits = ConnectionLimits(total=2, perUid=2, rootReserve=0)
        first, _ = self.connect()
        self.connect()
        refused, refusedTransport = self.connect()
        self.assertTrue(refusedTransport.disconnected)
        self.assertEqual(self.connectionLines(), [])
        self.assertEqual(self.context.metrics.limitRefusals, 1)
        warnings = [e for e in self.events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.connect()
        self.assertEqual(len([e for e in self.events if e.get("log_level") == LogLevel.warn]), 1)
        refused.connectionLost(DONE)
        first.connectionLost(DONE)
        _, transport = self.connect()
        self.assertFalse(transport.disconnected)
        self.reactor.advance(11)
        (summary,) = [e for e in self.events if "refused {count}" in e.get("log_format", "")]
        self.assertEqual(summary["count"], 2)

    def test_socksAllowListRefuses02(self) -> None:
        from tsmux._policy import AccessPolicy

        self.context.policy = AccessPolicy(socksAllowUids=frozenset({1000}))
        _, transport = self.connect()
        transport.protocol.dataReceived(GREETING + buildRequest("peer", 22))
        self.assertEqual(transport.value(), b"\x05\x00" + buildReply(Reply.NOT_ALLOWED))
        self.assertEqual(self.dialer.dials, [])
        self.assertEqual(self.connectionLines()[0]["outcome"], "refused-by-policy")

    def test_nothingWrittenAfterClientLeft(self) -> None:
        transport = self.handshake()
        transport.protocol.connectionLost(DONE)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_handshakeTimeout(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(GREETING)
        self.reactor.advance(29.9)
        self.assertFalse(transport.disconnected)
        self.reactor.advance(0.2)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.connectionLines()[0]["outcome"], "timeout")

    def test_handshakeTimerStopsAtTheRequest(self) -> None:
        self.handshake()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_noAcceptableMethod(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(b"\x05\x01\x02")
        self.assertEqual(transport.value(), b"\x05\xff")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.dialer.dials, [])

    def test_unsupportedCommand(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(GREETING + buildRequest("1.2.3.4", 80, command=2))
        self.assertEqual(transport.value(), b"\x05\x00" + buildReply(Reply.COMMAND_NOT_SUPPORTED))
        self.assertTrue(transport.disconnecting)

    def test_logLineOnRelayEnd(self) -> None:
        transport = self.handshake(extra=b"abc")
        upstream, upstreamTransport = connectedUpstream()
        self.dialer.dials[0][2].callback(upstream)
        upstreamTransport.protocol.dataReceived(b"hello")
        transport.protocol.connectionLost(DONE)
        upstreamTransport.protocol.connectionLost(DONE)
        (line,) = self.connectionLines()
        self.assertEqual(line["target"], "peer.example.ts.net:80")
        self.assertEqual(line["outcome"], "ok")
        self.assertEqual(line["bytesFromClient"], len(GREETING + buildRequest("peer.example.ts.net", 80)) + 3)
        self.assertEqual(line["bytesToClient"], len(b"\x05\x00") + len(SUCCESS) + 5)
        self.assertEqual(line["log_level"], LogLevel.info)


class PassthroughTests(MuxTestMixin, SynchronousTestCase):
    def test_bytesUnchangedBothWays(self) -> None:
        _, transport = self.connect()
        request = b"GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"
        transport.protocol.dataReceived(request[:10])
        transport.protocol.dataReceived(request[10:])
        _, protocol, connecting = self.localapi.connects[0]
        upstreamTransport = HalfCloseStringTransport()
        upstreamTransport.protocol = protocol
        protocol.makeConnection(upstreamTransport)
        connecting.callback(protocol)
        self.assertEqual(upstreamTransport.value(), request)
        upstreamTransport.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 200 OK\r\n\r\n")

    def test_unreachableGets502(self) -> None:
        _, transport = self.connect()
        transport.protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.localapi.connects[0][2].errback(Failure(ConnectError(osError=2)))
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), response)
        self.assertIn(b"/nonexistent/tailscaled.sock is unreachable: No such file or directory", response)
        self.assertTrue(transport.disconnecting)
