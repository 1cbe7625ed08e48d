"""
The config file (C{tsmux --config FILE}, TOML): any number of sockets, each
with its own offer, callers, rules and way out, read into one
L{DaemonConfig}.

The whole file is checked before anything is used, and every problem is
reported, not only the first: C{FILE:LINE: KEY.PATH: what is wrong}, with
the line where it is known (C{tomllib} gives it for syntax errors; for the
rest the line of the key is looked up in the text) and the key path always.
Indexes in key paths count from 1, like rule names (C{web#1}).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ._config import (
    DIAL_SELF_POLICIES,
    DIALERS,
    OFFERS,
    Config,
    DaemonConfig,
    DialerSpec,
    _gid,
    _octalMode,
    socketName,
)
from ._rules import Callers, Rule, RuleError, parseCallers, parseRule


class ConfigError(Exception):
    """The file cannot be used; C{errors} holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class _Invalid(ValueError):
    """One value is wrong; the loader adds where."""


def _positiveSeconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 86400 * 365:
        raise _Invalid(f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _positiveCount(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid(f"expected a positive whole number, got {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"expected a non-empty string, got {value!r}")
    return value


def _absolutePath(value: Any) -> str:
    text = _text(value)
    if not text.startswith("/"):
        raise _Invalid(f"expected an absolute path, got {text!r}")
    return text


def _mode(value: Any) -> int:
    if not isinstance(value, str):
        raise _Invalid(f'expected an octal mode as a string like "0660", got {value!r}')
    try:
        return _octalMode(value)
    except ValueError as error:
        raise _Invalid(str(error)) from None


def _group(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    try:
        return _gid(_text(value))
    except ValueError as error:
        raise _Invalid(str(error)) from None


def _dialer(value: Any) -> DialerSpec:
    try:
        return DialerSpec.parse(_text(value))
    except ValueError:
        raise _Invalid(f"expected one of {', '.join(DIALERS)}, got {value!r}") from None


def _dialSelf(value: Any) -> str:
    if value not in DIAL_SELF_POLICIES:
        raise _Invalid(f"expected one of {', '.join(DIAL_SELF_POLICIES)}, got {value!r}")
    return str(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {value!r}")
    return value


def _offer(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise _Invalid(f"expected a non-empty list of {', '.join(OFFERS)}, got {value!r}")
    unknown = [item for item in value if item not in OFFERS]
    if unknown:
        raise _Invalid(f"{unknown[0]!r} is not one of {', '.join(OFFERS)}")
    return frozenset(value)


def _callers(value: Any) -> Callers:
    try:
        return parseCallers(value)
    except RuleError as error:
        raise _Invalid(str(error)) from None


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def _name(value: Any) -> str:
    text = _text(value)
    if not _NAME.match(text):
        raise _Invalid(f"expected letters, digits, '_', '.' or '-' (at most 64), got {text!r}")
    return text


# Keys allowed at the top (as every socket's default) and in each [[socket]]: key -> (Config field, parser).
SOCKET_SETTINGS: Mapping[str, tuple[str, Callable[[Any], Any]]] = {
    "localapi": ("localapi", _absolutePath),
    "dialer": ("dialer", _dialer),
    "dial-self": ("dialSelf", _dialSelf),
    "detect-timeout": ("detectTimeout", _positiveSeconds),
    "handshake-timeout": ("handshakeTimeout", _positiveSeconds),
    "dial-timeout": ("dialTimeout", _positiveSeconds),
    "idle-timeout": ("idleTimeout", _positiveSeconds),
    "half-close-timeout": ("halfCloseTimeout", _positiveSeconds),
    "socks-auth": ("socksAuth", _absolutePath),
    "upstream-auth": ("upstreamAuth", _absolutePath),
    "splice": ("splice", _bool),
    "backlog": ("backlog", _positiveCount),
    "mode": ("mode", _mode),
    "group": ("group", _group),
    "offer": ("offer", _offer),
    "allow-callers": ("allowCallers", _callers),
}
FLAG_ONLY = {
    "socks-allow-uid": " (a flag; in a file: allow-callers, or rules with callers; see Sockets and rules)",
    "socks-allow-gid": " (a flag; in a file: allow-callers, or rules with callers; see Sockets and rules)",
    "admin-uid": ' (a flag; in a file: admins = ["uid:N", "user:NAME"], at the top)',
    "admin-gid": ' (a flag; in a file: admins = ["gid:N", "group:NAME"], at the top)',
    "no-splice": " (a flag; in a file: splice = false)",
    "log-format": " (a process flag: give --log-format on the command line)",
}
"""Command-line names that are not file keys, and what to write instead."""
SOCKET_ONLY = ("name", "listen", "max-connections", "max-connections-per-uid")
TOP_ONLY = ("socket", "admins", "max-connections", "max-connections-per-uid", "shutdown-timeout")


class _Loader:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.errors: list[str] = []

    # where

    def _lineOf(self, keyPath: tuple[str | int, ...]) -> int | None:
        """Best effort: the line of the key (inside the right C{[[socket]]} for socket keys)."""
        start, end = 0, len(self.lines)
        headers = [i for i, line in enumerate(self.lines) if re.match(r"\s*\[\[\s*socket\s*\]\]", line)]
        if keyPath and keyPath[0] == "socket" and len(keyPath) > 1 and isinstance(keyPath[1], int):
            index = keyPath[1] - 1
            if index >= len(headers):
                return None
            start = headers[index]
            end = headers[index + 1] if index + 1 < len(headers) else len(self.lines)
            keys = [k for k in keyPath[2:] if isinstance(k, str)]
            if not keys:
                return start + 1
        else:
            end = headers[0] if headers else len(self.lines)
            keys = [k for k in keyPath if isinstance(k, str)]
        if not keys:
            return None
        pattern = re.compile(rf"\s*[\"']?{re.escape(keys[0])}[\"']?\s*=")
        for number in range(start, end):
            if pattern.match(self.lines[number]):
                return number + 1
        return None

    def error(self, keyPath: tuple[str | int, ...], message: str) -> None:
        where = ".".join(f"[{k}]" if isinstance(k, int) else k for k in keyPath).replace(".[", "[")
        line = self._lineOf(keyPath)
        prefix = f"{self.path}:{line}" if line is not None else self.path
        self.errors.append(f"{prefix}: {where}: {message}")

    def unknownKey(self, keyPath: tuple[str | int, ...], key: str, allowed: list[str]) -> None:
        near = difflib.get_close_matches(key, allowed, n=1)
        hint = FLAG_ONLY.get(key) or (f" (did you mean {near[0]!r}?)" if near else "")
        self.error(keyPath + (key,), f"unknown key{hint}")

    # what

    def settings(self, table: Mapping[str, Any], keyPath: tuple[str | int, ...]) -> dict[str, Any]:
        """The socket settings in C{table}, as L{Config} fields."""
        fields: dict[str, Any] = {}
        for key, (field, parse) in SOCKET_SETTINGS.items():
            if key in table:
                try:
                    fields[field] = parse(table[key])
                except _Invalid as error:
                    self.error(keyPath + (key,), str(error))
        return fields

    def rules(self, value: Any, keyPath: tuple[str | int, ...]) -> tuple[Rule, ...] | None:
        if not isinstance(value, list):
            self.error(keyPath, f"expected a list of rules ({{ allow = [...] }} or {{ deny = [...] }}), got {value!r}")
            return None
        rules = []
        for index, table in enumerate(value, 1):
            if not isinstance(table, dict):
                self.error(keyPath + (index,), f'expected a table like {{ allow = ["*:443"] }}, got {table!r}')
                continue
            try:
                rules.append(parseRule(table, index))
            except RuleError as error:
                self.error(keyPath + (index,), str(error))
        return tuple(rules)

    def load(self, document: Mapping[str, Any], logFormat: str) -> DaemonConfig:
        allowedTop = sorted(set(SOCKET_SETTINGS) | set(TOP_ONLY) | {"rules"})
        for key in document:
            if key not in allowedTop:
                self.unknownKey((), key, allowedTop)
        defaults = self.settings(document, ())
        defaultRules = self.rules(document["rules"], ("rules",)) if "rules" in document else None
        process: dict[str, Any] = {}
        for key, field, parse in (
            ("max-connections", "maxConnections", _positiveCount),
            ("max-connections-per-uid", "maxConnectionsPerUid", _positiveCount),
            ("shutdown-timeout", "shutdownTimeout", _positiveSeconds),
        ):
            if key in document:
                try:
                    process[field] = parse(document[key])
                except _Invalid as error:
                    self.error((key,), str(error))
        if "admins" in document:
            try:
                admins = _callers(document["admins"])
                if admins.everyone:
                    raise _Invalid("'*' would make everyone an admin; name uids, users, gids or groups")
                process["adminUids"] = admins.uids
                process["adminGids"] = admins.gids
            except _Invalid as error:
                self.error(("admins",), str(error))
        sockets = document.get("socket")
        if not isinstance(sockets, list) or not sockets:
            self.error(("socket",), "expected at least one [[socket]] table with a listen address")
            sockets = []
        configs: list[Config] = []
        allowedSocket = sorted(set(SOCKET_SETTINGS) | set(SOCKET_ONLY) | {"rules"})
        for index, table in enumerate(sockets, 1):
            where: tuple[str | int, ...] = ("socket", index)
            if not isinstance(table, dict):
                self.error(where, "expected a table")
                continue
            for key in table:
                if key not in allowedSocket:
                    self.unknownKey(where, key, allowedSocket)
            fields = dict(defaults)
            fields.update(self.settings(table, where))
            if "rules" in table:
                fields["rules"] = self.rules(table["rules"], where + ("rules",))
            else:
                # A socket from a file always has a rule set, empty when it has no rules: its
                # connections are logged with rule=NAME#open, and counted per socket.
                fields["rules"] = defaultRules if defaultRules is not None else ()
            listen = table.get("listen")
            if not isinstance(listen, str) or not listen:
                self.error(where + ("listen",), "expected a path or an endpoint description")
                continue
            if not listen.startswith("/") and ":" not in listen:
                self.error(where + ("listen",), f"{listen!r} is a relative path: use an absolute path")
                continue
            if "name" in table:
                try:
                    name = _name(table["name"])
                except _Invalid as error:
                    self.error(where + ("name",), str(error))
                    continue
            else:
                name = socketName(listen)
                if not name:
                    self.error(where + ("name",), f"required: {listen!r} is not a path to take a name from")
                    continue
            for key, field in (
                ("max-connections", "socketMaxConnections"),
                ("max-connections-per-uid", "socketMaxConnectionsPerUid"),
            ):
                if key in table:
                    try:
                        fields[field] = _positiveCount(table[key])
                    except _Invalid as error:
                        self.error(where + (key,), str(error))
            configs.append(Config(name=name, listen=(listen,), **fields))
        seenNames: dict[str, int] = {}
        seenListen: dict[str, int] = {}
        for index, config in enumerate(configs, 1):
            if config.name in seenNames:
                self.error(
                    ("socket", index, "name"), f"{config.name!r} is already socket[{seenNames[config.name]}]'s name"
                )
            seenNames.setdefault(config.name, index)
            if config.listen[0] in seenListen:
                self.error(
                    ("socket", index, "listen"),
                    f"{config.listen[0]!r} is already where socket[{seenListen[config.listen[0]]}] listens",
                )
            seenListen.setdefault(config.listen[0], index)
        if self.errors:
            raise ConfigError(self.errors)
        # Process-wide values are the same in every socket's Config, so a context reads one object.
        shared = {
            k: v for k, v in process.items() if k in ("maxConnections", "maxConnectionsPerUid", "shutdownTimeout")
        }
        shared.update({k: v for k, v in process.items() if k in ("adminUids", "adminGids")})
        configs = [replace(config, logFormat=logFormat, **shared) for config in configs]
        return DaemonConfig(sockets=tuple(configs), logFormat=logFormat, configFile=self.path, **process)


def loadConfigFile(path: str, logFormat: str = "text") -> DaemonConfig:
    """Read and check C{path} whole; raises L{ConfigError} listing every problem."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror or error}"]) from None
    try:
        text = raw.decode("utf-8")
        document = tomllib.loads(text)
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"]) from None
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        found = re.search(r"\(at line (\d+), column \d+\)$", message)
        if found:
            what = message[: found.start()].strip()
            raise ConfigError([f"{path}:{found.group(1)}: {what} ({found.group(0)[4:-1]})"]) from None
        raise ConfigError([f"{path}: {message}"]) from None
    return _Loader(path, text).load(document, logFormat)
