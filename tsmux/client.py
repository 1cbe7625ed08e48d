"""
Reaching tailnet hosts through tsmux from Twisted programs: an endpoint, the
C{tsmux:} endpoint string (see C{twisted/plugins/tsmux_endpoints.py}), and
an agent for treq.  See the "Client API" page of the documentation.
"""

from ._client import (
    DEFAULT_SOCKET_PATH,
    AddressTypeNotSupported,
    AuthenticationFailed,
    CommandNotSupported,
    ConnectionNotAllowed,
    ConnectionRefused,
    GeneralSOCKSFailure,
    HostUnreachable,
    NetworkUnreachable,
    SOCKSError,
    TsmuxEndpoint,
    TsmuxEndpointFactory,
    TsmuxUnreachable,
    TTLExpired,
    agent,
    errorForReply,
    readCredentialsFile,
)

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "AddressTypeNotSupported",
    "AuthenticationFailed",
    "CommandNotSupported",
    "ConnectionNotAllowed",
    "ConnectionRefused",
    "GeneralSOCKSFailure",
    "HostUnreachable",
    "NetworkUnreachable",
    "SOCKSError",
    "TTLExpired",
    "TsmuxEndpoint",
    "TsmuxEndpointFactory",
    "TsmuxUnreachable",
    "agent",
    "errorForReply",
    "readCredentialsFile",
]
