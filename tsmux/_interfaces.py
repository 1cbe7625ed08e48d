"""
The interfaces tsmux is built from, in one place.

A way out of tsmux (tailscaled's LocalAPI, a direct TCP dial, later an
upstream SOCKS5 server or C{tailscale nc}) is an L{IDialer}.  What a dialer
hands back is an L{IUpstream}: a connected transport that the relay takes
over without a wrapper layer in the data path.
"""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IPushProducer, ISystemHandle, ITCPTransport
from zope.interface import Attribute, Interface


class IUpstream(Interface):
    """
    A connected stream to the target, not yet owned by anybody.

    Bytes (and an EOF or loss) that arrive before L{attach} are held and
    replayed to the protocol attached, so nothing is lost between the dial
    finishing and the relay starting.
    """

    transport = Attribute("The L{twisted.internet.interfaces.ITransport} to the target.")

    def attach(protocol):  # type: ignore[no-untyped-def]
        """
        Make C{protocol} the owner of L{transport}: connect it, replay held
        bytes, then any held EOF or connection loss.
        """

    def abort():  # type: ignore[no-untyped-def]
        """Close the stream at once; used when the client left meanwhile."""


class IDialer(Interface):
    """One way out: opens a stream to a host and port."""

    description = Attribute("A short name for logs, e.g. C{'localapi:/var/run/...'}.")

    def dial(host, port, caller=None):  # type: ignore[no-untyped-def]
        """
        Open a stream to C{host} (an IP literal, or a name passed on
        unresolved) port C{port}, on behalf of C{caller} (the client's
        L{tsmux._peercred.PeerCredentials}, or C{None}): a dialer that can
        act as the caller toward what it connects to (tailscaled, a
        C{tailscale nc} child) does.

        @return: a cancellable L{Deferred} firing with an L{IUpstream}, or
            failing with a L{tsmux.DialError} subclass.
        """


class IStreamTransport(ITCPTransport, IConsumer, IPushProducer, ISystemHandle):
    """
    What tsmux uses of a connected stream socket's transport: write, half-close and abort,
    producer and consumer for flow control, and the socket itself. For type checking: Twisted's
    TCP and Unix transports (C{tcp.Connection}, C{unix.Server}, C{unix.Client}) provide all of
    these, and protocols declare C{transport: IStreamTransport} instead of the
    C{ITransport | None} that L{twisted.internet.protocol.Protocol} declares.
    """
