"""The HTTP CONNECT front end, for tools that speak only HTTP proxies."""

from __future__ import annotations

import base64
import binascii

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from ._context import ConnectionContext, PhaseDeadline, UpstreamWait, clientGone, heldEOF
from ._errors import dialErrorFromFailure, httpStatusFor
from ._escape import escapeText
from ._http import HTTPParseError, buildSimpleResponse, parseRequestHead, splitHead
from ._interfaces import IStreamTransport, IUpstream
from ._record import ConnectionRecord, Outcome
from ._upstream import dialHost

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def splitAuthority(authority: str) -> tuple[str, int] | None:
    """C{host:port} or C{[v6]:port} as CONNECT carries it, or C{None}."""
    host, colon, port = authority.rpartition(":")
    if not colon or not host or not port.isascii() or not port.isdigit() or not 0 < int(port) <= 0xFFFF:
        return None
    if host.startswith("["):
        if not host.endswith("]"):
            return None
        host = host[1:-1]
    elif ":" in host:
        return None
    return host, int(port)


@implementer(IHalfCloseableProtocol)
class HTTPConnectProtocol(Protocol):
    """
    HTTP CONNECT on the mux socket: the same dialer and policy as SOCKS5,
    C{200} then the relay (bytes after the request head kept), and errors as
    HTTP statuses.  Who is asking is decided before any password is looked
    at, and two C{Proxy-Authorization} headers are a C{400}.
    """

    transport: IStreamTransport

    def __init__(self, context: ConnectionContext, record: ConnectionRecord, deadline: PhaseDeadline) -> None:
        self._context = context
        self.record = record
        self._deadline = deadline
        self._buffer = b""
        self._requested = False
        self._wait: UpstreamWait | None = None
        self._lost = False

    def connectionMade(self) -> None:
        self._deadline.handshake(self._context, self.record, self.transport, "CONNECT request not complete")

    def _answer(self, status: int, reason: str, body: str, outcome: Outcome, headers: str = "") -> None:
        self._deadline.cancel()
        self.record.sent(buildSimpleResponse(status, reason, body, headers))
        self.record.finish(outcome, body.strip(), status=status)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.record.bytesFromClient += len(data)
        if self._requested:
            if self._wait is not None:
                self._wait.pending.hold(data)
            return
        self._buffer += data
        try:
            split = splitHead(self._buffer)
            if split is None:
                return
            lines, used = split
            head = parseRequestHead(lines)
        except HTTPParseError as error:
            why = escapeText(str(error))
            self._answer(400, "Bad Request", f"tsmux: malformed CONNECT request: {why}\n", Outcome.CLIENT_ERROR)
            return
        rest, self._buffer = self._buffer[used:], b""
        target = splitAuthority(head.target)
        if head.method != "CONNECT" or target is None:
            authority = escapeText(head.target[:256])
            self._answer(
                400, "Bad Request", f"tsmux: malformed CONNECT authority '{authority}'\n", Outcome.CLIENT_ERROR
            )
            return
        host, port = target
        self.record.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        authorizations = [value for name, value in head.headers if name.lower() == "proxy-authorization"]
        if len(authorizations) > 1:
            # Which one counts would be a guess (and a way to probe): neither does.
            self._answer(400, "Bad Request", "tsmux: more than one Proxy-Authorization header\n", Outcome.CLIENT_ERROR)
            return
        decision = self._context.policy.mayDial(self.record.peer)
        if not decision.allowed:
            self._answer(403, "Forbidden", f"tsmux: {decision.reason}\n", Outcome.REFUSED)
            return
        self._deadline.cancel()
        self._requested = True
        self._wait = UpstreamWait(self._context, self.record, self.transport, self._ready, self._failed)
        if rest:
            self._wait.pending.hold(rest)
        if self._context.credentials is None:
            self._dial(host, port)
            return
        ok = self._authorized(authorizations[0] if authorizations else None)
        delay = self._context.throttle.answered(self.record.uid, ok)
        if delay > 0:
            self._context.reactor.callLater(delay, self._afterPassword, ok, host, port)
        else:
            self._afterPassword(ok, host, port)

    def _authorized(self, header: str | None) -> bool:
        assert self._context.credentials is not None
        if header is None:
            return False
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            username, colon, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (ValueError, binascii.Error):
            return False
        self.record.username = username.decode("utf-8", "replace")
        return bool(colon) and self._context.credentials.check(username, password)

    def _afterPassword(self, ok: bool, host: str, port: int) -> None:
        if self._lost or self.record.finished:
            return
        if not ok:
            self._answer(
                407,
                "Proxy Authentication Required",
                "tsmux: this proxy needs a username and password\n",
                Outcome.REFUSED,
                'Proxy-Authenticate: Basic realm="tsmux"\r\n',
            )
            return
        self._dial(host, port)

    def _dial(self, host: str, port: int) -> None:
        """The socket's rules, then the dial, of one form of the host (see L{dialHost})."""
        host = dialHost(host) or host
        ruled = self._context.decide(self.record, host, port)
        if ruled is not None and not ruled.allowed:
            self._wait = None
            self._answer(403, "Forbidden", f"tsmux: {ruled.reason}\n", Outcome.REFUSED)
            return
        assert self._wait is not None
        self._context.dial(self._wait, host, port)

    def _ready(self, upstream: IUpstream) -> None:
        self.record.sent(ESTABLISHED)
        assert self._wait is not None
        self._context.startRelay(self.record, self.transport, upstream, self._wait.pending)
        self._wait = None  # the relay owns the connection now: nothing here stays alive with it

    def _failed(self, failure: Failure) -> None:
        error = dialErrorFromFailure(failure)
        status, reason = httpStatusFor(error)
        self.record.sent(buildSimpleResponse(status, reason, f"tsmux: {error.reason}\n"))
        self.record.finish(Outcome.DIAL_ERROR, error.reason, status=status, kind=error.kind)

    def readConnectionLost(self) -> None:
        if heldEOF(self._wait):
            return
        if not self._requested:
            self.record.finish(Outcome.CLIENT_CLOSED, "client shut down its side before its CONNECT was complete")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._deadline.cancel()
        clientGone(self.record, self._wait)
