"""
The C{nc} dialer: a C{tailscale nc HOST PORT} process per connection, the
original workaround, for hosts where it suits (the CLI's own dial path, no
LocalAPI code in tsmux's data path).

Trade-offs, documented for users: a process per connection (fork/exec cost
and memory), an extra LocalAPI round trip to check tailscaled's state first,
and no half-close (C{tailscale nc} ends both directions together).

The CLI prints tailscaled's state ("Logged out.", "Tailscale is stopped.")
on B{stdout} and exits 1 before dialing, so its output must never be taken
for the target's bytes: tsmux checks the state over the LocalAPI first (as
the CLI does) and does not spawn when tailscaled is not running, and after
spawning it answers success only once the process has produced data or
survived a short grace period; an earlier exit is mapped from its stderr.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer, error
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol, IPushProducer, ITransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._ascaller import Identity, openPathDescriptor, spawnProcessAs
from ._errors import DialError, WayOutFailed, dialErrorFromLocalAPI, failureReason
from ._interfaces import IDialer, IUpstream
from ._localapi import LocalAPIAccess, LocalAPIClient
from ._peercred import PeerCredentials
from ._socks5 import Reply
from ._upstream import boundedDial

_MAX_STDERR = 4096
KILL_AFTER = 1.0
"""Seconds a closed C{tailscale nc} gets to exit by itself before it is killed."""
STDIN_CLOSED_KILL_AFTER = 10.0
"""The same after only its stdin was closed (the client's EOF)."""


class TailscaleNotRunning(DialError):
    """tailscaled is logged out or stopped: no tailnet to dial into."""

    reply = Reply.NETWORK_UNREACHABLE
    kind = "tailscale-not-running"


@implementer(ITransport, IPushProducer)
class _ProcessStream:
    """
    The process's stdin/stdout seen as a stream transport, so the relay
    treats it like a socket: stdin is written to, stdout read from (and
    paused for flow control), EOF on stdin is the write shutdown.
    """

    def __init__(self, process: Any, clock: Any) -> None:
        self._process = process
        self._clock = clock
        self.disconnecting = False
        self._kill: Any = None

    @property
    def producer(self) -> object:
        return getattr(self._process.pipes.get(0), "producer", None) if self._process.pipes else None

    def write(self, data: bytes) -> None:
        self._process.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._process.writeSequence(data)

    def loseWriteConnection(self) -> None:
        self._process.closeStdin()
        # tailscale nc has no half-close: after stdin's EOF it ends by itself once
        # connected; one still dialing (not reading stdin) is killed after a while.
        self._killLater(STDIN_CLOSED_KILL_AFTER)

    def _killLater(self, seconds: float) -> None:
        if self._kill is not None and self._kill.active():
            if self._kill.getTime() - self._clock.seconds() <= seconds:
                return
            self._kill.cancel()
        self._kill = self._clock.callLater(seconds, self.abortConnection)

    def loseConnection(self) -> None:
        self.disconnecting = True
        self._process.closeStdin()
        self._process.closeStdout()
        self._process.closeStderr()
        # tailscale nc may still be dialing and not reading stdin: do not wait for it long.
        self._killLater(KILL_AFTER)

    def processEnded(self) -> None:
        if self._kill is not None and self._kill.active():
            self._kill.cancel()

    def abortConnection(self) -> None:
        self.disconnecting = True
        try:
            self._process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self._process.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._process.unregisterProducer()

    def pauseProducing(self) -> None:
        self._process.pauseProducing()

    def resumeProducing(self) -> None:
        self._process.resumeProducing()

    def stopProducing(self) -> None:
        self.loseConnection()

    def getPeer(self) -> UNIXAddress:
        return UNIXAddress(None)

    def getHost(self) -> UNIXAddress:
        return UNIXAddress(None)


@implementer(IUpstream)
class NcProcess(ProcessProtocol):
    """One C{tailscale nc}: the process protocol, and the upstream once it is up."""

    def __init__(self, clock: Any, grace: float) -> None:
        self._clock = clock
        self._grace = grace
        self._graceCall: Any = None
        self._held: list[bytes] = []
        self._heldEOF = False
        self._heldLoss: Failure | None = None
        self._stderr = b""
        self._owner: IProtocol | None = None
        self.transport: Any = None
        self.process: Any = None
        self.stream: _ProcessStream | None = None
        self.up: defer.Deferred[NcProcess] = defer.Deferred(lambda d: self.abort())

    def connectionMade(self) -> None:
        # IUpstream.transport is the stream the relay uses; keep the process aside.
        self.process = self.transport
        self.stream = _ProcessStream(self.process, self._clock)
        self.transport = self.stream
        self._graceCall = self._clock.callLater(self._grace, self._survived)

    def _survived(self) -> None:
        self._graceCall = None
        if not self.up.called:
            self.up.callback(self)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            self._stderr = (self._stderr + data)[-_MAX_STDERR:]  # the last words matter
            return
        if self._owner is not None:
            self._owner.dataReceived(data)
            return
        self._held.append(data)
        if not self.up.called:
            self._cancelGrace()
            self.up.callback(self)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD != 1:
            return
        if self._owner is None:
            self._heldEOF = True
            return
        halfCloseable = IHalfCloseableProtocol(self._owner, None)
        if halfCloseable is not None:
            halfCloseable.readConnectionLost()

    def processEnded(self, reason: Failure) -> None:
        self._cancelGrace()
        if self.stream is not None:
            self.stream.processEnded()
        code = getattr(reason.value, "exitCode", None)
        stderr = self._stderr.decode("utf-8", "replace").strip()
        if not self.up.called:
            text = stderr or f"exited with status {code}"
            self.up.errback(dialErrorFromLocalAPI(502, text) if stderr else DialError(f"tailscale nc {text}"))
            return
        if code == 0:
            loss = Failure(error.ConnectionDone())
        else:
            signal = getattr(reason.value, "signal", None)
            how = f"exited with status {code}" if code is not None else f"was killed (signal {signal})"
            loss = Failure(WayOutFailed(f"tailscale nc {how}: {stderr[-200:]}"))
        if self._owner is None:
            self._heldLoss = loss
        else:
            self._owner.connectionLost(loss)

    def _cancelGrace(self) -> None:
        if self._graceCall is not None:
            self._graceCall.cancel()
            self._graceCall = None

    # IUpstream: the relay sees the process as a stream transport.

    def attach(self, protocol: IProtocol) -> None:
        self._owner = protocol
        assert self.stream is not None, "attached before the process started"
        protocol.makeConnection(self.stream)
        held, self._held = b"".join(self._held), []
        if held:
            protocol.dataReceived(held)
        if self._heldEOF:
            self.childConnectionLost(1)
        if self._heldLoss is not None:
            protocol.connectionLost(self._heldLoss)

    def abort(self) -> None:
        process = self.process
        if process is not None:
            try:
                process.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass


@implementer(IDialer)
class NcDialer:
    """
    Spawns C{CLI --socket LOCALAPI nc HOST PORT} per connection, as the
    caller (uid, gid and groups set directly: a caller may have no passwd
    entry).  The child reaches tailscaled's socket through a descriptor
    tsmux opened (C{--socket=/proc/self/fd/3}), so a socket in a directory
    only root may enter still works.
    """

    LOCALAPI_FD = 3

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        cli: str,
        localapi: str,
        timeout: float = 10.0,
        grace: float = 0.3,
        client: LocalAPIClient | None = None,
        access: LocalAPIAccess | None = None,
    ) -> None:
        self._reactor = reactor
        self._cli = cli
        self._localapi = localapi
        self._timeout = timeout
        self._grace = grace
        self._client = client if client is not None else LocalAPIClient(reactor, localapi, timeout=timeout)
        self._access = access if access is not None else LocalAPIAccess(reactor, localapi, timeout)
        self.description = f"nc:{cli}"

    def dial(self, host: str, port: int, caller: PeerCredentials | None = None) -> defer.Deferred[IUpstream]:
        identity = self._access.identityFor(caller)
        return boundedDial(
            self._reactor,
            host,
            port,
            self._timeout,
            f"tailscale nc {host} {port}",
            lambda: defer.ensureDeferred(self._dial(host, port, identity)),
        )

    async def close(self) -> None:
        """Release the LocalAPI connections kept for state checks."""
        await self._client.close()

    async def _dial(self, host: str, port: int, identity: Identity | None) -> IUpstream:
        try:
            status = await self._client.status()
        except defer.CancelledError:
            raise
        except Exception:
            raise DialError(f"cannot ask tailscaled's state at {self._localapi}: {failureReason(Failure())}") from None
        state = (status or {}).get("BackendState", "unknown")
        if state != "Running":
            raise TailscaleNotRunning(f"tailscaled is {state}; not spawning {self._cli} nc")
        process = NcProcess(self._reactor, self._grace)
        childFDs: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        socket = self._localapi
        descriptor = None
        try:
            if identity is not None:
                descriptor = openPathDescriptor(self._localapi)
                childFDs[self.LOCALAPI_FD] = descriptor
                socket = f"/proc/self/fd/{self.LOCALAPI_FD}"
            argv = [self._cli, "--socket", socket, "nc", host, str(port)]
            spawnProcessAs(self._reactor, identity, process, self._cli, argv, env=dict(os.environ), childFDs=childFDs)
        except OSError as failure:
            raise DialError(f"cannot run {self._cli}: {failure.strerror}") from None
        finally:
            if descriptor is not None:
                os.close(descriptor)
        return await process.up
