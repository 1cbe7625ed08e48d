"""
Sans-IO protocol detection from the first bytes of a connection.

The rules, and why:

  - C{0x05} first: SOCKS5, decided on that one byte.  A SOCKS5 greeting is
    three bytes and the client then waits for us, so asking for more can
    deadlock (gost and cmux users met exactly that).
  - An HTTP method token followed by a space: the LocalAPI.  Bytes that are
    still a prefix of some C{"METHOD "} mean "need more"; chunk boundaries
    are never assumed.
  - Anything else is refused, with a short description for the log line.
    SOCKS4 is told apart so the caller can send it a SOCKS4 rejection.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

HTTP_METHODS: Final = (
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"PATCH",
    b"DELETE",
    b"OPTIONS",
    b"CONNECT",
    b"TRACE",
)
_TOKENS: Final = tuple(method + b" " for method in HTTP_METHODS)
_LONGEST_TOKEN: Final = max(len(token) for token in _TOKENS)


class Protocol(Enum):
    SOCKS5 = "socks5"
    HTTP = "http"
    SOCKS4 = "socks4"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Detected:
    """
    The verdict.  C{description} names what was seen, for a log line; it is
    printable ASCII whatever the input.
    """

    protocol: Protocol
    description: str


def detect(data: bytes) -> Detected | None:
    """
    Classify the start of a connection.

    @return: a L{Detected}, or C{None} (need more, as every parser here) when C{data} is empty or
        a strict prefix of an HTTP method token.
    """
    if not data:
        return None
    first = data[0]
    if first == 0x05:
        return Detected(Protocol.SOCKS5, "SOCKS5")
    for token in _TOKENS:
        if data.startswith(token):
            return Detected(Protocol.HTTP, f"HTTP {token[:-1].decode('ascii')}")
    if len(data) < _LONGEST_TOKEN and any(token.startswith(data) for token in _TOKENS):
        return None
    return Detected(_classifyOther(data), describe(data))


def _classifyOther(data: bytes) -> Protocol:
    if data[0] == 0x04:
        return Protocol.SOCKS4
    return Protocol.UNKNOWN


def describe(data: bytes) -> str:
    """A short human name for bytes that are neither SOCKS5 nor HTTP."""
    first = data[0]
    if first == 0x04:
        return "SOCKS4"
    if first == 0x16 and data[1:2] == b"\x03":
        return "TLS handshake"
    if data.startswith(b"SSH-"):
        return "SSH"
    if data.startswith(b"PRI * HTTP/2"):
        return "HTTP/2 preface"
    head = data[:16]
    if all(32 <= byte < 127 for byte in head):
        return f"text {head.decode('ascii')!r}"
    return f"bytes {head.hex(' ')}"


SOCKS4_REJECTED: Final = b"\x00\x5b\x00\x00\x00\x00\x00\x00"
"""A SOCKS4 reply "request rejected or failed", so SOCKS4 clients show a clear error."""
