"""
Reaching tailscaled's LocalAPI: L{LocalAPIAccess}, how the daemon connects
for a caller (as that caller), and L{LocalAPIClient}, a small JSON client
on treq that the C{nc} dialer and programs use for status, whois and prefs.
For the C{ts-dial} upgrade see L{tsmux._dialers}: treq cannot take a C{101}.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IProtocol
from twisted.logger import Logger
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from ._ascaller import Identity, canActAsOthers, connectUnixAs
from ._peercred import PeerCredentials
from ._policy import callerGroups
from ._twistedprivate import quietConnectionPool

# tailscaled refuses a LocalAPI request whose Host is anything else.
LOCALAPI_HOST = "local-tailscaled.sock"


class LocalAPIError(Exception):
    """tailscaled answered with an error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body.strip()}")
        self.status = status
        self.body = body


@implementer(IAgentEndpointFactory)
class _UnixEndpointFactory:
    def __init__(self, reactor: Any, path: str, timeout: float) -> None:
        self._reactor = reactor
        self._path = path
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._path, timeout=self._timeout)


class LocalAPIClient:
    """JSON requests to tailscaled's LocalAPI at C{socketPath}."""

    def __init__(self, reactor: Any, socketPath: str, timeout: float = 10.0, persistent: bool = False) -> None:
        self.socketPath = socketPath
        self._timeout = timeout
        self._pool = quietConnectionPool(reactor, persistent)
        agent = Agent.usingEndpointFactory(reactor, _UnixEndpointFactory(reactor, socketPath, timeout), pool=self._pool)
        self._http = HTTPClient(agent)

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send a request (JSON body if given) and return the decoded JSON answer."""
        url = f"http://{LOCALAPI_HOST}/localapi/v0/{path.lstrip('/')}"
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if body is not None:
            kwargs["json"] = body
        response = await self._http.request(method, url, **kwargs)
        text = await response.text("utf-8")
        if response.code >= 400:
            raise LocalAPIError(response.code, text)
        return json.loads(text) if text.strip() else None

    async def status(self) -> Any:
        return await self.request("GET", "status")

    async def prefs(self) -> Any:
        return await self.request("GET", "prefs")

    async def whois(self, address: str) -> Any:
        return await self.request("GET", f"whois?addr={quote(address, safe='')}")

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


class LocalAPIAccess:
    """
    How tsmux connects to tailscaled's LocalAPI on a caller's behalf: as the
    caller.  tailscaled reads the connecting task's effective ids
    (SO_PEERCRED) and decides every request on them, so a connection made
    with the caller's uid, gid and groups gets exactly the caller's rights:
    tailscaled's own rules, operator, sudo checks and revocations, whatever
    its release, with nothing imitated here.

    Whether tsmux may switch ids is decided by L{decide}, at start (after
    twistd may have dropped root).  Without that privilege, only callers of
    tsmux's own uid reach the LocalAPI; tsmux never lends its own rights.
    """

    log = Logger()

    def __init__(self, reactor: Any, path: str, timeout: float) -> None:
        self._reactor = reactor
        self.path = path
        self._timeout = timeout
        self.ownUid = os.geteuid()
        self.actAsCallers = False
        self.whyNot: str | None = "not started"

    def decide(self) -> None:
        """See, now, whether this process can act as its callers; say so once if not."""
        self.ownUid = os.geteuid()
        self.whyNot = canActAsOthers()
        self.actAsCallers = self.whyNot is None
        if self.whyNot is not None:
            self.log.warn(
                "tsmux cannot act as its callers toward tailscaled ({why}): LocalAPI requests from uids other "
                "than {uid} get 403; SOCKS5 and HTTP CONNECT dials are made as uid {uid}",
                why=self.whyNot,
                uid=self.ownUid,
            )

    def identityFor(self, peer: PeerCredentials | None) -> Identity | None:
        """Who to be toward tailscaled for C{peer}; C{None}: this process itself."""
        if peer is None or not self.actAsCallers:
            return None
        return Identity(peer.uid, peer.gid, callerGroups(peer))

    def refusal(self, peer: PeerCredentials | None) -> str | None:
        """Why C{peer} may not use the LocalAPI through tsmux at all, or C{None}."""
        if peer is None:
            return "the caller is unknown (no peer credentials), and tsmux never lends tailscaled's rights"
        if self.actAsCallers or peer.uid == self.ownUid:
            return None
        return (
            f"tsmux cannot connect to tailscaled as uid {peer.uid} ({self.whyNot}) and never lends its own "
            f"rights; use tailscaled's socket {self.path} directly"
        )

    def connect(self, peer: PeerCredentials | None, protocol: IProtocol) -> Deferred[IProtocol]:
        """Connect C{protocol} to the LocalAPI as C{peer} (call L{refusal} first)."""
        return connectUnixAs(self._reactor, self.path, self.identityFor(peer), protocol, self._timeout)


class LocalAPIHealth:
    """
    Says once when tailscaled's LocalAPI becomes unreachable and once when it
    is back, instead of a warning per connection.
    """

    log = Logger()

    def __init__(self, path: str, socksUsesIt: bool = True) -> None:
        self.path = path
        self.socksUsesIt = socksUsesIt
        self.reachable: bool | None = None

    def succeeded(self) -> None:
        if self.reachable is False:
            self.log.info("tailscaled's LocalAPI at {path} is reachable again", path=self.path)
        self.reachable = True

    def failed(self, reason: str) -> None:
        if self.reachable is not False:
            consequence = (
                "SOCKS5 dials through it fail with reply 01 and LocalAPI requests get HTTP 502"
                if self.socksUsesIt
                else "LocalAPI requests get HTTP 502"
            )
            self.log.warn(
                "tailscaled's LocalAPI at {path} is unreachable ({reason}); {consequence} until it is back",
                path=self.path,
                reason=reason,
                consequence=consequence,
            )
        self.reachable = False
