"""
Fetch a URL through tsmux with treq and print the status and the body.

    python fetch.py URL [SOCKET]

SOCKET is tsmux's socket, /var/run/tailscale/tsmux.sock by default.
"""

import sys

import treq
from twisted.internet.error import ConnectError
from twisted.internet.task import react
from twisted.web.client import HTTPConnectionPool

from tsmux.client import DEFAULT_SOCKET_PATH, agent


async def main(reactor, url: str, socketPath: str = DEFAULT_SOCKET_PATH) -> None:
    pool = HTTPConnectionPool(reactor)  # persistent: connections are reused
    throughTsmux = agent(reactor, socketPath, pool=pool)
    try:
        response = await treq.get(url, agent=throughTsmux)
        body = await response.text()
    except ConnectError as error:
        # Through tsmux: tsmux.client.ConnectionRefused, HostUnreachable, ...
        raise SystemExit(f"fetch.py: {error}") from None
    finally:
        await pool.closeCachedConnections()
    print(response.code)
    print(body, end="")


if __name__ == "__main__":
    react(main, sys.argv[1:])
