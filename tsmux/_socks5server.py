"""The SOCKS5 front end: RFC 1928 CONNECT, optionally RFC 1929 username/password."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from ._context import ConnectionContext, PhaseDeadline, UpstreamWait, clientGone, heldEOF
from ._errors import dialErrorFromFailure
from ._interfaces import IStreamTransport, IUpstream
from ._record import ConnectionRecord, Outcome
from ._socks5 import (
    Close,
    ConnectRequested,
    CredentialsReceived,
    Method,
    Reply,
    SendBytes,
    ServerEvent,
    SOCKS5ServerCodec,
    buildReply,
)
from ._upstream import dialHost


@implementer(IHalfCloseableProtocol)
class SOCKS5ServerProtocol(Protocol):
    """
    RFC 1928 server, CONNECT only, dialed through the context's dialer: no
    authentication, or RFC 1929 username/password with C{--socks-auth}.

    The caller's uid is judged first: a caller outside the allow-lists is
    never asked for a password (only "no authentication" is acceptable to
    it, and its request gets reply 02), so it cannot use tsmux to test
    passwords.
    """

    transport: IStreamTransport

    def __init__(
        self,
        context: ConnectionContext,
        record: ConnectionRecord,
        deadline: PhaseDeadline,
        refusedAtSocket: str | None = None,
    ) -> None:
        self._context = context
        self.record = record
        self._deadline = deadline
        self._refusedAtSocket = refusedAtSocket
        self._decision = context.policy.mayDial(record.peer)
        methods: tuple[int, ...]
        if refusedAtSocket is not None:
            methods = ()  # the socket does not offer SOCKS5, or not to this caller: 05 FF
        elif context.credentials is not None and self._decision.allowed:
            methods = (Method.USERNAME_PASSWORD,)
        else:
            methods = (Method.NO_AUTH,)
        self._codec: SOCKS5ServerCodec | None = SOCKS5ServerCodec(methods)
        self._wait: UpstreamWait | None = None
        self._lost = False

    def connectionMade(self) -> None:
        # Negotiation and request must finish in time; the dial has its own timeout.
        self._deadline.handshake(self._context, self.record, self.transport, "SOCKS5 handshake not done")

    def dataReceived(self, data: bytes) -> None:
        self.record.bytesFromClient += len(data)
        if self._wait is not None:
            self._wait.pending.hold(data)
        elif self._codec is not None:
            self._handle(self._codec.receive(data))

    def _handle(self, events: list[ServerEvent]) -> None:
        for event in events:
            if isinstance(event, SendBytes):
                self.record.sent(event.data)
            elif isinstance(event, Close):
                self._deadline.cancel()
                if self._refusedAtSocket is not None:
                    self.record.finish(Outcome.REFUSED, self._refusedAtSocket)
                else:
                    self.record.finish(Outcome.CLIENT_ERROR, event.reason)
                self.transport.loseConnection()
                return
            elif isinstance(event, ConnectRequested):
                self._connect(event)
                return
            elif isinstance(event, CredentialsReceived):
                credentials = event.credentials
                assert self._context.credentials is not None
                ok = self._context.credentials.check(credentials.username, credentials.password)
                self.record.username = credentials.username.decode("utf-8", "replace")
                self._answerCredentials(ok)
                return

    def _answerCredentials(self, ok: bool) -> None:
        """Answer now, or after the caller's uid has waited out its wrong guesses."""
        delay = self._context.throttle.answered(self.record.uid, ok)
        if delay <= 0:
            self._acceptCredentials(ok)
        else:
            self._context.reactor.callLater(delay, self._acceptCredentials, ok)

    def _acceptCredentials(self, ok: bool) -> None:
        if not self._lost and self._codec is not None:
            self._handle(self._codec.acceptCredentials(ok))

    def _connect(self, event: ConnectRequested) -> None:
        self._deadline.cancel()
        self._codec = None  # done; kept alive with the relay otherwise
        request = event.request
        host = f"[{request.host}]" if ":" in request.host else request.host
        self.record.target = f"{host}:{request.port}"
        # What the rules judge is what is dialed: one form for both (see dialHost).
        dialed = dialHost(request.host) or request.host
        refusal = self._decision.reason if not self._decision.allowed else None
        if refusal is None:
            ruled = self._context.decide(self.record, dialed, request.port)
            if ruled is not None and not ruled.allowed:
                refusal = ruled.reason
        if refusal is not None:
            self.record.sent(buildReply(Reply.NOT_ALLOWED))
            self.record.finish(Outcome.REFUSED, refusal)
            self.transport.loseConnection()
            return
        self._wait = UpstreamWait(self._context, self.record, self.transport, self._ready, self._failed)
        if event.buffered:
            self._wait.pending.hold(event.buffered)  # optimistic data, counted as it came
        self._context.dial(self._wait, dialed, request.port)

    def _ready(self, upstream: IUpstream) -> None:
        bound = upstream.transport.getHost()
        if isinstance(bound, (IPv4Address, IPv6Address)):
            self.record.sent(buildReply(Reply.SUCCEEDED, bound.host, bound.port))
        else:
            self.record.sent(buildReply(Reply.SUCCEEDED))
        assert self._wait is not None
        self._context.startRelay(self.record, self.transport, upstream, self._wait.pending)
        self._wait = None  # the relay owns the connection now: nothing here stays alive with it

    def _failed(self, failure: Failure) -> None:
        error = dialErrorFromFailure(failure)
        self.record.sent(buildReply(error.reply))
        self.record.finish(Outcome.DIAL_ERROR, error.reason, reply=error.reply, kind=error.kind)

    def readConnectionLost(self) -> None:
        if heldEOF(self._wait):
            return
        self.record.finish(Outcome.CLIENT_CLOSED, "client shut down its side during the handshake")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._deadline.cancel()
        clientGone(self.record, self._wait)
