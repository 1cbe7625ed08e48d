"""
The client side (L{tsmux.client}): the endpoint on fakes, the C{tsmux:}
endpoint string, the agent; then on real sockets through an in-process tsmux
with the direct dialer, including the documentation's example programs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import time
from typing import Any

import treq
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.address import HostnameAddress
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IOpenSSLContextFactory,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin, getPlugins
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

import tsmux.client
import tsmux.localapi
from tsmux._auth import Credentials
from tsmux._config import DEFAULT_LISTEN
from tsmux._localapi import LocalAPIClient as PrivateLocalAPIClient
from tsmux._socks5 import Reply, buildReply, buildRequest, buildUsernamePassword
from tsmux.client import (
    DEFAULT_SOCKET_PATH,
    AddressTypeNotSupported,
    AuthenticationFailed,
    CommandNotSupported,
    ConnectionNotAllowed,
    ConnectionRefused,
    GeneralSOCKSFailure,
    HostUnreachable,
    NetworkUnreachable,
    SOCKSError,
    TsmuxEndpoint,
    TsmuxEndpointFactory,
    TsmuxUnreachable,
    TTLExpired,
    agent,
)

from ._fakes import HalfCloseStringTransport
from ._realsockets import Collector, Echo, listenTCP, reactor, shortTempDir, startMux
from ._tsmuxprocess import runExample
from ._waiting import waitUntilAsync

SUCCESS = b"\x05\x00" + buildReply(Reply.SUCCEEDED, "100.64.0.7", 4242)


class Recorder(Protocol):
    """Records what happens to it, in order."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def connectionMade(self) -> None:
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.events.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.events.append(reason.type)


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    def readConnectionLost(self) -> None:
        self.events.append("eof")

    def writeConnectionLost(self) -> None:
        pass


class RecordingFactory(Factory):
    """Builds L{Recorder}s (or what C{build} returns) and records the address and start/stop."""

    def __init__(self, build=Recorder) -> None:
        self.build = build
        self.addresses: list[object] = []
        self.lifecycle: list[str] = []

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        return self.build()

    def doStart(self) -> None:
        self.lifecycle.append("start")

    def doStop(self) -> None:
        self.lifecycle.append("stop")


class FakeConnection:
    """An endpoint's connect on a L{MemoryReactorClock}, with the Unix side played by hand."""

    def __init__(
        self, testCase: SynchronousTestCase, endpointArgs: dict | None = None, factory=None, host: str = "peer.ts.net"
    ) -> None:
        self.reactor = MemoryReactorClock()
        kw = {"socketPath": "/run/test/tsmux.sock", **(endpointArgs or {})}
        self.endpoint = TsmuxEndpoint(self.reactor, host, 22, **kw)
        self.factory = factory or RecordingFactory()
        self.results: list[Any] = []
        self.deferred = self.endpoint.connect(self.factory)
        self.deferred.addBoth(self.results.append)
        path, self.wrappingFactory, self.timeout, _ = self.reactor.unixClients[0]
        testCase.assertEqual(path, "/run/test/tsmux.sock")
        self.transport = HalfCloseStringTransport()

    def connect(self) -> None:
        """The Unix socket connects."""
        protocol = self.wrappingFactory.buildProtocol(None)
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)

    def receive(self, data: bytes) -> None:
        """Bytes from tsmux, delivered to whoever owns the transport now."""
        self.transport.protocol.dataReceived(data)

    def failure(self) -> Any:
        """The connect's failure (typed loosely: the tests read the error's own attributes)."""
        (result,) = self.results
        assert isinstance(result, Failure), result
        return result


class EndpointTests(SynchronousTestCase):
    def test_interface(self) -> None:
        endpoint = TsmuxEndpoint(MemoryReactorClock(), "peer", 22)
        self.assertTrue(verifyObject(IStreamClientEndpoint, endpoint))
        self.assertEqual(endpoint.socketPath, DEFAULT_SOCKET_PATH)
        self.assertEqual(DEFAULT_SOCKET_PATH, DEFAULT_LISTEN)
        self.assertEqual(repr(endpoint), "<TsmuxEndpoint peer:22 via /var/run/tailscale/tsmux.sock>")

    def test_greetingAndRequestInOneWrite(self) -> None:
        connection = FakeConnection(self)
        self.assertEqual(connection.transport.value(), b"")
        connection.connect()
        self.assertEqual(connection.transport.value(), b"\x05\x01\x00" + buildRequest("peer.ts.net", 22))
        self.assertEqual(connection.results, [])

    def test_usernamePassword(self) -> None:
        connection = FakeConnection(self, {"credentials": ("alice", b"s\xc3\xa9same")})
        connection.connect()
        self.assertEqual(connection.transport.value(), b"\x05\x02\x02\x00")
        connection.transport.clear()
        connection.receive(b"\x05\x02")
        self.assertEqual(connection.transport.value(), buildUsernamePassword(b"alice", b"s\xc3\xa9same"))
        connection.transport.clear()
        connection.receive(b"\x01\x00")
        self.assertEqual(connection.transport.value(), buildRequest("peer.ts.net", 22))
        connection.receive(buildReply(Reply.SUCCEEDED))
        self.assertIsInstance(connection.results[0], Recorder)

    def test_successHandsOverWithLeftoverBytes(self) -> None:
        connection = FakeConnection(self)
        connection.connect()
        connection.receive(SUCCESS + b"SSH-2.0-OpenSSH\r\n")
        (protocol,) = connection.results
        self.assertIsInstance(protocol, Recorder)
        self.assertEqual(protocol.events, ["made", b"SSH-2.0-OpenSSH\r\n"])
        # No wrapper: the user's protocol owns the Unix transport itself.
        self.assertIs(connection.transport.protocol, protocol)
        self.assertIs(protocol.transport, connection.transport)
        self.assertEqual(connection.factory.addresses, [HostnameAddress(b"peer.ts.net", 22)])
        connection.receive(b"more")
        protocol.transport.write(b"hello")
        self.assertEqual(protocol.events[-1], b"more")
        self.assertTrue(connection.transport.value().endswith(b"hello"))

    def test_namesTravelUnresolved(self) -> None:
        for host, encoded in (("b\u00fccher.example", b"xn--bcher-kva.example"), ("a" * 100 + ".ts.net", None)):
            connection = FakeConnection(self, host=host)
            connection.connect()
            encoded = encoded or host.encode()
            self.assertEqual(
                connection.transport.value()[3:], b"\x05\x01\x00\x03" + bytes([len(encoded)]) + encoded + b"\x00\x16"
            )
            connection.receive(SUCCESS)
            self.assertEqual(connection.factory.addresses, [HostnameAddress(encoded, 22)])

    def test_replyInPieces(self) -> None:
        connection = FakeConnection(self)
        connection.connect()
        for index in range(len(SUCCESS)):
            self.assertEqual(connection.results, [])
            connection.receive(SUCCESS[index : index + 1])
        (protocol,) = connection.results
        self.assertEqual(protocol.events, ["made"])

    def test_eofAfterHandOver(self) -> None:
        connection = FakeConnection(self, factory=RecordingFactory(HalfCloseRecorder))
        connection.connect()
        connection.receive(SUCCESS + b"bye")
        connection.transport.protocol.readConnectionLost()
        self.assertEqual(connection.results[0].events, ["made", b"bye", "eof"])

    def test_replyCodesBecomeTypedErrors(self) -> None:
        expected = {
            0x01: (GeneralSOCKSFailure, None),
            0x02: (ConnectionNotAllowed, None),
            0x03: (NetworkUnreachable, error.NoRouteError),
            0x04: (HostUnreachable, error.NoRouteError),
            0x05: (ConnectionRefused, error.ConnectionRefusedError),
            0x06: (TTLExpired, error.TimeoutError),
            0x07: (CommandNotSupported, None),
            0x08: (AddressTypeNotSupported, None),
            0x42: (GeneralSOCKSFailure, None),
        }
        for code, (errorClass, twistedClass) in expected.items():
            connection = FakeConnection(self)
            connection.connect()
            connection.receive(b"\x05\x00" + buildReply(code) + b"ignored")
            failure = connection.failure()
            self.assertIs(failure.type, errorClass, code)
            self.assertIsInstance(failure.value, SOCKSError)
            self.assertIsInstance(failure.value, error.ConnectError)
            if twistedClass is not None:
                self.assertIsInstance(failure.value, twistedClass)
            self.assertEqual(failure.value.reply, code if code <= 8 else Reply.GENERAL_FAILURE)
            self.assertIn("peer.ts.net:22", str(failure.value))
            self.assertTrue(connection.transport.disconnecting)
            self.assertEqual(connection.factory.addresses, [])
        self.assertEqual(
            str(tsmux.client.errorForReply(5, "x")), "x", "the reason alone, not Twisted's 'An error occurred'"
        )

    def test_credentialsRefused(self) -> None:
        connection = FakeConnection(self, {"credentials": ("alice", "wrong")})
        connection.connect()
        connection.receive(b"\x05\x02\x01\x01")
        failure = connection.failure()
        self.assertIs(failure.type, AuthenticationFailed)
        self.assertIsInstance(failure.value, ConnectionNotAllowed)
        self.assertEqual(failure.value.reply, Reply.NOT_ALLOWED)
        self.assertEqual(str(failure.value), "tsmux at /run/test/tsmux.sock refused the credentials")
        self.assertTrue(connection.transport.disconnecting)

    def test_replyNotAllowedAfterGoodCredentials(self) -> None:
        """Reply 0x02 to the CONNECT, after the credentials were taken, is a refusal of the target."""
        connection = FakeConnection(self, {"credentials": ("alice", "pw")})
        connection.connect()
        connection.receive(b"\x05\x02\x01\x00" + buildReply(Reply.NOT_ALLOWED))
        failure = connection.failure()
        self.assertIs(failure.type, ConnectionNotAllowed)
        self.assertEqual(
            str(failure.value),
            "tsmux could not connect to peer.ts.net:22: connection not allowed by ruleset (SOCKS5 reply 0x02)",
        )

    def test_handshakeFailuresWithoutAReply(self) -> None:
        failed = "SOCKS5 handshake with /run/test/tsmux.sock failed: "
        for credentials, data, reason in (
            (
                None,
                b"\x05\xff",
                "it accepts none of our authentication methods (it wants a username and password: pass credentials)",
            ),
            (("alice", "pw"), b"\x05\xff", "it accepts none of our authentication methods"),
            (
                None,
                b"HTTP/1.1 400 Bad Request\r\n\r\n",
                "it is not a SOCKS5 server we understand: not a SOCKS5 server (version byte 0x48)",
            ),
            (None, None, "it closed the connection during the handshake"),
        ):
            connection = FakeConnection(self, {"credentials": credentials})
            connection.connect()
            if data is None:
                connection.transport.protocol.connectionLost(Failure(error.ConnectionDone()))
            else:
                connection.receive(data)
            failure = connection.failure()
            self.assertIs(failure.type, SOCKSError, data)
            self.assertIsNone(failure.value.reply)
            self.assertEqual(str(failure.value), failed + reason)

    def test_socketUnreachable(self) -> None:
        connection = FakeConnection(self)
        connection.wrappingFactory.clientConnectionFailed(
            None, Failure(error.getConnectError(OSError(2, "No such file or directory")))
        )
        failure = connection.failure()
        self.assertIs(failure.type, TsmuxUnreachable)
        self.assertNotIsInstance(failure.value, SOCKSError)
        self.assertEqual(
            str(failure.value), "cannot connect to tsmux at /run/test/tsmux.sock: No such file or directory"
        )

    def test_cancelWhileConnectingToTheSocket(self) -> None:
        connection = FakeConnection(self)
        connection.deferred.cancel()
        connection.failure().trap(error.ConnectingCancelledError)
        self.assertTrue(connection.reactor.connectors[0].stoppedConnecting)

    def test_cancelDuringTheHandshakeAborts(self) -> None:
        connection = FakeConnection(self)
        connection.connect()
        connection.deferred.cancel()
        connection.failure().trap(defer.CancelledError)
        self.assertTrue(connection.transport.disconnecting)
        self.assertTrue(connection.transport.disconnected, "aborted, not closed gracefully")
        connection.receive(SUCCESS)
        self.assertEqual(connection.factory.addresses, [], "no protocol after a cancel")

    def test_cancelAfterSuccessIsHarmless(self) -> None:
        connection = FakeConnection(self)
        connection.connect()
        connection.receive(SUCCESS)
        connection.deferred.cancel()
        self.assertIsInstance(connection.results[0], Recorder)
        self.assertFalse(connection.transport.disconnecting)

    def test_timeoutBoundsTheWholeConnect(self) -> None:
        connection = FakeConnection(self, {"timeout": 5})
        self.assertEqual(connection.timeout, 5)
        connection.connect()
        connection.reactor.advance(4.9)
        self.assertEqual(connection.results, [])
        connection.reactor.advance(0.1)
        failure = connection.failure()
        self.assertIs(failure.type, error.TimeoutError)
        self.assertNotIsInstance(failure.value, TTLExpired)
        self.assertIn("within 5 s", str(failure.value))
        self.assertTrue(connection.transport.disconnected)
        self.assertEqual(connection.reactor.getDelayedCalls(), [])

    def test_noTimeout(self) -> None:
        connection = FakeConnection(self, {"timeout": None})
        connection.connect()
        self.assertEqual(connection.reactor.getDelayedCalls(), [])

    def test_factoryReturnsNone(self) -> None:
        connection = FakeConnection(self, factory=RecordingFactory(lambda: None))
        connection.connect()
        connection.receive(SUCCESS)
        connection.failure().trap(error.NoProtocol)
        self.assertTrue(connection.transport.disconnecting)

    def test_factoryRaises(self) -> None:
        def broken() -> Protocol:
            raise ZeroDivisionError()

        connection = FakeConnection(self, factory=RecordingFactory(broken))
        connection.connect()
        connection.receive(SUCCESS)
        connection.failure().trap(ZeroDivisionError)
        self.assertTrue(connection.transport.disconnected)

    def test_badTargets(self) -> None:
        clock = MemoryReactorClock()
        self.assertRaises(ValueError, TsmuxEndpoint, clock, "x" * 256, 22)
        self.assertRaises(ValueError, TsmuxEndpoint, clock, "", 22)
        self.assertRaises(ValueError, TsmuxEndpoint, clock, "peer", 65536)
        self.assertRaises(ValueError, TsmuxEndpoint, clock, "peer", 0)
        self.assertRaises(TypeError, TsmuxEndpoint, clock, "peer", "22")
        self.assertRaises(ValueError, TsmuxEndpoint, clock, "peer", 22, credentials=("", "pw"))
        self.assertEqual(TsmuxEndpoint(clock, "[fd7a:115c::1]", 22).host, "fd7a:115c::1")
        self.assertEqual(TsmuxEndpoint(clock, b"peer", 22).host, "peer")  # type: ignore[arg-type]


class EndpointStringTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def parse(self, description: str) -> TsmuxEndpoint:
        endpoint = clientFromString(self.reactor, description)
        self.assertIsInstance(endpoint, TsmuxEndpoint)
        return endpoint

    def test_pluginIsFound(self) -> None:
        (parser,) = [p for p in getPlugins(IStreamClientEndpointStringParserWithReactor) if p.prefix == "tsmux"]
        self.assertTrue(verifyObject(IStreamClientEndpointStringParserWithReactor, parser))
        self.assertTrue(verifyObject(IPlugin, parser))

    def test_defaults(self) -> None:
        endpoint = self.parse("tsmux:host=peer:port=22")
        self.assertEqual((endpoint.host, endpoint.port, endpoint.socketPath), ("peer", 22, DEFAULT_SOCKET_PATH))
        self.assertEqual(endpoint._timeout, 30)
        self.assertIsNone(endpoint._credentials)
        self.assertIs(endpoint._reactor, self.reactor)

    def test_pathAndTimeout(self) -> None:
        endpoint = self.parse("tsmux:host=peer.tail1234.ts.net:port=8080:path=/run/ts/tsmux.sock:timeout=2.5")
        self.assertEqual(
            (endpoint.host, endpoint.port, endpoint.socketPath, endpoint._timeout),
            ("peer.tail1234.ts.net", 8080, "/run/ts/tsmux.sock", 2.5),
        )
        self.assertIsNone(self.parse("tsmux:host=peer:port=22:timeout=none")._timeout)

    def test_positionalAndEscapedIPv6(self) -> None:
        endpoint = self.parse(r"tsmux:fd7a\:115c\:a1e0\:\:1:22")
        self.assertEqual((endpoint.host, endpoint.port), ("fd7a:115c:a1e0::1", 22))

    def test_credentialsFile(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# for tsmux --socks-auth\nalice:open sesame\n")
        os.chmod(path, 0o600)
        self.assertEqual(
            self.parse(f"tsmux:host=peer:port=22:credentials={path}")._credentials, (b"alice", b"open sesame")
        )
        os.chmod(path, 0o644)
        with self.assertRaises(ValueError) as raised:
            self.parse(f"tsmux:host=peer:port=22:credentials={path}")
        self.assertIn("others may read", str(raised.exception))

    def test_bad(self) -> None:
        for description in (
            "tsmux:host=peer:port=ssh",
            "tsmux:host=peer:port=0",
            "tsmux:host=peer:port=65536",
            "tsmux:host=peer:port=-1",
            "tsmux:host=peer:port=\u0662\u0662",
            "tsmux:host=peer",
            "tsmux:port=22",
            "tsmux:host=:port=22",
            "tsmux:host=peer:port=22:timeout=soon",
            "tsmux:host=peer:port=22:timeout=0",
            "tsmux:host=peer:port=22:socket=/x",
            "tsmux:peer:22:extra",
            "tsmux:peer:22:host=other",
        ):
            self.assertRaises(ValueError, clientFromString, self.reactor, description)


class AgentTests(SynchronousTestCase):
    def test_endpointsForURIs(self) -> None:
        clock = MemoryReactorClock()
        asked: list[tuple[bytes, int]] = []

        @implementer(IPolicyForHTTPS)
        class Policy:
            def creatorForNetloc(self, hostname: bytes, port: int):
                asked.append((hostname, port))
                return optionsForClientTLS(hostname.decode())

        factory = TsmuxEndpointFactory(clock, "/run/t.sock", Policy(), timeout=7)
        self.assertTrue(verifyObject(IAgentEndpointFactory, factory))
        plain: Any = factory.endpointForURI(URI.fromBytes(b"http://peer:8080/x"))
        self.assertIsInstance(plain, TsmuxEndpoint)
        self.assertEqual((plain.host, plain.port, plain.socketPath, plain._timeout), ("peer", 8080, "/run/t.sock", 7))
        secure: Any = factory.endpointForURI(URI.fromBytes(b"https://peer.ts.net/"))
        self.assertEqual(asked, [(b"peer.ts.net", 443)])
        # TLS wraps the tunnel: the endpoint underneath is still tsmux's.
        self.assertEqual(secure._wrappedEndpoint.host, "peer.ts.net")
        self.assertEqual(secure._wrappedEndpoint.port, 443)
        self.assertEqual(factory.endpointForURI(URI.fromBytes(b"http://[fd7a::1]:80/")).host, "fd7a::1")  # type: ignore[attr-defined]
        self.assertRaises(SchemeNotSupported, factory.endpointForURI, URI.fromBytes(b"ftp://peer/"))

    def test_agentPoolsByDefault(self) -> None:
        made: Any = agent(MemoryReactorClock(), "/run/t.sock")
        self.assertTrue(verifyObject(IAgent, made))
        self.assertTrue(made._pool.persistent)
        self.assertFalse(made._pool._factory.noisy)

    def test_publicModules(self) -> None:
        for module in (tsmux.client, tsmux.localapi):
            for name in module.__all__:
                self.assertTrue(hasattr(module, name), name)
        self.assertIs(tsmux.localapi.LocalAPIClient, PrivateLocalAPIClient)


# Real sockets ------------------------------------------------------------------


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"hello over " + request.getHost().__class__.__name__.encode() + b"\n"


def listenHTTP(testCase: TestCase) -> tuple[int, list[object]]:
    """A loopback HTTP server; returns its port and the list of connections it accepted."""
    site = Site(Hello())
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    accepted: list[object] = []
    build = site.buildProtocol

    def counting(addr):
        accepted.append(addr)
        return build(addr)

    site.buildProtocol = counting  # type: ignore[method-assign]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    testCase.addCleanup(port.stopListening)
    return port.getHost().port, accepted


def closedPort() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def selfSignedCertificate(hostname: str) -> tuple[bytes, bytes]:
    """A throwaway certificate for C{hostname} and 127.0.0.1: (certificate PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    # Naive datetimes are UTC to cryptography (and datetime.UTC is Python 3.11+).
    now = datetime.datetime(*time.gmtime()[:6])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    keyPEM = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), keyPEM


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """
    The test target's side of TLS: a pyOpenSSL context that reads the certificate and key from PEM files, so
    that no pyOpenSSL C{X509} or C{PKey} object is made (pyOpenSSL deprecates passing them to a context, and
    Twisted's C{PrivateCertificate.options()} passes exactly those).
    """

    def __init__(self, certificateFile: str, keyFile: str) -> None:
        self._context = SSL.Context(SSL.TLS_METHOD)
        self._context.use_certificate_chain_file(certificateFile)
        self._context.use_privatekey_file(keyFile)
        self._context.check_privatekey()

    def getContext(self) -> SSL.Context:
        return self._context


@implementer(IPolicyForHTTPS)
class TrustOnly:
    """Verifies the target against one certificate instead of the system's roots."""

    def __init__(self, certificatePEM: bytes) -> None:
        self._root = Certificate.loadPEM(certificatePEM)

    def creatorForNetloc(self, hostname: bytes, port: int):
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


class EndpointOnRealSocketsTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.path, self.mux = startMux(self)

    async def test_echoWithHalfClose(self) -> None:
        echoPort = listenTCP(self, Echo)
        factory = RecordingFactory(lambda: Collector(b"ping " * 10000))
        endpoint = TsmuxEndpoint(reactor, "127.0.0.1", echoPort, self.path)
        collector: Any = await endpoint.connect(factory)
        self.assertIs(collector.transport.protocol, collector)
        self.assertEqual(await collector.done, b"ping " * 10000)
        # The connector stops the factory just after connectionLost.
        await waitUntilAsync(lambda: "stop" in factory.lifecycle, what="the factory to stop")
        self.assertEqual(factory.lifecycle, ["start", "stop"], "the user's factory started and stopped as usual")

    async def test_endpointString(self) -> None:
        echoPort = listenTCP(self, Echo)
        endpoint = clientFromString(reactor, f"tsmux:host=localhost:port={echoPort}:path={self.path}:timeout=10")
        collector = await connectProtocol(endpoint, Collector(b"by name"))
        self.assertEqual(await collector.done, b"by name")

    async def test_refused(self) -> None:
        endpoint = TsmuxEndpoint(reactor, "127.0.0.1", closedPort(), self.path)
        with self.assertRaises(ConnectionRefused) as raised:
            await connectProtocol(endpoint, Protocol())
        self.assertEqual(raised.exception.reply, Reply.CONNECTION_REFUSED)

    async def test_unreachableSocket(self) -> None:
        for path in (os.path.join(shortTempDir(self), "missing.sock"), shortTempDir(self)):
            endpoint = TsmuxEndpoint(reactor, "127.0.0.1", 80, path)
            with self.assertRaises(TsmuxUnreachable) as raised:
                await connectProtocol(endpoint, Protocol())
            self.assertIn(path, str(raised.exception))

    async def test_cancelDuringTheHandshakeCloses(self) -> None:
        """A SOCKS5 server that never answers: cancelling closes the connection it holds."""
        silent = Recorder()
        path = os.path.join(shortTempDir(self), "silent.sock")
        port = reactor.listenUNIX(path, RecordingFactory(lambda: silent))
        self.addCleanup(port.stopListening)
        connecting = connectProtocol(TsmuxEndpoint(reactor, "peer", 22, path), Protocol())
        expected = ["made", b"\x05\x01\x00" + buildRequest("peer", 22)]
        await waitUntilAsync(lambda: len(silent.events) >= len(expected), what="the greeting and request")
        self.assertEqual(silent.events, expected)
        connecting.cancel()
        with self.assertRaises(defer.CancelledError):
            await connecting
        await waitUntilAsync(lambda: len(silent.events) >= 3, what="the server's side to be closed")
        self.assertEqual(len(silent.events), 3, silent.events)
        self.assertTrue(issubclass(silent.events[2], error.ConnectionDone), silent.events)

    async def test_authentication(self) -> None:
        self.path, _ = startMux(self, credentials=Credentials(((b"alice", b"open sesame"),)))
        echoPort = listenTCP(self, Echo)
        good = TsmuxEndpoint(reactor, "127.0.0.1", echoPort, self.path, credentials=("alice", "open sesame"))
        collector = await connectProtocol(good, Collector(b"authenticated"))
        self.assertEqual(await collector.done, b"authenticated")
        bad = TsmuxEndpoint(reactor, "127.0.0.1", echoPort, self.path, credentials=("alice", "guess"))
        with self.assertRaises(AuthenticationFailed):
            await connectProtocol(bad, Protocol())
        without = TsmuxEndpoint(reactor, "127.0.0.1", echoPort, self.path)
        with self.assertRaises(SOCKSError) as raised:
            await connectProtocol(without, Protocol())
        self.assertIsNone(raised.exception.reply)
        self.assertIn("authentication methods", str(raised.exception))


class AgentOnRealSocketsTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.path, self.mux = startMux(self)
        self.pool = HTTPConnectionPool(reactor)
        self.addCleanup(self.pool.closeCachedConnections)

    async def test_treqThroughTsmuxPools(self) -> None:
        httpPort, accepted = listenHTTP(self)
        throughTsmux = agent(reactor, self.path, pool=self.pool)
        for _ in range(3):
            response = await treq.get(f"http://127.0.0.1:{httpPort}/", agent=throughTsmux)
            self.assertEqual(response.code, 200)
            self.assertEqual(await response.content(), b"hello over IPv4Address\n")
        self.assertEqual(len(accepted), 1, "one pooled connection for three requests")

    async def test_refusedTarget(self) -> None:
        throughTsmux = agent(reactor, self.path, pool=self.pool)
        with self.assertRaises(ConnectionRefused):
            await treq.get(f"http://127.0.0.1:{closedPort()}/", agent=throughTsmux)

    def listenHTTPS(self) -> tuple[int, bytes]:
        certificatePEM, keyPEM = selfSignedCertificate("localhost")
        site = Site(Hello())
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        certificateFile, keyFile = self.mktemp(), self.mktemp()
        with open(certificateFile, "wb") as f:
            f.write(certificatePEM)
        with open(keyFile, "wb") as f:
            f.write(keyPEM)
        # Wrapped: a Site offers ALPN, which Twisted before 26 sets on the shared server context
        # per connection, and pyOpenSSL 26.2 and later refuse that (the lowest-versions run). The
        # target's TLS is this test's fixture; tsmux's client side offers no ALPN.
        port = reactor.listenSSL(0, WrappingFactory(site), ServerTLS(certificateFile, keyFile), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, certificatePEM

    async def test_httpsEndToEnd(self) -> None:
        httpsPort, certificatePEM = self.listenHTTPS()
        throughTsmux = agent(reactor, self.path, pool=self.pool, contextFactory=TrustOnly(certificatePEM))
        response = await treq.get(f"https://localhost:{httpsPort}/", agent=throughTsmux)
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.content(), b"hello over IPv4Address\n")

    async def test_httpsVerifiesTheTarget(self) -> None:
        """The default policy checks the certificate against the system's roots: TLS is the client's, end to end."""
        httpsPort, _ = self.listenHTTPS()
        throughTsmux = agent(reactor, self.path, pool=self.pool)
        with self.assertRaises(ResponseNeverReceived) as raised:
            await treq.get(f"https://localhost:{httpsPort}/", agent=throughTsmux)
        self.assertIn("certificate verify failed", str(raised.exception.reasons[0].value))


class DocumentationExampleTests(TestCase):
    """The programs in docs/examples, as the client page includes them, run as users would run them."""

    timeout = 60

    def setUp(self) -> None:
        self.path, self.mux = startMux(self)

    async def test_greet(self) -> None:
        echoPort = listenTCP(self, Echo)
        code, out, err = await runExample("greet.py", f"tsmux:host=127.0.0.1:port={echoPort}:path={self.path}", "hi")
        self.assertEqual((code, out), (0, "hi\n"), err)

    async def test_greetRefused(self) -> None:
        port = closedPort()
        code, out, err = await runExample("greet.py", f"tsmux:host=127.0.0.1:port={port}:path={self.path}")
        self.assertEqual(code, 1, out)
        self.assertEqual(
            err, f"greet.py: tsmux could not connect to 127.0.0.1:{port}: connection refused (SOCKS5 reply 0x05)\n"
        )

    async def test_fetch(self) -> None:
        httpPort, _ = listenHTTP(self)
        code, out, err = await runExample("fetch.py", f"http://127.0.0.1:{httpPort}/", self.path)
        self.assertEqual((code, out), (0, "200\nhello over IPv4Address\n"), err)

    async def test_fetchWithoutTsmux(self) -> None:
        missing = os.path.join(shortTempDir(self), "tsmux.sock")
        code, out, err = await runExample("fetch.py", "http://127.0.0.1:1/", missing)
        self.assertEqual(code, 1, out)
        self.assertEqual(err, f"fetch.py: cannot connect to tsmux at {missing}: No such file or directory\n")
