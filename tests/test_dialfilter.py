"""
The LocalAPI dial filter, with fake transports: for the callers whose LocalAPI
dial tsmux refuses, what passes (everything else, unchanged), what gets 403,
and in which order; and the policy that picks those callers.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tsmux._dialfilter import DialFilterRelay
from tsmux._peercred import PeerCredentials
from tsmux._policy import AccessPolicy

from ._fakes import HalfCloseStringTransport, connectedUpstream

NOBODY = PeerCredentials(pid=999999, uid=65534, gid=65534, groups=frozenset({65534}))
STATUS = b"GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"
LOGOUT = b"POST /localapi/v0/logout HTTP/1.1\r\nHost: local-tailscaled.sock\r\nContent-Length: 0\r\n\r\n"
DIAL = (
    b"POST /localapi/v0/dial HTTP/1.1\r\nHost: local-tailscaled.sock\r\nConnection: upgrade\r\n"
    b"Upgrade: ts-dial\r\nDial-Host: peer\r\nDial-Port: 22\r\n\r\n"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
REASON = "uid 65534 is not in --socks-allow-uid/--socks-allow-gid"


class PolicyTests(SynchronousTestCase):
    def test_admins(self) -> None:
        policy = AccessPolicy(adminUids=frozenset({1000}), adminGids=frozenset({50}), ownUid=4242)
        self.assertTrue(policy.isAdmin(PeerCredentials(1, 0, 0)))
        self.assertTrue(policy.isAdmin(PeerCredentials(1, 4242, 7)))
        self.assertTrue(policy.isAdmin(PeerCredentials(1, 1000, 7)))
        self.assertTrue(policy.isAdmin(PeerCredentials(1, 7, 7, frozenset({50}))))
        self.assertTrue(policy.isAdmin(PeerCredentials(1, 7, 50, frozenset())))
        self.assertFalse(policy.isAdmin(NOBODY))
        self.assertFalse(policy.isAdmin(None))

    def test_socksAllowLists(self) -> None:
        self.assertTrue(AccessPolicy().mayDial(NOBODY).allowed)
        self.assertFalse(AccessPolicy(socksAllowUids=frozenset({1000})).mayDial(NOBODY).allowed)
        self.assertTrue(AccessPolicy(socksAllowGids=frozenset({65534})).mayDial(NOBODY).allowed)
        self.assertFalse(AccessPolicy(socksAllowGids=frozenset({1})).mayDial(None).allowed)

    def test_whoseDialsAreFiltered(self) -> None:
        """Only callers outside the allow-lists, and non-admins under --socks-auth: nobody else is framed."""
        self.assertIsNone(AccessPolicy().localAPIDialRefusal(NOBODY))
        self.assertEqual(AccessPolicy(socksAllowUids=frozenset({1000})).localAPIDialRefusal(NOBODY), REASON)
        self.assertIsNone(AccessPolicy(socksAllowUids=frozenset({65534})).localAPIDialRefusal(NOBODY))
        withAuth = AccessPolicy(dialNeedsPassword=True, ownUid=4242)
        self.assertIn("--socks-auth", withAuth.localAPIDialRefusal(NOBODY) or "")
        self.assertIsNone(withAuth.localAPIDialRefusal(PeerCredentials(1, 0, 0)))


class DialFilterFixture:
    def setUp(self) -> None:
        self.finished: list[object] = []
        self.relay = DialFilterRelay(MemoryReactorClock(), REASON, lambda relay, reason: self.finished.append(relay))
        self.client = HalfCloseStringTransport()
        upstream, self.upstream = connectedUpstream()
        self.relay.start(self.client, upstream)  # type: ignore[arg-type]  # a fake stream transport

    def fromClient(self, data: bytes) -> None:
        self.client.protocol.dataReceived(data)

    def fromTailscaled(self, data: bytes) -> None:
        self.upstream.protocol.dataReceived(data)


class DialFilterTests(DialFilterFixture, SynchronousTestCase):
    def test_everythingButDialPassesUnchanged(self) -> None:
        """tailscaled decides rights: a write is forwarded, not judged here."""
        self.fromClient(STATUS[:7])
        self.fromClient(STATUS[7:] + LOGOUT)
        self.assertEqual(self.upstream.value(), STATUS + LOGOUT)
        self.fromTailscaled(OK + OK)
        self.assertEqual(self.client.value(), OK + OK)
        self.assertEqual(self.relay.requests, 2)

    def test_dialRefusedWithoutForwarding(self) -> None:
        self.fromClient(DIAL)
        self.assertEqual(self.upstream.value(), b"")
        response = self.client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 403 Forbidden\r\n"), response)
        self.assertIn(b"LocalAPI dial to peer:22 refused: " + REASON.encode(), response)
        self.assertTrue(self.client.disconnecting)

    def test_percentEncodedDial(self) -> None:
        self.fromClient(b"POST /localapi/v0/%64ial HTTP/1.1\r\nUpgrade: ts-dial\r\nConnection: upgrade\r\n\r\n")
        self.assertEqual(self.upstream.value(), b"")
        self.assertIn(b"403", self.client.value())

    def test_dialTargetEscaped(self) -> None:
        """Control bytes are refused by the parser (400); a Unicode line separator is escaped."""
        self.fromClient("POST /localapi/v0/dial HTTP/1.1\r\nDial-Host: a\u2028b\r\nDial-Port: 1\r\n\r\n".encode())
        self.assertIn(b"dial to a\\u2028b:1", self.client.value())
        self.assertNotIn("\u2028".encode(), self.client.value())

    def test_pipelinedDialAfterReadAnsweredInOrder(self) -> None:
        self.fromClient(STATUS + DIAL + STATUS)
        self.assertEqual(self.upstream.value(), STATUS)
        self.assertEqual(self.client.value(), b"")
        self.fromTailscaled(OK[:10])
        self.assertEqual(self.client.value(), OK[:10])
        self.fromTailscaled(OK[10:])
        self.assertTrue(self.client.value().startswith(OK + b"HTTP/1.1 403 Forbidden"))
        self.assertEqual(self.upstream.value(), STATUS)

    def test_absoluteFormRefused(self) -> None:
        for target in (b"HTTP://local-tailscaled.sock/localapi/v0/dial", b"http:/localapi/v0/dial"):
            self.setUp()
            self.fromClient(b"POST " + target + b" HTTP/1.1\r\n\r\n")
            self.assertEqual(self.upstream.value(), b"")
            self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400"), target)

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

    def test_upgradeOfAnotherEndpointGoesRawOnlyAfter101(self) -> None:
        upgrade = b"GET /localapi/v0/something HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
        self.fromClient(upgrade + DIAL)  # after 101 these bytes are the upgraded stream, not a request
        self.assertEqual(self.upstream.value(), upgrade)
        self.fromTailscaled(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
        self.assertEqual(self.upstream.value(), upgrade + DIAL)
        self.fromClient(b"raw")
        self.assertEqual(self.upstream.value(), upgrade + DIAL + b"raw")

    def test_upgradeRefusedByTailscaledKeepsFiltering(self) -> None:
        sneaky = b"GET /localapi/v0/status HTTP/1.1\r\nUpgrade: anything\r\n\r\n"
        self.fromClient(sneaky + DIAL)
        self.assertEqual(self.upstream.value(), sneaky)
        self.fromTailscaled(OK)
        self.assertEqual(self.upstream.value(), sneaky)
        self.assertIn(b"403 Forbidden", self.client.value())

    def test_nothingAfterARefusalReachesTailscaled(self) -> None:
        """
        Regression (issue 9): after a refusal on a connection with an upgrade
        pending, more bytes from tailscaled resumed framing and forwarded the
        requests after the refused one.
        """
        sneaky = b"GET /localapi/v0/status HTTP/1.1\r\nUpgrade: anything\r\n\r\n"
        self.fromClient(sneaky + DIAL + sneaky + LOGOUT)
        self.fromTailscaled(OK)
        self.assertIn(b"403 Forbidden", self.client.value())
        self.fromTailscaled(b"HTTP/1.1 100 Continue\r\n\r\n")  # ends no answer: framing used to resume here
        self.fromClient(STATUS)
        self.assertEqual(self.upstream.value(), sneaky)

    def test_malformedAfterARefusedUpgradeGets400(self) -> None:
        """Found by the fuzz test: bytes held across an upgrade are framed later, and may be junk."""
        sneaky = b"GET /localapi/v0/status HTTP/1.1\r\nUpgrade: x\r\n\r\n"
        self.fromClient(sneaky + b"junk line\r\n\r\n")
        self.fromTailscaled(OK)
        self.assertIn(b"HTTP/1.1 400 Bad Request", self.client.value())
        self.assertEqual(self.upstream.value(), sneaky)

    def test_refusalSentWhenTailscaledLeaves(self) -> None:
        self.fromClient(STATUS + DIAL)
        self.upstream.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIn(b"403 Forbidden", self.client.value())

    def test_heldBytesDuringUpgradeAreBounded(self) -> None:
        upgrade = b"GET /localapi/v0/something HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
        self.fromClient(upgrade + b"x" * 70000)
        self.assertEqual(self.client.producerState, "paused")
        self.fromTailscaled(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
        self.assertEqual(self.client.producerState, "producing")
        self.assertEqual(self.upstream.value(), upgrade + b"x" * 70000)

    def test_nonASCIIContentLength(self) -> None:
        self.fromClient("POST /localapi/v0/status HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"))
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400"))

    def test_http10ChunkedRefused(self) -> None:
        self.fromClient(b"POST /localapi/v0/status HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 400"))
        self.assertEqual(self.upstream.value(), b"")
