"""
The server side: one listening socket, several protocols.

L{MuxFactory} builds a L{MuxProtocol} per accepted connection.  It owns the
connection until its first bytes say what it is, then hands the transport
(and the bytes read so far) to one front end: L{SOCKS5ServerProtocol},
L{HTTPConnectProtocol}, L{TsmuxAPIProtocol}, or L{LocalAPIPassthrough}.
Those hand it on to a relay once the way out is connected.  A
L{ConnectionRecord} follows the connection through every owner and writes
its single log line at the end.  This is the only module that imports the
front ends; they depend on the L{ConnectionContext} below them.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from ._adminapi import TsmuxAPIProtocol
from ._config import MAX_REQUEST_LINE, TSMUX_API_PREFIX
from ._connect import HTTPConnectProtocol
from ._context import ConnectionContext, PhaseDeadline
from ._detect import SOCKS4_REJECTED, detect
from ._detect import Protocol as Detected
from ._http import buildSimpleResponse
from ._interfaces import IStreamTransport
from ._passthrough import LocalAPIPassthrough
from ._peercred import peerCredentials
from ._record import ConnectionRecord, Outcome
from ._relay import switchProtocol
from ._socks5server import SOCKS5ServerProtocol


class MuxFactory(Factory):
    """Builds a L{MuxProtocol} per accepted connection, all sharing one L{ConnectionContext}."""

    noisy = False

    def __init__(self, context: ConnectionContext) -> None:
        self.context = context

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        # Who is calling is only known once the transport exists: the limits are
        # applied in MuxProtocol.connectionMade.
        return MuxProtocol(self.context)


def _requestTarget(buffered: bytes) -> bytes:
    parts = buffered.split(b"\n", 1)[0].split(b" ", 2)
    return parts[1] if len(parts) > 1 else b""


class MuxProtocol(Protocol):
    """Owns a new connection until its first bytes show its protocol."""

    transport: IStreamTransport

    def __init__(self, context: ConnectionContext) -> None:
        self._context = context
        self._buffer = b""
        self._handedOff = False
        self.record: ConnectionRecord
        self._deadline: PhaseDeadline | None = None

    def connectionMade(self) -> None:
        context = self._context
        self.record = ConnectionRecord(context.reactor, peerCredentials(self.transport), context.ended)
        self.record.transport = self.transport
        if context.admit(self.record) is not None:
            # No line per refused connection (a flood would flood the log): one per burst.
            self._handedOff = True
            self.transport.abortConnection()
            return
        self._deadline = PhaseDeadline(context.reactor, context.config.detectTimeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        if self._handedOff:
            return  # refused at connect; the abort is under way
        self._buffer += data
        verdict = detect(self._buffer)
        if verdict is None:
            return
        if verdict.protocol is Detected.HTTP and not self._requestLineSeen():
            return
        buffered, self._buffer = self._buffer, b""
        deadline = self._deadline
        assert deadline is not None
        record, context = self.record, self._context
        following: Protocol
        if verdict.protocol is Detected.SOCKS5:
            record.protocol = "socks5"
            # A refused caller still gets its SOCKS5 answer: no acceptable method (05 FF).
            refusal = context.refusalAtSocket("socks5", record.peer)
            following = SOCKS5ServerProtocol(context, record, deadline, refusal)
        elif verdict.protocol is Detected.HTTP and buffered.startswith(b"CONNECT "):
            # The LocalAPI never uses CONNECT (tailscaled answers 405 on Linux): it is ours.
            record.protocol = "http-connect"
            if self._refusedAtSocket(buffered):
                return
            following = HTTPConnectProtocol(context, record, deadline)
        elif verdict.protocol is Detected.HTTP and _requestTarget(buffered).startswith(TSMUX_API_PREFIX):
            # tsmux's own API answers its admins on every socket, whatever the socket offers.
            record.protocol = "tsmux-api"
            following = TsmuxAPIProtocol(context, record, deadline)
        elif verdict.protocol is Detected.HTTP:
            record.protocol = "localapi"
            if self._refusedAtSocket(buffered):
                return
            deadline.cancel()
            following = LocalAPIPassthrough(context, record)
        else:
            deadline.cancel()
            record.protocol = "rejected"
            record.bytesFromClient = len(buffered)
            if verdict.protocol is Detected.SOCKS4:
                record.sent(SOCKS4_REJECTED)
            record.finish(Outcome.CLIENT_ERROR, f"neither SOCKS5 nor HTTP: {verdict.description}")
            self.transport.loseConnection()
            return
        self._handedOff = True
        switchProtocol(self.transport, following, buffered)

    def _refusedAtSocket(self, buffered: bytes) -> bool:
        """HTTP this socket does not offer, or from a caller it does not allow: 403, naming the socket."""
        refusal = self._context.refusalAtSocket(self.record.protocol, self.record.peer)
        if refusal is None:
            return False
        self._handedOff = True
        assert self._deadline is not None
        self._deadline.cancel()
        record = self.record
        record.bytesFromClient = len(buffered)
        record.sent(buildSimpleResponse(403, "Forbidden", f"tsmux: {refusal}\n"))
        record.finish(Outcome.REFUSED, refusal, status=403)
        self.transport.loseConnection()
        return True

    def _requestLineSeen(self) -> bool:
        """
        tsmux serves C{/tsmux/} itself, so an HTTP connection waits for its
        first request line (clients send it at once) before being handed on.
        """
        return b"\n" in self._buffer or len(self._buffer) > MAX_REQUEST_LINE

    def _timedOut(self) -> None:
        self.record.bytesFromClient = len(self._buffer)
        self.record.finish(Outcome.TIMEOUT, f"no protocol shown within {self._context.config.detectTimeout:g} s")
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._handedOff:
            if self._deadline is not None:
                self._deadline.cancel()
            self.record.bytesFromClient = len(self._buffer)
            self.record.finish(Outcome.CLIENT_CLOSED, "closed before showing a protocol")
