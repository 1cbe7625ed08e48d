"""
The SOCKS5 client role on a connected transport, built on the sans-IO codec
in L{tsmux._socks5}: the upstream-SOCKS5 dialer and the client endpoint both
use it, so there is one implementation of the protocol.
"""

from __future__ import annotations

from ._errors import DialError
from ._relay import HandshakeThenHold
from ._socks5 import (
    NEED_MORE,
    AuthStatus,
    Method,
    MethodSelection,
    Reply,
    ReplyMessage,
    SOCKS5ProtocolError,
    buildGreeting,
    buildRequest,
    buildUsernamePassword,
    parseAuthStatus,
    parseMethodSelection,
    parseReply,
)


class SOCKS5ReplyError(DialError):
    """
    The SOCKS5 server answered the CONNECT with a failure; C{reply} is its
    code, passed on unchanged to our own client.
    """

    kind = "upstream-refused"

    def __init__(self, reply: int, reason: str) -> None:
        super().__init__(reason)
        # Kept as sent, even a code RFC 1928 does not define: passed on unchanged.
        self.reply = reply  # type: ignore[assignment]


_REPLY_TEXT = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}


class SOCKS5ClientProtocol(HandshakeThenHold):
    """
    Negotiates a CONNECT to C{host}:C{port} on a fresh connection to a SOCKS5
    server.  L{answered} fires with this protocol (an L{IUpstream} whose
    transport now leads to the target, bytes after the reply held) or fails
    with a L{DialError}: the server's own reply as L{SOCKS5ReplyError}.

    @param credentials: C{(username, password)} for RFC 1929, offered
        alongside no-auth; the server chooses.
    """

    def __init__(self, host: str, port: int, credentials: tuple[bytes, bytes] | None = None) -> None:
        super().__init__()
        self._host = host
        self._port = port
        self._credentials = credentials
        self._state = "method"
        self._buffer = b""
        self.boundAddress: tuple[str, int] | None = None

    def connectionMade(self) -> None:
        methods: tuple[int, ...] = (Method.NO_AUTH,)
        if self._credentials is not None:
            methods = (Method.USERNAME_PASSWORD, Method.NO_AUTH)
        # Greeting and request together save a round trip when no auth is needed.
        request = buildRequest(self._host, self._port)
        if self._credentials is None:
            self.transport.write(buildGreeting(methods) + request)
        else:
            self.transport.write(buildGreeting(methods))

    def _handshakeData(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._advance()
        except SOCKS5ProtocolError as error:
            self._fail(DialError(f"the upstream is not a SOCKS5 server we understand: {error}"))

    def _advance(self) -> None:
        while not self.answered.called:
            if self._state == "method":
                parsed = parseMethodSelection(self._buffer)
                if parsed is NEED_MORE:
                    return
                selection, used = parsed  # type: ignore[misc]
                assert isinstance(selection, MethodSelection)
                self._buffer = self._buffer[used:]
                if selection.method == Method.USERNAME_PASSWORD and self._credentials is not None:
                    self.transport.write(buildUsernamePassword(*self._credentials))
                    self._state = "auth"
                elif selection.method == Method.NO_AUTH:
                    if self._credentials is not None:
                        self.transport.write(buildRequest(self._host, self._port))
                    self._state = "reply"
                else:
                    self._fail(DialError("the upstream SOCKS5 server accepts none of our authentication methods"))
                    return
            elif self._state == "auth":
                parsed = parseAuthStatus(self._buffer)
                if parsed is NEED_MORE:
                    return
                status, used = parsed  # type: ignore[misc]
                assert isinstance(status, AuthStatus)
                self._buffer = self._buffer[used:]
                if status.status != 0:
                    self._fail(
                        SOCKS5ReplyError(Reply.NOT_ALLOWED, "the upstream SOCKS5 server refused our credentials")
                    )
                    return
                self.transport.write(buildRequest(self._host, self._port))
                self._state = "reply"
            else:
                parsed = parseReply(self._buffer)
                if parsed is NEED_MORE:
                    return
                reply, used = parsed  # type: ignore[misc]
                assert isinstance(reply, ReplyMessage)
                self._buffer = self._buffer[used:]
                if reply.reply != Reply.SUCCEEDED:
                    text = _REPLY_TEXT.get(reply.reply, f"reply {reply.reply:#04x}")
                    self._fail(SOCKS5ReplyError(reply.reply, f"upstream SOCKS5: {text}"))
                    return
                self.boundAddress = (reply.host, reply.port)
                leftover, self._buffer = self._buffer, b""
                self._opened(leftover)

    def _handshakeEnded(self) -> None:
        if not self.answered.called:
            self.answered.errback(DialError("the upstream SOCKS5 server closed the connection during the handshake"))
