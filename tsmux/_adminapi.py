"""tsmux's own endpoints, for its admins: C{/tsmux/v0/metrics} and C{/tsmux/v0/status}."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from ._context import ConnectionContext, PhaseDeadline
from ._escape import escapeText
from ._http import HTTPParseError, parseRequestHead, splitHead
from ._interfaces import IStreamTransport
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
        if head.method not in ("GET", "HEAD"):
            self._answer(405, "Method Not Allowed", _TEXT, b"tsmux: GET only\n", Outcome.CLIENT_ERROR)
        elif head.path == "/tsmux/v0/metrics":
            context = self._context
            shared = context.shared
            body = context.metrics.render(shared.openTotal, context.health.reachable, dict(shared.openBySocket))
            self._answer(200, "OK", "text/plain; version=0.0.4; charset=utf-8", body, Outcome.OK)
        elif head.path == "/tsmux/v0/status":
            self._answer(
                200, "OK", "application/json", json.dumps(status(self._context), indent=1).encode(), Outcome.OK
            )
        else:
            self._answer(404, "Not Found", _TEXT, b"tsmux: no such endpoint\n", Outcome.CLIENT_ERROR)

    def _answer(self, status: int, reason: str, contentType: str, body: bytes, outcome: Outcome) -> None:
        self._answered = True
        self._deadline.cancel()
        response = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {contentType}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("ascii") + (b"" if self._head else body)
        self.record.sent(response)
        self.record.finish(outcome, "" if status == 200 else body.decode().strip(), status=status)
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
            },
        )
        entry["accepting"] = entry["accepting"] or each.accepting
        for record in each.openConnections:
            byProtocol[record.protocol] += 1
            entry["openConnections"] += 1
            entry["openByProtocol"][record.protocol] = entry["openByProtocol"].get(record.protocol, 0) + 1
            if record.target is not None:
                destinations[record.target] += 1
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
