"""
What every connection of one mux shares, and the small parts the front ends
are composed of.

The front ends (L{tsmux._socks5server}, L{tsmux._connect},
L{tsmux._passthrough}, L{tsmux._adminapi}) depend on the
L{ConnectionContext} defined here, below them, never on the factory that
builds them: the factory (L{tsmux._mux}) is the only module that imports
the front ends, so there is no import loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._auth import Credentials, PasswordThrottle
from ._config import PENDING_LIMIT, SPLICE_AFTER, Config
from ._errors import dialErrorFromFailure
from ._hangup import sweepHungUp
from ._interfaces import IDialer, IStreamTransport, IUpstream
from ._limits import ConnectionLimits, RefusalBurst
from ._localapi import LocalAPIAccess, LocalAPIHealth
from ._metrics import Metrics
from ._netmap import NetmapWatcher
from ._peercred import PeerCredentials
from ._policy import AccessPolicy
from ._record import ConnectionRecord, Outcome
from ._relay import Relay
from ._rules import RuleDecision, RuleSet, Verdict, parseTarget
from ._upstream import dialHost


class SharedState:
    """
    What every socket of one process shares: the connection limits in all
    and the counts they are checked against, the metrics, the password
    turns (a uid guessing on one socket waits on all of them) and the
    refusal bursts.  Counts per socket are kept by name, so a socket whose
    settings were reloaded (a new L{ConnectionContext}) keeps its count.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.limits = ConnectionLimits.unlimited()
        self.metrics = Metrics()
        self.throttle = PasswordThrottle(reactor)
        self.refusals = RefusalBurst(reactor)
        self.started = reactor.seconds()
        self.openTotal = 0
        self.openByUid: Counter[int | None] = Counter()
        self.openBySocket: Counter[str] = Counter()
        self.openBySocketUid: Counter[tuple[str, int | None]] = Counter()
        self.contexts: list[ConnectionContext] = []
        """Every socket's context, those still draining after a reload included (for status and metrics)."""
        self.configFile: str | None = None
        self.lastReload: dict[str, Any] | None = None
        self.reload: Callable[[], Deferred[dict[str, Any]]] | None = None
        """Re-read the config file (the service's L{reload}), for C{/tsmux/v0/reload}."""


class ConnectionContext:
    """
    The settings (one L{Config}, whole), the shared services a connection
    needs (clock, dialer, the way to tailscaled's LocalAPI, policy,
    credentials, metrics, limits) and the registry of what is open.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        dialer: IDialer,
        localapi: LocalAPIAccess,
        policy: AccessPolicy | None = None,
        credentials: Credentials | None = None,
        health: LocalAPIHealth | None = None,
        limits: ConnectionLimits | None = None,
        shared: SharedState | None = None,
        netmap: NetmapWatcher | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.dialer = dialer
        self.localapi = localapi
        self.policy = policy if policy is not None else AccessPolicy()
        self.credentials = credentials
        self.health = health if health is not None else LocalAPIHealth(localapi.path)
        self.shared = shared if shared is not None else SharedState(reactor)
        if limits is not None:
            self.shared.limits = limits
        self.throttle = self.shared.throttle
        self.refusals = self.shared.refusals
        self.metrics = self.shared.metrics
        self.started = self.shared.started
        self.name = config.name
        self.ruleSet = RuleSet(config.name, config.rules) if config.rules is not None else None
        self.netmap = netmap
        self.listening: list[str] = list(config.listen)
        self.accepting = True
        """False once its socket stopped accepting (a reload removed or replaced it): it drains."""
        self.successor: ConnectionContext | None = None
        """The context a reload replaced this one with (same socket, new settings), if any."""
        self.removed = False
        """A reload removed this socket."""
        self.openConnections: set[ConnectionRecord] = set()
        self.openByUid: Counter[int | None] = Counter()
        self.relays: set[Relay] = set()

    @property
    def limits(self) -> ConnectionLimits:
        """The process-wide limits (every socket's connections count against them)."""
        return self.shared.limits

    @limits.setter
    def limits(self, limits: ConnectionLimits) -> None:
        self.shared.limits = limits

    # the registry

    def admit(self, record: ConnectionRecord) -> str | None:
        """Count a new connection in, or say why the limits (in all, then this socket's) refuse it."""
        uid = record.uid
        shared, name = self.shared, self.name
        refusal = shared.limits.refusal(uid, shared.openTotal, shared.openByUid[uid])
        if refusal is None:
            refusal = self._socketRefusal(uid)
        if refusal is not None:
            self.refusals.refused(record.peer, refusal)
            self.metrics.limitRefusals += 1
            return refusal
        record.socket = name
        self.openConnections.add(record)
        self.openByUid[uid] += 1
        shared.openTotal += 1
        shared.openByUid[uid] += 1
        shared.openBySocket[name] += 1
        shared.openBySocketUid[(name, uid)] += 1
        return None

    def _socketRefusal(self, uid: int | None) -> str | None:
        cap, capPerUid = self.config.socketMaxConnections, self.config.socketMaxConnectionsPerUid
        if cap is not None and self.shared.openBySocket[self.name] >= cap:
            return f"socket {self.name} holds {cap} connections (its max-connections)"
        if capPerUid is not None and self.shared.openBySocketUid[(self.name, uid)] >= capPerUid:
            return f"uid {uid} holds {capPerUid} connections on socket {self.name} (its max-connections-per-uid)"
        return None

    def ended(self, record: ConnectionRecord) -> None:
        """A record's connection ended (its line is logged): count it out."""
        if record in self.openConnections:
            self.openConnections.discard(record)
            uid = record.uid
            _countDown(self.openByUid, uid)
            shared = self.shared
            shared.openTotal -= 1
            _countDown(shared.openByUid, uid)
            _countDown(shared.openBySocket, self.name)
            _countDown(shared.openBySocketUid, (self.name, uid))
        self.metrics.connectionEnded(record)

    def current(self) -> ConnectionContext | None:
        """
        This socket's settings now: this context, or the one a reload put in
        its place; C{None} if a reload removed the socket.  What an open
        connection that keeps deciding (a framed LocalAPI connection) asks.
        """
        context: ConnectionContext = self
        while context.successor is not None:
            context = context.successor
        return None if context.removed else context

    # this socket's own rules

    def refusalAtSocket(self, protocol: str, peer: PeerCredentials | None) -> str | None:
        """Why this socket turns C{peer} away for C{protocol} (not offered; not in allow-callers), or C{None}."""
        config = self.config
        if protocol not in config.offer:
            return f"socket {self.name} does not offer {protocol} (it offers {', '.join(sorted(config.offer))})"
        return self.callerRefusal(peer)

    def callerRefusal(self, peer: PeerCredentials | None) -> str | None:
        """Why C{peer} may not use this socket at all (its C{allow-callers}), or C{None}."""
        config = self.config
        if config.allowCallers is not None and not config.allowCallers.matches(peer):
            who = f"uid {peer.uid}" if peer is not None else "an unknown caller"
            return f"{who} is not in socket {self.name}'s allow-callers"
        return None

    def decide(self, record: ConnectionRecord, host: str, port: int) -> RuleDecision | None:
        """
        The socket's rules on a dial to C{host}:C{port} for C{record}'s
        caller: the decision (logged as C{rule=}, counted per rule), or
        C{None} when the socket has no rules.
        """
        ruleSet = self.ruleSet
        if ruleSet is not None and not ruleSet.rules:
            decision: RuleDecision | None = ruleSet.openDecision  # no target to read: every one is allowed
        else:
            decision = self.judge(record.peer, host, port)
        if decision is not None:
            record.rule = decision.label
            self.metrics.ruleDecided(self.name, decision.label, decision.verdict.value)
        return decision

    def judge(self, peer: PeerCredentials | None, host: str, port: int) -> RuleDecision | None:
        """The rules' decision alone, counted nowhere (for L{decide}, and for C{tsmux explain})."""
        ruleSet = self.ruleSet
        if ruleSet is None:
            return None
        if dialHost(host) != host or "%" in host:
            # No dialer passes such a host on as it is, and a zone (fe80::1%eth0) takes the dial
            # outside the tailnet's addresses: nothing for rules to allow.
            return RuleDecision(
                Verdict.DENY,
                ruleSet.endLabel,
                "not a host the rules decide (brackets, a zone, or characters no dialer passes on)",
            )
        target = parseTarget(host, port)
        address = target.ip or target.shortForm
        if address is not None and address.is_unspecified:
            # 0.0.0.0 and :: are no host anywhere, but a socket connect() takes them for this host,
            # past any deny of 127.0.0.0/8: nothing for rules to allow.
            return RuleDecision(Verdict.DENY, ruleSet.endLabel, "0.0.0.0 and :: are not hosts the rules decide")
        netmap = self.netmap
        view = netmap.current() if netmap is not None else None
        whyNone = (netmap.whyNone() if netmap is not None else "tsmux reads no tailnet view") if view is None else ""
        tailscaledResolves = self.config.dialer.kind != "direct"
        return ruleSet.decide(peer, target, view, whyNone, tailscaledResolves)

    def closeIdleRelays(self) -> None:
        """Close relays idle past the idle or half-close timeout, or lingering past L{tsmux._relay.LINGER}."""
        now = self.reactor.seconds()
        for relay in list(self.relays):
            relay.idleCheck(now, self.config.idleTimeout, self.config.halfCloseTimeout)

    def sweep(self) -> None:
        """Periodic: timeouts and lingering relays, and peers that left while tsmux was not reading them."""
        self.closeIdleRelays()
        sweepHungUp(self.reactor, self.relays)  # type: ignore[arg-type]

    def startSweeping(self) -> LoopingCall:
        """
        Run L{sweep} every second (sooner for short timeouts): relays are
        closed between their timeout and a quarter (at most 1 s) after it, and
        a peer that hung up while not being read is noticed within a second.
        One periodic call for all connections instead of timers per connection.
        """
        timeouts = [t for t in (self.config.idleTimeout, self.config.halfCloseTimeout) if t is not None]
        loop = LoopingCall(self.sweep)
        loop.clock = self.reactor
        loop.start(min([1.0] + [t / 4 for t in timeouts]), now=False)
        return loop

    # the way out

    def dial(self, wait: UpstreamWait, host: str, port: int) -> None:
        """Dial for C{wait}'s client, as its caller; the time it takes goes to the metrics."""
        wait.begin(self.dialer.dial(host, port, wait.record.peer), self.reactor.seconds())

    def startRelay(
        self,
        record: ConnectionRecord,
        transport: IStreamTransport,
        upstream: IUpstream,
        pending: PendingClient,
        relay: Relay | None = None,
        outcome: Callable[[Relay], tuple[Outcome, str, dict[str, Any]]] | None = None,
    ) -> Relay:
        """
        Join C{transport} and C{upstream} with C{relay} (a plain L{Relay} by
        default, moving to splice(2) for bulk when configured), hand it the
        bytes the client sent meanwhile, and log C{record} when it ends:
        with C{outcome(relay)} if given, else L{relayOutcome}.
        """
        if relay is None:
            relay = Relay(self.reactor)
            if self.config.splice:
                relay.spliceAfter = SPLICE_AFTER
        self.relays.add(relay)

        def finished(relay: Relay, reason: Failure) -> None:
            self.relays.discard(relay)
            record.bytesFromClient += relay.client.bytesReceived
            record.bytesToClient += relay.upstream.bytesReceived
            ending, detail, extra = (outcome or relayOutcome)(relay)
            record.finish(ending, detail, **extra)

        relay.onFinished = finished
        relay.start(transport, upstream, pending.take(), pending.eof, resumeClient=pending.paused)
        return relay


def _countDown(counter: Counter[Any], key: Any) -> None:
    counter[key] -= 1
    if not counter[key]:
        del counter[key]


def relayOutcome(relay: Relay) -> tuple[Outcome, str, dict[str, Any]]:
    """How a relay's end is told: timeouts, a peer that hung up, a failure, or a clean end."""
    if relay.closedIdle == "idle":
        return Outcome.TIMEOUT, "no bytes either way for --idle-timeout", {}
    if relay.closedIdle == "half-closed":
        return Outcome.TIMEOUT, "one direction ended, then no bytes for --half-close-timeout", {}
    if relay.hungUp is relay.client:
        return Outcome.CLIENT_CLOSED, "the client hung up while tsmux was not reading it", {}
    if relay.failure is not None:
        return Outcome.ERROR, relay.failure.getErrorMessage(), {}
    return Outcome.OK, "", {}


class PendingClient:
    """
    What a client sends while its way out is being connected: held (its
    transport paused past L{PENDING_LIMIT}), with its EOF, for the relay.
    """

    def __init__(self, transport: Any, limit: int = PENDING_LIMIT) -> None:
        self._transport = transport
        self._limit = limit
        self._held: list[bytes] = []
        self.size = 0
        self.eof = False
        self.paused = False

    def hold(self, data: bytes) -> None:
        self._held.append(data)
        self.size += len(data)
        if self.size > self._limit and not self.paused:
            self.paused = True
            self._transport.pauseProducing()

    def take(self) -> bytes:
        data = b"".join(self._held)
        self._held = []
        return data


class PhaseDeadline:
    """
    One deadline for a connection's handshake phases (detection, then the
    protocol's own handshake), moved rather than replaced as the connection
    changes owners: one timer per connection.  (Twisted's C{TimeoutMixin}
    keeps its timer inside one protocol instance, and an idle timeout rather
    than a deadline; a connection here passes through two protocols.)
    """

    def __init__(self, clock: IReactorTime, seconds: float, onExpiry: Callable[[], None]) -> None:
        self._onExpiry = onExpiry
        self._call: IDelayedCall | None = clock.callLater(seconds, self._expired)

    def move(self, seconds: float, onExpiry: Callable[[], None]) -> None:
        """The next phase: a new length from now, a new owner to tell."""
        self._onExpiry = onExpiry
        if self._call is not None:
            self._call.reset(seconds)

    def handshake(self, context: ConnectionContext, record: ConnectionRecord, transport: Any, unfinished: str) -> None:
        """
        The front end's handshake phase: C{handshakeTimeout} from now; if it
        runs out, the line says C{unfinished} (e.g. "SOCKS5 handshake not
        done") and the connection is cut.
        """
        timeout = context.config.handshakeTimeout

        def expired() -> None:
            record.finish(Outcome.TIMEOUT, f"{unfinished} within {timeout:g} s")
            transport.abortConnection()

        self.move(timeout, expired)

    def cancel(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _expired(self) -> None:
        self._call = None
        self._onExpiry()


class UpstreamWait:
    """
    A client whose way out is being connected: what it sends meanwhile is
    held (L{pending}); if it leaves, the attempt is cancelled; the outcome
    goes to C{ready(upstream)} or C{failed(failure)}, which the front end
    gives (it answers its own client its own way).
    """

    log = Logger()

    def __init__(
        self,
        context: ConnectionContext,
        record: ConnectionRecord,
        transport: Any,
        ready: Callable[[IUpstream], None],
        failed: Callable[[Failure], None],
    ) -> None:
        self.pending = PendingClient(transport)
        self._context = context
        self.record = record
        self._transport = transport
        self._ready = ready
        self._failed = failed
        self._deferred: Deferred[IUpstream] | None = None
        self._dialStarted: float | None = None
        self._lost = False

    @property
    def waiting(self) -> bool:
        return self._deferred is not None

    def begin(self, connecting: Deferred[IUpstream], dialStarted: float | None = None) -> None:
        """Wait for C{connecting}; a dial (C{dialStarted} given) is timed for the metrics."""
        self._deferred = connecting
        self._dialStarted = dialStarted
        connecting.addCallbacks(self._upstreamReady, self._upstreamFailed)

    def _dialEnded(self, kind: str | None) -> None:
        if self._dialStarted is not None:
            self._context.metrics.dialEnded(self._context.reactor.seconds() - self._dialStarted, kind)

    def _upstreamReady(self, upstream: IUpstream) -> None:
        self._deferred = None
        self._dialEnded(None)
        if self._lost:
            upstream.abort()
            return
        try:
            self._ready(upstream)
        except Exception:
            self._bug(Failure())

    def _upstreamFailed(self, failure: Failure) -> None:
        self._deferred = None
        self._dialEnded(dialErrorFromFailure(failure).kind)
        if self._lost:
            return
        try:
            self._failed(failure)
        except Exception:
            self._bug(Failure())
            return
        self._transport.loseConnection()

    def _bug(self, failure: Failure) -> None:
        self.record.finish(Outcome.INTERNAL_ERROR, failure.getErrorMessage())
        self.log.failure("tsmux bug while connecting", failure)
        self._transport.abortConnection()

    def clientLost(self) -> bool:
        """The client is gone: stop connecting.  Whether an attempt was under way."""
        self._lost = True
        if self._deferred is None:
            return False
        deferred, self._deferred = self._deferred, None
        deferred.cancel()
        return True


def clientGone(record: ConnectionRecord, wait: UpstreamWait | None, when: str = "during the handshake") -> None:
    """The client left before its relay started: stop any attempt for it, and say when it left."""
    if wait is not None and wait.clientLost():
        record.finish(Outcome.CLIENT_CLOSED, "client left while the way out was being connected")
    else:
        record.finish(Outcome.CLIENT_CLOSED, f"client left {when}")


def heldEOF(wait: UpstreamWait | None) -> bool:
    """The client shut down its side: if its way out is still being connected, keep that for the relay."""
    if wait is not None and wait.waiting:
        wait.pending.eof = True
        return True
    return False
