"""
The settings, defined once: L{Config}, parsed once from the command line
shared by C{tsmux} and C{twistd tsmux} (L{Options}), and handed on whole to
the service and, through L{tsmux._context.ConnectionContext}, to every
connection.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass, field
from typing import Any, Literal

from twisted.python import usage

from ._listen import defaultBacklog
from ._rules import Callers, Rule

DEFAULT_DIAL_TIMEOUT = 10.0
PENDING_LIMIT = 64 * 1024
"""Bytes a client may send before its way out is connected; past this, tsmux stops reading it."""
SPLICE_AFTER = 256 * 1024
"""Bytes in one direction after which a relay moves to splice(2)."""
MAX_REQUEST_LINE = 8192
"""Longest first request line tsmux waits for before deciding where an HTTP connection goes."""
TSMUX_API_PREFIX = b"/tsmux/"
"""Paths tsmux answers itself; the LocalAPI never uses them."""

DialerKind = Literal["localapi", "direct", "socks5", "nc"]


@dataclass(frozen=True)
class DialerSpec:
    """C{--dialer}, parsed: its kind and the part after the colon (an endpoint, a CLI)."""

    kind: DialerKind
    argument: str | None = None

    @classmethod
    def parse(cls, text: str) -> DialerSpec:
        if text in ("localapi", "direct", "nc"):
            return cls(text)  # type: ignore[arg-type]
        kind, colon, argument = text.partition(":")
        if colon and argument and kind in ("socks5", "nc"):
            return cls(kind, argument)  # type: ignore[arg-type]
        raise ValueError(f"--dialer must be one of {', '.join(DIALERS)}, not {text!r}")

    def __str__(self) -> str:
        return self.kind if self.argument is None else f"{self.kind}:{self.argument}"


DEFAULT_LISTEN = "/var/run/tailscale/tsmux.sock"
DEFAULT_LOCALAPI = "/var/run/tailscale/tailscaled.sock"
DIALERS = ("localapi", "direct", "socks5:ENDPOINT", "nc", "nc:CLI")
DIAL_SELF_POLICIES = ("refuse", "direct")
OFFERS = ("socks5", "http-connect", "localapi")
"""What a socket may offer; every socket given by flags offers all three."""
NETMAP_REFRESH = 4.0
"""Seconds between reads of tailscaled's status while some socket's rules need the tailnet view."""
NETMAP_MAX_AGE = 30.0
"""A tailnet view older than this is no view: decisions that need one fail closed."""


def socketName(listen: str) -> str:
    """A socket's default name: its path's file name without C{.sock} (an endpoint description has none)."""
    if not listen.startswith("/"):
        return ""
    base = listen.rstrip("/").rsplit("/", 1)[-1]
    return base.removesuffix(".sock")


@dataclass(frozen=True)
class Config:
    """
    One socket's settings, validated: where it listens, what it offers,
    who may use it, its rules and its way out.  A daemon has one per socket
    (L{DaemonConfig}); the process-wide ones (limits in all, admins, the
    shutdown timeout) are the same in each.
    """

    name: str = "tsmux"
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    mode: int = 0o660
    localapi: str = DEFAULT_LOCALAPI
    dialer: DialerSpec = field(default_factory=lambda: DialerSpec.parse("localapi"))
    dialSelf: str = "refuse"
    detectTimeout: float = 15.0
    handshakeTimeout: float = 30.0
    dialTimeout: float = DEFAULT_DIAL_TIMEOUT
    backlog: int = field(default_factory=defaultBacklog)
    socksAllowUids: frozenset[int] = frozenset()
    socksAllowGids: frozenset[int] = frozenset()
    adminUids: frozenset[int] = frozenset()
    adminGids: frozenset[int] = frozenset()
    group: int | None = None
    maxConnections: int | None = None
    maxConnectionsPerUid: int | None = None
    idleTimeout: float | None = None
    halfCloseTimeout: float | None = 300.0
    shutdownTimeout: float = 30.0
    operatorRefresh: float | None = None
    """Obsolete (tailscaled decides operator rights itself now); accepted, warned about, ignored."""
    logFormat: str = "text"
    socksAuth: str | None = None
    splice: bool = True
    upstreamAuth: str | None = None
    offer: frozenset[str] = frozenset(OFFERS)
    allowCallers: Callers | None = None
    """Who may use this socket at all; C{None}: everyone who can open it."""
    rules: tuple[Rule, ...] | None = None
    """
    The socket's rules, first match wins.  Empty: every destination, logged
    as C{NAME#open} (a socket from a config file); C{None}: no rule set at
    all (the flag form, whose lines carry no C{rule=}).
    """
    socketMaxConnections: int | None = None
    """This socket's own cap, within the process-wide C{maxConnections}."""
    socketMaxConnectionsPerUid: int | None = None


@dataclass(frozen=True)
class DaemonConfig:
    """
    Everything one tsmux process is told: its sockets (from flags, one; from
    a file, any number) and what is process-wide.  Parsed once, handed on
    whole; a reload builds a new one.
    """

    sockets: tuple[Config, ...]
    maxConnections: int | None = None
    maxConnectionsPerUid: int | None = None
    shutdownTimeout: float = 30.0
    adminUids: frozenset[int] = frozenset()
    adminGids: frozenset[int] = frozenset()
    logFormat: str = "text"
    configFile: str | None = None
    """The file the sockets came from (C{SIGHUP} re-reads it); C{None} for the flag form."""
    netmapRefresh: float = NETMAP_REFRESH

    @classmethod
    def forSocket(cls, config: Config) -> DaemonConfig:
        """The flag form: one socket, whose process-wide settings are the daemon's."""
        return cls(
            sockets=(config,),
            maxConnections=config.maxConnections,
            maxConnectionsPerUid=config.maxConnectionsPerUid,
            shutdownTimeout=config.shutdownTimeout,
            adminUids=config.adminUids,
            adminGids=config.adminGids,
            logFormat=config.logFormat,
        )

    @property
    def ruleCount(self) -> int:
        return sum(len(socket.rules or ()) for socket in self.sockets)

    def summary(self) -> str:
        """C{3 sockets, 7 rules}: what C{tsmux check} and a reload say first."""
        count = len(self.sockets)
        rules = self.ruleCount
        return f"{count} socket{'s' if count != 1 else ''}, {rules} rule{'s' if rules != 1 else ''}"


def _octalMode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"--mode wants an octal mode like 0660, not {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"--mode {text} is out of range (0000 to 0777)")
    return mode


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"wants a number of seconds, not {text!r}") from None
    if not 0 < value < 86400 * 365:
        raise ValueError(f"wants a positive number of seconds, not {text!r}")
    return value


def _uid(text: str) -> int:
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise usage.UsageError(f"no such user: {text!r}") from None


def _gid(text: str) -> int:
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise usage.UsageError(f"no such group: {text!r}") from None


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"wants a positive whole number, not {text!r}")
    return int(text)


class Options(usage.Options):
    """The command line, for both C{tsmux} and C{twistd -n tsmux}."""

    synopsis = "Usage: tsmux [options]"
    longdesc = (
        "tsmux serves SOCKS5, HTTP CONNECT and tailscaled's LocalAPI on one Unix socket, so that "
        "file permissions and the caller's own uid decide who may use Tailscale's proxy. A "
        "connection whose first byte is 0x05 gets a SOCKS5 server whose CONNECTs leave through "
        "--dialer; CONNECT requests are dialed the same way; other HTTP goes byte for byte to "
        "tailscaled's LocalAPI (--localapi) on a connection tsmux makes as the caller, so tailscaled "
        "grants each caller exactly its own rights. Anything else is refused and logged."
    )
    optFlags = [
        [
            "no-splice",
            None,
            "Relay in Python instead of with splice(2) in the kernel (the fast path is used when both "
            "sides are plain sockets, and never for a LocalAPI connection whose dials are filtered).",
        ],
    ]
    optParameters = [
        [
            "mode",
            None,
            "0660",
            "Permissions (octal) of sockets given as a path. The socket never "
            "exists with a wider mode, not even briefly.",
            _octalMode,
        ],
        [
            "localapi",
            None,
            DEFAULT_LOCALAPI,
            "tailscaled's LocalAPI socket: HTTP is passed to it, and the localapi dialer dials through it.",
        ],
        [
            "dialer",
            None,
            "localapi",
            "How SOCKS5 and HTTP CONNECT dials leave: 'localapi' through tailscaled (names resolved by "
            "tailscaled, MagicDNS works); 'direct' (TCP from this host, as tsmux's user; for use without "
            "tailscaled); or 'socks5:ENDPOINT', chained to an upstream SOCKS5 server given as a Twisted "
            "client endpoint (socks5:tcp:127.0.0.1:1080 for tailscaled's --socks5-server, "
            "socks5:unix:/path), names passed on unresolved; or 'nc' / 'nc:CLI', a 'tailscale nc' process "
            "per connection (CLI defaults to tailscale on PATH).",
        ],
        [
            "dial-self",
            None,
            "refuse",
            "When tailscaled (>= 1.98) answers a dial with Dial-Self (the "
            "target is not on the tailnet): 'refuse' (SOCKS5 reply 02) or 'direct' (dial the address "
            "tailscaled gives from this host, on a socket created with the caller's ids, so owner-match "
            "firewall rules see the caller).",
        ],
        ["detect-timeout", None, "15", "Seconds a new connection has to show its protocol.", _seconds],
        [
            "handshake-timeout",
            None,
            "30",
            "Seconds a client has, once its protocol is known, for its SOCKS5 negotiation and request, "
            "its CONNECT request, or its /tsmux/ request.",
            _seconds,
        ],
        [
            "dial-timeout",
            None,
            str(DEFAULT_DIAL_TIMEOUT).removesuffix(".0"),
            "Seconds a dial (and a LocalAPI connect) may take.",
            _seconds,
        ],
        [
            "group",
            None,
            None,
            "Group (name or gid) of sockets given as a path; with --mode 0660 that group is who may connect.",
        ],
        [
            "max-connections",
            None,
            None,
            "Most client connections open at once, handshakes included; more are closed at accept, "
            "logged once per burst [default: what the descriptor limit carries, ~1 per 6 descriptors; tsmux "
            "raises its soft RLIMIT_NOFILE to the hard limit at start]. An eighth is kept for uid 0.",
            _count,
        ],
        [
            "max-connections-per-uid",
            None,
            None,
            "Most connections one uid may hold at once [default: half of --max-connections].",
            _count,
        ],
        [
            "idle-timeout",
            None,
            None,
            "Close a relay after this many seconds with no bytes either way [default: never].",
            _seconds,
        ],
        [
            "half-close-timeout",
            None,
            "300",
            "Close a relay when one direction has ended and no byte moved "
            "for this many seconds (a client that sent EOF and left is otherwise only noticed when the target "
            "speaks).",
            _seconds,
        ],
        [
            "shutdown-timeout",
            None,
            "30",
            "On SIGTERM/SIGINT, seconds open connections get to finish before they are cut.",
            _seconds,
        ],
        [
            "operator-refresh",
            None,
            None,
            "Obsolete and ignored: tsmux connects to tailscaled as each caller, and tailscaled applies "
            "its own operator rules.",
            _seconds,
        ],
        [
            "socks-auth",
            None,
            None,
            "File of user:password lines: SOCKS5 clients must then authenticate (RFC 1929), and HTTP "
            "CONNECT clients send Proxy-Authorization: Basic; non-admins' LocalAPI dials are then refused "
            "(they cannot carry a password). Repeated wrong passwords from one uid slow its answers down. "
            "Refused if others may read it or anyone but its owner may write it.",
        ],
        [
            "upstream-auth",
            None,
            None,
            "File with one user:password line that the socks5: dialer presents upstream.",
        ],
        [
            "config",
            "c",
            None,
            "A TOML file describing any number of sockets, each with its own offer, callers and rules "
            "in tailnet terms (docs: Sockets and rules). SIGHUP re-reads it. Not combined with flags "
            "that describe a socket; --log-format still applies.",
        ],
        [
            "log-format",
            None,
            "text",
            "text or json (one JSON object per line), for the tsmux command. Under twistd, "
            "use twistd's --logger=tsmux.jsonLogObserver instead.",
        ],
        [
            "backlog",
            None,
            None,
            "Accept queue length [default: the kernel's maximum, /proc/sys/net/core/somaxconn].",
            _count,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        for name in ("socks-allow-uid", "socks-allow-gid", "admin-uid", "admin-gid"):
            self[name] = set()

    def opt_socks_allow_uid(self, user: str) -> None:
        """Only this user (uid or name) may dial: SOCKS5, HTTP CONNECT and the LocalAPI's dial; may repeat. With neither this nor --socks-allow-gid, anyone who can open the socket may. Others are refused before any password is asked."""  # noqa: E501
        self["socks-allow-uid"].add(_uid(user))

    def opt_socks_allow_gid(self, group: str) -> None:
        """Members of this group (gid or name; primary or supplementary) may dial; may repeat."""
        self["socks-allow-gid"].add(_gid(group))

    def opt_admin_uid(self, user: str) -> None:
        """This user (uid or name) is one of tsmux's admins, like uid 0 and tsmux's own uid: it may use tsmux's /tsmux/ API (status, metrics) and, with --socks-auth, the LocalAPI's dial. LocalAPI rights are tailscaled's to give, not tsmux's; may repeat."""  # noqa: E501
        self["admin-uid"].add(_uid(user))

    def opt_admin_gid(self, group: str) -> None:
        """Members of this group (gid or name) are tsmux's admins; may repeat."""
        self["admin-gid"].add(_gid(group))

    def opt_listen(self, address: str) -> None:
        """Where to listen; may repeat. An absolute path is a Unix socket tsmux manages (--mode, stale sockets replaced, removed on exit). systemd:domain=UNIX:name=NAME (or index=N) adopts a socket systemd passed, keeping its mode and path. Anything else is a Twisted endpoint description (unix:/path, tcp:1080:interface=127.0.0.1), used as Twisted gives it: --mode and stale-socket handling do not apply there. [default: /var/run/tailscale/tsmux.sock]"""  # noqa: E501 - usage.Options prints the docstring as is
        if not address:
            raise usage.UsageError("--listen wants a path or an endpoint description")
        self["listen"].append(address)

    def opt_version(self) -> None:
        """Print tsmux's version and exit."""
        from ._version import __version__

        print(f"tsmux {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        # usage.Options coerces given values only; defaults are written as the
        # user would type them (so --help shows "0660"), and coerced here.
        coercions = (
            ("mode", _octalMode),
            ("detect-timeout", _seconds),
            ("handshake-timeout", _seconds),
            ("dial-timeout", _seconds),
            ("shutdown-timeout", _seconds),
            ("half-close-timeout", _seconds),
        )
        for name, coerce in coercions:
            if isinstance(self[name], str):
                self[name] = coerce(self[name])
        if isinstance(self["dialer"], str):
            try:
                self["dialer"] = DialerSpec.parse(self["dialer"])
            except ValueError as error:
                raise usage.UsageError(str(error)) from None
        if self["dial-self"] not in DIAL_SELF_POLICIES:
            raise usage.UsageError(
                f"--dial-self must be one of {', '.join(DIAL_SELF_POLICIES)}, not {self['dial-self']!r}"
            )
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format must be text or json, not {self['log-format']!r}")
        if self["group"] is not None and not isinstance(self["group"], int):
            self["group"] = _gid(self["group"])
        if not self["localapi"].startswith("/"):
            raise usage.UsageError(f"--localapi wants an absolute path, not {self['localapi']!r}")
        if self["config"] is not None:
            given = self.socketFlagsGiven()
            if given:
                raise usage.UsageError(
                    f"--config describes the sockets; {', '.join(given)} cannot be combined with it "
                    "(put them in the file)"
                )

    def socketFlagsGiven(self) -> list[str]:
        """The flags given that describe a socket (they conflict with C{--config})."""
        given = []
        for name in SOCKET_LIST_FLAGS:
            if self[name]:
                given.append(f"--{name}")
        defaults = Options()
        for parameter in self.optParameters:
            name = str(parameter[0])  # type: ignore[index]
            if name in PROCESS_FLAGS:
                continue
            default = defaults[name]
            value = self[name]
            if isinstance(default, str) and not isinstance(value, str):
                # Defaults are kept as typed; compare what was given against the default's meaning.
                default = _DEFAULT_MEANINGS.get(name, lambda text: text)(default)
            if value != default:
                given.append(f"--{name}")
        if self["no-splice"]:
            given.append("--no-splice")
        return given

    def toDaemonConfig(self) -> DaemonConfig:
        """The daemon this command line describes: one socket from the flags, or the C{--config} file."""
        if self["config"] is not None:
            from ._configfile import loadConfigFile

            return loadConfigFile(self["config"], logFormat=self["log-format"])
        return DaemonConfig.forSocket(self.toConfig())

    def toConfig(self) -> Config:
        extra: dict[str, Any] = {}
        if self["backlog"] is not None:
            extra["backlog"] = self["backlog"]
        listen = tuple(self["listen"]) or (DEFAULT_LISTEN,)
        return Config(
            name=socketName(listen[0]) or "tsmux",
            listen=listen,
            mode=self["mode"],
            localapi=self["localapi"],
            dialer=self["dialer"],
            dialSelf=self["dial-self"],
            detectTimeout=self["detect-timeout"],
            handshakeTimeout=self["handshake-timeout"],
            dialTimeout=self["dial-timeout"],
            socksAllowUids=frozenset(self["socks-allow-uid"]),
            socksAllowGids=frozenset(self["socks-allow-gid"]),
            adminUids=frozenset(self["admin-uid"]),
            adminGids=frozenset(self["admin-gid"]),
            group=self["group"],
            maxConnections=self["max-connections"],
            maxConnectionsPerUid=self["max-connections-per-uid"],
            idleTimeout=self["idle-timeout"],
            halfCloseTimeout=self["half-close-timeout"],
            shutdownTimeout=self["shutdown-timeout"],
            operatorRefresh=self["operator-refresh"],
            logFormat=self["log-format"],
            socksAuth=self["socks-auth"],
            splice=not self["no-splice"],
            upstreamAuth=self["upstream-auth"],
            **extra,
        )


SOCKET_LIST_FLAGS = ("listen", "socks-allow-uid", "socks-allow-gid", "admin-uid", "admin-gid")
PROCESS_FLAGS = frozenset({"config", "log-format"})
_DEFAULT_MEANINGS = {
    "mode": _octalMode,
    "detect-timeout": _seconds,
    "handshake-timeout": _seconds,
    "dial-timeout": _seconds,
    "shutdown-timeout": _seconds,
    "half-close-timeout": _seconds,
    "dialer": DialerSpec.parse,
}
