"""
A kernel fast path for an established relay: socket → pipe → socket with
C{splice(2)}, so relayed bytes are never copied into Python.

It changes only how the two transports move bytes; everything else stays
Twisted's and the relay's: the transports stay registered with the reactor
as themselves (their C{doRead}/C{doWrite} are replaced on the instance), EOF
and loss go through the relay's own half-close logic, C{loseConnection},
C{abortConnection} and C{loseWriteConnection} keep their meaning (pending
bytes are flushed first), and the relay's byte counts stay exact.

Flow control: a direction holds at most one pipe (C{PIPE_SIZE}) of bytes;
when the destination cannot take them, the source is not read.  Pipes are
made on the first byte, so idle relays cost no extra descriptors.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import main, tcp
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure


class RelaySide(Protocol):
    """What splice needs of a relay's end: its transport and its byte count."""

    transport: Any
    bytesReceived: int
    readDone: bool


PIPE_SIZE = 1024 * 1024
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_READS_PER_EVENT = 4  # then yield to other connections


def canSplice(transport: Any) -> bool:
    """A plain TCP or Unix socket transport, open both ways, nothing Twisted-level in between."""
    return (
        hasattr(os, "splice")
        and isinstance(transport, tcp.Connection)
        and bool(transport.connected)  # an int in Twisted
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not getattr(transport, "TLS", False)
    )


def _takeBuffered(transport: Any) -> bytes:
    """Remove and return what Twisted still has queued to write on C{transport}."""
    data = bytes(transport.dataBuffer[transport.offset :]) + b"".join(transport._tempDataBuffer)
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    return data


class _Direction:
    """Bytes read from C{src} on their way to C{dst}."""

    def __init__(self, src: Any, dst: Any, end: RelaySide) -> None:
        self.src = src
        self.dst = dst
        self.end = end
        self.pipe: tuple[int, int] | None = None
        self.inPipe = 0
        self.prefix = b""

    def openPipe(self) -> tuple[int, int]:
        if self.pipe is None:
            read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.fcntl(write, _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # the default (64 KiB) works, just slower
            self.pipe = (read, write)
        return self.pipe

    def close(self) -> None:
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None


class SpliceRelay:
    """
    Drives an established relay's two socket transports with splice(2).
    C{readDone(side)} is the relay's own handling of an EOF read from a side.
    """

    def __init__(self, client: RelaySide, upstream: RelaySide, readDone: Callable[[Any], None]) -> None:
        self._readDone = readDone
        self._toUpstream = _Direction(client.transport, upstream.transport, client)
        self._toClient = _Direction(upstream.transport, client.transport, upstream)
        self._closed = False

    def start(self) -> None:
        for direction in (self._toUpstream, self._toClient):
            if direction.dst.producer is not None:
                direction.dst.unregisterProducer()
            direction.prefix = _takeBuffered(direction.dst)
        for direction in (self._toUpstream, self._toClient):
            incoming = self._toClient if direction is self._toUpstream else self._toUpstream
            transport = direction.src
            transport.doRead = lambda d=direction: self._read(d)
            transport.doWrite = lambda t=transport, d=incoming: self._write(t, d)
            transport.resumeProducing()  # reading was maybe paused by Twisted's flow control
            transport.startReading()
            if incoming.prefix:
                transport.startWriting()

    # reactor callbacks, on the transports themselves

    def _read(self, direction: _Direction) -> object:
        """The source is readable: move what it has into the pipe, then on."""
        if not direction.dst.connected:
            direction.src.stopReading()
            return None
        for _ in range(_READS_PER_EVENT):
            if direction.inPipe or direction.prefix:
                # The destination is behind: stop reading until it drains.
                direction.src.stopReading()
                direction.dst.startWriting()
                return None
            read, write = direction.openPipe()
            try:
                count = os.splice(direction.src.fileno(), write, PIPE_SIZE, flags=_FLAGS)
            except BlockingIOError:
                return None
            except OSError:
                return main.CONNECTION_LOST
            if count == 0:
                direction.src.stopReading()
                self._readDone(direction.end)
                return None
            direction.end.bytesReceived += count
            direction.inPipe += count
            failure = self._flush(direction)
            if failure is not None:
                # The destination failed: stop reading for it, and report its loss on
                # the next turn (not from inside the source's read).
                direction.src.stopReading()
                dst = direction.dst
                dst.stopReading()
                dst.stopWriting()
                dst.reactor.callLater(0, dst.connectionLost, failure)
                return None
        return None

    def _write(self, transport: Any, direction: _Direction) -> object:
        """The destination is writable: flush what the direction into it holds."""
        if self._flush(direction) is not None:
            return main.CONNECTION_LOST  # this transport is the destination that failed
        if direction.inPipe or direction.prefix:
            return None
        transport.stopWriting()
        if not direction.src.disconnecting and direction.src.connected and not direction.end.readDone:
            direction.src.startReading()
        # Nothing pending: carry out a close or write shutdown Twisted was asked for.
        if transport.disconnecting:
            return main.CONNECTION_DONE
        if transport._writeDisconnecting and not transport._writeDisconnected:
            transport._writeDisconnected = True
            transport._closeWriteConnection()
        return None

    def _flush(self, direction: _Direction) -> Failure | None:
        """Move what the direction holds into its destination; a failure if the destination failed."""
        dst = direction.dst
        if not dst.connected:
            direction.prefix = b""
            direction.inPipe = 0
            return None
        try:
            if direction.prefix:
                sent = dst.socket.send(direction.prefix)
                direction.prefix = direction.prefix[sent:]
            while direction.inPipe and not direction.prefix:
                assert direction.pipe is not None
                moved = os.splice(direction.pipe[0], dst.fileno(), direction.inPipe, flags=_FLAGS)
                direction.inPipe -= moved
        except BlockingIOError:
            pass
        except OSError as error:
            # The destination failed (reset, broken pipe): it is lost, as Twisted would find.
            direction.prefix = b""
            direction.inPipe = 0
            return Failure(ConnectionLost(error.strerror))
        if direction.inPipe or direction.prefix:
            direction.src.stopReading()
            dst.startWriting()
        return None

    def close(self) -> None:
        """Both transports are gone: release the pipes."""
        if not self._closed:
            self._closed = True
            self._toUpstream.close()
            self._toClient.close()
