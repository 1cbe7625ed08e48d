"""
The service that listens: it builds the dialer and the connection context
from the L{Config}, listens, sweeps, and stops gracefully.
"""

from __future__ import annotations

import shutil
import signal
import sys
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, clientFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._auth import Credentials, readUpstreamCredentials
from ._config import NETMAP_MAX_AGE, Config, DaemonConfig
from ._configfile import ConfigError, loadConfigFile
from ._context import ConnectionContext, SharedState
from ._dialers import DirectDialer, LocalAPIDialer, SOCKS5Dialer
from ._errors import failureReason
from ._interfaces import IDialer, IStreamTransport
from ._limits import ConnectionLimits, raiseFileLimit
from ._listen import (
    StartupError,
    listenOnDescription,
    listenOnPath,
    listenOnSystemd,
    notifySystemd,
    prepareSocketPath,
)
from ._localapi import LocalAPIAccess, LocalAPIClient, LocalAPIHealth
from ._mux import MuxFactory
from ._nc import NcDialer
from ._netmap import NetmapWatcher, statusFetcher
from ._options import Options
from ._policy import AccessPolicy
from ._record import ConnectionRecord, Outcome
from ._rules import RuleSet
from ._upstream import quietConnect


class SocketListener:
    """
    One configured socket: its L{ConnectionContext} (settings, rules, way
    out), the L{MuxFactory} that builds its connections, and its ports.  A
    reload that changes only settings gives the factory a new context; the
    old one drains with the connections it already has.
    """

    def __init__(self, context: ConnectionContext) -> None:
        self.context = context
        self.factory = MuxFactory(context)
        self.ports: list[IListeningPort] = []
        self.secrets = readSecrets(context.config)
        """What its password files said when it was built: a reload re-reads them (a revoked password is gone)."""

    @property
    def config(self) -> Config:
        return self.context.config

    def preflight(self) -> None:
        for address in self.config.listen:
            if address.startswith("/"):
                prepareSocketPath(address)

    def listen(self, reactor: Any) -> None:
        config = self.config
        try:
            for address in config.listen:
                if address.startswith("/"):
                    port = listenOnPath(reactor, address, self.factory, config.mode, config.backlog, group=config.group)
                elif address.lower().startswith("systemd:"):
                    port = listenOnSystemd(reactor, address, self.factory)
                else:
                    port = listenOnDescription(reactor, address, self.factory, config.backlog)
                self.ports.append(port)
        except StartupError:
            self.stopListening()
            raise

    def stopListening(self) -> defer.Deferred[Any]:
        """Stop accepting (a socket tsmux created is removed); open connections go on."""
        ports, self.ports = self.ports, []
        self.context.accepting = False
        return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])


ReloadPlan = dict[str, tuple[str, "ConnectionContext | None"]]
"""Socket name -> what a reload does to it (added, removed, re-created, updated, unchanged) and its new context."""


def readSecrets(config: Config) -> tuple[object, object]:
    """
    What a socket's C{socks-auth} and C{upstream-auth} files say now (not
    their paths): a reload that finds them changed rebuilds the socket's
    context, so a revoked password stops working for new connections.
    """
    try:
        socksAuth = Credentials.fromFile(config.socksAuth).users if config.socksAuth else None
        upstream = readUpstreamCredentials(config.upstreamAuth) if config.upstreamAuth else None
    except StartupError as error:
        return ("unreadable", str(error)), None  # buildContext says why, if the reload goes on to it
    return socksAuth, upstream


def sameAddress(old: Config, new: Config) -> bool:
    """Whether a socket can stay as it is: same address, mode, group and backlog."""
    return (old.listen, old.mode, old.group, old.backlog) == (new.listen, new.mode, new.group, new.backlog)


class TsmuxService(service.Service):
    """
    Listens on every configured socket, each with its own
    L{ConnectionContext}; all share one L{SharedState} (limits in all,
    metrics, password turns).

    Listening happens in L{privilegedStartService} (before twistd drops
    privileges).  With a config file, C{SIGHUP} (and L{reload}) re-reads it
    and applies it without dropping a connection.  Stopping stops accepting
    at once (removing the sockets tsmux created), lets open connections
    finish for up to C{shutdownTimeout} seconds, then cuts the rest.
    """

    log = Logger()

    def __init__(self, config: DaemonConfig | Config, reactor: Any, handleSignals: bool = False) -> None:
        """
        @param handleSignals: re-read the config file on C{SIGHUP} (the
            programs set this; tests call L{reload} instead).
        """
        self._handleSignals = handleSignals
        if isinstance(config, Config):
            config = DaemonConfig.forSocket(config)
        self.daemon = config
        self.reactor = reactor
        self.shared = SharedState(reactor)
        self.shared.configFile = config.configFile
        self.shared.reload = self.reload
        self._started = False
        self.accesses: dict[str, LocalAPIAccess] = {}
        self.healths: dict[str, LocalAPIHealth] = {}
        self.netmaps: dict[str, NetmapWatcher] = {}
        self.listeners: dict[str, SocketListener] = {}
        for socket in config.sockets:
            listener = SocketListener(self.buildContext(socket, config))
            self.listeners[socket.name] = listener
            self.shared.contexts.append(listener.context)
        self._sweep: LoopingCall | None = None
        self._cutNow = False
        self._fileLimits = (0, 0)
        self._reloading = defer.DeferredLock()

    # compatibility with one socket: its context, dialer, access

    @property
    def context(self) -> ConnectionContext:
        return next(iter(self.listeners.values())).context

    @property
    def config(self) -> Config:
        return self.context.config

    @property
    def ports(self) -> list[IListeningPort]:
        return [port for listener in self.listeners.values() for port in listener.ports]

    # building

    def _access(self, config: Config) -> LocalAPIAccess:
        access = self.accesses.get(config.localapi)
        if access is None:
            access = self.accesses[config.localapi] = LocalAPIAccess(self.reactor, config.localapi, config.dialTimeout)
            if self._started:
                access.decide()
        return access

    def _health(self, config: Config) -> LocalAPIHealth:
        health = self.healths.get(config.localapi)
        dialsThroughIt = config.dialer.kind == "localapi"
        if health is None:
            health = self.healths[config.localapi] = LocalAPIHealth(config.localapi, socksUsesIt=dialsThroughIt)
        # Whether SOCKS5 dials fail with it too is said in its warning: true if any socket dials through it.
        health.socksUsesIt = health.socksUsesIt or dialsThroughIt
        return health

    def _netmap(self, config: Config) -> NetmapWatcher | None:
        if not config.rules or not RuleSet(config.name, config.rules).needsNetmap:
            return None
        watcher = self.netmaps.get(config.localapi)
        if watcher is None:
            client = LocalAPIClient(self.reactor, config.localapi, timeout=config.dialTimeout)
            watcher = NetmapWatcher(
                self.reactor, statusFetcher(client), interval=self.daemon.netmapRefresh, maxAge=NETMAP_MAX_AGE
            )
            self.netmaps[config.localapi] = watcher
            if self._started:
                watcher.start()
        return watcher

    def buildContext(self, config: Config, daemon: DaemonConfig) -> ConnectionContext:
        """A socket's context: its dialer, policy and credentials; raises L{StartupError}."""
        access = self._access(config)
        health = self._health(config)
        dialer = makeDialer(config, self.reactor, health, access)
        policy = AccessPolicy(
            socksAllowUids=config.socksAllowUids,
            socksAllowGids=config.socksAllowGids,
            adminUids=daemon.adminUids,
            adminGids=daemon.adminGids,
            dialNeedsPassword=config.socksAuth is not None,
        )
        return ConnectionContext(
            self.reactor,
            config,
            dialer,
            access,
            policy=policy,
            credentials=Credentials.fromFile(config.socksAuth) if config.socksAuth else None,
            health=health,
            shared=self.shared,
            netmap=self._netmap(config),
        )

    # starting

    def preflight(self) -> None:
        """Check (and clean up stale sockets at) every path before listening anywhere."""
        for listener in self.listeners.values():
            listener.preflight()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._fileLimits = raiseFileLimit()
        daemon = self.daemon
        self.shared.limits = ConnectionLimits.derive(
            self._fileLimits[1], daemon.maxConnections, daemon.maxConnectionsPerUid
        )
        started: list[SocketListener] = []
        try:
            for listener in self.listeners.values():
                listener.listen(self.reactor)
                started.append(listener)
        except StartupError:
            for listener in started:
                listener.stopListening()
            raise

    def startService(self) -> None:
        if not self.ports:
            self.privilegedStartService()
        super().startService()
        self._started = True
        for listener in self.listeners.values():
            self._logSocket(listener.context, "listening on")
        limits = self.shared.limits
        before, after = self._fileLimits
        self.log.info(
            "connection limits: {total} in all ({reserve} kept for root), {perUid} per uid; descriptor limit "
            "{after}{raised}",
            total=limits.total,
            reserve=limits.rootReserve,
            perUid=limits.perUid,
            after=after,
            raised=f" (raised from {before})" if after != before else "",
        )
        if self.daemon.maxConnections is not None and limits.total < self.daemon.maxConnections:
            self.log.warn(
                "--max-connections {asked} lowered to {total}: the descriptor limit ({after}) carries no more",
                asked=self.daemon.maxConnections,
                total=limits.total,
                after=after,
            )
        if any(listener.config.operatorRefresh is not None for listener in self.listeners.values()):
            self.log.warn(
                "--operator-refresh is obsolete and ignored: tsmux connects to tailscaled as each caller, "
                "and tailscaled applies its own operator rules"
            )
        # Decided now, not at import: twistd may have dropped root since.
        for access in self.accesses.values():
            access.decide()
        for path in self.healths:
            self.probeLocalAPI(path)
        for watcher in self.netmaps.values():
            watcher.start()
        addresses = ", ".join(address for listener in self.listeners.values() for address in listener.config.listen)
        notifySystemd(f"READY=1\nSTATUS=listening on {addresses}")
        self._sweep = self._startSweeping()
        if self._handleSignals:
            # With flags there is nothing to re-read, but SIGHUP must not kill the daemon either.
            self._installReloadSignal()

    def _logSocket(self, context: ConnectionContext, what: str) -> None:
        config = context.config
        if len(self.listeners) == 1 and self.daemon.configFile is None:
            # The flag form: one socket, as tsmux has always said it.
            self.log.info(
                "tsmux listening on {addresses}; dialer {dialer}; LocalAPI {localapi}",
                addresses=", ".join(config.listen),
                dialer=context.dialer.description,
                localapi=config.localapi,
            )
            return
        rules = "no rules" if config.rules is None else f"{len(config.rules)} rule{'s' * (len(config.rules) != 1)}"
        self.log.info(
            "socket {name} {what} {addresses}: offers {offers}; {rules}; dialer {dialer}; LocalAPI {localapi}",
            name=config.name,
            what=what,
            addresses=", ".join(config.listen),
            offers=", ".join(sorted(config.offer)),
            rules=rules,
            dialer=context.dialer.description,
            localapi=config.localapi,
        )

    def _startSweeping(self) -> LoopingCall:
        """
        One periodic sweep for every socket (draining ones too): timeouts,
        lingering relays, peers that hung up; and contexts left by a reload
        are let go once their last connection ends.  Every second, sooner
        for short timeouts.
        """
        timeouts = [
            t
            for listener in self.listeners.values()
            for t in (listener.config.idleTimeout, listener.config.halfCloseTimeout)
            if t is not None
        ]
        loop = LoopingCall(self._sweepAll)
        loop.clock = self.reactor
        loop.start(min([1.0] + [t / 4 for t in timeouts]), now=False)
        return loop

    def _sweepAll(self) -> None:
        shared = self.shared
        for context in list(shared.contexts):
            context.sweep()
            if not context.accepting and not context.openConnections and not context.relays:
                shared.contexts.remove(context)

    def probeLocalAPI(self, path: str | None = None) -> defer.Deferred[None]:
        """Say once, at start, whether tailscaled's LocalAPI answers."""
        path = path if path is not None else self.config.localapi
        health = self.healths[path]
        endpoint = UNIXClientEndpoint(self.reactor, path, timeout=self.config.dialTimeout)
        connecting = quietConnect(endpoint, Protocol())

        def reachable(protocol: Protocol) -> None:
            cast(IStreamTransport, protocol.transport).loseConnection()
            health.succeeded()

        def unreachable(failure: Failure) -> None:
            health.failed(failureReason(failure))

        return connecting.addCallbacks(reachable, unreachable)

    # reloading

    def _installReloadSignal(self) -> None:
        def onSignal(signum: int, frame: object) -> None:
            self.reactor.callFromThread(self._reloadOnSignal)

        signal.signal(signal.SIGHUP, onSignal)

    def _reloadOnSignal(self) -> None:
        if self.daemon.configFile is None:
            self.log.warn("SIGHUP: tsmux was started with flags, there is no config file to re-read")
            return
        self.reload()

    def reload(self) -> defer.Deferred[dict[str, Any]]:
        """
        Re-read the config file and apply it: new sockets listen, removed
        ones stop accepting (their connections go on), one whose address,
        mode or group changed is re-created, and new settings and rules
        apply to new connections at once.  An invalid file (or one that
        cannot be applied: a path held by another server, a dialer that
        cannot be built) changes nothing and logs one error line.

        @return: what happened, as C{/tsmux/v0/reload} answers it.
        """
        # One at a time: a SIGHUP and a /tsmux/v0/reload arriving together must not interleave.
        return self._reloading.run(lambda: defer.ensureDeferred(self._reload()))

    async def _reload(self) -> dict[str, Any]:
        path = self.daemon.configFile
        if path is None:
            return {"reloaded": False, "error": "tsmux was started with flags: there is no config file to reload"}
        try:
            daemon = loadConfigFile(path, logFormat=self.daemon.logFormat)
            plan = self._plan(daemon)
        except (ConfigError, StartupError) as error:
            lines = error.errors if isinstance(error, ConfigError) else [str(error)]
            self.log.error(
                "reload of {file} failed, the running config is kept: {errors}", file=path, errors="; ".join(lines)
            )
            self._dropUnusedNetmaps()  # one the rejected file's sockets would have used
            result = {"reloaded": False, "error": "; ".join(lines), "errors": lines}
            self.shared.lastReload = result
            return result
        result = await self._apply(daemon, plan)
        self.shared.lastReload = result
        return result

    def _plan(self, daemon: DaemonConfig) -> ReloadPlan:
        """
        What a reload to C{daemon} does to each socket, with the new contexts
        built and new paths checked before anything changes.
        """
        plan: ReloadPlan = {}
        new = {socket.name: socket for socket in daemon.sockets}
        # Paths that the sockets going away or being re-created hold now, free by the time they are listened on.
        freed: set[str] = set()
        for name, listener in self.listeners.items():
            if name not in new:
                plan[name] = ("removed", None)
                freed.update(listener.config.listen)
            elif not sameAddress(listener.config, new[name]):
                freed.update(listener.config.listen)
        for name, config in new.items():
            old = self.listeners.get(name)
            if (
                old is not None
                and old.config == config
                and self.daemon.adminUids == daemon.adminUids
                and (self.daemon.adminGids == daemon.adminGids)
                and old.secrets == readSecrets(config)
            ):
                plan[name] = ("unchanged", None)
                continue
            context = self.buildContext(config, daemon)
            if old is None:
                action = "added"
            elif sameAddress(old.config, config):
                action = "updated"
            else:
                action = "re-created"
            if action != "updated":
                for address in config.listen:
                    if address.startswith("/") and address not in freed:
                        prepareSocketPath(address)
            plan[name] = (action, context)
        return plan

    async def _apply(
        self, daemon: DaemonConfig, plan: dict[str, tuple[str, ConnectionContext | None]]
    ) -> dict[str, Any]:
        shared = self.shared
        changed: dict[str, list[str]] = {"added": [], "removed": [], "re-created": [], "updated": []}
        failed: list[str] = []
        # Stop first, so that a path handed from one socket to another is free when it is listened on.
        for name, (action, _) in plan.items():
            old = self.listeners.get(name)
            if action in ("removed", "re-created") and old is not None:
                await old.stopListening()
                self.listeners.pop(name, None)
                if action == "removed":
                    old.context.removed = True
                    changed[action].append(name)
        for name, (action, context) in plan.items():
            old = self.listeners.get(name)
            if action in ("unchanged", "removed") or context is None:
                continue
            previous = old.context if old is not None else self._draining(name)
            if previous is not None:
                previous.successor = context  # its open framed connections decide by the new rules
            if action == "updated" and old is not None:
                old.context.accepting = False
                old.context = context
                old.factory.context = context
                old.secrets = readSecrets(context.config)
                shared.contexts.append(context)
            else:
                listener = SocketListener(context)
                try:
                    listener.listen(self.reactor)
                except StartupError as error:
                    context.accepting = False
                    failed.append(f"{name}: {error}")
                    continue
                self.listeners[name] = listener
                shared.contexts.append(context)
            changed[action].append(name)
        # Keep the order of the file (the first socket is where status and reload are asked), then
        # the contexts still draining.
        order = [socket.name for socket in daemon.sockets]
        self.listeners = {name: self.listeners[name] for name in order if name in self.listeners}
        current = [listener.context for listener in self.listeners.values()]
        shared.contexts[:] = current + [context for context in shared.contexts if context not in current]
        if (daemon.maxConnections, daemon.maxConnectionsPerUid) != (
            self.daemon.maxConnections,
            self.daemon.maxConnectionsPerUid,
        ):
            shared.limits = ConnectionLimits.derive(
                self._fileLimits[1], daemon.maxConnections, daemon.maxConnectionsPerUid
            )
        self.daemon = daemon
        self._dropUnusedNetmaps()
        parts = [f"{action} {', '.join(names)}" for action, names in changed.items() if names] or ["nothing changed"]
        summary = f"{daemon.summary()}; {'; '.join(parts)}"
        self.log.info("reloaded {file}: {summary}", file=daemon.configFile, summary=summary)
        for name in changed["added"] + changed["re-created"]:
            self._logSocket(self.listeners[name].context, "listening on")
        for line in failed:
            self.log.error("reload: socket {line}", line=line)
        result: dict[str, Any] = {"reloaded": True, "summary": summary, **changed}
        if failed:
            result["failed"] = failed
        return result

    def _draining(self, name: str) -> ConnectionContext | None:
        """The latest context of socket C{name} that stopped accepting (re-created: its port is gone)."""
        for context in reversed(self.shared.contexts):
            if context.name == name and context.successor is None and not context.removed:
                return context
        return None

    def _dropUnusedNetmaps(self) -> None:
        """Stop reading tailscaled's status where no socket's rules need it any more."""
        for path in [path for path in self.netmaps if not self._needsNetmap(path)]:
            self.netmaps.pop(path).stop()

    def _needsNetmap(self, path: str) -> bool:
        return any(
            context.netmap is self.netmaps[path] and (context.accepting or context.openConnections)
            for context in self.shared.contexts
        )

    # stopping

    def cutNow(self) -> None:
        """A second signal during shutdown: stop waiting for open connections."""
        if not self._cutNow:
            self.log.info("second signal: cutting open connections now")
        self._cutNow = True

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        notifySystemd("STOPPING=1")
        await defer.gatherResults([listener.stopListening() for listener in self.listeners.values()])
        self.shared.refusals.stop()
        for watcher in self.netmaps.values():
            watcher.stop()
        for context in self.shared.contexts:
            closeDialer = getattr(context.dialer, "close", None)
            if closeDialer is not None:
                await closeDialer()
        contexts = self.shared.contexts

        def stillOpen() -> list[ConnectionRecord]:
            return [record for context in contexts for record in context.openConnections]

        if stillOpen():
            self.log.info(
                "stopped accepting; waiting up to {timeout:g} s for {count} open connection(s)",
                timeout=self.daemon.shutdownTimeout,
                count=len(stillOpen()),
            )
        deadline = self.reactor.seconds() + self.daemon.shutdownTimeout
        while stillOpen() and self.reactor.seconds() < deadline and not self._cutNow:
            await deferLater(self.reactor, min(0.05, max(0.0, deadline - self.reactor.seconds())))
        # Swept until here: timeouts, the linger and hung-up peers still apply while open ones finish.
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        open = stillOpen()
        if open:
            self.log.warn("shutting down: cutting {count} connection(s)", count=len(open))
            for record in open:
                record.cutAtShutdown = True
                if record.transport is not None:
                    record.transport.abortConnection()
            for context in contexts:
                for relay in list(context.relays):
                    relay.abort()
            # Aborted connections report their loss on the next turn; let their lines be logged.
            await deferLater(self.reactor, 0.05)
            for record in open:
                record.finish(Outcome.CUT_AT_SHUTDOWN, "still open when tsmux stopped")


def makeDialer(config: Config, reactor: Any, health: LocalAPIHealth, access: LocalAPIAccess) -> IDialer:
    spec = config.dialer
    if spec.kind == "direct":
        return DirectDialer(reactor, config.dialTimeout)
    if spec.kind == "socks5":
        description = spec.argument or ""
        try:
            endpoint = clientFromString(reactor, description)
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise StartupError(f"bad --dialer socks5:{description}: {error}") from None
        credentials = readUpstreamCredentials(config.upstreamAuth) if config.upstreamAuth else None
        return SOCKS5Dialer(reactor, endpoint, description, credentials, timeout=config.dialTimeout)
    if spec.kind == "nc":
        cli = spec.argument or "tailscale"
        found = shutil.which(cli)
        if found is None:
            raise StartupError(f"--dialer {spec}: {cli} is not an executable (nor on PATH)")
        return NcDialer(reactor, found, config.localapi, timeout=config.dialTimeout, access=access)
    return LocalAPIDialer(
        reactor,
        access,
        dialSelf=config.dialSelf,  # type: ignore[arg-type]
        timeout=config.dialTimeout,
        health=health,
    )


def buildService(config: DaemonConfig | Config, reactor: Any = None, handleSignals: bool = False) -> TsmuxService:
    """The service for C{config}, its listen paths checked; raises L{StartupError}."""
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    tsmux = TsmuxService(config, reactor, handleSignals)
    tsmux.preflight()
    return tsmux


def makeService(options: Options) -> TsmuxService:
    """
    The twistd entry point.  A startup problem is one line on stderr and
    exit status 1, not a traceback.
    """
    try:
        return buildService(options.toDaemonConfig(), handleSignals=True)
    except ConfigError as error:
        sys.stderr.write("".join(f"tsmux: {line}\n" for line in error.errors))
        raise SystemExit(1) from None
    except StartupError as error:
        sys.stderr.write(f"tsmux: {error}\n")
        raise SystemExit(1) from None
