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

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

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


class PasswordThrottle:
    """
    Slows down a uid that keeps sending wrong passwords.

    The first few wrong answers go out at once; after that every password
    answer to that uid (right or wrong, so that waiting out a delay tells
    nothing) waits its turn, and the turns are spaced by a delay that doubles
    with each further failure, up to C{maxDelay}.  Turns are per uid, not
    per connection, so parallel connections do not multiply the guessing
    rate.  A uid that stays quiet for C{forgetAfter} seconds, or gets a
    password right, starts afresh.  One warning per burst.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        freeFailures: int = 3,
        firstDelay: float = 0.25,
        maxDelay: float = 5.0,
        forgetAfter: float = 60.0,
    ) -> None:
        self._clock = clock
        self._free = freeFailures
        self._first = firstDelay
        self._max = maxDelay
        self._forget = forgetAfter
        self._failures: dict[int | None, int] = {}
        self._nextTurn: dict[int | None, float] = {}
        self._lastFailure: dict[int | None, float] = {}

    def answered(self, uid: int | None, ok: bool) -> float:
        """
        Record an answer about to be given to C{uid}.

        @return: seconds to wait before giving it (0: at once).
        """
        now = self._clock.seconds()
        if uid in self._lastFailure and now - self._lastFailure[uid] > self._forget:
            self._reset(uid)
        failures = self._failures.get(uid, 0)
        delay = 0.0
        if failures >= self._free:
            turn = max(now, self._nextTurn.get(uid, now)) + self._delayAfter(failures)
            self._nextTurn[uid] = turn
            delay = turn - now
        if ok:
            self._reset(uid)
            return delay
        self._failures[uid] = failures + 1
        self._lastFailure[uid] = now
        if failures + 1 == self._free:
            self.log.warn(
                "uid {uid}: {count} wrong passwords in a row; its password answers are now delayed",
                uid=uid,
                count=failures + 1,
            )
        return delay

    def _delayAfter(self, failures: int) -> float:
        return min(self._max, self._first * 2 ** (failures - self._free))

    def _reset(self, uid: int | None) -> None:
        self._failures.pop(uid, None)
        self._nextTurn.pop(uid, None)
        self._lastFailure.pop(uid, None)
