"""
The LocalAPI dial filter: HTTP to tailscaled for the callers whose LocalAPI
C{dial} tsmux must refuse (outside the SOCKS allow-lists, or any non-admin
when C{--socks-auth} is set).  Every other LocalAPI connection is the
untouched passthrough, and tailscaled decides every request's rights itself
from the caller's own credentials: this filter only closes the one way
around tsmux's own dial rules.

It is a L{Relay} whose client-to-tailscaled direction goes through a
L{RequestFramer}: every request head on the connection (keep-alive and
pipelining included) is looked at before its bytes go on, unchanged.  A
C{dial} (the path as Go decodes it, so C{/localapi/v0/%64ial} counts) is not
forwarded: once tailscaled has answered the requests before it (counted by a
L{ResponseFramer}, so answers stay in order) the client gets C{403} with the
reason, and the connection closes; nothing the client sent after it reaches
tailscaled.  tailscaled-to-client bytes are never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ._escape import escapeText
from ._http import Body, Head, HTTPParseError, RequestFramer, RequestHead, ResponseFramer, buildSimpleResponse
from ._interfaces import IStreamTransport
from ._relay import Relay, RelayEnd, closeTransport

DialJudge = Callable[[RequestHead], str | None]
"""Given a dial's request head (its C{Dial-Host}, C{Dial-Port}, C{Dial-Network}), why it is refused, or C{None}."""

HELD_LIMIT = 64 * 1024
"""Client bytes held while an upgrade is pending; past this, stop reading the client."""


class _FramedClientEnd(RelayEnd):
    relay: DialFilterRelay
    transport: IStreamTransport

    def forward(self, data: bytes) -> None:
        self.relay._fromClient(data)


class _CountingUpstreamEnd(RelayEnd):
    relay: DialFilterRelay
    transport: IStreamTransport

    def forward(self, data: bytes) -> None:
        self.relay._fromUpstream(data)


class DialFilterRelay(Relay):
    """
    @ivar requests: requests forwarded to tailscaled.
    @ivar refusal: why the connection was refused (a 403 or 400), if it was.
    """

    clientEndClass = _FramedClientEnd
    upstreamEndClass = _CountingUpstreamEnd
    client: _FramedClientEnd
    upstream: _CountingUpstreamEnd

    def __init__(
        self,
        clock: IReactorTime,
        refusal: str | DialJudge,
        onFinished: Callable[[Relay, Failure], None] | None = None,
    ) -> None:
        """
        @param refusal: why every dial is refused, or a L{DialJudge} that
            decides each one (a socket's rules).
        """
        super().__init__(clock, onFinished)
        self._judge: DialJudge = refusal if callable(refusal) else _refuseAll(refusal)
        self._requests = RequestFramer()
        self._responses = ResponseFramer()
        self._outstanding = 0
        self._raw = False
        self._unframeable = False
        self._pendingRefusal: bytes | None = None
        self._clientPaused = False
        self.requests = 0
        self.refusal: str | None = None
        self.refusedStatus: int | None = None
        self.refusalBytes = 0
        self.dialTarget: str | None = None

    # client → tailscaled

    def _fromClient(self, data: bytes) -> None:
        if self._raw:
            self.upstream.transport.write(data)
            return
        if self.refusal is not None:
            return  # nothing after a refused request is forwarded
        self._frame(self._requests.receive, data)

    def _frame(self, parse: Callable[..., Sequence[object]], *args: bytes) -> None:
        """Frame client bytes (new ones, or those held across an upgrade) and forward what passes."""
        try:
            events = parse(*args)
        except HTTPParseError as error:
            why = escapeText(str(error))
            self._refuse(400, "Bad Request", f"tsmux: malformed HTTP request: {why}\n", why)
            return
        self._forward(events)
        # While an upgrade waits for tailscaled's answer, client bytes are held: bound them.
        if self._requests.stopped and self._requests.bufferedSize > HELD_LIMIT and not self._clientPaused:
            self._clientPaused = True
            self.client.transport.pauseProducing()

    def _forward(self, events: Sequence[object]) -> None:
        for event in events:
            if isinstance(event, Head):
                head = event.head
                if not head.originForm:
                    # LocalAPI clients send paths; anything else is refused rather than
                    # second-guessing how Go would route it.
                    why = f"request target {escapeText(head.target[:80])} is not a path (origin form)"
                    self._refuse(400, "Bad Request", f"tsmux: {why}\n", why)
                    return
                if _isDial(head):
                    host, port = head.header("Dial-Host"), head.header("Dial-Port")
                    # Header values are kept as latin-1 text: back to the bytes sent, then escaped.
                    self.dialTarget = escapeText(f"{host or '?'}:{port or '?'}".encode("latin-1", "replace"))
                    refusal = self._judge(head)
                    if refusal is not None:
                        why = f"LocalAPI dial to {self.dialTarget} refused: {refusal}"
                        self._refuse(403, "Forbidden", f"tsmux: {why}\n", why)
                        return
                self._responses.expect(head.method == "HEAD")
                self._outstanding += 1
                self.requests += 1
                self.upstream.transport.write(event.raw)
            elif isinstance(event, Body):
                self.upstream.transport.write(event.raw)

    def _refuse(self, status: int, reason: str, body: str, why: str) -> None:
        self.refusal = why
        self.refusedStatus = status
        self._pendingRefusal = buildSimpleResponse(status, reason, body)
        self._answerIfDue()

    def _answerIfDue(self, upstreamGone: bool = False) -> None:
        """Send the refusal once every forwarded request has its answer, then close."""
        if self._pendingRefusal is None or (self._outstanding and not upstreamGone):
            return
        response, self._pendingRefusal = self._pendingRefusal, None
        if not self.client.lost:
            self.client.transport.write(response)
            self.refusalBytes = len(response)
        for end in (self.client, self.upstream):
            if not end.lost:
                closeTransport(end.transport)

    # tailscaled → client

    def _fromUpstream(self, data: bytes) -> None:
        if not (self._raw or self._unframeable):
            try:
                completed = self._responses.receive(data)
            except HTTPParseError:
                # Cannot tell where answers end any more: pass bytes on, refuse nothing new.
                self._unframeable = True
                completed = 0
            self._outstanding -= completed
        self.client.transport.write(data)
        if self._raw or self._unframeable:
            return
        if self._responses.upgraded and self.refusal is None:
            self._raw = True
            rest = self._requests.takeBuffered()
            if rest:
                self.upstream.transport.write(rest)
            self._resumeClient()
        elif self._requests.stopped and self._outstanding == 0 and self.refusal is None:
            # The upgrade was answered without 101: what the client sent next is HTTP.
            self._frame(self._requests.resume)
            if not self._requests.stopped:
                self._resumeClient()
        self._answerIfDue()

    def _resumeClient(self) -> None:
        if self._clientPaused and not self.client.lost:
            self._clientPaused = False
            self.client.transport.resumeProducing()

    def _endLost(self, end: RelayEnd, reason: Failure) -> None:
        if end is self.upstream and not end.lost:
            # tailscaled is gone: no more answers will come, refuse now.
            self._answerIfDue(upstreamGone=True)
        super()._endLost(end, reason)


def _refuseAll(reason: str) -> DialJudge:
    def judge(head: RequestHead) -> str | None:
        return reason

    return judge


DIAL_PATH = "/localapi/v0/dial"


def _isDial(head: RequestHead) -> bool:
    """A request tailscaled would route to its dial handler (C{r.URL.Path}, decoded)."""
    try:
        return head.path == DIAL_PATH
    except UnicodeDecodeError:
        return True  # Go would not decode it either; refuse rather than guess
