"""
The client side: a Twisted endpoint, an endpoint-string parser and a treq
agent that reach a target through tsmux's SOCKS5 server on its Unix socket.

The handshake is L{SOCKS5ClientProtocol}, which drives the project's sans-IO
codec in the client role (L{tsmux._socks5.SOCKS5ClientCodec}) on a transport;
the C{socks5:} dialer uses it too, so it lives here, below both (this module
imports no dialer).  Once tsmux answers, the user's protocol takes over the
Unix transport itself, with no wrapper in the data path.
"""

from __future__ import annotations

from typing import Any, Union

from twisted.internet import defer, error
from twisted.internet.address import HostnameAddress
from twisted.internet.endpoints import UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from ._auth import _readSecretFile
from ._errors import DialError, failureReason
from ._listen import StartupError
from ._socks5 import (
    Connected,
    ConnectFailed,
    CredentialsRefused,
    ProtocolViolation,
    Reply,
    SendBytes,
    SOCKS5ClientCodec,
    buildRequest,
)
from ._twistedprivate import quietConnectionPool
from ._upstream import HandshakeThenHold

DEFAULT_SOCKET_PATH = "/var/run/tailscale/tsmux.sock"
"""Where the daemon listens by default (C{tsmux --listen})."""

DEFAULT_TIMEOUT = 30.0

UsernamePassword = tuple[str | bytes, str | bytes]

log = Logger()


# Errors ----------------------------------------------------------------------


class TsmuxUnreachable(error.ConnectError):
    """
    tsmux's socket could not be connected (missing, nobody listening, or no
    permission): the target was never asked, so this is not a L{SOCKSError}.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(string=reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class SOCKSError(error.ConnectError):
    """
    tsmux did not open the connection.  C{reply} is the SOCKS5 reply code
    it answered with (a L{Reply}), or C{None} when the handshake failed
    before a reply (the socket is not a SOCKS5 server, it closed, or it
    accepts none of the authentication methods offered).

    The subclasses, one per reply code, also derive from the Twisted error
    a direct connection would have failed with where there is one, so code
    written for C{TCP4ClientEndpoint} keeps working.
    """

    reply: Reply | None = None

    def __init__(self, reason: str, reply: int | None = None) -> None:
        super().__init__(string=reason)
        self.reason = reason
        if reply is not None:
            self.reply = Reply(reply)

    def __str__(self) -> str:
        return self.reason


class GeneralSOCKSFailure(SOCKSError):
    """Reply 0x01: e.g. tsmux could not reach tailscaled, or an unknown code."""

    reply = Reply.GENERAL_FAILURE


class ConnectionNotAllowed(SOCKSError):
    """Reply 0x02: refused by tsmux's or tailscaled's policy."""

    reply = Reply.NOT_ALLOWED


class AuthenticationFailed(ConnectionNotAllowed):
    """tsmux refused the username and password (RFC 1929); reply 0x02."""


class NetworkUnreachable(SOCKSError, error.NoRouteError):
    """Reply 0x03."""

    reply = Reply.NETWORK_UNREACHABLE


class HostUnreachable(SOCKSError, error.NoRouteError):
    """Reply 0x04; also a name that does not resolve."""

    reply = Reply.HOST_UNREACHABLE


class ConnectionRefused(SOCKSError, error.ConnectionRefusedError):
    """Reply 0x05: the target refused."""

    reply = Reply.CONNECTION_REFUSED


class TTLExpired(SOCKSError, error.TimeoutError):
    """Reply 0x06: tsmux's dial timed out."""

    reply = Reply.TTL_EXPIRED


class CommandNotSupported(SOCKSError):
    """Reply 0x07."""

    reply = Reply.COMMAND_NOT_SUPPORTED


class AddressTypeNotSupported(SOCKSError):
    """Reply 0x08."""

    reply = Reply.ADDRESS_TYPE_NOT_SUPPORTED


_REPLY_CLASSES: dict[int, type[SOCKSError]] = {
    cls.reply: cls
    for cls in (
        GeneralSOCKSFailure,
        ConnectionNotAllowed,
        NetworkUnreachable,
        HostUnreachable,
        ConnectionRefused,
        TTLExpired,
        CommandNotSupported,
        AddressTypeNotSupported,
    )
}


def errorForReply(reply: int, reason: str) -> SOCKSError:
    """The L{SOCKSError} subclass for a reply code; an unknown code is a general failure."""
    return _REPLY_CLASSES.get(reply, GeneralSOCKSFailure)(reason, reply if reply in _REPLY_CLASSES else None)


# The SOCKS5 client role on a transport -------------------------------------


class SOCKS5ReplyError(DialError):
    """
    The SOCKS5 server answered the CONNECT with a failure, or refused our
    credentials (as C{0x02}); C{reply} is its code, passed on unchanged to
    our own client.
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


def replyText(code: int) -> str:
    """RFC 1928's words for a reply code; C{reply 0x42} for one it does not define."""
    return _REPLY_TEXT.get(code, f"reply {code:#04x}")


HandshakeFailure = Union[ConnectFailed, CredentialsRefused, ProtocolViolation]


def dialErrorForOutcome(outcome: HandshakeFailure) -> DialError:
    """The L{DialError} for a failed handshake with an upstream SOCKS5 server."""
    if isinstance(outcome, CredentialsRefused):
        return SOCKS5ReplyError(Reply.NOT_ALLOWED, "the upstream SOCKS5 server refused our credentials")
    if isinstance(outcome, ConnectFailed):
        if outcome.reply is None:
            return DialError("the upstream SOCKS5 server accepts none of our authentication methods")
        return SOCKS5ReplyError(outcome.reply, f"upstream SOCKS5: {replyText(outcome.reply)}")
    return DialError(f"the upstream is not a SOCKS5 server we understand: {outcome.reason}")


class SOCKS5ClientProtocol(HandshakeThenHold):
    """
    Negotiates a CONNECT to C{host}:C{port} on a fresh connection to a SOCKS5
    server, by feeding a L{SOCKS5ClientCodec} and acting on its events.
    L{answered} fires with this protocol (an L{IUpstream} whose transport now
    leads to the target, bytes after the reply held) or fails with a
    L{DialError} (see L{dialErrorForOutcome}): the server's own reply as
    L{SOCKS5ReplyError}.

    @param credentials: C{(username, password)} for RFC 1929, offered
        alongside no-auth; the server chooses.
    @ivar boundAddress: the address the server reports it bound, once open.
    @ivar failedWith: the codec's outcome when the handshake failed (C{None}
        if the server closed before one), for callers that word their own errors.
    """

    def __init__(self, host: str, port: int, credentials: tuple[bytes, bytes] | None = None) -> None:
        super().__init__()
        self._codec: SOCKS5ClientCodec | None = SOCKS5ClientCodec(host, port, credentials)
        self.boundAddress: tuple[str, int] | None = None
        self.failedWith: HandshakeFailure | None = None

    def connectionMade(self) -> None:
        assert self._codec is not None
        self.transport.write(self._codec.start())

    def _handshakeData(self, data: bytes) -> None:
        codec = self._codec
        assert codec is not None, "no data reaches the handshake after its outcome"
        for event in codec.receive(data):
            if isinstance(event, SendBytes):
                self.transport.write(event.data)
                continue
            # The outcome, always the last event.  Held for the connection's life: keep nothing of the exchange.
            self._codec = None
            if isinstance(event, Connected):
                self.boundAddress = event.boundAddress
                self._opened(event.buffered)
            else:
                self.failedWith = event
                self._fail(dialErrorForOutcome(event))

    def _handshakeEnded(self) -> None:
        if not self.answered.called:
            self.answered.errback(DialError("the upstream SOCKS5 server closed the connection during the handshake"))


# The endpoint ----------------------------------------------------------------


class _HandshakeFactory(Factory):
    """
    Builds the handshake protocol, and passes the connector's start and stop
    on to the user's factory: its C{doStop} then comes when the connection
    ends, as with any Twisted endpoint.
    """

    noisy = False

    def __init__(self, handshake: SOCKS5ClientProtocol, userFactory: IProtocolFactory) -> None:
        self._handshake = handshake
        self._userFactory = userFactory

    def buildProtocol(self, addr: IAddress | None) -> SOCKS5ClientProtocol:
        return self._handshake

    def doStart(self) -> None:
        self._userFactory.doStart()

    def doStop(self) -> None:
        self._userFactory.doStop()


def _encodeCredentials(credentials: UsernamePassword | None) -> tuple[bytes, bytes] | None:
    if credentials is None:
        return None
    username, password = (part.encode("utf-8") if isinstance(part, str) else bytes(part) for part in credentials)
    if not (1 <= len(username) <= 255 and 1 <= len(password) <= 255):
        raise ValueError("a SOCKS5 username and password are 1 to 255 bytes each")
    return username, password


@implementer(IStreamClientEndpoint)
class TsmuxEndpoint:
    """
    Connects to C{host}:C{port} through the tsmux (or any SOCKS5 server) on
    the Unix socket C{socketPath}.  The name goes to tsmux unresolved, so
    MagicDNS names work with the C{localapi} dialer.

    The connected protocol's transport is the Unix socket's: C{getPeer()}
    and C{getHost()} name the socket, not the target.

    @param credentials: C{(username, password)} for tsmux's C{--socks-auth}.
    @param timeout: seconds for the whole connect (socket, handshake and
        tsmux's dial) before failing with L{twisted.internet.error.TimeoutError};
        C{None} for no bound.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        socketPath: str = DEFAULT_SOCKET_PATH,
        credentials: UsernamePassword | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        if isinstance(host, bytes):
            host = host.decode("ascii")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if isinstance(port, bool) or not isinstance(port, int):
            raise TypeError(f"port must be an int, not {port!r}")
        if not 0 < port <= 0xFFFF:
            raise ValueError(f"port must be 1 to 65535, not {port}")
        buildRequest(host, port)  # a bad host is a ValueError now rather than at connect time
        self._reactor = reactor
        self.host = host
        self.port = port
        self.socketPath = socketPath
        self._credentials = _encodeCredentials(credentials)
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"<TsmuxEndpoint {self.host}:{self.port} via {self.socketPath}>"

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        """
        Connect, negotiate, then build the protocol and hand it the
        transport.  Cancelling the result aborts the connection at any stage.
        """
        handshake = SOCKS5ClientProtocol(self.host, self.port, self._credentials)
        unixEndpoint = UNIXClientEndpoint(self._reactor, self.socketPath, timeout=self._timeout or 30)
        connecting = unixEndpoint.connect(_HandshakeFactory(handshake, protocolFactory))
        connecting.addErrback(self._unreachable)
        connecting.addCallback(lambda _: handshake.answered)
        connecting.addErrback(self._refused, handshake)
        connecting.addCallback(self._handOver, protocolFactory)
        if self._timeout is not None:
            connecting.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._timedOut)
        connecting.addErrback(self._logFailure)
        return connecting

    def _unreachable(self, failure: Failure) -> Failure:
        if failure.check(defer.CancelledError, error.ConnectingCancelledError, error.TimeoutError):
            return failure
        return Failure(TsmuxUnreachable(f"cannot connect to tsmux at {self.socketPath}: {failureReason(failure)}"))

    def _refused(self, failure: Failure, handshake: SOCKS5ClientProtocol) -> Failure:
        if not failure.check(DialError):
            return failure
        # Worded from the codec's outcome, not from the DialError (which is worded for the socks5: dialer).
        outcome = handshake.failedWith
        if isinstance(outcome, CredentialsRefused):
            return Failure(
                AuthenticationFailed(f"tsmux at {self.socketPath} refused the credentials", Reply.NOT_ALLOWED)
            )
        if isinstance(outcome, ConnectFailed) and outcome.reply is not None:
            code = outcome.reply
            return Failure(
                errorForReply(
                    code,
                    f"tsmux could not connect to {self.host}:{self.port}: {replyText(code)} (SOCKS5 reply {code:#04x})",
                )
            )
        if isinstance(outcome, ConnectFailed):
            reason = "it accepts none of our authentication methods"
            if self._credentials is None:
                reason += " (it wants a username and password: pass credentials)"
        elif isinstance(outcome, ProtocolViolation):
            reason = f"it is not a SOCKS5 server we understand: {outcome.reason}"
        else:
            reason = "it closed the connection during the handshake"
        return Failure(SOCKSError(f"SOCKS5 handshake with {self.socketPath} failed: {reason}"))

    def _handOver(self, upstream: SOCKS5ClientProtocol, protocolFactory: IProtocolFactory) -> IProtocol:
        try:
            hostname = self.host.encode("ascii") if self.host.isascii() else self.host.encode("idna")
            protocol = protocolFactory.buildProtocol(HostnameAddress(hostname, self.port))
        except BaseException:
            upstream.abort()
            raise
        if protocol is None:
            upstream.transport.loseConnection()
            raise error.NoProtocol()
        upstream.attach(protocol)
        return protocol

    def _timedOut(self, result: object, timeout: float) -> object:
        if isinstance(result, Failure) and result.check(defer.CancelledError, error.ConnectingCancelledError):
            raise error.TimeoutError(
                string=f"no connection to {self.host}:{self.port} through {self.socketPath} within {timeout:g} s"
            )
        return result

    def _logFailure(self, failure: Failure) -> Failure:
        log.debug(
            "tsmux connect to {host}:{port} via {path} failed: {reason}",
            host=self.host,
            port=self.port,
            path=self.socketPath,
            reason=failure.getErrorMessage() or failure.type.__name__,  # type: ignore[union-attr]  # a Failure has a type
        )
        return failure


# Endpoint strings ------------------------------------------------------------


def _parsePort(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= 0xFFFF:
        raise ValueError(f"tsmux endpoint: port must be 1 to 65535, not {value!r}")
    return int(value)


def _parseTimeout(value: str) -> float | None:
    if value.lower() == "none":
        return None
    try:
        timeout = float(value)
    except ValueError:
        raise ValueError(f"tsmux endpoint: timeout must be a number of seconds, not {value!r}") from None
    if not timeout > 0 or timeout == float("inf"):
        raise ValueError(f"tsmux endpoint: timeout must be a positive number of seconds, not {value!r}")
    return timeout


def readCredentialsFile(path: str) -> tuple[bytes, bytes]:
    """
    The single C{user:password} line in C{path}, checked like tsmux's own
    secret files (not readable by others).
    """
    try:
        entries = _readSecretFile(path, "tsmux credentials")
    except StartupError as problem:
        raise ValueError(str(problem)) from None
    if len(entries) != 1:
        raise ValueError(f"tsmux credentials file {path} must hold exactly one user:password line")
    return entries[0]


def endpointFromString(reactor: Any, *args: str, **kwargs: str) -> TsmuxEndpoint:
    """
    The C{tsmux:} endpoint-string parser: C{tsmux:host=H:port=P} with
    optional C{path=} (the socket, default L{DEFAULT_SOCKET_PATH}),
    C{timeout=} (seconds, or C{none}) and C{credentials=} (a file holding
    one C{user:password} line, mode 600).  C{tsmux:H:P} works too.
    """
    names = ("host", "port")
    if len(args) > len(names):
        raise ValueError(f"tsmux endpoint: too many positional arguments {args!r}; use host=...:port=...")
    for name, value in zip(names[: len(args)], args, strict=True):
        if name in kwargs:
            raise ValueError(f"tsmux endpoint: {name} given twice")
        kwargs[name] = value
    unknown = set(kwargs) - {"host", "port", "path", "timeout", "credentials"}
    if unknown:
        raise ValueError(f"tsmux endpoint: unknown parameter(s) {', '.join(sorted(unknown))}")
    if not kwargs.get("host"):
        raise ValueError("tsmux endpoint: host= is required")
    if "port" not in kwargs:
        raise ValueError("tsmux endpoint: port= is required")
    return TsmuxEndpoint(
        reactor,
        kwargs["host"],
        _parsePort(kwargs["port"]),
        socketPath=kwargs.get("path") or DEFAULT_SOCKET_PATH,
        credentials=readCredentialsFile(kwargs["credentials"]) if kwargs.get("credentials") else None,
        timeout=_parseTimeout(kwargs["timeout"]) if "timeout" in kwargs else DEFAULT_TIMEOUT,
    )


# The agent -------------------------------------------------------------------


@implementer(IAgentEndpointFactory)
class TsmuxEndpointFactory:
    """
    Endpoints through tsmux for an L{Agent}: the tunnel to the URI's host
    and port, wrapped in TLS for C{https} (TLS runs end to end with the
    target; tsmux sees only ciphertext).
    """

    def __init__(
        self,
        reactor: Any,
        socketPath: str = DEFAULT_SOCKET_PATH,
        contextFactory: IPolicyForHTTPS | None = None,
        credentials: UsernamePassword | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._socketPath = socketPath
        self._policy = contextFactory if contextFactory is not None else BrowserLikePolicyForHTTPS()
        self._credentials = credentials
        self._timeout = timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"the host of {uri.toBytes()!r} is not ASCII") from None
        endpoint = TsmuxEndpoint(self._reactor, host, uri.port, self._socketPath, self._credentials, self._timeout)
        if uri.scheme in (b"http", b"ws"):
            return endpoint
        if uri.scheme in (b"https", b"wss"):
            return wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")


def agent(
    reactor: Any,
    socketPath: str = DEFAULT_SOCKET_PATH,
    pool: HTTPConnectionPool | None = None,
    contextFactory: IPolicyForHTTPS | None = None,
    credentials: UsernamePassword | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> IAgent:
    """
    An L{IAgent} (for treq's C{agent=} or L{treq.client.HTTPClient}) that
    sends every request through tsmux at C{socketPath}.

    @param pool: defaults to a persistent L{HTTPConnectionPool}: connections
        to the same scheme, host and port are reused.
    @param contextFactory: an L{IPolicyForHTTPS} for C{https} URLs; the
        default verifies the target's certificate against the system's
        trust roots, like treq's own default.
    """
    if pool is None:
        pool = quietConnectionPool(reactor, persistent=True)
    endpoints = TsmuxEndpointFactory(reactor, socketPath, contextFactory, credentials, timeout)
    return Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
