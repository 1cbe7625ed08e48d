"""
The command line shared by C{tsmux} and C{twistd tsmux}: L{Options}, parsed
once into a L{tsmux._config.DaemonConfig} (one socket from the flags, or the
C{--config} file's sockets).  Its help is laid out by L{tsmux._help}.
"""

from __future__ import annotations

import getopt
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.python import usage

from ._config import (
    DEFAULT_DIAL_TIMEOUT,
    DEFAULT_LISTEN,
    DEFAULT_LOCALAPI,
    DIAL_SELF_POLICIES,
    Config,
    DaemonConfig,
    _absolutePath,
    _choice,
    _count,
    _dialer,
    _gid,
    _listenAddress,
    _octalMode,
    _seconds,
    _uid,
    socketName,
)
from ._configfile import loadConfigFile
from ._help import reportUsageError, synopsis, unexpectedArgument, usageErrorText, usageText


def _given(name: str, coerce: Callable[[str], Any], text: str) -> Any:
    """C{coerce(text)}, or a usage error naming the option: C{--NAME: expected FORM, got 'TEXT'}."""
    try:
        return coerce(text)
    except ValueError as error:
        raise usage.UsageError(f"--{name}: {error}") from None


_COERCIONS: dict[str, Callable[[str], Any]] = {
    "mode": _octalMode,
    "group": _gid,
    "backlog": _count,
    "localapi": _absolutePath,
    "dialer": _dialer,
    "dial-self": _choice(*DIAL_SELF_POLICIES),
    "detect-timeout": _seconds,
    "handshake-timeout": _seconds,
    "dial-timeout": _seconds,
    "idle-timeout": _seconds,
    "half-close-timeout": _seconds,
    "shutdown-timeout": _seconds,
    "operator-refresh": _seconds,
    "max-connections": _count,
    "max-connections-per-uid": _count,
    "log-format": _choice("text", "json"),
}
"""
How each C{optParameters} value is checked and converted, in L{Options.postOptions}.  usage.Options'
own coercion would wrap every message in "Parameter type enforcement failed"; defaults are kept as a
user would type them (so --help shows "0660") and go through the same conversion.
"""


class Options(usage.Options):
    isDaemon = True
    """The daemon's own options (for the help's layout); a subcommand that reuses them says False."""

    """
    The command line, for both C{tsmux} and C{twistd -n tsmux}.  C{--help} is
    grouped (L{tsmux._help}); a bad option is a one-line L{usage.UsageError}
    naming the option and the form it expects (C{tsmux} reports it, and under
    twistd L{parseOptions} reports it itself: twistd would print every option
    first).
    """

    compData: usage.Completions
    """Shell completion for each option (set below the class: it reads the options)."""
    synopsis = "Usage: tsmux [options]"
    """The daemon's; a subcommand's options class (C{tsmux check}) sets its own, and gets no examples."""
    longdesc = "tsmux serves SOCKS5, HTTP CONNECT and tailscaled's LocalAPI on one Unix socket."
    optFlags = [
        [
            "no-splice",
            None,
            "Relay in Python only. By default a relay moves to splice(2) after 256 KiB one way, when "
            "both sides are plain sockets.",
        ],
    ]
    optParameters = [
        [
            "config",
            "c",
            None,
            "Sockets from a TOML file instead of the flags. Each socket has its own offer, callers and "
            "rules (docs: Sockets and rules); SIGHUP re-reads the file. Not combined with the flags that "
            "describe a socket; --log-format still applies.",
        ],
        [
            "mode",
            None,
            "0660",
            "Permissions (octal) of sockets given as a path. A socket never exists with a wider mode, not "
            "even briefly.",
        ],
        [
            "group",
            None,
            None,
            "Group (name or gid) of sockets given as a path. With --mode 0660, its members may connect.",
        ],
        ["backlog", None, None, "Accept queue length."],
        [
            "dialer",
            None,
            "localapi",
            "How SOCKS5 and HTTP CONNECT dials leave. localapi: through tailscaled, as the caller "
            "(MagicDNS works); direct: TCP from this host, for use without tailscaled; socks5:ENDPOINT: "
            "an upstream SOCKS5 server as a Twisted client endpoint (socks5:tcp:127.0.0.1:1080); nc or "
            "nc:CLI: a 'tailscale nc' process per connection.",
        ],
        [
            "localapi",
            None,
            DEFAULT_LOCALAPI,
            "tailscaled's LocalAPI socket. Other HTTP is passed to it on a connection made as the caller, "
            "and the localapi dialer dials through it.",
        ],
        [
            "dial-self",
            None,
            "refuse",
            "When tailscaled says Dial-Self (not a tailnet target; 1.98 or later): refuse, or direct "
            "(dial it from this host, on a socket owned by the caller).",
        ],
        [
            "upstream-auth",
            None,
            None,
            "File with one user:password line. The socks5: dialer presents it upstream.",
        ],
        [
            "socks-auth",
            None,
            None,
            "File of user:password lines. SOCKS5 and HTTP CONNECT clients must then authenticate, and "
            "non-admins' LocalAPI dials are refused; repeated wrong passwords from one uid are slowed "
            "down. Refused if others may read it or anyone but its owner may write it.",
        ],
        [
            "max-connections",
            None,
            None,
            "Most client connections open at once, handshakes included. More are closed at accept and "
            "logged once per burst; an eighth is kept for uid 0.",
        ],
        ["max-connections-per-uid", None, None, "Most connections one uid may hold at once."],
        ["detect-timeout", None, "15", "Seconds a new connection has to show its protocol."],
        [
            "handshake-timeout",
            None,
            "30",
            "Seconds a client has, once its protocol is known, for its SOCKS5 negotiation and request, its "
            "CONNECT request or its /tsmux/ request.",
        ],
        [
            "dial-timeout",
            None,
            str(DEFAULT_DIAL_TIMEOUT).removesuffix(".0"),
            "Seconds a dial (and a LocalAPI connect) may take.",
        ],
        ["idle-timeout", None, None, "Close a relay after this many seconds with no bytes either way."],
        [
            "half-close-timeout",
            None,
            "300",
            "Close a relay when one direction has ended and no byte moved for this many seconds.",
        ],
        [
            "shutdown-timeout",
            None,
            "30",
            "Seconds open connections get to finish on SIGTERM or SIGINT before they are cut.",
        ],
        [
            "log-format",
            None,
            "text",
            "text, or json (one JSON object per line). Under twistd it has no effect: use twistd's "
            "--logger=tsmux.jsonLogObserver.",
        ],
        [
            "operator-refresh",
            None,
            None,
            "Obsolete and ignored. tailscaled applies its own operator rules to each caller.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        for name in ("socks-allow-uid", "socks-allow-gid", "admin-uid", "admin-gid"):
            self[name] = set()

    def opt_listen(self, address: str) -> None:
        """Where to listen; may repeat: a Unix socket's absolute path (tsmux manages the file), systemd:domain=UNIX:name=NAME or a Twisted endpoint (tcp:1080:interface=127.0.0.1)."""  # noqa: E501 - usage.Options reads the docstring
        self["listen"].append(_given("listen", _listenAddress, address))

    def opt_socks_allow_uid(self, user: str) -> None:
        """Only this user (name or uid) may dial, through SOCKS5, HTTP CONNECT or the LocalAPI's dial; may repeat. Others are refused before any password is asked."""  # noqa: E501
        self["socks-allow-uid"].add(_given("socks-allow-uid", _uid, user))

    def opt_socks_allow_gid(self, group: str) -> None:
        """Members of this group (name or gid; primary or supplementary) may dial; may repeat."""
        self["socks-allow-gid"].add(_given("socks-allow-gid", _gid, group))

    def opt_admin_uid(self, user: str) -> None:
        """This user (name or uid) is one of tsmux's admins: it may use tsmux's /tsmux/ API (status, metrics, reload) and, with --socks-auth, the LocalAPI's dial; may repeat. LocalAPI rights stay tailscaled's to give."""  # noqa: E501
        self["admin-uid"].add(_given("admin-uid", _uid, user))

    def opt_admin_gid(self, group: str) -> None:
        """Members of this group (name or gid) are tsmux's admins; may repeat."""
        self["admin-gid"].add(_given("admin-gid", _gid, group))

    def opt_help(self) -> None:
        """Show this help and exit."""
        sys.stdout.write(str(self) + "\n")
        raise SystemExit(0)

    opt_h = opt_help

    def opt_version(self) -> None:
        """Show tsmux's version and exit."""
        from ._version import __version__

        print(f"tsmux {__version__}")
        raise SystemExit(0)

    def getSynopsis(self) -> str:

        return synopsis(self)

    def getUsage(self, width: int | None = None) -> str:

        return usageText(self, width)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse, turning Twisted's and getopt's wording into tsmux's.  Under
        twistd (a parent), a bad option is reported here, on stderr with
        status 2: twistd itself would print every option before it.
        """
        self._given = self._optionsGiven(sys.argv[1:] if options is None else list(options))
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            message = usageErrorText(self, error)
            if self.parent is not None:
                reportUsageError(message, "twistd tsmux")
            raise usage.UsageError(message) from None

    def _optionsGiven(self, arguments: list[str]) -> set[str]:
        """
        The long names of the options on the command line, as usage.Options
        will read them (getopt, with its abbreviations and short forms):
        a socket flag given with its default value still conflicts with
        C{--config}.  Empty when getopt refuses them (parseOptions says why).
        """
        try:
            pairs, _ = getopt.getopt(arguments, self.shortOpt, self.longOpt)
        except getopt.GetoptError:
            return set()
        given = set()
        for option, _ in pairs:
            name = option.lstrip("-")
            given.add(self.synonyms.get(name, name))
        return given

    def parseArgs(self, *arguments: str) -> None:
        if arguments:
            raise usage.UsageError(unexpectedArgument(self, arguments[0]))

    def postOptions(self) -> None:
        for name, coerce in _COERCIONS.items():
            if isinstance(self[name], str):
                self[name] = _given(name, coerce, self[name])
        if self["config"] is not None:
            given = self.socketFlagsGiven()
            if given:
                raise usage.UsageError(
                    f"--config describes the sockets; {', '.join(given)} cannot be combined with it "
                    "(put them in the file)"
                )

    def socketFlagsGiven(self) -> list[str]:
        """The flags given that describe a socket (they conflict with C{--config})."""
        given: set[str] = getattr(self, "_given", set())
        return [f"--{name}" for name in sorted(given) if name not in PROCESS_FLAGS]

    def toDaemonConfig(self) -> DaemonConfig:
        """The daemon this command line describes: one socket from the flags, or the C{--config} file."""
        if self["config"] is not None:
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
PROCESS_FLAGS = frozenset({"config", "log-format", "help", "version", "strict"})
"""Options that combine with --config: they are not about a socket (strict: tsmux check's)."""


class _Choices(usage.CompleteList):
    """Twisted's list of choices, with the colons of C{socks5:} escaped: C{_arguments} splits its specs at them."""

    def _shellCode(self, optName: str, shellType: str) -> str:
        code: str = super()._shellCode(optName, shellType)
        head, _, items = code.partition(":(")
        return head + ":(" + items.replace(":", "\\:")


def _completions() -> usage.Completions:
    """What shell completion offers for each option's value (zsh through Twisted, bash through L{tsmux._completion})."""
    users = usage.CompleteUsernames()
    groups = usage.CompleteGroups()
    files = usage.CompleteFiles()
    actions: dict[str, usage.Completer] = {
        "listen": files,
        "config": files,
        "localapi": files,
        "socks-auth": files,
        "upstream-auth": files,
        "group": groups,
        "socks-allow-uid": users,
        "admin-uid": users,
        "socks-allow-gid": groups,
        "admin-gid": groups,
        "dialer": _Choices(["localapi", "direct", "nc", "socks5:", "nc:"]),
        "dial-self": usage.CompleteList(list(DIAL_SELF_POLICIES)),
        "log-format": usage.CompleteList(["text", "json"]),
        "mode": usage.Completer(descr="octal mode"),
    }
    for name, coerce in _COERCIONS.items():
        if coerce is _seconds:
            actions[name] = usage.Completer(descr="seconds")
        elif coerce is _count:
            actions[name] = usage.Completer(descr="number")
    return usage.Completions(
        descriptions=_shortDescriptions(Options),
        optActions=actions,
        multiUse=list(SOCKET_LIST_FLAGS),
    )


def _shortDescriptions(options: type[Options]) -> dict[str, str]:
    """Each option's first sentence: what a completion menu shows beside it."""
    docs: dict[str, str] = {}
    for entry in [*options.optFlags, *options.optParameters]:
        docs[str(entry[0])] = str(entry[3] if len(entry) > 3 else entry[2])
    for attribute in dir(options):
        if attribute.startswith("opt_") and len(attribute) > 5:
            docs[attribute[4:].replace("_", "-")] = getattr(options, attribute).__doc__ or ""
    return {name: _firstSentence(" ".join(doc.split())) for name, doc in docs.items()}


def _firstSentence(text: str, limit: int = 72) -> str:
    """Up to the first ". " or "; " outside parentheses; if still long, up to ": ", then cut at a word."""
    depth = 0
    cuts: dict[str, int] = {}
    for index, character in enumerate(text):
        depth += {"(": 1, ")": -1}.get(character, 0)
        if depth == 0 and text[index : index + 2] in (". ", "; ", ": "):
            cuts.setdefault(text[index], index)
    end = min([cuts.get(".", len(text)), cuts.get(";", len(text))])
    if end > limit and cuts.get(":", end) < end:
        end = cuts[":"]
    text = text[:end].rstrip(".")
    if len(text) > limit:
        text = text[: text.rfind(" ", 0, limit - 3)] + "..."
    return text


Options.compData = _completions()
