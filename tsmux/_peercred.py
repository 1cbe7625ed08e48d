"""Who is on the other end of an accepted Unix connection (Linux SO_PEERCRED)."""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from twisted.internet.interfaces import ITransport

_UCRED = struct.Struct("3i")


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_USUAL_GROUPS = 64
_MAX_GROUPS = 256  # Python's getsockopt takes at most 1024 bytes


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """
    The caller's pid, uid, gid and supplementary groups as the kernel saw
    them at connect time (C{groups} is C{None} where SO_PEERGROUPS is missing).
    """

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] | None = None

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
    return PeerCredentials(pid, uid, gid, _peerGroups(handle))


def _peerGroups(handle: socket.socket) -> frozenset[int] | None:
    """Supplementary groups at connect time; read here, not later from /proc (pids get reused)."""
    # Per connection: ask with room for a usual group count, and only retry with the
    # kernel's maximum when the caller really has more (the kernel says ERANGE).
    try:
        raw = handle.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _USUAL_GROUPS)
    except OSError as error:
        if error.errno != errno.ERANGE:
            return None
        try:
            raw = handle.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_GROUPS)
        except OSError:
            return None  # more groups than Python's getsockopt can carry: /proc instead
    count = len(raw) // 4
    return _shared(frozenset(struct.unpack(f"{count}I", raw[: count * 4])))


_SHARED_GROUPS: dict[frozenset[int], frozenset[int]] = {}


def _shared(groups: frozenset[int]) -> frozenset[int]:
    """
    One copy of each group set: a connection holds its caller's for its whole
    life, and a caller's connections all have the same (a frozenset is 216
    bytes even for one group).  Bounded: past a thousand sets, start over.
    """
    if len(_SHARED_GROUPS) > 1024:
        _SHARED_GROUPS.clear()
    return _SHARED_GROUPS.setdefault(groups, groups)
