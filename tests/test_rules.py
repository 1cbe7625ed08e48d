"""
Access rules in tailnet terms: every caller and destination form and its
errors, how targets are tied to nodes, and how a socket's rules decide,
including the conservative choices (ambiguous names, a missing view).
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tsmux._netmap import NetmapView
from tsmux._peercred import PeerCredentials
from tsmux._rules import (
    EVERYONE,
    CallerKind,
    DestinationKind,
    RuleError,
    RuleSet,
    Target,
    Verdict,
    parseCaller,
    parseCallers,
    parseDestination,
    parsePorts,
    parseRule,
    parseTarget,
    tiedPeers,
)

ROOT_NAME = pwd.getpwuid(0).pw_name
ROOT_GROUP = grp.getgrgid(0).gr_name
ALICE = PeerCredentials(pid=10, uid=1000, gid=1000, groups=frozenset({1000, 27}))
BOB = PeerCredentials(pid=11, uid=1001, gid=1001, groups=frozenset({1001}))


def node(name: str, host: str, ips: list[str], user: int, tags: list[str] | None = None) -> dict[str, Any]:
    return {"DNSName": name, "HostName": host, "TailscaleIPs": ips, "UserID": user, "Tags": tags}


STATUS: dict[str, Any] = {
    "Self": node("me.tail.ts.net.", "me", ["100.64.0.1", "fd7a:115c:a1e0::1"], 1),
    "Peer": {
        "nodekey:web": node("web.tail.ts.net.", "Web-Server", ["100.64.0.2", "fd7a:115c:a1e0::2"], 9, ["tag:prod"]),
        "nodekey:db": node("db.tail.ts.net.", "db", ["100.64.0.3"], 9, ["tag:prod", "tag:db"]),
        "nodekey:laptop": node("laptop.tail.ts.net.", "laptop", ["100.64.0.4"], 1),
        "nodekey:dev": node("dev.tail.ts.net.", "dev", ["100.64.0.5"], 1, ["tag:dev"]),
        "nodekey:dev1": node("dev-1.tail.ts.net.", "dev", ["100.64.0.6"], 2, ["tag:dev", "tag:prod"]),
        "nodekey:shared": node("files.other.ts.net.", "files", ["100.80.0.7"], 2),
    },
    "User": {
        "1": {"LoginName": "alice@example.com"},
        "2": {"LoginName": "Bob@Example.com"},
        "9": {"LoginName": "tagged-devices"},
    },
}
VIEW = NetmapView.fromStatus(STATUS, fetchedAt=0.0)


def ruleSet(*tables: dict[str, Any], socket: str = "web") -> RuleSet:
    return RuleSet(socket, tuple(parseRule(table, index) for index, table in enumerate(tables, 1)))


def verdictOf(rules: RuleSet, host: str, port: int = 443, peer: PeerCredentials | None = ALICE) -> tuple[Verdict, str]:
    decision = rules.decide(peer, parseTarget(host, port), VIEW)
    return decision.verdict, decision.label


class ParseDestinationTests(SynchronousTestCase):
    def assertBad(self, text: Any, *fragments: str) -> None:
        error = self.assertRaises(RuleError, parseDestination, text)
        for fragment in fragments:
            self.assertIn(fragment, str(error))

    def test_any(self) -> None:
        destination = parseDestination("*:*")
        self.assertEqual(
            (destination.kind, destination.ports.ranges, destination.text), (DestinationKind.ANY, (), "*:*")
        )
        self.assertFalse(destination.needsView)

    def test_ipv4AddressAndNetwork(self) -> None:
        self.assertEqual(parseDestination("100.64.0.2:22").network, ipaddress.ip_network("100.64.0.2/32"))
        destination = parseDestination("100.64.0.0/10:80,443")
        self.assertEqual(destination.kind, DestinationKind.NETWORK)
        self.assertEqual(destination.network, ipaddress.ip_network("100.64.0.0/10"))
        self.assertEqual(destination.ports.ranges, ((80, 80), (443, 443)))
        self.assertTrue(destination.needsView)

    def test_ipv6InBrackets(self) -> None:
        destination = parseDestination("[fd7a:115c:a1e0::/48]:*")
        self.assertEqual(destination.network, ipaddress.ip_network("fd7a:115c:a1e0::/48"))
        self.assertEqual(
            parseDestination("[fd7a:115c:a1e0::2]:443").network, ipaddress.ip_network("fd7a:115c:a1e0::2/128")
        )

    def test_ipv4MappedNetworkIsIPv4(self) -> None:
        """Targets compare mapped addresses as IPv4, so a mapped network is made IPv4 too."""
        self.assertEqual(parseDestination("[::ffff:10.0.0.0/104]:*").network, ipaddress.ip_network("10.0.0.0/8"))

    def test_unbracketedIPv6(self) -> None:
        for text in ("fd7a:115c:a1e0::2:443", "fd7a:115c:a1e0::/48:*", "::1", "fd7a::1"):
            self.assertBad(text, "brackets")

    def test_badAddresses(self) -> None:
        self.assertBad("1.2.3.4/24:*", "host bits")
        self.assertBad("10.1:80", "four decimal numbers")
        self.assertBad("0x7f.1:80", "four decimal numbers")
        self.assertBad("999.1.2.3:80", "999.1.2.3")
        self.assertBad("10.0.0.0/33:80", "10.0.0.0/33")
        self.assertBad("[1.2.3.4]:80", "brackets")
        self.assertBad("[fd7a::zz]:80", "fd7a::zz")
        self.assertBad("[fe80::1%eth0]:80", "zone")
        self.assertBad("[fd7a::1:80", "never closed")
        self.assertBad("[fd7a::1]", "ports after the brackets")
        self.assertBad("[fd7a::1]443", "ports after the brackets")

    def test_name(self) -> None:
        destination = parseDestination("Web.Example.COM.:443")
        self.assertEqual((destination.kind, destination.value), (DestinationKind.NAME, "web.example.com"))
        self.assertEqual(destination.text, "Web.Example.COM.:443")
        self.assertEqual(parseDestination("my_host-1:22").value, "my_host-1")

    def test_badNames(self) -> None:
        for text in ("web..example.com:1", "we b:1", "wéb:1", "a" * 64 + ":1", ".:1", f"{'a.' * 127}aa:1", "x/24:1"):
            self.assertBad(text, "bad host name")

    def test_suffix(self) -> None:
        destination = parseDestination("*.Example.com:*")
        self.assertEqual((destination.kind, destination.value), (DestinationKind.SUFFIX, ".example.com"))
        for text in ("*.:1", "*..x:1", "*.a.*.b:1", "a.*.b:1", "*x.com:1"):
            self.assertBad(text, "bad host name")

    def test_tag(self) -> None:
        destination = parseDestination("tag:prod:443")
        self.assertEqual((destination.kind, destination.value), (DestinationKind.TAG, "tag:prod"))
        self.assertEqual(destination.ports.ranges, ((443, 443),))
        self.assertEqual(parseDestination("tag:Web-2:*").value, "tag:web-2")
        for text in ("tag::1", "tag:1x:1", "tag:a_b:1", "tag:a.b:1"):
            self.assertBad(text, "bad tag")

    def test_tagWithoutPorts(self) -> None:
        """C{tag:prod} alone splits into host C{tag} and ports C{prod}: the message shows the form."""
        self.assertBad("tag:prod", "bad ports 'prod'", "tag:prod:*")

    def test_login(self) -> None:
        destination = parseDestination("Alice@Example.com:22")
        self.assertEqual((destination.kind, destination.value), (DestinationKind.LOGIN, "alice@example.com"))
        self.assertEqual(parseDestination("alice@github:*").value, "alice@github")
        for text in ("a@b@c:1", "@example.com:1", "alice@:1", "*@example.com:1", "al ice@example.com:1"):
            self.assertBad(text, "bad login")

    def test_tailnetGroups(self) -> None:
        for text in ("group:eng:*", "autogroup:member:443", "autogroup:self:*"):
            self.assertBad(text, "tailnet groups", "not visible to tsmux")

    def test_otherPrefixes(self) -> None:
        self.assertBad("svc:web:443", "bad host 'svc:web'")

    def test_empty(self) -> None:
        self.assertBad("", "empty destination")
        self.assertBad(":80", "no host")
        self.assertBad("web", "no ports", "web:443")
        self.assertBad(42, "string")

    def test_ports(self) -> None:
        self.assertEqual(parsePorts("*").ranges, ())
        self.assertEqual(parsePorts("22").ranges, ((22, 22),))
        self.assertEqual(parsePorts("1-65535").ranges, ((1, 65535),))
        self.assertEqual(parsePorts("80,8000-8100").ranges, ((80, 80), (8000, 8100)))
        ports = parsePorts("80,8000-8100")
        self.assertEqual(
            [ports.matches(p) for p in (79, 80, 81, 7999, 8000, 8050, 8100, 8101)],
            [False, True] + [False] * 2 + [True] * 3 + [False],
        )

    def test_badPorts(self) -> None:
        self.assertBad("web:0", "1 to 65535")
        self.assertBad("web:65536", "1 to 65535")
        self.assertBad("web:0-80", "1 to 65535")
        self.assertBad("web:9-8", "ends before it starts")
        for ports in ("", "x", "80,", ",80", "80-", "-80", "1-2-3", " 80", "+80", "*,80", "123456", "٣"):
            self.assertBad(f"web:{ports}", "bad port")


class ParseCallerTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parseCaller("*").kind, CallerKind.ANYONE)
        self.assertEqual((parseCaller("uid:1000").kind, parseCaller("uid:1000").id), (CallerKind.UID, 1000))
        self.assertEqual((parseCaller("gid:0").kind, parseCaller("gid:0").id), (CallerKind.GID, 0))
        self.assertEqual(
            (parseCaller(f"user:{ROOT_NAME}").kind, parseCaller(f"user:{ROOT_NAME}").id), (CallerKind.USER, 0)
        )
        self.assertEqual(
            (parseCaller(f"group:{ROOT_GROUP}").kind, parseCaller(f"group:{ROOT_GROUP}").id), (CallerKind.GROUP, 0)
        )

    def test_unknownNames(self) -> None:
        error = self.assertRaises(RuleError, parseCaller, "user:no-such-user-for-tsmux")
        self.assertIn("no local user named 'no-such-user-for-tsmux'", str(error))
        error = self.assertRaises(RuleError, parseCaller, "group:no-such-group-for-tsmux")
        self.assertIn("no local group named 'no-such-group-for-tsmux'", str(error))
        for text in ("user:", "group:", "user:a\x00b"):
            self.assertRaises(RuleError, parseCaller, text)

    def test_badForms(self) -> None:
        for text in (
            "",
            "root",
            "uid:",
            "uid:-1",
            "uid:x",
            "uid:4294967295",
            "uid:99999999999",
            "gid: 1",
            "UID:1",
            "**",
        ):
            error = self.assertRaises(RuleError, parseCaller, text)
            self.assertIn(f"bad caller '{text}'", str(error))
        self.assertRaises(RuleError, parseCaller, 1000)

    def test_callers(self) -> None:
        callers = parseCallers(["uid:1001", f"group:{ROOT_GROUP}", "gid:27"])
        self.assertEqual((callers.uids, callers.gids), (frozenset({1001}), frozenset({0, 27})))
        self.assertEqual(callers.text, f"uid:1001, group:{ROOT_GROUP}, gid:27")
        self.assertFalse(callers.everyone)
        self.assertTrue(parseCallers(["uid:5", "*"]).everyone)

    def test_badCallers(self) -> None:
        for values in ([], "uid:0", None, {"uid:0": 1}, ["uid:0", 5]):
            self.assertRaises(RuleError, parseCallers, values)

    def test_matches(self) -> None:
        callers = parseCallers(["uid:1001", "gid:27"])
        self.assertTrue(callers.matches(BOB), "by uid")
        self.assertTrue(callers.matches(ALICE), "by a supplementary group")
        self.assertTrue(callers.matches(PeerCredentials(1, 2000, 27, frozenset())), "by the primary gid")
        self.assertFalse(callers.matches(PeerCredentials(1, 2000, 2000, frozenset({5}))))

    def test_unknownCallerOnlyInEveryone(self) -> None:
        self.assertTrue(EVERYONE.matches(None))
        self.assertTrue(parseCallers(["*"]).matches(None))
        self.assertFalse(parseCallers(["uid:0", "gid:0"]).matches(None))


class ParseTargetTests(SynchronousTestCase):
    def test_name(self) -> None:
        self.assertEqual(parseTarget("Web.Tail.TS.net.", 443), Target("web.tail.ts.net", 443))
        self.assertEqual(parseTarget("web", 0).text, "web:0")

    def test_ipLiterals(self) -> None:
        self.assertEqual(parseTarget("100.64.0.2", 22), Target("100.64.0.2", 22, ipaddress.ip_address("100.64.0.2")))
        target = parseTarget("FD7A:115C:A1E0::2", 22)
        self.assertEqual((target.host, target.ip), ("fd7a:115c:a1e0::2", ipaddress.ip_address("fd7a:115c:a1e0::2")))
        self.assertEqual(target.text, "[fd7a:115c:a1e0::2]:22")
        self.assertEqual(parseTarget("[fd7a:115c:a1e0::2]", 22), target)
        self.assertEqual(parseTarget("fe80::1%eth0", 22).ip, ipaddress.ip_address("fe80::1"))

    def test_ipv4Mapped(self) -> None:
        for host in ("::ffff:100.64.0.2", "[::ffff:100.64.0.2]", "::ffff:6440:2"):
            self.assertEqual(parseTarget(host, 1).ip, ipaddress.ip_address("100.64.0.2"), host)

    def test_inetAtonForms(self) -> None:
        """
        What C{getaddrinfo} would connect to, and what tailscaled reads as a name: a name that
        carries the address too.
        """
        for host in ("2130706433", "0x7f.1", "0x7F000001", "017700000001", "127.1", "0177.0.0.1"):
            target = parseTarget(host, 1)
            self.assertEqual((target.ip, target.shortForm), (None, ipaddress.ip_address("127.0.0.1")), host)
        for host in ("08.0.0.1", "1.2.3.4.5", "4294967296", "1.256.0.0", "deadbeef", "0x7f.example"):
            target = parseTarget(host, 1)
            self.assertEqual((target.ip, target.shortForm), (None, None), host)
        self.assertEqual(parseTarget("0x", 1).shortForm, ipaddress.ip_address("0.0.0.0"), "as inet_aton reads it")

    def test_shortFormsAreNamesToAllowRulesAndAddressesToDenyRules(self) -> None:
        """
        tailscaled dials C{0x64400002} as a name (a node may be named so), libc as 100.64.0.2: an
        allow rule on the address or its node does not let it through, a deny rule stops it.
        """
        for allowed in ("100.64.0.2:*", "100.64.0.0/10:*", "tag:prod:*", "web.tail.ts.net:*"):
            rules = ruleSet({"allow": [allowed]})
            for host in ("0x64400002", "1681915906", "100.4194306", "0x64400002."):
                self.assertEqual(verdictOf(rules, host), (Verdict.DENY, "web#end"), (allowed, host))
        for denied in ("100.64.0.2:*", "100.64.0.0/10:*", "tag:prod:*"):
            rules = ruleSet({"deny": [denied]}, {"allow": ["*:*"]})
            self.assertEqual(verdictOf(rules, "0x64400002"), (Verdict.DENY, "web#1"), denied)
        rules = ruleSet({"deny": ["127.0.0.0/8:*"]}, {"allow": ["*:*"]})
        self.assertEqual(verdictOf(rules, "2130706433"), (Verdict.DENY, "web#1"))
        decision = rules.decide(ALICE, parseTarget("2130706433", 443), None)
        self.assertEqual((decision.verdict, decision.label), (Verdict.DENY, "web#1"), "without the view too")

    def test_bad(self) -> None:
        for port in (-1, 65536, True):
            self.assertRaises(RuleError, parseTarget, "web", port)

    def test_emptyHost(self) -> None:
        """Whatever a client sends is a target: an empty name is tied to no node, and only * matches it."""
        self.assertEqual(parseTarget(".", 1), Target("", 1))
        rules = ruleSet({"allow": ["tag:prod:*", "*.example.com:*"]}, {"allow": ["*:1"]})
        self.assertEqual(verdictOf(rules, "", 1), (Verdict.ALLOW, "web#2"))
        self.assertEqual(verdictOf(rules, "", 2), (Verdict.DENY, "web#end"))


class ParseRuleTests(SynchronousTestCase):
    def assertBad(self, table: Any, *fragments: str) -> None:
        error = self.assertRaises(RuleError, parseRule, table, 3)
        self.assertIn("rule #3", str(error))
        for fragment in fragments:
            self.assertIn(fragment, str(error))

    def test_rule(self) -> None:
        rule = parseRule({"allow": ["tag:prod:443", "web:*"], "callers": ["uid:1000"]}, 2)
        self.assertEqual((rule.index, rule.allow, len(rule.destinations)), (2, True, 2))
        self.assertEqual(rule.text, "allow tag:prod:443, web:* for uid:1000")
        rule = parseRule({"deny": ["*:25"]}, 1)
        self.assertEqual((rule.allow, rule.callers, rule.verb), (False, EVERYONE, "deny"))

    def test_bad(self) -> None:
        self.assertBad({"allow": ["*:*"], "deny": ["*:*"]}, "exactly one")
        self.assertBad({"callers": ["*"]}, "exactly one")
        self.assertBad({"allow": []}, "non-empty list")
        self.assertBad({"allow": "*:*"}, "non-empty list")
        self.assertBad({"allow": ["*:*"], "callers": []}, "non-empty list")
        self.assertBad({"allow": ["*:*"], "caller": ["*"]}, "unknown key caller")
        self.assertBad({"allow": ["web:0"]}, "web:0")
        self.assertBad({"allow": ["*:*"], "callers": ["user:no-such-user-for-tsmux"]}, "no-such-user-for-tsmux")
        self.assertBad(["allow"], "table")

    def test_ruleSet(self) -> None:
        rules = ruleSet({"allow": ["*:443"]}, {"deny": ["tag:prod:*"]})
        self.assertEqual(([r.index for r in rules.rules], rules.count, rules.socket), ([1, 2], 2, "web"))
        error = self.assertRaises(RuleError, parseRule, {"allow": ["x"]}, 2)
        self.assertIn("rule #2", str(error))

    def test_needsNetmap(self) -> None:
        self.assertFalse(ruleSet().needsNetmap)
        self.assertFalse(ruleSet({"allow": ["*:443"]}, {"deny": ["*:*"]}).needsNetmap)
        for destination in ("100.64.0.0/10:*", "web:*", "*.ts.net:*", "tag:prod:*", "alice@example.com:*"):
            self.assertTrue(ruleSet({"allow": ["*:443"]}, {"deny": [destination]}).needsNetmap, destination)


class TyingTests(SynchronousTestCase):
    def names(self, host: str) -> list[str]:
        peers = tiedPeers(parseTarget(host, 1), VIEW)
        assert peers is not None
        return sorted(peer.name for peer in peers)

    def test_ties(self) -> None:
        self.assertEqual(self.names("web.tail.ts.net"), ["web.tail.ts.net"])
        self.assertEqual(self.names("WEB"), ["web.tail.ts.net"])
        self.assertEqual(self.names("web-server"), ["web.tail.ts.net"])
        self.assertEqual(self.names("100.64.0.2"), ["web.tail.ts.net"])
        self.assertEqual(self.names("::ffff:100.64.0.2"), ["web.tail.ts.net"])
        self.assertEqual(self.names("fd7a:115c:a1e0::2"), ["web.tail.ts.net"])
        self.assertEqual(self.names("dev"), ["dev-1.tail.ts.net", "dev.tail.ts.net"])
        self.assertEqual(self.names("example.com"), [])
        self.assertIsNone(tiedPeers(parseTarget("web", 1), None))


class DecideTests(SynchronousTestCase):
    def test_openAndEnd(self) -> None:
        decision = ruleSet(socket="api").decide(None, parseTarget("anything", 1), None)
        self.assertEqual((decision.verdict, decision.label, decision.allowed), (Verdict.ALLOW, "api#open", True))
        self.assertEqual(
            ruleSet(socket="api").decide(ALICE, parseTarget("web", 1), VIEW).peers[0].name, "web.tail.ts.net"
        )
        decision = ruleSet({"allow": ["*:22"]}, socket="api").decide(ALICE, parseTarget("web", 443), VIEW)
        self.assertEqual((decision.verdict, decision.label, decision.allowed), (Verdict.DENY, "api#end", False))
        self.assertEqual(decision.reason, "no rule of socket api allows it")
        self.assertEqual([peer.name for peer in decision.peers], ["web.tail.ts.net"])

    def test_firstMatchWins(self) -> None:
        rules = ruleSet({"deny": ["tag:prod:22"]}, {"allow": ["tag:prod:*"]}, {"deny": ["*:*"]})
        self.assertEqual(verdictOf(rules, "web", 22), (Verdict.DENY, "web#1"))
        self.assertEqual(verdictOf(rules, "web", 443), (Verdict.ALLOW, "web#2"))
        self.assertEqual(verdictOf(rules, "laptop", 443), (Verdict.DENY, "web#3"))
        decision = rules.decide(ALICE, parseTarget("web", 22), VIEW)
        self.assertEqual(decision.reason, "rule web#1 denies tag:prod:22")
        self.assertEqual(rules.decide(ALICE, parseTarget("web", 443), VIEW).reason, "rule web#2 allows tag:prod:*")

    def test_callersNarrowARule(self) -> None:
        rules = ruleSet({"allow": ["*:*"], "callers": ["uid:1001"]}, {"allow": ["tag:prod:443"]})
        self.assertEqual(verdictOf(rules, "laptop", peer=BOB), (Verdict.ALLOW, "web#1"))
        self.assertEqual(verdictOf(rules, "laptop", peer=ALICE), (Verdict.DENY, "web#end"))
        self.assertEqual(verdictOf(rules, "web", peer=ALICE), (Verdict.ALLOW, "web#2"))
        self.assertEqual(verdictOf(rules, "laptop", peer=None), (Verdict.DENY, "web#end"))

    def test_groupCallers(self) -> None:
        rules = ruleSet({"allow": ["*:*"], "callers": ["gid:27"]})
        self.assertTrue(rules.decide(ALICE, parseTarget("x", 1), VIEW).allowed)
        self.assertFalse(rules.decide(BOB, parseTarget("x", 1), VIEW).allowed)

    def test_nameRuleByFullName(self) -> None:
        """A name rule matches the target's own text, or a tied node's full MagicDNS name."""
        rules = ruleSet({"allow": ["web.tail.ts.net:*"]})
        for host in ("web.tail.ts.net", "WEB.tail.ts.net.", "web", "100.64.0.2", "[fd7a:115c:a1e0::2]"):
            self.assertEqual(verdictOf(rules, host), (Verdict.ALLOW, "web#1"), host)
        self.assertEqual(verdictOf(rules, "db"), (Verdict.DENY, "web#end"))

    def test_hostNameTiesForDenyRulesOnly(self) -> None:
        """
        tailscaled's dial resolves a node's MagicDNS name (with or without the
        tailnet's suffix), never its host name, which the node's owner picks
        and DNS resolves: an allow rule cannot trust it, a deny rule takes it.
        """
        allow = ruleSet({"allow": ["web.tail.ts.net:*"]})
        self.assertEqual(verdictOf(allow, "Web-Server"), (Verdict.DENY, "web#end"))
        deny = ruleSet({"deny": ["web.tail.ts.net:*"]}, {"allow": ["*:*"]})
        self.assertEqual(verdictOf(deny, "Web-Server"), (Verdict.DENY, "web#1"))

    def test_shortNamesOnlyUnderTheTailnetsSuffix(self) -> None:
        status = dict(STATUS, MagicDNSSuffix="tail.ts.net")
        peers = dict(status["Peer"])
        peers["shared"] = node("other.elsewhere.ts.net.", "other", ["100.64.9.9"], 9, ["tag:prod"])
        status["Peer"] = peers
        view = NetmapView.fromStatus(status, 0.0)
        self.assertEqual([p.name for p in view.peersForName("web", dialable=True)], ["web.tail.ts.net"])
        self.assertEqual(view.peersForName("other", dialable=True), ())
        self.assertEqual([p.name for p in view.peersForName("other")], ["other.elsewhere.ts.net"])

    def test_shortNameRuleIsText(self) -> None:
        """A short name in a rule is compared with the target's text and full node names, which it is not."""
        rules = ruleSet({"allow": ["web:*"]})
        self.assertEqual(verdictOf(rules, "web"), (Verdict.ALLOW, "web#1"))
        self.assertEqual(verdictOf(rules, "web.tail.ts.net"), (Verdict.DENY, "web#end"))

    def test_ipv4Mapped(self) -> None:
        for destination in ("tag:prod:*", "100.64.0.0/10:*", "100.64.0.2:*", "web.tail.ts.net:*"):
            rules = ruleSet({"allow": [destination]})
            self.assertEqual(verdictOf(rules, "::ffff:100.64.0.2"), (Verdict.ALLOW, "web#1"), destination)

    def test_networks(self) -> None:
        rules = ruleSet({"allow": ["[fd7a:115c:a1e0::/48]:*"]})
        self.assertEqual(verdictOf(rules, "fd7a:115c:a1e0::99"), (Verdict.ALLOW, "web#1"))
        self.assertEqual(verdictOf(rules, "web"), (Verdict.ALLOW, "web#1"), "through the node's addresses")
        self.assertEqual(verdictOf(rules, "db"), (Verdict.DENY, "web#end"), "db has no IPv6 address")
        self.assertEqual(verdictOf(rules, "100.64.0.2"), (Verdict.DENY, "web#end"))
        rules = ruleSet({"allow": ["100.64.0.0/24:*"]})
        self.assertEqual(verdictOf(rules, "100.64.0.200"), (Verdict.ALLOW, "web#1"), "an address of no node")
        self.assertEqual(verdictOf(rules, "files"), (Verdict.DENY, "web#end"))

    def test_suffix(self) -> None:
        rules = ruleSet({"allow": ["*.example.com:*", "*.tail.ts.net:*"]})
        self.assertEqual(verdictOf(rules, "a.example.com"), (Verdict.ALLOW, "web#1"))
        self.assertEqual(verdictOf(rules, "a.b.EXAMPLE.com."), (Verdict.ALLOW, "web#1"))
        self.assertEqual(verdictOf(rules, "example.com"), (Verdict.DENY, "web#end"), "not the suffix itself")
        self.assertEqual(verdictOf(rules, "badexample.com"), (Verdict.DENY, "web#end"))
        self.assertEqual(verdictOf(rules, "tail.ts.net"), (Verdict.DENY, "web#end"))
        self.assertEqual(verdictOf(rules, "100.64.0.3"), (Verdict.ALLOW, "web#1"), "through the node's name")
        self.assertEqual(verdictOf(rules, "files"), (Verdict.DENY, "web#end"))

    def test_tagsAndLogins(self) -> None:
        rules = ruleSet({"allow": ["tag:db:*"]}, {"allow": ["ALICE@example.com:*"]}, {"allow": ["bob@example.com:22"]})
        self.assertEqual(verdictOf(rules, "db"), (Verdict.ALLOW, "web#1"))
        self.assertEqual(verdictOf(rules, "laptop"), (Verdict.ALLOW, "web#2"))
        self.assertEqual(verdictOf(rules, "100.64.0.1"), (Verdict.ALLOW, "web#2"), "this node is alice's")
        self.assertEqual(verdictOf(rules, "files", 22), (Verdict.ALLOW, "web#3"))
        self.assertEqual(verdictOf(rules, "files", 443), (Verdict.DENY, "web#end"))
        self.assertEqual(verdictOf(rules, "web"), (Verdict.DENY, "web#end"))

    def test_nameOfNoNode(self) -> None:
        """tsmux never asks DNS: a name no node has matches only its own name and suffix rules, and *."""
        rules = ruleSet({"allow": ["tag:prod:*", "100.64.0.0/10:*", "alice@example.com:*"]}, {"deny": ["*:*"]})
        self.assertEqual(verdictOf(rules, "example.com"), (Verdict.DENY, "web#2"))
        rules = ruleSet({"allow": ["example.com:*"]}, {"deny": ["*:*"]})
        self.assertEqual(verdictOf(rules, "example.com"), (Verdict.ALLOW, "web#1"))

    def test_ambiguousNames(self) -> None:
        """C{dev} is two nodes: an allow needs both to match, a deny either."""
        self.assertEqual(verdictOf(ruleSet({"allow": ["tag:prod:*"]}), "dev"), (Verdict.DENY, "web#end"))
        self.assertEqual(verdictOf(ruleSet({"allow": ["tag:dev:*"]}), "dev"), (Verdict.ALLOW, "web#1"))
        rules = ruleSet({"deny": ["tag:prod:*"]}, {"allow": ["*:*"]})
        self.assertEqual(verdictOf(rules, "dev"), (Verdict.DENY, "web#1"))
        self.assertEqual(verdictOf(rules, "dev.tail.ts.net"), (Verdict.ALLOW, "web#2"), "the full name is one node")
        self.assertEqual(verdictOf(ruleSet({"allow": ["dev:*"]}), "dev"), (Verdict.ALLOW, "web#1"), "its own text")
        decision = rules.decide(ALICE, parseTarget("dev", 1), VIEW)
        self.assertEqual(sorted(peer.name for peer in decision.peers), ["dev-1.tail.ts.net", "dev.tail.ts.net"])

    def test_portsFirst(self) -> None:
        """A destination whose ports do not match is not looked at further: no view needed."""
        rules = ruleSet({"deny": ["tag:prod:22"]}, {"allow": ["*:*"]})
        decision = rules.decide(ALICE, parseTarget("web", 443), None)
        self.assertEqual((decision.verdict, decision.label), (Verdict.ALLOW, "web#2"))

    def test_missingView(self) -> None:
        rules = ruleSet({"allow": ["*:22"]}, {"allow": ["tag:prod:*"]}, {"allow": ["*:*"]})
        decision = rules.decide(ALICE, parseTarget("web", 22), None)
        self.assertEqual((decision.verdict, decision.label), (Verdict.ALLOW, "web#1"), "decided by *")
        decision = rules.decide(ALICE, parseTarget("web", 443), None, whyNoView="no answer from tailscaled yet")
        self.assertEqual((decision.verdict, decision.label, decision.allowed), (Verdict.NO_NETMAP, "web#2", False))
        self.assertEqual(
            decision.reason, "rule web#2 needs the tailnet view, which is missing: no answer from tailscaled yet"
        )
        self.assertEqual(decision.peers, ())
        self.assertEqual(
            rules.decide(ALICE, parseTarget("web", 443), None).reason,
            "rule web#2 needs the tailnet view, which is missing",
        )

    def test_missingViewByOwnText(self) -> None:
        """A name or suffix rule that the target's own text matches, or an IP against a network, needs no view."""
        rules = ruleSet({"allow": ["web:*", "*.example.com:*", "100.64.0.0/10:*"]}, {"deny": ["*:*"]})
        for host in ("web", "a.example.com", "100.64.0.9"):
            self.assertEqual(rules.decide(ALICE, parseTarget(host, 1), None).verdict, Verdict.ALLOW, host)
        for host in ("db", "100.64.0.0.example.org", "8.8.8.8"):
            decision = rules.decide(ALICE, parseTarget(host, 1), None)
            self.assertEqual((decision.verdict, decision.label), (Verdict.NO_NETMAP, "web#1"), host)
        rules = ruleSet({"allow": ["100.64.0.0/10:*"]}, {"deny": ["*:*"]})
        self.assertEqual(rules.decide(ALICE, parseTarget("8.8.8.8", 1), None).label, "web#2", "an IP outside it")

    def test_missingViewAnyDestinationMatching(self) -> None:
        """Within a rule, one destination that matches decides even when another could not be told."""
        rules = ruleSet({"allow": ["tag:prod:*", "*:443"]})
        self.assertEqual(rules.decide(ALICE, parseTarget("web", 443), None).verdict, Verdict.ALLOW)
        self.assertEqual(rules.decide(ALICE, parseTarget("web", 22), None).verdict, Verdict.NO_NETMAP)

    def test_missingViewSkippedRule(self) -> None:
        """A rule for other callers is not consulted, so it cannot need the view."""
        rules = ruleSet({"deny": ["tag:prod:*"], "callers": ["uid:1001"]}, {"allow": ["*:*"]})
        self.assertEqual(rules.decide(ALICE, parseTarget("web", 1), None).verdict, Verdict.ALLOW)
        self.assertEqual(rules.decide(BOB, parseTarget("web", 1), None).verdict, Verdict.NO_NETMAP)
        self.assertEqual(rules.decide(None, parseTarget("web", 1), None).verdict, Verdict.ALLOW)

    def test_portsFirstThenTheView(self) -> None:
        """A destination whose port does not match needs no view; one whose port matches asks the view."""
        allow = ruleSet({"allow": ["tag:prod:443"]})
        self.assertEqual(allow.decide(ALICE, parseTarget("web", 443), None).verdict, Verdict.NO_NETMAP)
        self.assertEqual(allow.decide(ALICE, parseTarget("web", 22), None).label, "web#end")
        self.assertEqual(verdictOf(allow, "web", 443), (Verdict.ALLOW, "web#1"))


TEXT_ALPHABET = st.sampled_from(list("0123456789abcdefxABCDEFX.:/[]*@-_,%tagroupsuerid \x00é٣"))
HOSTS = [
    "web", "WEB.tail.ts.net.", "dev", "db", "files", "example.com", "a.example.com", "100.64.0.2", "100.64.0.200",
    "::ffff:100.64.0.3", "fd7a:115c:a1e0::2", "8.8.8.8", "laptop", "me", "2130706433",
]  # fmt: skip
DESTINATIONS = [
    "*:*", "*:22", "web:*", "web.tail.ts.net:443", "*.tail.ts.net:*", "*.example.com:22", "tag:prod:*", "tag:dev:443",
    "alice@example.com:*", "100.64.0.0/10:*", "[fd7a:115c:a1e0::/48]:443", "8.8.8.8:*", "example.com:*",
]  # fmt: skip
TABLES = st.lists(
    st.builds(
        lambda verb, destinations: {verb: destinations},
        st.sampled_from(["allow", "deny"]),
        st.lists(st.sampled_from(DESTINATIONS), min_size=1, max_size=3),
    ),
    max_size=5,
)


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.one_of(st.text(), st.text(TEXT_ALPHABET)))
    def test_parseDestination(self, text: str) -> None:
        try:
            destination = parseDestination(text)
        except RuleError:
            return
        self.assertEqual(destination.text, text)

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.text(),
            st.text(TEXT_ALPHABET),
            st.builds(lambda p, t: p + t, st.sampled_from(["uid:", "gid:", "user:", "group:"]), st.text()),
        )
    )
    def test_parseCaller(self, text: str) -> None:
        try:
            parseCaller(text)
        except RuleError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.lists(st.text(TEXT_ALPHABET)), st.text(), st.none(), st.integers(), st.lists(st.integers())))
    def test_parseCallers(self, values: Any) -> None:
        try:
            parseCallers(values)
        except RuleError:
            pass

    @settings(max_examples=500, deadline=None)
    @given(st.one_of(st.text(), st.text(TEXT_ALPHABET)), st.integers(-5, 70000))
    def test_parseTarget(self, host: str, port: int) -> None:
        try:
            target = parseTarget(host, port)
        except RuleError:
            return
        self.assertEqual(target.port, port)
        if isinstance(target.ip, ipaddress.IPv6Address):
            self.assertIsNone(target.ip.ipv4_mapped)

    @settings(max_examples=300, deadline=None)
    @given(TABLES, st.sampled_from(HOSTS), st.sampled_from([22, 443, 8080]))
    def test_viewNeverChangesWhatWasDecidedWithout(self, tables: list[dict[str, Any]], host: str, port: int) -> None:
        """A decision reached without the view (not NO_NETMAP) is the same with it."""
        rules = ruleSet(*tables)
        target = parseTarget(host, port)
        without = rules.decide(ALICE, target, None)
        if without.verdict is not Verdict.NO_NETMAP:
            withView = rules.decide(ALICE, target, VIEW)
            self.assertEqual((withView.verdict, withView.label), (without.verdict, without.label))
