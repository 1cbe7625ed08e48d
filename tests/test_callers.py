"""
Who is refused is refused first, nobody can take the daemon from others, and
nothing a client sends is logged raw: the front ends' caller rules, with
fake transports that carry a caller's credentials.
"""

from __future__ import annotations

import base64

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tsmux._auth import Credentials, PasswordThrottle
from tsmux._escape import escapeText
from tsmux._limits import ConnectionLimits, connectionsForDescriptors
from tsmux._mux import MuxFactory
from tsmux._peercred import PeerCredentials
from tsmux._policy import AccessPolicy
from tsmux._socks5 import Reply, buildReply, buildRequest, buildUsernamePassword

from ._fakes import (
    DONE,
    CallerTransport,
    FakeDialer,
    FakeLocalAPIAccess,
    TestCaseMixinBase,
    capturedEvents,
    connectAs,
    makeContext,
)

ROOT, NOBODY, ALICE = 0, 65534, 1000
GREETING_BOTH = b"\x05\x02\x00\x02"
GREETING_PASSWORD = b"\x05\x01\x02"
STATUS = b"GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"


class CallerMuxMixin(TestCaseMixinBase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.dialer = FakeDialer()
        self.localapi = FakeLocalAPIAccess()
        self.context = makeContext(self.reactor, self.dialer, self.localapi)
        self.factory = MuxFactory(self.context)
        self.events = capturedEvents(self)

    def connect(self, uid: int, data: bytes = b"", groups: tuple[int, ...] = ()) -> CallerTransport:
        return connectAs(self.factory, uid, data, groups)

    def lines(self) -> list[dict]:
        return [e for e in self.events if e.get("log_namespace") == "tsmux.connection"]


class RefusedFirstTests(CallerMuxMixin, SynchronousTestCase):
    """A caller outside the allow-lists is never asked for a password: no oracle."""

    def setUp(self) -> None:
        super().setUp()
        self.context.policy = AccessPolicy(socksAllowUids=frozenset({ROOT}))
        self.context.credentials = Credentials(((b"alice", b"s3cret"),))

    def test_socks5OnlyPasswordOfferedGetsFF(self) -> None:
        transport = self.connect(NOBODY, GREETING_PASSWORD)
        self.assertEqual(transport.value(), b"\x05\xff")

    def test_socks5RightAndWrongPasswordLookTheSame(self) -> None:
        answers = []
        for password in (b"s3cret", b"wrong"):
            transport = self.connect(
                NOBODY, GREETING_BOTH + buildUsernamePassword(b"alice", password) + buildRequest("peer", 22)
            )
            answers.append(transport.value())
        self.assertEqual(answers[0], answers[1])
        # "no authentication" chosen, the password bytes then fail as a request: never 01 00 / 01 01
        self.assertTrue(answers[0].startswith(b"\x05\x00"), answers[0])
        self.assertNotIn(b"\x01\x00", answers[0][2:4])
        self.assertEqual(self.dialer.dials, [])

    def test_socks5RefusedRequestGets02(self) -> None:
        transport = self.connect(NOBODY, GREETING_BOTH + buildRequest("peer", 22))
        self.assertEqual(transport.value(), b"\x05\x00" + buildReply(Reply.NOT_ALLOWED))
        (line,) = self.lines()
        self.assertEqual(line["outcome"], "refused-by-policy")

    def test_socks5AllowedCallerStillNeedsThePassword(self) -> None:
        transport = self.connect(ROOT, GREETING_BOTH + buildUsernamePassword(b"alice", b"wrong"))
        self.assertEqual(transport.value(), b"\x05\x02\x01\x01")
        transport = self.connect(ROOT, GREETING_BOTH + buildUsernamePassword(b"alice", b"s3cret"))
        self.assertEqual(transport.value(), b"\x05\x02\x01\x00")

    def test_connectRefusedWhateverThePassword(self) -> None:
        for password in (b"s3cret", b"wrong", None):
            header = ""
            if password is not None:
                token = base64.b64encode(b"alice:" + password).decode()
                header = f"Proxy-Authorization: Basic {token}\r\n"
            transport = self.connect(NOBODY, f"CONNECT peer:22 HTTP/1.1\r\n{header}\r\n".encode())
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 Forbidden"), transport.value())
        self.assertEqual(self.dialer.dials, [])

    def test_twoProxyAuthorizationHeadersGet400(self) -> None:
        token = base64.b64encode(b"alice:s3cret").decode()
        request = (
            f"CONNECT peer:22 HTTP/1.1\r\nProxy-Authorization: Basic {token}\r\n"
            f"Proxy-Authorization: Basic {token}\r\n\r\n"
        )
        transport = self.connect(ROOT, request.encode())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request"), transport.value())
        self.assertEqual(self.dialer.dials, [])


class ThrottleTests(CallerMuxMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.context.credentials = Credentials(((b"alice", b"s3cret"),))

    def wrong(self, uid: int) -> CallerTransport:
        return self.connect(uid, GREETING_PASSWORD + buildUsernamePassword(b"alice", b"guess"))

    def test_repeatedWrongPasswordsAreDelayed(self) -> None:
        for _ in range(3):
            self.assertEqual(self.wrong(ALICE).value(), b"\x05\x02\x01\x01")
        delayed = self.wrong(ALICE)
        self.assertEqual(delayed.value(), b"\x05\x02")
        self.reactor.advance(0.3)
        self.assertEqual(delayed.value(), b"\x05\x02\x01\x01")
        warnings = [e for e in self.events if "wrong passwords in a row" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    def test_rightPasswordIsDelayedTooWhileThrottled(self) -> None:
        """Otherwise giving up after a short wait would tell a wrong guess from a right one."""
        for _ in range(4):
            self.wrong(ALICE)
        right = self.connect(ALICE, GREETING_PASSWORD + buildUsernamePassword(b"alice", b"s3cret"))
        self.assertEqual(right.value(), b"\x05\x02")
        self.reactor.advance(10)
        self.assertEqual(right.value(), b"\x05\x02\x01\x00")

    def test_parallelConnectionsTakeTurns(self) -> None:
        for _ in range(3):
            self.wrong(ALICE)
        waiting = [self.wrong(ALICE) for _ in range(4)]
        self.reactor.advance(0.26)
        self.assertEqual([t.value().endswith(b"\x01\x01") for t in waiting], [True, False, False, False])

    def test_otherUidsAreNotSlowed(self) -> None:
        for _ in range(5):
            self.wrong(ALICE)
        self.assertEqual(self.wrong(NOBODY).value(), b"\x05\x02\x01\x01")

    def test_forgottenAfterAQuietMinute(self) -> None:
        throttle = PasswordThrottle(self.reactor)
        for _ in range(5):
            throttle.answered(ALICE, False)
        self.assertGreater(throttle.answered(ALICE, False), 0)
        self.reactor.advance(120)
        self.assertEqual(throttle.answered(ALICE, False), 0)

    def test_connectWrongPasswordsDelayed(self) -> None:
        token = base64.b64encode(b"alice:guess").decode()
        request = f"CONNECT peer:22 HTTP/1.1\r\nProxy-Authorization: Basic {token}\r\n\r\n".encode()
        for _ in range(3):
            self.assertTrue(self.connect(ALICE, request).value().startswith(b"HTTP/1.1 407"))
        delayed = self.connect(ALICE, request)
        self.assertEqual(delayed.value(), b"")
        self.reactor.advance(0.3)
        self.assertTrue(delayed.value().startswith(b"HTTP/1.1 407"))


class LimitTests(CallerMuxMixin, SynchronousTestCase):
    def test_perUidLimitCountsHandshakes(self) -> None:
        self.context.limits = ConnectionLimits(total=10, perUid=2, rootReserve=2)
        first = self.connect(NOBODY, b"\x05")
        self.connect(NOBODY, b"\x05")
        self.assertTrue(self.connect(NOBODY).disconnected)
        self.assertFalse(self.connect(ALICE).disconnected)
        first.protocol.connectionLost(DONE)
        self.assertFalse(self.connect(NOBODY).disconnected)

    def test_rootReserve(self) -> None:
        self.context.limits = ConnectionLimits(total=4, perUid=4, rootReserve=1)
        for _ in range(3):
            self.assertFalse(self.connect(NOBODY).disconnected)
        self.assertTrue(self.connect(ALICE).disconnected)
        self.assertFalse(self.connect(ROOT).disconnected)
        self.assertTrue(self.connect(ROOT).disconnected)

    def test_derivedFromTheDescriptorLimit(self) -> None:
        limits = ConnectionLimits.derive(256)
        self.assertEqual(limits.total, connectionsForDescriptors(256))
        self.assertLessEqual(64 + 6 * limits.total, 256)
        self.assertEqual(limits.perUid, limits.total // 2)
        self.assertGreaterEqual(limits.rootReserve, 1)
        self.assertEqual(ConnectionLimits.derive(256, total=10**6).total, limits.total)
        self.assertEqual(ConnectionLimits.derive(10**6, total=100, perUid=7), ConnectionLimits(100, 7, 12))


class LocalAPICallerTests(CallerMuxMixin, SynchronousTestCase):
    def test_connectedAsTheCaller(self) -> None:
        self.connect(NOBODY, STATUS, groups=(65534, 100))
        ((peer, _, _),) = self.localapi.connects
        assert isinstance(peer, PeerCredentials)
        self.assertEqual((peer.uid, peer.gid, peer.groups), (NOBODY, NOBODY, frozenset({65534, 100})))

    def test_refusedWhenTsmuxCannotActAsTheCaller(self) -> None:
        self.localapi.refuse = "tsmux cannot connect to tailscaled as uid 65534 (not root)"
        transport = self.connect(NOBODY, STATUS)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 Forbidden"))
        self.assertIn(b"cannot connect to tailscaled as uid 65534", transport.value())
        self.assertEqual(self.localapi.connects, [])

    def test_tsmuxAPIIsForTsmuxAdminsOnly(self) -> None:
        self.context.policy = AccessPolicy(adminUids=frozenset({ALICE}), ownUid=4242)
        request = b"GET /tsmux/v0/status HTTP/1.1\r\n\r\n"
        self.assertIn(b"403 Forbidden", self.connect(NOBODY, request).value())
        self.assertIn(b"200 OK", self.connect(ALICE, request).value())
        self.assertIn(b"200 OK", self.connect(ROOT, request).value())


class EscapingTests(CallerMuxMixin, SynchronousTestCase):
    def test_socksDomainEscapedInTheLogLine(self) -> None:
        transport = self.connect(ALICE, b"\x05\x01\x00" + buildRequest("evil\n2026 forged line\r\x1b[31m", 80))
        transport.protocol.connectionLost(DONE)
        (line,) = self.lines()
        text = line["line"]
        self.assertNotIn("\n", text)
        self.assertNotIn("\r", text)
        self.assertNotIn("\x1b", text)
        self.assertIn("evil\\n2026 forged line\\r\\x1b[31m", text)
        self.assertEqual(line["target"], "evil\\n2026 forged line\\r\\x1b[31m:80")

    def test_usernameEscaped(self) -> None:
        self.context.credentials = Credentials(((b"alice", b"s3cret"),))
        transport = self.connect(ALICE, GREETING_PASSWORD + buildUsernamePassword(b"a\nb", b"x"))
        transport.protocol.connectionLost(DONE)
        self.assertIn("user='a\\nb'", self.lines()[0]["line"])

    def test_escapeText(self) -> None:
        self.assertEqual(escapeText("peer.example.ts.net"), "peer.example.ts.net")
        self.assertEqual(escapeText("a\nb\rc\x1bd\\"), "a\\nb\\rc\\x1bd\\\\")
        self.assertEqual(escapeText(b"x\xff\n"), "x\\xff\\n")
        self.assertEqual(escapeText("é\u2028"), "é\\u2028")
