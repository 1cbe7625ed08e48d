"""
The tailnet view: reading tailscaled's status defensively, tying names and
addresses to nodes, and a watcher that keeps the view fresh on a fake clock
and says once, not every few seconds, when it cannot.
"""

from __future__ import annotations

import ipaddress
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tsmux._netmap import NetmapView, NetmapWatcher, Peer, statusFetcher

STATUS: dict[str, Any] = {
    "Self": {
        "DNSName": "Me.Tail.ts.net.",
        "HostName": "ME",
        "TailscaleIPs": ["100.64.0.1", "fd7a:115c:a1e0::1"],
        "UserID": 1,
    },
    "Peer": {
        "nodekey:web": {
            "DNSName": "web.tail.ts.net.",
            "HostName": "Web-Server",
            "TailscaleIPs": ["100.64.0.2", "fd7a:115c:a1e0::2"],
            "Tags": ["tag:prod", "tag:Web"],
            "UserID": 9,
        },
        "nodekey:dev": {"DNSName": "dev.tail.ts.net.", "HostName": "dev", "TailscaleIPs": ["100.64.0.5"], "UserID": 1},
        "nodekey:dev1": {"DNSName": "dev-1.tail.ts.net.", "HostName": "dev", "TailscaleIPs": ["100.64.0.6"]},
    },
    "User": {"1": {"LoginName": "Alice@Example.com"}, "9": {"LoginName": "tagged-devices"}},
}


def names(peers: tuple[Peer, ...]) -> list[str]:
    return sorted(peer.name for peer in peers)


class NetmapViewTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.view = NetmapView.fromStatus(STATUS, fetchedAt=12.5)

    def test_peers(self) -> None:
        me, web = self.view.peers[0], self.view.peers[1]
        self.assertEqual(self.view.fetchedAt, 12.5)
        self.assertEqual(len(self.view.peers), 4)
        self.assertEqual(
            me,
            Peer(
                "me.tail.ts.net",
                "me",
                (ipaddress.ip_address("100.64.0.1"), ipaddress.ip_address("fd7a:115c:a1e0::1")),
                frozenset(),
                "alice@example.com",
                isSelf=True,
            ),
        )
        self.assertEqual(
            (web.hostName, web.tags, web.login, web.isSelf),
            ("web-server", {"tag:prod", "tag:web"}, "tagged-devices", False),
        )
        self.assertIsNone(self.view.peers[3].login, "no UserID")

    def test_peersForName(self) -> None:
        for name in ("web.tail.ts.net", "WEB.tail.ts.net.", "web", "web-server", "Web-Server"):
            self.assertEqual(names(self.view.peersForName(name)), ["web.tail.ts.net"], name)
        self.assertEqual(names(self.view.peersForName("me")), ["me.tail.ts.net"])
        self.assertEqual(names(self.view.peersForName("dev")), ["dev-1.tail.ts.net", "dev.tail.ts.net"])
        self.assertEqual(names(self.view.peersForName("dev-1")), ["dev-1.tail.ts.net"])
        for name in ("tail.ts.net", "ts.net", "", "web.tail", "example.com"):
            self.assertEqual(self.view.peersForName(name), (), name)

    def test_peersForIP(self) -> None:
        for address in ("100.64.0.2", "::ffff:100.64.0.2", "fd7a:115c:a1e0::2"):
            self.assertEqual(names(self.view.peersForIP(ipaddress.ip_address(address))), ["web.tail.ts.net"], address)
        self.assertEqual(self.view.peersForIP(ipaddress.ip_address("100.64.0.99")), ())

    def test_describe(self) -> None:
        web = self.view.peersForName("web")[0]
        self.assertEqual(
            web.describe(),
            "web.tail.ts.net (100.64.0.2, fd7a:115c:a1e0::2; tag:prod tag:web; owner tagged-devices)",
        )
        self.assertIn("this node", self.view.peers[0].describe())
        self.assertEqual(Peer("", "", (), frozenset(), None).describe(), "(unnamed node) (no addresses)")
        self.assertEqual(Peer("", "box", (), frozenset(), None).describe(), "box (no addresses)")

    def test_missingParts(self) -> None:
        """A logged-out tailscaled has no peers, users or even Self addresses: still a view."""
        for status in ({}, {"Self": None, "Peer": None, "User": None}, {"BackendState": "NeedsLogin"}):
            self.assertEqual(NetmapView.fromStatus(status, 0.0).peers, ())
        view = NetmapView.fromStatus({"Self": {"TailscaleIPs": None, "Tags": None}}, 0.0)
        self.assertEqual(view.peers, (Peer("", "", (), frozenset(), None, isSelf=True),))

    def test_malformedEntries(self) -> None:
        status = {
            "Self": "me",
            "Peer": {
                "a": None,
                "b": ["100.64.0.9"],
                "c": {
                    "DNSName": 5,
                    "HostName": ["x"],
                    "TailscaleIPs": ["100.64.0.3", "not an address", 7, None, "100.64.0.3", "::ffff:100.64.0.4"],
                    "Tags": ["tag:ok", 3, None],
                    "UserID": "1",
                },
                "d": {"DNSName": "d.tail.ts.net.", "UserID": True},
                "e": {"DNSName": "e.tail.ts.net.", "UserID": 2**70},
            },
            "User": {"1": "alice", "2": {"LoginName": 5}},
        }
        view = NetmapView.fromStatus(status, 0.0)
        self.assertEqual(len(view.peers), 3)
        c = view.peers[0]
        self.assertEqual((c.name, c.hostName, c.tags, c.login), ("", "", {"tag:ok"}, None))
        self.assertEqual(c.addresses, (ipaddress.ip_address("100.64.0.3"), ipaddress.ip_address("100.64.0.4")))
        self.assertEqual([peer.login for peer in view.peers], [None, None, None])

    def test_notAnObject(self) -> None:
        notObjects: list[Any] = [[], None, "status", 5]
        for status in notObjects:
            self.assertRaises(ValueError, NetmapView.fromStatus, status, 0.0)

    @settings(max_examples=200, deadline=None)
    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
            lambda children: st.lists(children) | st.dictionaries(st.text(), children),
            max_leaves=20,
        )
    )
    def test_anyJSON(self, status: Any) -> None:
        try:
            NetmapView.fromStatus(status, 0.0)
        except ValueError:
            self.assertNotIsInstance(status, dict)

    @settings(max_examples=200, deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from(["Self", "Peer", "User", "Other"]),
            st.recursive(
                st.none() | st.integers() | st.text() | st.sampled_from(["100.64.0.1", "fd7a::1", "::ffff:1.2.3.4"]),
                lambda children: (
                    st.lists(children, max_size=4)
                    | st.dictionaries(
                        st.sampled_from(
                            ["DNSName", "HostName", "TailscaleIPs", "Tags", "UserID", "LoginName", "1", "k"]
                        ),
                        children,
                        max_size=6,
                    )
                ),
                max_leaves=25,
            ),
        )
    )
    def test_statusShapedJunk(self, status: dict[str, Any]) -> None:
        """Fields of every wrong type where tailscaled puts them: never an exception, indexes that agree."""
        view = NetmapView.fromStatus(status, 0.0)
        for peer in view.peers:
            for address in peer.addresses:
                self.assertIn(peer, view.peersForIP(address))
            if peer.name:
                self.assertIn(peer, view.peersForName(peer.name))


class FakeFetcher:
    """Hands out Deferreds that the test fires."""

    def __init__(self) -> None:
        self.calls: list[Deferred[Any]] = []
        self.cancelled: list[Deferred[Any]] = []

    def __call__(self) -> Deferred[Any]:
        self.calls.append(Deferred(self.cancelled.append))
        return self.calls[-1]


class FakeClient:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def status(self) -> Any:
        return self.answer


class NetmapWatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fetcher = FakeFetcher()
        self.watcher = NetmapWatcher(self.clock, self.fetcher, interval=4.0, maxAge=30.0)
        self.addCleanup(self.watcher.stop)
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def logged(self) -> list[tuple[str, str]]:
        return [
            (event["log_level"].name, event["log_format"])
            for event in self.events
            if event.get("log_namespace") == "tsmux._netmap.NetmapWatcher"
        ]

    def test_fetchesNowThenEveryInterval(self) -> None:
        self.assertIsNone(self.watcher.current())
        self.watcher.start()
        self.assertEqual(len(self.fetcher.calls), 1)
        self.assertIsNone(self.watcher.current())
        self.assertEqual(self.watcher.whyNone(), "no answer from tailscaled's status yet")
        self.clock.advance(1)
        self.fetcher.calls[0].callback(STATUS)
        view = self.watcher.current()
        assert view is not None
        self.assertEqual((len(view.peers), view.fetchedAt), (4, 1.0))
        self.assertEqual(self.watcher.whyNone(), "")
        self.clock.advance(3)
        self.assertEqual(len(self.fetcher.calls), 2)
        self.fetcher.calls[1].callback({"Self": None})
        self.assertEqual(self.watcher.current(), self.watcher.lastView)
        self.assertEqual(cast(NetmapView, self.watcher.current()).peers, ())

    def test_startTwice(self) -> None:
        self.watcher.start()
        self.watcher.start()
        self.assertEqual(len(self.fetcher.calls), 1)

    def test_noDoubleFetch(self) -> None:
        """A request still out is not doubled, however many intervals pass."""
        self.watcher.start()
        self.clock.pump([4.0] * 5)
        self.assertEqual(len(self.fetcher.calls), 1)
        self.assertIn("a status request has been waiting for 20 s", self.watcher.whyNone())
        self.fetcher.calls[0].callback(STATUS)
        self.assertEqual(len(self.fetcher.calls), 1)
        self.clock.advance(4)
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_maxAge(self) -> None:
        self.watcher.start()
        self.fetcher.calls[0].callback(STATUS)
        for _ in range(7):
            self.clock.advance(4)
            self.fetcher.calls[-1].errback(ConnectionRefusedError("tailscaled is gone"))
        self.assertIsNotNone(self.watcher.current(), "28 s old: still good")
        self.clock.advance(3)
        self.assertIsNone(self.watcher.current())
        self.assertEqual(
            self.watcher.whyNone(),
            "the last good view is 31 s old; last error: ConnectionRefusedError: tailscaled is gone",
        )
        self.assertIsNotNone(self.watcher.lastView)
        self.clock.advance(1)
        self.fetcher.calls[-1].callback(STATUS)
        self.assertIsNotNone(self.watcher.current())
        self.assertIsNone(self.watcher.lastError)

    def test_failuresLoggedOnce(self) -> None:
        self.watcher.start()
        for _ in range(3):
            self.fetcher.calls[-1].errback(ConnectionRefusedError("no"))
            self.clock.advance(4)
        self.assertEqual([level for level, _ in self.logged()], ["warn"])
        self.assertEqual(self.watcher.lastError, "ConnectionRefusedError: no")
        warning = [e for e in self.events if e.get("log_namespace") == "tsmux._netmap.NetmapWatcher"][0]
        self.assertEqual(warning["error"], "ConnectionRefusedError: no")
        self.fetcher.calls[-1].callback(STATUS)
        self.clock.advance(4)
        self.fetcher.calls[-1].callback(STATUS)
        self.assertEqual([level for level, _ in self.logged()], ["warn", "info"])
        self.clock.advance(4)
        self.fetcher.calls[-1].errback(ConnectionRefusedError("again"))
        self.assertEqual([level for level, _ in self.logged()], ["warn", "info", "warn"])

    def test_badAnswer(self) -> None:
        """An answer that is not a status object is a failure like any other."""
        self.watcher.start()
        self.fetcher.calls[0].callback(["not", "a", "status"])
        self.assertIsNone(self.watcher.current())
        self.assertIn("ValueError: tailscaled's status is not a JSON object", self.watcher.whyNone())
        self.assertEqual([level for level, _ in self.logged()], ["warn"])

    def test_fetcherRaises(self) -> None:
        def broken() -> Deferred[Any]:
            raise OSError("no socket")

        watcher = NetmapWatcher(self.clock, broken)
        watcher.start()
        self.addCleanup(watcher.stop)
        self.assertEqual(watcher.lastError, "OSError: no socket")
        self.clock.advance(4)
        self.assertEqual(watcher.whyNone(), "no answer from tailscaled's status yet; last error: OSError: no socket")
        self.assertEqual([level for level, _ in self.logged()], ["warn"])

    def test_longErrorsShortened(self) -> None:
        self.watcher.start()
        self.fetcher.calls[0].errback(RuntimeError("x" * 5000))
        self.assertLess(len(cast(str, self.watcher.lastError)), 400)

    def test_stop(self) -> None:
        """Stopping gives up the request in flight, quietly, and fetches no more."""
        self.watcher.start()
        self.watcher.stop()
        self.assertEqual(self.fetcher.cancelled, self.fetcher.calls)
        self.clock.advance(40)
        self.assertEqual(len(self.fetcher.calls), 1)
        self.assertEqual(self.logged(), [])
        self.assertIsNone(self.watcher.lastError)
        self.watcher.stop()

    def test_stopThenStart(self) -> None:
        self.watcher.start()
        self.fetcher.calls[0].callback(STATUS)
        self.watcher.stop()
        self.watcher.start()
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_statusFetcher(self) -> None:
        results: list[Any] = []
        statusFetcher(FakeClient(STATUS))().addCallback(results.append)
        self.assertEqual(results, [STATUS])
        watcher = NetmapWatcher(self.clock, statusFetcher(FakeClient(STATUS)))
        watcher.start()
        self.addCleanup(watcher.stop)
        self.assertEqual(len(cast(NetmapView, watcher.current()).peers), 4)
