"""
Sans-IO HTTP/1.1 pieces tsmux needs around the LocalAPI.

treq and Twisted's Agent cannot take a C{101 Switching Protocols} (they skip
1xx), and the C{ts-dial} upgrade is exactly that, so the dialer parses the
response head itself.  Only the head is parsed here; bodies are framed by
the caller (the dial error bodies are small).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

MAX_HEAD: Final = 64 * 1024
"""A response head larger than this is refused rather than buffered."""


class HTTPParseError(Exception):
    """The bytes are not an HTTP/1.x response head we can use."""


def findHeader(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    """The first value of header C{name} (case-insensitive), or C{None}."""
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


@dataclass(frozen=True)
class ResponseHead:
    version: str
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = field(default=())

    def header(self, name: str) -> str | None:
        return findHeader(self.headers, name)

    def contentLength(self) -> int | None:
        value = self.header("Content-Length")
        if value is None:
            return None
        if not (value.isascii() and value.isdigit()):
            raise HTTPParseError(f"bad Content-Length {value!r}")
        return int(value)


def parseResponseHead(data: bytes) -> tuple[ResponseHead, int] | None:
    """
    Parse a response head from the start of C{data}.

    @return: the head and the number of bytes it used (the rest is body or,
        after a 101, the upgraded stream), or C{None} if it is incomplete.
    @raise HTTPParseError: not HTTP, or a head over L{MAX_HEAD}.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > MAX_HEAD:
            raise HTTPParseError(f"response head larger than {MAX_HEAD} bytes")
        if data and not b"HTTP/".startswith(data[:5]):
            raise HTTPParseError(f"not an HTTP response: {data[:16]!r}")
        return None
    if end > MAX_HEAD:
        raise HTTPParseError(f"response head larger than {MAX_HEAD} bytes")
    try:
        text = data[:end].decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise HTTPParseError("undecodable response head") from None
    statusLine, *headerLines = text.split("\r\n")
    parts = statusLine.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise HTTPParseError(f"bad status line {statusLine[:80]!r}")
    if len(parts[1]) != 3 or not (parts[1].isascii() and parts[1].isdigit()):
        raise HTTPParseError(f"bad status code in {statusLine[:80]!r}")
    headers = []
    for line in headerLines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HTTPParseError(f"bad header line {line[:80]!r}")
        headers.append((name, value.strip()))
    reason = parts[2] if len(parts) > 2 else ""
    return ResponseHead(parts[0], int(parts[1]), reason, tuple(headers)), end + 4


def buildSimpleResponse(status: int, reason: str, body: str, extraHeaders: str = "") -> bytes:
    """
    A complete response that closes the connection: what tsmux itself says
    when it cannot pass a request on (e.g. the LocalAPI is unreachable).
    """
    payload = body.encode("utf-8")
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n"
        f"{extraHeaders}"
        "\r\n"
    ).encode("ascii") + payload
