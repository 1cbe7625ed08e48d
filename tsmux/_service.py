"""
Configuration, the command line shared by C{tsmux} and C{twistd tsmux}, and
the service that listens.
"""

from __future__ import annotations

import grp
import pwd
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, clientFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from ._auth import Credentials, readUpstreamCredentials
from ._dialers import DEFAULT_DIAL_TIMEOUT, DirectDialer, LocalAPIDialer, LocalAPIHealth, SOCKS5Dialer
from ._errors import failureReason
from ._hangup import sweepHungUp
from ._interfaces import IDialer
from ._limits import ConnectionLimits, raiseFileLimit
from ._listen import (
    StartupError,
    defaultBacklog,
    listenOnDescription,
    listenOnPath,
    listenOnSystemd,
    notifySystemd,
    prepareSocketPath,
)
from ._localapi import LocalAPIAccess
from ._nc import NcDialer
from ._policy import AccessPolicy
from ._relay import quietConnect
from ._server import MuxFactory

DEFAULT_LISTEN = "/var/run/tailscale/tsmux.sock"
DEFAULT_LOCALAPI = "/var/run/tailscale/tailscaled.sock"
DIALERS = ("localapi", "direct", "socks5:ENDPOINT", "nc", "nc:CLI")
DIAL_SELF_POLICIES = ("refuse", "direct")


@dataclass(frozen=True)
class Config:
    """Everything tsmux is told at start, validated."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    mode: int = 0o660
    localapi: str = DEFAULT_LOCALAPI
    dialer: str = "localapi"
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
        from . import __version__

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
        dialer = self["dialer"]
        if dialer not in ("localapi", "direct", "nc") and not (
            (dialer.startswith("socks5:") and len(dialer) > 7) or (dialer.startswith("nc:") and len(dialer) > 3)
        ):
            raise usage.UsageError(f"--dialer must be one of {', '.join(DIALERS)}, not {dialer!r}")
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

    def toConfig(self) -> Config:
        extra: dict[str, Any] = {}
        if self["backlog"] is not None:
            extra["backlog"] = self["backlog"]
        return Config(
            listen=tuple(self["listen"]) or (DEFAULT_LISTEN,),
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


class TsmuxService(service.Service):
    """
    Listens on every configured address with one L{MuxFactory}.

    Listening happens in L{privilegedStartService} (before twistd drops
    privileges).  Stopping stops accepting at once (removing the sockets
    tsmux created), lets open connections finish for up to
    C{shutdownTimeout} seconds, then cuts the rest.
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.health = LocalAPIHealth(config.localapi, socksUsesIt=config.dialer == "localapi")
        self.access = LocalAPIAccess(reactor, config.localapi, config.dialTimeout)
        self.dialer = makeDialer(config, reactor, self.health, self.access)
        self.policy = AccessPolicy(
            socksAllowUids=config.socksAllowUids,
            socksAllowGids=config.socksAllowGids,
            adminUids=config.adminUids,
            adminGids=config.adminGids,
            dialNeedsPassword=config.socksAuth is not None,
        )
        self.factory = MuxFactory(
            reactor,
            self.dialer,
            self.access,
            detectTimeout=config.detectTimeout,
            handshakeTimeout=config.handshakeTimeout,
            health=self.health,
            policy=self.policy,
            idleTimeout=config.idleTimeout,
            halfCloseTimeout=config.halfCloseTimeout,
            credentials=Credentials.fromFile(config.socksAuth) if config.socksAuth else None,
            splice=config.splice,
        )
        self.factory.listening = list(config.listen)
        self._sweep: LoopingCall | None = None
        self._cutNow = False
        self.ports: list[IListeningPort] = []

    def preflight(self) -> None:
        """Check (and clean up stale sockets at) every path before listening anywhere."""
        for address in self.config.listen:
            if address.startswith("/"):
                prepareSocketPath(address)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        config = self.config
        self._fileLimits = raiseFileLimit()
        self.factory.limits = ConnectionLimits.derive(
            self._fileLimits[1], config.maxConnections, config.maxConnectionsPerUid
        )
        try:
            for address in config.listen:
                if address.startswith("/"):
                    port = listenOnPath(
                        self.reactor, address, self.factory, config.mode, config.backlog, group=config.group
                    )
                elif address.lower().startswith("systemd:"):
                    port = listenOnSystemd(self.reactor, address, self.factory)
                else:
                    port = listenOnDescription(self.reactor, address, self.factory, config.backlog)
                self.ports.append(port)
        except StartupError:
            for port in self.ports:
                port.stopListening()
            self.ports = []
            raise

    def startService(self) -> None:
        if not self.ports:
            self.privilegedStartService()
        super().startService()
        self.log.info(
            "tsmux listening on {addresses}; dialer {dialer}; LocalAPI {localapi}",
            addresses=", ".join(self.config.listen),
            dialer=self.dialer.description,
            localapi=self.config.localapi,
        )
        limits = self.factory.limits
        before, after = self._fileLimits
        self.log.info(
            "connection limits: {total} in all ({reserve} kept for root), {perUid} per uid; descriptor limit "
            "{after}{raised}",
            total=limits.total,
            reserve=limits.rootReserve,
            perUid=limits.perUid,
            after=after,
            raised=f" (raised from {before})" if after != before else "",
        )
        if self.config.maxConnections is not None and limits.total < self.config.maxConnections:
            self.log.warn(
                "--max-connections {asked} lowered to {total}: the descriptor limit ({after}) carries no more",
                asked=self.config.maxConnections,
                total=limits.total,
                after=after,
            )
        if self.config.operatorRefresh is not None:
            self.log.warn(
                "--operator-refresh is obsolete and ignored: tsmux connects to tailscaled as each caller, "
                "and tailscaled applies its own operator rules"
            )
        # Decided now, not at import: twistd may have dropped root since.
        self.access.decide()
        self.probeLocalAPI()
        notifySystemd(f"READY=1\nSTATUS=listening on {', '.join(self.config.listen)}")
        timeouts = [t for t in (self.config.idleTimeout, self.config.halfCloseTimeout) if t is not None]
        self._sweep = LoopingCall(self.sweep)
        self._sweep.clock = self.reactor
        # Relays are closed between their timeout and a quarter (at most 1 s) after it; a
        # peer that hung up while not being read is noticed within a second.
        self._sweep.start(min([1.0] + [t / 4 for t in timeouts]), now=False)

    def sweep(self) -> None:
        """Periodic: idle and half-close timeouts, and peers that left while tsmux was not reading them."""
        self.factory.closeIdleRelays()
        sweepHungUp(self.reactor, self.factory.relays)

    def probeLocalAPI(self) -> defer.Deferred[None]:
        """Say once, at start, whether tailscaled's LocalAPI answers."""
        endpoint = UNIXClientEndpoint(self.reactor, self.config.localapi, timeout=self.config.dialTimeout)
        connecting = quietConnect(endpoint, Protocol())

        def reachable(protocol: Protocol) -> None:
            protocol.transport.loseConnection()
            self.health.succeeded()

        def unreachable(failure: Failure) -> None:
            self.health.failed(failureReason(failure))

        return connecting.addCallbacks(reachable, unreachable)

    def cutNow(self) -> None:
        """A second signal during shutdown: stop waiting for open connections."""
        if not self._cutNow:
            self.log.info("second signal: cutting open connections now")
        self._cutNow = True

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        notifySystemd("STOPPING=1")
        ports, self.ports = self.ports, []
        await defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self.factory.refusals.stop()
        closeDialer = getattr(self.dialer, "close", None)
        if closeDialer is not None:
            await closeDialer()
        open = self.factory.openConnections
        if open:
            self.log.info(
                "stopped accepting; waiting up to {timeout:g} s for {count} open connection(s)",
                timeout=self.config.shutdownTimeout,
                count=len(open),
            )
        deadline = self.reactor.seconds() + self.config.shutdownTimeout
        while open and self.reactor.seconds() < deadline and not self._cutNow:
            await deferLater(self.reactor, min(0.05, max(0.0, deadline - self.reactor.seconds())))
        if open:
            self.log.warn("shutting down: cutting {count} connection(s)", count=len(open))
            for record in list(open):
                record.cutAtShutdown = True
                if record.transport is not None:
                    record.transport.abortConnection()
            for relay in list(self.factory.relays):
                relay.abort()
            # Aborted connections report their loss on the next turn; let their lines be logged.
            await deferLater(self.reactor, 0.05)
            for record in list(open):
                record.finish("cut-at-shutdown", "still open when tsmux stopped")


def makeDialer(config: Config, reactor: Any, health: LocalAPIHealth, access: LocalAPIAccess) -> IDialer:
    if config.dialer == "direct":
        return DirectDialer(reactor, config.dialTimeout)
    if config.dialer.startswith("socks5:"):
        description = config.dialer[len("socks5:") :]
        try:
            endpoint = clientFromString(reactor, description)
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise StartupError(f"bad --dialer socks5:{description}: {error}") from None
        credentials = readUpstreamCredentials(config.upstreamAuth) if config.upstreamAuth else None
        return SOCKS5Dialer(reactor, endpoint, description, credentials, timeout=config.dialTimeout)
    if config.dialer == "nc" or config.dialer.startswith("nc:"):
        cli = config.dialer[3:] or "tailscale"
        found = shutil.which(cli)
        if found is None:
            raise StartupError(f"--dialer {config.dialer}: {cli} is not an executable (nor on PATH)")
        return NcDialer(reactor, found, config.localapi, timeout=config.dialTimeout, access=access)
    return LocalAPIDialer(
        reactor,
        access,
        dialSelf=config.dialSelf,  # type: ignore[arg-type]
        timeout=config.dialTimeout,
        health=health,
    )


def buildService(config: Config, reactor: Any = None) -> TsmuxService:
    """The service for C{config}, its listen paths checked; raises L{StartupError}."""
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    tsmux = TsmuxService(config, reactor)
    tsmux.preflight()
    return tsmux


def makeService(options: Options) -> TsmuxService:
    """
    The twistd entry point.  A startup problem is one line on stderr and
    exit status 1, not a traceback.
    """
    try:
        return buildService(options.toConfig())
    except StartupError as error:
        sys.stderr.write(f"tsmux: {error}\n")
        raise SystemExit(1) from None


def parseArguments(argv: Sequence[str]) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options
