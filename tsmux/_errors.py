"""
Typed dial errors and the one place where failures become SOCKS5 reply codes.

Every dialer reports failure as a L{DialError} subclass, so the SOCKS5 server
and the HTTP CONNECT front end map errors to answers in one way, whatever
the way out was.
"""

from __future__ import annotations

import errno
import os
import re

from twisted.internet import defer, error
from twisted.python.failure import Failure

from ._socks5 import Reply


class WayOutFailed(error.ConnectionLost):
    """
    The way out itself reports that it failed (a C{tailscale nc} that
    exited with an error status): an error however the relay's directions
    ended, unlike a hang-up seen while closing.
    """


class DialError(Exception):
    """A dial failed.  C{reply} is the SOCKS5 reply code that says so best."""

    reply: Reply = Reply.GENERAL_FAILURE
    kind: str = "failed"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DialRefusedByPolicy(DialError):
    reply = Reply.NOT_ALLOWED
    kind = "refused-by-policy"


class NetworkUnreachable(DialError):
    reply = Reply.NETWORK_UNREACHABLE
    kind = "network-unreachable"


class HostUnreachable(DialError):
    """Also used when a name does not resolve: to the client it is the same."""

    reply = Reply.HOST_UNREACHABLE
    kind = "host-unreachable"


class ConnectionRefused(DialError):
    reply = Reply.CONNECTION_REFUSED
    kind = "connection-refused"


class DialTimeout(DialError):
    reply = Reply.TTL_EXPIRED
    kind = "timeout"


class LocalAPIUnreachable(DialError):
    """
    tailscaled's LocalAPI socket is missing or refuses.  A general failure to
    the client: the target did not refuse anything, tsmux could not ask.
    """

    kind = "localapi-unreachable"


class UpstreamUnreachable(DialError):
    """An upstream proxy (SOCKS5 server) could not be reached: tsmux could not ask."""

    kind = "upstream-unreachable"


_ERRNO_CLASSES: dict[int, type[DialError]] = {
    errno.ECONNREFUSED: ConnectionRefused,
    errno.EHOSTUNREACH: HostUnreachable,
    errno.ENETUNREACH: NetworkUnreachable,
    errno.ETIMEDOUT: DialTimeout,
}


def dialErrorFromFailure(failure: Failure) -> DialError:
    """Turn whatever a connection attempt failed with into a L{DialError}."""
    value = failure.value
    if isinstance(value, DialError):
        return value
    text = failureReason(failure) or type(value).__name__
    if isinstance(value, error.ConnectionRefusedError):
        return ConnectionRefused(text)
    if isinstance(value, error.DNSLookupError):
        return HostUnreachable(text)
    if isinstance(value, error.NoRouteError):
        return NetworkUnreachable(text)
    if isinstance(value, (error.TimeoutError, defer.TimeoutError)):
        return DialTimeout(text)
    osError = getattr(value, "osError", None)
    if isinstance(osError, int) and osError in _ERRNO_CLASSES:
        return _ERRNO_CLASSES[osError](text)
    if isinstance(value, OSError) and value.errno in _ERRNO_CLASSES:
        return _ERRNO_CLASSES[value.errno](text)
    return DialError(text)


# tailscaled's dial errors are Go error strings (from the kernel's errno text
# or gVisor's netstack); the most specific pattern wins, so order matters.
_LOCALAPI_PATTERNS: tuple[tuple[re.Pattern[str], type[DialError]], ...] = (
    # A failed lookup is "host unreachable" even when its cause reads "network is
    # unreachable" (e.g. "lookup x on 1.1.1.1:53: dial udp: network is unreachable").
    (re.compile(r"resolve failure|no such host|server misbehaving|lookup \S+ on ", re.I), HostUnreachable),
    (re.compile(r"connection refused", re.I), ConnectionRefused),
    (re.compile(r"network is unreachable", re.I), NetworkUnreachable),
    (re.compile(r"no route to host|host is unreachable|host unreachable", re.I), HostUnreachable),
    (re.compile(r"i/o timeout|timed out|deadline exceeded", re.I), DialTimeout),
)


def dialErrorFromLocalAPI(status: int, body: str) -> DialError:
    """
    Map a non-upgrade answer of C{POST /localapi/v0/dial} (status and body,
    e.g. C{502 dial failure: dial tcp 127.0.0.1:1: connect: connection
    refused}) to a L{DialError}.
    """
    text = body.strip() or f"HTTP {status}"
    reason = f"tailscaled: {status} {text}"
    if status == 403:
        return DialRefusedByPolicy(reason)
    for pattern, errorClass in _LOCALAPI_PATTERNS:
        if pattern.search(text):
            return errorClass(reason)
    return DialError(reason)


def failureReason(failure: Failure) -> str:
    """
    A short reason for a failed connect, preferring the OS's words
    ("No such file or directory") over Twisted's wrapping of them.
    """
    value = failure.value
    osError = getattr(value, "osError", None)
    if isinstance(osError, int):
        return os.strerror(osError)
    if isinstance(value, OSError) and value.strerror:
        return value.strerror
    return failure.getErrorMessage()


def httpStatusFor(error: DialError) -> tuple[int, str]:
    """The HTTP status (and reason phrase) an HTTP CONNECT client gets for a failed dial."""
    if isinstance(error, DialTimeout):
        return 504, "Gateway Timeout"
    if isinstance(error, DialRefusedByPolicy):
        return 403, "Forbidden"
    return 502, "Bad Gateway"
