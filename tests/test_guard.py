"""The LocalAPI write guard, with fake transports: what passes, what gets 403, and in which order."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tsmux._guard import GuardedRelay
from tsmux._peercred import PeerCredentials
from tsmux._policy import Access, AccessPolicy, classifyLocalAPIRequest

from ._fakes import HalfCloseStringTransport, connectedUpstream

NOBODY = PeerCredentials(pid=999999, uid=65534, gid=65534)
STATUS = b"GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"
LOGOUT = b"POST /localapi/v0/logout HTTP/1.1\r\nHost: local-tailscaled.sock\r\nContent-Length: 0\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


class ClassificationTests(SynchronousTestCase):
    def test_rules(self) -> None:
        cases = [
            ("GET", "/localapi/v0/status", Access.READ),
            ("GET", "/localapi/v0/watch-ipn-bus", Access.READ),
            ("GET", "/localapi/v0/prefs", Access.READ),
            ("PATCH", "/localapi/v0/prefs", Access.WRITE),
            ("POST", "/localapi/v0/logout", Access.WRITE),
            ("GET", "/localapi/v0/goroutines", Access.WRITE),
            ("GET", "/localapi/v0/metrics", Access.WRITE),
            ("GET", "/localapi/v0/debug-derp-region", Access.WRITE),
            ("GET", "/localapi/v0/cert/host.ts.net", Access.WRITE),
            ("GET", "/localapi/v0/files/", Access.WRITE),
            ("PUT", "/localapi/v0/file-put/peer/name", Access.WRITE),
            ("POST", "/localapi/v0/dial", Access.DIAL),
            ("POST", "/localapi/v0/brand-new-thing", Access.WRITE),
            ("GET", "/localapi/v0/brand-new-thing", Access.READ),
            ("get", "/localapi/v0/status", Access.WRITE),
        ]
        for method, path, access in cases:
            self.assertEqual(classifyLocalAPIRequest(method, path), access, (method, path))

    def test_admins(self) -> None:
        policy = AccessPolicy(adminUids=frozenset({1000}), ownUid=4242)
        self.assertTrue(policy.isAdmin(PeerCredentials(1, 0, 0)))
        self.assertTrue(policy.isAdmin(PeerCredentials(1, 4242, 7)))
        self.assertTrue(policy.isAdmin(PeerCredentials(1, 1000, 7)))
        self.assertFalse(policy.isAdmin(NOBODY))
        self.assertFalse(policy.isAdmin(None))
        policy.operatorUid = 65534
        self.assertTrue(policy.isAdmin(NOBODY))

    def test_socksAllowLists(self) -> None:
        self.assertTrue(AccessPolicy().mayDial(NOBODY).allowed)
        self.assertFalse(AccessPolicy(socksAllowUids=frozenset({1000})).mayDial(NOBODY).allowed)
        self.assertTrue(AccessPolicy(socksAllowGids=frozenset({65534})).mayDial(NOBODY).allowed)
        self.assertFalse(AccessPolicy(socksAllowGids=frozenset({1})).mayDial(None).allowed)


class GuardFixture:
    """A guarded relay between fake transports, for a non-admin caller."""

    def setUp(self) -> None:
        self.finished: list[GuardedRelay] = []
        self.relay = GuardedRelay(AccessPolicy(ownUid=4242), NOBODY, lambda relay, reason: self.finished.append(relay))
        self.client = HalfCloseStringTransport()
        upstream, self.upstream = connectedUpstream()
        self.relay.start(self.client, upstream)

    def fromClient(self, data: bytes) -> None:
        self.client.protocol.dataReceived(data)

    def fromTailscaled(self, data: bytes) -> None:
        self.upstream.protocol.dataReceived(data)


class GuardedRelayTests(GuardFixture, SynchronousTestCase):
    def test_readsPassUnchanged(self) -> None:
        self.fromClient(STATUS[:7])
        self.fromClient(STATUS[7:] + STATUS)
        self.assertEqual(self.upstream.value(), STATUS + STATUS)
        self.fromTailscaled(OK + OK)
        self.assertEqual(self.client.value(), OK + OK)
        self.assertEqual(self.relay.requests, 2)

    def test_writeRefusedWithoutForwarding(self) -> None:
        self.fromClient(LOGOUT)
        self.assertEqual(self.upstream.value(), b"")
        response = self.client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 403 Forbidden\r\n"), response)
        self.assertIn(b"POST /localapi/v0/logout needs LocalAPI write access", response)
        self.assertIn(b"not to uid 65534", response)
        self.assertTrue(self.client.disconnecting)

    def test_pipelinedWriteAfterReadAnsweredInOrder(self) -> None:
        self.fromClient(STATUS + LOGOUT + STATUS)
        self.assertEqual(self.upstream.value(), STATUS)
        self.assertEqual(self.client.value(), b"")
        self.fromTailscaled(OK[:10])
        self.assertEqual(self.client.value(), OK[:10])
        self.fromTailscaled(OK[10:])
        self.assertTrue(self.client.value().startswith(OK + b"HTTP/1.1 403 Forbidden"))
        self.assertEqual(self.upstream.value(), STATUS)

    def test_percentEncodedWriterEndpoint(self) -> None:
        self.fromClient(b"GET /localapi/v0/%67oroutines HTTP/1.1\r\n\r\n")
        self.assertEqual(self.upstream.value(), b"")
        self.assertIn(b"403", self.client.value())

    def test_malformedGets400(self) -> None:
        self.fromClient(b"GET /a b c HTTP/1.1\r\n\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400 Bad Request"))
        self.assertEqual(self.upstream.value(), b"")

    def test_smugglingAttemptRefused(self) -> None:
        self.fromClient(
            b"POST /localapi/v0/status HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        self.assertEqual(self.upstream.value(), b"")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400"))

    def test_bodyOfAnAllowedRequestPasses(self) -> None:
        request = b"GET /localapi/v0/whois HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        self.fromClient(request)
        self.assertEqual(self.upstream.value(), request)

    def test_upgradeGoesRawOnlyAfter101(self) -> None:
        dial = (
            b"POST /localapi/v0/dial HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: ts-dial\r\n"
            b"Dial-Host: h\r\nDial-Port: 1\r\n\r\n"
        )
        self.fromClient(dial + LOGOUT)  # after 101 these bytes are data for the target, not a request
        self.assertEqual(self.upstream.value(), dial)
        self.fromTailscaled(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ts-dial\r\n\r\n")
        self.assertEqual(self.upstream.value(), dial + LOGOUT)
        self.fromClient(b"raw")
        self.assertEqual(self.upstream.value(), dial + LOGOUT + b"raw")

    def test_upgradeRefusedByTailscaledKeepsGuarding(self) -> None:
        sneaky = b"GET /localapi/v0/status HTTP/1.1\r\nUpgrade: anything\r\n\r\n"
        self.fromClient(sneaky + LOGOUT)
        self.assertEqual(self.upstream.value(), sneaky)
        self.fromTailscaled(OK)
        self.assertEqual(self.upstream.value(), sneaky)
        self.assertIn(b"403 Forbidden", self.client.value())

    def test_malformedAfterARefusedUpgradeGets400(self) -> None:
        """Found by the fuzz test: bytes held across an upgrade are framed later, and may be junk."""
        sneaky = b"GET /localapi/v0/status HTTP/1.1\r\nUpgrade: x\r\n\r\n"
        self.fromClient(sneaky + b"junk line\r\n\r\n")
        self.fromTailscaled(OK)
        self.assertIn(b"HTTP/1.1 400 Bad Request", self.client.value())
        self.assertEqual(self.upstream.value(), sneaky)

    def test_dialFollowsSocksAllowList(self) -> None:
        self.relay._policy = AccessPolicy(ownUid=4242, socksAllowUids=frozenset({1000}))
        self.fromClient(b"POST /localapi/v0/dial HTTP/1.1\r\nUpgrade: ts-dial\r\nConnection: upgrade\r\n\r\n")
        self.assertEqual(self.upstream.value(), b"")
        self.assertIn(b"--socks-allow-uid", self.client.value())

    def test_dialNeedsPasswordWithSocksAuth(self) -> None:
        self.relay._policy = AccessPolicy(ownUid=4242, dialNeedsPassword=True)
        self.fromClient(b"POST /localapi/v0/dial HTTP/1.1\r\nUpgrade: ts-dial\r\nConnection: upgrade\r\n\r\n")
        self.assertEqual(self.upstream.value(), b"")
        self.assertIn(b"--socks-auth is set", self.client.value())

    def test_ipnBusOnlyWithPrivateKeysFiltered(self) -> None:
        """Regression (review): tailscaled gives readers the IPN bus only with NotifyNoPrivateKeys."""
        policy = AccessPolicy(ownUid=4242)
        bus = "/localapi/v0/watch-ipn-bus"
        for query, allowed in (
            ("", False),
            ("mask=2", False),
            ("mask=18", True),
            ("mask=16", True),
            ("mask=18&mask=2", False),
            ("mask=18;x=1", False),
            ("mask=%31%38", True),
            ("mask=-16", False),
            ("mask=0x10", False),
        ):
            self.assertEqual(policy.decideLocalAPI(NOBODY, "GET", bus, query).allowed, allowed, query)
        self.fromClient(b"GET /localapi/v0/watch-ipn-bus?mask=2 HTTP/1.1\r\n\r\n")
        self.assertEqual(self.upstream.value(), b"")
        self.assertIn(b"NotifyNoPrivateKeys", self.client.value())

    def test_refusalSentWhenTailscaledLeaves(self) -> None:
        self.fromClient(STATUS + LOGOUT)
        self.upstream.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIn(b"403 Forbidden", self.client.value())


class GuardRegressionTests(GuardFixture, SynchronousTestCase):
    """From review: absolute-form targets, held bytes during an upgrade, odd digits, HTTP/1.0 chunked."""

    def test_absoluteFormRefused(self) -> None:
        for target in (b"HTTP://local-tailscaled.sock/localapi/v0/goroutines", b"http:/localapi/v0/goroutines"):
            self.setUp()
            self.fromClient(b"GET " + target + b" HTTP/1.1\r\n\r\n")
            self.assertEqual(self.upstream.value(), b"")
            self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400"), target)

    def test_heldBytesDuringUpgradeAreBounded(self) -> None:
        dial = b"POST /localapi/v0/dial HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: ts-dial\r\n\r\n"
        self.fromClient(dial + b"x" * 70000)
        self.assertEqual(self.client.producerState, "paused")
        self.fromTailscaled(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ts-dial\r\n\r\n")
        self.assertEqual(self.client.producerState, "producing")
        self.assertEqual(self.upstream.value(), dial + b"x" * 70000)

    def test_nonASCIIContentLength(self) -> None:
        self.fromClient("POST /localapi/v0/status HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"))
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400"))

    def test_http10ChunkedRefused(self) -> None:
        self.fromClient(b"POST /localapi/v0/status HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400"))
        self.assertEqual(self.upstream.value(), b"")
