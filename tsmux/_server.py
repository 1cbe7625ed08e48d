"""
The server side: one listening socket, several protocols.

L{MuxProtocol} owns a new connection until its first bytes say what it is,
then hands the transport (and the bytes read so far) to
L{SOCKS5ServerProtocol}, L{HTTPConnectProtocol}, L{TsmuxAPIProtocol}, or, for
the LocalAPI, L{LocalAPIPassthrough}, connected to tailscaled as the caller;
those hand it on to a L{Relay} once the way out is connected.  A
L{ConnectionRecord} follows the connection through every owner and writes
its single log line at the end.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._auth import Credentials, PasswordThrottle
from ._detect import SOCKS4_REJECTED, detect
from ._detect import Protocol as Detected
from ._dialers import LocalAPIHealth
from ._dialfilter import DialFilterRelay
from ._errors import DialRefusedByPolicy, DialTimeout, dialErrorFromFailure, failureReason
from ._escape import escapeText
from ._http import buildSimpleResponse
from ._httpframing import HTTPFramingError, parseRequestHead, splitHead
from ._interfaces import IDialer, IUpstream
from ._limits import ConnectionLimits, RefusalBurst
from ._localapi import LocalAPIAccess
from ._metrics import Metrics
from ._peercred import PeerCredentials, peerCredentials
from ._policy import AccessPolicy
from ._relay import HeldConnection, Relay, switchProtocol
from ._socks5 import (
    Close,
    ConnectRequested,
    CredentialsReceived,
    Method,
    Reply,
    SendBytes,
    SOCKS5ServerCodec,
    buildReply,
)

_connectionLog = Logger(namespace="tsmux.connection")

TSMUX_API_PREFIX = b"/tsmux/"
"""Paths tsmux answers itself; the LocalAPI never uses them."""
MAX_REQUEST_LINE = 8192


def _requestTarget(buffered: bytes) -> bytes:
    parts = buffered.split(b"\n", 1)[0].split(b" ", 2)
    return parts[1] if len(parts) > 1 else b""


SPLICE_AFTER = 256 * 1024
"""Bytes in one direction after which a relay moves to splice(2)."""

PENDING_LIMIT = 64 * 1024
"""Bytes a client may send before its way out is connected; past this we stop reading."""


class ConnectionRecord:
    """
    What happened on one client connection, logged as one structured line
    when it ends (C{log_format} reads well as text; the fields are there for
    a JSON observer).
    """

    def __init__(self, clock: IReactorTime, peer: PeerCredentials | None, onFinished: Any = None) -> None:
        self._clock = clock
        self.peer = peer
        self.started = clock.seconds()
        self.protocol = "undetected"
        self.target: str | None = None
        self.requests: int | None = None
        self.access: str | None = None
        self.username: str | None = None
        self.bytesFromClient = 0
        self.bytesToClient = 0
        self.outcome: str | None = None
        self.detail = ""
        self._onFinished = onFinished
        self.transport: Any = None
        self.cutAtShutdown = False

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def _subject(self, target: str | None) -> str:
        if target is not None:
            return f"target={target}"
        if self.requests is not None:
            return f"requests={self.requests} access={self.access}"
        if self.access is not None:
            return f"access={self.access}"
        return "-"

    def finish(self, outcome: str, detail: str = "") -> None:
        """Record the ending and log it; later calls are ignored."""
        if self.outcome is not None:
            return
        if self.cutAtShutdown and not outcome.startswith("cut-at-shutdown"):
            outcome = f"cut-at-shutdown ({outcome})"
        self.outcome = outcome
        duration = self._clock.seconds() - self.started
        # Target, username and detail may carry client bytes: escaped here, once, for
        # the text line and the structured fields alike.
        target = escapeText(self.target) if self.target is not None else None
        username = escapeText(self.username) if self.username is not None else None
        detail = escapeText(detail)
        self.detail = detail
        peer = (str(self.peer) if self.peer is not None else "peer=?") + (
            f" user='{username}'" if username is not None else ""
        )
        # Formatted here, once: Twisted's formatter would parse a long format per connection.
        line = (
            f"{self.protocol} {peer} {self._subject(target)} up={self.bytesFromClient} down={self.bytesToClient} "
            f"{duration:.3f}s {outcome}{': ' if detail else ''}{detail}"
        )
        _connectionLog.info(
            "{line}",
            line=line,
            protocol=self.protocol,
            peer=peer,
            target=target,
            requests=self.requests,
            access=self.access,
            bytesFromClient=self.bytesFromClient,
            bytesToClient=self.bytesToClient,
            duration=duration,
            outcome=outcome,
            detail=detail,
            pid=self.peer.pid if self.peer else None,
            uid=self.peer.uid if self.peer else None,
            gid=self.peer.gid if self.peer else None,
            username=username,
        )
        if self._onFinished is not None:
            self._onFinished(self)


class MuxFactory(Factory):
    """
    Builds a L{MuxProtocol} per accepted connection and holds what they
    share: the reactor, the dialer, the way to tailscaled's LocalAPI, the
    limits and the timeouts.
    """

    noisy = False

    def __init__(
        self,
        reactor: IReactorTime,
        dialer: IDialer,
        localapi: LocalAPIAccess,
        detectTimeout: float = 15.0,
        health: LocalAPIHealth | None = None,
        handshakeTimeout: float = 30.0,
        policy: AccessPolicy | None = None,
        limits: ConnectionLimits | None = None,
        idleTimeout: float | None = None,
        halfCloseTimeout: float | None = 300.0,
        credentials: Credentials | None = None,
        splice: bool = False,
    ) -> None:
        self.reactor = reactor
        self.dialer = dialer
        self.localapi = localapi
        self.detectTimeout = detectTimeout
        self.handshakeTimeout = handshakeTimeout
        self.policy = policy if policy is not None else AccessPolicy()
        self.health = health if health is not None else LocalAPIHealth(localapi.path)
        self.limits = limits if limits is not None else ConnectionLimits.unlimited()
        self.idleTimeout = idleTimeout
        self.halfCloseTimeout = halfCloseTimeout
        self.credentials = credentials
        self.throttle = PasswordThrottle(reactor)
        self.splice = splice
        self.metrics = Metrics()
        self.started = reactor.seconds()
        self.listening: list[str] = []
        self.openConnections: set[ConnectionRecord] = set()
        self.openByUid: Counter[int | None] = Counter()
        self.relays: set[Relay] = set()
        self.refusals = RefusalBurst(reactor)

    def buildProtocol(self, addr: IAddress) -> Protocol:
        # Who is calling is only known once the transport exists: the per-uid
        # limits are applied in MuxProtocol.connectionMade.
        return MuxProtocol(self)

    def closeIdleRelays(self) -> None:
        """Called periodically: close relays idle past C{idleTimeout} or C{halfCloseTimeout}."""
        now = self.reactor.seconds()
        for relay in list(self.relays):
            relay.idleCheck(now, self.idleTimeout, self.halfCloseTimeout)

    def admit(self, record: ConnectionRecord) -> str | None:
        """Count a new connection in, or say why the limits refuse it."""
        uid = record.peer.uid if record.peer is not None else None
        refusal = self.limits.refusal(uid, len(self.openConnections), self.openByUid[uid])
        if refusal is not None:
            return refusal
        self.openConnections.add(record)
        self.openByUid[uid] += 1
        return None

    def _closed(self, record: ConnectionRecord) -> None:
        if record in self.openConnections:
            self.openConnections.discard(record)
            uid = record.peer.uid if record.peer is not None else None
            self.openByUid[uid] -= 1
            if not self.openByUid[uid]:
                del self.openByUid[uid]
        self.metrics.connectionEnded(record)


class _PhaseTimer:
    """
    A deadline for one phase of a connection (detection, a handshake): the
    subclass's C{_timedOut} runs if the phase is not over in time.
    """

    _timer: IDelayedCall | None = None

    def _startTimer(self, clock: IReactorTime, seconds: float) -> None:
        self._timer = clock.callLater(seconds, self._expired)

    def _expired(self) -> None:
        self._timer = None
        self._timedOut()

    def _timedOut(self) -> None:
        raise NotImplementedError

    def _stopTimer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class MuxProtocol(_PhaseTimer, Protocol):
    """Owns a new connection until its first bytes show its protocol."""

    def __init__(self, mux: MuxFactory) -> None:
        self._mux = mux
        self._buffer = b""
        self._handedOff = False
        self.record: ConnectionRecord

    def connectionMade(self) -> None:
        self.record = ConnectionRecord(self._mux.reactor, peerCredentials(self.transport), self._mux._closed)
        self.record.transport = self.transport
        refusal = self._mux.admit(self.record)
        if refusal is not None:
            # No line per refused connection (a flood would flood the log): one per burst.
            self._handedOff = True
            self._mux.refusals.refused(self.record.peer, refusal)
            self._mux.metrics.limitRefusals += 1
            self.transport.abortConnection()
            return
        self._startTimer(self._mux.reactor, self._mux.detectTimeout)

    def dataReceived(self, data: bytes) -> None:
        if self._handedOff:
            return  # refused at connect; the abort is under way
        self._buffer += data
        verdict = detect(self._buffer)
        if verdict is None:
            return
        if verdict.protocol is Detected.HTTP and not self._requestLineSeen():
            return
        self._stopTimer()
        buffered, self._buffer = self._buffer, b""
        next: Protocol
        if verdict.protocol is Detected.SOCKS5:
            self.record.protocol = "socks5"
            next = SOCKS5ServerProtocol(self._mux, self.record)
        elif verdict.protocol is Detected.HTTP and buffered.startswith(b"CONNECT "):
            # The LocalAPI never uses CONNECT (tailscaled answers 405 on Linux): it is ours.
            self.record.protocol = "http-connect"
            next = HTTPConnectProtocol(self._mux, self.record)
        elif verdict.protocol is Detected.HTTP and _requestTarget(buffered).startswith(TSMUX_API_PREFIX):
            self.record.protocol = "tsmux-api"
            next = TsmuxAPIProtocol(self._mux, self.record)
        elif verdict.protocol is Detected.HTTP:
            self.record.protocol = "localapi"
            next = LocalAPIPassthrough(self._mux, self.record)
        else:
            self.record.protocol = "rejected"
            if verdict.protocol is Detected.SOCKS4:
                self.transport.write(SOCKS4_REJECTED)
                self.record.bytesToClient = len(SOCKS4_REJECTED)
            self.record.bytesFromClient = len(buffered)
            self.record.finish("client-error", f"neither SOCKS5 nor HTTP: {verdict.description}")
            self.transport.loseConnection()
            return
        self._handedOff = True
        switchProtocol(self.transport, next, buffered)

    def _requestLineSeen(self) -> bool:
        """
        tsmux serves C{/tsmux/} itself, so an HTTP connection waits for its
        first request line (clients send it at once) before being handed on.
        """
        return b"\n" in self._buffer or len(self._buffer) > MAX_REQUEST_LINE

    def _timedOut(self) -> None:
        self.record.bytesFromClient = len(self._buffer)
        self.record.finish("timeout", f"no protocol shown within {self._mux.detectTimeout:g} s")
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopTimer()
        if not self._handedOff:
            self.record.bytesFromClient = len(self._buffer)
            self.record.finish("client-closed", "closed before showing a protocol")


class _WaitingForUpstream(Protocol):
    """
    Shared by the two front ends: holds what the client sends while the way
    out is being connected (pausing past L{PENDING_LIMIT}), notices the client
    leaving, and starts the relay when the upstream is there.
    """

    def __init__(self, mux: MuxFactory, record: ConnectionRecord) -> None:
        self._mux = mux
        self.record = record
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._clientEOF = False
        self._paused = False
        self._lost = False
        self._waiting: defer.Deferred[IUpstream] | None = None
        self._dialStarted: float | None = None

    def _hold(self, data: bytes) -> None:
        self._pending.append(data)
        self._pendingSize += len(data)
        if self._pendingSize > PENDING_LIMIT and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _waitFor(self, upstream: defer.Deferred[IUpstream], isDial: bool = False) -> None:
        self._dialStarted = self._mux.reactor.seconds() if isDial else None
        self._waiting = upstream
        upstream.addCallbacks(self._upstreamReady, self._upstreamFailed)
        upstream.addErrback(self._bug)

    def _bug(self, failure: Failure) -> None:
        self.record.finish("internal-error", failure.getErrorMessage())
        Logger().failure("tsmux bug while connecting", failure)
        self.transport.abortConnection()

    def _dialEnded(self, errorKind: str | None) -> None:
        if self._dialStarted is not None:
            self._mux.metrics.dialEnded(self._mux.reactor.seconds() - self._dialStarted, errorKind)
            self._dialStarted = None

    def _upstreamReady(self, upstream: IUpstream) -> None:
        self._waiting = None
        self._dialEnded(None)
        if self._lost:
            upstream.abort()
            return
        self._beforeRelay(upstream)
        relay = self._makeRelay()
        if type(relay) is Relay and self._mux.splice:
            relay.spliceAfter = SPLICE_AFTER
        self._mux.relays.add(relay)
        pending = b"".join(self._pending)
        self._pending = []
        relay.start(self.transport, upstream, pending, self._clientEOF, resumeClient=self._paused)

    def _beforeRelay(self, upstream: IUpstream) -> None:
        """Say success to the client, if the protocol has a way to."""

    def _makeRelay(self) -> Relay:
        return Relay(self._relayFinished)

    def _handshakeBytesFromClient(self) -> int:
        """Client bytes consumed before the relay (and so not counted by it)."""
        return 0

    def _upstreamFailed(self, failure: Failure) -> None:
        self._waiting = None
        self._dialEnded(dialErrorFromFailure(failure).kind)
        if self._lost:
            return
        self._answerFailure(failure)
        self.transport.loseConnection()

    def _answerFailure(self, failure: Failure) -> None:
        raise NotImplementedError

    def _relayFinished(self, relay: Relay, reason: Failure) -> None:
        self._mux.relays.discard(relay)
        self.record.bytesFromClient = self._handshakeBytesFromClient() + relay.client.bytesReceived
        self.record.bytesToClient += relay.upstream.bytesReceived
        self.record.finish(*self._relayOutcome(relay))

    def _relayOutcome(self, relay: Relay) -> tuple[str, str]:
        """The outcome and detail to log; subclasses also copy what their relay knows."""
        if relay.closedIdle == "idle":
            return "timeout", "no bytes either way for --idle-timeout"
        if relay.closedIdle == "half-closed":
            return "timeout", "one direction ended, then no bytes for --half-close-timeout"
        if relay.hungUp is relay.client:
            return "client-closed", "the client hung up while tsmux was not reading it"
        if relay.failure is not None:
            return "error", relay.failure.getErrorMessage()
        return "ok", ""

    def readConnectionLost(self) -> None:
        if self._waiting is not None:
            self._clientEOF = True
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self.record.bytesFromClient = max(
            self.record.bytesFromClient, self._handshakeBytesFromClient() + self._pendingSize
        )
        if self._waiting is not None:
            self.record.finish("client-closed", "client left while the way out was being connected")
            self._waiting.cancel()
        else:
            self.record.finish("client-closed", "client left during the handshake")


@implementer(IHalfCloseableProtocol)
class SOCKS5ServerProtocol(_PhaseTimer, _WaitingForUpstream):
    """
    RFC 1928 server, CONNECT only, dialed through the mux's L{IDialer}: no
    authentication, or RFC 1929 username/password with C{--socks-auth}.

    The caller's uid is judged first: a caller outside the allow-lists is
    never asked for a password (only "no authentication" is acceptable to
    it, and its request gets reply 02), so it cannot use tsmux to test
    passwords.
    """

    def __init__(self, mux: MuxFactory, record: ConnectionRecord) -> None:
        super().__init__(mux, record)
        self._decision = mux.policy.mayDial(record.peer)
        if mux.credentials is not None and self._decision.allowed:
            methods: tuple[int, ...] = (Method.USERNAME_PASSWORD,)
        else:
            methods = (Method.NO_AUTH,)
        self._codec = SOCKS5ServerCodec(methods)
        self._handshakeBytes = 0
        self._codecLeftover = 0

    def connectionMade(self) -> None:
        # Negotiation and request must finish in time; the dial has its own timeout.
        self._startTimer(self._mux.reactor, self._mux.handshakeTimeout)

    def _timedOut(self) -> None:
        self.record.bytesFromClient = self._handshakeBytes
        self.record.finish("timeout", f"SOCKS5 handshake not done within {self._mux.handshakeTimeout:g} s")
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopTimer()
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._waiting is not None:
            self._hold(data)
            return
        self._handshakeBytes += len(data)
        self._handle(self._codec.receive(data))

    def _handle(self, events: list[object]) -> None:
        for event in events:
            if isinstance(event, SendBytes):
                self.transport.write(event.data)
                self.record.bytesToClient += len(event.data)
            elif isinstance(event, Close):
                self._stopTimer()
                self.record.bytesFromClient = self._handshakeBytes
                self.record.finish("client-error", event.reason)
                self.transport.loseConnection()
                return
            elif isinstance(event, ConnectRequested):
                self._connect(event)
                return
            elif isinstance(event, CredentialsReceived):
                credentials = event.credentials
                assert self._mux.credentials is not None
                ok = self._mux.credentials.check(credentials.username, credentials.password)
                self.record.username = credentials.username.decode("utf-8", "replace")
                self._answerCredentials(ok)
                return

    def _answerCredentials(self, ok: bool) -> None:
        """Answer now, or after the caller's uid has waited out its wrong guesses."""
        uid = self.record.peer.uid if self.record.peer is not None else None
        delay = self._mux.throttle.answered(uid, ok)
        if delay <= 0:
            self._handle(self._codec.acceptCredentials(ok))
            return

        def answer() -> None:
            if not self._lost:
                self._handle(self._codec.acceptCredentials(ok))

        self._mux.reactor.callLater(delay, answer)

    def _connect(self, event: ConnectRequested) -> None:
        self._stopTimer()
        self._codec = None  # type: ignore[assignment]  # done; kept alive with the relay otherwise
        request = event.request
        host = f"[{request.host}]" if ":" in request.host else request.host
        self.record.target = f"{host}:{request.port}"
        decision = self._decision
        if not decision.allowed:
            reply = buildReply(Reply.NOT_ALLOWED)
            self.transport.write(reply)
            self.record.bytesToClient += len(reply)
            self.record.bytesFromClient = self._handshakeBytes
            self.record.finish("refused-by-policy", decision.reason)
            self.transport.loseConnection()
            return
        if event.buffered:
            # Optimistic data came with the request; the relay counts it.
            self._codecLeftover = len(event.buffered)
            self._hold(event.buffered)
        self._waitFor(self._mux.dialer.dial(request.host, request.port, self.record.peer), isDial=True)

    def _handshakeBytesFromClient(self) -> int:
        return self._handshakeBytes - self._codecLeftover

    def _beforeRelay(self, upstream: IUpstream) -> None:
        bound = upstream.transport.getHost()
        if isinstance(bound, (IPv4Address, IPv6Address)):
            reply = buildReply(Reply.SUCCEEDED, bound.host, bound.port)
        else:
            reply = buildReply(Reply.SUCCEEDED)
        self.transport.write(reply)
        self.record.bytesToClient += len(reply)

    def _answerFailure(self, failure: Failure) -> None:
        error = dialErrorFromFailure(failure)
        reply = buildReply(error.reply)
        self.transport.write(reply)
        self.record.bytesToClient += len(reply)
        self.record.bytesFromClient = self._handshakeBytes + self._pendingSize - self._codecLeftover
        self.record.finish(f"dial-error reply={error.reply:#04x} {error.kind}", error.reason)

    def readConnectionLost(self) -> None:
        if self._waiting is None:
            self.record.bytesFromClient = self._handshakeBytes
            self.record.finish("client-closed", "client shut down its side during the handshake")
        super().readConnectionLost()


@implementer(IHalfCloseableProtocol)
class LocalAPIPassthrough(_WaitingForUpstream):
    """
    HTTP to tailscaled's LocalAPI, byte for byte, on a LocalAPI connection
    made as the caller (tailscaled sees the caller's uid, gid and groups and
    applies its own rules to every request): nothing parsed or rewritten, so
    keep-alive, pipelining, chunked bodies, long polls and upgrades all just
    work.  Only for callers whose LocalAPI C{dial} tsmux refuses are request
    heads framed (L{DialFilterRelay}).
    """

    _dialRefusal: str | None = None

    def connectionMade(self) -> None:
        peer = self.record.peer
        refusal = self._mux.localapi.refusal(peer)
        if refusal is not None:
            self.record.access = "refused"
            response = buildSimpleResponse(403, "Forbidden", f"tsmux: {refusal}\n")
            self.transport.write(response)
            self.record.bytesToClient += len(response)
            self.record.finish("refused-by-policy status=403", refusal)
            self.transport.loseConnection()
            return
        self._dialRefusal = self._mux.policy.localAPIDialRefusal(peer)
        self.record.access = "passthrough" if self._dialRefusal is None else "dial-filter"
        connecting = self._mux.localapi.connect(peer, HeldConnection())
        connecting.addCallback(self._reachable)
        self._waitFor(connecting)

    def _reachable(self, upstream: HeldConnection) -> HeldConnection:
        self._mux.health.succeeded()
        return upstream

    def dataReceived(self, data: bytes) -> None:
        self._hold(data)

    def _makeRelay(self) -> Relay:
        if self._dialRefusal is None:
            return Relay(self._relayFinished)
        self._filter = DialFilterRelay(self._dialRefusal, self._relayFinished)
        return self._filter

    def _relayOutcome(self, relay: Relay) -> tuple[str, str]:
        if relay is not getattr(self, "_filter", None):
            return super()._relayOutcome(relay)
        filtered = self._filter
        self.record.requests = filtered.requests
        self.record.bytesToClient += filtered.refusalBytes
        if filtered.refusal is not None:
            outcome = "refused-by-policy" if filtered.refusedStatus == 403 else "client-error"
            return f"{outcome} status={filtered.refusedStatus}", filtered.refusal
        return super()._relayOutcome(relay)

    def _answerFailure(self, failure: Failure) -> None:
        reason = failureReason(failure)
        self._mux.health.failed(reason)
        body = f"tsmux: tailscaled's LocalAPI at {self._mux.localapi.path} is unreachable: {reason}\n"
        response = buildSimpleResponse(502, "Bad Gateway", body)
        self.transport.write(response)
        self.record.bytesToClient += len(response)
        self.record.bytesFromClient = self._pendingSize
        self.record.finish("localapi-unreachable", reason)


def _splitAuthority(authority: str) -> tuple[str, int] | None:
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
class HTTPConnectProtocol(_PhaseTimer, _WaitingForUpstream):
    """
    HTTP CONNECT on the mux socket, for tools that speak only HTTP proxies:
    the same dialer and policy as SOCKS5, C{200} then the relay (bytes after
    the request head kept), and errors as HTTP statuses.
    """

    def __init__(self, mux: MuxFactory, record: ConnectionRecord) -> None:
        super().__init__(mux, record)
        self._buffer = b""
        self._requested = False
        self._headBytes = 0
        self._leftover = 0

    def connectionMade(self) -> None:
        self._startTimer(self._mux.reactor, self._mux.handshakeTimeout)

    def _timedOut(self) -> None:
        self.record.bytesFromClient = len(self._buffer)
        self.record.finish("timeout", f"CONNECT request not complete within {self._mux.handshakeTimeout:g} s")
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopTimer()
        super().connectionLost(reason)

    def _handshakeBytesFromClient(self) -> int:
        return self._headBytes - self._leftover if self._requested else len(self._buffer)

    def _answer(self, status: int, reason: str, body: str, outcome: str, headers: str = "") -> None:
        self._stopTimer()
        response = buildSimpleResponse(status, reason, body, headers)
        self.transport.write(response)
        self.record.bytesToClient += len(response)
        self.record.bytesFromClient = self._handshakeBytesFromClient() + self._pendingSize
        self.record.finish(outcome, body.strip())
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._requested:
            self._hold(data)
            return
        self._buffer += data
        try:
            split = splitHead(self._buffer)
            if split is None:
                return
            lines, used = split
            head = parseRequestHead(lines)
        except HTTPFramingError as error:
            why = escapeText(str(error))
            self._answer(400, "Bad Request", f"tsmux: malformed CONNECT request: {why}\n", "client-error")
            return
        self._headBytes = len(self._buffer)
        rest = self._buffer[used:]
        target = _splitAuthority(head.target)
        if head.method != "CONNECT" or target is None:
            authority = escapeText(head.target[:256])
            self._answer(400, "Bad Request", f"tsmux: malformed CONNECT authority '{authority}'\n", "client-error")
            return
        host, port = target
        self.record.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        authorizations = [value for name, value in head.headers if name.lower() == "proxy-authorization"]
        if len(authorizations) > 1:
            # Which one counts would be a guess (and a way to probe): neither does.
            self._answer(400, "Bad Request", "tsmux: more than one Proxy-Authorization header\n", "client-error")
            return
        # Who is asking is decided before any password is looked at.
        decision = self._mux.policy.mayDial(self.record.peer)
        if not decision.allowed:
            self._answer(403, "Forbidden", f"tsmux: {decision.reason}\n", "refused-by-policy")
            return
        self._stopTimer()
        self._requested = True
        self._leftover = len(rest)
        self._buffer = b""
        if rest:
            self._hold(rest)
        if self._mux.credentials is None:
            self._dial(host, port)
            return
        ok = self._authorized(authorizations[0] if authorizations else None)
        uid = self.record.peer.uid if self.record.peer is not None else None
        delay = self._mux.throttle.answered(uid, ok)
        if delay > 0:
            self._mux.reactor.callLater(delay, self._afterPassword, ok, host, port)
        else:
            self._afterPassword(ok, host, port)

    def _afterPassword(self, ok: bool, host: str, port: int) -> None:
        if self._lost or self.record.finished:
            return
        if ok:
            self._dial(host, port)
            return
        self._answer(
            407,
            "Proxy Authentication Required",
            "tsmux: this proxy needs a username and password\n",
            "refused-by-policy",
            'Proxy-Authenticate: Basic realm="tsmux"\r\n',
        )

    def _dial(self, host: str, port: int) -> None:
        self._waitFor(self._mux.dialer.dial(host, port, self.record.peer), isDial=True)

    def _authorized(self, header: str | None) -> bool:
        assert self._mux.credentials is not None
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
        return bool(colon) and self._mux.credentials.check(username, password)

    def _beforeRelay(self, upstream: IUpstream) -> None:
        response = b"HTTP/1.1 200 Connection established\r\n\r\n"
        self.transport.write(response)
        self.record.bytesToClient += len(response)

    def _answerFailure(self, failure: Failure) -> None:
        error = dialErrorFromFailure(failure)
        if isinstance(error, DialTimeout):
            status, reason = 504, "Gateway Timeout"
        elif isinstance(error, DialRefusedByPolicy):
            status, reason = 403, "Forbidden"
        else:
            status, reason = 502, "Bad Gateway"
        response = buildSimpleResponse(status, reason, f"tsmux: {error.reason}\n")
        self.transport.write(response)
        self.record.bytesToClient += len(response)
        self.record.bytesFromClient = self._handshakeBytesFromClient() + self._pendingSize
        self.record.finish(f"dial-error status={status} {error.kind}", error.reason)

    def readConnectionLost(self) -> None:
        if not self._requested:
            self.record.bytesFromClient = len(self._buffer)
            self.record.finish("client-closed", "client shut down its side before its CONNECT was complete")
        super().readConnectionLost()


class TsmuxAPIProtocol(_PhaseTimer, Protocol):
    """
    tsmux's own endpoints, for admins: C{GET /tsmux/v0/metrics} (Prometheus
    text) and C{GET /tsmux/v0/status} (JSON).  One request per connection.
    """

    def __init__(self, mux: MuxFactory, record: ConnectionRecord) -> None:
        self._mux = mux
        self.record = record
        self._buffer = b""
        self._answered = False
        self._head = False

    def connectionMade(self) -> None:
        self._startTimer(self._mux.reactor, self._mux.handshakeTimeout)

    def _timedOut(self) -> None:
        self.record.bytesFromClient = len(self._buffer)
        self.record.finish("timeout", f"request not complete within {self._mux.handshakeTimeout:g} s")
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return
        self._buffer += data
        try:
            split = splitHead(self._buffer)
            if split is None:
                return
            head = parseRequestHead(split[0])
        except HTTPFramingError as error:
            body = f"tsmux: {escapeText(str(error))}\n".encode()
            self._answer(400, "Bad Request", "text/plain; charset=utf-8", body, "client-error")
            return
        self.record.requests = 1
        isAdmin = self._mux.policy.isAdmin(self.record.peer)
        self.record.access = "admin" if isAdmin else "not-admin"
        if not isAdmin:
            body = b"tsmux: /tsmux/ is for tsmux's admins (uid 0, tsmux's own uid, --admin-uid, --admin-gid)\n"
            self._answer(403, "Forbidden", "text/plain; charset=utf-8", body, "refused-by-policy")
            return
        self._head = head.method == "HEAD"
        if head.method not in ("GET", "HEAD"):
            self._answer(405, "Method Not Allowed", "text/plain; charset=utf-8", b"tsmux: GET only\n", "client-error")
        elif head.path == "/tsmux/v0/metrics":
            body = self._mux.metrics.render(len(self._mux.openConnections), self._mux.health.reachable)
            self._answer(200, "OK", "text/plain; version=0.0.4; charset=utf-8", body, "ok")
        elif head.path == "/tsmux/v0/status":
            self._answer(200, "OK", "application/json", json.dumps(self._status(), indent=1).encode(), "ok")
        else:
            self._answer(404, "Not Found", "text/plain; charset=utf-8", b"tsmux: no such endpoint\n", "client-error")

    def _status(self) -> dict[str, Any]:
        from . import __version__

        mux = self._mux
        byProtocol: dict[str, int] = {}
        for record in mux.openConnections:
            byProtocol[record.protocol] = byProtocol.get(record.protocol, 0) + 1
        return {
            "version": __version__,
            "uptimeSeconds": round(mux.reactor.seconds() - mux.started, 3),
            "listening": mux.listening,
            "dialer": mux.dialer.description,
            "localapi": {
                "path": mux.localapi.path,
                "reachable": mux.health.reachable,
                "actsAsCallers": mux.localapi.actAsCallers,
            },
            "openConnections": len(mux.openConnections),
            "openByProtocol": byProtocol,
            "openByUid": {str(uid): count for uid, count in mux.openByUid.items()},
            "limits": mux.limits.asDict(),
            "relays": len(mux.relays),
        }

    def _answer(self, status: int, reason: str, contentType: str, body: bytes, outcome: str) -> None:
        self._answered = True
        self._stopTimer()
        response = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {contentType}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("ascii") + (b"" if self._head else body)
        self.transport.write(response)
        self.record.bytesFromClient = len(self._buffer)
        self.record.bytesToClient = len(response)
        self.record.finish(outcome, "" if status == 200 else body.decode().strip())
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopTimer()
        self.record.bytesFromClient = len(self._buffer)
        self.record.finish("client-closed", "before a complete request")
