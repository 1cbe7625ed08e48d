"""
tsmux's own endpoints, for its admins, on every socket: C{GET
/tsmux/v0/metrics}, C{GET /tsmux/v0/status}, C{GET /tsmux/v0/explain} (which
of this socket's rules would decide a connection) and C{POST
/tsmux/v0/reload} (re-read the config file, as C{SIGHUP} does).
"""

from __future__ import annotations

import json
import os
import pwd
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from ._context import ConnectionContext, PhaseDeadline
from ._escape import escapeText
from ._http import HTTPParseError, parseRequestHead, splitHead
from ._interfaces import IStreamTransport
from ._peercred import PeerCredentials
from ._record import ConnectionRecord, Outcome
from ._version import __version__

_TEXT = "text/plain; charset=utf-8"


class TsmuxAPIProtocol(Protocol):
    """
    C{GET /tsmux/v0/metrics} (Prometheus text) and C{GET /tsmux/v0/status}
    (JSON), for tsmux's admins only.  One request per connection.
    """

    transport: IStreamTransport

    def __init__(self, context: ConnectionContext, record: ConnectionRecord, deadline: PhaseDeadline) -> None:
        self._context = context
        self.record = record
        self._deadline = deadline
        self._buffer = b""
        self._answered = False
        self._head = False

    def connectionMade(self) -> None:
        self._deadline.handshake(self._context, self.record, self.transport, "request not complete")

    def dataReceived(self, data: bytes) -> None:
        self.record.bytesFromClient += len(data)
        if self._answered:
            return
        self._buffer += data
        try:
            split = splitHead(self._buffer)
            if split is None:
                return
            head = parseRequestHead(split[0])
        except HTTPParseError as error:
            body = f"tsmux: {escapeText(str(error))}\n".encode()
            self._answer(400, "Bad Request", _TEXT, body, Outcome.CLIENT_ERROR)
            return
        self.record.requests = 1
        isAdmin = self._context.policy.isAdmin(self.record.peer)
        self.record.access = "admin" if isAdmin else "not-admin"
        if not isAdmin:
            body = b"tsmux: /tsmux/ is for tsmux's admins (uid 0, tsmux's own uid, --admin-uid, --admin-gid)\n"
            self._answer(403, "Forbidden", _TEXT, body, Outcome.REFUSED)
            return
        self._head = head.method == "HEAD"
        try:
            path = head.path
        except UnicodeDecodeError:
            path = ""
        if path == "/tsmux/v0/reload":
            if head.method != "POST":
                self._answer(405, "Method Not Allowed", _TEXT, b"tsmux: POST only\n", Outcome.CLIENT_ERROR)
            else:
                self._reload()
        elif head.method not in ("GET", "HEAD"):
            self._answer(405, "Method Not Allowed", _TEXT, b"tsmux: GET only\n", Outcome.CLIENT_ERROR)
        elif path == "/tsmux/v0/explain":
            query = parse_qs(head.query, keep_blank_values=True)
            try:
                explained = explain(self._context, _one(query, "caller"), _one(query, "to"))
            except ValueError as error:
                message = f"tsmux: {escapeText(str(error))}\n".encode()
                self._answer(400, "Bad Request", _TEXT, message, Outcome.CLIENT_ERROR)
                return
            self._answer(200, "OK", "application/json", json.dumps(explained, indent=1).encode(), Outcome.OK)
        elif path == "/tsmux/v0/metrics":
            context = self._context
            shared = context.shared
            body = context.metrics.render(shared.openTotal, context.health.reachable, dict(shared.openBySocket))
            self._answer(200, "OK", "text/plain; version=0.0.4; charset=utf-8", body, Outcome.OK)
        elif path == "/tsmux/v0/status":
            self._answer(
                200, "OK", "application/json", json.dumps(status(self._context), indent=1).encode(), Outcome.OK
            )
        else:
            self._answer(404, "Not Found", _TEXT, b"tsmux: no such endpoint\n", Outcome.CLIENT_ERROR)

    def _reload(self) -> None:
        reload = self._context.shared.reload
        if reload is None:
            self._answer(404, "Not Found", _TEXT, b"tsmux: this tsmux cannot reload\n", Outcome.CLIENT_ERROR)
            return
        self._deadline.cancel()

        def answered(result: dict[str, Any]) -> None:
            if not self._answered and not self.record.finished:
                status, reason = (200, "OK") if result.get("reloaded") else (409, "Conflict")
                body = json.dumps(result, indent=1).encode()
                said = (
                    f"reloaded: {result.get('summary')}"
                    if result.get("reloaded")
                    else f"not reloaded: {result.get('error')}"
                )
                self._answer(status, reason, "application/json", body, Outcome.OK, said)

        reload().addCallback(answered).addErrback(
            lambda failure: self._answer(
                500,
                "Internal Server Error",
                _TEXT,
                f"tsmux: {failure.getErrorMessage()}\n".encode(),
                Outcome.INTERNAL_ERROR,
            )
        )

    def _answer(
        self, status: int, reason: str, contentType: str, body: bytes, outcome: Outcome, detail: str | None = None
    ) -> None:
        """Answer and close; the line's detail is C{detail}, else an error's text (without its C{tsmux:})."""
        self._answered = True
        self._deadline.cancel()
        response = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {contentType}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("ascii") + (b"" if self._head else body)
        self.record.sent(response)
        if detail is None:
            detail = "" if status < 300 else body.decode(errors="replace").strip().removeprefix("tsmux: ")
        self.record.finish(outcome, detail, status=status)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._deadline.cancel()
        self.record.finish(Outcome.CLIENT_CLOSED, "before a complete request")


def status(context: ConnectionContext) -> dict[str, Any]:
    """
    What C{/tsmux/v0/status} says: the process (every socket, limits in all,
    the busiest callers and destinations, dial errors) and, at the top
    level as before, the socket it was asked on.
    """
    shared = context.shared
    contexts = shared.contexts or [context]
    byProtocol: Counter[str] = Counter()
    destinations: Counter[str] = Counter()
    sockets: dict[str, dict[str, Any]] = {}
    for each in contexts:
        entry = sockets.setdefault(
            each.name,
            {
                "name": each.name,
                "listening": each.listening,
                "offers": sorted(each.config.offer),
                "rules": len(each.config.rules) if each.config.rules is not None else None,
                "dialer": each.dialer.description,
                "localapi": each.localapi.path,
                "openConnections": 0,
                "openByProtocol": {},
                "accepting": False,
                "tailnetView": _viewState(each),
            },
        )
        entry["accepting"] = entry["accepting"] or each.accepting
        for record in each.openConnections:
            byProtocol[record.protocol] += 1
            entry["openConnections"] += 1
            entry["openByProtocol"][record.protocol] = entry["openByProtocol"].get(record.protocol, 0) + 1
            if record.target is not None:
                destinations[escapeText(record.target)] += 1  # client text: escaped, as in the log
    return {
        "version": __version__,
        "uptimeSeconds": round(context.reactor.seconds() - context.started, 3),
        "socket": context.name,
        "listening": [address for each in contexts if each.accepting for address in each.listening],
        "dialer": context.dialer.description,
        "localapi": {
            "path": context.localapi.path,
            "reachable": context.health.reachable,
            "actsAsCallers": context.localapi.actAsCallers,
        },
        "configFile": shared.configFile,
        "lastReload": shared.lastReload,
        "sockets": list(sockets.values()),
        "openConnections": shared.openTotal,
        "openByProtocol": dict(byProtocol),
        "openByUid": {str(uid): count for uid, count in shared.openByUid.most_common()},
        "busiestDestinations": dict(destinations.most_common(10)),
        "dialErrors": dict(context.metrics.dialErrors),
        "limits": context.limits.asDict(),
        "relays": sum(len(each.relays) for each in contexts),
    }


def _viewState(context: ConnectionContext) -> dict[str, Any] | None:
    """Whether the socket's rules have a tailnet view to decide with; C{None}: they need none."""
    netmap = context.netmap
    if netmap is None:
        return None
    view = netmap.current()
    if view is None:
        return {"fresh": False, "why": netmap.whyNone()}
    return {"fresh": True, "ageSeconds": round(context.reactor.seconds() - view.fetchedAt, 1), "nodes": len(view.peers)}


def _one(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    if not values or len(values) != 1 or not values[0]:
        raise ValueError(f"explain needs exactly one {name}= parameter")
    return values[0]


def callerFromUserDatabase(text: str) -> tuple[PeerCredentials, str]:
    """
    C{uid:N} or C{user:NAME} as a caller: uid, primary gid and groups from
    the user database (what a process of that user would normally carry),
    and a text saying so.
    """
    kind, colon, value = text.partition(":")
    try:
        if kind == "uid" and value.isascii() and value.isdigit():
            uid = int(value)
            try:
                entry: pwd.struct_passwd | None = pwd.getpwuid(uid)
            except KeyError:
                entry = None
        elif kind == "user" and value:
            entry = pwd.getpwnam(value)
            uid = entry.pw_uid
        else:
            raise ValueError(f"a caller is uid:N or user:NAME, not {text!r}")
    except KeyError:
        raise ValueError(f"there is no local user named {value!r}") from None
    if entry is None:
        return PeerCredentials(0, uid, uid, frozenset()), f"uid {uid} has no user entry: gid {uid}, no other groups"
    groups = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    listed = ", ".join(str(g) for g in sorted(groups))
    return (
        PeerCredentials(0, uid, entry.pw_gid, groups),
        f"uid {uid} ({entry.pw_name}); gid {entry.pw_gid}; groups from the user database: {listed}",
    )


def explain(context: ConnectionContext, callerText: str, to: str) -> dict[str, Any]:
    """
    What this socket would decide for a dial by C{callerText} to C{to}
    (C{HOST:PORT}), and why: the peer the target is tied to, the rule, the
    verdict.  Counted nowhere.
    """
    from ._connect import splitAuthority

    peer, callerSays = callerFromUserDatabase(callerText)
    target = splitAuthority(to)
    if target is None:
        raise ValueError(f"expected a destination HOST:PORT (or [IPv6]:PORT), got {to!r}")
    host, port = target
    answer: dict[str, Any] = {"socket": context.name, "caller": callerSays, "to": to}
    refusal = context.callerRefusal(peer)
    listed = context.policy.mayDial(peer)
    netmap = context.netmap
    view = netmap.current() if netmap is not None else None
    answer["view"] = None if netmap is None else ("fresh" if view is not None else f"missing: {netmap.whyNone()}")
    if refusal is not None:
        answer.update(verdict="deny", rule=None, reason=refusal, tiedTo=[])
        return answer
    if not listed.allowed:
        answer.update(verdict="deny", rule=None, reason=listed.reason, tiedTo=[])
        return answer
    decision = context.judge(peer, host, port)
    if decision is None:
        answer.update(verdict="allow", rule=f"{context.name}#open", reason="the socket has no rules", tiedTo=[])
        return answer
    answer.update(
        verdict=decision.verdict.value,
        rule=decision.label,
        reason=decision.reason,
        tiedTo=[escapeText(peer.describe()) for peer in decision.peers],  # node owners choose host names
    )
    return answer
