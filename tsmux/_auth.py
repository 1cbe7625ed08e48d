"""
Username/password files: C{--socks-auth} (who may use tsmux's SOCKS5 and
HTTP CONNECT) and C{--upstream-auth} (what tsmux says to an upstream SOCKS5
server).  Lines are C{user:password}; blank lines and C{#} comments are
ignored.  A file others may read or anyone but its owner may write is
refused: it holds secrets.
"""

from __future__ import annotations

import hmac
import os
import stat
from dataclasses import dataclass

from ._listen import StartupError


def _readSecretFile(path: str, what: str) -> list[tuple[bytes, bytes]]:
    try:
        info = os.stat(path)
        with open(path, "rb") as f:
            content = f.read()
    except OSError as error:
        raise StartupError(f"cannot read {what} file {path}: {error.strerror}") from None
    if info.st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise StartupError(
            f"{what} file {path} has mode {stat.S_IMODE(info.st_mode):04o}: others may read or change it "
            "(chmod 600 or 640)"
        )
    entries = []
    for number, line in enumerate(content.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        user, colon, password = line.partition(b":")
        if not colon or not user or not password or len(user) > 255 or len(password) > 255:
            raise StartupError(f"{what} file {path}, line {number}: expected user:password (1 to 255 bytes each)")
        entries.append((user, password))
    if not entries:
        raise StartupError(f"{what} file {path} has no user:password line")
    return entries


@dataclass(frozen=True)
class Credentials:
    """Who may authenticate to tsmux."""

    users: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def fromFile(cls, path: str) -> Credentials:
        return cls(tuple(_readSecretFile(path, "--socks-auth")))

    def check(self, username: bytes, password: bytes) -> bool:
        """Constant-time in the password, and no faster for unknown users."""
        ok = False
        for user, expected in self.users:
            userMatches = hmac.compare_digest(user, username)
            passwordMatches = hmac.compare_digest(expected, password)
            ok |= userMatches and passwordMatches
        return ok


def readUpstreamCredentials(path: str) -> tuple[bytes, bytes]:
    """The single C{user:password} tsmux presents to an upstream SOCKS5 server."""
    entries = _readSecretFile(path, "--upstream-auth")
    if len(entries) != 1:
        raise StartupError(f"--upstream-auth file {path} must hold exactly one user:password line")
    return entries[0]
