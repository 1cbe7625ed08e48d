"""
Who may do what through tsmux, decided from the caller's own credentials.

tailscaled decides LocalAPI rights from its caller's peer credentials, and
behind tsmux its caller is tsmux.  So tsmux makes the same decision for the
real caller: LocalAPI admins (uid 0, tsmux's own uid, configured admins and
tailscaled's operator) get the byte-exact passthrough; everyone else gets
tailscaled's read rights only.  Dials (SOCKS5, and the LocalAPI's own
C{/localapi/v0/dial}) follow the SOCKS allow-lists.

The classification of LocalAPI requests fails closed: an unknown path with a
method other than GET/HEAD is a write, and the GET endpoints tailscaled
reserves for writers are writes too, so through tsmux a non-admin never gets
what tailscaled would refuse them directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Final
from urllib.parse import parse_qsl

from ._peercred import PeerCredentials

LOCALAPI_PREFIX: Final = "/localapi/v0/"

# GET endpoints tailscaled serves only to writers (tailscale-facts.md, "Who may do what").
# A trailing "/" means the prefix and everything under it.
_WRITER_ONLY: Final = (
    "start",
    "logout",
    "login-interactive",
    "reset-auth",
    "shutdown",
    "set-expiry-sooner",
    "check-prefs",
    "reload-config",
    "profiles/",
    "profiles",
    "set-dns",
    "set-use-exit-node-enabled",
    "set-udp-gro-forwarding",
    "disconnect-control",
    "id-token",
    "goroutines",
    "metrics",
    "usermetrics",
    "logtap",
    "pprof",
    "dns-osconfig",
    "dns-query",
    "debug",  # and every debug* below
    "component-debug-logging",
    "dev-set-state-store",
    "files/",
    "files",
    "file-put/",
    "tka/init",
    "tka/sign",
    "tka/modify",
    "tka/disable",
    "tka/force-local-disable",
    "tka/wrap-preauth-key",
    "tka/cosign-recovery-aum",
    "tka/submit-recovery-aum",
    "handle-push-message",
    "set-push-device-token",
    "alpha-set-device-attrs",
    "cert/",
    "cert",
)


class Access(Enum):
    READ = "read"
    WRITE = "write"
    DIAL = "dial"


def classifyLocalAPIRequest(method: str, path: str) -> Access:
    """What a LocalAPI request needs: read, write, or (for C{/localapi/v0/dial}) a dial."""
    if path.startswith(LOCALAPI_PREFIX):
        name = path[len(LOCALAPI_PREFIX) :]
        if name == "dial":
            return Access.DIAL
        if _writerOnly(name):
            return Access.WRITE
    if method in ("GET", "HEAD"):
        return Access.READ
    return Access.WRITE


def _writerOnly(name: str) -> bool:
    if name.startswith("debug"):
        return True
    for entry in _WRITER_ONLY:
        if entry.endswith("/"):
            if name.startswith(entry):
                return True
        elif name == entry:
            return True
    return False


NOTIFY_NO_PRIVATE_KEYS: Final = 1 << 4
"""ipn.NotifyNoPrivateKeys: a reader's IPN-bus watch must ask for private keys to be filtered."""


def _noPrivateKeys(query: str) -> bool:
    """
    Whether C{query} asks for private-key filtering the way tailscaled reads
    it (C{r.FormValue("mask")}, parsed as a base-10 uint64).  Anything
    ambiguous (several masks, C{;} separators) counts as not asking.
    """
    if ";" in query:
        return False
    masks = [value for key, value in parse_qsl(query, keep_blank_values=True) if key == "mask"]
    if len(masks) != 1 or not (masks[0].isascii() and masks[0].isdigit()) or len(masks[0]) > 20:
        return False
    return bool(int(masks[0]) & NOTIFY_NO_PRIVATE_KEYS)


def supplementaryGroups(pid: int) -> frozenset[int]:
    """
    The caller's supplementary groups, from C{/proc/PID/status}.  SO_PEERCRED
    carries only the primary gid; a process that exited meanwhile has none.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


@dataclass
class AccessPolicy:
    """
    The rules.  C{operatorUid} is refreshed from tailscaled's prefs while
    running (see L{tsmux._localapi.OperatorWatcher}); everything else is fixed at start.
    """

    socksAllowUids: frozenset[int] = frozenset()
    socksAllowGids: frozenset[int] = frozenset()
    adminUids: frozenset[int] = frozenset()
    adminGids: frozenset[int] = frozenset()
    dialNeedsPassword: bool = False
    """With C{--socks-auth}: dials need a password, which the LocalAPI's dial cannot carry."""
    ownUid: int | None = None
    """Default: the uid tsmux runs as when it checks (after twistd --uid, that uid)."""
    operatorUid: int | None = None

    def _groups(self, peer: PeerCredentials) -> frozenset[int]:
        extra = peer.groups if peer.groups is not None else supplementaryGroups(peer.pid)
        return frozenset({peer.gid}) | extra

    def mayDial(self, peer: PeerCredentials | None) -> Decision:
        if not (self.socksAllowUids or self.socksAllowGids):
            return Decision(True, "no SOCKS allow-list")
        if peer is None:
            return Decision(False, "caller unknown (no peer credentials) and a SOCKS allow-list is set")
        if peer.uid in self.socksAllowUids:
            return Decision(True, f"uid {peer.uid} allowed")
        if self.socksAllowGids & self._groups(peer):
            return Decision(True, "group allowed")
        return Decision(False, f"uid {peer.uid} is not in --socks-allow-uid/--socks-allow-gid")

    def isAdmin(self, peer: PeerCredentials | None) -> bool:
        if peer is None:
            return False
        ownUid = self.ownUid if self.ownUid is not None else os.getuid()
        if peer.uid in (0, ownUid) or peer.uid in self.adminUids:
            return True
        if self.operatorUid is not None and peer.uid == self.operatorUid:
            return True
        return bool(self.adminGids and self.adminGids & self._groups(peer))

    def decideLocalAPI(self, peer: PeerCredentials | None, method: str, path: str, query: str = "") -> Decision:
        """For a non-admin: may this request pass?"""
        access = classifyLocalAPIRequest(method, path)
        if access is Access.READ and path == LOCALAPI_PREFIX + "watch-ipn-bus" and not _noPrivateKeys(query):
            # tailscaled gives readers the IPN bus only with private keys filtered
            # (mask & NotifyNoPrivateKeys); behind tsmux it would see tsmux's rights.
            return Decision(
                False,
                "watch-ipn-bus without ipn.NotifyNoPrivateKeys (mask bit 16) needs LocalAPI write access",
            )
        if access is Access.DIAL:
            if self.dialNeedsPassword:
                return Decision(False, "--socks-auth is set: dial through SOCKS5 or HTTP CONNECT with a password")
            return self.mayDial(peer)
        if access is Access.READ:
            return Decision(True, "read")
        who = f"uid {peer.uid}" if peer is not None else "an unknown caller"
        return Decision(
            False,
            f"{method} {path} needs LocalAPI write access, which tsmux grants to uid 0, its own uid, "
            f"--admin-uid/--admin-gid and tailscaled's operator; not to {who}",
        )
