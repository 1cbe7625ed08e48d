"""
What happened on one client connection: the L{Outcome} and the
L{ConnectionRecord} that every owner of the connection fills in and that
writes its single log line when the connection ends.  The log line and the
metrics both read the same typed outcome; nothing is parsed back from text.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ._escape import escapeText
from ._peercred import PeerCredentials
from ._twistedprivate import sendNow

_connectionLog = Logger(namespace="tsmux.connection")


class Outcome(Enum):
    """How a connection ended; the value is the word the log line and the metrics use."""

    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    CLIENT_CLOSED = "client-closed"
    CLIENT_ERROR = "client-error"
    DIAL_ERROR = "dial-error"
    REFUSED = "refused-by-policy"
    LOCALAPI_UNREACHABLE = "localapi-unreachable"
    INTERNAL_ERROR = "internal-error"
    CUT_AT_SHUTDOWN = "cut-at-shutdown"


class ConnectionRecord:
    """
    One client connection, from accept to its end.

    Byte counts are added where the bytes pass: the front ends count what
    they read and write themselves, and the relay's own counts are added
    when it ends; nothing is counted twice.
    """

    # One per open connection, held for its whole life: slots keep it small.
    __slots__ = (
        "_clock",
        "peer",
        "started",
        "protocol",
        "target",
        "requests",
        "access",
        "username",
        "bytesFromClient",
        "bytesToClient",
        "outcome",
        "detail",
        "_onFinished",
        "transport",
        "cutAtShutdown",
        "socket",
        "rule",
    )

    def __init__(
        self,
        clock: IReactorTime,
        peer: PeerCredentials | None,
        onFinished: Callable[[ConnectionRecord], None] | None = None,
    ) -> None:
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
        self.outcome: Outcome | None = None
        self.detail = ""
        self._onFinished = onFinished
        self.transport: Any = None
        self.cutAtShutdown = False
        self.socket = ""
        """The name of the socket the connection came in on."""
        self.rule: str | None = None
        """The socket rule that decided its dial (C{web#1}, C{web#end}, C{web#open}), if one was decided."""

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def uid(self) -> int | None:
        return self.peer.uid if self.peer is not None else None

    def sent(self, data: bytes) -> None:
        """Write C{data} to the client (at once when nothing is queued), counted."""
        sendNow(self.transport, data)
        self.bytesToClient += len(data)

    def _subject(self, target: str | None) -> str:
        if target is not None:
            subject = f"target={target}"
        elif self.requests is not None:
            subject = f"requests={self.requests} access={self.access}"
        elif self.access is not None:
            subject = f"access={self.access}"
        else:
            return "-"
        return subject if self.rule is None else f"{subject} rule={self.rule}"

    def finish(
        self,
        outcome: Outcome,
        detail: str = "",
        *,
        status: int | None = None,
        reply: int | None = None,
        kind: str | None = None,
    ) -> None:
        """
        Record the ending and log it; later calls are ignored.

        @param status: the HTTP status tsmux answered with, if that is the story.
        @param reply: the SOCKS5 reply code, likewise.
        @param kind: the L{tsmux._errors.DialError} kind of a failed dial.
        """
        if self.outcome is not None:
            return
        self.outcome = outcome
        duration = self._clock.seconds() - self.started
        # Target, username and detail may carry client bytes: escaped here, once, for
        # the text line and the structured fields alike.
        target = escapeText(self.target) if self.target is not None else None
        username = escapeText(self.username) if self.username is not None else None
        self.detail = detail = escapeText(detail)
        peer = (str(self.peer) if self.peer is not None else "peer=?") + (
            f" user='{username}'" if username is not None else ""
        )
        told = outcome.value
        if status is not None:
            told += f" status={status}"
        if reply is not None:
            told += f" reply={reply:#04x}"
        if kind is not None:
            told += f" {kind}"
        if self.cutAtShutdown and outcome is not Outcome.CUT_AT_SHUTDOWN:
            told = f"cut-at-shutdown ({told})"
        # Formatted here, once: Twisted's formatter would parse a long format per connection.
        line = (
            f"{self.protocol} socket={self.socket} {peer} {self._subject(target)} "
            f"up={self.bytesFromClient} down={self.bytesToClient} "
            f"{duration:.3f}s {told}{': ' if detail else ''}{detail}"
        )
        _connectionLog.info(
            "{line}",
            line=line,
            protocol=self.protocol,
            socket=self.socket,
            rule=self.rule,
            peer=peer,
            target=target,
            requests=self.requests,
            access=self.access,
            bytesFromClient=self.bytesFromClient,
            bytesToClient=self.bytesToClient,
            duration=duration,
            outcome=outcome.value,
            status=status,
            reply=reply,
            errorKind=kind,
            cutAtShutdown=self.cutAtShutdown,
            detail=detail,
            pid=self.peer.pid if self.peer else None,
            uid=self.peer.uid if self.peer else None,
            gid=self.peer.gid if self.peer else None,
            username=username,
        )
        if self._onFinished is not None:
            self._onFinished(self)
