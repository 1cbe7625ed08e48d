"""The protocol detector: verdicts, and no verdict before the bytes decide."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tsmux._detect import HTTP_METHODS, Detected, Protocol, detect


def detectInPieces(data: bytes, cuts: list[int]) -> Detected | None:
    """Feed C{data} cut at C{cuts} the way the mux does: accumulate, re-detect."""
    buffer = b""
    verdict = None
    positions = sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]
    start = 0
    for end in positions:
        buffer += data[start:end]
        start = end
        verdict = detect(buffer)
        if verdict is not None:
            return verdict
    return verdict


def decided(data: bytes) -> Detected:
    """L{detect}'s verdict on C{data}, which must be enough to decide."""
    verdict = detect(data)
    assert verdict is not None, f"{data!r} was not enough to decide"
    return verdict


class DetectTests(SynchronousTestCase):
    def test_socks5OnOneByte(self) -> None:
        """0x05 decides at once: the client waits for us after its 3-byte greeting."""
        self.assertEqual(decided(b"\x05").protocol, Protocol.SOCKS5)

    def test_everyMethod(self) -> None:
        for method in HTTP_METHODS:
            verdict = decided(method + b" /localapi/v0/status HTTP/1.1\r\n")
            self.assertEqual(verdict.protocol, Protocol.HTTP, method)

    def test_tokenPrefixNeedsMore(self) -> None:
        for prefix in (b"G", b"GE", b"GET", b"P", b"PO", b"PATC", b"OPTIONS", b"DELETE"):
            self.assertIsNone(detect(prefix), prefix)

    def test_emptyNeedsMore(self) -> None:
        self.assertIsNone(detect(b""))

    def test_methodWithoutSpaceIsNotHTTP(self) -> None:
        self.assertEqual(decided(b"GETX").protocol, Protocol.UNKNOWN)
        self.assertEqual(decided(b"get /").protocol, Protocol.UNKNOWN)

    def test_socks4(self) -> None:
        verdict = decided(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")
        self.assertEqual((verdict.protocol, verdict.description), (Protocol.SOCKS4, "SOCKS4"))

    def test_namesWhatItSaw(self) -> None:
        self.assertEqual(decided(b"\x16\x03\x01\x02\x00").description, "TLS handshake")
        self.assertEqual(decided(b"SSH-2.0-OpenSSH_9.2\r\n").description, "SSH")
        self.assertEqual(decided(b"hello world").description, "text 'hello world'")
        self.assertEqual(decided(b"\x00\xff\x10").description, "bytes 00 ff 10")

    @given(st.binary(max_size=64), st.lists(st.integers(0, 64), max_size=8))
    @settings(max_examples=400, deadline=None)
    def test_anySplitGivesTheWholeVerdict(self, data: bytes, cuts: list[int]) -> None:
        """However the bytes are cut, the verdict is the one for all of them (or still none)."""
        whole = detect(data)
        pieces = detectInPieces(data, cuts)
        if whole is None:
            self.assertIsNone(pieces)
        else:
            assert pieces is not None
            self.assertEqual(pieces.protocol, whole.protocol)

    @given(st.sampled_from(HTTP_METHODS), st.binary(max_size=32), st.lists(st.integers(0, 40), max_size=6))
    def test_httpOnAnySplit(self, method: bytes, rest: bytes, cuts: list[int]) -> None:
        verdict = detectInPieces(method + b" " + rest, cuts)
        assert verdict is not None
        self.assertEqual(verdict.protocol, Protocol.HTTP)

    @given(st.binary(min_size=1, max_size=64))
    def test_descriptionIsPrintable(self, data: bytes) -> None:
        verdict = detect(data)
        if verdict is not None:
            self.assertTrue(verdict.description.isprintable(), verdict.description)
