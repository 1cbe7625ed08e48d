"""
The private Twisted APIs tsmux needs, in one place, each with why no public
one will do.  Checked against Twisted 24.7 and 26.10; if a Twisted release
moves one, this is the only module to change.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


def systemdInheritedDescriptors() -> Any:
    """
    The sockets systemd passed, as Twisted parsed them.  Twisted reads and
    removes C{LISTEN_FDS}/C{LISTEN_PID} from the environment when
    C{twisted.internet.endpoints} is imported, so the public
    C{twisted.python.systemd.ListenFDs.fromEnvironment()} finds nothing by the
    time tsmux asks; the parsed copy lives on C{_SystemdParser._sddaemon}.

    @return: an object with C{inheritedDescriptors()} and
        C{inheritedNamedDescriptors()}.
    """
    from twisted.internet.endpoints import _SystemdParser

    return _SystemdParser._sddaemon


class _SystemdUnixPort(unix.Port):
    """
    A Unix socket systemd made and passed in: its path is systemd's to
    remove (Twisted's C{unix.Port} would unlink it on stop).
    """

    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)


def adoptSystemdUnixPort(reactor: Any, fd: int, factory: IProtocolFactory) -> tuple[IListeningPort, bytes | None]:
    """
    A listening port on systemd's Unix socket C{fd}, not yet listening.  The
    public C{IReactorSocket.adoptStreamPort} builds a plain C{unix.Port},
    which unlinks the socket's path on stop; only the private constructor
    takes a subclass.

    @return: the port (set C{port.mode} before C{startListening()}: Twisted
        chmods the socket to it, 0666 by default, twisted#10261) and the path
        the socket is bound to.
    """
    port = _SystemdUnixPort._fromListeningDescriptor(reactor, fd, factory)
    # The bound path: Port._bindPath in newer Twisted (26.10); Twisted 24.7 keeps it in .port.
    return port, getattr(port, "_bindPath", port.port)


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """No "Starting factory" / "Stopping factory" lines for every request."""

    noisy = False


def quietConnectionPool(reactor: Any, persistent: bool) -> HTTPConnectionPool:
    """
    An C{HTTPConnectionPool} whose connections log nothing: the pool builds
    each connection's factory from its private C{_factory} class, which is
    noisy, and offers no public way to change it.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietHTTP11ClientFactory
    return pool


_PLAIN_SOCKETS = (tcp.Server, tcp.Client, unix.Server, unix.Client)


def sendNow(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)}, but sent at once when nothing is queued.

    Twisted's C{write()} only queues, and sends on the next reactor turn:
    an epoll change and a turn per write, on every relayed read and every
    reply.  Nothing public says whether a transport has bytes queued, so
    this reads C{FileDescriptor}'s buffer attributes (C{dataBuffer},
    C{offset}, C{_tempDataLen}) and the C{socket}; anything else (TLS, a
    closing transport, queued bytes or descriptors) takes the ordinary way.
    """
    if (
        type(transport) not in _PLAIN_SOCKETS
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnecting
        or transport._tempDataLen
        or len(transport.dataBuffer) != transport.offset
        or getattr(transport, "TLS", False)
        or getattr(transport, "_sendmsgQueue", None)
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        transport.write(data)  # let Twisted meet the error its own way, on its next write
        return
    if sent < len(data):
        transport.write(data[sent:])
