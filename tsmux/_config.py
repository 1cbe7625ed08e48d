"""
The settings, defined once: L{Config}, parsed once from the command line
shared by C{tsmux} and C{twistd tsmux} (L{Options}), and handed on whole to
the service and, through L{tsmux._context.ConnectionContext}, to every
connection.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

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


YEAR = 86400 * 365
"""Seconds options are below this."""


def _octalMode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ValueError(f"expected an octal mode from 0000 to 0777 (like 0660), got {text!r}")
    return mode


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value:  # also NaN
        raise ValueError(f"expected a positive number of seconds, got {text!r}")
    if not value < YEAR:
        raise ValueError(f"expected a number of seconds below one year ({YEAR}), got {text!r}")
    return value


def _uid(text: str) -> int:
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ValueError(f"expected a user name or uid, got {text!r} (no such user)") from None


def _gid(text: str) -> int:
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"expected a group name or gid, got {text!r} (no such group)") from None


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _dialer(text: str) -> DialerSpec:
    try:
        return DialerSpec.parse(text)
    except ValueError:
        choices = ", ".join(DIALERS[:-1]) + " or " + DIALERS[-1]
        raise ValueError(f"expected {choices}, got {text!r}") from None


def _choice(*choices: str) -> Callable[[str], str]:
    def choose(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected {', '.join(choices[:-1])} or {choices[-1]}, got {text!r}")
        return text

    return choose


def _absolutePath(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"expected an absolute path, got {text!r}")
    return text


def _listenAddress(text: str) -> str:
    """C{--listen}: an absolute path or an endpoint description; a relative path is neither."""
    if text.startswith("/") or ":" in text:
        return text
    if not text:
        raise ValueError("expected an absolute path or an endpoint description, got ''")
    absolute = os.path.abspath(os.path.expanduser(text))
    raise ValueError(f"expected an absolute path, got the relative path {text!r} (use {absolute})")
