"""
tsmux: SOCKS5, HTTP CONNECT and tailscaled's LocalAPI on one Unix socket.

The daemon is C{tsmux} (or C{twistd -n tsmux}); this package's public API is
what a program embedding or extending it needs: the dialer interface and its
implementations, the typed dial errors, and the server factory.  Importing
the package loads none of the daemon: the names that live in its modules are
imported on first use, so C{import tsmux.client} stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

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
from ._version import __version__

_LAZY = {
    "Config": "._config",
    "Options": "._config",
    "buildService": "._service",
    "MuxFactory": "._mux",
    "ConnectionContext": "._context",
    "DirectDialer": "._dialers",
    "LocalAPIDialer": "._dialers",
    "jsonLogObserver": "._cli",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tsmux' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Config",
    "ConnectionContext",
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
