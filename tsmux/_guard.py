"""
The LocalAPI write guard: HTTP to tailscaled for callers who are not
LocalAPI admins, with tailscaled's read rights only.

It is a L{Relay} whose client-to-tailscaled direction goes through a
L{RequestFramer}: every request head on the connection (keep-alive and
pipelining included) is checked before its bytes go on, unchanged.  A
request that needs write is not forwarded: once tailscaled has answered the
requests before it (counted by a L{ResponseFramer}, so answers stay in
order) the client gets C{403} with the rule, and the connection closes.
tailscaled-to-client bytes are never changed.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.python.failure import Failure

from ._http import buildSimpleResponse
from ._httpframing import Body, Head, HTTPFramingError, RequestFramer, ResponseFramer
from ._peercred import PeerCredentials
from ._policy import AccessPolicy
from ._relay import Relay, RelayEnd, closeTransport

HELD_LIMIT = 64 * 1024
"""Client bytes held while an upgrade is pending; past this, stop reading the client."""


class _GuardedClientEnd(RelayEnd):
    relay: GuardedRelay

    def dataReceived(self, data: bytes) -> None:
        self.bytesReceived += len(data)
        self.relay._fromClient(data)


class _CountingUpstreamEnd(RelayEnd):
    relay: GuardedRelay

    def dataReceived(self, data: bytes) -> None:
        self.bytesReceived += len(data)
        self.relay._fromUpstream(data)


class GuardedRelay(Relay):
    """
    @ivar requests: requests forwarded to tailscaled.
    @ivar refusal: why the connection was refused (a 403 or 400), if it was.
    """

    clientEndClass = _GuardedClientEnd
    upstreamEndClass = _CountingUpstreamEnd

    def __init__(
        self,
        policy: AccessPolicy,
        peer: PeerCredentials | None,
        onFinished: Callable[[Relay, Failure], None] | None = None,
    ) -> None:
        super().__init__(onFinished)
        self._policy = policy
        self._peer = peer
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

    # client → tailscaled

    def _fromClient(self, data: bytes) -> None:
        if self._raw:
            self.upstream.transport.write(data)
            return
        if self.refusal is not None:
            return  # nothing after a refused request is forwarded
        self._frame(self._requests.receive, data)

    def _frame(self, parse: Callable[..., list[object]], *args: bytes) -> None:
        """Frame client bytes (new ones, or those held across an upgrade) and forward what passes."""
        try:
            events = parse(*args)
        except HTTPFramingError as error:
            self._refuse(400, "Bad Request", f"tsmux: malformed HTTP request: {error}\n", str(error))
            return
        self._forward(events)
        # While an upgrade waits for tailscaled's answer, client bytes are held: bound them.
        if self._requests.stopped and self._requests.bufferedSize > HELD_LIMIT and not self._clientPaused:
            self._clientPaused = True
            self.client.transport.pauseProducing()

    def _forward(self, events: list[object]) -> None:
        for event in events:
            if isinstance(event, Head):
                head = event.head
                if not head.originForm:
                    why = f"request target {head.target[:80]!r} is not a path (origin form)"
                    self._refuse(400, "Bad Request", f"tsmux: {why}\n", why)
                    return
                decision = self._policy.decideLocalAPI(self._peer, head.method, head.path, head.query)
                if not decision.allowed:
                    self._refuse(403, "Forbidden", f"tsmux: {decision.reason}\n", decision.reason)
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
            except HTTPFramingError:
                # Cannot tell where answers end any more: pass bytes on, refuse nothing new.
                self._unframeable = True
                completed = 0
            self._outstanding -= completed
        self.client.transport.write(data)
        if self._raw or self._unframeable:
            return
        if self._responses.upgraded:
            self._raw = True
            rest = self._requests.takeBuffered()
            if rest:
                self.upstream.transport.write(rest)
            self._resumeClient()
        elif self._requests.stopped and self._outstanding == 0:
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
