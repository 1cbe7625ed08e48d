"""
The service that listens: it builds the dialer and the connection context
from the L{Config}, listens, sweeps, and stops gracefully.
"""

from __future__ import annotations

import shutil
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
from ._config import Config, Options
from ._context import ConnectionContext
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
from ._localapi import LocalAPIAccess, LocalAPIHealth
from ._mux import MuxFactory
from ._nc import NcDialer
from ._policy import AccessPolicy
from ._record import Outcome
from ._upstream import quietConnect


class TsmuxService(service.Service):
    """
    Listens on every configured address with one L{MuxFactory}.

    Listening happens in L{privilegedStartService} (before twistd drops
    privileges).  Stopping stops accepting at once (removing the sockets
    tsmux created), lets open connections finish for up to
    C{shutdownTimeout} seconds, then cuts the rest.
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.health = LocalAPIHealth(config.localapi, socksUsesIt=config.dialer.kind == "localapi")
        self.access = LocalAPIAccess(reactor, config.localapi, config.dialTimeout)
        self.dialer = makeDialer(config, reactor, self.health, self.access)
        self.policy = AccessPolicy(
            socksAllowUids=config.socksAllowUids,
            socksAllowGids=config.socksAllowGids,
            adminUids=config.adminUids,
            adminGids=config.adminGids,
            dialNeedsPassword=config.socksAuth is not None,
        )
        self.context = ConnectionContext(
            reactor,
            config,
            self.dialer,
            self.access,
            policy=self.policy,
            credentials=Credentials.fromFile(config.socksAuth) if config.socksAuth else None,
            health=self.health,
        )
        self.context.listening = list(config.listen)
        self.factory = MuxFactory(self.context)
        self._sweep: LoopingCall | None = None
        self._cutNow = False
        self.ports: list[IListeningPort] = []

    def preflight(self) -> None:
        """Check (and clean up stale sockets at) every path before listening anywhere."""
        for address in self.config.listen:
            if address.startswith("/"):
                prepareSocketPath(address)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        config = self.config
        self._fileLimits = raiseFileLimit()
        self.context.limits = ConnectionLimits.derive(
            self._fileLimits[1], config.maxConnections, config.maxConnectionsPerUid
        )
        try:
            for address in config.listen:
                if address.startswith("/"):
                    port = listenOnPath(
                        self.reactor, address, self.factory, config.mode, config.backlog, group=config.group
                    )
                elif address.lower().startswith("systemd:"):
                    port = listenOnSystemd(self.reactor, address, self.factory)
                else:
                    port = listenOnDescription(self.reactor, address, self.factory, config.backlog)
                self.ports.append(port)
        except StartupError:
            for port in self.ports:
                port.stopListening()
            self.ports = []
            raise

    def startService(self) -> None:
        if not self.ports:
            self.privilegedStartService()
        super().startService()
        self.log.info(
            "tsmux listening on {addresses}; dialer {dialer}; LocalAPI {localapi}",
            addresses=", ".join(self.config.listen),
            dialer=self.dialer.description,
            localapi=self.config.localapi,
        )
        limits = self.context.limits
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
        if self.config.maxConnections is not None and limits.total < self.config.maxConnections:
            self.log.warn(
                "--max-connections {asked} lowered to {total}: the descriptor limit ({after}) carries no more",
                asked=self.config.maxConnections,
                total=limits.total,
                after=after,
            )
        if self.config.operatorRefresh is not None:
            self.log.warn(
                "--operator-refresh is obsolete and ignored: tsmux connects to tailscaled as each caller, "
                "and tailscaled applies its own operator rules"
            )
        # Decided now, not at import: twistd may have dropped root since.
        self.access.decide()
        self.probeLocalAPI()
        notifySystemd(f"READY=1\nSTATUS=listening on {', '.join(self.config.listen)}")
        self._sweep = self.context.startSweeping()

    def probeLocalAPI(self) -> defer.Deferred[None]:
        """Say once, at start, whether tailscaled's LocalAPI answers."""
        endpoint = UNIXClientEndpoint(self.reactor, self.config.localapi, timeout=self.config.dialTimeout)
        connecting = quietConnect(endpoint, Protocol())

        def reachable(protocol: Protocol) -> None:
            cast(IStreamTransport, protocol.transport).loseConnection()
            self.health.succeeded()

        def unreachable(failure: Failure) -> None:
            self.health.failed(failureReason(failure))

        return connecting.addCallbacks(reachable, unreachable)

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
        ports, self.ports = self.ports, []
        await defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])
        self.context.refusals.stop()
        closeDialer = getattr(self.dialer, "close", None)
        if closeDialer is not None:
            await closeDialer()
        open = self.context.openConnections
        if open:
            self.log.info(
                "stopped accepting; waiting up to {timeout:g} s for {count} open connection(s)",
                timeout=self.config.shutdownTimeout,
                count=len(open),
            )
        deadline = self.reactor.seconds() + self.config.shutdownTimeout
        while open and self.reactor.seconds() < deadline and not self._cutNow:
            await deferLater(self.reactor, min(0.05, max(0.0, deadline - self.reactor.seconds())))
        # Swept until here: timeouts, the linger and hung-up peers still apply while open ones finish.
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        if open:
            self.log.warn("shutting down: cutting {count} connection(s)", count=len(open))
            for record in list(open):
                record.cutAtShutdown = True
                if record.transport is not None:
                    record.transport.abortConnection()
            for relay in list(self.context.relays):
                relay.abort()
            # Aborted connections report their loss on the next turn; let their lines be logged.
            await deferLater(self.reactor, 0.05)
            for record in list(open):
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


def buildService(config: Config, reactor: Any = None) -> TsmuxService:
    """The service for C{config}, its listen paths checked; raises L{StartupError}."""
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    tsmux = TsmuxService(config, reactor)
    tsmux.preflight()
    return tsmux


def makeService(options: Options) -> TsmuxService:
    """
    The twistd entry point.  A startup problem is one line on stderr and
    exit status 1, not a traceback.
    """
    try:
        return buildService(options.toConfig())
    except StartupError as error:
        sys.stderr.write(f"tsmux: {error}\n")
        raise SystemExit(1) from None
