"""The sans-IO response-head parser the ts-dial exchange relies on."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tsmux._http import MAX_HEAD, HTTPParseError, ResponseHead, buildSimpleResponse, parseResponseHead

UPGRADE = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ts-dial\r\nConnection: upgrade\r\n\r\n"


class ResponseHeadTests(SynchronousTestCase):
    def test_upgrade(self) -> None:
        head, used = parseResponseHead(UPGRADE + b"raw")
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
        head, used = parseResponseHead(response)
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
