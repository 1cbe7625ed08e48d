"""The LocalAPI front end: HTTP to tailscaled, byte for byte, as the caller."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from ._context import ConnectionContext, UpstreamWait, clientGone, heldEOF, relayOutcome
from ._dialfilter import DialFilterRelay, DialJudge
from ._errors import failureReason
from ._http import RequestHead, buildSimpleResponse
from ._interfaces import IStreamTransport, IUpstream
from ._record import ConnectionRecord, Outcome
from ._upstream import HeldConnection


@implementer(IHalfCloseableProtocol)
class LocalAPIPassthrough(Protocol):
    """
    HTTP to tailscaled's LocalAPI, byte for byte, on a LocalAPI connection
    made as the caller (tailscaled sees the caller's uid, gid and groups and
    applies its own rules to every request): nothing parsed or rewritten, so
    keep-alive, pipelining, chunked bodies, long polls and upgrades all just
    work.  Only for callers whose LocalAPI C{dial} tsmux refuses are request
    heads framed (L{DialFilterRelay}).
    """

    transport: IStreamTransport

    def __init__(self, context: ConnectionContext, record: ConnectionRecord) -> None:
        self._context = context
        self.record = record
        self._dialJudge: str | DialJudge | None = None
        self._wait: UpstreamWait | None = None

    def connectionMade(self) -> None:
        peer = self.record.peer
        refusal = self._context.localapi.refusal(peer)
        if refusal is not None:
            self.record.access = "refused"
            self.record.sent(buildSimpleResponse(403, "Forbidden", f"tsmux: {refusal}\n"))
            self.record.finish(Outcome.REFUSED, refusal, status=403)
            self.transport.loseConnection()
            return
        refusal = self._context.policy.localAPIDialRefusal(peer)
        if refusal is not None:
            self._dialJudge, self.record.access = refusal, "dial-filter"
        elif self._context.ruleSet is not None and self._context.ruleSet.count:
            # A socket with rules: every dial on it is decided by them, admins' too.
            self._dialJudge, self.record.access = self._judgeByRules, "dial-rules"
        else:
            self.record.access = "passthrough"
        self._wait = UpstreamWait(self._context, self.record, self.transport, self._ready, self._failed)
        connecting = self._context.localapi.connect(peer, HeldConnection())
        self._wait.begin(connecting)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        self.record.bytesFromClient += len(data)
        if self._wait is not None:
            self._wait.pending.hold(data)

    def _ready(self, upstream: IUpstream) -> None:
        self._context.health.succeeded()
        assert self._wait is not None
        if self._dialJudge is None:
            self._context.startRelay(self.record, self.transport, upstream, self._wait.pending)
            self._wait = None  # the relay owns the connection now: nothing here stays alive with it
            return
        relay = DialFilterRelay(self._context.reactor, self._dialJudge)
        self._context.startRelay(
            self.record, self.transport, upstream, self._wait.pending, relay, lambda _: self._filterOutcome(relay)
        )

    def _judgeByRules(self, head: RequestHead) -> str | None:
        """
        A LocalAPI dial on a socket with rules: decided like a SOCKS5 or
        CONNECT one.  Its bytes go to tailscaled unchanged, so only a
        C{Dial-Host} already in the one form rules judge passes (see
        L{tsmux._context.ConnectionContext.judge}), and only TCP: the rules
        are written for TCP ports.
        """
        host, port = head.header("Dial-Host"), head.header("Dial-Port")
        if not host or port is None or not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 0xFFFF:
            return "a dial needs Dial-Host and a Dial-Port from 1 to 65535"
        network = head.header("Dial-Network")
        if network is not None and network not in ("tcp", "tcp4", "tcp6"):
            return "rules decide TCP dials only (Dial-Network tcp, tcp4 or tcp6)"
        # The socket's rules as they are now: a reload since this connection came in applies to it.
        context = self._context.current()
        if context is None:
            return f"socket {self._context.name} was removed by a reload"
        refusal = context.refusalAtSocket("localapi", self.record.peer)
        if refusal is not None:
            return refusal
        decision = context.decide(self.record, host, int(port))
        return None if decision is None or decision.allowed else decision.reason

    def _filterOutcome(self, relay: DialFilterRelay) -> tuple[Outcome, str, dict[str, Any]]:
        self.record.requests = relay.requests
        self.record.bytesToClient += relay.refusalBytes
        if relay.refusal is not None:
            outcome = Outcome.REFUSED if relay.refusedStatus == 403 else Outcome.CLIENT_ERROR
            return outcome, relay.refusal, {"status": relay.refusedStatus}
        return relayOutcome(relay)

    def _failed(self, failure: Failure) -> None:
        reason = failureReason(failure)
        self._context.health.failed(reason)
        body = f"tsmux: tailscaled's LocalAPI at {self._context.localapi.path} is unreachable: {reason}\n"
        self.record.sent(buildSimpleResponse(502, "Bad Gateway", body))
        self.record.finish(Outcome.LOCALAPI_UNREACHABLE, reason)

    def readConnectionLost(self) -> None:
        if not heldEOF(self._wait):
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        clientGone(self.record, self._wait, "before its LocalAPI connection was made")
