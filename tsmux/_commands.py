"""
C{tsmux status}, C{tsmux explain} and C{tsmux reload}: an operator asks a
running tsmux through one of its own sockets (tsmux's C{/tsmux/} API, for
its admins).  One-shot commands: a blocking request, no reactor.
"""

from __future__ import annotations

import json
import pwd
import socket
import sys
import tomllib
from typing import Any
from urllib.parse import urlencode

from twisted.python import usage

from ._config import DEFAULT_LISTEN
from ._configfile import ConfigError, loadConfigFile

TIMEOUT = 15.0


class CommandError(Exception):
    """One line for the operator; the command exits 1."""


class _DaemonOptions(usage.Options):
    optParameters = [
        ["socket", "s", None, f"The path of a socket of the running tsmux [default: {DEFAULT_LISTEN}]."],
        ["config", "c", None, "The config file of the running tsmux: its first socket (a path) is asked."],
    ]
    compData = usage.Completions(
        optActions={
            "socket": usage.CompleteFiles(descr="a socket of the running tsmux"),
            "config": usage.CompleteFiles(),
        }
    )

    def opt_version(self) -> None:
        """Print tsmux's version and exit."""
        from ._version import __version__

        print(f"tsmux {__version__}")
        raise SystemExit(0)

    def socketPath(self) -> str:
        if self["socket"] is not None and self["config"] is not None:
            raise usage.UsageError("give --socket or --config, not both")
        if self["socket"] is not None:
            if not self["socket"].startswith("/"):
                raise usage.UsageError(f"--socket: expected an absolute path, got {self['socket']!r}")
            return str(self["socket"])
        if self["config"] is None:
            return DEFAULT_LISTEN
        listens: list[str] | None
        try:
            listens = [config.listen[0] for config in loadConfigFile(self["config"]).sockets]
        except ConfigError as error:
            # A file broken since the daemon read it (the reason to reload, perhaps): its sockets as written.
            listens = _listensAsWritten(self["config"])
            if listens is None:
                raise CommandError(
                    f"cannot find a socket to ask in {self['config']} ({error.errors[0]}); use --socket"
                ) from None
        for address in listens:
            if address.startswith("/"):
                return address
        raise CommandError(f"{self['config']} has no socket with a path to ask (use --socket)")


def _listensAsWritten(path: str) -> list[str] | None:
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    sockets = document.get("socket")
    if not isinstance(sockets, list):
        return None
    return [table["listen"] for table in sockets if isinstance(table, dict) and isinstance(table.get("listen"), str)]


class StatusOptions(_DaemonOptions):
    synopsis = "Usage: tsmux status [--socket PATH | --config FILE] [--json]"
    longdesc = (
        "Ask a running tsmux (its admins: uid 0, its own uid, its admins) for a summary: version and uptime, "
        "each socket with its open connections, the busiest callers and destinations, dial errors, and "
        "whether tailscaled's LocalAPI answers."
    )
    optFlags = [["json", None, "Print the daemon's JSON (/tsmux/v0/status) unchanged."]]


class ExplainOptions(_DaemonOptions):
    synopsis = "Usage: tsmux explain --socket PATH --caller uid:N|user:NAME --to HOST:PORT"
    longdesc = (
        "Ask the tsmux listening at PATH which of that socket's rules would decide a connection from the caller "
        "to HOST:PORT, and why: the tailnet peer the destination is tied to (name, addresses, tags, owner), the "
        "rule (web#2, web#end, web#open) and the verdict. The caller's groups come from the user database."
    )
    optParameters = [
        ["caller", None, None, "Who connects: uid:N or user:NAME."],
        ["to", None, None, "Where to: HOST:PORT ([IPv6]:PORT)."],
    ]
    compData = usage.Completions(
        optActions={
            "socket": usage.CompleteFiles(descr="a socket of the running tsmux"),
            "config": usage.CompleteFiles(),
            "caller": usage.Completer(descr="uid:N or user:NAME"),
            "to": usage.Completer(descr="HOST:PORT"),
        }
    )

    def postOptions(self) -> None:
        for name in ("caller", "to"):
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")


class ReloadOptions(_DaemonOptions):
    synopsis = "Usage: tsmux reload [--socket PATH | --config FILE]"
    longdesc = (
        "Ask a running tsmux to re-read its config file (as SIGHUP does) and print what changed, or the error "
        "that kept the running config."
    )


def request(path: str, method: str, target: str) -> tuple[int, bytes]:
    """One HTTP request to tsmux's API on the socket at C{path}: its status and body."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(TIMEOUT)
    try:
        try:
            client.connect(path)
        except FileNotFoundError:
            raise CommandError(f"no tsmux is listening at {path} (no such socket)") from None
        except ConnectionRefusedError:
            raise CommandError(f"no tsmux is listening at {path} (connection refused)") from None
        except PermissionError:
            raise CommandError(f"cannot open {path}: permission denied (its mode or group keeps you out)") from None
        except OSError as error:
            raise CommandError(f"cannot reach tsmux at {path}: {error.strerror or error}") from None
        client.sendall(
            f"{method} {target} HTTP/1.1\r\nHost: tsmux\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while True:
            chunk = client.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        raise CommandError(f"tsmux at {path} did not answer within {TIMEOUT:g} s") from None
    except OSError as error:
        raise CommandError(f"tsmux at {path}: {error.strerror or error}") from None
    finally:
        client.close()
    response = b"".join(chunks)
    head, _, body = response.partition(b"\r\n\r\n")
    statusLine = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(statusLine) < 2 or not statusLine[0].startswith(b"HTTP/") or not statusLine[1].isdigit():
        raise CommandError(f"what answers at {path} is not tsmux (it said {response[:40]!r})")
    return int(statusLine[1]), body


def _ask(path: str, method: str, target: str, accept: tuple[int, ...] = (200,)) -> Any:
    status, body = request(path, method, target)
    if status == 403:
        raise CommandError(
            f"tsmux at {path} answers its admins only (uid 0, its own uid, admins in its config or --admin-uid/gid)"
        )
    if status == 404 and b"tsmux" not in body:
        raise CommandError(f"what answers at {path} is not tsmux's API")
    if status not in accept:
        raise CommandError(f"tsmux at {path}: {status} {body.decode(errors='replace').strip()}")
    try:
        return json.loads(body)
    except ValueError:
        raise CommandError(f"tsmux at {path} answered something other than JSON") from None


def _userName(uid: str) -> str:
    try:
        return f" ({pwd.getpwuid(int(uid)).pw_name})"
    except (KeyError, ValueError):
        return ""


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    if not days:
        parts.append(f"{seconds}s")
    return " ".join(parts)


def _counts(items: dict[str, int], name: Any = str) -> str:
    ordered = sorted(items.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{name(key)} {count}" for key, count in ordered) or "none"


def summary(status: dict[str, Any]) -> str:
    """The status JSON as a few lines for people."""
    lines = [f"tsmux {status.get('version', '?')}, up {_duration(status.get('uptimeSeconds', 0))}"]
    if status.get("configFile"):
        lines[0] += f"; config {status['configFile']}"
    localapi = status.get("localapi", {})
    reachable = {True: "reachable", False: "NOT reachable", None: "not tried yet"}[localapi.get("reachable")]
    lines.append(f"tailscaled's LocalAPI at {localapi.get('path', '?')}: {reachable}")
    lines.append(f"open connections: {status.get('openConnections', 0)}")
    sockets = status.get("sockets", [])
    width = max((len(entry["name"]) for entry in sockets), default=0)
    for entry in sockets:
        rules = entry.get("rules")
        rulesText = "no rules" if rules is None else f"{rules} rule{'s' * (rules != 1)}"
        open = entry.get("openConnections", 0)
        byProtocol = entry.get("openByProtocol") or {}
        detail = f" ({_counts(byProtocol)})" if byProtocol else ""
        state = "" if entry.get("accepting", True) else "; draining (removed by a reload)"
        view = entry.get("tailnetView")
        if view is not None:
            state += "; tailnet view " + (
                f"{view.get('ageSeconds', 0):g} s old, {view.get('nodes', 0)} nodes"
                if view.get("fresh")
                else f"MISSING ({view.get('why', '?')}): rules that need it deny"
            )
        lines.append(
            f"  {entry['name']:<{width}}  {', '.join(entry.get('listening', []))}: {open} open{detail}; {rulesText}; "
            f"offers {', '.join(entry.get('offers', []))}{state}"
        )
    byUid = status.get("openByUid") or {}
    top = dict(sorted(byUid.items(), key=lambda item: -item[1])[:5])
    lines.append("busiest callers: " + _counts(top, lambda uid: f"uid {uid}{_userName(uid)}"))
    lines.append("busiest destinations: " + _counts(dict(list((status.get("busiestDestinations") or {}).items())[:5])))
    lines.append("dial errors: " + _counts(status.get("dialErrors") or {}))
    return "\n".join(lines)


def _run(options: _DaemonOptions, arguments: list[str], command: str, body: Any) -> int:
    try:
        options.parseOptions(arguments)
    except usage.UsageError as error:
        from ._help import usageErrorText

        sys.stderr.write(
            f"tsmux {command}: {usageErrorText(options, error)}\nTry 'tsmux {command} --help' for the options.\n"
        )
        return 2
    try:
        path = options.socketPath()
    except usage.UsageError as error:
        sys.stderr.write(f"tsmux {command}: {error}\nTry 'tsmux {command} --help' for the options.\n")
        return 2
    except CommandError as error:
        sys.stderr.write(f"tsmux {command}: {error}\n")
        return 1
    try:
        return int(body(options, path))
    except CommandError as error:
        sys.stderr.write(f"tsmux {command}: {error}\n")
        return 1


def status(arguments: list[str]) -> int:
    """C{tsmux status}: a running tsmux's state, readable (or its JSON with C{--json})."""

    def run(options: _DaemonOptions, path: str) -> int:
        if options["json"]:
            code, body = request(path, "GET", "/tsmux/v0/status")
            if code != 200:
                _ask(path, "GET", "/tsmux/v0/status")  # says why, in one line
            sys.stdout.write(body.decode("utf-8", "replace").rstrip("\n") + "\n")
            return 0
        sys.stdout.write(summary(_ask(path, "GET", "/tsmux/v0/status")) + "\n")
        return 0

    return _run(StatusOptions(), arguments, "status", run)


def explain(arguments: list[str]) -> int:
    """C{tsmux explain}: which rule of a socket would decide a connection, and why."""

    def run(options: _DaemonOptions, path: str) -> int:
        query = urlencode({"caller": options["caller"], "to": options["to"]})
        status, body = request(path, "GET", f"/tsmux/v0/explain?{query}")
        if status == 400:
            raise CommandError(body.decode(errors="replace").strip().removeprefix("tsmux: "))
        answer = _ask(path, "GET", f"/tsmux/v0/explain?{query}")
        lines = [f"socket {answer['socket']}; caller {answer['caller']}"]
        tied = answer.get("tiedTo") or []
        if tied:
            lines.append(f"{answer['to']} is tied to " + "; ".join(tied))
        elif answer.get("rule") is not None and answer.get("view") == "fresh":
            lines.append(f"{answer['to']} is tied to no tailnet peer tsmux knows of")
        if answer.get("view") not in (None, "fresh"):
            lines.append(f"tailnet view {answer['view']}")
        rule = answer.get("rule") or "the socket itself"
        lines.append(f"{answer['verdict'].upper()} by {rule}: {answer['reason']}")
        sys.stdout.write("\n".join(lines) + "\n")
        return 0

    return _run(ExplainOptions(), arguments, "explain", run)


def reload(arguments: list[str]) -> int:
    """C{tsmux reload}: the daemon re-reads its config file; what changed, or why nothing did."""

    def run(options: _DaemonOptions, path: str) -> int:
        result = _ask(path, "POST", "/tsmux/v0/reload", accept=(200, 409))
        if result.get("reloaded"):
            sys.stdout.write(f"reloaded: {result.get('summary', '')}\n")
            for failure in result.get("failed", []):
                sys.stdout.write(f"but socket {failure}\n")
            return 1 if result.get("failed") else 0
        errors = result.get("errors") or [result.get("error", "unknown error")]
        if len(errors) == 1 and "no config file" in errors[0]:
            sys.stderr.write(f"tsmux reload: {errors[0]}\n")
            return 1
        sys.stderr.write("tsmux reload: the running config is kept:\n")
        for line in errors:
            sys.stderr.write(f"  {line}\n")
        return 1

    return _run(ReloadOptions(), arguments, "reload", run)
