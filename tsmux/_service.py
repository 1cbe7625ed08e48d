"""
Configuration, the command line shared by C{tsmux} and C{twistd tsmux}, and
the service that listens.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from ._dialers import DEFAULT_DIAL_TIMEOUT, DirectDialer, LocalAPIDialer, LocalAPIHealth
from ._errors import failureReason
from ._interfaces import IDialer
from ._listen import (
    StartupError,
    defaultBacklog,
    listenOnDescription,
    listenOnPath,
    prepareSocketPath,
)
from ._relay import quietConnect
from ._server import MuxFactory

DEFAULT_LISTEN = "/var/run/tailscale/tsmux.sock"
DEFAULT_LOCALAPI = "/var/run/tailscale/tailscaled.sock"
DIALERS = ("localapi", "direct")
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


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"wants a positive whole number, not {text!r}")
    return int(text)


class Options(usage.Options):
    """The command line, for both C{tsmux} and C{twistd -n tsmux}."""

    synopsis = "Usage: tsmux [options]"
    longdesc = (
        "tsmux serves SOCKS5 and tailscaled's LocalAPI on one Unix socket, so that file "
        "permissions decide who may use Tailscale's proxy. Connections whose first byte is "
        "0x05 get a SOCKS5 server whose CONNECTs go out through --dialer; HTTP requests are "
        "passed byte for byte to tailscaled's LocalAPI (--localapi), so the tailscale CLI "
        "and curl work through tsmux unchanged. Anything else is refused and logged."
    )
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
            "How SOCKS5 CONNECTs leave: 'localapi' through tailscaled "
            "(names resolved by tailscaled, MagicDNS works) or 'direct' (TCP from this host, as tsmux's "
            "user; for use without tailscaled).",
        ],
        [
            "dial-self",
            None,
            "refuse",
            "When tailscaled (>= 1.98) answers a dial with Dial-Self (the "
            "target is not on the tailnet): 'refuse' (SOCKS5 reply 02) or 'direct' (dial it from this "
            "host, as tsmux's user).",
        ],
        ["detect-timeout", None, "15", "Seconds a new connection has to show its protocol.", _seconds],
        [
            "handshake-timeout",
            None,
            "30",
            "Seconds a SOCKS5 client has for method negotiation and its request.",
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

    def opt_listen(self, address: str) -> None:
        """Where to listen; may repeat. An absolute path is a Unix socket tsmux manages (--mode, stale sockets replaced, removed on exit). Anything else is a Twisted endpoint description (unix:/path, systemd:domain=UNIX:index=0, tcp:1080:interface=127.0.0.1), used as Twisted gives it: --mode and stale-socket handling do not apply there. [default: /var/run/tailscale/tsmux.sock]"""  # noqa: E501 - usage.Options prints the docstring as is
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
        )
        for name, coerce in coercions:
            if isinstance(self[name], str):
                self[name] = coerce(self[name])
        for name, allowed in (("dialer", DIALERS), ("dial-self", DIAL_SELF_POLICIES)):
            if self[name] not in allowed:
                raise usage.UsageError(f"--{name} must be one of {', '.join(allowed)}, not {self[name]!r}")
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
            **extra,
        )


class TsmuxService(service.Service):
    """
    Listens on every configured address with one L{MuxFactory}.

    Listening happens in L{privilegedStartService} (before twistd drops
    privileges); stopping removes the sockets tsmux created.
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.health = LocalAPIHealth(config.localapi, socksUsesIt=config.dialer == "localapi")
        self.dialer = makeDialer(config, reactor, self.health)
        self.factory = MuxFactory(
            reactor,
            self.dialer,
            config.localapi,
            detectTimeout=config.detectTimeout,
            handshakeTimeout=config.handshakeTimeout,
            connectTimeout=config.dialTimeout,
            health=self.health,
        )
        self.ports: list[IListeningPort] = []

    def preflight(self) -> None:
        """Check (and clean up stale sockets at) every path before listening anywhere."""
        for address in self.config.listen:
            if address.startswith("/"):
                prepareSocketPath(address)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            for address in self.config.listen:
                if address.startswith("/"):
                    port = listenOnPath(self.reactor, address, self.factory, self.config.mode, self.config.backlog)
                else:
                    port = listenOnDescription(self.reactor, address, self.factory, self.config.backlog)
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
        self.probeLocalAPI()

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

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        ports, self.ports = self.ports, []
        stopping = [defer.maybeDeferred(port.stopListening) for port in ports]
        return defer.gatherResults(stopping).addCallback(lambda _: None)


def makeDialer(config: Config, reactor: Any, health: LocalAPIHealth) -> IDialer:
    direct = DirectDialer(reactor, config.dialTimeout)
    if config.dialer == "direct":
        return direct
    return LocalAPIDialer(
        reactor,
        config.localapi,
        dialSelf=config.dialSelf,  # type: ignore[arg-type]
        timeout=config.dialTimeout,
        selfDialer=direct,
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
