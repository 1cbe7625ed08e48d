"""
A sans-IO SOCKS5 codec (RFC 1928, plus the RFC 1929 username/password
sub-negotiation).

Nothing here touches a transport: parsers take the bytes received so far and
return either C{None} when they need more bytes (the one "need more" answer
of every parser in tsmux: L{tsmux._detect}, L{tsmux._http} too), or a
message together with the number of bytes it used; builders return the bytes
to send.  Both roles are here, each as a state machine that takes bytes and
returns events: L{SOCKS5ServerCodec} for tsmux's SOCKS5 server, and
L{SOCKS5ClientCodec} for the upstream-SOCKS5 dialer and the client endpoint
(both drive it through L{tsmux._client.SOCKS5ClientProtocol}).

A malformed message makes a parser raise L{SOCKS5ProtocolError}, which
carries the reply code a server should answer with (when an answer is
possible at all); the codecs turn it into events and never raise on bad
input.  Nothing here knows about dial errors: mapping an outcome to one is
the caller's job (L{tsmux._errors} imports this module, not the reverse).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Literal, Optional, TypeVar, Union

VERSION: Final = 0x05
AUTH_VERSION: Final = 0x01


class Method(IntEnum):
    """Authentication methods offered in the greeting."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(IntEnum):
    """Reply codes, RFC 1928 section 6."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


"""Returned by a parser when the bytes so far are a valid but incomplete message."""


class SOCKS5ProtocolError(Exception):
    """
    The peer sent something that is not SOCKS5.

    @ivar reply: the reply code a server should send before closing, or
        L{None} when the message is too broken to answer (or we are the client).
    """

    def __init__(self, message: str, reply: Reply | None = Reply.GENERAL_FAILURE) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Greeting:
    """Client → server: the methods the client can do."""

    methods: tuple[int, ...]


@dataclass(frozen=True)
class MethodSelection:
    """Server → client: the method chosen (or L{Method.NO_ACCEPTABLE})."""

    method: int


@dataclass(frozen=True)
class UsernamePassword:
    """Client → server, RFC 1929."""

    username: bytes
    password: bytes


@dataclass(frozen=True)
class AuthStatus:
    """Server → client, RFC 1929: C{0} is success."""

    status: int


@dataclass(frozen=True)
class Request:
    """
    Client → server.  C{host} is a dotted IPv4 address, an IPv6 address, or a
    domain name exactly as sent: names are never resolved here.
    """

    command: int
    addressType: AddressType
    host: str
    port: int


@dataclass(frozen=True)
class ReplyMessage:
    """Server → client."""

    reply: int
    addressType: AddressType
    host: str
    port: int


_Message = TypeVar("_Message")

Parsed = Optional[tuple[_Message, int]]
"""A parser's answer: the message and the number of bytes it used, or C{None} for "need more"."""


# Builders -------------------------------------------------------------------


def buildGreeting(methods: tuple[int, ...] = (Method.NO_AUTH,)) -> bytes:
    if not 1 <= len(methods) <= 255:
        raise ValueError("a greeting offers 1 to 255 methods")
    return bytes([VERSION, len(methods), *methods])


def buildMethodSelection(method: int) -> bytes:
    return bytes([VERSION, method])


def buildUsernamePassword(username: bytes, password: bytes) -> bytes:
    if not (1 <= len(username) <= 255 and 1 <= len(password) <= 255):
        raise ValueError("RFC 1929 username and password are 1 to 255 bytes")
    return bytes([AUTH_VERSION, len(username)]) + username + bytes([len(password)]) + password


def buildAuthStatus(status: int) -> bytes:
    return bytes([AUTH_VERSION, status])


def encodeAddress(host: str) -> tuple[AddressType, bytes]:
    """
    Encode C{host} as an address field: IP literals as such, anything else
    as a domain name (so MagicDNS names travel unresolved).
    """
    # inet_pton rather than ipaddress: the same literals, at a fraction of the cost per connection.
    for family, addressType in ((socket.AF_INET, AddressType.IPV4), (socket.AF_INET6, AddressType.IPV6)):
        try:
            return addressType, socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
    encoded = host.encode("idna") if not host.isascii() else host.encode("ascii")
    if not 1 <= len(encoded) <= 255:
        raise ValueError(f"a SOCKS5 domain name is 1 to 255 bytes, not {len(encoded)}")
    return AddressType.DOMAIN, bytes([len(encoded)]) + encoded


def _buildAddressed(first: int, host: str, port: int) -> bytes:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    addressType, field = encodeAddress(host)
    return bytes([VERSION, first, 0x00, addressType]) + field + struct.pack("!H", port)


def buildRequest(host: str, port: int, command: int = Command.CONNECT) -> bytes:
    return _buildAddressed(command, host, port)


def buildReply(reply: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """The reply to a request; the bound address defaults to 0.0.0.0:0."""
    return _buildAddressed(reply, host, port)


# Parsers --------------------------------------------------------------------


def parseGreeting(data: bytes) -> Parsed[Greeting]:
    if not data:
        return None
    if data[0] != VERSION:
        raise SOCKS5ProtocolError(f"not a SOCKS5 greeting (version byte {data[0]:#04x})", None)
    if len(data) < 2:
        return None
    count = data[1]
    if count == 0:
        raise SOCKS5ProtocolError("SOCKS5 greeting offers no methods", None)
    if len(data) < 2 + count:
        return None
    return Greeting(tuple(data[2 : 2 + count])), 2 + count


def parseMethodSelection(data: bytes) -> Parsed[MethodSelection]:
    if len(data) < 2:
        if data and data[0] != VERSION:
            raise SOCKS5ProtocolError(f"not a SOCKS5 server (version byte {data[0]:#04x})", None)
        return None
    if data[0] != VERSION:
        raise SOCKS5ProtocolError(f"not a SOCKS5 server (version byte {data[0]:#04x})", None)
    return MethodSelection(data[1]), 2


def parseUsernamePassword(data: bytes) -> Parsed[UsernamePassword]:
    if not data:
        return None
    if data[0] != AUTH_VERSION:
        raise SOCKS5ProtocolError(f"bad username/password version {data[0]:#04x}", None)
    if len(data) < 2:
        return None
    userEnd = 2 + data[1]
    if len(data) < userEnd + 1:
        return None
    passwordEnd = userEnd + 1 + data[userEnd]
    if len(data) < passwordEnd:
        return None
    return UsernamePassword(data[2:userEnd], data[userEnd + 1 : passwordEnd]), passwordEnd


def parseAuthStatus(data: bytes) -> Parsed[AuthStatus]:
    if len(data) < 2:
        return None
    if data[0] != AUTH_VERSION:
        raise SOCKS5ProtocolError(f"bad username/password version {data[0]:#04x}", None)
    return AuthStatus(data[1]), 2


def _parseAddressed(data: bytes, what: str) -> tuple[int, AddressType, str, int, int] | None:
    """Shared layout of requests and replies: VER, CODE, RSV, ATYP, ADDR, PORT."""
    if not data:
        return None
    if data[0] != VERSION:
        raise SOCKS5ProtocolError(f"not a SOCKS5 {what} (version byte {data[0]:#04x})")
    if len(data) < 4:
        return None
    code, reserved, rawType = data[1], data[2], data[3]
    if reserved != 0x00:
        raise SOCKS5ProtocolError(f"SOCKS5 {what} has a non-zero reserved byte")
    if rawType == AddressType.IPV4:
        end = 4 + 4
        if len(data) < end + 2:
            return None
        host = socket.inet_ntop(socket.AF_INET, data[4:end])
    elif rawType == AddressType.IPV6:
        end = 4 + 16
        if len(data) < end + 2:
            return None
        host = socket.inet_ntop(socket.AF_INET6, data[4:end])
    elif rawType == AddressType.DOMAIN:
        if len(data) < 5:
            return None
        length = data[4]
        if length == 0:
            raise SOCKS5ProtocolError(f"SOCKS5 {what} has an empty domain name")
        end = 5 + length
        if len(data) < end + 2:
            return None
        try:
            host = data[5:end].decode("ascii")
        except UnicodeDecodeError:
            raise SOCKS5ProtocolError(f"SOCKS5 {what} has a non-ASCII domain name") from None
        if "\x00" in host:
            raise SOCKS5ProtocolError(f"SOCKS5 {what} has a NUL in its domain name")
    else:
        raise SOCKS5ProtocolError(
            f"SOCKS5 {what} has unknown address type {rawType:#04x}",
            Reply.ADDRESS_TYPE_NOT_SUPPORTED,
        )
    (port,) = struct.unpack("!H", data[end : end + 2])
    return code, AddressType(rawType), host, port, end + 2


def parseRequest(data: bytes) -> Parsed[Request]:
    parsed = _parseAddressed(data, "request")
    if parsed is None:
        return parsed
    command, addressType, host, port, used = parsed
    return Request(command, addressType, host, port), used


def parseReply(data: bytes) -> Parsed[ReplyMessage]:
    parsed = _parseAddressed(data, "reply")
    if parsed is None:
        return parsed
    reply, addressType, host, port, used = parsed
    return ReplyMessage(reply, addressType, host, port), used


# Events shared by both roles --------------------------------------------------


@dataclass(frozen=True)
class SendBytes:
    """Send these bytes to the peer."""

    data: bytes


# The server role as a state machine -----------------------------------------


@dataclass(frozen=True)
class Close:
    """Close the connection after what was sent; C{reason} says why, for the log."""

    reason: str


@dataclass(frozen=True)
class ConnectRequested:
    """
    The client asked to CONNECT.  C{buffered} holds bytes it sent after the
    request (optimistic data) that belong to the target.
    """

    request: Request
    buffered: bytes


@dataclass(frozen=True)
class CredentialsReceived:
    """RFC 1929 credentials arrived; answer with L{SOCKS5ServerCodec.acceptCredentials}."""

    credentials: UsernamePassword


ServerEvent = Union[SendBytes, Close, ConnectRequested, CredentialsReceived]
ServerState = Literal["greeting", "auth", "auth-pending", "request", "done"]


class SOCKS5ServerCodec:
    """
    The server side of the handshake, from the first byte to the CONNECT.

    Feed it bytes with L{receive}; it returns events to act on.  After a
    L{ConnectRequested} the caller dials and sends L{buildReply}; the codec is
    then done and the rest of the stream belongs to the relay.  It never
    raises on bad input: errors come back as L{SendBytes} + L{Close}.
    """

    def __init__(self, methods: tuple[int, ...] = (Method.NO_AUTH,)) -> None:
        self._acceptable = methods
        self._buffer = b""
        self.state: ServerState = "greeting"
        self.chosenMethod: int | None = None

    def receive(self, data: bytes) -> list[ServerEvent]:
        self._buffer += data
        events: list[ServerEvent] = []
        while self.state in ("greeting", "auth", "request") and self._buffer:
            try:
                progressed = self._step(events)
            except SOCKS5ProtocolError as error:
                if error.reply is not None and self.state == "request":
                    events.append(SendBytes(buildReply(error.reply)))
                events.append(Close(str(error)))
                self.state = "done"
                break
            if not progressed:
                break
        return events

    def _step(self, events: list[ServerEvent]) -> bool:
        """Take one message from the buffer if it is all there; C{True} to go on."""
        if self.state == "greeting":
            return self._greeting(events)
        if self.state == "auth":
            return self._credentials(events)
        return self._request(events)

    def _greeting(self, events: list[ServerEvent]) -> bool:
        parsed = parseGreeting(self._buffer)
        if parsed is None:
            return False
        greeting, used = parsed
        self._buffer = self._buffer[used:]
        for method in self._acceptable:
            if method in greeting.methods:
                break
        else:
            events.append(SendBytes(buildMethodSelection(Method.NO_ACCEPTABLE)))
            offered = ", ".join(f"{m:#04x}" for m in greeting.methods)
            events.append(Close(f"no acceptable SOCKS5 method (offered {offered})"))
            self.state = "done"
            return False
        self.chosenMethod = method
        events.append(SendBytes(buildMethodSelection(method)))
        self.state = "auth" if method == Method.USERNAME_PASSWORD else "request"
        return True

    def _credentials(self, events: list[ServerEvent]) -> bool:
        parsed = parseUsernamePassword(self._buffer)
        if parsed is None:
            return False
        credentials, used = parsed
        self._buffer = self._buffer[used:]
        self.state = "auth-pending"
        events.append(CredentialsReceived(credentials))
        return False

    def _request(self, events: list[ServerEvent]) -> bool:
        parsed = parseRequest(self._buffer)
        if parsed is None:
            return False
        request, used = parsed
        self._buffer = self._buffer[used:]
        self.state = "done"
        if request.command != Command.CONNECT:
            events.append(SendBytes(buildReply(Reply.COMMAND_NOT_SUPPORTED)))
            events.append(Close(f"SOCKS5 command {request.command:#04x} is not supported"))
            return False
        events.append(ConnectRequested(request, self._buffer))
        self._buffer = b""
        return False

    def acceptCredentials(self, ok: bool) -> list[ServerEvent]:
        """Answer a L{CredentialsReceived}; continue with any buffered request."""
        if self.state != "auth-pending":
            raise RuntimeError("no credentials are waiting for an answer")
        if not ok:
            self.state = "done"
            return [SendBytes(buildAuthStatus(0x01)), Close("SOCKS5 authentication failed")]
        self.state = "request"
        return [SendBytes(buildAuthStatus(0x00)), *self.receive(b"")]


# The client role as a state machine -----------------------------------------


@dataclass(frozen=True)
class Connected:
    """
    The server opened the connection: C{reply} is its success reply, with
    the address it bound for us; C{buffered} holds the bytes it sent after
    the reply, which come from the target.
    """

    reply: ReplyMessage
    buffered: bytes

    @property
    def boundAddress(self) -> tuple[str, int]:
        return self.reply.host, self.reply.port


@dataclass(frozen=True)
class ConnectFailed:
    """
    The server did not open the connection.  C{reply} is the code of its
    failure reply, kept as sent (even one RFC 1928 does not define), or
    C{None} when it refused before a reply: it chose none of the
    authentication methods we offered.
    """

    reason: str
    reply: int | None


@dataclass(frozen=True)
class CredentialsRefused:
    """The server refused our RFC 1929 username and password; C{status} as it sent it (not 0)."""

    reason: str
    status: int


@dataclass(frozen=True)
class ProtocolViolation:
    """The server's answer is not SOCKS5 as RFC 1928 and RFC 1929 define it."""

    reason: str


ClientOutcome = Union[Connected, ConnectFailed, CredentialsRefused, ProtocolViolation]
ClientEvent = Union[SendBytes, ClientOutcome]
ClientState = Literal["start", "method", "auth", "reply", "done"]


class SOCKS5ClientCodec:
    """
    The client side of the handshake: a CONNECT to C{host}:C{port}, with the
    name sent unresolved.

    Send what L{start} returns, then feed the server's bytes to L{receive};
    it returns events to act on: L{SendBytes}, and last one outcome,
    L{Connected}, L{ConnectFailed}, L{CredentialsRefused} or
    L{ProtocolViolation}.  The codec is then done: after L{Connected} the
    rest of the stream belongs to the relay, after any other outcome the
    caller closes.  It never raises on bad input.

    @param credentials: C{(username, password)} for RFC 1929, offered
        alongside no-auth; the server chooses.  Without them the greeting and
        the request go in one write, saving a round trip.
    @raise ValueError: C{host}, C{port} or C{credentials} cannot be encoded.
    """

    def __init__(self, host: str, port: int, credentials: tuple[bytes, bytes] | None = None) -> None:
        self._request = buildRequest(host, port)
        self._authentication = None if credentials is None else buildUsernamePassword(*credentials)
        self._buffer = b""
        self.state: ClientState = "start"

    def start(self) -> bytes:
        """The bytes to send first, once the connection is made."""
        if self.state != "start":
            raise RuntimeError("the SOCKS5 handshake has started already")
        self.state = "method"
        if self._authentication is None:
            return buildGreeting((Method.NO_AUTH,)) + self._request
        return buildGreeting((Method.USERNAME_PASSWORD, Method.NO_AUTH))

    def receive(self, data: bytes) -> list[ClientEvent]:
        """Bytes from the server; once the outcome is out, nothing more is taken."""
        if self.state == "start":
            raise RuntimeError("start the SOCKS5 handshake before feeding it")
        if self.state == "done":
            return []
        self._buffer += data
        events: list[ClientEvent] = []
        try:
            # mypy narrows self.state above and cannot see that _step changes it.
            while self.state != "done" and self._step(events):  # type: ignore[comparison-overlap]
                pass
        except SOCKS5ProtocolError as error:
            events.append(self._finish(ProtocolViolation(str(error))))
        return events

    def _finish(self, outcome: ClientOutcome) -> ClientOutcome:
        # Done: keep nothing of the exchange (the password least of all).
        self.state = "done"
        self._buffer = self._request = b""
        self._authentication = None
        return outcome

    def _step(self, events: list[ClientEvent]) -> bool:
        """Take one message from the buffer if it is all there; C{True} to go on."""
        if self.state == "method":
            return self._methodSelection(events)
        if self.state == "auth":
            return self._authStatus(events)
        return self._reply(events)

    def _methodSelection(self, events: list[ClientEvent]) -> bool:
        parsed = parseMethodSelection(self._buffer)
        if parsed is None:
            return False
        selection, used = parsed
        self._buffer = self._buffer[used:]
        if selection.method == Method.USERNAME_PASSWORD and self._authentication is not None:
            events.append(SendBytes(self._authentication))
            self.state = "auth"
        elif selection.method == Method.NO_AUTH:
            if self._authentication is not None:
                events.append(SendBytes(self._request))  # not sent with the greeting
            self.state = "reply"
        else:
            events.append(
                self._finish(
                    ConnectFailed(
                        f"the SOCKS5 server accepts none of the methods offered (it chose {selection.method:#04x})",
                        None,
                    )
                )
            )
            return False
        return True

    def _authStatus(self, events: list[ClientEvent]) -> bool:
        parsed = parseAuthStatus(self._buffer)
        if parsed is None:
            return False
        status, used = parsed
        self._buffer = self._buffer[used:]
        if status.status != 0x00:
            events.append(
                self._finish(
                    CredentialsRefused(
                        f"the SOCKS5 server refused the username and password (status {status.status:#04x})",
                        status.status,
                    )
                )
            )
            return False
        events.append(SendBytes(self._request))
        self.state = "reply"
        return True

    def _reply(self, events: list[ClientEvent]) -> bool:
        parsed = parseReply(self._buffer)
        if parsed is None:
            return False
        reply, used = parsed
        buffered = self._buffer[used:]
        if reply.reply == Reply.SUCCEEDED:
            events.append(self._finish(Connected(reply, buffered)))
        else:
            events.append(
                self._finish(ConnectFailed(f"the SOCKS5 server answered with reply {reply.reply:#04x}", reply.reply))
            )
        return False
