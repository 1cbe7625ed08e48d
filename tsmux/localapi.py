"""
A small JSON client for tailscaled's LocalAPI (or tsmux's socket, which
passes the LocalAPI through), on treq: C{status()}, C{whois()}, C{prefs()}
and a generic C{request()}.
"""

from ._localapi import LocalAPIClient, LocalAPIError

__all__ = ["LocalAPIClient", "LocalAPIError"]
