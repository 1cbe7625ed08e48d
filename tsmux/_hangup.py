"""
Noticing a peer that left while tsmux was not reading it.

Flow control stops reading a socket whose data the other side cannot take
(Twisted removes it from epoll), and a relay end that saw EOF is not read
again either.  A peer that hangs up meanwhile is then never seen: a client
that pushes data into a LocalAPI long poll and exits would hold two
descriptors in tsmux (and one in tailscaled) for as long as tailscaled stays
quiet.  L{sweepHungUp} asks the kernel directly, with one C{poll(2)} over just
those sockets: C{POLLHUP} means the peer has gone both ways (closed), and its
end is aborted; C{POLLRDHUP} alone means it only half-closed and is still
reading its answer, which must live.
"""

from __future__ import annotations

import select
from collections.abc import Iterable
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorFDSet
from twisted.python.failure import Failure

from ._relay import Relay, RelayEnd

_GONE = select.POLLHUP | select.POLLERR


def sweepHungUp(reactor: IReactorFDSet, relays: Iterable[Relay]) -> int:
    """
    Abort every relay end whose peer has hung up while the end was not being
    read.  Ends the reactor is reading are left to it (it will see the
    hang-up itself, after the bytes before it).

    @return: how many ends were aborted.
    """
    reading = set(reactor.getReaders())
    candidates: dict[int, RelayEnd] = {}
    for relay in relays:
        for end in (relay.client, relay.upstream):
            transport: Any = end.transport
            if end.lost or transport is None or transport in reading:
                continue
            fileno = getattr(transport, "fileno", None)
            if fileno is None:
                continue  # not a socket (a tailscale nc child's pipes)
            try:
                fd = fileno()
            except Exception:
                continue
            if fd >= 0:
                candidates[fd] = end
    if not candidates:
        return 0
    poller = select.poll()
    for fd in candidates:
        poller.register(fd, 0)  # POLLHUP and POLLERR are always reported
    aborted = 0
    for fd, events in poller.poll(0):
        if events & _GONE:
            end = candidates[fd]
            end.relay.peerGone(end, Failure(ConnectionLost("the peer hung up while tsmux was not reading it")))
            aborted += 1
    return aborted
