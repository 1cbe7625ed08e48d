"""
The tailnet as tailscaled sees it, for access rules written in tailnet terms.

L{NetmapView} is one answer of tailscaled's C{GET /localapi/v0/status},
reduced to what rules need (each node's MagicDNS name, host name,
addresses, ACL tags and owner) and indexed once, so that tying a
connection's target to nodes costs a dictionary lookup.  L{NetmapWatcher}
keeps a fresh one by asking again every few seconds, and says when it has
none that can be trusted: a rule that needs the view then fails closed
(see L{tsmux._rules}).

Everything in the status answer comes from tailscaled: nothing here is
client text.  The answer is read defensively all the same (a field of the
wrong type counts as missing), since its shape changes between releases.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_ERROR_TEXT_LIMIT = 300
"""An error body from tailscaled can be long; logs and reasons keep its start."""

_ID_LIMIT = 2**64
"""User ids are 64-bit: anything larger is not one (and its text would be costly to make)."""


@dataclass(frozen=True, slots=True)
class Peer:
    """
    One node of the tailnet (this one too, with C{isSelf}).

    @ivar name: the MagicDNS name (C{DNSName}), lowercased, without the
        trailing dot; C{""} when tailscaled gave none.
    @ivar hostName: the node's own host name, lowercased.
    @ivar addresses: its Tailscale addresses (C{TailscaleIPs}).
    @ivar tags: its ACL tags (C{"tag:prod"}), lowercased: rules compare
        them without case, as they do names and logins.
    @ivar login: its owner's login name (C{LoginName}), lowercased, or
        C{None} when the status did not say.
    """

    name: str
    hostName: str
    addresses: tuple[IPAddress, ...]
    tags: frozenset[str]
    login: str | None
    isSelf: bool = False

    def describe(self) -> str:
        """A short text for people: name, addresses, tags, owner."""
        label = self.name or self.hostName or "(unnamed node)"
        details = [", ".join(str(address) for address in self.addresses) or "no addresses"]
        if self.tags:
            details.append(" ".join(sorted(self.tags)))
        if self.login is not None:
            details.append(f"owner {self.login}")
        if self.isSelf:
            details.append("this node")
        return f"{label} ({'; '.join(details)})"


def normalIP(address: IPAddress) -> IPAddress:
    """The form addresses are compared in: an IPv4-mapped IPv6 address is its IPv4 address; no zone."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(int(address))
    return address


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _peerFrom(entry: Any, logins: Mapping[str, str], isSelf: bool) -> Peer | None:
    """One status entry as a L{Peer}; C{None} for an entry that is not an object at all."""
    if not isinstance(entry, Mapping):
        return None
    name = _text(entry.get("DNSName")).lower()
    if name.endswith("."):
        name = name[:-1]
    addresses: list[IPAddress] = []
    rawAddresses = entry.get("TailscaleIPs")
    if isinstance(rawAddresses, list):
        for raw in rawAddresses:
            if isinstance(raw, str):
                try:
                    address = normalIP(ipaddress.ip_address(raw))
                except ValueError:
                    continue
                if address not in addresses:
                    addresses.append(address)
    rawTags = entry.get("Tags")
    tags = frozenset(t.lower() for t in rawTags if isinstance(t, str)) if isinstance(rawTags, list) else frozenset()
    userID = entry.get("UserID")
    login = None
    if isinstance(userID, int) and not isinstance(userID, bool) and -_ID_LIMIT < userID < _ID_LIMIT:
        login = logins.get(str(userID))
    return Peer(name, _text(entry.get("HostName")).lower(), tuple(addresses), tags, login, isSelf)


class NetmapView:
    """
    One answer of tailscaled's status, indexed by address and by name.

    @ivar peers: every node, this one first when the status named it.
    @ivar fetchedAt: when the answer arrived (the watcher's clock).
    """

    __slots__ = ("peers", "fetchedAt", "_byIP", "_byName", "_byDialName")

    def __init__(self, peers: Iterable[Peer], fetchedAt: float, magicDNSSuffix: str = "") -> None:
        """
        @param magicDNSSuffix: the tailnet's MagicDNS suffix (C{Status.MagicDNSSuffix}):
            a node's name without it is a name tailscaled itself resolves to
            that node.  Unknown (C{""}): every node's first label counts.
        """
        self.peers = tuple(peers)
        self.fetchedAt = fetchedAt
        suffix = "." + magicDNSSuffix.lower().strip(".") if magicDNSSuffix.strip(".") else ""
        byIP: dict[IPAddress, list[Peer]] = {}
        byName: dict[str, list[Peer]] = {}
        byDialName: dict[str, list[Peer]] = {}
        for peer in self.peers:
            for address in peer.addresses:
                byIP.setdefault(normalIP(address), []).append(peer)
            firstLabel = peer.name.split(".", 1)[0]
            # What tailscaled's own dial resolves to this node (its DNS map: the MagicDNS name, and
            # that name without the tailnet's suffix); HostName is the owner's to choose, and
            # tailscaled sends it to the system's resolver like any other name.
            dialNames: set[str]
            if not peer.addresses:
                dialNames = set()  # tailscaled maps no name to a node without an address
            elif not suffix:
                dialNames = {peer.name, firstLabel}
            elif peer.name.endswith(suffix):
                dialNames = {peer.name, peer.name[: -len(suffix)]}
            else:
                dialNames = {peer.name}
            for key, index in (({peer.name, firstLabel, peer.hostName}, byName), (dialNames, byDialName)):
                key.discard("")
                for name in key:
                    index.setdefault(name, []).append(peer)
        self._byIP = {address: tuple(found) for address, found in byIP.items()}
        self._byName = {name: tuple(found) for name, found in byName.items()}
        self._byDialName = {name: tuple(found) for name, found in byDialName.items()}

    @classmethod
    def fromStatus(cls, status: Mapping[str, Any], fetchedAt: float) -> NetmapView:
        """
        Read tailscaled's C{GET /localapi/v0/status} answer.  Entries that are
        not objects are skipped and fields of the wrong type count as
        missing: only an answer that is not an object at all is refused.

        @raise ValueError: C{status} is not a JSON object.
        """
        if not isinstance(status, Mapping):
            raise ValueError(f"tailscaled's status is not a JSON object but {type(status).__name__}")
        logins: dict[str, str] = {}
        users = status.get("User")
        if isinstance(users, Mapping):
            for userID, user in users.items():
                if isinstance(userID, str) and isinstance(user, Mapping):
                    login = user.get("LoginName")
                    if isinstance(login, str) and login:
                        logins[userID] = login.lower()
        peers: list[Peer] = []
        me = _peerFrom(status.get("Self"), logins, isSelf=True)
        if me is not None:
            peers.append(me)
        others = status.get("Peer")
        if isinstance(others, Mapping):
            for entry in others.values():
                peer = _peerFrom(entry, logins, isSelf=False)
                if peer is not None:
                    peers.append(peer)
        suffix = status.get("MagicDNSSuffix")
        if not isinstance(suffix, str) or not suffix:
            tailnet = status.get("CurrentTailnet")
            suffix = tailnet.get("MagicDNSSuffix") if isinstance(tailnet, Mapping) else None
        return cls(peers, fetchedAt, suffix if isinstance(suffix, str) else "")

    def peersForIP(self, ip: IPAddress) -> tuple[Peer, ...]:
        """The nodes holding C{ip} (an IPv4-mapped IPv6 address counts as its IPv4 address)."""
        return self._byIP.get(normalIP(ip), ())

    def peersForName(self, name: str, dialable: bool = False) -> tuple[Peer, ...]:
        """
        The nodes C{name} is tied to: it is a node's full MagicDNS name, its
        first label, or its host name.  A short name can be several nodes'.

        @param dialable: only the nodes tailscaled's own dial would reach by
            this name (its MagicDNS name, with or without the tailnet's
            suffix): what an allow rule may trust.  A host name is chosen by
            the node's owner and resolved by DNS, so it ties a target for
            deny rules only.
        """
        key = name.lower()
        if key.endswith("."):
            key = key[:-1]
        return (self._byDialName if dialable else self._byName).get(key, ())


class _StatusSource(Protocol):
    def status(self) -> Coroutine[Any, Any, Any]: ...


def statusFetcher(client: _StatusSource) -> Callable[[], Deferred[Any]]:
    """A L{NetmapWatcher} fetcher on a L{tsmux._localapi.LocalAPIClient}."""

    def fetch() -> Deferred[Any]:
        return Deferred.fromCoroutine(client.status())

    return fetch


def _describeFailure(failure: Failure) -> str:
    message = failure.getErrorMessage()
    name = failure.type.__name__ if isinstance(failure.type, type) else "error"
    text = f"{name}: {message}" if message else name
    return text if len(text) <= _ERROR_TEXT_LIMIT else text[:_ERROR_TEXT_LIMIT] + "…"


class NetmapWatcher:
    """
    Keeps a fresh L{NetmapView}: asks tailscaled's status now and every
    C{interval} seconds (never twice at once), and trusts an answer for
    C{maxAge} seconds.  Failures are logged once when they start and once
    when they end, not on every attempt.

    @ivar lastError: why the last attempt failed, or C{None} after a success.
    @ivar lastView: the last good view, however old.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        fetchStatus: Callable[[], Deferred[Any]],
        interval: float = 4.0,
        maxAge: float = 30.0,
    ) -> None:
        self._clock = clock
        self._fetchStatus = fetchStatus
        self.interval = interval
        self.maxAge = maxAge
        self.lastView: NetmapView | None = None
        self.lastError: str | None = None
        self._failing = False
        self._pending: Deferred[Any] | None = None
        self._pendingSince = 0.0
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        """Fetch now, then every C{interval} seconds until L{stop}."""
        if self._loop is not None:
            return
        loop = LoopingCall(self._tick)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self.interval, now=True).addErrback(
            lambda failure: self.log.failure("The tailnet view's refresh stopped", failure)
        )

    def stop(self) -> None:
        """Stop refreshing, and give up the fetch in flight (the last view stays)."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def current(self) -> NetmapView | None:
        """The view to decide with, or C{None} when there is none younger than C{maxAge}."""
        view = self.lastView
        if view is None or self._clock.seconds() - view.fetchedAt > self.maxAge:
            return None
        return view

    def whyNone(self) -> str:
        """Why L{current} is C{None}, for people (C{""} when it is not)."""
        now = self._clock.seconds()
        view = self.lastView
        if view is None:
            why = "no answer from tailscaled's status yet"
        elif now - view.fetchedAt > self.maxAge:
            why = f"the last good view is {now - view.fetchedAt:.0f} s old"
        else:
            return ""
        if self.lastError is not None:
            why += f"; last error: {self.lastError}"
        elif self._pending is not None and now - self._pendingSince >= self.interval:
            why += f"; a status request has been waiting for {now - self._pendingSince:.0f} s"
        return why

    def _tick(self) -> None:
        if self._pending is not None:
            return  # the last request is still out: one at a time
        try:
            pending = self._fetchStatus()
        except Exception:
            self._failed(Failure(), None)
            return
        self._pending = pending
        self._pendingSince = self._clock.seconds()
        pending.addCallbacks(self._answered, self._failed, callbackArgs=(pending,), errbackArgs=(pending,))

    def _answered(self, status: Any, pending: Deferred[Any]) -> None:
        if pending is not self._pending:
            return  # given up by stop()
        self._pending = None
        try:
            view = NetmapView.fromStatus(status, self._clock.seconds())
        except ValueError:
            self._failed(Failure(), None)
            return
        self.lastView = view
        self.lastError = None
        if self._failing:
            self._failing = False
            self.log.info("tailscaled's status answers again: the tailnet view is fresh")

    def _failed(self, failure: Failure, pending: Deferred[Any] | None) -> None:
        if pending is not None:
            if pending is not self._pending:
                return  # given up by stop()
            self._pending = None
        self.lastError = _describeFailure(failure)
        if not self._failing:
            self._failing = True
            self.log.warn(
                "cannot get tailscaled's status ({error}); rules that need the tailnet view deny connections "
                "once the last good view is {maxAge:g} s old, until it answers again",
                error=self.lastError,
                maxAge=self.maxAge,
            )
