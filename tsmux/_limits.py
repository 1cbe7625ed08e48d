"""
How many connections tsmux takes, so that no caller can starve the daemon.

tsmux must never reach C{EMFILE}: Twisted then logs on every accept and
nothing new is served, root included.  So at start the soft C{RLIMIT_NOFILE}
is raised to the hard limit (as Go programs, tailscaled among them, do), and
the default connection limit is derived from it, counting every descriptor a
connection can hold.  One uid may hold at most a share of the total, and a
reserve is kept for uid 0, so that one user cannot take the daemon from
others and root always gets in.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ._peercred import PeerCredentials

FDS_PER_CONNECTION = 6
"""Client socket, upstream socket, and two splice pipes (two descriptors each); C{nc} needs fewer."""

RESERVED_FDS = 64
"""Descriptors kept for everything else: listening sockets, logs, LocalAPI lookups, a connection being refused."""

NR_OPEN = "/proc/sys/fs/nr_open"


def raiseFileLimit() -> tuple[int, int]:
    """
    Raise the soft descriptor limit to the hard one.

    @return: the soft limit before and after.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open(NR_OPEN) as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (OSError, ValueError):
            pass
    return soft, soft


def connectionsForDescriptors(nofile: int) -> int:
    """The most connections C{nofile} descriptors carry, with the reserve kept."""
    return max(1, (nofile - RESERVED_FDS) // FDS_PER_CONNECTION)


@dataclass(frozen=True)
class ConnectionLimits:
    """
    @ivar total: connections open at once, all callers (handshakes count).
    @ivar perUid: connections one uid may hold.
    @ivar rootReserve: of C{total}, how many only uid 0 may use.
    """

    total: int
    perUid: int
    rootReserve: int

    @classmethod
    def unlimited(cls) -> ConnectionLimits:
        huge = 1 << 62
        return cls(huge, huge, 0)

    @classmethod
    def derive(cls, nofile: int, total: int | None = None, perUid: int | None = None) -> ConnectionLimits:
        """
        Defaults from the descriptor limit: C{total} what the descriptors
        carry, C{perUid} half of it, and a root reserve of an eighth (at
        least one).  An explicit C{total} above what the descriptors carry is
        lowered to it: past that tsmux would hit EMFILE.
        """
        ceiling = connectionsForDescriptors(nofile)
        total = ceiling if total is None else min(total, ceiling)
        perUid = max(1, total // 2) if perUid is None else perUid
        reserve = max(1, total // 8) if total > 1 else 0
        return cls(total, min(perUid, total), reserve)

    def refusal(self, uid: int | None, openTotal: int, openForUid: int) -> str | None:
        """Why a new connection from C{uid} is refused, or C{None}."""
        if uid == 0:
            if openTotal >= self.total:
                return f"{openTotal} connections open, the most tsmux takes (--max-connections {self.total})"
            return None
        if openTotal >= self.total - self.rootReserve:
            return (
                f"{openTotal} connections open; the last {self.rootReserve} of --max-connections {self.total} "
                "are kept for root"
            )
        if openForUid >= self.perUid:
            return f"uid {uid} holds {openForUid} connections (--max-connections-per-uid {self.perUid})"
        return None

    def asDict(self) -> dict[str, int]:
        return {"total": self.total, "perUid": self.perUid, "rootReserve": self.rootReserve}


class RefusalBurst:
    """
    Logs refusals at the limits once per burst: the first refusal says who
    and why, and when C{quiet} seconds pass without one, a line says how
    many were refused in all.  A flood of connections never floods the log.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, quiet: float = 10.0) -> None:
        self._clock = clock
        self._quiet = quiet
        self._count = 0
        self._uids: set[int | None] = set()
        self._end: object = None

    def refused(self, peer: PeerCredentials | None, reason: str) -> None:
        uid = peer.uid if peer is not None else None
        if self._count == 0:
            self.log.warn(
                "refusing new connections at the limit: {reason} (refused connections are counted in the "
                "metrics; one line when this burst ends)",
                reason=reason,
            )
            self._end = self._clock.callLater(self._quiet, self._burstEnded)
        else:
            self._end.reset(self._quiet)  # type: ignore[attr-defined]
        self._count += 1
        self._uids.add(uid)

    def _burstEnded(self) -> None:
        uids = ", ".join(str(uid) for uid in sorted(self._uids, key=lambda u: -1 if u is None else u))
        self.log.warn(
            "refused {count} connection(s) at the limits (from uid {uids}); accepting again",
            count=self._count,
            uids=uids,
        )
        self._count = 0
        self._uids = set()
        self._end = None

    def stop(self) -> None:
        if self._end is not None and self._end.active():  # type: ignore[attr-defined]
            self._end.cancel()  # type: ignore[attr-defined]
            self._burstEnded()
