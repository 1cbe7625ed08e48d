"""The sans-IO SOCKS5 codec, both roles, on every split of its input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tsmux._socks5 import (
    NEED_MORE,
    AddressType,
    Close,
    Command,
    ConnectRequested,
    CredentialsReceived,
    Greeting,
    Method,
    MethodSelection,
    Reply,
    ReplyMessage,
    Request,
    SendBytes,
    SOCKS5ProtocolError,
    SOCKS5ServerCodec,
    UsernamePassword,
    buildGreeting,
    buildMethodSelection,
    buildReply,
    buildRequest,
    buildUsernamePassword,
    parseGreeting,
    parseMethodSelection,
    parseReply,
    parseRequest,
    parseUsernamePassword,
)

hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}\.){0,3}[a-z0-9]{1,10}\Z"),
)
ports = st.integers(0, 65535)


def feedInPieces(codec: SOCKS5ServerCodec, data: bytes, cuts: list[int]) -> list[object]:
    events: list[object] = []
    start = 0
    for end in sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]:
        events.extend(codec.receive(data[start:end]))
        start = end
    return events


class BuildAndParseTests(SynchronousTestCase):
    """Client-role builders and parsers round-trip with the server-role ones."""

    @given(hosts, ports)
    def test_requestRoundTrip(self, host: str, port: int) -> None:
        data = buildRequest(host, port)
        request, used = parseRequest(data + b"extra")
        self.assertEqual(used, len(data))
        self.assertEqual((request.command, request.port), (Command.CONNECT, port))
        self.assertEqual(request.host, host)

    @given(hosts, ports, st.sampled_from(list(Reply)))
    def test_replyRoundTrip(self, host: str, port: int, reply: Reply) -> None:
        data = buildReply(reply, host, port)
        parsed, used = parseReply(data)
        self.assertEqual(parsed, ReplyMessage(reply, parsed.addressType, host, port))
        self.assertEqual(used, len(data))

    def test_addressTypes(self) -> None:
        self.assertEqual(parseRequest(buildRequest("10.1.2.3", 80))[0].addressType, AddressType.IPV4)
        self.assertEqual(parseRequest(buildRequest("fd7a::1", 80))[0].addressType, AddressType.IPV6)
        self.assertEqual(parseRequest(buildRequest("peer", 80))[0].addressType, AddressType.DOMAIN)

    def test_greetingAndSelection(self) -> None:
        self.assertEqual(parseGreeting(buildGreeting((0, 2))), (Greeting((0, 2)), 4))
        self.assertEqual(parseMethodSelection(buildMethodSelection(0)), (MethodSelection(0), 2))

    def test_usernamePassword(self) -> None:
        data = buildUsernamePassword(b"alice", b"s3cret")
        self.assertEqual(parseUsernamePassword(data), (UsernamePassword(b"alice", b"s3cret"), len(data)))

    @given(hosts, ports)
    def test_everyPrefixNeedsMore(self, host: str, port: int) -> None:
        data = buildRequest(host, port)
        for end in range(len(data)):
            self.assertIs(parseRequest(data[:end]), NEED_MORE)

    def test_unknownAddressType(self) -> None:
        with self.assertRaises(SOCKS5ProtocolError) as caught:
            parseRequest(b"\x05\x01\x00\x09\x00\x00")
        self.assertEqual(caught.exception.reply, Reply.ADDRESS_TYPE_NOT_SUPPORTED)

    def test_badVersionAndReserved(self) -> None:
        self.assertRaises(SOCKS5ProtocolError, parseRequest, b"\x04\x01\x00\x01")
        self.assertRaises(SOCKS5ProtocolError, parseRequest, b"\x05\x01\x01\x01")
        self.assertRaises(SOCKS5ProtocolError, parseRequest, b"\x05\x01\x00\x03\x00")


class ServerCodecTests(SynchronousTestCase):
    def test_connect(self) -> None:
        codec = SOCKS5ServerCodec()
        events = codec.receive(b"\x05\x01\x00" + buildRequest("peer.tailnet.ts.net", 22) + b"SSH-2.0-x\r\n")
        self.assertEqual(events[0], SendBytes(b"\x05\x00"))
        self.assertEqual(
            events[1],
            ConnectRequested(Request(Command.CONNECT, AddressType.DOMAIN, "peer.tailnet.ts.net", 22), b"SSH-2.0-x\r\n"),
        )
        self.assertEqual(codec.state, "done")

    def test_noAcceptableMethod(self) -> None:
        events = SOCKS5ServerCodec().receive(b"\x05\x02\x01\x02")
        self.assertEqual(events[0], SendBytes(b"\x05\xff"))
        self.assertIsInstance(events[1], Close)

    def test_bindAndUDPAssociateGet07(self) -> None:
        for command in (Command.BIND, Command.UDP_ASSOCIATE):
            events = SOCKS5ServerCodec().receive(b"\x05\x01\x00" + buildRequest("1.2.3.4", 5, command))
            self.assertEqual(events[1], SendBytes(buildReply(Reply.COMMAND_NOT_SUPPORTED)))
            self.assertIsInstance(events[2], Close)

    def test_unknownAddressTypeGets08(self) -> None:
        events = SOCKS5ServerCodec().receive(b"\x05\x01\x00\x05\x01\x00\x07\x00\x00")
        self.assertEqual(events[1], SendBytes(buildReply(Reply.ADDRESS_TYPE_NOT_SUPPORTED)))
        self.assertIsInstance(events[2], Close)

    def test_malformedRequestGets01(self) -> None:
        events = SOCKS5ServerCodec().receive(b"\x05\x01\x00\x05\x01\x07\x01")
        self.assertEqual(events[1], SendBytes(buildReply(Reply.GENERAL_FAILURE)))
        self.assertIsInstance(events[2], Close)

    def test_usernamePasswordFlow(self) -> None:
        codec = SOCKS5ServerCodec(methods=(Method.USERNAME_PASSWORD,))
        events = codec.receive(b"\x05\x01\x02" + buildUsernamePassword(b"u", b"p") + buildRequest("h", 1))
        self.assertEqual(events, [SendBytes(b"\x05\x02"), CredentialsReceived(UsernamePassword(b"u", b"p"))])
        events = codec.acceptCredentials(True)
        self.assertEqual(events[0], SendBytes(b"\x01\x00"))
        self.assertIsInstance(events[1], ConnectRequested)

    def test_usernamePasswordRejected(self) -> None:
        codec = SOCKS5ServerCodec(methods=(Method.USERNAME_PASSWORD,))
        codec.receive(b"\x05\x01\x02" + buildUsernamePassword(b"u", b"p"))
        events = codec.acceptCredentials(False)
        self.assertEqual(events[0], SendBytes(b"\x01\x01"))
        self.assertIsInstance(events[1], Close)

    @given(hosts, ports, st.binary(max_size=16), st.lists(st.integers(0, 300), max_size=10))
    @settings(max_examples=300)
    def test_everySplitGivesTheSameEvents(self, host: str, port: int, extra: bytes, cuts: list[int]) -> None:
        data = b"\x05\x02\x00\x01" + buildRequest(host, port) + extra
        events = feedInPieces(SOCKS5ServerCodec(), data, cuts)
        sent = b"".join(e.data for e in events if isinstance(e, SendBytes))
        connects = [e for e in events if isinstance(e, ConnectRequested)]
        self.assertEqual(sent, b"\x05\x00")
        self.assertEqual(len(connects), 1)
        self.assertEqual((connects[0].request.host, connects[0].request.port), (host, port))
        # Bytes after the request arrive either in the event or later, never lost:
        self.assertTrue(extra.startswith(connects[0].buffered))

    @given(st.binary(max_size=80), st.lists(st.integers(0, 80), max_size=10))
    @settings(max_examples=500)
    def test_anyBytesNeverRaise(self, data: bytes, cuts: list[int]) -> None:
        """Hostile input yields events or silence, never an exception; a Close is final."""
        codec = SOCKS5ServerCodec()
        events = feedInPieces(codec, b"\x05" + data, cuts)
        closes = [i for i, e in enumerate(events) if isinstance(e, Close)]
        if closes:
            self.assertEqual(closes, [len(events) - 1])
            self.assertEqual(codec.state, "done")

    @given(st.binary(max_size=40))
    def test_clientParsersNeverRaiseOtherwise(self, data: bytes) -> None:
        for parse in (parseMethodSelection, parseReply, parseUsernamePassword, parseGreeting, parseRequest):
            try:
                parse(data)
            except SOCKS5ProtocolError:
                pass
