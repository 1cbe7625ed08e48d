"""
A socket's own rules at the front ends, with fakes: what it offers, who may
use it, and its rules in tailnet terms deciding SOCKS5, CONNECT and LocalAPI
dials; the decision in the log line and the metrics; per-socket limits.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tsmux._config import DialerSpec
from tsmux._context import SharedState
from tsmux._dialfilter import DialFilterRelay
from tsmux._limits import ConnectionLimits
from tsmux._mux import MuxFactory
from tsmux._netmap import NetmapView
from tsmux._rules import RuleSet, parseCallers, parseRule
from tsmux._socks5 import Reply, buildReply, buildRequest

from ._fakes import (
    DONE,
    CallerTransport,
    FakeDialer,
    FakeLocalAPIAccess,
    TestCaseMixinBase,
    capturedEvents,
    connectAs,
    connectedUpstream,
    makeContext,
)

ROOT, NOBODY = 0, 65534
GREETING = b"\x05\x01\x00"
STATUS = b"GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"
CANNED_STATUS: dict[str, Any] = {
    "Self": {"TailscaleIPs": ["100.64.0.1"], "DNSName": "me.example.ts.net.", "HostName": "me", "UserID": 1},
    "Peer": {
        "k1": {
            "TailscaleIPs": ["100.64.0.5", "fd7a:115c:a1e0::5"],
            "DNSName": "db-1.example.ts.net.",
            "HostName": "Database",
            "Tags": ["tag:prod"],
            "UserID": 2,
        },
    },
    "User": {"1": {"LoginName": "alice@example.com"}, "2": {"LoginName": "tagged-devices"}},
}


class FakeNetmap:
    """Stands for L{tsmux._netmap.NetmapWatcher}: the view the test sets, or none."""

    def __init__(self, status: dict[str, Any] | None = CANNED_STATUS) -> None:
        self.view = NetmapView.fromStatus(status, 0.0) if status is not None else None

    def current(self) -> NetmapView | None:
        return self.view

    def whyNone(self) -> str:
        return "no answer from tailscaled's status yet"


def rules(*tables: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(parseRule(table, index) for index, table in enumerate(tables, 1))


class SocketMixin(TestCaseMixinBase):
    settings: dict[str, Any] = {}

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.dialer = FakeDialer()
        self.localapi = FakeLocalAPIAccess()
        self.context = makeContext(self.reactor, self.dialer, self.localapi, name="web", **self.settings)
        self.context.netmap = FakeNetmap()
        self.factory = MuxFactory(self.context)
        self.events = capturedEvents(self)

    def connect(self, uid: int, data: bytes = b"", groups: tuple[int, ...] = ()) -> CallerTransport:
        return connectAs(self.factory, uid, data, groups)

    def lines(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "tsmux.connection"]

    def socks(self, uid: int, host: str, port: int) -> CallerTransport:
        return self.connect(uid, GREETING + buildRequest(host, port))


class OfferTests(SocketMixin, SynchronousTestCase):
    settings = {"offer": frozenset({"http-connect"})}

    def test_socks5NotOfferedGetsFF(self) -> None:
        transport = self.connect(ROOT, GREETING)
        self.assertEqual(transport.value(), b"\x05\xff")
        (line,) = self.lines()
        self.assertEqual(line["outcome"], "refused-by-policy")
        self.assertIn("socket web does not offer socks5", line["line"])
        self.assertIn("socks5 socket=web ", line["line"])
        self.assertEqual(self.dialer.dials, [])

    def test_localAPINotOfferedGets403NamingTheSocket(self) -> None:
        transport = self.connect(ROOT, STATUS)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 Forbidden"))
        self.assertIn(b"socket web does not offer localapi", transport.value())
        self.assertEqual(self.localapi.connects, [])

    def test_connectOffered(self) -> None:
        self.connect(ROOT, b"CONNECT db-1:443 HTTP/1.1\r\n\r\n")
        self.assertEqual([(h, p) for h, p, _ in self.dialer.dials], [("db-1", 443)])

    def test_tsmuxAPIOnEverySocketForAdmins(self) -> None:
        transport = self.connect(ROOT, b"GET /tsmux/v0/status HTTP/1.1\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"), transport.value()[:80])
        self.assertIn(b'"socket": "web"', transport.value())


class AllowCallersTests(SocketMixin, SynchronousTestCase):
    settings = {"allowCallers": parseCallers(["uid:0", "gid:4000"])}

    def test_refusedCallerGetsFFThenNothing(self) -> None:
        transport = self.connect(NOBODY, GREETING)
        self.assertEqual(transport.value(), b"\x05\xff")
        self.assertIn("uid 65534 is not in socket web's allow-callers", self.lines()[0]["line"])

    def test_refusedCallerGets403ForHTTP(self) -> None:
        for request in (STATUS, b"CONNECT db-1:443 HTTP/1.1\r\n\r\n"):
            transport = self.connect(NOBODY, request)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 Forbidden"))
        self.assertEqual((self.localapi.connects, self.dialer.dials), ([], []))

    def test_groupMemberAllowed(self) -> None:
        transport = self.connect(NOBODY, GREETING + buildRequest("db-1", 443), groups=(4000,))
        self.assertEqual(transport.value(), b"\x05\x00")
        self.assertEqual(len(self.dialer.dials), 1)


class RuleDecisionTests(SocketMixin, SynchronousTestCase):
    settings = {
        "rules": rules(
            {"allow": ["tag:prod:443"], "callers": ["uid:0"]},
            {"deny": ["tag:prod:*"]},
            {"allow": ["*.internal.example:*", "10.0.0.0/8:22"]},
        )
    }

    def test_tagRuleAllowsByShortNameHostNameAndAddress(self) -> None:
        for host in (
            "db-1",
            "db-1.example.ts.net",
            "DB-1.example.ts.net.",
            "100.64.0.5",
            "::ffff:100.64.0.5",
        ):
            self.socks(ROOT, host, 443)
        self.assertEqual(len(self.dialer.dials), 5)

    def test_hostNameIsNoTieForAnAllowRule(self) -> None:
        """A node's host name is resolved by DNS, not by tailscaled's map: only deny rules take it."""
        self.socks(ROOT, "database", 443)
        self.assertEqual(self.dialer.dials, [])
        self.assertEqual(self.lines()[0]["rule"], "web#2")

    def test_callersNarrowARule(self) -> None:
        transport = self.socks(NOBODY, "db-1", 443)
        self.assertEqual(transport.value(), b"\x05\x00" + buildReply(Reply.NOT_ALLOWED))
        (line,) = self.lines()
        self.assertIn("target=db-1:443 rule=web#2 ", line["line"])
        self.assertIn("rule web#2 denies tag:prod:*", line["line"])
        self.assertEqual(line["rule"], "web#2")
        self.assertEqual(self.dialer.dials, [])

    def test_whatIsJudgedIsWhatIsDialed(self) -> None:
        """One pair of brackets comes off before the rules and the dial alike (tailscaled would take them off)."""
        self.socks(NOBODY, "[db-1]", 443)
        self.assertEqual(self.lines()[0]["rule"], "web#2")
        self.socks(ROOT, "[db-1]", 443)
        self.assertEqual([(h, p) for h, p, _ in self.dialer.dials], [("db-1", 443)])
        self.connect(ROOT, b"CONNECT [[db-1]]:443 HTTP/1.1\r\n\r\n")
        self.assertEqual([(h, p) for h, p, _ in self.dialer.dials][1:], [("db-1", 443)])

    def test_strayBracketsAreNoHost(self) -> None:
        transport = self.socks(ROOT, "[db-1", 443)
        self.assertEqual(transport.value(), b"\x05\x00" + buildReply(Reply.NOT_ALLOWED))
        self.assertIn("not a host the rules decide", self.lines()[0]["line"])

    def test_unspecifiedAddressesAreNoHost(self) -> None:
        """connect() takes 0.0.0.0 and :: (and 0, inet_aton's) for this host, past a deny of 127.0.0.0/8."""
        self.context.config = replace(self.context.config, rules=rules({"deny": ["127.0.0.0/8:*"]}, {"allow": ["*:*"]}))
        self.context.ruleSet = RuleSet("web", self.context.config.rules or ())
        for host in ("0.0.0.0", "::", "0", "0x0"):
            transport = self.socks(ROOT, host, 80)
            self.assertEqual(transport.value(), b"\x05\x00" + buildReply(Reply.NOT_ALLOWED), host)
        self.assertEqual(self.dialer.dials, [])
        self.assertIn("0.0.0.0 and :: are not hosts the rules decide", self.lines()[0]["line"])

    def test_shortNumericFormIsDeniedByATagDeny(self) -> None:
        """0x64400005 is a name to tailscaled but 100.64.0.5 to libc: the deny of tag:prod stops it."""
        self.socks(NOBODY, "0x64400005", 443)
        self.assertEqual(self.lines()[0]["rule"], "web#2")
        self.socks(ROOT, "0x64400005", 443)
        self.assertEqual(self.lines()[1]["rule"], "web#2", "not allowed by web#1: tailscaled would read a name")
        self.assertEqual(self.dialer.dials, [])

    def test_fallThroughIsEnd(self) -> None:
        self.socks(ROOT, "example.com", 443)
        self.assertEqual(self.lines()[0]["rule"], "web#end")

    def test_suffixAndCIDR(self) -> None:
        self.socks(NOBODY, "a.b.internal.example", 80)
        self.socks(NOBODY, "10.1.2.3", 22)
        self.socks(NOBODY, "internal.example", 80)
        self.assertEqual([(h, p) for h, p, _ in self.dialer.dials], [("a.b.internal.example", 80), ("10.1.2.3", 22)])

    def test_connectDeniedIs403(self) -> None:
        transport = self.connect(NOBODY, b"CONNECT db-1:443 HTTP/1.1\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 Forbidden"))
        self.assertIn(b"rule web#2 denies", transport.value())

    def test_noViewFailsClosed(self) -> None:
        self.context.netmap = FakeNetmap(None)
        transport = self.socks(ROOT, "db-1", 443)
        self.assertEqual(transport.value(), b"\x05\x00" + buildReply(Reply.NOT_ALLOWED))
        self.assertIn(
            "needs the tailnet view, which is missing: no answer from tailscaled's status yet", self.lines()[0]["line"]
        )

    def test_metricsCountDecisionsPerRule(self) -> None:
        self.socks(ROOT, "db-1", 443)
        self.socks(NOBODY, "db-1", 443)
        self.socks(NOBODY, "db-1", 443)
        text = self.context.metrics.render(0, None).decode()
        self.assertIn('tsmux_rule_decisions_total{socket="web",rule="web#1",verdict="allow"} 1', text)
        self.assertIn('tsmux_rule_decisions_total{socket="web",rule="web#2",verdict="deny"} 2', text)


class DirectDialerRulesTests(SocketMixin, SynchronousTestCase):
    """With the direct dialer a name goes to the system's resolver: allow rules trust no name's tie to a node."""

    settings = {"rules": rules({"allow": ["tag:prod:443"]}, {"deny": ["*:*"]})}

    def setUp(self) -> None:
        super().setUp()
        self.context.config = replace(self.context.config, dialer=DialerSpec("direct"))

    def test_addressesOnly(self) -> None:
        self.socks(ROOT, "db-1", 443)
        self.socks(ROOT, "db-1.example.ts.net", 443)
        self.socks(ROOT, "100.64.0.5", 443)
        self.assertEqual([line["rule"] for line in self.lines()], ["web#2", "web#2"])
        self.assertEqual([(h, p) for h, p, _ in self.dialer.dials], [("100.64.0.5", 443)])


class OpenSocketTests(SocketMixin, SynchronousTestCase):
    def test_noRulesIsOpenAndUnlabelled(self) -> None:
        self.socks(NOBODY, "anything.example", 1)
        self.dialer.dials[0][2].cancel()
        self.assertEqual(len(self.dialer.dials), 1)
        self.assertIsNone(self.context.ruleSet)


class LocalAPIDialRulesTests(SocketMixin, SynchronousTestCase):
    settings = {"rules": rules({"allow": ["tag:prod:5432"]}, {"deny": ["*:*"]})}

    def test_localAPIConnectionsOnASocketWithRulesAreFramed(self) -> None:
        for uid in (ROOT, NOBODY):
            self.connect(uid, STATUS)
        self.assertEqual(len(self.localapi.connects), 2)

    def relayFor(self, uid: int, request: bytes) -> tuple[CallerTransport, Any]:
        client = self.connect(uid, request)
        (_, _, deferred) = self.localapi.connects[-1]
        upstream, upstreamTransport = connectedUpstream()
        deferred.callback(upstream)
        relay = [relay for relay in self.context.relays if relay.client.transport is client][0]
        self.assertIsInstance(relay, DialFilterRelay)
        return client, upstreamTransport

    def test_dialAllowedByARuleIsForwarded(self) -> None:
        client, upstream = self.relayFor(NOBODY, dial("db-1", "5432"))
        self.assertIn(b"POST /localapi/v0/dial", upstream.value())
        self.assertEqual(client.value(), b"")

    def test_dialDeniedByARuleGets403(self) -> None:
        client, upstream = self.relayFor(ROOT, dial("db-1", "22"))
        self.assertEqual(upstream.value(), b"")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 403 Forbidden"), client.value())
        self.assertIn(b"LocalAPI dial to db-1:22 refused: rule web#2 denies *:*", client.value())
        self.assertTrue(client.disconnecting and upstream.disconnecting)
        client.protocol.connectionLost(DONE)
        upstream.protocol.connectionLost(DONE)
        self.assertIn("access=dial-rules rule=web#2 ", self.lines()[-1]["line"])

    def test_dialHostNotInTheFormRulesJudgeGets403(self) -> None:
        """Bytes go to tailscaled unchanged: brackets it would take off, letters Go would fold, are refused."""
        for host in ("[db-1]", "db-1]", "d\xc4\xb0b", "fe80::1%eth0"):
            client, upstream = self.relayFor(ROOT, dial(host, "5432"))
            self.assertEqual(upstream.value(), b"", host)
            self.assertIn(b"not a host the rules decide", client.value(), host)

    def test_onlyTCPDials(self) -> None:
        request = dial("db-1", "5432").replace(b"\r\n\r\n", b"\r\nDial-Network: udp\r\n\r\n")
        client, upstream = self.relayFor(ROOT, request)
        self.assertEqual(upstream.value(), b"")
        self.assertIn(b"rules decide TCP dials only", client.value())
        client, upstream = self.relayFor(ROOT, request.replace(b"udp", b"tcp4"))
        self.assertIn(b"Dial-Network: tcp4", upstream.value())

    def test_openConnectionsDecideByTheRulesAfterAReload(self) -> None:
        """A held LocalAPI connection keeps dialing: each dial is decided by the socket's rules as they are now."""
        client, upstream = self.heldConnection()
        reloaded = makeContext(
            self.reactor, self.dialer, self.localapi, name="web", rules=rules({"deny": ["tag:prod:*"]})
        )
        reloaded.netmap = FakeNetmap()
        self.context.successor = reloaded
        client.protocol.dataReceived(dial("db-1", "5432"))
        self.assertNotIn(b"/dial", upstream.value())
        self.assertIn(b"refused: rule web#1 denies tag:prod:*", client.value())

    def test_aRemovedSocketsConnectionsDialNoMore(self) -> None:
        client, upstream = self.heldConnection()
        self.context.removed = True
        client.protocol.dataReceived(dial("db-1", "5432"))
        self.assertNotIn(b"/dial", upstream.value())
        self.assertIn(b"socket web was removed by a reload", client.value())

    def heldConnection(self) -> tuple[CallerTransport, Any]:
        """A keep-alive LocalAPI connection whose first request was answered: it may send more."""
        client, upstream = self.relayFor(NOBODY, STATUS)
        upstream.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertTrue(client.value().endswith(b"{}"))
        return client, upstream

    def test_dialWithoutAValidPortGets403(self) -> None:
        client, upstream = self.relayFor(ROOT, dial("db-1", "0x1f"))
        self.assertIn(b"Dial-Port from 1 to 65535", client.value())


def dial(host: str, port: str) -> bytes:
    return (
        f"POST /localapi/v0/dial HTTP/1.1\r\nHost: local-tailscaled.sock\r\nUpgrade: ts-dial\r\n"
        f"Connection: upgrade\r\nDial-Host: {host}\r\nDial-Port: {port}\r\n\r\n"
    ).encode()


class PerSocketLimitTests(SynchronousTestCase):
    def test_socketCapsWithinTheProcessWide(self) -> None:
        reactor = MemoryReactorClock()
        shared = SharedState(reactor)
        shared.limits = ConnectionLimits(total=100, perUid=100, rootReserve=0)
        capped = makeContext(reactor, FakeDialer(), FakeLocalAPIAccess(), name="small", socketMaxConnections=1)
        other = makeContext(reactor, FakeDialer(), FakeLocalAPIAccess(), name="other")
        for context in (capped, other):
            context.shared = shared
        factories = [MuxFactory(capped), MuxFactory(other)]
        transports = []
        for factory in factories + factories:
            transport = CallerTransport(NOBODY)
            protocol = factory.buildProtocol(None)
            transport.protocol = protocol
            protocol.makeConnection(transport)
            transports.append(transport)
        self.assertEqual([t.disconnecting for t in transports], [False, False, True, False])
        self.assertEqual(shared.openBySocket, {"small": 1, "other": 2})
        self.assertEqual(shared.openTotal, 3)
        transports[0].protocol.connectionLost(DONE)
        self.assertEqual(shared.openBySocket, {"other": 2})


class ConfigReplaceTests(SynchronousTestCase):
    def test_contextKeepsItsRuleSet(self) -> None:
        context = makeContext(MemoryReactorClock(), FakeDialer(), FakeLocalAPIAccess(), name="x", rules=())
        assert context.ruleSet is not None
        self.assertEqual(context.ruleSet.count, 0)
        self.assertEqual(replace(context.config, name="y").name, "y")
