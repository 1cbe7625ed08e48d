"""
C{tsmux check}: the configuration checked without starting anything, then
the host, one line per finding.

The first line is the configuration's summary (C{3 sockets, 7 rules}).
Every other line starts with C{ok:}, C{warning:} or C{problem:}; a problem
or a warning says how to fix it after C{; fix:}.  Problems are what would
stop the daemon from starting (exit 1); warnings are what it would start
with but should not (exit 0, or 1 with C{--strict}).

Nothing is started, created or removed: no reactor runs, a stale socket is
reported, not removed, and tailscaled is asked one blocking question.  What
is found is found by I{this} process, with its uid, capabilities and
limits: run it as the user the daemon runs as.
"""

from __future__ import annotations

import errno
import grp
import http.client
import json
import os
import resource
import shutil
import socket
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.testing import MemoryReactor

from ._ascaller import canActAsOthers
from ._auth import Credentials, readUpstreamCredentials
from ._config import Config, DaemonConfig
from ._configfile import ConfigError
from ._help import parseOrExit
from ._limits import NR_OPEN, connectionsForDescriptors
from ._listen import StartupError, withBacklog
from ._localapi import LOCALAPI_HOST
from ._options import Options
from ._rules import RuleSet

Level = Literal["ok", "warning", "problem"]

LOCALAPI_TIMEOUT = 3.0
"""Seconds tailscaled has to answer C{GET /localapi/v0/status}."""
PROBE_TIMEOUT = 2.0
"""Seconds a probe of a listen address waits for a connection (as the daemon's own probe does)."""
LOW_NOFILE = 4096
"""A hard descriptor limit below this is a warning."""
SUGGESTED_NOFILE = 1048576
"""What the shipped systemd unit sets (C{LimitNOFILE=}), suggested when the limit is low."""
MAX_STATUS_BYTES = 4 * 1024 * 1024
TAILSCALED_DIRS = ("/var/run/tailscale", "/run/tailscale")
"""Directories tailscaled's systemd unit creates."""


@dataclass(frozen=True)
class Finding:
    """One line of C{tsmux check}'s output."""

    level: Level
    text: str
    fix: str | None = None

    def line(self) -> str:
        return f"{self.level}: {self.text}" + (f"; fix: {self.fix}" if self.fix else "")


def _ok(text: str) -> Finding:
    return Finding("ok", text)


def _warning(text: str, fix: str | None = None) -> Finding:
    return Finding("warning", text, fix)


def _problem(text: str, fix: str) -> Finding:
    return Finding("problem", text, fix)


class CheckOptions(Options):
    """C{tsmux check}: the daemon's own options, checked without starting anything."""

    isDaemon = False

    synopsis = "Usage: tsmux check [--config FILE | the daemon's options] [--strict]"
    longdesc = (
        "Check a configuration and this host without starting anything. The first line is the "
        'configuration\'s summary ("3 sockets, 7 rules"); then one line per finding, starting with '
        '"ok:", "warning:" or "problem:", and for what is wrong, "; fix: ..." with how to fix it: '
        "each listen address, tailscaled's LocalAPI (answering, and whether its socket is open to every "
        "local user), whether this process could act as its callers, and the descriptor limit. Exit 1 "
        "if there is a problem (tsmux would not start), or with --strict a warning; else 0. What is "
        "found is this process's (its uid, capabilities, limits): run it as the user tsmux runs as."
    )
    optFlags = [["strict", None, "Exit 1 on warnings too, not only on problems."]]


# Listen addresses.


def _probe(family: int, address: Any) -> OSError | None:
    """Connect to C{address} and hang up: C{None} when something answered, else the error."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(address)
    except OSError as error:
        return error
    finally:
        probe.close()
    return None


def _directoryFindings(label: str, path: str) -> Finding | None:
    """The directory of C{path} as L{tsmux._listen.prepareSocketPath} sees it: a problem, or C{None}."""
    directory = os.path.dirname(path) or "/"
    if not os.path.isdir(directory):
        tailscaleds = " (tailscaled's unit creates it: start tailscaled first)" if directory in TAILSCALED_DIRS else ""
        return _problem(
            f"{label}: directory {directory} does not exist",
            f"create it before tsmux starts (tsmux does not){tailscaleds}, e.g. with a tmpfiles.d line "
            f"'d {directory} 0755 root root', or listen elsewhere",
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        return _problem(
            f"{label}: directory {directory} is not writable by uid {os.getuid()}",
            f"run tsmux as a user who may create files in {directory} (e.g. root; twistd may drop root after "
            "listening), or listen elsewhere",
        )
    if len(os.fsencode(path)) > 107:
        return _problem(f"{label}: a Unix socket path is at most 107 bytes", "use a shorter path")
    return None


def checkSocketPath(label: str, path: str) -> Finding:
    """
    What L{tsmux._listen.prepareSocketPath} would decide for C{path}, without
    its one action: a stale socket is reported, not removed.
    """
    wrong = _directoryFindings(label, path)
    if wrong is not None:
        return wrong
    directory = os.path.dirname(path) or "/"
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return _ok(f"{label}: free, in writable directory {directory}")
    except OSError as error:
        return _problem(f"{label}: cannot look at it ({error.strerror})", "run tsmux check as the user tsmux runs as")
    if not stat.S_ISSOCK(info.st_mode):
        return _problem(
            f"{label}: it exists and is not a socket",
            "remove it or listen elsewhere (tsmux replaces only a stale socket)",
        )
    failed = _probe(socket.AF_UNIX, path)
    if failed is None:
        return _problem(
            f"{label}: another server is already listening there",
            "stop that server (another tsmux? tailscaled itself?) or listen elsewhere",
        )
    if isinstance(failed, (ConnectionRefusedError, FileNotFoundError)) or failed.errno in (
        errno.ECONNREFUSED,
        errno.ENOENT,
    ):
        return _ok(f"{label}: stale socket, tsmux would remove it (nothing answers there)")
    return _problem(
        f"{label}: cannot tell whether it is in use ({failed.strerror or failed})",
        "run tsmux check as the user tsmux runs as, or remove the socket if nothing uses it",
    )


def _describedAddress(description: str) -> tuple[int, Any] | None:
    """Where a C{unix:} or C{tcp:} description would listen, to probe for a live server there."""
    kind, _, rest = description.partition(":")
    kind = kind.lower()
    parts = [part.replace("\0", ":") for part in rest.replace("\\:", "\0").split(":")]
    positional = [part for part in parts if "=" not in part]
    options = {key: value for key, _, value in (part.partition("=") for part in parts if "=" in part)}
    if kind == "unix":
        address = options.get("address") or (positional[0] if positional else "")
        return (socket.AF_UNIX, address) if address.startswith("/") else None
    if kind in ("tcp", "tcp6"):
        port = options.get("port") or (positional[0] if positional else "")
        if not port.isdigit() or int(port) == 0:
            return None
        interface = options.get("interface", "")
        if interface in ("", "0.0.0.0"):
            interface = "::1" if kind == "tcp6" else "127.0.0.1"
        elif interface == "::":
            interface = "::1"
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        return family, (interface, int(port))
    return None


def checkDescription(label: str, description: str, backlog: int) -> Finding:
    """An endpoint description: Twisted must take it, and nothing may answer where it would listen."""
    if description.lower().startswith("systemd:"):
        return _ok(f"{label}: a socket systemd passes at start (not checked here)")
    try:
        serverFromString(MemoryReactor(), withBacklog(description, backlog))
    except (ValueError, KeyError, IndexError, TypeError) as error:
        return _problem(f"{label}: Twisted does not take this description ({error})", "correct the listen address")
    where = _describedAddress(description)
    if where is None:
        return _ok(f"{label}: a valid endpoint description (where it listens is Twisted's to check)")
    family, address = where
    if family == socket.AF_UNIX:
        wrong = _directoryFindings(label, address)
        if wrong is not None:
            return wrong
    if _probe(family, address) is None:
        return _problem(
            f"{label}: another server is already listening there",
            "stop that server or listen elsewhere",
        )
    return _ok(f"{label}: nothing listens there yet")


def _groupName(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)


def checkGroup(label: str, config: Config) -> Finding | None:
    """Whether this process may give the socket its group (C{chown} to a group needs root or membership)."""
    if config.group is None or not any(address.startswith("/") for address in config.listen):
        return None
    group = _groupName(config.group)
    if os.geteuid() == 0 or config.group == os.getegid() or config.group in os.getgroups():
        return _ok(f"{label}: may give its socket group {group}")
    return _problem(
        f"{label}: uid {os.geteuid()} cannot give its socket group {group} (neither root nor a member)",
        f"run tsmux as root or as a member of group {group}",
    )


def checkSecrets(label: str, config: Config) -> Iterable[Finding]:
    """The password files tsmux reads at start, read the same way (and refused for the same reasons)."""
    if config.socksAuth is not None:
        try:
            users = len(Credentials.fromFile(config.socksAuth).users)
        except StartupError as error:
            yield _problem(f"{label}: {error}", "correct the file (user:password lines, mode 0600 or 0640)")
        else:
            yield _ok(f"{label}: --socks-auth file {config.socksAuth}: {users} user{'s' * (users != 1)}")
    if config.upstreamAuth is not None:
        try:
            readUpstreamCredentials(config.upstreamAuth)
        except StartupError as error:
            yield _problem(f"{label}: {error}", "correct the file (one user:password line, mode 0600 or 0640)")
        else:
            yield _ok(f"{label}: --upstream-auth file {config.upstreamAuth} has its user:password line")


def checkDialer(label: str, config: Config) -> Finding | None:
    """The C{socks5:} endpoint must parse and the C{nc} CLI exist, as at start; other dialers need nothing."""
    spec = config.dialer
    if spec.kind == "socks5":
        try:
            clientFromString(MemoryReactor(), spec.argument or "")
        except (ValueError, KeyError, IndexError, TypeError) as error:
            return _problem(
                f"{label}: bad --dialer {spec}: {error}",
                "give a Twisted client endpoint, e.g. socks5:tcp:127.0.0.1:1080",
            )
        return _ok(f"{label}: dialer {spec}")
    if spec.kind == "nc":
        cli = spec.argument or "tailscale"
        found = shutil.which(cli)
        if found is None:
            return _problem(
                f"{label}: --dialer {spec}: {cli} is not an executable (nor on PATH)",
                "install the tailscale CLI or name it: --dialer nc:/path/to/tailscale",
            )
        return _ok(f"{label}: dialer nc runs {found}")
    return None


def socketFindings(daemon: DaemonConfig) -> Iterable[Finding]:
    seen: dict[str, str] = {}
    for config in daemon.sockets:
        for address in config.listen:
            label = f"socket {config.name}: {address}"
            if address in seen:
                yield _problem(f"{label}: already where socket {seen[address]} listens", "listen elsewhere")
                continue
            seen[address] = config.name
            if address.startswith("/"):
                yield checkSocketPath(label, address)
            else:
                yield checkDescription(label, address, config.backlog)
        label = f"socket {config.name}"
        group = checkGroup(label, config)
        if group is not None:
            yield group
        yield from checkSecrets(label, config)
        dialer = checkDialer(label, config)
        if dialer is not None:
            yield dialer


# tailscaled.


def usesTailscaled(config: Config) -> bool:
    """Whether this socket talks to tailscaled: it offers its LocalAPI, dials through it, or has rules that need it."""
    return (
        "localapi" in config.offer
        or config.dialer.kind in ("localapi", "nc")
        or bool(config.rules and RuleSet(config.name, config.rules).needsNetmap)
    )


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: one blocking request, with a timeout on connecting and reading."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(LOCALAPI_HOST, timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class LocalAPIUnanswered(Exception):
    """tailscaled did not give a usable answer; the message says why, in a few words."""


def localapiStatus(path: str, timeout: float = LOCALAPI_TIMEOUT) -> dict[str, Any]:
    """C{GET /localapi/v0/status?peers=false} from tailscaled at C{path}, blocking; raises L{LocalAPIUnanswered}."""
    connection = _UnixHTTPConnection(path, timeout)
    try:
        connection.request("GET", "/localapi/v0/status?peers=false")
        response = connection.getresponse()
        body = response.read(MAX_STATUS_BYTES)
    except FileNotFoundError:
        raise LocalAPIUnanswered("no socket there") from None
    except ConnectionRefusedError:
        raise LocalAPIUnanswered("nothing listens there (a stale socket?)") from None
    except PermissionError:
        raise LocalAPIUnanswered(f"permission denied to uid {os.geteuid()}") from None
    except TimeoutError:
        raise LocalAPIUnanswered(f"no answer within {timeout:g} s") from None
    except OSError as error:
        raise LocalAPIUnanswered(error.strerror or str(error)) from None
    except http.client.HTTPException as error:
        raise LocalAPIUnanswered(f"not an HTTP answer ({type(error).__name__})") from None
    finally:
        connection.close()
    if response.status != 200:
        text = body.decode("utf-8", "replace").strip()[:200]
        raise LocalAPIUnanswered(f"HTTP {response.status}: {text}")
    try:
        status = json.loads(body)
    except ValueError:
        raise LocalAPIUnanswered("its answer is not JSON") from None
    if not isinstance(status, dict):
        raise LocalAPIUnanswered("its answer is not a JSON object")
    return status


def checkLocalAPI(path: str) -> Finding:
    try:
        status = localapiStatus(path)
    except LocalAPIUnanswered as why:
        return _warning(
            f"tailscaled's LocalAPI at {path} does not answer ({why}): tsmux would start, but LocalAPI requests "
            "get 502, dials through tailscaled fail and rules that need its status deny until it answers",
            "start tailscaled, or point tsmux at its socket (--localapi, or localapi = in the file)",
        )
    version = status.get("Version") or "?"
    state = status.get("BackendState") or "?"
    return _ok(f"tailscaled at {path} answers: version {version}, BackendState {state}")


def ancestors(path: str) -> list[str]:
    """The directories above C{path}, from C{/} down."""
    directories = []
    directory = os.path.dirname(path)
    while True:
        directories.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return directories[::-1]


def checkOpenToOthers(path: str, ncDialer: bool) -> Finding | None:
    """
    Whether every local user may connect to tailscaled's own socket (mode
    0666 in directories all may enter): they would then skip tsmux's rules.
    C{None} when there is no socket there (the LocalAPI line says so).
    """
    try:
        real = os.path.realpath(path, strict=True)
        info = os.stat(real)
    except FileNotFoundError:
        return None
    except OSError as error:
        return _warning(
            f"cannot tell whether tailscaled's socket {path} is open to every local user "
            f"({error.strerror} to uid {os.geteuid()})",
            "run tsmux check as the user tsmux runs as",
        )
    if not stat.S_ISSOCK(info.st_mode):
        return None
    mode = stat.S_IMODE(info.st_mode)
    if not mode & stat.S_IWOTH:
        return _ok(f"tailscaled's socket {path} is closed to others (mode {mode:04o})")
    for directory in ancestors(real):
        try:
            dirMode = stat.S_IMODE(os.stat(directory).st_mode)
        except OSError as error:
            return _warning(
                f"cannot tell whether tailscaled's socket {path} is open to every local user "
                f"({directory}: {error.strerror})",
                "run tsmux check as the user tsmux runs as",
            )
        if not dirMode & stat.S_IXOTH:
            return _ok(
                f"tailscaled's socket {path} is closed to others: it is mode {mode:04o}, but directory "
                f"{directory} is {dirMode:04o}"
            )
    alternatives = "" if ncDialer else "; or chmod 0600 it after each start of tailscaled (not with the nc dialer)"
    return _warning(
        f"tailscaled's socket {path} is open to the same users as tsmux and more (mode {mode:04o}, and every "
        "directory up to / may be entered by others): anyone can talk to tailscaled directly and skip tsmux's "
        "allow-lists, rules and --socks-auth (its dial endpoint checks nothing)",
        "put it in a directory only root may enter, as the drop-in deployment does (docs: Deployments, "
        "\"tailscaled's own socket\"): a tmpfiles.d line 'd /run/tailscale-real 0700 root root', "
        "tailscaled --socket=/run/tailscale-real/tailscaled.sock and tsmux's localapi there (tsmux, as root, "
        f"still reaches it){alternatives}",
    )


def tailscaledFindings(daemon: DaemonConfig) -> Iterable[Finding]:
    paths: dict[str, bool] = {}
    for config in daemon.sockets:
        if usesTailscaled(config):
            paths[config.localapi] = paths.get(config.localapi, False) or config.dialer.kind == "nc"
    if not paths:
        yield _ok("no socket uses tailscaled (none offers its LocalAPI, dials through it or has rules that need it)")
        return
    for path, ncDialer in paths.items():
        yield checkLocalAPI(path)
        opened = checkOpenToOthers(path, ncDialer)
        if opened is not None:
            yield opened


# This process.


def checkActAsCallers() -> Finding:
    uid = os.geteuid()
    why = canActAsOthers()
    if why is None:
        return _ok(f"this process (uid {uid}) can act as its callers toward tailscaled (CAP_SETUID, CAP_SETGID)")
    return _warning(
        f"this process (uid {uid}) cannot act as its callers toward tailscaled ({why}): tsmux run like this "
        f"answers LocalAPI requests from other uids with 403 and dials as uid {uid}; these findings are this "
        "process's: run tsmux check as the user tsmux runs as",
        "run tsmux as root (with CAP_SETUID and CAP_SETGID), or accept that only its own uid reaches the LocalAPI",
    )


def hardFileLimit() -> int:
    """The descriptor limit tsmux would run with: the hard C{RLIMIT_NOFILE} (or fs.nr_open if unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        return hard
    try:
        with open(NR_OPEN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return soft if soft != resource.RLIM_INFINITY else 1 << 20


def checkFileLimit(daemon: DaemonConfig) -> Finding:
    nofile = hardFileLimit()
    carried = connectionsForDescriptors(nofile)
    text = f"descriptor limit {nofile} (hard RLIMIT_NOFILE) carries {carried} connection{'s' * (carried != 1)}"
    lowered = ""
    if daemon.maxConnections is not None and daemon.maxConnections > carried:
        lowered = f"; --max-connections {daemon.maxConnections} would be lowered to {carried}"
    if nofile < LOW_NOFILE:
        return _warning(
            f"{text}, few for a daemon{lowered}",
            f"raise it: LimitNOFILE={SUGGESTED_NOFILE} in tsmux's systemd unit (as docs/systemd/tsmux.service "
            "does), or ulimit -Hn before starting tsmux",
        )
    if lowered:
        return _warning(f"{text}{lowered}", "raise LimitNOFILE= or lower --max-connections")
    return _ok(text)


def processFindings(daemon: DaemonConfig) -> Iterable[Finding]:
    yield checkActAsCallers()
    yield checkFileLimit(daemon)


def findings(daemon: DaemonConfig) -> Iterable[Finding]:
    """Every finding about C{daemon}'s host, in the order printed."""
    # This process first: whether what follows holds for the daemon depends on who runs the check.
    yield from processFindings(daemon)
    yield from socketFindings(daemon)
    yield from tailscaledFindings(daemon)


def _configFix(line: str, path: str | None) -> str:
    if path is not None and line.startswith(f"{path}: cannot read"):
        return "give --config a file that exists and this user may read"
    return f"edit {path}" if path else "correct the option"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


def main(arguments: list[str]) -> int:
    """
    C{tsmux check}: the configuration's summary, then one line per finding;
    exit 1 on a problem (or, with C{--strict}, a warning), else 0.
    """
    options = parseOrExit(CheckOptions(), arguments, "tsmux check")
    out = sys.stdout
    try:
        daemon = options.toDaemonConfig()
    except ConfigError as error:
        for line in error.errors:
            out.write(f"{_problem(line, _configFix(line, options['config'])).line()}\n")
        out.write(f"{_plural(len(error.errors), 'problem')}: tsmux would not start\n")
        return 1
    out.write(f"{daemon.summary()}\n")
    problems = warnings = 0
    for finding in findings(daemon):
        out.write(f"{finding.line()}\n")
        out.flush()
        problems += finding.level == "problem"
        warnings += finding.level == "warning"
    if problems:
        out.write(f"{_plural(problems, 'problem')}: tsmux would not start\n")
        return 1
    if warnings and options["strict"]:
        out.write(f"{_plural(warnings, 'warning')} (--strict: exit 1)\n")
        return 1
    return 0
