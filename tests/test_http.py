"""tsmux's one HTTP parser: response heads (the ts-dial exchange), request framing (the dial filter), on every split."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tsmux._http import (
    MAX_HEAD,
    Body,
    End,
    Head,
    HTTPParseError,
    RequestFramer,
    ResponseFramer,
    ResponseHead,
    buildSimpleResponse,
    parseResponseHead,
)

UPGRADE = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ts-dial\r\nConnection: upgrade\r\n\r\n"


def parsedHead(data: bytes) -> tuple[ResponseHead, int]:
    """L{parseResponseHead}'s answer for C{data}, which must hold a whole head."""
    result = parseResponseHead(data)
    assert result is not None, "the head is incomplete"
    return result


class ResponseHeadTests(SynchronousTestCase):
    def test_upgrade(self) -> None:
        head, used = parsedHead(UPGRADE + b"raw")
        self.assertEqual((head.status, head.reason, used), (101, "Switching Protocols", len(UPGRADE)))
        self.assertEqual(head.header("upgrade"), "ts-dial")
        self.assertIsNone(head.header("Dial-Self"))

    def test_incomplete(self) -> None:
        for end in range(len(UPGRADE)):
            self.assertIsNone(parseResponseHead(UPGRADE[:end]), end)

    def test_garbage(self) -> None:
        for data in (b"SSH-2.0-x\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"):
            self.assertRaises(HTTPParseError, parseResponseHead, data)

    def test_tooLarge(self) -> None:
        self.assertRaises(HTTPParseError, parseResponseHead, b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD)

    def test_contentLength(self) -> None:
        head = ResponseHead("HTTP/1.1", 502, "Bad Gateway", (("Content-Length", "12"),))
        self.assertEqual(head.contentLength(), 12)
        self.assertRaises(HTTPParseError, ResponseHead("HTTP/1.1", 200, "", (("Content-Length", "-1"),)).contentLength)

    def test_simpleResponse(self) -> None:
        response = buildSimpleResponse(502, "Bad Gateway", "tsmux: unreachable\n")
        head, used = parsedHead(response)
        self.assertEqual((head.status, head.contentLength()), (502, len(response) - used))
        self.assertEqual(head.header("Connection"), "close")

    @given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=8))
    def test_anyBytesAnySplit(self, data: bytes, cuts: list[int]) -> None:
        """A parse, a need-more or a clean error; and the verdict does not depend on the split."""
        for end in sorted({c for c in cuts if c < len(data)}) + [len(data)]:
            try:
                parseResponseHead(data[:end])
            except HTTPParseError:
                pass


GET = b"GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"
POST = b"POST /localapi/v0/logout HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"PUT /localapi/v0/file-put/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n0\r\nTrailer: yes\r\n\r\n"
)


def frame(data: bytes, cuts: list[int]) -> list[Any]:
    framer = RequestFramer()
    events: list[Any] = []
    start = 0
    for end in sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]:
        events.extend(framer.receive(data[start:end]))
        start = end
    return events


def summarize(events: list[object]) -> tuple[list[tuple[str, str]], bytes]:
    heads = [(e.head.method, e.head.path) for e in events if isinstance(e, Head)]
    raw = b"".join(e.raw for e in events if isinstance(e, (Head, Body)))
    return heads, raw


class RequestFramerTests(SynchronousTestCase):
    def test_pipelinedRequests(self) -> None:
        events = frame(GET + POST + CHUNKED + GET, [])
        heads, raw = summarize(events)
        self.assertEqual(
            heads,
            [
                ("GET", "/localapi/v0/status"),
                ("POST", "/localapi/v0/logout"),
                ("PUT", "/localapi/v0/file-put/x"),
                ("GET", "/localapi/v0/status"),
            ],
        )
        self.assertEqual(raw, GET + POST + CHUNKED + GET)
        self.assertEqual(sum(isinstance(e, End) for e in events), 4)

    @given(st.lists(st.sampled_from([GET, POST, CHUNKED]), min_size=1, max_size=5), st.lists(st.integers(0, 600)))
    @settings(max_examples=300, deadline=None)
    def test_anySplitSameRequestsSameBytes(self, messages: list[bytes], cuts: list[int]) -> None:
        stream = b"".join(messages)
        self.assertEqual(summarize(frame(stream, cuts)), summarize(frame(stream, [])))
        self.assertEqual(summarize(frame(stream, cuts))[1], stream)

    def test_pathDecodedLikeGo(self) -> None:
        (head, *_) = frame(b"GET /localapi/v0/%67oroutines?x=1 HTTP/1.1\r\n\r\n", [])
        self.assertEqual(head.head.path, "/localapi/v0/goroutines")
        (head, *_) = frame(b"GET http://local-tailscaled.sock/localapi/v0/metrics HTTP/1.1\r\n\r\n", [])
        self.assertEqual(head.head.path, "/localapi/v0/metrics")

    def test_smugglingShapesRefused(self) -> None:
        for data in (
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
            b"POST / HTTP/1.1\r\n Folded: x\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"GET /%ff HTTP/1.1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ):
            self.assertRaises(HTTPParseError, frame, data, [])

    def test_headTooLarge(self) -> None:
        self.assertRaises(HTTPParseError, frame, b"GET / HTTP/1.1\r\nX: " + b"a" * 70000, [])

    @given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
    @settings(max_examples=500, deadline=None)
    def test_anyBytesFrameOrFailCleanly(self, data: bytes, cuts: list[int]) -> None:
        try:
            frame(data, cuts)
        except HTTPParseError:
            pass


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
CHUNKED_OK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
FORBIDDEN = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"


class ResponseFramerTests(SynchronousTestCase):
    def test_counts(self) -> None:
        framer = ResponseFramer()
        for _ in range(3):
            framer.expect(False)
        stream = OK + b"HTTP/1.1 100 Continue\r\n\r\n" + CHUNKED_OK + FORBIDDEN
        self.assertEqual(sum(framer.receive(stream[i : i + 1]) for i in range(len(stream))), 3)

    def test_headResponseHasNoBody(self) -> None:
        framer = ResponseFramer()
        framer.expect(True)
        self.assertEqual(framer.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"), 1)

    def test_upgrade(self) -> None:
        framer = ResponseFramer()
        framer.expect(False)
        self.assertEqual(framer.receive(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ts-dial\r\n\r\nraw"), 0)
        self.assertTrue(framer.upgraded)

    @given(st.binary(max_size=300))
    def test_anyBytes(self, data: bytes) -> None:
        framer = ResponseFramer()
        framer.expect(False)
        try:
            framer.receive(data)
        except HTTPParseError:
            pass


class UpgradeFramingTests(SynchronousTestCase):
    DIAL = b"POST /localapi/v0/dial HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: ts-dial\r\n\r\n"

    def test_stopsAfterAnUpgradeRequest(self) -> None:
        framer = RequestFramer()
        events = framer.receive(self.DIAL + b"raw bytes, not HTTP")
        self.assertEqual([type(e) for e in events], [Head, End])
        self.assertTrue(framer.stopped)
        self.assertEqual(framer.receive(b" more"), [])
        self.assertEqual(framer.takeBuffered(), b"raw bytes, not HTTP more")

    def test_resumesWhenRefused(self) -> None:
        framer = RequestFramer()
        framer.receive(self.DIAL + GET[:10])
        events = framer.receive(GET[10:])
        self.assertEqual(events, [])
        events = framer.resume()
        self.assertEqual([type(e) for e in events], [Head, End])
