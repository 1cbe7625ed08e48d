"""The sans-IO SOCKS5 codec, both roles, on every split of its input, and the two roles talking to each other."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tsmux._socks5 import (
    AddressType,
    Close,
    Command,
    Connected,
    ConnectFailed,
    ConnectRequested,
    CredentialsReceived,
    CredentialsRefused,
    Greeting,
    Method,
    MethodSelection,
    ProtocolViolation,
    Reply,
    ReplyMessage,
    Request,
    SendBytes,
    SOCKS5ClientCodec,
    SOCKS5ProtocolError,
    SOCKS5ServerCodec,
    UsernamePassword,
    buildAuthStatus,
    buildGreeting,
    buildMethodSelection,
    buildReply,
    buildRequest,
    buildUsernamePassword,
    parseAuthStatus,
    parseGreeting,
    parseMethodSelection,
    parseReply,
    parseRequest,
    parseUsernamePassword,
)

hosts = st.one_of(
    # IP literals spelled as the kernel spells them (inet_ntop), as the codec returns them
    st.ip_addresses().map(lambda a: socket.inet_ntop(socket.AF_INET if a.version == 4 else socket.AF_INET6, a.packed)),
    st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}\.){0,3}[a-z0-9]{1,10}\Z"),
)
ports = st.integers(0, 65535)
secrets = st.binary(min_size=1, max_size=255)
credentialPairs = st.one_of(st.none(), st.tuples(secrets, secrets))
OUTCOMES = (Connected, ConnectFailed, CredentialsRefused, ProtocolViolation)

_T = TypeVar("_T")


def parsed(result: tuple[_T, int] | None) -> tuple[_T, int]:
    """A parser's answer when the bytes were enough: (message, bytes used)."""
    assert result is not None, "the parser wanted more bytes"
    return result


def feedInPieces(codec: Any, data: bytes, cuts: list[int]) -> list[Any]:
    """Feed C{data} to C{codec} cut at C{cuts}; all the events, in order."""
    events: list[Any] = []
    start = 0
    for end in sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]:
        events.extend(codec.receive(data[start:end]))
        start = end
    return events


def sameHost(host: str) -> object:
    """An IP literal as its address (its text may be spelled another way), a name as itself."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host


class BuildAndParseTests(SynchronousTestCase):
    """Client-role builders and parsers round-trip with the server-role ones."""

    @given(hosts, ports)
    def test_requestRoundTrip(self, host: str, port: int) -> None:
        data = buildRequest(host, port)
        request, used = parsed(parseRequest(data + b"extra"))
        self.assertEqual(used, len(data))
        self.assertEqual((request.command, request.port), (Command.CONNECT, port))
        self.assertEqual(sameHost(request.host), sameHost(host))

    @given(hosts, ports, st.sampled_from(list(Reply)))
    def test_replyRoundTrip(self, host: str, port: int, reply: Reply) -> None:
        data = buildReply(reply, host, port)
        message, used = parsed(parseReply(data))
        self.assertEqual((message.reply, message.port), (reply, port))
        self.assertEqual(sameHost(message.host), sameHost(host))
        self.assertEqual(used, len(data))

    def test_addressTypes(self) -> None:
        self.assertEqual(parsed(parseRequest(buildRequest("10.1.2.3", 80)))[0].addressType, AddressType.IPV4)
        self.assertEqual(parsed(parseRequest(buildRequest("fd7a::1", 80)))[0].addressType, AddressType.IPV6)
        self.assertEqual(parsed(parseRequest(buildRequest("peer", 80)))[0].addressType, AddressType.DOMAIN)

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
            self.assertIsNone(parseRequest(data[:end]))

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
    @settings(max_examples=300, deadline=None)
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
    @settings(max_examples=500, deadline=None)
    def test_anyBytesNeverRaise(self, data: bytes, cuts: list[int]) -> None:
        """Hostile input yields events or silence, never an exception; a Close is final."""
        codec = SOCKS5ServerCodec()
        events = feedInPieces(codec, b"\x05" + data, cuts)
        closes = [i for i, e in enumerate(events) if isinstance(e, Close)]
        if closes:
            self.assertEqual(closes, [len(events) - 1])
            self.assertEqual(codec.state, "done")

    @given(st.binary(max_size=40))
    def test_parsersNeverRaiseOtherwise(self, data: bytes) -> None:
        parsers: tuple[Callable[[bytes], object], ...] = (
            parseMethodSelection,
            parseAuthStatus,
            parseReply,
            parseUsernamePassword,
            parseGreeting,
            parseRequest,
        )
        for parse in parsers:
            try:
                parse(data)
            except SOCKS5ProtocolError:
                pass

    @given(hosts, ports, st.sampled_from(list(Reply)))
    def test_everyPrefixOfAServerAnswerNeedsMore(self, host: str, port: int, reply: Reply) -> None:
        """One "need more" answer, from every parser."""
        for build, parse in (
            (lambda: buildReply(reply, host, port), parseReply),
            (lambda: buildMethodSelection(Method.NO_AUTH), parseMethodSelection),
            (lambda: buildAuthStatus(0), parseAuthStatus),
            (lambda: buildGreeting((0, 2)), parseGreeting),
            (lambda: buildUsernamePassword(b"u", b"p"), parseUsernamePassword),
        ):
            data = build()
            for end in range(len(data)):
                self.assertIsNone(parse(data[:end]))
            self.assertEqual(parsed(parse(data))[1], len(data))


def serverAnswer(credentials: tuple[bytes, bytes] | None, reply: int, host: str, port: int) -> bytes:
    """Everything a well-behaved server sends a client offering C{credentials}, up to the reply."""
    if credentials is None:
        return buildMethodSelection(Method.NO_AUTH) + buildReply(reply, host, port)
    return buildMethodSelection(Method.USERNAME_PASSWORD) + buildAuthStatus(0x00) + buildReply(reply, host, port)


def receive(codec: SOCKS5ClientCodec, data: bytes) -> list[Any]:
    """The codec's events for C{data}, typed loosely: the tests check which kind each is."""
    return list(codec.receive(data))


def outcomeOf(testCase: SynchronousTestCase, events: list[Any]) -> Any:
    """The one outcome among C{events}, which must be the last event."""
    outcomes = [e for e in events if isinstance(e, OUTCOMES)]
    testCase.assertEqual(len(outcomes), 1, events)
    testCase.assertIs(events[-1], outcomes[0])
    return outcomes[0]


class ClientCodecTests(SynchronousTestCase):
    def test_noAuthPipelinesGreetingAndRequest(self) -> None:
        codec = SOCKS5ClientCodec("peer.ts.net", 22)
        self.assertEqual(codec.start(), b"\x05\x01\x00" + buildRequest("peer.ts.net", 22))
        self.assertEqual(codec.receive(b"\x05\x00"), [])
        reply = buildReply(Reply.SUCCEEDED, "100.64.0.1", 4242)
        (connected,) = receive(codec, reply + b"SSH-2.0-")
        self.assertEqual(connected, Connected(ReplyMessage(0, AddressType.IPV4, "100.64.0.1", 4242), b"SSH-2.0-"))
        self.assertEqual(connected.boundAddress, ("100.64.0.1", 4242))
        self.assertEqual(codec.state, "done")
        self.assertEqual(codec.receive(b"more"), [], "the rest of the stream is the relay's")

    def test_usernamePassword(self) -> None:
        codec = SOCKS5ClientCodec("h", 1, (b"alice", b"pw"))
        self.assertEqual(codec.start(), b"\x05\x02\x02\x00")
        self.assertEqual(codec.receive(b"\x05\x02"), [SendBytes(buildUsernamePassword(b"alice", b"pw"))])
        self.assertEqual(codec.receive(b"\x01\x00"), [SendBytes(buildRequest("h", 1))])
        (connected,) = codec.receive(buildReply(0))
        self.assertIsInstance(connected, Connected)

    def test_credentialsOfferedButNoAuthChosen(self) -> None:
        """The server chooses: no-auth after an offer of both sends the request, and no credentials."""
        codec = SOCKS5ClientCodec("h", 1, (b"alice", b"pw"))
        codec.start()
        self.assertEqual(codec.receive(b"\x05\x00"), [SendBytes(buildRequest("h", 1))])

    def test_credentialsRefused(self) -> None:
        codec = SOCKS5ClientCodec("h", 1, (b"alice", b"wrong"))
        codec.start()
        events = receive(codec, b"\x05\x02\x01\x01")
        self.assertEqual(events[0], SendBytes(buildUsernamePassword(b"alice", b"wrong")))
        self.assertIsInstance(events[1], CredentialsRefused)
        self.assertEqual(events[1].status, 0x01)
        self.assertEqual(codec.state, "done")

    def test_noAcceptableMethod(self) -> None:
        for credentials, selection in ((None, b"\x05\xff"), (None, b"\x05\x02"), ((b"u", b"p"), b"\x05\x01")):
            codec = SOCKS5ClientCodec("h", 1, credentials)
            codec.start()
            (failed,) = receive(codec, selection)
            self.assertIsInstance(failed, ConnectFailed)
            self.assertIsNone(failed.reply, "refused before any reply")
            self.assertIn(f"{selection[1]:#04x}", failed.reason)

    def test_replyCodesKeptAsSent(self) -> None:
        for code in (1, 2, 4, 5, 8, 0x42, 0xFF):
            codec = SOCKS5ClientCodec("h", 1)
            codec.start()
            (failed,) = receive(codec, b"\x05\x00" + buildReply(code) + b"ignored")
            self.assertEqual(failed.reply, code)  # even an undefined code
            self.assertIn(f"{code:#04x}", failed.reason)

    def test_protocolViolations(self) -> None:
        for answer in (
            b"HTTP/1.1 400 Bad Request\r\n\r\n",
            b"\x05\x00\x04\x00\x00\x01",  # a SOCKS4 reply
            b"\x05\x00\x05\x00\x01\x09",  # unknown address type
            b"\x05\x00\x05\x00\x00\x03\x00",  # empty domain name
        ):
            codec = SOCKS5ClientCodec("h", 1)
            codec.start()
            (violation,) = codec.receive(answer)
            self.assertIsInstance(violation, ProtocolViolation)
            self.assertEqual(codec.state, "done")
        codec = SOCKS5ClientCodec("h", 1, (b"u", b"p"))
        codec.start()
        events = receive(codec, b"\x05\x02\x05\x00")
        self.assertIsInstance(events[-1], ProtocolViolation)
        self.assertIn("username/password version", events[-1].reason)

    def test_misuse(self) -> None:
        codec = SOCKS5ClientCodec("h", 1)
        self.assertRaises(RuntimeError, codec.receive, b"\x05\x00")
        codec.start()
        self.assertRaises(RuntimeError, codec.start)
        self.assertRaises(ValueError, SOCKS5ClientCodec, "x" * 256, 1)
        self.assertRaises(ValueError, SOCKS5ClientCodec, "h", 65536)
        self.assertRaises(ValueError, SOCKS5ClientCodec, "h", 1, (b"", b"pw"))

    def test_nothingKeptWhenDone(self) -> None:
        codec = SOCKS5ClientCodec("h", 1, (b"alice", b"pw"))
        codec.start()
        codec.receive(b"\x05\x02\x01\x00" + buildReply(0) + b"data")
        self.assertEqual((codec._buffer, codec._request, codec._authentication), (b"", b"", None))

    @given(
        hosts,
        ports,
        credentialPairs,
        hosts,
        ports,
        st.integers(0, 255),
        st.binary(max_size=16),
        st.lists(st.integers(0, 600), max_size=10),
    )
    @settings(max_examples=300, deadline=None)
    def test_everySplitGivesTheSameEvents(
        self,
        host: str,
        port: int,
        credentials: tuple[bytes, bytes] | None,
        boundHost: str,
        boundPort: int,
        reply: int,
        extra: bytes,
        cuts: list[int],
    ) -> None:
        codec = SOCKS5ClientCodec(host, port, credentials)
        first = codec.start()
        events = feedInPieces(codec, serverAnswer(credentials, reply, boundHost, boundPort) + extra, cuts)
        sent = first + b"".join(e.data for e in events if isinstance(e, SendBytes))
        expected = buildGreeting((Method.NO_AUTH,)) + buildRequest(host, port)
        if credentials is not None:
            expected = buildGreeting((Method.USERNAME_PASSWORD, Method.NO_AUTH)) + buildUsernamePassword(*credentials)
            expected += buildRequest(host, port)
        self.assertEqual(sent, expected)
        outcome = outcomeOf(self, events)
        if reply == Reply.SUCCEEDED:
            self.assertIsInstance(outcome, Connected)
            self.assertEqual(outcome.boundAddress, (boundHost, boundPort))
            # Bytes after the reply arrive either in the event or later (for the relay), never lost:
            self.assertTrue(extra.startswith(outcome.buffered))
        else:
            self.assertEqual(outcome, ConnectFailed(outcome.reason, reply))
        self.assertEqual(codec.state, "done")

    @given(credentialPairs, st.binary(max_size=80), st.lists(st.integers(0, 80), max_size=10))
    @settings(max_examples=500, deadline=None)
    def test_anyBytesNeverRaise(self, credentials: tuple[bytes, bytes] | None, data: bytes, cuts: list[int]) -> None:
        """Hostile answers yield events or silence, never an exception; an outcome is last and final."""
        codec = SOCKS5ClientCodec("peer", 22, credentials)
        codec.start()
        events = feedInPieces(codec, b"\x05" + data, cuts)
        if any(isinstance(e, OUTCOMES) for e in events):
            outcomeOf(self, events)
            self.assertEqual(codec.state, "done")
        else:
            self.assertNotEqual(codec.state, "done")
        self.assertTrue(all(isinstance(e, (SendBytes, *OUTCOMES)) for e in events), events)


class RoundTripTests(SynchronousTestCase):
    """The client codec talking to the server codec, bytes carried by hand in both directions."""

    def handshake(
        self,
        client: SOCKS5ClientCodec,
        server: SOCKS5ServerCodec,
        answer: Callable[[Request], bytes],
        acceptCredentials: Callable[[UsernamePassword], bool] = lambda credentials: True,
    ) -> tuple[Any, list[Request], bool]:
        """
        Run the handshake; C{answer} gives the server's reply to a CONNECT.
        @return: the client's outcome, the requests the server saw, and whether the server closed.
        """
        clientEvents: list[Any] = []
        requests: list[Request] = []
        closed = False
        toServer = [client.start()]
        while toServer and not closed:
            serverEvents = server.receive(toServer.pop(0))
            while serverEvents:
                event = serverEvents.pop(0)
                if isinstance(event, SendBytes):
                    answered = client.receive(event.data)
                    clientEvents.extend(answered)
                    toServer.extend(e.data for e in answered if isinstance(e, SendBytes))
                elif isinstance(event, CredentialsReceived):
                    serverEvents.extend(server.acceptCredentials(acceptCredentials(event.credentials)))
                elif isinstance(event, ConnectRequested):
                    requests.append(event.request)
                    serverEvents.append(SendBytes(answer(event.request)))
                else:
                    self.assertIsInstance(event, Close)
                    closed = True
        return outcomeOf(self, clientEvents), requests, closed

    @given(hosts, ports, credentialPairs, hosts, ports, st.sampled_from(list(Reply)))
    @settings(max_examples=200, deadline=None)
    def test_connect(
        self,
        host: str,
        port: int,
        credentials: tuple[bytes, bytes] | None,
        boundHost: str,
        boundPort: int,
        reply: Reply,
    ) -> None:
        methods = (Method.USERNAME_PASSWORD,) if credentials is not None else (Method.NO_AUTH,)
        server = SOCKS5ServerCodec(methods)
        seen: list[UsernamePassword] = []

        def check(offered: UsernamePassword) -> bool:
            seen.append(offered)
            return True

        outcome, requests, closed = self.handshake(
            SOCKS5ClientCodec(host, port, credentials),
            server,
            lambda request: buildReply(reply, boundHost, boundPort),
            check,
        )
        self.assertFalse(closed)
        self.assertEqual(requests, [Request(Command.CONNECT, requests[0].addressType, host, port)])
        self.assertEqual(seen, [] if credentials is None else [UsernamePassword(*credentials)])
        self.assertEqual(server.chosenMethod, methods[0])
        if reply == Reply.SUCCEEDED:
            self.assertEqual(
                outcome, Connected(ReplyMessage(reply, outcome.reply.addressType, boundHost, boundPort), b"")
            )
        else:
            self.assertIsInstance(outcome, ConnectFailed)
            self.assertEqual(outcome.reply, reply)

    def test_undefinedReplyCodeKeptAsSent(self) -> None:
        outcome, _, _ = self.handshake(
            SOCKS5ClientCodec("peer", 22), SOCKS5ServerCodec(), lambda request: buildReply(0x42)
        )
        self.assertEqual(outcome.reply, 0x42)

    def test_serverWantsCredentialsTheClientHasNot(self) -> None:
        outcome, requests, closed = self.handshake(
            SOCKS5ClientCodec("peer", 22), SOCKS5ServerCodec((Method.USERNAME_PASSWORD,)), lambda request: b""
        )
        self.assertTrue(closed)
        self.assertEqual(requests, [])
        self.assertIsInstance(outcome, ConnectFailed)
        self.assertIsNone(outcome.reply)

    @given(credentialPairs.filter(lambda pair: pair is not None))
    def test_credentialsRefused(self, credentials: tuple[bytes, bytes]) -> None:
        outcome, requests, closed = self.handshake(
            SOCKS5ClientCodec("peer", 22, credentials),
            SOCKS5ServerCodec((Method.USERNAME_PASSWORD,)),
            lambda request: b"",
            lambda offered: False,
        )
        self.assertTrue(closed)
        self.assertEqual(requests, [])
        self.assertEqual(outcome, CredentialsRefused(outcome.reason, 0x01))

    def test_optimisticDataReachesTheClient(self) -> None:
        """Bytes the target sends right after the reply come out of the client codec as leftover."""
        outcome, _, _ = self.handshake(
            SOCKS5ClientCodec("peer", 22),
            SOCKS5ServerCodec(),
            lambda request: buildReply(Reply.SUCCEEDED, "fd7a:115c::1", 1) + b"SSH-2.0-x\r\n",
        )
        self.assertEqual(outcome.buffered, b"SSH-2.0-x\r\n")
        self.assertEqual(outcome.boundAddress, ("fd7a:115c::1", 1))
