"""
tsmux: SOCKS5, HTTP CONNECT and tailscaled's LocalAPI on one Unix socket.

The daemon is C{tsmux} (or C{twistd -n tsmux}); this package's public API is
what a program embedding or extending it needs: the dialer interface and its
implementations, the typed dial errors, and the server factory.
"""

from ._cli import jsonLogObserver
from ._dialers import DirectDialer, LocalAPIDialer
from ._errors import (
    ConnectionRefused,
    DialError,
    DialRefusedByPolicy,
    DialTimeout,
    HostUnreachable,
    LocalAPIUnreachable,
    NetworkUnreachable,
)
from ._interfaces import IDialer, IUpstream
from ._server import MuxFactory
from ._service import Config, Options, buildService

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConnectionRefused",
    "DialError",
    "DialRefusedByPolicy",
    "DialTimeout",
    "DirectDialer",
    "HostUnreachable",
    "IDialer",
    "IUpstream",
    "LocalAPIDialer",
    "LocalAPIUnreachable",
    "MuxFactory",
    "NetworkUnreachable",
    "Options",
    "buildService",
    "jsonLogObserver",
    "__version__",
]
