"""
Who may do what through tsmux, decided from the caller's own credentials.

tsmux does not decide LocalAPI rights: it connects to tailscaled as the
caller (see L{tsmux._ascaller}), and tailscaled applies its own rules,
operator and revocations included, to every request.  What tsmux decides
is only what is its own: who may dial (the SOCKS allow-lists, which also
cover the LocalAPI's C{dial} endpoint, and C{--socks-auth}), and who may
use tsmux's own C{/tsmux/} API (its admins).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._peercred import PeerCredentials


def supplementaryGroups(pid: int) -> frozenset[int]:
    """
    The caller's supplementary groups, from C{/proc/PID/status}: the fallback
    when SO_PEERGROUPS could not carry them.  A process that exited
    meanwhile has none.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def callerGroups(peer: PeerCredentials) -> frozenset[int]:
    """Supplementary groups as the kernel gave them at accept, else from C{/proc}."""
    return peer.groups if peer.groups is not None else supplementaryGroups(peer.pid)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


ALLOWED_NO_LIST = Decision(True, "no SOCKS allow-list")


@dataclass(frozen=True)
class AccessPolicy:
    """The rules, fixed at start."""

    socksAllowUids: frozenset[int] = frozenset()
    socksAllowGids: frozenset[int] = frozenset()
    adminUids: frozenset[int] = frozenset()
    adminGids: frozenset[int] = frozenset()
    dialNeedsPassword: bool = False
    """With C{--socks-auth}: dials need a password, which the LocalAPI's dial cannot carry."""
    ownUid: int | None = None
    """Default: the uid tsmux runs as when it checks (after twistd --uid, that uid)."""

    def _inGroups(self, gids: frozenset[int], peer: PeerCredentials) -> bool:
        return peer.gid in gids or bool(gids & callerGroups(peer))

    def mayDial(self, peer: PeerCredentials | None) -> Decision:
        """SOCKS5, HTTP CONNECT and the LocalAPI's C{dial}: is this caller on the allow-lists?"""
        if not (self.socksAllowUids or self.socksAllowGids):
            return ALLOWED_NO_LIST
        if peer is None:
            return Decision(False, "caller unknown (no peer credentials) and a SOCKS allow-list is set")
        if peer.uid in self.socksAllowUids:
            return Decision(True, f"uid {peer.uid} allowed")
        if self.socksAllowGids and self._inGroups(self.socksAllowGids, peer):
            return Decision(True, "group allowed")
        return Decision(False, f"uid {peer.uid} is not in --socks-allow-uid/--socks-allow-gid")

    def isAdmin(self, peer: PeerCredentials | None) -> bool:
        """tsmux's own admins (its C{/tsmux/} API): uid 0, tsmux's uid, C{--admin-uid}, C{--admin-gid}."""
        if peer is None:
            return False
        ownUid = self.ownUid if self.ownUid is not None else os.getuid()
        if peer.uid in (0, ownUid) or peer.uid in self.adminUids:
            return True
        return bool(self.adminGids) and self._inGroups(self.adminGids, peer)

    def localAPIDialRefusal(self, peer: PeerCredentials | None) -> str | None:
        """
        Why this caller's LocalAPI C{dial} requests must be refused, or
        C{None}.  Only such callers' LocalAPI connections are framed at all;
        everyone else, tsmux's admins always, gets the untouched passthrough.
        """
        if self.isAdmin(peer):
            return None  # tsmux's admins: the untouched passthrough, as before
        if self.dialNeedsPassword:
            return "--socks-auth is set: dial through SOCKS5 or HTTP CONNECT with a password"
        decision = self.mayDial(peer)
        return None if decision.allowed else decision.reason
