"""Who is on the other end of an accepted Unix connection (Linux SO_PEERCRED)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from twisted.internet.interfaces import ITransport

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCredentials:
    """The caller's pid, uid and gid as the kernel saw them at connect time."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


def peerCredentials(transport: ITransport) -> PeerCredentials | None:
    """
    Read SO_PEERCRED from C{transport}'s socket.

    @return: the credentials, or C{None} when the transport is not a Unix
        socket on Linux (TCP listeners for tests, fakes in unit tests).
    """
    getHandle = getattr(transport, "getHandle", None)
    peercred = getattr(socket, "SO_PEERCRED", None)
    if getHandle is None or peercred is None:
        return None
    try:
        handle = getHandle()
        if getattr(handle, "family", None) != socket.AF_UNIX:
            return None
        raw = handle.getsockopt(socket.SOL_SOCKET, peercred, _UCRED.size)
    except (OSError, AttributeError):
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)
