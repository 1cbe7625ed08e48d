"""
Print tailscaled's state and this node's name, asked through tsmux's socket.

    python status.py [SOCKET]
"""

import sys

from twisted.internet.error import ConnectError
from twisted.internet.task import react

from tsmux.client import DEFAULT_SOCKET_PATH
from tsmux.localapi import LocalAPIClient, LocalAPIError


async def main(reactor, socketPath: str = DEFAULT_SOCKET_PATH) -> None:
    client = LocalAPIClient(reactor, socketPath)
    try:
        status = await client.status()
    except LocalAPIError as error:
        raise SystemExit(f"status.py: tailscaled answered {error}") from None
    except ConnectError as error:
        raise SystemExit(f"status.py: cannot reach {socketPath}: {error}") from None
    finally:
        await client.close()
    print(status["BackendState"])
    print((status.get("Self") or {}).get("HostName", ""))


if __name__ == "__main__":
    react(main, sys.argv[1:])
