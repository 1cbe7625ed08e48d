"""
Sans-IO HTTP/1.1: the one parser and builder tsmux has.

  - Response heads (L{parseResponseHead}): treq and Twisted's Agent cannot
    take a C{101 Switching Protocols} (they skip 1xx), and the C{ts-dial}
    upgrade is exactly that, so the dialer parses the head itself.
  - Request heads (L{splitHead}, L{parseRequestHead}): HTTP CONNECT,
    tsmux's own C{/tsmux/} API, and the LocalAPI dial filter.
  - Message framing (L{RequestFramer}, L{ResponseFramer}), for the dial
    filter, which must see every request on a connection (keep-alive and
    pipelining included) without changing a byte: L{RequestFramer.receive}
    returns the input cut into events that carry the original bytes, so
    forwarding them in order reproduces the stream exactly, and
    L{ResponseFramer} only counts where responses end (to answer in order).
  - L{buildSimpleResponse}: what tsmux itself answers.

Every parser returns C{None} when it needs more bytes, and raises
L{HTTPParseError} on bytes it cannot use.  Ambiguous framing is an error,
never a guess, because the filter and tailscaled must agree on where each
request starts (request smuggling): both Content-Length and
Transfer-Encoding, several Content-Lengths, or a transfer coding other than
chunked.  Go's server refuses the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Union
from urllib.parse import unquote, urlsplit

MAX_HEAD: Final = 64 * 1024
"""A head larger than this is refused rather than buffered."""
MAX_LINE: Final = 8 * 1024

# Checked with regular expressions rather than byte by byte in Python: every request and
# ts-dial answer passes here.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f-\xff]")


class HTTPParseError(Exception):
    """The bytes are not HTTP/1.x that tsmux can use: answer 400 (or fail the dial) and close."""


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


def _parseStatusLine(line: bytes) -> tuple[str, int, str]:
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise HTTPParseError(f"bad status line {line[:80]!r}")
    if len(parts[1]) != 3 or not (parts[1].isascii() and parts[1].isdigit()):
        raise HTTPParseError(f"bad status code in {line[:80]!r}")
    return parts[0].decode("ascii"), int(parts[1]), parts[2].decode("latin-1") if len(parts) > 2 else ""


def parseResponseHead(data: bytes) -> tuple[ResponseHead, int] | None:
    """
    Parse a response head from the start of C{data}.

    @return: the head and the number of bytes it used (the rest is body or,
        after a 101, the upgraded stream), or C{None} if it is incomplete.
    @raise HTTPParseError: not HTTP, or a head over L{MAX_HEAD}.
    """
    if data and not b"HTTP/".startswith(data[:5]):
        raise HTTPParseError(f"not an HTTP response: {data[:16]!r}")
    split = splitHead(data)
    if split is None:
        return None
    lines, used = split
    version, status, reason = _parseStatusLine(lines[0])
    return ResponseHead(version, status, reason, _parseHeaderLines(lines[1:])), used


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...] = field(default=())

    def header(self, name: str) -> str | None:
        return findHeader(self.headers, name)

    @property
    def path(self) -> str:
        """
        The decoded path, as Go's C{r.URL.Path} sees it (tailscaled routes on
        that): C{/localapi/v0/%67oroutines} is C{/localapi/v0/goroutines}.
        """
        target = self.target
        if not target.startswith("/"):
            # Absolute form, any scheme in any case, as Go's url.ParseRequestURI takes it.
            target = urlsplit(target).path or "/"
        path = target.split("?", 1)[0].split("#", 1)[0]
        return unquote(path, errors="strict")

    @property
    def query(self) -> str:
        """The raw query string (after C{?}, before any C{#})."""
        return self.target.partition("?")[2].partition("#")[0]

    @property
    def originForm(self) -> bool:
        """C{/path?query}: the only form tsmux's guard accepts (clients of a Unix socket send it)."""
        return self.target.startswith("/")


@dataclass(frozen=True)
class Head:
    """A request head, with its bytes."""

    head: RequestHead
    raw: bytes


@dataclass(frozen=True)
class Body:
    """Body bytes (chunk framing included), as received."""

    raw: bytes


@dataclass(frozen=True)
class End:
    """The current message is complete."""


RequestEvent = Union[Head, Body, End]


def _parseHeaderLines(lines: list[bytes]) -> tuple[tuple[str, str], ...]:
    headers = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HTTPParseError("obsolete header line folding")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HTTPParseError(f"bad header line {line[:60]!r}")
        if _CONTROL.search(value):
            raise HTTPParseError("control character in a header value")
        headers.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    return tuple(headers)


def splitHead(buffer: bytes) -> tuple[list[bytes], int] | None:
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise HTTPParseError(f"no end of head within {MAX_HEAD} bytes")
        return None
    if end > MAX_HEAD:
        raise HTTPParseError(f"head larger than {MAX_HEAD} bytes")
    return buffer[:end].split(b"\r\n"), end + 4


def parseRequestHead(lines: list[bytes]) -> RequestHead:
    requestLine, *headerLines = lines
    parts = requestLine.split(b" ")
    if len(parts) != 3:
        raise HTTPParseError(f"bad request line {requestLine[:80]!r}")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HTTPParseError(f"bad method {method[:20]!r}")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HTTPParseError(f"unsupported version {version[:20]!r}")
    if not target or _TARGET_BAD.search(target):
        raise HTTPParseError("bad request target")
    head = RequestHead(method.decode(), target.decode("ascii"), version.decode(), _parseHeaderLines(headerLines))
    try:
        head.path  # noqa: B018 - a target that does not decode is refused here, not later
    except (UnicodeDecodeError, ValueError):
        raise HTTPParseError("request target does not decode") from None
    return head


def _bodyFraming(headers: tuple[tuple[str, str], ...]) -> int | str:
    """C{"chunked"}, or a byte count (0 for none)."""
    lengths = [v for k, v in headers if k.lower() == "content-length"]
    codings = [v for k, v in headers if k.lower() == "transfer-encoding"]
    if codings:
        if lengths:
            raise HTTPParseError("both Content-Length and Transfer-Encoding")
        if len(codings) != 1 or codings[0].strip().lower() != "chunked":
            raise HTTPParseError(f"unsupported Transfer-Encoding {', '.join(codings)[:40]!r}")
        return "chunked"
    if not lengths:
        return 0
    if len(set(lengths)) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()) or len(lengths[0]) > 18:
        raise HTTPParseError(f"bad Content-Length {lengths[0][:20]!r}")
    return int(lengths[0])


class _ChunkedBody:
    """Finds the end of a chunked body; passes its bytes through untouched."""

    def __init__(self) -> None:
        self._state = "size"
        self._remaining = 0
        self._line = b""

    def consume(self, data: bytes) -> tuple[int, bool]:
        """@return: how many bytes of C{data} belong to the body, and whether it ended."""
        index = 0
        while index < len(data):
            if self._state == "data":
                take = min(self._remaining, len(data) - index)
                index += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data-crlf"
                continue
            newline = data.find(b"\n", index)
            if newline < 0:
                self._line += data[index:]
                if len(self._line) > MAX_LINE:
                    raise HTTPParseError("chunk line too long")
                return len(data), False
            line = self._line + data[index:newline]
            self._line = b""
            index = newline + 1
            if not line.endswith(b"\r"):
                raise HTTPParseError("chunk line not ended by CRLF")
            line = line[:-1]
            if self._state == "size":
                size = line.split(b";", 1)[0].strip()
                if not size or len(size) > 16 or not set(size) <= set(b"0123456789abcdefABCDEF"):
                    raise HTTPParseError(f"bad chunk size {size[:20]!r}")
                self._remaining = int(size, 16)
                self._state = "data" if self._remaining else "trailer"
            elif self._state == "data-crlf":
                if line:
                    raise HTTPParseError("chunk data longer than its size")
                self._state = "size"
            else:  # trailer
                if not line:
                    return index, True
        return index, False


class RequestFramer:
    """
    Cuts a client's byte stream into requests.  Feed bytes with L{receive};
    the events carry exactly the bytes given, in order.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._bodyLeft = 0
        self._chunked: _ChunkedBody | None = None
        self._upgrading = False
        self.inBody = False
        self.stopped = False

    def receive(self, data: bytes) -> list[RequestEvent]:
        """
        Frame C{data}.  After a request that asks for an C{Upgrade}, framing
        stops (L{stopped}) and later bytes are kept unparsed: only the
        server's answer tells whether they are still HTTP (L{resume}) or the
        upgraded stream (L{takeBuffered}).
        """
        events: list[RequestEvent] = []
        self._buffer += data
        while self._buffer and not self.stopped:
            if self.inBody:
                if self._chunked is not None:
                    used, ended = self._chunked.consume(self._buffer)
                else:
                    used = min(self._bodyLeft, len(self._buffer))
                    self._bodyLeft -= used
                    ended = self._bodyLeft == 0
                if used:
                    events.append(Body(self._buffer[:used]))
                    self._buffer = self._buffer[used:]
                if ended:
                    self._endMessage(events)
                continue
            split = splitHead(self._buffer)
            if split is None:
                if self._buffer.startswith(b"\r\n"):
                    # RFC 9112 2.2: a server SHOULD ignore empty lines before a request.
                    events.append(Body(b"\r\n"))
                    self._buffer = self._buffer[2:]
                    continue
                break
            lines, used = split
            if not lines[0]:
                events.append(Body(b"\r\n"))
                self._buffer = self._buffer[2:]
                continue
            head = parseRequestHead(lines)
            framing = _bodyFraming(head.headers)
            if framing == "chunked" and head.version == "HTTP/1.0":
                # Go ignores Transfer-Encoding on HTTP/1.0: the two would disagree on framing.
                raise HTTPParseError("Transfer-Encoding on an HTTP/1.0 request")
            events.append(Head(head, self._buffer[:used]))
            self._buffer = self._buffer[used:]
            self._upgrading = head.header("Upgrade") is not None
            if framing == "chunked":
                self._chunked = _ChunkedBody()
                self.inBody = True
            elif framing:
                self._bodyLeft = int(framing)
                self.inBody = True
            else:
                self._endMessage(events)
        return events

    def _endMessage(self, events: list[RequestEvent]) -> None:
        self.inBody = False
        self._chunked = None
        events.append(End())
        if self._upgrading:
            self.stopped = True

    def resume(self) -> list[RequestEvent]:
        """The upgrade was refused: what follows is HTTP again."""
        self.stopped = False
        self._upgrading = False
        return self.receive(b"")

    @property
    def bufferedSize(self) -> int:
        """Bytes received but not yet framed (held while an upgrade is pending)."""
        return len(self._buffer)

    def takeBuffered(self) -> bytes:
        """The upgrade happened: hand over the unparsed bytes."""
        data, self._buffer = self._buffer, b""
        return data


class ResponseFramer:
    """
    Counts complete responses in a server's byte stream.  Call
    L{expect} once per request forwarded (saying whether it was HEAD), in
    order; L{receive} returns how many responses ended in the bytes given.
    After a C{101}, L{upgraded} is true and nothing more is framed.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._pendingHead: list[bool] = []
        self._bodyLeft: int | None = None
        self._chunked: _ChunkedBody | None = None
        self._untilClose = False
        self.upgraded = False

    def expect(self, isHead: bool) -> None:
        self._pendingHead.append(isHead)

    def receive(self, data: bytes) -> int:
        if self.upgraded or self._untilClose:
            return 0
        completed = 0
        self._buffer += data
        while self._buffer and not self.upgraded and not self._untilClose:
            if self._chunked is not None:
                used, ended = self._chunked.consume(self._buffer)
                self._buffer = self._buffer[used:]
                if not ended:
                    break
                self._chunked = None
                completed += 1
                continue
            if self._bodyLeft is not None:
                used = min(self._bodyLeft, len(self._buffer))
                self._bodyLeft -= used
                self._buffer = self._buffer[used:]
                if self._bodyLeft:
                    break
                self._bodyLeft = None
                completed += 1
                continue
            split = splitHead(self._buffer)
            if split is None:
                break
            lines, used = split
            self._buffer = self._buffer[used:]
            _, status, _ = _parseStatusLine(lines[0])
            headers = _parseHeaderLines(lines[1:])
            if status == 101:
                self.upgraded = True
                break
            if 100 <= status < 200:
                continue  # interim response; the real one follows
            isHead = self._pendingHead.pop(0) if self._pendingHead else False
            if isHead or status in (204, 304):
                completed += 1
                continue
            framing = _bodyFraming(headers)
            if framing == "chunked":
                self._chunked = _ChunkedBody()
            elif any(k.lower() == "content-length" for k, _ in headers):
                if framing:
                    self._bodyLeft = int(framing)
                else:
                    completed += 1
            else:
                self._untilClose = True
        return completed


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
