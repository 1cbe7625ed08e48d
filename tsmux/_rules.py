"""
Access rules in tailnet terms: which local callers may reach which
destinations through a socket.

A socket's rules are tried in order and the first that applies decides; a
rule applies when its callers include the caller and one of its
destinations matches the target.  A socket without rules lets everything
through (C{SOCKET#open}); a target no rule matched is refused
(C{SOCKET#end}).

Callers are local users and groups (C{*}, C{uid:N}, C{gid:N}, C{user:NAME},
C{group:NAME}), from the kernel's peer credentials.  Destinations are
C{HOST:PORTS}, where HOST is C{*}, an IP address or network (IPv6 in
brackets), a DNS name, C{*.suffix}, an ACL tag (C{tag:prod}) or a tailnet
login (C{alice@example.com}).

Names, tags and logins are tailnet facts: a target is I{tied} to the nodes
it designates in tailscaled's status (L{tsmux._netmap.NetmapView}): an IP
target to the nodes holding that address, a name target to the nodes
whose MagicDNS name, its first label or whose host name it is.  tsmux
never asks DNS: a name tied to no node matches only name and suffix rules
by its own text, and C{*}.

Two choices keep this conservative both ways:

  - A target tied to several nodes (a short name that two nodes share)
    matches an allow rule through its nodes only if I{all} of them match,
    and a deny rule if I{any} of them does.
  - When a rule cannot be decided without the tailnet view and there is
    none (tailscaled's status is missing or stale), the decision fails
    closed: a denial naming that rule, with verdict L{Verdict.NO_NETMAP}.
    Rules that can be decided without it (C{*}, an IP target against a
    network, a name target against its own name) still decide.

Everything here is plain computation, run for every connection: parsing
does the work once (sets of ids, network objects, port ranges), matching
allocates next to nothing.  The rule texts come from the operator's
configuration, so error messages quote them as they are.
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

from ._netmap import IPAddress, NetmapView, Peer, normalIP
from ._peercred import PeerCredentials
from ._policy import callerGroups

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_MAX_ID = 2**32 - 2
"""The largest uid or gid: C{(uid_t) -1} means "no id"."""

_ID = re.compile(r"[0-9]{1,10}")
_PORT_RANGE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]*|[0-9]+")
_IP_CHARACTERS = re.compile(r"[0-9a-fA-FxX.:]+(?:%.*)?", re.DOTALL)
_IPV6_CHARACTERS = re.compile(r"[0-9a-fA-F:./%]+")
_SPACE = re.compile(r"[\s\x00-\x1f\x7f]")

_HOST_FORMS = (
    "*, a name (web.example.com), *.suffix, an IPv4 address or network (100.64.0.0/10), an IPv6 one in brackets "
    "([fd7a:115c:a1e0::/48]), tag:NAME or a tailnet login (alice@example.com)"
)


class RuleError(ValueError):
    """A caller, destination or rule that cannot be used, with the text at fault."""


# Callers


class CallerKind(Enum):
    ANYONE = "*"
    UID = "uid"
    GID = "gid"
    USER = "user"
    GROUP = "group"


@dataclass(frozen=True, slots=True)
class Caller:
    """
    One caller form.  C{id} is the uid (for C{uid:} and C{user:}) or gid
    (for C{gid:} and C{group:}), names resolved when parsed; C{None} for C{*}.
    """

    text: str
    kind: CallerKind
    id: int | None = None


def _localId(value: str, text: str) -> int:
    if not _ID.fullmatch(value) or int(value) > _MAX_ID:
        raise RuleError(f"bad caller '{text}': the id must be a number from 0 to {_MAX_ID}")
    return int(value)


def parseCaller(text: Any) -> Caller:
    """
    Read one caller: C{*}, C{uid:N}, C{gid:N}, C{user:NAME} or C{group:NAME}.
    Names are looked up now, so an unknown one is an error at start and
    renaming a user later does not change the rules.

    @raise RuleError: not one of those, or no such local user or group.
    """
    if not isinstance(text, str):
        raise RuleError(f"a caller must be a string such as 'user:alice', not {type(text).__name__}")
    if text == "*":
        return Caller(text, CallerKind.ANYONE)
    prefix, colon, value = text.partition(":")
    if colon:
        if prefix == "uid":
            return Caller(text, CallerKind.UID, _localId(value, text))
        if prefix == "gid":
            return Caller(text, CallerKind.GID, _localId(value, text))
        if prefix == "user":
            try:
                if value:
                    return Caller(text, CallerKind.USER, pwd.getpwnam(value).pw_uid)
            except (KeyError, ValueError):
                pass
            raise RuleError(f"bad caller '{text}': there is no local user named '{value}'")
        if prefix == "group":
            try:
                if value:
                    return Caller(text, CallerKind.GROUP, grp.getgrnam(value).gr_gid)
            except (KeyError, ValueError):
                pass
            raise RuleError(f"bad caller '{text}': there is no local group named '{value}'")
    raise RuleError(f"bad caller '{text}': a caller is *, uid:N, gid:N, user:NAME or group:NAME")


@dataclass(frozen=True, slots=True)
class Callers:
    """
    Who a rule is for.  A caller whose credentials are unknown (C{None})
    is only in C{*}.

    @ivar text: the callers as written, for people.
    """

    text: str
    everyone: bool
    uids: frozenset[int]
    gids: frozenset[int]
    callers: tuple[Caller, ...]

    def matches(self, peer: PeerCredentials | None) -> bool:
        """Is C{peer} one of these callers (by uid, primary gid or a supplementary group)?"""
        if self.everyone:
            return True
        if peer is None:
            return False
        if peer.uid in self.uids:
            return True
        gids = self.gids
        return bool(gids) and (peer.gid in gids or not gids.isdisjoint(callerGroups(peer)))


EVERYONE = Callers("*", True, frozenset(), frozenset(), (Caller("*", CallerKind.ANYONE),))
"""The callers of a rule that names none."""


def parseCallers(values: Any) -> Callers:
    """
    Read a rule's C{callers}: a non-empty list of caller strings.

    @raise RuleError: not such a list, or a caller in it is bad.
    """
    if not isinstance(values, (list, tuple)) or not values:
        raise RuleError('callers must be a non-empty list such as ["user:alice", "group:staff"]')
    callers = tuple(parseCaller(value) for value in values)
    uids = frozenset(c.id for c in callers if c.kind in (CallerKind.UID, CallerKind.USER) and c.id is not None)
    gids = frozenset(c.id for c in callers if c.kind in (CallerKind.GID, CallerKind.GROUP) and c.id is not None)
    everyone = any(c.kind is CallerKind.ANYONE for c in callers)
    return Callers(", ".join(c.text for c in callers), everyone, uids, gids, callers)


# Targets


@dataclass(frozen=True, slots=True)
class Target:
    """
    Where a client asked to connect.  C{ip} is set when the host is an IP
    address (then C{host} is its text); otherwise C{host} is the name,
    lowercased, without trailing dots.
    """

    host: str
    port: int
    ip: IPAddress | None = None
    shortForm: ipaddress.IPv4Address | None = None
    """
    For a host in one of C{inet_aton}'s short numeric forms (C{2130706433},
    C{0x7f.1}, C{127.1}): the address libc reads in it.  tailscaled reads
    such a host as a name (MagicDNS, then DNS), libc as that address: so it
    is a name to allow rules, and a name and that address to deny rules.
    """

    @property
    def asAddress(self) -> Target | None:
        """The short form read as its address (what deny rules also judge), or C{None}."""
        if self.shortForm is None:
            return None
        return Target(str(self.shortForm), self.port, self.shortForm)

    @property
    def text(self) -> str:
        """C{host:port}, an IPv6 address in brackets."""
        if self.ip is not None and self.ip.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _inetAton(text: str) -> ipaddress.IPv4Address | None:
    """
    The IPv4 address C{text} is in the forms libc's C{inet_aton} also takes
    (C{2130706433}, C{0x7f.1}, C{017.0.0.1}, C{10.1}), or C{None}: a dialer
    that resolves through C{getaddrinfo} connects there.
    """
    parts = text.split(".")
    if len(parts) > 4:
        return None
    values: list[int] = []
    for part in parts:
        if len(part) > 40 or not _ATON_PART.fullmatch(part):
            return None
        if part[:2] in ("0x", "0X"):
            values.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part[0] == "0":
            try:
                values.append(int(part, 8))
            except ValueError:
                return None
        else:
            values.append(int(part))
    *head, last = values
    if any(value > 255 for value in head) or last >= 256 ** (4 - len(head)):
        return None
    number = 0
    for value in head:
        number = number << 8 | value
    return ipaddress.IPv4Address(number << 8 * (4 - len(head)) | last)


def _ipLiteral(text: str) -> tuple[IPAddress | None, ipaddress.IPv4Address | None]:
    """An IP address in its usual form, or else an IPv4 address in a short form, or neither."""
    if not _IP_CHARACTERS.fullmatch(text):
        return None, None  # most names: no exception to pay for
    try:
        return normalIP(ipaddress.ip_address(text)), None
    except ValueError:
        return None, _inetAton(text)


def parseTarget(host: str, port: int) -> Target:
    """
    The target of a connection request, as rules see it.

    A host that is an IP address is that address, even when it came as a
    SOCKS5 domain name or in brackets; an IPv4-mapped IPv6 address is its
    IPv4 address.  A host in one of the shorter numeric forms C{inet_aton}
    takes is a name that also carries that address (L{Target.shortForm}).
    Any other host is a name, lowercased, without trailing dots; whatever a
    client sent, even nothing (C{""}): such a name is tied to no node and
    only C{*} matches it.

    @raise RuleError: a port outside 0-65535 (the front ends check ports).
    """
    if not isinstance(host, str):
        raise RuleError(f"a target host must be a string, not {type(host).__name__}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise RuleError(f"bad target port {port!r}: ports run from 0 to 65535")
    if len(host) > 2 and host[0] == "[" and host[-1] == "]":
        ip, short = _ipLiteral(host[1:-1])
        if ip is not None:
            return Target(str(ip), port, ip)
    name = host.lower().rstrip(".")
    ip, short = _ipLiteral(name)
    if ip is not None:
        return Target(str(ip), port, ip)
    return Target(name, port, shortForm=short)


def tiedPeers(target: Target, view: NetmapView | None, dialable: bool = False) -> tuple[Peer, ...] | None:
    """
    The nodes C{target} designates in C{view}; C{None} without a view.
    C{dialable}: for a name, only the nodes tailscaled's dial reaches by it
    (see L{NetmapView.peersForName}).
    """
    if view is None:
        return None
    if target.ip is not None:
        return view.peersForIP(target.ip)
    return view.peersForName(target.host, dialable)


# Destinations


@dataclass(frozen=True, slots=True)
class Ports:
    """The ports of a destination: C{ranges} of (low, high), both included; none means every port."""

    text: str
    ranges: tuple[tuple[int, int], ...]

    def matches(self, port: int) -> bool:
        if not self.ranges:
            return True
        for low, high in self.ranges:
            if low <= port <= high:
                return True
        return False


def parsePorts(text: str, destination: str = "") -> Ports:
    """
    Read C{*}, C{N}, C{N-M} or a comma list of those (C{80,443,8000-8100}).

    @param destination: the whole destination, for the error message.
    @raise RuleError: anything else, a port outside 1-65535, or M < N.
    """
    where = f" in destination '{destination}'" if destination else ""
    if text == "*":
        return Ports(text, ())
    ranges: list[tuple[int, int]] = []
    for item in text.split(","):
        match = _PORT_RANGE.fullmatch(item)
        if match is None:
            raise RuleError(
                f"bad ports '{text}'{where}: ports are *, N, N-M or a comma list of those "
                f"(a destination is HOST:PORTS, e.g. web.example.com:443 or tag:prod:*)"
            )
        low = int(match[1])
        high = int(match[2]) if match[2] is not None else low
        if not (1 <= low <= 65535 and 1 <= high <= 65535):
            raise RuleError(f"bad port '{item}'{where}: ports run from 1 to 65535")
        if low > high:
            raise RuleError(f"bad port range '{item}'{where}: it ends before it starts")
        ranges.append((low, high))
    return Ports(text, tuple(ranges))


class DestinationKind(Enum):
    ANY = "any"
    NETWORK = "network"
    NAME = "name"
    SUFFIX = "suffix"
    TAG = "tag"
    LOGIN = "login"


@dataclass(frozen=True, slots=True)
class Destination:
    """
    One C{HOST:PORTS} of a rule.

    @ivar text: as written.
    @ivar value: what a target or node is compared with: the name, the
        suffix with its leading dot (C{.example.com}), the tag
        (C{tag:prod}), the login, all lowercased; C{""} for C{*} and
        networks.
    @ivar network: the network, for L{DestinationKind.NETWORK}.
    """

    text: str
    kind: DestinationKind
    ports: Ports
    value: str = ""
    network: IPNetwork | None = None

    @property
    def needsView(self) -> bool:
        """Can matching this destination ever consult the tailnet view?"""
        return self.kind is not DestinationKind.ANY

    def matchesTarget(self, target: Target) -> bool | None:
        """
        The host part decided from the target alone, or C{None} when the
        nodes it is tied to must say (ports are not looked at here).
        """
        kind = self.kind
        if kind is DestinationKind.ANY:
            return True
        if kind is DestinationKind.NETWORK:
            if target.ip is not None:
                return self.network is not None and target.ip in self.network
            return None
        if target.ip is None:
            if kind is DestinationKind.NAME and target.host == self.value:
                return True
            if kind is DestinationKind.SUFFIX and target.host.endswith(self.value):
                return True
        return None

    def matchesPeer(self, peer: Peer) -> bool:
        """Does this node match the host part?"""
        kind = self.kind
        if kind is DestinationKind.NETWORK:
            network = self.network
            if network is not None:
                for address in peer.addresses:
                    if address in network:
                        return True
            return False
        if kind is DestinationKind.NAME:
            return peer.name == self.value
        if kind is DestinationKind.SUFFIX:
            return peer.name.endswith(self.value)
        if kind is DestinationKind.TAG:
            return self.value in peer.tags
        if kind is DestinationKind.LOGIN:
            return peer.login == self.value
        return True

    def matchesPeers(self, peers: tuple[Peer, ...] | None, allow: bool) -> bool | None:
        """
        The host part decided by the nodes a target is tied to: C{None}
        without a view, never for no nodes; with several, all must match for
        an allow rule and one suffices for a deny rule.
        """
        if peers is None:
            return None
        if not peers:
            return False
        if allow:
            for peer in peers:
                if not self.matchesPeer(peer):
                    return False
            return True
        for peer in peers:
            if self.matchesPeer(peer):
                return True
        return False


def _hostName(text: str, destination: str) -> str:
    """C{text} as a plausible DNS name: lowercased, without its trailing dot."""
    name = text[:-1] if text.endswith(".") else text
    if name.isascii():
        name = name.lower()
        labels = name.split(".")
        if len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels):
            return name
    raise RuleError(
        f"bad host name '{text}' in destination '{destination}': a name is labels of letters, digits, '-' and "
        f"'_' (1 to 63 each, 253 in all) separated by dots"
    )


def _isIPv6(text: str) -> bool:
    if not _IPV6_CHARACTERS.fullmatch(text):
        return False
    try:
        return ipaddress.ip_network(text, strict=False).version == 6
    except ValueError:
        return False


def _looksLikeIPv4(host: str) -> bool:
    """Would this host be an IPv4 address or network if it were right (so a name it cannot be)?"""
    address = host.partition("/")[0]
    lastLabel = address.rstrip(".").rpartition(".")[2]
    return (lastLabel.isascii() and lastLabel.isdigit()) or _inetAton(address) is not None


def _network(text: str, destination: str, version: int) -> IPNetwork:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        if version == 4:
            raise RuleError(
                f"bad IPv4 address or network '{text}' in destination '{destination}': {error} "
                f"(write four decimal numbers, e.g. 100.64.0.1 or 100.64.0.0/10)"
            ) from None
        raise RuleError(f"bad IPv6 address or network '{text}' in destination '{destination}': {error}") from None
    if network.version != version:
        raise RuleError(
            f"bad destination '{destination}': IPv6 addresses and networks go in brackets, IPv4 ones do not"
        )
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:  # targets compare IPv4-mapped addresses as IPv4
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _login(host: str, destination: str) -> str:
    local, _, domain = host.partition("@")
    if not local or not domain or "@" in domain or "*" in host or _SPACE.search(host):
        raise RuleError(
            f"bad login '{host}' in destination '{destination}': a tailnet login is one user's login name, "
            f"such as alice@example.com or alice@github"
        )
    return host.lower()


def parseDestination(text: Any) -> Destination:
    """
    Read one C{HOST:PORTS} (split at the last colon, so C{tag:prod:443}
    is the tag C{tag:prod} and port 443).

    @raise RuleError: the text is not a destination, with what is wrong.
    """
    if not isinstance(text, str):
        raise RuleError(f"a destination must be a string such as 'web.example.com:443', not {type(text).__name__}")
    if not text:
        raise RuleError("empty destination: a destination is HOST:PORTS, e.g. web.example.com:443")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise RuleError(f"bad destination '{text}': the '[' is never closed")
        host, colon, portsText = text[: close + 1], text[close + 1 : close + 2], text[close + 2 :]
        if colon != ":":
            raise RuleError(f"bad destination '{text}': write the ports after the brackets, e.g. [fd7a::1]:443")
    else:
        host, colon, portsText = text.rpartition(":")
        if not colon:
            raise RuleError(f"destination '{text}' has no ports: write HOST:PORTS, e.g. {text}:443 or {text}:*")
    if _isIPv6(text) or (":" in host and _isIPv6(host)):
        raise RuleError(
            f"bad destination '{text}': IPv6 addresses and networks go in brackets, e.g. "
            f"[fd7a:115c:a1e0::1]:443 or [fd7a:115c:a1e0::/48]:*"
        )
    ports = parsePorts(portsText, text)
    if host == "":
        raise RuleError(f"destination '{text}' has no host: it is one of {_HOST_FORMS}")
    if host == "*":
        return Destination(text, DestinationKind.ANY, ports)
    if host.startswith("["):
        inner = host[1:-1]
        if "%" in inner:
            raise RuleError(f"bad destination '{text}': tailnet addresses have no zone ('%')")
        return Destination(text, DestinationKind.NETWORK, ports, network=_network(inner, text, 6))
    if ":" in host:
        prefix, _, name = host.partition(":")
        prefix = prefix.lower()
        if prefix == "tag":
            if not _TAG_NAME.fullmatch(name):
                raise RuleError(
                    f"bad tag '{host}' in destination '{text}': a tag name starts with a letter and has only "
                    f"letters, digits and '-'"
                )
            return Destination(text, DestinationKind.TAG, ports, f"tag:{name.lower()}")
        if prefix in ("group", "autogroup"):
            raise RuleError(
                f"bad destination '{text}': tailnet groups ({prefix}:...) are not visible to tsmux (tailscaled's "
                f"status does not list them); name the tags or logins instead"
            )
        raise RuleError(f"bad host '{host}' in destination '{text}': a host is {_HOST_FORMS}")
    if host.startswith("*."):
        return Destination(text, DestinationKind.SUFFIX, ports, "." + _hostName(host[2:], text))
    if "@" in host:
        return Destination(text, DestinationKind.LOGIN, ports, _login(host, text))
    if _looksLikeIPv4(host):
        return Destination(text, DestinationKind.NETWORK, ports, network=_network(host, text, 4))
    return Destination(text, DestinationKind.NAME, ports, _hostName(host, text))


# Rules and decisions


class Verdict(Enum):
    ALLOW = "allow"
    DENY = "deny"
    NO_NETMAP = "no-netmap"
    """Denied because a rule needed the tailnet view and there was none."""


@dataclass(frozen=True)
class RuleDecision:
    """
    @ivar label: the rule that decided (C{web#2}), or C{web#open} / C{web#end}.
    @ivar reason: why, for people.
    @ivar peers: the nodes the target was tied to (empty without a view).
    """

    verdict: Verdict
    label: str
    reason: str
    peers: tuple[Peer, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW


@dataclass(frozen=True, slots=True)
class Rule:
    """One C{{ allow = [...], callers = [...] }} or C{{ deny = [...] }}; C{index} counts from 1."""

    index: int
    allow: bool
    destinations: tuple[Destination, ...]
    callers: Callers = EVERYONE

    @property
    def verb(self) -> str:
        return "allow" if self.allow else "deny"

    @property
    def verbs(self) -> str:
        return "allows" if self.allow else "denies"

    @property
    def text(self) -> str:
        """The rule in short, for people: C{allow tag:prod:443 for user:alice}."""
        destinations = ", ".join(destination.text for destination in self.destinations)
        return f"{self.verb} {destinations} for {self.callers.text}"


_RULE_KEYS = ("allow", "deny", "callers")


def parseRule(table: Mapping[str, Any], index: int) -> Rule:
    """
    Read the rule at position C{index} (from 1) of a socket's list.

    @raise RuleError: unknown keys, not exactly one of C{allow} and
        C{deny}, an empty list, or a bad destination or caller.
    """
    if not isinstance(table, Mapping):
        raise RuleError(
            f'rule #{index}: a rule is a table such as {{ allow = ["web:443"] }}, not {type(table).__name__}'
        )
    unknown = [str(key) for key in table if key not in _RULE_KEYS]
    if unknown:
        raise RuleError(f"rule #{index}: unknown key {', '.join(unknown)} (a rule has allow or deny, and callers)")
    if ("allow" in table) == ("deny" in table):
        raise RuleError(f"rule #{index}: a rule has exactly one of allow and deny")
    allow = "allow" in table
    key = "allow" if allow else "deny"
    values = table[key]
    if not isinstance(values, (list, tuple)) or not values:
        raise RuleError(f'rule #{index}: {key} must be a non-empty list of destinations such as ["web:443"]')
    try:
        destinations = tuple(parseDestination(value) for value in values)
        callers = parseCallers(table["callers"]) if "callers" in table else EVERYONE
    except RuleError as error:
        raise RuleError(f"rule #{index}: {error}") from None
    return Rule(index, allow, destinations, callers)


PORT_CACHE = 4096
"""Ports whose candidate rules a L{RuleSet} keeps."""


class RuleSet:
    """
    A socket's rules, in order.  See the module's docstring for how a
    decision is reached.
    """

    __slots__ = ("socket", "rules", "_labels", "_needsNetmap", "_open", "_endLabel", "_endReason", "_byPort")

    def __init__(self, socket: str, rules: tuple[Rule, ...]) -> None:
        self.socket = socket
        self.rules = tuple(rules)
        self._labels = tuple(f"{socket}#{rule.index}" for rule in self.rules)
        self._needsNetmap = any(d.needsView for rule in self.rules for d in rule.destinations)
        self._open = RuleDecision(Verdict.ALLOW, f"{socket}#open", f"socket {socket} has no rules")
        self._endLabel = f"{socket}#end"
        self._endReason = f"no rule of socket {socket} allows it"
        self._byPort: dict[int, tuple[tuple[Rule, str, tuple[Destination, ...]], ...]] = {}

    def _forPort(self, port: int) -> tuple[tuple[Rule, str, tuple[Destination, ...]], ...]:
        """
        The rules that can apply to C{port}, each with its destinations
        whose ports match, in order: a rule none of whose destinations has
        the port never applies.  Computed once per port and kept (a few
        ports are dialed again and again), the cache bounded.
        """
        found = self._byPort.get(port)
        if found is None:
            candidates = []
            for rule, label in zip(self.rules, self._labels, strict=True):
                destinations = tuple(d for d in rule.destinations if d.ports.matches(port))
                if destinations:
                    candidates.append((rule, label, destinations))
            found = tuple(candidates)
            if len(self._byPort) >= PORT_CACHE:
                self._byPort.clear()
            self._byPort[port] = found
        return found

    @property
    def needsNetmap(self) -> bool:
        """Can a decision ever consult the tailnet view (so tailscaled's status is worth polling)?"""
        return self._needsNetmap

    @property
    def count(self) -> int:
        return len(self.rules)

    @property
    def endLabel(self) -> str:
        """C{NAME#end}: what a denial no rule made is logged as."""
        return self._endLabel

    @property
    def openDecision(self) -> RuleDecision:
        """What a socket without rules decides, whatever the target (C{NAME#open})."""
        return self._open

    def decide(
        self,
        peer: PeerCredentials | None,
        target: Target,
        view: NetmapView | None,
        whyNoView: str = "",
        tailscaledResolves: bool = True,
    ) -> RuleDecision:
        """
        The first rule for this caller whose destinations match C{target}
        decides.  A rule that cannot be told without the view when C{view}
        is C{None} decides too, as a denial with L{Verdict.NO_NETMAP}
        (C{whyNoView} says why there is none).  A target tied to several
        nodes matches an allow rule's nodes only if all match, a deny
        rule's if any does.

        @param tailscaledResolves: the way out hands names to tailscaled,
            which resolves a node's MagicDNS names itself; otherwise (the
            direct dialer) a name goes to the system's resolver, and an allow
            rule trusts no name's tie to a node.
        """
        if not self.rules:
            peers = tiedPeers(target, view)
            return self._open if not peers else RuleDecision(Verdict.ALLOW, self._open.label, self._open.reason, peers)
        port = target.port
        # The nodes the target is tied to, looked up once each: an allow rule trusts only the
        # names tailscaled's dial resolves to a node; a deny rule takes every tie (host names too).
        ties: dict[bool, tuple[Peer, ...] | None] = {}
        for rule, label, destinations in self._forPort(port):
            if rule.callers is not EVERYONE and not rule.callers.matches(peer):
                continue
            unknown = False
            for destination in destinations:
                matched = destination.matchesTarget(target)
                if matched is None:
                    if rule.allow not in ties:
                        if rule.allow and not tailscaledResolves and target.ip is None:
                            ties[True] = None if view is None else ()
                        else:
                            ties[rule.allow] = tiedPeers(target, view, dialable=rule.allow)
                    matched = destination.matchesPeers(ties[rule.allow], rule.allow)
                if not matched and not rule.allow and target.shortForm is not None:
                    # A deny rule takes the address libc reads in a short numeric form too.
                    asAddress = target.asAddress
                    assert asAddress is not None
                    alsoMatched = destination.matchesTarget(asAddress)
                    if alsoMatched is None:
                        alsoMatched = destination.matchesPeers(tiedPeers(asAddress, view), False)
                    matched = True if alsoMatched else (None if alsoMatched is None or matched is None else False)
                if matched is None:
                    unknown = True
                    continue
                if matched:
                    verdict = Verdict.ALLOW if rule.allow else Verdict.DENY
                    reason = f"rule {label} {rule.verbs} {destination.text}"
                    return RuleDecision(verdict, label, reason, self._shown(ties, target, view))
            if unknown:
                reason = f"rule {label} needs the tailnet view, which is missing"
                return RuleDecision(Verdict.NO_NETMAP, label, f"{reason}: {whyNoView}" if whyNoView else reason)
        return RuleDecision(Verdict.DENY, self._endLabel, self._endReason, self._shown(ties, target, view))

    @staticmethod
    def _shown(ties: dict[bool, tuple[Peer, ...] | None], target: Target, view: NetmapView | None) -> tuple[Peer, ...]:
        """The nodes a decision names (for C{tsmux explain}): every tie."""
        if False not in ties:
            ties[False] = tiedPeers(target, view)
        return ties[False] or ()
