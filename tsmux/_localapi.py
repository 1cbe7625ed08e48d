"""
A small JSON client for tailscaled's LocalAPI over its Unix socket, on treq.

The daemon uses it to learn tailscaled's operator (who, besides root, may
write); programs may use it for status, whois and prefs.  For the C{ts-dial}
upgrade see L{tsmux._dialers}: treq cannot take a C{101}.
"""

from __future__ import annotations

import json
import pwd
from typing import Any
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from ._errors import failureReason
from ._policy import AccessPolicy

# tailscaled refuses a LocalAPI request whose Host is anything else.
LOCALAPI_HOST = "local-tailscaled.sock"


class LocalAPIError(Exception):
    """tailscaled answered with an error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body.strip()}")
        self.status = status
        self.body = body


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """No "Starting factory" / "Stopping factory" lines for every request."""

    noisy = False


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
        self._pool = HTTPConnectionPool(reactor, persistent=persistent)
        self._pool._factory = _QuietHTTP11ClientFactory
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


class OperatorWatcher:
    """
    Keeps C{policy.operatorUid} equal to tailscaled's operator
    (C{OperatorUser} in its prefs), refreshed every C{interval} seconds.  A
    failed lookup is logged once and leaves only the configured admins.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, client: LocalAPIClient, policy: AccessPolicy, interval: float) -> None:
        self._client = client
        self._policy = policy
        self._loop = LoopingCall(lambda: defer.ensureDeferred(self.refresh()))
        self._loop.clock = clock
        self._interval = interval
        self._lastProblem: str | None = None
        self.operatorName: str | None = None

    def start(self) -> None:
        self._loop.start(self._interval, now=True).addErrback(self._crashed)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _crashed(self, failure: Failure) -> None:  # pragma: no cover - refresh never raises
        self.log.failure("operator lookup stopped", failure)

    async def refresh(self) -> None:
        try:
            prefs = await self._client.prefs()
        except (ConnectError, OSError):
            # tailscaled's LocalAPI is down: LocalAPIHealth says so once; no second warning.
            self._problem(f"cannot reach tailscaled's LocalAPI: {failureReason(Failure())}", quiet=True)
            return
        except Exception:
            self._problem(f"cannot read tailscaled's prefs: {failureReason(Failure())}")
            return
        name = (prefs or {}).get("OperatorUser") or None
        if name is None:
            uid = None
        else:
            try:
                uid = pwd.getpwnam(name).pw_uid
            except KeyError:
                self._problem(f"tailscaled's operator {name!r} is not a user on this host")
                return
        if name != self.operatorName or self._lastProblem is not None:
            self.log.info("tailscaled's operator: {operator}", operator=f"{name} (uid {uid})" if name else "none")
        self._lastProblem = None
        self.operatorName = name
        self._policy.operatorUid = uid

    def _problem(self, problem: str, quiet: bool = False) -> None:
        self._policy.operatorUid = None
        self.operatorName = None
        if problem != self._lastProblem and not quiet:
            self.log.warn("{problem}; LocalAPI writes only for the configured admins", problem=problem)
        self._lastProblem = problem
